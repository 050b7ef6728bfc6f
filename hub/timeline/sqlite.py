"""The embedded timeline store: one SQLite file in WAL mode, zero set-up.

Processes and threads, and why:
- One writer process owns the only write connection (hub/timeline/sqlite_writer.py says
  why a process). Writes are (function, arguments) pairs; while one batch is at the
  writer, the event loop collects every write submitted meanwhile and sends them all as
  the next batch, which the writer commits as one transaction (group commit), each write
  inside its own SAVEPOINT so one failing write rolls back alone. One fsync then
  acknowledges many writes, which is what lets concurrent webhooks outrun a
  one-commit-per-write loop. Futures are resolved only after COMMIT returned: an
  acknowledged write is durable.
- Ids are minted inside the writer, in the order writes are applied, so the order of
  event ids is the commit order and "events after id X" never misses one.
- Reads run on a few reader threads, each with its own connection; WAL lets them read
  while the writer writes. A read started after a write was acknowledged sees it.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from hub.ids import IdGenerator, is_id
from hub.lease import Lease, LocalLease
from hub.model import (
    CUSTOMER,
    SYSTEM,
    Attachment,
    ChannelType,
    Conversation,
    ConversationQuery,
    ConversationStatus,
    Customer,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    Inbound,
    Page,
    Recorded,
    iso,
    utcnow,
)
from hub.timeline.sqlite_schema import (
    CONVERSATION_COLUMNS,
    CUSTOMER_COLUMNS,
    EVENT_COLUMNS,
    connect,
    conversation_from_row,
    conversation_values,
    customer_from_rows,
    dump_data,
    dump_json,
    event_from_row,
    event_row,
    migrate,
    opt_us,
    to_us,
)
from hub.timeline.sqlite_writer import (
    CLOSED,
    RESTART_BACKOFF,
    STOP_FRAME,
    STOP_TIMEOUT,
    WriteFn,
    WriterProcess,
    encode_batch,
    translate,
)
from hub.timeline.store import (
    IdentityConflict,
    InvalidOperation,
    NotFound,
    OutboxItem,
    StoreError,
    StoreUnavailable,
)

T = TypeVar("T")
log = structlog.get_logger(__name__)
Connection = sqlite3.Connection

# Bounds one transaction (and so the latency of its first op) under a flood of writes.
MAX_BATCH = 512
READER_THREADS = 3
# Events that move a conversation up the inbox; status and assignment changes do not.
_ACTIVITY_KINDS = frozenset(
    {EventKind.MESSAGE, EventKind.NOTE, EventKind.CALL, EventKind.VOICEMAIL}
)

_EVENT_INSERT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 16)})"
_CONVERSATION_INSERT = (
    f"INSERT INTO conversations ({CONVERSATION_COLUMNS}) VALUES ({', '.join('?' * 13)})"
)
_E = ", ".join(f"e.{c.strip()}" for c in EVENT_COLUMNS.split(","))
_C = ", ".join(f"c.{c.strip()}" for c in CONVERSATION_COLUMNS.split(","))


_FLAT_JSON_TYPES = (str, int, bool, type(None))


def _as_read_back(data: Mapping[str, Any] | None, data_json: str | None) -> dict[str, Any]:
    """`data` as reading `data_json` back will give it: a flat mapping of strings,
    integers, booleans and None comes back equal, so it is copied rather than re-parsed."""
    if data_json is None or data is None:
        return {}
    if all(type(k) is str and type(v) in _FLAT_JSON_TYPES for k, v in data.items()):
        return dict(data)
    return json.loads(data_json)  # type: ignore[no-any-return]


# --- the event loop's side of the writer process -----------------------------------------


@dataclass(slots=True)
class _Op:
    fn: WriteFn  # fn(writes, conn, *args), run in the writer process
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: Exception | None = None


def _settle(ops: list[_Op]) -> None:
    """Resolve each op's future, on the event loop that future belongs to."""
    current = asyncio.get_running_loop()
    for op in ops:
        if op.loop is not current:
            try:
                op.loop.call_soon_threadsafe(_settle, [op])
            except RuntimeError:
                pass  # that event loop is closed: nobody is waiting any more
            continue
        if op.future.done():  # the caller gave up waiting (cancelled)
            continue
        if op.error is not None:
            op.future.set_exception(op.error)
        else:
            op.future.set_result(op.result)


class _WriterLink(asyncio.Protocol):
    """The event loop's end of the pipe to the writer process: splits it into frames."""

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big", signed=True)
            if len(buffer) < 4 + size:
                return
            payload = bytes(buffer[4 : 4 + size])
            del buffer[: 4 + size]
            self._writer._answered(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer._lost(self)


class _Writer:
    """Hands batches to the writer process from the event loop and settles their futures.

    Group commit: while one batch is at the writer, every write submitted meanwhile
    waits in `_pending`; the answer sends all of them as the next batch. No thread: the
    pipe is one more socket of the loop, so no write waits for a GIL hand-over.
    """

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self._path = path
        self._loop = loop
        self._process: WriterProcess | None = None
        self._transport: asyncio.Transport | None = None
        self._link: _WriterLink | None = None
        self._pending: list[_Op] = []
        self._in_flight: list[_Op] | None = None
        self._flush_scheduled = False
        self._failed_at = -RESTART_BACKOFF
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._closed_by_writer = asyncio.Event()

    async def start(self) -> None:
        process = WriterProcess(self._path)
        await asyncio.to_thread(process.start)
        assert process.socket is not None
        try:
            transport, link = await self._loop.connect_accepted_socket(
                lambda: _WriterLink(self), process.socket
            )
        except BaseException:
            process.kill()
            process.socket.close()
            raise
        assert isinstance(transport, asyncio.Transport)
        self._process, self._transport, self._link = process, transport, link
        self._closed_by_writer.clear()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        return self._transport is not None and self._process is not None and self._process.alive()

    def submit(self, op: _Op) -> None:
        if op.loop is not self._loop:
            # A caller on another event loop (a thread of its own): hop over.
            self._loop.call_soon_threadsafe(self._enqueue, op)
        else:
            self._enqueue(op)

    def _enqueue(self, op: _Op) -> None:
        self._pending.append(op)
        self._idle.clear()
        if self._in_flight is None and not self._flush_scheduled:
            # Not at once: writes submitted in the same turn of the loop join this batch.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight is not None or not self._pending:
            self._check_idle()
            return
        if self._transport is None:
            self._revive()
            return
        batch = self._pending[:MAX_BATCH]
        del self._pending[:MAX_BATCH]
        try:
            payload = self._encode(batch)
        except Exception as exc:  # a write whose arguments do not pickle: a bug, told
            _settle_all(batch, exc)
            self._flush()
            return
        self._in_flight = batch
        self._transport.write(payload)

    @staticmethod
    def _encode(batch: list[_Op]) -> bytes:
        return encode_batch([(op.fn, op.args) for op in batch])

    def _answered(self, payload: bytes) -> None:
        batch, self._in_flight = self._in_flight, None
        if batch is None:
            if payload == CLOSED:
                self._closed_by_writer.set()
            return
        try:
            outcomes: list[tuple[Any, Exception | None]] = pickle.loads(payload)
            if len(outcomes) != len(batch):
                raise ValueError(f"{len(outcomes)} answers for {len(batch)} writes")
        except Exception as exc:
            _settle_all(batch, StoreError(f"a write's answer could not be read: {exc}"))
        else:
            for op, (result, error) in zip(batch, outcomes, strict=True):
                op.result, op.error = result, error
            _settle(batch)
        self._flush()

    def _lost(self, link: _WriterLink) -> None:
        if link is not self._link:
            return
        self._transport = self._link = None
        self._closed_by_writer.set()
        if self._process is not None:
            self._process.kill()  # half-dead is worse than dead: make sure
        batch, self._in_flight = self._in_flight, None
        if batch:
            # Whether it committed is unknown: the callers hear "not stored", providers
            # retry, and redelivery finds what did commit.
            _settle_all(batch, StoreUnavailable("the SQLite writer process died"))
            log.warning("sqlite.writer_died", pid=self.pid, writes_refused=len(batch))
        if self._pending:
            self._flush()  # the writes that were waiting go to a new writer
        self._check_idle()

    def _revive(self) -> None:
        """Writes are waiting and no writer runs: start one, or refuse them while the
        last start failed only moments ago (no loop of failing starts)."""
        if self._stopping or self._loop.time() < self._failed_at + RESTART_BACKOFF:
            pending, self._pending = self._pending, []
            reason = "the store is closed" if self._stopping else "the SQLite writer is restarting"
            _settle_all(pending, StoreUnavailable(reason))
            self._check_idle()
            return
        if self._restarting is None:
            self._restarting = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self.start()
        except StoreUnavailable as exc:
            self._failed_at = self._loop.time()
            log.warning("sqlite.writer_restart_failed", error=str(exc))
        else:
            log.warning("sqlite.writer_restarted", pid=self.pid)
        finally:
            self._restarting = None
        self._flush()

    def _check_idle(self) -> None:
        if not self._pending and self._in_flight is None:
            self._idle.set()

    async def stop(self) -> None:
        """Finish everything submitted so far, then let the writer close the file."""
        self._stopping = True
        self._check_idle()
        await self._idle.wait()
        if self._restarting is not None:
            await asyncio.gather(self._restarting, return_exceptions=True)
        transport = self._transport
        if transport is not None:
            transport.write(STOP_FRAME)
            try:
                await asyncio.wait_for(self._closed_by_writer.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("sqlite.writer_stop_timeout", pid=self.pid)
            transport.close()
        if self._process is not None and self._process.alive():
            self._process.kill()


def _settle_all(ops: list[_Op], error: Exception) -> None:
    for op in ops:
        op.result, op.error = None, error
    _settle(ops)


def prepare_file(path: Path) -> None:
    """Create the file or bring its schema up to date (run before the writer starts)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path, writer=True)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
    try:
        migrate(conn, path)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot prepare the schema of {path}: {exc}") from exc
    finally:
        conn.close()


def open_writes(path: Path) -> tuple[Connection, _Writes]:
    """The write connection and the writes bound to it; run in the writer process.

    Ids continue after the newest one on file, so a restarted writer keeps them in
    commit order.
    """
    try:
        conn = connect(path, writer=True)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
    try:
        newest = conn.execute(
            "SELECT max(id) FROM (SELECT max(id) AS id FROM events "
            "UNION ALL SELECT max(id) FROM customers UNION ALL SELECT max(id) FROM conversations)"
        ).fetchone()[0]
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"cannot read {path}: {exc}") from exc
    ids = IdGenerator()
    if newest:
        ids.continue_after(newest)
    return conn, _Writes(ids)


# --- write operations (run in the writer process, inside the batch transaction) ---------


@dataclass(slots=True)
class _CustomerRow:
    id: str
    merged_into: str | None


class _Writes:
    """Every write of the store as a function of the write connection.

    Each method runs inside a SAVEPOINT of the current batch, so raising undoes exactly
    its own changes. Check-then-insert is race-free here: only this thread writes.
    """

    def __init__(self, ids: IdGenerator) -> None:
        self._ids = ids

    # -- helpers --

    def _event(
        self,
        conn: Connection,
        *,
        customer_id: str,
        conversation_id: str | None,
        kind: EventKind,
        direction: Direction,
        author: str,
        created_at: datetime,
        channel: str = "",
        channel_type: ChannelType | None = None,
        text: str = "",
        html: str | None = None,
        attachments: tuple[Attachment, ...] = (),
        external_id: str | None = None,
        delivery_state: DeliveryState | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        # Dumped once, for the row and (unless it is flat) for the returned event, which
        # must equal the one read back later.
        data_json = dump_data(data) if data else None
        event = Event(
            id=self._ids.new(),
            customer_id=customer_id,
            conversation_id=conversation_id,
            channel=channel,
            channel_type=channel_type,
            direction=direction,
            kind=kind,
            author=author,
            created_at=created_at,
            text=text,
            html=html,
            attachments=attachments,
            external_id=external_id,
            delivery_state=delivery_state,
            data=_as_read_back(data, data_json),
        )
        conn.execute(_EVENT_INSERT, event_row(event, data_json))
        return event

    def _status_event(
        self,
        conn: Connection,
        conv: Conversation,
        to: ConversationStatus,
        author: str,
        now: datetime,
        **extra: Any,
    ) -> Event:
        return self._event(
            conn,
            customer_id=conv.customer_id,
            conversation_id=conv.id,
            kind=EventKind.STATUS,
            direction=Direction.INTERNAL,
            author=author,
            created_at=now,
            data={"from": conv.status.value, "to": to.value, **extra},
        )

    def _new_customer(
        self,
        conn: Connection,
        display_name: str,
        identities: Sequence[Identity],
        tags: Sequence[str],
        now: datetime,
    ) -> str:
        customer_id = self._ids.new()
        conn.execute(
            "INSERT INTO customers (id, display_name, tags, created_at) VALUES (?, ?, ?, ?)",
            (customer_id, display_name, dump_json(list(dict.fromkeys(tags))), to_us(now)),
        )
        for identity in dict.fromkeys(identities):
            _insert_identity(conn, identity, customer_id)
        return customer_id

    def _existing(self, conn: Connection, event: Event) -> Recorded:
        conv = _conversation(conn, event.conversation_id) if event.conversation_id else None
        return Recorded(
            event=event,
            conversation=conv,
            customer=_require_customer(conn, event.customer_id),
            created=False,
        )

    def _unchanged(self, conn: Connection, conv: Conversation) -> Recorded:
        row = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE conversation_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (conv.id,),
        ).fetchone()
        if row is None:  # every conversation is born with its first event
            raise InvalidOperation(f"conversation {conv.id} has no events")
        return Recorded(
            event=event_from_row(row),
            conversation=conv,
            customer=_require_customer(conn, conv.customer_id),
            created=False,
        )

    # -- ingest --

    def record_inbound(self, conn: Connection, inbound: Inbound) -> Recorded:
        row = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE channel = ? AND external_id = ?",
            (inbound.channel, inbound.external_id),
        ).fetchone()
        if row is not None:
            return self._existing(conn, event_from_row(row))

        now = utcnow()
        at = inbound.received_at or now
        customer = _owner_customer(conn, inbound.identity)
        if customer is None:
            name = inbound.display_name or inbound.identity.value
            customer = Customer(
                id=self._new_customer(conn, name, (inbound.identity,), (), now),
                display_name=name,
                identities=(inbound.identity,),
                tags=(),
                created_at=now,
            )
        # Nothing below changes the customer: it is returned as read (or written) here.
        customer_id = customer.id

        active = _active(conn, customer_id)
        conv = active
        threaded = (
            _threaded(conn, customer_id, inbound.thread_refs) if inbound.thread_refs else None
        )
        if threaded is not None and (active is None or threaded.id == active.id):
            conv = threaded

        side: list[Event] = []
        if not inbound.routable:
            # Machine mail (auto-replies, bounces) is filed where it belongs but changes
            # nothing: no reopen, no new work in the inbox, no "last channel" change.
            conv = threaded or active
            if conv is None:
                conv = Conversation(
                    id=self._ids.new(),
                    customer_id=customer_id,
                    status=ConversationStatus.RESOLVED,
                    channel=inbound.channel,
                    created_at=at,
                    last_activity_at=at,
                    resolved_at=at,
                )
                conn.execute(_CONVERSATION_INSERT, conversation_values(conv))
        elif conv is None:
            conv = Conversation(
                id=self._ids.new(),
                customer_id=customer_id,
                status=ConversationStatus.OPEN,
                channel=inbound.channel,
                created_at=at,
                last_activity_at=at,
            )
            conn.execute(_CONVERSATION_INSERT, conversation_values(conv))
        elif (
            conv.status is ConversationStatus.OPEN
            and conv.resolved_at is None
            and conv.snoozed_until is None
        ):
            # Already open (the common case): only the channel and activity time move, so
            # the indexes on status are left alone.
            # Built directly: dataclasses.replace costs three times as much, on the path
            # nearly every inbound message takes.
            conv = Conversation(
                id=conv.id,
                customer_id=conv.customer_id,
                status=conv.status,
                channel=inbound.channel,
                created_at=conv.created_at,
                last_activity_at=max(conv.last_activity_at, at),
                assignee=conv.assignee,
                queue=conv.queue,
                priority=conv.priority,
                tags=conv.tags,
                first_response_at=conv.first_response_at,
            )
            conn.execute(
                "UPDATE conversations SET channel = ?, last_activity_at = ? WHERE id = ?",
                (conv.channel, to_us(conv.last_activity_at), conv.id),
            )
        else:
            if conv.status is not ConversationStatus.OPEN:
                side.append(self._status_event(conn, conv, ConversationStatus.OPEN, SYSTEM, now))
            conv = replace(
                conv,
                status=ConversationStatus.OPEN,
                channel=inbound.channel,
                last_activity_at=max(conv.last_activity_at, at),
                resolved_at=None,
                snoozed_until=None,
            )
            conn.execute(
                "UPDATE conversations SET status = 'open', channel = ?, last_activity_at = ?, "
                "resolved_at = NULL, snoozed_until = NULL WHERE id = ?",
                (conv.channel, to_us(conv.last_activity_at), conv.id),
            )

        event = self._event(
            conn,
            customer_id=customer_id,
            conversation_id=conv.id,
            kind=inbound.kind,
            direction=Direction.IN,
            author=CUSTOMER,
            created_at=at,
            channel=inbound.channel,
            channel_type=inbound.channel_type,
            text=inbound.text,
            html=inbound.html,
            attachments=inbound.attachments,
            external_id=inbound.external_id,
            data=inbound.data,
        )
        if inbound.thread_key:
            _register_thread_key(conn, inbound.thread_key, conv.id)
        return Recorded(
            event=event,
            conversation=conv,
            customer=customer,
            created=True,
            side_events=tuple(side),
        )

    # -- customers --

    def create_customer(
        self,
        conn: Connection,
        display_name: str,
        identities: tuple[Identity, ...],
        tags: tuple[str, ...],
    ) -> Customer:
        for identity in identities:
            if identity.verified:
                owner = _owner(conn, identity)
                if owner is not None:
                    raise IdentityConflict(identity, owner)
        customer_id = self._new_customer(conn, display_name, identities, tags, utcnow())
        return _require_customer(conn, customer_id)

    def link_identity(self, conn: Connection, customer_id: str, identity: Identity) -> Customer:
        _require_live(conn, customer_id)
        if identity.verified:
            owner = _owner(conn, identity)
            if owner is None:
                _insert_identity(conn, identity, customer_id)
            elif owner != customer_id:
                raise IdentityConflict(identity, owner)
        else:
            # A claim never conflicts; it is only added once per customer.
            held = conn.execute(
                "SELECT 1 FROM identities WHERE customer_id = ? AND kind = ? AND value = ?",
                (customer_id, identity.kind.value, identity.value),
            ).fetchone()
            if held is None:
                _insert_identity(conn, identity, customer_id)
        return _require_customer(conn, customer_id)

    def set_customer_tags(
        self, conn: Connection, customer_id: str, tags: tuple[str, ...]
    ) -> Customer:
        cursor = conn.execute(
            "UPDATE customers SET tags = ? WHERE id = ?",
            (dump_json(list(dict.fromkeys(tags))), customer_id),
        )
        if cursor.rowcount == 0:
            raise NotFound(f"no customer {customer_id}")
        return _require_customer(conn, customer_id)

    def merge_customers(
        self, conn: Connection, source_id: str, target_id: str, actor: str
    ) -> Recorded:
        if source_id == target_id:
            raise InvalidOperation("cannot merge a customer into itself")
        source = _customer_row(conn, source_id)
        target = _customer_row(conn, target_id)
        if source.merged_into == target_id:
            row = conn.execute(
                f"SELECT {_E} FROM merges m JOIN events e ON e.id = m.event_id "
                "WHERE m.source_id = ? AND m.undo_event_id IS NULL",
                (source_id,),
            ).fetchone()
            if row is not None:
                return self._existing(conn, event_from_row(row))
        if source.merged_into is not None:
            raise InvalidOperation(
                f"customer {source_id} was already merged into {source.merged_into}"
            )
        if target.merged_into is not None:
            raise InvalidOperation(
                f"customer {target_id} was merged into {target.merged_into}; merge into that"
            )

        now = utcnow()
        side: list[Event] = []
        source_active = _active(conn, source_id)
        if source_active is not None and _active(conn, target_id) is not None:
            # Born on the target's timeline: it lands there with the move below anyway.
            moved = replace(source_active, customer_id=target_id)
            side.append(
                self._status_event(
                    conn, moved, ConversationStatus.RESOLVED, actor, now, reason="merge"
                )
            )
            conn.execute(
                "UPDATE conversations SET status = 'resolved', resolved_at = ?, "
                "snoozed_until = NULL WHERE id = ?",
                (to_us(now), source_active.id),
            )

        identity_ids: list[int] = []
        for (identity_id,) in conn.execute(
            "SELECT id FROM identities WHERE customer_id = ? ORDER BY id", (source_id,)
        ).fetchall():
            # A claim the target already has stays behind: lookups by it still reach the
            # target through merged_into, and unmerge need not restore it.
            cursor = conn.execute(
                "UPDATE OR IGNORE identities SET customer_id = ? WHERE id = ?",
                (target_id, identity_id),
            )
            if cursor.rowcount:
                identity_ids.append(identity_id)
        conversation_ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM conversations WHERE customer_id = ?", (source_id,)
            )
        ]
        loose_event_ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM events WHERE customer_id = ? AND conversation_id IS NULL",
                (source_id,),
            )
        ]
        conn.execute(
            "UPDATE conversations SET customer_id = ? WHERE customer_id = ?",
            (target_id, source_id),
        )
        conn.execute(
            "UPDATE events SET customer_id = ? WHERE customer_id = ?", (target_id, source_id)
        )
        conn.execute("UPDATE customers SET merged_into = ? WHERE id = ?", (target_id, source_id))
        event = self._event(
            conn,
            customer_id=target_id,
            conversation_id=None,
            kind=EventKind.MERGE,
            direction=Direction.INTERNAL,
            author=actor,
            created_at=now,
            data={"source": source_id, "target": target_id},
        )
        conn.execute(
            "INSERT INTO merges (source_id, target_id, event_id, identity_ids, "
            "conversation_ids, event_ids) VALUES (?, ?, ?, ?, ?, ?)",
            (
                source_id,
                target_id,
                event.id,
                dump_json(identity_ids),
                dump_json(conversation_ids),
                dump_json(loose_event_ids),
            ),
        )
        return Recorded(
            event=event,
            conversation=None,
            customer=_require_customer(conn, target_id),
            created=True,
            side_events=tuple(side),
        )

    def unmerge_customers(self, conn: Connection, source_id: str, actor: str) -> Recorded:
        source = _customer_row(conn, source_id)
        merge = conn.execute(
            "SELECT id, target_id, identity_ids, conversation_ids, event_ids FROM merges "
            "WHERE source_id = ? AND undo_event_id IS NULL",
            (source_id,),
        ).fetchone()
        if source.merged_into is None or merge is None:
            raise InvalidOperation(f"customer {source_id} is not merged into another")
        merge_id, target_id, identity_ids, conversation_ids, event_ids = merge
        # Only what still sits with the target goes back: when merges were nested, an
        # inner unmerge may already have taken some of these rows to their own customer.
        live_target = _live(conn, target_id)
        for identity_id in json.loads(identity_ids):
            owner = conn.execute(
                "SELECT customer_id FROM identities WHERE id = ?", (identity_id,)
            ).fetchone()
            if owner is not None and _live(conn, owner[0]) == live_target:
                conn.execute(
                    "UPDATE OR IGNORE identities SET customer_id = ? WHERE id = ?",
                    (source_id, identity_id),
                )
        # Events follow their conversation, including ones added while merged.
        conn.execute(
            "UPDATE events SET customer_id = ? WHERE customer_id = ? "
            "AND conversation_id IN (SELECT value FROM json_each(?))",
            (source_id, live_target, conversation_ids),
        )
        conn.execute(
            "UPDATE events SET customer_id = ? WHERE customer_id = ? "
            "AND id IN (SELECT value FROM json_each(?))",
            (source_id, live_target, event_ids),
        )
        conn.execute(
            "UPDATE conversations SET customer_id = ? WHERE customer_id = ? "
            "AND id IN (SELECT value FROM json_each(?))",
            (source_id, live_target, conversation_ids),
        )
        conn.execute("UPDATE customers SET merged_into = NULL WHERE id = ?", (source_id,))
        # The target may itself have been merged away since: tell the live record.
        event = self._event(
            conn,
            customer_id=live_target,
            conversation_id=None,
            kind=EventKind.MERGE,
            direction=Direction.INTERNAL,
            author=actor,
            created_at=utcnow(),
            data={"undo": True, "source": source_id, "target": target_id},
        )
        conn.execute("UPDATE merges SET undo_event_id = ? WHERE id = ?", (event.id, merge_id))
        return Recorded(
            event=event,
            conversation=None,
            customer=_require_customer(conn, live_target),
            created=True,
        )

    # -- conversations --

    def set_status(
        self,
        conn: Connection,
        conversation_id: str,
        status: ConversationStatus,
        actor: str,
        snoozed_until: datetime | None,
    ) -> Recorded:
        conv = _require_conversation(conn, conversation_id)
        until = snoozed_until if status is ConversationStatus.SNOOZED else None
        if conv.status is status and opt_us(conv.snoozed_until) == opt_us(until):
            return self._unchanged(conn, conv)
        if not conv.status.active and status.active:
            other = _active(conn, conv.customer_id)
            if other is not None:
                raise InvalidOperation(
                    f"customer {conv.customer_id} already has an active conversation "
                    f"{other.id}; resolve it before reopening {conv.id}"
                )
        now = utcnow()
        extra = {"until": iso(until)} if until is not None else {}
        event = self._status_event(conn, conv, status, actor, now, **extra)
        resolved_at = now if status is ConversationStatus.RESOLVED else None
        conn.execute(
            "UPDATE conversations SET status = ?, resolved_at = ?, snoozed_until = ? WHERE id = ?",
            (status.value, opt_us(resolved_at), opt_us(until), conv.id),
        )
        conv = replace(conv, status=status, resolved_at=resolved_at, snoozed_until=until)
        return Recorded(
            event=event,
            conversation=conv,
            customer=_require_customer(conn, conv.customer_id),
            created=True,
        )

    def assign(
        self,
        conn: Connection,
        conversation_id: str,
        agent_id: str | None,
        actor: str,
        queue_name: str | None,
    ) -> Recorded:
        conv = _require_conversation(conn, conversation_id)
        new_queue = conv.queue if queue_name is None else queue_name
        if conv.assignee == agent_id and conv.queue == new_queue:
            return self._unchanged(conn, conv)
        event = self._event(
            conn,
            customer_id=conv.customer_id,
            conversation_id=conv.id,
            kind=EventKind.ASSIGNMENT,
            direction=Direction.INTERNAL,
            author=actor,
            created_at=utcnow(),
            data={"from": conv.assignee, "to": agent_id, "queue": queue_name},
        )
        conn.execute(
            "UPDATE conversations SET assignee = ?, queue = ? WHERE id = ?",
            (agent_id, new_queue, conv.id),
        )
        conv = replace(conv, assignee=agent_id, queue=new_queue)
        return Recorded(
            event=event,
            conversation=conv,
            customer=_require_customer(conn, conv.customer_id),
            created=True,
        )

    def set_conversation_tags(
        self, conn: Connection, conversation_id: str, tags: tuple[str, ...]
    ) -> Conversation:
        conv = _require_conversation(conn, conversation_id)
        tags = tuple(dict.fromkeys(tags))
        conn.execute(
            "UPDATE conversations SET tags = ? WHERE id = ?", (dump_json(list(tags)), conv.id)
        )
        return replace(conv, tags=tags)

    def append(self, conn: Connection, conversation_id: str, draft: EventDraft) -> Recorded:
        conv = _require_conversation(conn, conversation_id)
        if draft.external_id is not None:
            row = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE channel = ? AND external_id = ?",
                (draft.channel, draft.external_id),
            ).fetchone()
            if row is not None:
                return self._existing(conn, event_from_row(row))
        now = utcnow()
        event = self._event(
            conn,
            customer_id=conv.customer_id,
            conversation_id=conv.id,
            kind=draft.kind,
            direction=draft.direction,
            author=draft.author,
            created_at=now,
            channel=draft.channel,
            channel_type=draft.channel_type,
            text=draft.text,
            html=draft.html,
            attachments=draft.attachments,
            external_id=draft.external_id,
            delivery_state=draft.delivery_state,
            data=draft.data,
        )
        changes: dict[str, Any] = {}
        if draft.kind in _ACTIVITY_KINDS and now > conv.last_activity_at:
            changes["last_activity_at"] = now
        if (
            draft.direction is Direction.OUT
            and draft.kind is EventKind.MESSAGE
            and conv.first_response_at is None
        ):
            changes["first_response_at"] = now
        if changes:
            assignments = ", ".join(f"{name} = ?" for name in changes)
            conn.execute(
                f"UPDATE conversations SET {assignments} WHERE id = ?",
                (*(to_us(value) for value in changes.values()), conv.id),
            )
            conv = replace(conv, **changes)
        if draft.delivery_state is DeliveryState.QUEUED:
            conn.execute(
                "INSERT INTO outbox (event_id, due_at) VALUES (?, ?)", (event.id, to_us(now))
            )
        if draft.thread_key:
            _register_thread_key(conn, draft.thread_key, conv.id)
        return Recorded(
            event=event,
            conversation=conv,
            customer=_require_customer(conn, conv.customer_id),
            created=True,
        )

    # -- outbox --

    def claim_outbound(
        self, conn: Connection, now: datetime, limit: int, lease: timedelta
    ) -> list[OutboxItem]:
        now_us = to_us(now)
        rows = conn.execute(
            f"SELECT o.attempts, {_E} FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE o.due_at <= ? AND (o.lease_until IS NULL OR o.lease_until <= ?) "
            "ORDER BY o.due_at, o.event_id LIMIT ?",
            (now_us, now_us, limit),
        ).fetchall()
        # Claiming counts as an attempt, so a message that crashes its sender every
        # time still runs out of attempts instead of looping forever.
        conn.executemany(
            "UPDATE outbox SET lease_until = ?, attempts = attempts + 1 WHERE event_id = ?",
            [(to_us(now + lease), row[1]) for row in rows],
        )
        return [OutboxItem(event=event_from_row(row[1:]), attempts=row[0]) for row in rows]

    def record_delivery(
        self,
        conn: Connection,
        event_id: str,
        state: DeliveryState,
        error: str | None,
        provider_id: str | None,
        retry_at: datetime | None,
        attempts: int | None,
    ) -> Event:
        event = _require_event(conn, event_id)
        if event.delivery_state is None:
            raise InvalidOperation(f"event {event_id} has no delivery to update")
        external_id = provider_id or event.external_id
        if event.delivery_state.final and not state.final:
            # A late "sent" after "delivered": keep the final word, learn only the id.
            updated = replace(event, external_id=external_id)
        else:
            updated = replace(
                event, delivery_state=state, delivery_error=error, external_id=external_id
            )
            if state is DeliveryState.QUEUED:
                due = to_us(retry_at) if retry_at is not None else to_us(utcnow())
                conn.execute(
                    "INSERT INTO outbox (event_id, due_at, attempts) VALUES (?, ?, ?) "
                    "ON CONFLICT (event_id) DO UPDATE SET due_at = excluded.due_at, "
                    "lease_until = NULL, attempts = COALESCE(?, outbox.attempts)",
                    (event_id, due, attempts or 0, attempts),
                )
            else:
                conn.execute("DELETE FROM outbox WHERE event_id = ?", (event_id,))
        try:
            conn.execute(
                "UPDATE events SET delivery_state = ?, delivery_error = ?, external_id = ? "
                "WHERE id = ?",
                (
                    updated.delivery_state.value if updated.delivery_state else None,
                    updated.delivery_error,
                    updated.external_id,
                    event_id,
                ),
            )
        except sqlite3.IntegrityError:
            raise InvalidOperation(
                f"provider id {provider_id} already belongs to another event on "
                f"channel {event.channel!r}"
            ) from None
        return updated

    # -- channel state --

    def set_state(self, conn: Connection, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


# --- queries shared by reads and writes -------------------------------------------------


def _insert_identity(conn: Connection, identity: Identity, customer_id: str) -> None:
    conn.execute(
        "INSERT INTO identities (kind, value, verified, customer_id) VALUES (?, ?, ?, ?)",
        (identity.kind.value, identity.value, int(identity.verified), customer_id),
    )


def _owner(conn: Connection, identity: Identity) -> str | None:
    """The live customer an identity resolves to, keeping claims apart from verified ones."""
    # Literal `verified = 1/0` (not a parameter) lets SQLite use the partial indexes.
    if identity.verified:
        sql = "SELECT customer_id FROM identities WHERE kind = ? AND value = ? AND verified = 1"
    else:
        sql = (
            "SELECT customer_id FROM identities "
            "WHERE kind = ? AND value = ? AND verified = 0 ORDER BY id LIMIT 1"
        )
    row = conn.execute(sql, (identity.kind.value, identity.value)).fetchone()
    return None if row is None else _live(conn, row[0])


_CUSTOMER_IDENTITIES = (
    "SELECT kind, value, verified FROM identities WHERE customer_id = ? ORDER BY id"
)
_OWNER_ROW = (
    "SELECT c.id, c.display_name, c.tags, c.created_at, c.merged_into "
    "FROM identities i JOIN customers c ON c.id = i.customer_id "
)
_OWNER_VERIFIED = _OWNER_ROW + "WHERE i.kind = ? AND i.value = ? AND i.verified = 1"
_OWNER_CLAIM = (
    _OWNER_ROW + "WHERE i.kind = ? AND i.value = ? AND i.verified = 0 ORDER BY i.id LIMIT 1"
)


def _owner_customer(conn: Connection, identity: Identity) -> Customer | None:
    """The customer `_owner` names, read along with the lookup (two queries, not four)."""
    sql = _OWNER_VERIFIED if identity.verified else _OWNER_CLAIM
    row = conn.execute(sql, (identity.kind.value, identity.value)).fetchone()
    if row is None:
        return None
    if row[4] is not None:  # merged away: the live record is further along
        return _require_customer(conn, _live(conn, row[4]))
    return customer_from_rows(row, conn.execute(_CUSTOMER_IDENTITIES, (row[0],)))


def _live(conn: Connection, customer_id: str) -> str:
    """Follow merged_into to the customer that is not merged away."""
    seen = {customer_id}
    while True:
        row = conn.execute(
            "SELECT merged_into FROM customers WHERE id = ?", (customer_id,)
        ).fetchone()
        if row is None or row[0] is None:
            return customer_id
        customer_id = row[0]
        if customer_id in seen:  # unreachable: merges into merged customers are refused
            raise InvalidOperation(f"merge cycle through customer {customer_id}")
        seen.add(customer_id)


def _customer(conn: Connection, customer_id: str) -> Customer | None:
    row = conn.execute(
        f"SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?", (customer_id,)
    ).fetchone()
    if row is None:
        return None
    return customer_from_rows(row, conn.execute(_CUSTOMER_IDENTITIES, (customer_id,)))


def _require_customer(conn: Connection, customer_id: str) -> Customer:
    customer = _customer(conn, customer_id)
    if customer is None:
        raise NotFound(f"no customer {customer_id}")
    return customer


def _customer_row(conn: Connection, customer_id: str) -> _CustomerRow:
    row = conn.execute(
        "SELECT id, merged_into FROM customers WHERE id = ?", (customer_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no customer {customer_id}")
    return _CustomerRow(row[0], row[1])


def _require_live(conn: Connection, customer_id: str) -> None:
    row = _customer_row(conn, customer_id)
    if row.merged_into is not None:
        raise InvalidOperation(f"customer {customer_id} was merged into {row.merged_into}")


def _conversation(conn: Connection, conversation_id: str) -> Conversation | None:
    row = conn.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
    ).fetchone()
    return None if row is None else conversation_from_row(row)


def _require_conversation(conn: Connection, conversation_id: str) -> Conversation:
    conv = _conversation(conn, conversation_id)
    if conv is None:
        raise NotFound(f"no conversation {conversation_id}")
    return conv


def _active(conn: Connection, customer_id: str) -> Conversation | None:
    row = conn.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations "
        "WHERE customer_id = ? AND status != 'resolved'",
        (customer_id,),
    ).fetchone()
    return None if row is None else conversation_from_row(row)


def _threaded(conn: Connection, customer_id: str, refs: Sequence[str]) -> Conversation | None:
    """The conversation of this customer that `refs` point at: an active one if any,
    else the most recently active one."""
    row = conn.execute(
        f"SELECT {_C} FROM thread_keys t JOIN conversations c ON c.id = t.conversation_id "
        "WHERE t.key IN (SELECT value FROM json_each(?)) AND c.customer_id = ? "
        "ORDER BY c.status = 'resolved', c.last_activity_at DESC, c.id DESC LIMIT 1",
        (dump_json(list(refs)), customer_id),
    ).fetchone()
    return None if row is None else conversation_from_row(row)


def _register_thread_key(conn: Connection, key: str, conversation_id: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO thread_keys (key, conversation_id) VALUES (?, ?)",
        (key, conversation_id),
    )


def _event(conn: Connection, event_id: str) -> Event | None:
    row = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,)).fetchone()
    return None if row is None else event_from_row(row)


def _require_event(conn: Connection, event_id: str) -> Event:
    event = _event(conn, event_id)
    if event is None:
        raise NotFound(f"no event {event_id}")
    return event


# --- read operations (run on reader threads) --------------------------------------------


@contextmanager
def _snapshot(conn: Connection) -> Iterator[None]:
    """One read transaction, so that several SELECTs see the same committed state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidOperation(f"limit must be at least 1, not {limit}")


def _event_page(
    conn: Connection, column: str, key: str, limit: int, before: str | None
) -> Page[Event]:
    _check_limit(limit)
    if before is not None and not is_id(before):
        raise InvalidOperation(f"not an event cursor: {before[:60]!r}")
    # Ids grow in commit order, so "older than the cursor" is stable while events arrive.
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {column} = ?"
    params: tuple[Any, ...] = (key,)
    if before is not None:
        sql += " AND id < ?"
        params += (before,)
    with _snapshot(conn):
        total = conn.execute(f"SELECT COUNT(*) FROM events WHERE {column} = ?", (key,))
        count = total.fetchone()[0]
        rows = conn.execute(f"{sql} ORDER BY id DESC LIMIT ?", (*params, limit + 1)).fetchall()
    items = tuple(event_from_row(row) for row in rows[:limit])
    next_cursor = items[-1].id if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor, total=count)


def _conversation_filter(query: ConversationQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.statuses:
        clauses.append(f"status IN ({', '.join('?' * len(query.statuses))})")
        params.extend(status.value for status in query.statuses)
    if query.unassigned:
        clauses.append("assignee IS NULL")
    if query.assignee is not None:
        clauses.append("assignee = ?")
        params.append(query.assignee)
    if query.channel is not None:
        clauses.append("channel = ?")
        params.append(query.channel)
    if query.queue is not None:
        clauses.append("queue = ?")
        params.append(query.queue)
    if query.customer_id is not None:
        clauses.append("customer_id = ?")
        params.append(query.customer_id)
    return (" AND ".join(clauses) or "1"), params


def _conversation_cursor(conv: Conversation) -> str:
    return f"{to_us(conv.last_activity_at)}.{conv.id}"


def _parse_conversation_cursor(cursor: str) -> tuple[int, str]:
    at, _, conversation_id = cursor.partition(".")
    try:
        return int(at), conversation_id
    except ValueError:
        raise InvalidOperation(f"not a conversation cursor: {cursor[:60]!r}") from None


def _list_conversations(
    conn: Connection, query: ConversationQuery, limit: int, before: str | None
) -> Page[Conversation]:
    _check_limit(limit)
    where, params = _conversation_filter(query)
    paged_where, paged_params = where, list(params)
    if before is not None:
        paged_where += " AND (last_activity_at, id) < (?, ?)"
        paged_params.extend(_parse_conversation_cursor(before))
    with _snapshot(conn):
        count = conn.execute(f"SELECT COUNT(*) FROM conversations WHERE {where}", params)
        total = count.fetchone()[0]
        rows = conn.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE {paged_where} "
            "ORDER BY last_activity_at DESC, id DESC LIMIT ?",
            (*paged_params, limit + 1),
        ).fetchall()
    items = tuple(conversation_from_row(row) for row in rows[:limit])
    next_cursor = _conversation_cursor(items[-1]) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor, total=total)


def _find_customer(conn: Connection, identity: Identity) -> Customer | None:
    with _snapshot(conn):
        owner = _owner(conn, identity)
        return None if owner is None else _customer(conn, owner)


def _get_customer(conn: Connection, customer_id: str) -> Customer | None:
    with _snapshot(conn):
        return _customer(conn, customer_id)


def _events_after(
    conn: Connection, conversation_id: str, after_id: str | None, limit: int
) -> list[Event]:
    _check_limit(limit)
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE conversation_id = ? AND id > ? "
        "ORDER BY id LIMIT ?",
        (conversation_id, after_id or "", limit),
    ).fetchall()
    return [event_from_row(row) for row in rows]


def _find_event(conn: Connection, channel: str, external_id: str) -> Event | None:
    row = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE channel = ? AND external_id = ?",
        (channel, external_id),
    ).fetchone()
    return None if row is None else event_from_row(row)


def _get_state(conn: Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


# --- the store --------------------------------------------------------------------------


class SqliteStore:
    """The TimelineStore on one SQLite file; see the module docstring for its threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer: _Writer | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_lock = threading.Lock()
        self._closed = False
        # One process serves a SQLite file: leases only need to exclude its own tasks.
        self._leases: dict[str, tuple[str, float]] = {}

    # --- lifecycle ---

    async def start(self) -> None:
        if self._writer is not None:
            return
        if self._closed:
            raise StoreUnavailable("the store was closed; make a new one")
        await asyncio.to_thread(prepare_file, self.path)
        writer = _Writer(self.path, asyncio.get_running_loop())
        await writer.start()
        self._writer = writer
        self._readers = ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix="hub-sqlite-reader"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        writer, readers = self._writer, self._readers
        if writer is not None:
            await writer.stop()
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer process, while one runs (operators see it in
        `ps` as a second `python -m hub.timeline.sqlite_writer`)."""
        return None if self._writer is None else self._writer.pid

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive():
            raise StoreUnavailable("the SQLite writer is not running")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # --- plumbing ---

    def _refuse(self) -> StoreUnavailable:
        return StoreUnavailable(
            "the store is closed" if self._closed else "the store is not started"
        )

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(writes, conn, *args) in the writer process; a module-level function (it is
        pickled by name) and picklable arguments."""
        if self._writer is None or self._closed:
            raise self._refuse()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writer.submit(_Op(fn, args, loop, future))
        return await future

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        if self._readers is None or self._closed:
            raise self._refuse()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._in_reader, fn)

    def _in_reader(self, fn: Callable[[Connection], T]) -> T:
        try:
            conn: Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = connect(self.path, writer=False)
                self._local.conn = conn
                with self._reader_lock:
                    self._reader_conns.append(conn)
            return fn(conn)
        except sqlite3.Error as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    # --- ingest ---

    async def record_inbound(self, inbound: Inbound) -> Recorded:
        return await self._write(_Writes.record_inbound, inbound)

    # --- customers ---

    async def get_customer(self, customer_id: str) -> Customer | None:
        return await self._read(lambda conn: _get_customer(conn, customer_id))

    async def find_customer(self, identity: Identity) -> Customer | None:
        return await self._read(lambda conn: _find_customer(conn, identity))

    async def create_customer(
        self, display_name: str, identities: tuple[Identity, ...] = (), tags: tuple[str, ...] = ()
    ) -> Customer:
        return await self._write(_Writes.create_customer, display_name, identities, tags)

    async def link_identity(self, customer_id: str, identity: Identity) -> Customer:
        return await self._write(_Writes.link_identity, customer_id, identity)

    async def set_customer_tags(self, customer_id: str, tags: tuple[str, ...]) -> Customer:
        return await self._write(_Writes.set_customer_tags, customer_id, tags)

    async def merge_customers(self, source_id: str, target_id: str, actor: str) -> Recorded:
        return await self._write(_Writes.merge_customers, source_id, target_id, actor)

    async def unmerge_customers(self, source_id: str, actor: str) -> Recorded:
        return await self._write(_Writes.unmerge_customers, source_id, actor)

    # --- conversations ---

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return await self._read(lambda conn: _conversation(conn, conversation_id))

    async def active_conversation(self, customer_id: str) -> Conversation | None:
        return await self._read(lambda conn: _active(conn, customer_id))

    async def list_conversations(
        self, query: ConversationQuery, limit: int = 50, before: str | None = None
    ) -> Page[Conversation]:
        return await self._read(lambda conn: _list_conversations(conn, query, limit, before))

    async def set_status(
        self,
        conversation_id: str,
        status: ConversationStatus,
        actor: str,
        snoozed_until: datetime | None = None,
    ) -> Recorded:
        return await self._write(_Writes.set_status, conversation_id, status, actor, snoozed_until)

    async def assign(
        self,
        conversation_id: str,
        agent_id: str | None,
        actor: str,
        queue: str | None = None,
    ) -> Recorded:
        return await self._write(_Writes.assign, conversation_id, agent_id, actor, queue)

    async def set_conversation_tags(
        self, conversation_id: str, tags: tuple[str, ...]
    ) -> Conversation:
        return await self._write(_Writes.set_conversation_tags, conversation_id, tags)

    async def append(self, conversation_id: str, draft: EventDraft) -> Recorded:
        return await self._write(_Writes.append, conversation_id, draft)

    # --- timeline ---

    async def get_event(self, event_id: str) -> Event | None:
        return await self._read(lambda conn: _event(conn, event_id))

    async def find_event(self, channel: str, external_id: str) -> Event | None:
        return await self._read(lambda conn: _find_event(conn, channel, external_id))

    async def customer_timeline(
        self, customer_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        return await self._read(
            lambda conn: _event_page(conn, "customer_id", customer_id, limit, before)
        )

    async def conversation_events(
        self, conversation_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        return await self._read(
            lambda conn: _event_page(conn, "conversation_id", conversation_id, limit, before)
        )

    async def events_after(
        self, conversation_id: str, after_id: str | None, limit: int = 500
    ) -> list[Event]:
        return await self._read(lambda conn: _events_after(conn, conversation_id, after_id, limit))

    # --- outbox ---

    async def claim_outbound(self, now: datetime, limit: int, lease: timedelta) -> list[OutboxItem]:
        return await self._write(_Writes.claim_outbound, now, limit, lease)

    async def record_delivery(
        self,
        event_id: str,
        state: DeliveryState,
        *,
        error: str | None = None,
        provider_id: str | None = None,
        retry_at: datetime | None = None,
        attempts: int | None = None,
    ) -> Event:
        return await self._write(
            _Writes.record_delivery, event_id, state, error, provider_id, retry_at, attempts
        )

    # --- channel state ---

    def lease(self, name: str, owner: str, ttl_seconds: float) -> Lease:
        return LocalLease(name, owner, ttl_seconds, holders=self._leases)

    async def get_state(self, key: str) -> str | None:
        return await self._read(lambda conn: _get_state(conn, key))

    async def set_state(self, key: str, value: str) -> None:
        await self._write(_Writes.set_state, key, value)
