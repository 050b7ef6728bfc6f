"""One IMAP session on one mailbox, over aioimaplib: the few commands the hub needs.

Everything is by UID (sequence numbers shift under expunges) and reads with BODY.PEEK,
so fetching never sets \\Seen: another person reading the mailbox can't hide mail from
the hub, and the hub doesn't change what they see. A lost connection is noticed at once
(aioimaplib's lost-connection callback) and surfaces as ConnectionError from whatever
command was waiting, instead of a command hanging until its timeout.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from aioimaplib import aioimaplib

from hub.config import ImapSettings

T = TypeVar("T")

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_INTERNALDATE = re.compile(rb'INTERNALDATE "([^"]+)"')
_EXISTS = re.compile(rb"^\* \d+ (EXISTS|RECENT)")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ImapError(Exception):
    """The server refused a command (NO/BAD) or answered something we can't read."""


@dataclass(frozen=True, slots=True)
class FetchedMail:
    uid: int
    raw: bytes
    internaldate: datetime | None


def quote_mailbox(name: str) -> str:
    """A quoted IMAP string; aioimaplib sends arguments as they are."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uid_set(uids: Sequence[int]) -> str:
    """Compact "1:5,9,12:14" form of sorted UIDs, to keep command lines short."""
    parts: list[str] = []
    ordered = sorted(set(uids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def imap_date(day: date) -> str:
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def _internaldate(text: bytes) -> datetime | None:
    # "17-Jul-1996 02:44:25 -0700": the same layout as RFC 2822 dates once dashes go.
    try:
        return parsedate_to_datetime(text.decode().replace("-", " ", 2))
    except (ValueError, TypeError, IndexError):
        return None


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[FetchedMail]:
    """Mails in a UID FETCH (UID INTERNALDATE BODY.PEEK[]) response.

    A message's items come as: b'N FETCH (UID u INTERNALDATE "..." BODY[] {size}', the
    literal bytes, then b')' or b' UID u)' (servers may order items as they like).
    Untagged FETCH lines without a literal (flag changes by other sessions) are skipped.
    """
    mails: list[FetchedMail] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if (
            isinstance(line, bytes)
            and _FETCH_START.match(line)
            and i + 1 < len(lines)
            and isinstance(lines[i + 1], bytearray)
        ):
            raw = bytes(lines[i + 1])
            tail = lines[i + 2] if i + 2 < len(lines) and isinstance(lines[i + 2], bytes) else b""
            meta = line + b" " + tail
            uid = _UID.search(meta)
            when = _INTERNALDATE.search(meta)
            if uid is not None:
                mails.append(
                    FetchedMail(
                        int(uid.group(1)), raw, _internaldate(when.group(1)) if when else None
                    )
                )
            i += 3
            continue
        i += 1
    return mails


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    """Notes untagged EXISTS/RECENT that arrive with other commands' responses.

    aioimaplib drops those when no command expects them; a mail announced that way just
    before we enter IDLE would otherwise wait for the next IDLE renewal.
    """

    mailbox_changed = False

    def _untagged_response(self, line: bytes) -> aioimaplib.Command:
        if _EXISTS.match(line):
            self.mailbox_changed = True
        return super()._untagged_response(line)


class _Client(aioimaplib.IMAP4):
    def create_client(  # type: ignore[override]
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        conn_lost_cb: object = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)  # type: ignore[arg-type]
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


class ImapSession:
    def __init__(self, settings: ImapSettings, *, timeout: float = 60.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._lost: asyncio.Future[None] | None = None
        self._imap: _Client | None = None
        self.uidvalidity: int | None = None

    @property
    def imap(self) -> _Client:
        if self._imap is None:
            raise ConnectionError("IMAP session not open")
        return self._imap

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        """Await a command, but give up at once if the connection drops meanwhile."""
        assert self._lost is not None
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        raise ConnectionError("IMAP connection lost")

    @staticmethod
    def _ok(response: aioimaplib.Response, what: str) -> aioimaplib.Response:
        if response.result != "OK":
            text = b" ".join(x for x in response.lines if isinstance(x, bytes))
            raise ImapError(f"{what}: {response.result} {text.decode(errors='replace')[:300]}")
        return response

    # --- connection --------------------------------------------------------------------

    async def open(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        context = ssl.create_default_context() if s.tls in ("ssl", "starttls") else None
        self._imap = _Client(
            host=s.host,
            port=s.port,
            timeout=self.timeout,
            conn_lost_cb=self._connection_lost,
            ssl_context=context if s.tls == "ssl" else None,
        )
        await self._guard(self._imap.wait_hello_from_server())
        if s.tls == "starttls":
            assert context is not None
            await self._starttls(context)
        self._ok(await self._guard(self._imap.login(s.username, s.password)), "LOGIN")

    async def _starttls(self, context: ssl.SSLContext) -> None:
        # aioimaplib has no STARTTLS: send the command, then upgrade the transport.
        protocol = self.imap.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("server does not offer STARTTLS (set imap.tls to ssl or none)")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        self._ok(await self._guard(protocol.execute(command)), "STARTTLS")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            protocol.transport, protocol, context, server_hostname=self.settings.host
        )
        protocol.transport = transport
        # Capabilities seen before TLS can't be trusted (RFC 3501 6.2.1): ask again.
        await self._guard(protocol.capability())

    async def close(self) -> None:
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            if self._lost is not None and not self._lost.done():
                await asyncio.wait_for(imap.logout(), 5)
        except Exception:  # closing anyway; the server may be gone
            pass
        transport = imap.protocol.transport if imap.protocol else None
        if transport is not None:
            transport.close()

    @property
    def has_idle(self) -> bool:
        return self.imap.has_capability("IDLE")

    # --- mailbox -----------------------------------------------------------------------

    async def select(self, mailbox: str) -> int:
        """SELECT the mailbox; returns its UIDVALIDITY."""
        response = self._ok(
            await self._guard(self.imap.select(quote_mailbox(mailbox))), f"SELECT {mailbox}"
        )
        for line in response.lines:
            if isinstance(line, bytes) and (match := _UIDVALIDITY.search(line)):
                self.uidvalidity = int(match.group(1))
                return self.uidvalidity
        raise ImapError(f"SELECT {mailbox}: no UIDVALIDITY in the answer")

    def take_changed(self) -> bool:
        """Whether the server announced new mail since the last call."""
        protocol = self.imap.protocol
        changed = bool(getattr(protocol, "mailbox_changed", False))
        protocol.mailbox_changed = False  # type: ignore[attr-defined]
        return changed

    async def _uid_search(self, *criteria: str) -> list[int]:
        response = self._ok(
            await self._guard(self.imap.uid_search(*criteria, charset=None)), "UID SEARCH"
        )
        uids: list[int] = []
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                text = line.removeprefix(b"SEARCH").strip()
                uids.extend(int(x) for x in text.split() if x.isdigit())
        return sorted(set(uids))

    async def uids_after(self, last_uid: int) -> list[int]:
        # "n:*" also matches the highest UID when n is beyond it: filter.
        return [u for u in await self._uid_search(f"UID {last_uid + 1}:*") if u > last_uid]

    async def uids_since(self, day: date) -> list[int]:
        return await self._uid_search("SINCE", imap_date(day))

    async def fetch(self, uids: Sequence[int]) -> list[FetchedMail]:
        if not uids:
            return []
        response = self._ok(
            await self._guard(
                self.imap.uid("fetch", uid_set(uids), "(UID INTERNALDATE BODY.PEEK[])")
            ),
            "UID FETCH",
        )
        wanted = set(uids)
        return sorted(
            (m for m in parse_fetch(response.lines) if m.uid in wanted), key=lambda m: m.uid
        )

    async def mark_seen(self, uids: Sequence[int]) -> None:
        if uids:
            self._ok(
                await self._guard(
                    self.imap.uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Seen)")
                ),
                "UID STORE",
            )

    async def move(self, uids: Sequence[int], mailbox: str) -> None:
        if not uids:
            return
        target = quote_mailbox(mailbox)
        if self.imap.has_capability("MOVE"):
            self._ok(await self._guard(self.imap.uid("move", uid_set(uids), target)), "UID MOVE")
            return
        # RFC 6851 fallback: copy, flag deleted, expunge just those (UIDPLUS) or all.
        self._ok(await self._guard(self.imap.uid("copy", uid_set(uids), target)), "UID COPY")
        self._ok(
            await self._guard(
                self.imap.uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Deleted)")
            ),
            "UID STORE",
        )
        if self.imap.has_capability("UIDPLUS"):
            self._ok(await self._guard(self.imap.uid("expunge", uid_set(uids))), "UID EXPUNGE")
        else:
            self._ok(await self._guard(self.imap.expunge()), "EXPUNGE")

    async def idle(self, renew_after: float) -> bool:
        """IDLE until the server pushes something or `renew_after` passes (then renew).

        Returns True when the server announced a change. The IDLE is always ended with
        DONE before returning, so the session can send commands again.
        """
        imap = self.imap
        idle_task = await self._guard(imap.idle_start(timeout=renew_after))
        try:
            push = await self._guard(imap.wait_server_push(renew_after + 30))
        except TimeoutError:
            push = aioimaplib.STOP_WAIT_SERVER_PUSH
        finally:
            if imap.has_pending_idle() and self._lost is not None and not self._lost.done():
                imap.idle_done()
        await self._guard(asyncio.wait_for(idle_task, self.timeout))
        return push != aioimaplib.STOP_WAIT_SERVER_PUSH

    async def noop(self) -> None:
        self._ok(await self._guard(self.imap.noop()), "NOOP")

    async def wait(self, seconds: float) -> None:
        """Sleep between polls, waking early (with ConnectionError) if the server hangs up."""
        await self._guard(asyncio.sleep(seconds))
