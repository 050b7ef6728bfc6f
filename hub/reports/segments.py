"""Customer segments: saved filters over customers (config `segments`), evaluated from
the store, for reports and for routing match rules (`customer_segments`).

A segment holds when every filter it gives holds; a list filter holds when any of its
values does (like queue match rules):

- tags: the customer has one of these tags.
- channels / channel_types: the customer contacted us on one of these channels (by
  name) / channel types, at any time in the history read (see MAX_EVENTS).
- last_contact_within: the customer's last inbound contact is at most this old.
- csat_at_most: the customer's latest CSAT score is this or lower (no score: no match).
- has_open_conversation: the customer has (true) / has not (false) an active
  conversation.

`CustomerFacts` are read once per customer and can be tested against many segments;
`matches` is pure, so callers that already know the facts (a router holding the
customer) need no store at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hub.config import Config, SegmentConfig
from hub.model import (
    ConversationQuery,
    Direction,
    Event,
    utcnow,
)
from hub.reports.csat import latest_score
from hub.timeline.store import TimelineStore

# How much of a customer's history (newest first) is read for channels used and CSAT.
MAX_EVENTS = 1000
_PAGE = 250


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    customer_id: str
    tags: tuple[str, ...]
    channels: frozenset[str]  # channel names of the customer's inbound contacts
    channel_types: frozenset[str]
    last_contact_at: datetime | None
    last_csat: int | None
    has_open_conversation: bool


def facts_from_events(
    customer_id: str,
    tags: Iterable[str],
    events: Sequence[Event],
    has_open_conversation: bool,
) -> CustomerFacts:
    inbound = [e for e in events if e.direction is Direction.IN and e.channel]
    return CustomerFacts(
        customer_id=customer_id,
        tags=tuple(tags),
        channels=frozenset(e.channel for e in inbound),
        channel_types=frozenset(e.channel_type.value for e in inbound if e.channel_type),
        last_contact_at=max((e.created_at for e in inbound), default=None),
        last_csat=latest_score(list(events)),
        has_open_conversation=has_open_conversation,
    )


def matches(segment: SegmentConfig, facts: CustomerFacts, now: datetime) -> bool:
    """Whether the customer described by `facts` is in `segment` at `now`."""
    if segment.tags and not set(segment.tags) & set(facts.tags):
        return False
    if segment.channels and not set(segment.channels) & facts.channels:
        return False
    if segment.channel_types and not set(segment.channel_types) & facts.channel_types:
        return False
    if segment.last_contact_within is not None:
        since = now - timedelta(seconds=segment.last_contact_within)
        if facts.last_contact_at is None or facts.last_contact_at < since:
            return False
    if segment.csat_at_most is not None:
        if facts.last_csat is None or facts.last_csat > segment.csat_at_most:
            return False
    return not (
        segment.has_open_conversation is not None
        and segment.has_open_conversation != facts.has_open_conversation
    )


async def customer_facts(store: TimelineStore, customer_id: str) -> CustomerFacts | None:
    """What segments look at, read from the store (None for an unknown customer; a
    customer merged away is read as the customer it was merged into)."""
    customer = await store.get_customer(customer_id)
    seen: set[str] = set()
    while customer is not None and customer.merged_into and customer.id not in seen:
        seen.add(customer.id)
        customer = await store.get_customer(customer.merged_into)
    if customer is None:
        return None
    events: list[Event] = []
    cursor: str | None = None
    while len(events) < MAX_EVENTS:
        page = await store.customer_timeline(customer.id, limit=_PAGE, before=cursor)
        events.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    active = await store.active_conversation(customer.id)
    return facts_from_events(customer.id, customer.tags, events, active is not None)


class Segments:
    """The configured segments over one store."""

    def __init__(
        self, config: Config, store: TimelineStore, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._by_name = {s.name: s for s in config.segments}

    def segment(self, name: str) -> SegmentConfig:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown segment {name!r}") from None

    async def segments_of(self, customer_id: str) -> tuple[str, ...]:
        """Names of every segment the customer is in, in config order."""
        facts = await customer_facts(self.store, customer_id)
        if facts is None:
            return ()
        now = self.clock()
        return tuple(s.name for s in self.config.segments if matches(s, facts, now))

    async def contains(self, name: str, customer_id: str) -> bool:
        segment = self.segment(name)
        facts = await customer_facts(self.store, customer_id)
        return facts is not None and matches(segment, facts, self.clock())

    async def members(self, name: str, limit: int = 1000) -> list[str]:
        """Customer ids in the segment, most recently active first, among customers with
        a conversation (the store lists customers through their conversations)."""
        segment = self.segment(name)
        now = self.clock()
        found: list[str] = []
        checked: set[str] = set()
        cursor: str | None = None
        while len(found) < limit:
            page = await self.store.list_conversations(
                ConversationQuery(), limit=_PAGE, before=cursor
            )
            for conv in page.items:
                if conv.customer_id in checked:
                    continue
                checked.add(conv.customer_id)
                facts = await customer_facts(self.store, conv.customer_id)
                if (
                    facts is not None
                    and facts.customer_id not in found
                    and matches(segment, facts, now)
                ):
                    found.append(facts.customer_id)
                    if len(found) >= limit:
                        break
            cursor = page.next_cursor
            if cursor is None:
                break
        return found


__all__ = ["CustomerFacts", "Segments", "customer_facts", "facts_from_events", "matches"]
