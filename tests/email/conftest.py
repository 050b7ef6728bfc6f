"""Fixtures of the email tests: a store, a real Dovecot and SMTP server, and the adapter."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from hub.bus import InProcessBus
from hub.channels.base import HubServices
from hub.channels.email import EmailAdapter
from hub.config import Config, parse_config
from hub.ingest import Ingestor
from hub.timeline.sqlite import SqliteStore
from tests.servers.dovecot import DovecotServer
from tests.servers.dovecot import dovecot as dovecot  # fixture
from tests.servers.smtp import SmtpServer
from tests.servers.smtp import smtp_server as smtp_server  # fixture

CHANNEL = "mail"
ADDRESS = "support@example.test"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "email"


def make_config(
    data_dir: Path,
    *,
    imap_port: int = 1,
    smtp_port: int = 1,
    imap: dict[str, Any] | None = None,
    max_attachment_bytes: int | None = None,
) -> Config:
    imap_lines = "".join(f"\n      {k}: {v}" for k, v in (imap or {}).items())
    extra = (
        f"\n    max_attachment_bytes: {max_attachment_bytes}"
        if max_attachment_bytes is not None
        else ""
    )
    text = f"""
hub:
  data_dir: {data_dir}
channels:
  - name: {CHANNEL}
    type: email
    address: {ADDRESS}
    display_name: Example Support
    imap:
      host: 127.0.0.1
      port: {imap_port}
      username: {ADDRESS}
      password: imap-test-password
      tls: none{imap_lines}
    smtp:
      host: 127.0.0.1
      port: {smtp_port}
      tls: none{extra}
"""
    return parse_config(text, "<email tests>")


class Hub:
    """The pieces of a hub an email adapter needs, over one SQLite file that outlives
    adapter instances (a restarted hub is a new adapter on the same store)."""

    def __init__(self, tmp: Path, imap: DovecotServer | None, smtp: SmtpServer | None) -> None:
        self.tmp = tmp
        self.dovecot = imap
        self.smtp = smtp
        self.db = tmp / "hub.db"
        self.store = SqliteStore(self.db)
        self.bus = InProcessBus()
        self.ingestor = Ingestor(self.store, self.bus)
        self.adapters: list[EmailAdapter] = []
        self.imap_options: dict[str, Any] = {}
        self.max_attachment_bytes: int | None = None

    def config(self) -> Config:
        return make_config(
            self.tmp / "data",
            imap_port=self.dovecot.port if self.dovecot else 1,
            smtp_port=self.smtp.port if self.smtp else 1,
            imap=self.imap_options,
            max_attachment_bytes=self.max_attachment_bytes,
        )

    @property
    def services(self) -> HubServices:
        return HubServices(
            config=self.config(), store=self.store, bus=self.bus, ingestor=self.ingestor
        )

    def adapter(self) -> EmailAdapter:
        config = self.config()
        adapter = EmailAdapter(config.channels[0], config)  # type: ignore[arg-type]
        adapter.backoff_base = 0.05
        adapter.backoff_max = 0.5
        adapter.imap_timeout = 10
        adapter.smtp_timeout = 5
        self.adapters.append(adapter)
        return adapter

    async def start_adapter(self) -> EmailAdapter:
        adapter = self.adapter()
        await adapter.start(self.services)
        return adapter

    async def prepared_adapter(self) -> EmailAdapter:
        adapter = self.adapter()
        await adapter.prepare(self.services)
        return adapter

    def count_inbound(self) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE channel = ? AND direction = 'in'", (CHANNEL,)
            ).fetchone()
        return int(row[0])

    def inbound_external_ids(self) -> list[str]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT external_id FROM events WHERE channel = ? AND direction = 'in'",
                (CHANNEL,),
            ).fetchall()
        return [r[0] for r in rows]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """hub(imap=None, smtp=None) -> Hub, started; stopped at the end of the test."""
    made: list[Hub] = []

    async def make(imap: DovecotServer | None = None, smtp: SmtpServer | None = None) -> Hub:
        instance = Hub(tmp_path, imap, smtp)
        await instance.store.start()
        await instance.bus.start()
        made.append(instance)
        return instance

    yield make
    for instance in made:
        for adapter in instance.adapters:
            await adapter.stop()
        await instance.bus.close()
        await instance.store.close()


def make_mail(
    n: int,
    *,
    sender: str = "customer@client.example",
    name: str = "Casey Customer",
    subject: str | None = None,
    body: str | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    to: str = ADDRESS,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [
        f"From: {name} <{sender}>",
        f"To: {to}",
        f"Subject: {subject or f'Question {n}'}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: {message_id or f'<mail-{n}@client.example>'}",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {references}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", ""]
    lines.append(body or f"Hello, this is message number {n}.")
    return ("\r\n".join(lines) + "\r\n").encode()
