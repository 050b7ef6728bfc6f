"""The domain: frozen values that every layer passes around.

Nothing here does I/O. Stores build these from rows or hashes; adapters build `Inbound`
from wire payloads and consume `Outbound`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from types import UnionType
from typing import Any, Generic, TypeVar, get_args, get_type_hints


def utcnow() -> datetime:
    return datetime.now(UTC)


C = TypeVar("C", bound=type)

# Class name -> the function that rebuilds one of its values from `__reduce__`'s tuple.
_REBUILDERS: dict[str, Callable[..., Any]] = {}


def _rebuild(name: str, values: tuple[Any, ...]) -> Any:
    return _REBUILDERS[name](*values)


def pickled_by_fields(cls: C) -> C:
    """Pickle as the tuple of field values, enums as their values.

    These values cross to the SQLite writer process and back on every write, and the
    hub's event loop unpickles every answer: the default for slotted dataclasses (a
    state list built through `fields()`, one setattr per field, an `Enum(value)` call
    per enum) cost it about a tenth of its time per webhook. Rebuilding sets the slots
    directly, as the frozen `__init__` would, and finds enum members in their value map.
    """
    names = [f.name for f in fields(cls)]
    hints = get_type_hints(cls)
    dump_parts: list[str] = []
    load_parts: list[str] = []
    env: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_rebuild": _rebuild}
    for name in names:
        enum = _enum_in(hints[name])
        env[f"_set_{name}"] = getattr(cls, name).__set__
        if enum is None:
            dump_parts.append(f"self.{name}")
            load_parts.append(f"    _set_{name}(o, {name})")
        else:
            env[f"_members_{name}"] = enum._value2member_map_
            dump_parts.append(f"(None if self.{name} is None else self.{name}._value_)")
            load_parts.append(
                f"    _set_{name}(o, None if {name} is None else _members_{name}[{name}])"
            )
    source = (
        f"def __reduce__(self):\n"
        f"    return (_rebuild, ({cls.__name__!r}, ({', '.join(dump_parts)},)))\n"
        f"def rebuild({', '.join(names)}):\n"
        f"    o = _new(_cls)\n" + "\n".join(load_parts) + "\n    return o\n"
    )
    exec(source, env)  # generated from the class's own field names, as dataclasses does
    _REBUILDERS[cls.__name__] = env["rebuild"]
    cls.__reduce__ = env["__reduce__"]  # type: ignore[method-assign]
    return cls


def _enum_in(hint: Any) -> type[Enum] | None:
    """The Enum class of a field typed `E` or `E | None`, else None."""
    options = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    enums = [o for o in options if isinstance(o, type) and issubclass(o, Enum)]
    return enums[0] if len(enums) == 1 else None


class ChannelType(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    VOICE = "voice"
    WEBCHAT = "webchat"


class IdentityKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CHAT = "chat"  # a web chat visitor id


class Direction(StrEnum):
    IN = "in"
    OUT = "out"
    INTERNAL = "internal"


class EventKind(StrEnum):
    MESSAGE = "message"
    NOTE = "note"
    CALL = "call"
    VOICEMAIL = "voicemail"
    STATUS = "status"
    ASSIGNMENT = "assignment"
    DELIVERY = "delivery"
    MERGE = "merge"


class ConversationStatus(StrEnum):
    OPEN = "open"
    PENDING = "pending"
    SNOOZED = "snoozed"
    RESOLVED = "resolved"

    @property
    def active(self) -> bool:
        """Active conversations count toward "one per customer"; resolved ones do not."""
        return self is not ConversationStatus.RESOLVED


class DeliveryState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (DeliveryState.DELIVERED, DeliveryState.UNDELIVERED, DeliveryState.FAILED)


class Role(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"


class Presence(StrEnum):
    ONLINE = "online"
    AWAY = "away"
    OFFLINE = "offline"


# Authors of events: "customer", "system", or "agent:<agent id>".
CUSTOMER = "customer"
SYSTEM = "system"


def agent_author(agent_id: str) -> str:
    return f"agent:{agent_id}"


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Identity:
    """A normalized way to reach a customer; build with `hub.identities.normalize`.

    `verified` is False for claims nobody vouched for (an email typed into a chat
    pre-form): such an identity is recorded but never resolves or merges customers.
    """

    kind: IdentityKind
    value: str
    verified: bool = True

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.value}"


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    # Where the bytes live: a blob key in the data dir, or a provider URL (Twilio media).
    url: str


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    display_name: str
    identities: tuple[Identity, ...]
    tags: tuple[str, ...]
    created_at: datetime
    # Set when this customer was merged into another: follow it to the live record.
    merged_into: str | None = None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    customer_id: str
    status: ConversationStatus
    channel: str  # channel name of the last inbound message
    created_at: datetime
    last_activity_at: datetime
    assignee: str | None = None
    queue: str | None = None
    priority: int = 0
    tags: tuple[str, ...] = ()
    first_response_at: datetime | None = None
    resolved_at: datetime | None = None
    snoozed_until: datetime | None = None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Event:
    id: str  # sortable; within a conversation, id order is commit order
    customer_id: str
    conversation_id: str | None  # None only for customer-level events (merge)
    channel: str  # channel name, or "" for events no channel carried (notes, status)
    channel_type: ChannelType | None
    direction: Direction
    kind: EventKind
    author: str
    created_at: datetime
    text: str = ""
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    external_id: str | None = None
    delivery_state: DeliveryState | None = None
    delivery_error: str | None = None
    # Kind-specific facts: {"from": .., "to": ..} for status, {"agent": ..} for assignment,
    # call duration, merge source, provider error codes. JSON-serializable.
    data: Mapping[str, Any] = field(default_factory=dict)


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Inbound:
    """One contact as an adapter understood it, before anything is stored."""

    channel: str
    channel_type: ChannelType
    # The provider's id for this delivery (MessageSid, Message-ID, client message id):
    # the same (channel, external_id) is stored once, however often it is delivered.
    external_id: str
    identity: Identity
    text: str = ""
    html: str | None = None
    display_name: str | None = None
    kind: EventKind = EventKind.MESSAGE
    attachments: tuple[Attachment, ...] = ()
    # Keys of earlier messages this one answers (email In-Reply-To/References, reply token).
    thread_refs: tuple[str, ...] = ()
    # Key under which later messages can refer to this one (its own Message-ID).
    thread_key: str | None = None
    received_at: datetime | None = None
    # False for contacts that must be recorded but not routed (auto-replies, bounces).
    routable: bool = True
    data: Mapping[str, Any] = field(default_factory=dict)


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event the hub itself appends to a conversation (reply, note, call, status...)."""

    kind: EventKind
    direction: Direction
    author: str
    channel: str = ""
    channel_type: ChannelType | None = None
    text: str = ""
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    external_id: str | None = None
    # QUEUED puts an outbound message in the durable outbox in the same write.
    delivery_state: DeliveryState | None = None
    thread_key: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Recorded:
    """What a store write produced: the event plus the customer and conversation after it."""

    event: Event
    conversation: Conversation | None
    customer: Customer
    created: bool  # False when an idempotent write found the event already stored
    # Other events the same write appended (a reopen's status event, a merge's resolve).
    side_events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message leaving the hub on a channel; built from a queued outbound event."""

    event_id: str
    channel: str
    channel_type: ChannelType
    to: Identity
    text: str
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    customer_id: str = ""
    conversation_id: str = ""
    # Earlier message keys of the conversation, oldest first (email References).
    thread_refs: tuple[str, ...] = ()
    thread_key: str | None = None
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    name: str
    login: str
    role: Role
    password_hash: str = ""
    skills: tuple[str, ...] = ()
    # Per channel type: how many conversations of that type at once.
    capacity: Mapping[str, int] = field(default_factory=dict)
    phone: str | None = None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    # Opaque; pass back as `before` for the next (older) page. None when no more.
    next_cursor: str | None
    total: int | None = None


@dataclass(frozen=True, slots=True)
class ConversationQuery:
    statuses: tuple[ConversationStatus, ...] = ()  # empty: any
    assignee: str | None = None
    unassigned: bool = False
    channel: str | None = None
    queue: str | None = None
    customer_id: str | None = None


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def identity_to_dict(identity: Identity) -> dict[str, Any]:
    return {"kind": identity.kind.value, "value": identity.value, "verified": identity.verified}


def attachment_to_dict(att: Attachment) -> dict[str, Any]:
    return {
        "filename": att.filename,
        "content_type": att.content_type,
        "size": att.size,
        "url": att.url,
    }


def event_to_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "customer_id": event.customer_id,
        "conversation_id": event.conversation_id,
        "channel": event.channel,
        "channel_type": event.channel_type.value if event.channel_type else None,
        "direction": event.direction.value,
        "kind": event.kind.value,
        "author": event.author,
        "created_at": iso(event.created_at),
        "text": event.text,
        "html": event.html,
        "attachments": [attachment_to_dict(a) for a in event.attachments],
        "external_id": event.external_id,
        "delivery_state": event.delivery_state.value if event.delivery_state else None,
        "delivery_error": event.delivery_error,
        "data": dict(event.data),
    }


def conversation_to_dict(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "customer_id": conv.customer_id,
        "status": conv.status.value,
        "channel": conv.channel,
        "assignee": conv.assignee,
        "queue": conv.queue,
        "priority": conv.priority,
        "tags": list(conv.tags),
        "created_at": iso(conv.created_at),
        "last_activity_at": iso(conv.last_activity_at),
        "first_response_at": iso(conv.first_response_at),
        "resolved_at": iso(conv.resolved_at),
        "snoozed_until": iso(conv.snoozed_until),
    }


def customer_to_dict(customer: Customer) -> dict[str, Any]:
    return {
        "id": customer.id,
        "display_name": customer.display_name,
        "identities": [identity_to_dict(i) for i in customer.identities],
        "tags": list(customer.tags),
        "created_at": iso(customer.created_at),
        "merged_into": customer.merged_into,
    }
