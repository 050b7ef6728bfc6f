"""The email channel: IMAP in (one watched mailbox), SMTP out (through the outbox).

Inbound never loses or repeats mail. The mailbox position (UIDVALIDITY, last UID) is
stored in the timeline store and advances only after every mail up to it was ingested,
i.e. durably committed; a crash, restart or day-long outage resumes from there. When the
server renumbers (UIDVALIDITY changes) the whole mailbox is read again and Message-ID
idempotency absorbs what was already stored. Mail is read with BODY.PEEK, so neither
the hub nor anyone else's \\Seen flag decides what gets fetched.

New mail is noticed with IMAP IDLE when the server offers it (renewed every 25 minutes,
inside the 29-minute limit of RFC 2177), else by polling every `poll_seconds`. Failures
reconnect with exponential backoff; fetching that keeps failing is logged loudly as
"email.mailbox_stalled" and shows in /readyz through `status()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import structlog

from hub.channels.base import HubServices, PermanentSendError, SendResult
from hub.channels.blobs import BlobStore
from hub.channels.email_compose import (
    OutgoingAttachment,
    compose,
    message_id_for,
    reply_subject,
)
from hub.channels.email_imap import FetchedMail, ImapError, ImapSession
from hub.channels.email_inbound import (
    MAX_HTML_CHARS,
    MAX_TEXT_CHARS,
    ChannelInfo,
    email_keys,
    is_message_id,
    mail_data,
    own_event,
    recent_events,
    sender_identity,
    store_attachments,
    thread_refs,
)
from hub.channels.email_parse import Bounce, ParsedMail, parse_message
from hub.channels.email_smtp import smtp_send
from hub.channels.email_token import make_token, reply_address, token_in_address
from hub.config import Config, EmailChannel
from hub.lease import Lease, run_while_leader
from hub.model import (
    SYSTEM,
    ChannelType,
    DeliveryState,
    Direction,
    Event,
    IdentityKind,
    Inbound,
    Outbound,
    Recorded,
    iso,
)
from hub.shared_secret import shared_secret
from hub.timeline.store import StoreError, TimelineStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Position:
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True, slots=True)
class ReplyContext:
    references: list[str]  # oldest first
    parent: str | None  # In-Reply-To: the customer's newest mail
    subject: str
    automatic: bool  # sent by the hub itself, not an agent


class EmailAdapter:
    type = ChannelType.EMAIL

    # Tunables; tests shorten the timing ones.
    batch_size = 100
    idle_renew_seconds = 25 * 60.0
    backoff_base = 1.0
    backoff_max = 300.0
    stall_after_seconds = 180.0
    imap_timeout = 60.0
    smtp_timeout = 30.0
    lease_seconds = 30.0

    def __init__(self, channel: EmailChannel, config: Config) -> None:
        self.name = channel.name
        self.channel = channel
        self.config = config
        self.address = channel.address.casefold()
        self.domain = self.address.rpartition("@")[2]
        self.blobs = BlobStore(config.hub.data_dir / "blobs", channel.max_attachment_bytes)
        self.log = log.bind(channel=self.name, mailbox=channel.imap.mailbox)
        self._services: HubServices | None = None
        self._info: ChannelInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._lease: Lease | None = None
        self._leader = False
        self._position: Position | None = None
        # Status, for /readyz and admins.
        self._connected = False
        self._idle = False
        self._started_at: float | None = None
        self._last_ok_at: float | None = None  # monotonic: last moment fetching worked
        self._last_fetch_at: datetime | None = None
        self._last_error: str | None = None
        self._failing_since: float | None = None
        self._stall_logged_at: float | None = None
        self._ingested = 0
        self._skipped = 0

    # --- lifecycle ---------------------------------------------------------------------

    def routes(self) -> list[Any]:
        return []  # IMAP is pulled, not pushed: no webhooks

    @property
    def services(self) -> HubServices:
        if self._services is None:
            raise RuntimeError(f"email channel {self.name!r} is not started")
        return self._services

    @property
    def store(self) -> TimelineStore:
        return self.services.store

    @property
    def info(self) -> ChannelInfo:
        if self._info is None:
            raise RuntimeError(f"email channel {self.name!r} is not started")
        return self._info

    async def prepare(self, services: HubServices) -> None:
        """Everything but the fetch loop: enough to send, process or backfill mail."""
        self._services = services
        secret = await self._token_secret()
        self._info = ChannelInfo(self.name, self.address, self.domain, secret)
        self._position = await self._load_position()

    async def start(self, services: HubServices) -> None:
        await self.prepare(services)
        self._started_at = time.monotonic()
        self._lease = self._make_lease()
        self._task = asyncio.create_task(
            run_while_leader(self._lease, self._lead, renew_every=self.lease_seconds / 3),
            name=f"email-{self.name}",
        )

    def _make_lease(self) -> Lease:
        """One process watches a mailbox: the store's lease spans every hub process."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        return self.store.lease(f"email:{self.name}", owner, self.lease_seconds)

    async def _lead(self) -> None:
        self._leader = True
        self._started_at = time.monotonic()  # the grace period starts with the work
        try:
            await self._run()
        finally:
            self._leader = False

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Cancel until it ends: on Python 3.11 a cancel that lands inside a library's
            # own wait_for (a connect timing out) can be swallowed, and the loop goes on.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=2)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        if self._lease is not None:
            # Hand the mailbox over now rather than after the lease's TTL.
            with contextlib.suppress(Exception):
                await self._lease.release()
        self._connected = False

    def status(self) -> dict[str, Any]:
        # Standby: another hub process holds the mailbox's lease and fetches; this one
        # waits to take over, and is no less ready for it.
        standby = self._task is not None and not self._leader
        now = time.monotonic()
        healthy_at = self._last_ok_at or self._started_at
        recently = healthy_at is not None and now - healthy_at < self.stall_after_seconds
        position = self._position
        return {
            "ok": self._connected or recently or standby,
            "standby": standby,
            "connected": self._connected,
            "mailbox": self.channel.imap.mailbox,
            "idle": self._idle,
            "last_fetch_at": iso(self._last_fetch_at),
            "last_error": self._last_error,
            "stalled": self._failing_since is not None
            and now - self._failing_since >= self.stall_after_seconds,
            "uidvalidity": position.uidvalidity if position else None,
            "last_uid": position.last_uid if position else None,
            "ingested": self._ingested,
            "skipped": self._skipped,
        }

    # --- durable state -----------------------------------------------------------------

    @property
    def _position_key(self) -> str:
        return f"email.{self.name}.position"

    async def _load_position(self) -> Position | None:
        raw = await self.store.get_state(self._position_key)
        if raw is None:
            return None
        value = json.loads(raw)
        return Position(int(value["uidvalidity"]), int(value["last_uid"]))

    async def _save_position(self, position: Position) -> None:
        await self.store.set_state(
            self._position_key,
            json.dumps({"uidvalidity": position.uidvalidity, "last_uid": position.last_uid}),
        )
        self._position = position

    async def _token_secret(self) -> bytes:
        # Kept in the store, not the config: made once, shared by every hub process.
        return await shared_secret(self.store, f"email.{self.name}.token_secret")

    # --- the fetch loop ----------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            session = ImapSession(self.channel.imap, timeout=self.imap_timeout)
            worked = False
            try:
                await session.open()
                _keepalive(session)
                await self._watch(session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Fetching worked since the last failure: start the backoff over.
                worked = self._failing_since is None
                self._on_failure(exc)
            finally:
                self._connected = False
                self._idle = False
                await session.close()
            failures = 1 if worked else failures + 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    def _on_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.log.warning("email.fetch_failed", error=self._last_error)
        if now - self._failing_since >= self.stall_after_seconds and (
            self._stall_logged_at is None or now - self._stall_logged_at >= self.stall_after_seconds
        ):
            self._stall_logged_at = now
            self.log.error(
                "email.mailbox_stalled",
                failing_for_seconds=round(now - self._failing_since),
                error=self._last_error,
                last_fetch_at=iso(self._last_fetch_at),
            )

    def _healthy(self) -> None:
        self._connected = True
        self._last_ok_at = time.monotonic()
        if self._failing_since is not None:
            self.log.info("email.fetch_recovered", last_error=self._last_error)
        self._failing_since = None
        self._stall_logged_at = None

    async def _watch(self, session: ImapSession) -> None:
        """Fetch, wait for news, repeat; returns only by raising."""
        imap = self.channel.imap
        while True:
            uidvalidity = await session.select(imap.mailbox)
            session.take_changed()  # SELECT itself reports EXISTS: not news
            self._connected = True
            # Healthy only once the mail is stored too: a store that is down stalls the
            # mailbox as surely as an IMAP server that is.
            await self._catch_up(session, uidvalidity)
            self._last_fetch_at = datetime.now(UTC)
            self._healthy()
            if session.take_changed():
                continue  # mail announced while we were fetching
            if imap.idle and session.has_idle:
                self._idle = True
                # Renewed inside the server's 29-minute limit; poll_seconds (60 s at least)
                # also bounds it, a safety net for a server that fails to push.
                renew = min(self.idle_renew_seconds, max(float(imap.poll_seconds), 60.0))
                await session.idle(renew)
                self._idle = False
            else:
                await session.wait(float(imap.poll_seconds))

    async def _catch_up(self, session: ImapSession, uidvalidity: int) -> None:
        position = self._position
        if position is None or position.uidvalidity != uidvalidity:
            if position is not None:
                # Renumbered: read it all again; Message-ID idempotency drops repeats.
                self.log.warning(
                    "email.uidvalidity_changed", old=position.uidvalidity, new=uidvalidity
                )
            position = Position(uidvalidity, 0)
            await self._save_position(position)
        uids = await session.uids_after(position.last_uid)
        for start in range(0, len(uids), self.batch_size):
            chunk = uids[start : start + self.batch_size]
            mails = await session.fetch(chunk)
            await self.ingest_batch(mails)
            # Only now, with every mail of the chunk committed, does the position move.
            await self._save_position(Position(uidvalidity, chunk[-1]))
            self._last_ok_at = time.monotonic()
            await self._after_processing(session, [m.uid for m in mails])

    async def _after_processing(self, session: ImapSession, uids: list[int]) -> None:
        imap = self.channel.imap
        try:
            if imap.after_processing == "seen":
                await session.mark_seen(uids)
            elif imap.after_processing == "move" and imap.move_to:
                await session.move(uids, imap.move_to)
        except ImapError as exc:
            # The mail is stored and the position saved: a refused flag or move must not
            # stop fetching. It is left where it was.
            self.log.error("email.after_processing_failed", error=str(exc), uids=len(uids))

    # --- one mail ----------------------------------------------------------------------

    async def ingest_batch(self, mails: Sequence[FetchedMail]) -> list[Recorded | None]:
        """Ingest fetched mails; returns when all are committed (or raises).

        Different senders are ingested concurrently (the store can commit them together);
        one sender's mails go in mailbox order, so their timeline reads in order and a
        reply finds the mail it answers.
        """
        parsed = await asyncio.to_thread(lambda: [parse_message(m.raw) for m in mails])
        groups: dict[str, list[int]] = defaultdict(list)
        for index, mail in enumerate(parsed):
            groups[(mail.from_address or mail.external_id).casefold()].append(index)
        results: list[Recorded | None] = [None] * len(mails)

        async def run(indexes: list[int]) -> None:
            for i in indexes:
                results[i] = await self._ingest_one(parsed[i], mails[i])

        outcomes = await asyncio.gather(*(run(g) for g in groups.values()), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return results

    async def _ingest_one(self, parsed: ParsedMail, fetched: FetchedMail | None) -> Recorded | None:
        try:
            return await self.process(parsed, received_at=fetched.internaldate if fetched else None)
        except (StoreError, OSError):
            raise  # the store or disk is down: retry the batch later, position unchanged
        except Exception:
            # A bug on one odd mail must not stall the mailbox behind it.
            self._skipped += 1
            self.log.exception(
                "email.mail_failed",
                uid=fetched.uid if fetched else None,
                external_id=parsed.external_id,
            )
            return None

    async def process_raw(self, raw: bytes, received_at: datetime | None = None) -> Recorded | None:
        """Parse and ingest one raw mail (tests, benchmarks, tools)."""
        return await self.process(parse_message(raw), received_at=received_at)

    async def process(
        self, parsed: ParsedMail, received_at: datetime | None = None
    ) -> Recorded | None:
        info = self.info
        target = await self._bounce_target(parsed.bounce) if parsed.bounce else None
        override = target.data.get("to") if target else None
        identity = sender_identity(parsed, override, exclude=self._is_own)
        if identity is None and parsed.bounce is None and self._is_own(parsed.from_address):
            # Our own mail coming back (a Bcc, a loop): not a customer.
            self.log.info("email.own_mail_skipped", external_id=parsed.external_id)
            return None
        if identity is None:
            self._skipped += 1
            self.log.warning(
                "email.no_sender", external_id=parsed.external_id, subject=parsed.subject[:100]
            )
            return None
        extra = (target.conversation_id,) if target and target.conversation_id else ()
        refs = await thread_refs(self.store, info, parsed, extra)
        attachments, skipped, inline = await store_attachments(self.blobs, parsed)
        data = mail_data(parsed)
        if skipped:
            data["skipped_attachments"] = skipped
        if inline:
            data["inline"] = inline
        html = parsed.html
        if html is not None and len(html) > MAX_HTML_CHARS:
            html = None
            data["html_dropped"] = "too large"
        text = parsed.text if len(parsed.text) <= MAX_TEXT_CHARS else parsed.text[:MAX_TEXT_CHARS]
        inbound = Inbound(
            channel=self.name,
            channel_type=ChannelType.EMAIL,
            external_id=parsed.external_id,
            identity=identity,
            text=text,
            html=html,
            # The From name names the From address only (not a Reply-To we fell back on).
            display_name=parsed.display_name
            if (parsed.from_address or "").casefold() == identity.value
            else None,
            attachments=attachments,
            thread_refs=refs,
            thread_key=parsed.message_id,
            received_at=received_at,
            routable=parsed.auto_reason is None,
            data=data,
        )
        recorded = await self.services.ingestor.ingest(inbound)
        if recorded.created:
            self._ingested += 1
        if target is not None and parsed.bounce is not None and parsed.bounce.action == "failed":
            await self._mark_bounced(target, parsed.bounce, recorded)
        return recorded

    def _is_own(self, address: str | None) -> bool:
        if not address:
            return False
        folded = address.casefold()
        return folded == self.address or token_in_address(self.address, folded) is not None

    async def _bounce_target(self, bounce: Bounce) -> Event | None:
        """The outbound message a bounce reports on, if the hub sent it."""
        if bounce.original_event_id:
            event = await self.store.get_event(bounce.original_event_id.strip())
            if (
                event is not None
                and event.channel == self.name
                and event.direction is Direction.OUT
            ):
                return event
        if bounce.original_message_id:
            return await own_event(self.store, self.info, bounce.original_message_id)
        return None

    async def _mark_bounced(self, target: Event, bounce: Bounce, recorded: Recorded) -> None:
        updated = await self.store.record_delivery(
            target.id, DeliveryState.FAILED, error=f"bounced: {bounce.diagnostic}"[:1000]
        )
        await self.services.bus.publish([updated])
        self.log.warning(
            "email.bounced",
            customer=target.customer_id,
            conversation=target.conversation_id,
            event=target.id,
            bounce_event=recorded.event.id,
            diagnostic=bounce.diagnostic[:200],
        )

    # --- backfill ----------------------------------------------------------------------

    async def backfill(self, since: date) -> dict[str, int]:
        """Re-read every mail received since `since` (safe: duplicates are absorbed).

        Uses its own IMAP session and leaves the stored position alone.
        """
        session = ImapSession(self.channel.imap, timeout=self.imap_timeout)
        counts = {"found": 0, "stored": 0, "duplicates": 0, "skipped": 0}
        try:
            await session.open()
            await session.select(self.channel.imap.mailbox)
            uids = await session.uids_since(since)
            counts["found"] = len(uids)
            for start in range(0, len(uids), self.batch_size):
                mails = await session.fetch(uids[start : start + self.batch_size])
                for result in await self.ingest_batch(mails):
                    if result is None:
                        counts["skipped"] += 1
                    elif result.created:
                        counts["stored"] += 1
                    else:
                        counts["duplicates"] += 1
        finally:
            await session.close()
        self.log.info("email.backfill_done", since=since.isoformat(), **counts)
        return counts

    # --- sending -----------------------------------------------------------------------

    async def send(self, outbound: Outbound) -> SendResult:
        if outbound.to.kind is not IdentityKind.EMAIL or not outbound.to.value:
            raise PermanentSendError(f"cannot email a {outbound.to.kind.value} identity")
        bound = self.log.bind(
            customer=outbound.customer_id,
            conversation=outbound.conversation_id,
            event=outbound.event_id,
        )
        message_id = message_id_for(outbound.event_id, self.domain)
        context = await self._reply_context(outbound, message_id)
        reply_to = None
        if outbound.conversation_id:
            token = make_token(self.info.secret, outbound.conversation_id)
            reply_to = reply_address(self.address, token)
        msg = compose(
            event_id=outbound.event_id,
            from_address=self.address,
            from_name=self.channel.display_name,
            to_address=outbound.to.value,
            text=outbound.text,
            html_body=outbound.html,
            subject=context.subject,
            message_id=message_id,
            references=context.references,
            in_reply_to=context.parent,
            reply_to=reply_to,
            date=datetime.now(UTC),
            auto_submitted=context.automatic,
            attachments=await self._outgoing_attachments(outbound),
        )
        await smtp_send(
            self.channel.smtp,
            sender=self.address,
            recipient=outbound.to.value,
            message=msg,
            seconds=self.smtp_timeout,
        )
        bound.info("email.sent", message_id=message_id, attempt=outbound.attempt)
        # The Message-ID becomes the event's external id: replies and bounces find it.
        return SendResult(DeliveryState.SENT, provider_id=message_id)

    async def _reply_context(self, outbound: Outbound, own_id: str) -> ReplyContext:
        """References, In-Reply-To and Subject from the conversation so far."""
        events = (
            await recent_events(self.store, outbound.conversation_id)
            if outbound.conversation_id
            else []
        )
        this = next((e for e in events if e.id == outbound.event_id), None)
        if this is None:
            this = await self.store.get_event(outbound.event_id)
        # The hub's own automatic answers (after-hours replies) say so (RFC 3834), so
        # that the customer's out-of-office doesn't answer them back.
        automatic = this is not None and this.author == SYSTEM
        refs = [r for r in outbound.thread_refs if is_message_id(r)] or email_keys(events)
        refs = [r for r in refs if r != own_id]
        inbound_mail = [
            e for e in events if e.channel_type is ChannelType.EMAIL and e.direction is Direction.IN
        ]
        parent = next((e.external_id for e in inbound_mail if is_message_id(e.external_id)), None)
        subject = next(
            (str(e.data["subject"]) for e in inbound_mail if e.data.get("subject")), None
        )
        if subject is None:
            subject = f"Your conversation with {self.channel.display_name or self.domain}"
        else:
            subject = reply_subject(subject)
        return ReplyContext(refs, parent, subject, automatic)

    async def _outgoing_attachments(self, outbound: Outbound) -> list[OutgoingAttachment]:
        files: list[OutgoingAttachment] = []
        for att in outbound.attachments:
            data = await asyncio.to_thread(self.blobs.get, att.url)
            if data is None:
                raise PermanentSendError(f"attachment {att.filename!r} is not stored")
            files.append(OutgoingAttachment(att.filename, att.content_type, data))
        return files


def _keepalive(session: ImapSession) -> None:
    """TCP keepalive on the IMAP socket, so a silently dead peer (NAT timeout, pulled
    cable) is noticed in about two minutes instead of at the next IDLE renewal."""
    transport = session.imap.protocol.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def backfill_command(config: Config, channel_name: str, since: date) -> dict[str, int]:
    """`hub email backfill CHANNEL --since DATE`: one pass, with its own store connection."""
    from hub.app import build_store
    from hub.bus import InProcessBus
    from hub.ingest import Ingestor

    channel = next((c for c in config.channels if c.name == channel_name), None)
    if not isinstance(channel, EmailChannel):
        raise ValueError(f"no email channel named {channel_name!r} in the configuration")
    store = build_store(config)
    await store.start()
    bus = InProcessBus()
    await bus.start()
    try:
        adapter = EmailAdapter(channel, config)
        services = HubServices(config=config, store=store, bus=bus, ingestor=Ingestor(store, bus))
        await adapter.prepare(services)
        return await adapter.backfill(since)
    finally:
        await bus.close()
        await store.close()
