"""An SMTP server for tests (aiosmtpd) that captures what the hub sends.

It can be told to answer with a temporary (451) or permanent (550) failure, a number of
times or until told otherwise, and it can be stopped to refuse connections.
"""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.servers.common import free_port


@dataclass(frozen=True)
class Captured:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self._server = server

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._server._next_reply()
        if reply is not None:
            return reply
        content = envelope.original_content or b""
        self._server._capture(
            Captured(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=content,
            )
        )
        return "250 2.0.0 Ok: queued"


class SmtpServer:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[Captured] = []
        self._lock = threading.Lock()
        self._reply: str | None = None
        self._reply_times: int | None = None
        self._controller: Controller | None = None

    # Called from the server's thread.
    def _next_reply(self) -> str | None:
        with self._lock:
            if self._reply is None:
                return None
            reply = self._reply
            if self._reply_times is not None:
                self._reply_times -= 1
                if self._reply_times <= 0:
                    self._reply, self._reply_times = None, None
            return reply

    def _capture(self, captured: Captured) -> None:
        with self._lock:
            self.messages.append(captured)

    def fail_with(self, reply: str, times: int | None = None) -> None:
        """Answer DATA with `reply` (e.g. "451 4.3.0 try later"), `times` times or always."""
        with self._lock:
            self._reply, self._reply_times = reply, times

    def succeed(self) -> None:
        self.fail_with_none()

    def fail_with_none(self) -> None:
        with self._lock:
            self._reply, self._reply_times = None, None

    def start(self) -> None:
        kwargs: dict[str, Any] = {"hostname": self.host, "port": self.port}
        self._controller = Controller(_Handler(self), ready_timeout=10, **kwargs)
        self._controller.start()

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
