"""The SQLite schema as an ordered list of migrations, and connection settings.

`PRAGMA user_version` holds how many migration steps a database file has had. A step is
never edited once released: change the schema by appending a step, so that every file,
whatever its age, reaches the same shape by replaying the steps it has not seen.

Times are integer microseconds since the Unix epoch, UTC: sortable, exact, and cheap to
compare in SQL. Lists and mappings (tags, attachments, event data) are JSON text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hub.model import (
    Attachment,
    ChannelType,
    Conversation,
    ConversationStatus,
    Customer,
    DeliveryState,
    Direction,
    Event,
    EventKind,
    Identity,
    IdentityKind,
    attachment_to_dict,
)
from hub.timeline.store import StoreUnavailable

# How long a connection waits for another process's lock before it reports "busy".
BUSY_TIMEOUT_MS = 5000

_V1: tuple[str, ...] = (
    """
    CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        created_at INTEGER NOT NULL,
        merged_into TEXT REFERENCES customers(id)
    )
    """,
    # One table for verified identities and unverified claims. The two partial indexes
    # keep them apart: a verified (kind, value) belongs to one customer, while the same
    # unverified claim may sit on several customers and never collides with the verified
    # owner. The explicit integer key survives VACUUM, so merges can remember rows by it.
    """
    CREATE TABLE identities (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        verified INTEGER NOT NULL,
        customer_id TEXT NOT NULL REFERENCES customers(id)
    )
    """,
    "CREATE UNIQUE INDEX identities_verified ON identities(kind, value) WHERE verified = 1",
    """
    CREATE UNIQUE INDEX identities_claims ON identities(kind, value, customer_id)
        WHERE verified = 0
    """,
    "CREATE INDEX identities_customer ON identities(customer_id)",
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        status TEXT NOT NULL,
        channel TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_activity_at INTEGER NOT NULL,
        assignee TEXT,
        queue TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        tags TEXT NOT NULL DEFAULT '[]',
        first_response_at INTEGER,
        resolved_at INTEGER,
        snoozed_until INTEGER
    )
    """,
    # The "one active conversation per customer" rule, enforced by the database itself.
    """
    CREATE UNIQUE INDEX conversations_one_active ON conversations(customer_id)
        WHERE status != 'resolved'
    """,
    "CREATE INDEX conversations_customer ON conversations(customer_id, last_activity_at)",
    "CREATE INDEX conversations_activity ON conversations(last_activity_at, id)",
    "CREATE INDEX conversations_assignee ON conversations(assignee, last_activity_at)",
    """
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL REFERENCES customers(id),
        conversation_id TEXT REFERENCES conversations(id),
        channel TEXT NOT NULL,
        channel_type TEXT,
        direction TEXT NOT NULL,
        kind TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        text TEXT NOT NULL,
        html TEXT,
        attachments TEXT,
        external_id TEXT,
        delivery_state TEXT,
        delivery_error TEXT,
        data TEXT
    )
    """,
    # Idempotency of inbound deliveries and lookup of outbound provider ids. NULLs are
    # distinct in a SQLite unique index, so events without an external id never clash.
    "CREATE UNIQUE INDEX events_external ON events(channel, external_id)",
    "CREATE INDEX events_customer ON events(customer_id, id)",
    "CREATE INDEX events_conversation ON events(conversation_id, id)",
    # Scoped through the conversation: a key only threads for the customer who owns the
    # conversation now, and merges move it along with the conversation for free.
    """
    CREATE TABLE thread_keys (
        key TEXT NOT NULL,
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        PRIMARY KEY (key, conversation_id)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE outbox (
        event_id TEXT PRIMARY KEY REFERENCES events(id),
        due_at INTEGER NOT NULL,
        lease_until INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX outbox_due ON outbox(due_at, event_id)",
    # What a merge moved, so that unmerge can move exactly that back. `undo_event_id` is
    # set once the merge was undone; a customer has at most one merge not undone.
    """
    CREATE TABLE merges (
        id INTEGER PRIMARY KEY,
        source_id TEXT NOT NULL REFERENCES customers(id),
        target_id TEXT NOT NULL REFERENCES customers(id),
        event_id TEXT NOT NULL REFERENCES events(id),
        identity_ids TEXT NOT NULL,
        conversation_ids TEXT NOT NULL,
        event_ids TEXT NOT NULL,
        undo_event_id TEXT REFERENCES events(id)
    )
    """,
    "CREATE UNIQUE INDEX merges_live ON merges(source_id) WHERE undo_event_id IS NULL",
    """
    CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)

# Indexes an inbound message on an open conversation no longer rewrites: its activity
# time moves on every message, and each index holding that time costs a page write per
# message. A customer's few conversations sort without one; the "mine" listing only
# needs assigned conversations indexed.
_V2: tuple[str, ...] = (
    "DROP INDEX conversations_customer",
    "CREATE INDEX conversations_customer ON conversations(customer_id)",
    "DROP INDEX conversations_assignee",
    """
    CREATE INDEX conversations_assignee ON conversations(assignee, last_activity_at)
        WHERE assignee IS NOT NULL
    """,
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, writer: bool) -> sqlite3.Connection:
    """A connection with the hub's settings; the writer's also sets the durable ones.

    isolation_level=None: the store issues BEGIN/COMMIT itself, so group commit and
    savepoints are under its control rather than the sqlite3 module's guesses.
    """
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if writer:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"{path}: cannot use WAL journal mode (got {mode})")
            # FULL: the WAL is fsynced at every commit, so an acknowledged write survives
            # power loss, not only a process crash.
            conn.execute("PRAGMA synchronous = FULL")
        else:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the file to SCHEMA_VERSION in one transaction; returns the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{path} has schema version {found}, newer than this hub understands "
                f"({SCHEMA_VERSION}); upgrade the hub or use another database file"
            )
        _apply(conn, MIGRATIONS[found:])
        # Part of the same transaction: a crash mid-way leaves the old version and schema.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(found)


def _apply(conn: sqlite3.Connection, steps: Sequence[tuple[str, ...]]) -> None:
    # execute(), not executescript(): the latter would COMMIT the open transaction.
    for step in steps:
        for statement in step:
            conn.execute(statement)


# --- rows <-> domain values -------------------------------------------------------------
# Column lists are spelled once here so that every SELECT yields rows these codecs read.

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

EVENT_COLUMNS = (
    "id, customer_id, conversation_id, channel, channel_type, direction, kind, author, "
    "created_at, text, html, attachments, external_id, delivery_state, delivery_error, data"
)
CONVERSATION_COLUMNS = (
    "id, customer_id, status, channel, created_at, last_activity_at, assignee, queue, "
    "priority, tags, first_response_at, resolved_at, snoozed_until"
)
CUSTOMER_COLUMNS = "id, display_name, tags, created_at, merged_into"


def to_us(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC, never local time."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


def opt_us(value: datetime | None) -> int | None:
    return None if value is None else to_us(value)


def opt_from_us(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def dump_data(data: Mapping[str, Any]) -> str | None:
    return dump_json(dict(data)) if data else None


def dump_attachments(attachments: Sequence[Attachment]) -> str | None:
    if not attachments:
        return None
    return dump_json([attachment_to_dict(a) for a in attachments])


def load_attachments(text: str | None) -> tuple[Attachment, ...]:
    if not text:
        return ()
    return tuple(Attachment(**item) for item in json.loads(text))


def load_tags(text: str) -> tuple[str, ...]:
    return () if text == "[]" else tuple(json.loads(text))


def event_values(event: Event) -> tuple[Any, ...]:
    """The INSERT parameters for EVENT_COLUMNS, in that order."""
    return event_row(event, dump_data(event.data))


def event_row(event: Event, data_json: str | None) -> tuple[Any, ...]:
    """`event_values` for an event whose data is already dumped (`dump_data`)."""
    return (
        event.id,
        event.customer_id,
        event.conversation_id,
        event.channel,
        event.channel_type.value if event.channel_type else None,
        event.direction.value,
        event.kind.value,
        event.author,
        to_us(event.created_at),
        event.text,
        event.html,
        dump_attachments(event.attachments),
        event.external_id,
        event.delivery_state.value if event.delivery_state else None,
        event.delivery_error,
        data_json,
    )


def event_from_row(row: Sequence[Any]) -> Event:
    return Event(
        id=row[0],
        customer_id=row[1],
        conversation_id=row[2],
        channel=row[3],
        channel_type=ChannelType(row[4]) if row[4] else None,
        direction=Direction(row[5]),
        kind=EventKind(row[6]),
        author=row[7],
        created_at=from_us(row[8]),
        text=row[9],
        html=row[10],
        attachments=load_attachments(row[11]),
        external_id=row[12],
        delivery_state=DeliveryState(row[13]) if row[13] else None,
        delivery_error=row[14],
        data=json.loads(row[15]) if row[15] else {},
    )


def conversation_from_row(row: Sequence[Any]) -> Conversation:
    return Conversation(
        id=row[0],
        customer_id=row[1],
        status=ConversationStatus(row[2]),
        channel=row[3],
        created_at=from_us(row[4]),
        last_activity_at=from_us(row[5]),
        assignee=row[6],
        queue=row[7],
        priority=row[8],
        tags=load_tags(row[9]),
        first_response_at=opt_from_us(row[10]),
        resolved_at=opt_from_us(row[11]),
        snoozed_until=opt_from_us(row[12]),
    )


def conversation_values(conv: Conversation) -> tuple[Any, ...]:
    """The INSERT parameters for CONVERSATION_COLUMNS, in that order."""
    return (
        conv.id,
        conv.customer_id,
        conv.status.value,
        conv.channel,
        to_us(conv.created_at),
        to_us(conv.last_activity_at),
        conv.assignee,
        conv.queue,
        conv.priority,
        dump_json(list(conv.tags)),
        opt_us(conv.first_response_at),
        opt_us(conv.resolved_at),
        opt_us(conv.snoozed_until),
    )


def customer_from_rows(row: Sequence[Any], identity_rows: Iterable[Sequence[Any]]) -> Customer:
    """`identity_rows` are (kind, value, verified) in the order they were added.

    A claim the customer also holds verified is left out: it adds nothing a reader needs,
    and the row stays so that lookups by the unverified claim keep finding this customer.
    """
    rows = list(identity_rows)
    verified = {(kind, value) for kind, value, is_verified in rows if is_verified}
    identities = tuple(
        Identity(IdentityKind(kind), value, bool(is_verified))
        for kind, value, is_verified in rows
        if is_verified or (kind, value) not in verified
    )
    return Customer(
        id=row[0],
        display_name=row[1],
        identities=identities,
        tags=load_tags(row[2]),
        created_at=from_us(row[3]),
        merged_into=row[4],
    )
