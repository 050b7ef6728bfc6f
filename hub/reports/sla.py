"""SLA policies: clocks computed from a conversation's timeline, and a sweeper that warns
before a breach and records each breach on the timeline.

Targets (config `sla.policies`, one policy per queue, one optional default):

- first_response: from the conversation's creation to the first agent reply.
- next_response: from a customer's message that waits for an answer (after the first
  response) to the next agent reply; every such wait is its own clock ("cycle").
- resolution: time the conversation is open, until it is resolved (a reopened
  conversation's clock carries on from where it stopped).

An agent reply is an agent's outbound message or a call an agent answered (the hub's
auto-replies and surveys do not count). A customer's contact is their inbound message or
an inbound call starting to ring, unless not routable (auto-reply, bounce, keyword, CSAT
answer). These follow the report metrics' definitions (hub/reports/metrics.py).

Clocks run in calendar time, or only inside business hours (the policy's
`business_hours`: a business_hours name, or `queue` for the hours of the conversation's
queue). They stop while the conversation is resolved, and while it is pending (waiting
on the customer) when `pause_while_pending` is true. Snoozed does not pause: the agent
chose to wait, the customer did not.

The sweeper (leader process only) looks at every active conversation every
`sla.check_every_seconds`:

- warning: once a running clock is within `warn_before` of its due time (default: 80%
  of the target has passed), it publishes `Signal(kind="sla_warning")` once per clock
  and process. Signals reach every agent's socket; `data.recipients` names who should
  act on it: the assignee and every supervisor and admin.
- breach: once a clock passes its due time (or stopped after it, e.g. the hub was down),
  it appends a STATUS event, author system, direction internal, with
  `data = {"sla": "first_response" | "next_response" | "resolution", "breached": true,
  "cycle": <ISO start of the clock>, "due_at", "target_seconds", "elapsed_seconds",
  "policy", "queue", "assignee", "business_hours", "late": <bool, stopped after due>}`
  and no "from"/"to" (it changes no status; the router and status metrics ignore it).
  It also publishes `Signal(kind="sla_breach")` with the same data and recipients.
  The event is the record: a clock whose (sla, cycle) already has one is never
  recorded again, across restarts and processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from hub.bus import Bus, Signal
from hub.config import SLA_TARGETS, WEEKDAYS, BusinessHours, Config, SlaPolicy
from hub.model import (
    CUSTOMER,
    SYSTEM,
    Conversation,
    ConversationQuery,
    ConversationStatus,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Role,
    iso,
    utcnow,
)
from hub.timeline.store import NotFound, StoreError, TimelineStore

log = structlog.get_logger(__name__)

ACTIVE = (ConversationStatus.OPEN, ConversationStatus.PENDING, ConversationStatus.SNOOZED)
# How much of a conversation's history a sweep reads (newest first); older events of a
# very long conversation are assumed not to hold its status changes.
MAX_EVENTS = 2000
_PAGE = 500
# Business-hours walks give up after this many days (hours that are never open).
_HORIZON_DAYS = 800
DEFAULT_WARN_FRACTION = 0.8


# --- business time ------------------------------------------------------------------------


def _open_spans(
    hours: BusinessHours, start: datetime, end: datetime | None
) -> Iterator[tuple[datetime, datetime]]:
    """(open, close) UTC datetimes of `hours` from the local day before `start` on, in
    order, up to `end` (or the horizon). Built from local dates, so DST shifts count."""
    zone = ZoneInfo(hours.timezone)
    day = start.astimezone(zone).date() - timedelta(days=1)
    if end is not None:
        last = end.astimezone(zone).date() + timedelta(days=1)
    else:
        last = day + timedelta(days=_HORIZON_DAYS)
    while day <= last:
        if day not in hours.holidays:
            for span_start, span_end in hours.weekly.get(WEEKDAYS[day.weekday()], ()):
                opens = _local(day, span_start, zone)
                if span_end == time.max:
                    closes = _local(day + timedelta(days=1), time(0), zone)
                else:
                    closes = _local(day, span_end, zone)
                yield opens, closes
        day += timedelta(days=1)


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    # Converted to UTC at once: aware datetimes sharing a tzinfo subtract as wall clocks.
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


def business_seconds(hours: BusinessHours | None, start: datetime, end: datetime) -> float:
    """Seconds between `start` and `end` that fall inside `hours` (all of them if None)."""
    if end <= start:
        return 0.0
    if hours is None:
        return (end - start).total_seconds()
    total = 0.0
    for opens, closes in _open_spans(hours, start, end):
        if opens >= end:
            break
        a, b = max(opens, start), min(closes, end)
        if b > a:
            total += (b - a).total_seconds()
    return total


def add_business_seconds(
    hours: BusinessHours | None, start: datetime, seconds: float
) -> datetime | None:
    """The moment `seconds` of open time after `start`; None if the hours never open."""
    if hours is None:
        return start + timedelta(seconds=seconds)
    left = seconds
    for opens, closes in _open_spans(hours, start, None):
        if closes <= start:
            continue
        a = max(opens, start)
        available = (closes - a).total_seconds()
        if left <= available:
            return a + timedelta(seconds=left)
        left -= available
    return None


# --- clocks ---------------------------------------------------------------------------------

Interval = tuple[datetime, datetime | None]  # None: still running


@dataclass(frozen=True, slots=True)
class SlaClock:
    sla: str  # one of SLA_TARGETS
    cycle: datetime  # when this clock started: with `sla`, what identifies it
    target_seconds: int
    elapsed_seconds: float  # counted (business) time until stopped_at or now
    due_at: datetime | None  # None: paused or stopped before it could be computed
    warn_at: datetime | None  # None once stopped
    stopped_at: datetime | None  # answered or resolved
    running: bool  # counting right now
    breached: bool

    @property
    def key(self) -> tuple[str, str]:
        return self.sla, iso(self.cycle) or ""


def is_customer_contact(event: Event) -> bool:
    """A contact that waits for an answer: the customer's inbound message, or an inbound
    call starting to ring (as hub/reports/metrics.py counts contacts), but never an
    auto-reply, bounce, keyword or CSAT answer (not routable)."""
    if event.direction is not Direction.IN or event.data.get("routable") is False:
        return False
    if event.kind is EventKind.MESSAGE:
        return event.author == CUSTOMER and "csat" not in event.data
    return event.kind is EventKind.CALL and event.data.get("status") == "ringing"


def is_agent_reply(event: Event) -> bool:
    """An agent's outbound message, or a call an agent answered (as the report metrics
    count responses); the hub's own messages (auto-replies, surveys) are not answers."""
    if event.kind is EventKind.MESSAGE:
        return event.direction is Direction.OUT and event.author.startswith("agent:")
    return event.kind is EventKind.CALL and event.data.get("status") == "answered"


def is_sla_event(event: Event) -> bool:
    return event.kind is EventKind.STATUS and "sla" in event.data


def running_intervals(
    conversation: Conversation, events: Sequence[Event], pause_while_pending: bool
) -> list[Interval]:
    """When the conversation's clocks run: from creation, minus resolved (and pending)
    stretches, read off its STATUS events (oldest first)."""
    paused = {ConversationStatus.RESOLVED}
    if pause_while_pending:
        paused.add(ConversationStatus.PENDING)
    out: list[Interval] = []
    status = ConversationStatus.OPEN
    since = conversation.created_at
    for event in events:
        if event.kind is not EventKind.STATUS or is_sla_event(event):
            continue
        try:
            new = ConversationStatus(str(event.data.get("to")))
        except ValueError:
            continue
        if status not in paused and new in paused:
            out.append((since, event.created_at))
        elif status in paused and new not in paused:
            since = event.created_at
        status = new
    if status not in paused:
        out.append((since, None))
    return out


def _deadline(
    hours: BusinessHours | None, intervals: Sequence[Interval], start: datetime, target: float
) -> datetime | None:
    left = float(target)
    for a, b in intervals:
        a = max(a, start)
        if b is not None and b <= a:
            continue
        if b is None:
            return add_business_seconds(hours, a, left)
        available = business_seconds(hours, a, b)
        if left <= available:
            return add_business_seconds(hours, a, left)
        left -= available
    return None  # paused (or resolved) before the target was used up


def _clock(
    sla: str,
    target: int,
    start: datetime,
    stop: datetime | None,
    intervals: Sequence[Interval],
    hours: BusinessHours | None,
    now: datetime,
    warn_before: int | None,
) -> SlaClock:
    end = stop or now
    elapsed = sum(business_seconds(hours, max(a, start), min(b or end, end)) for a, b in intervals)
    due = _deadline(hours, intervals, start, target)
    if stop is not None:
        breached = due is not None and due < stop
    else:
        breached = due is not None and due <= now
    running = stop is None and bool(intervals) and intervals[-1][1] is None
    lead = warn_before if warn_before is not None else target * (1 - DEFAULT_WARN_FRACTION)
    warn_at = due - timedelta(seconds=lead) if due is not None and stop is None else None
    return SlaClock(
        sla=sla,
        cycle=start,
        target_seconds=target,
        elapsed_seconds=round(elapsed, 3),
        due_at=due,
        warn_at=warn_at,
        stopped_at=stop,
        running=running,
        breached=breached,
    )


def evaluate(
    policy: SlaPolicy,
    hours: BusinessHours | None,
    conversation: Conversation,
    events: Sequence[Event],
    now: datetime,
) -> list[SlaClock]:
    """Every SLA clock of a conversation under `policy`, given its events oldest first."""
    intervals = running_intervals(conversation, events, policy.pause_while_pending)
    clocks: list[SlaClock] = []

    def add(sla: str, start: datetime, stop: datetime | None) -> None:
        target = policy.target(sla)
        if target is not None:
            clocks.append(
                _clock(sla, target, start, stop, intervals, hours, now, policy.warn_before)
            )

    first_reply = next((e.created_at for e in events if is_agent_reply(e)), None)
    add("first_response", conversation.created_at, first_reply)
    if policy.next_response is not None and first_reply is not None:
        waiting: datetime | None = None
        for event in events:
            if event.created_at <= first_reply:
                continue
            if waiting is None and is_customer_contact(event):
                waiting = event.created_at
            elif waiting is not None and is_agent_reply(event):
                add("next_response", waiting, event.created_at)
                waiting = None
        if waiting is not None:
            add("next_response", waiting, None)
    resolved = conversation.status is ConversationStatus.RESOLVED
    add("resolution", conversation.created_at, conversation.resolved_at if resolved else None)
    return clocks


def hours_for(config: Config, policy: SlaPolicy, queue: str | None) -> BusinessHours | None:
    """The business hours a policy counts in for a conversation of `queue` (None: calendar)."""
    name: str | None = policy.business_hours
    if name == "calendar":
        return None
    if name == "queue":
        try:
            name = config.queue(queue).business_hours if queue else None
        except KeyError:
            name = None
        if name is None:
            return None
    try:
        return config.hours(name)
    except KeyError:
        return None


def recorded_breaches(events: Sequence[Event]) -> set[tuple[str, str]]:
    return {
        (str(e.data.get("sla")), str(e.data.get("cycle")))
        for e in events
        if is_sla_event(e) and e.data.get("breached")
    }


# --- the sweeper ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepResult:
    conversations: int = 0
    warnings: int = 0
    breaches: int = 0


_LABELS = {
    "first_response": "first response",
    "next_response": "next response",
    "resolution": "resolution",
}


class SlaSweeper:
    def __init__(
        self,
        config: Config,
        store: TimelineStore,
        bus: Bus,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.clock = clock
        self.interval = float(config.sla.check_every_seconds)
        # (conversation, sla, cycle) already warned about, by this process.
        self._warned: set[tuple[str, str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._supervisors = tuple(
            a.id for a in config.agents if a.role in (Role.SUPERVISOR, Role.ADMIN)
        )
        # For /metrics: counts by sla name since start.
        self.warnings: Counter[str] = Counter()
        self.breaches: Counter[str] = Counter()
        self.last_sweep_seconds = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sla-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A store outage or one odd conversation must not end SLA tracking.
                log.exception("sla.sweep_failed")
            await asyncio.sleep(self.interval)

    async def sweep_once(self) -> SweepResult:
        started = asyncio.get_running_loop().time()
        now = self.clock()
        seen: set[tuple[str, str, str]] = set()
        conversations = warnings = breaches = 0
        cursor: str | None = None
        while True:
            page = await self.store.list_conversations(
                ConversationQuery(statuses=ACTIVE), limit=_PAGE, before=cursor
            )
            for conv in page.items:
                policy = self.config.sla.policy_for(conv.queue or self.config.routing.default_queue)
                if policy is None:
                    continue
                conversations += 1
                try:
                    w, b = await self._check(conv, policy, now, seen)
                except NotFound:
                    continue  # merged away meanwhile
                except StoreError:
                    log.exception("sla.check_failed", conversation=conv.id)
                    continue
                warnings += w
                breaches += b
            cursor = page.next_cursor
            if cursor is None:
                break
        # Forget warnings of clocks that are gone (answered, resolved), so memory stays flat.
        self._warned &= seen
        self.last_sweep_seconds = asyncio.get_running_loop().time() - started
        return SweepResult(conversations, warnings, breaches)

    async def _events(self, conversation_id: str) -> list[Event]:
        events: list[Event] = []
        cursor: str | None = None
        while len(events) < MAX_EVENTS:
            page = await self.store.conversation_events(conversation_id, limit=_PAGE, before=cursor)
            events.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        events.reverse()
        return events

    async def _check(
        self,
        conv: Conversation,
        policy: SlaPolicy,
        now: datetime,
        seen: set[tuple[str, str, str]],
    ) -> tuple[int, int]:
        events = await self._events(conv.id)
        hours = hours_for(self.config, policy, conv.queue)
        recorded = recorded_breaches(events)
        warnings = breaches = 0
        bound = log.bind(conversation=conv.id, customer=conv.customer_id, channel=conv.channel)
        for clock in evaluate(policy, hours, conv, events, now):
            if clock.breached:
                if clock.key not in recorded:
                    await self._breach(conv, policy, hours, clock, now, bound)
                    breaches += 1
                continue
            key = (conv.id, *clock.key)
            if clock.running and clock.warn_at is not None and clock.warn_at <= now:
                seen.add(key)
                if key not in self._warned:
                    self._warned.add(key)
                    await self._warn(conv, policy, hours, clock, now, bound)
                    warnings += 1
        return warnings, breaches

    def _facts(
        self,
        conv: Conversation,
        policy: SlaPolicy,
        hours: BusinessHours | None,
        clock: SlaClock,
    ) -> dict[str, Any]:
        return {
            "sla": clock.sla,
            "cycle": iso(clock.cycle),
            "due_at": iso(clock.due_at),
            "target_seconds": clock.target_seconds,
            "elapsed_seconds": clock.elapsed_seconds,
            "policy": policy.name,
            "queue": conv.queue,
            "assignee": conv.assignee,
            "business_hours": hours.name if hours else None,
        }

    def _recipients(self, conv: Conversation) -> list[str]:
        people = [conv.assignee] if conv.assignee else []
        return people + [a for a in self._supervisors if a not in people]

    async def _warn(
        self,
        conv: Conversation,
        policy: SlaPolicy,
        hours: BusinessHours | None,
        clock: SlaClock,
        now: datetime,
        bound: Any,
    ) -> None:
        data = self._facts(conv, policy, hours, clock)
        assert clock.due_at is not None
        data["remaining_seconds"] = max(0.0, round((clock.due_at - now).total_seconds(), 3))
        data["recipients"] = self._recipients(conv)
        self.warnings[clock.sla] += 1
        bound.info("sla.warning", sla=clock.sla, due_at=data["due_at"], policy=policy.name)
        await self.bus.publish(
            [
                Signal(
                    kind="sla_warning",
                    conversation_id=conv.id,
                    customer_id=conv.customer_id,
                    data=data,
                )
            ]
        )

    async def _breach(
        self,
        conv: Conversation,
        policy: SlaPolicy,
        hours: BusinessHours | None,
        clock: SlaClock,
        now: datetime,
        bound: Any,
    ) -> None:
        data = self._facts(conv, policy, hours, clock)
        data["breached"] = True
        data["late"] = clock.stopped_at is not None
        target = timedelta(seconds=clock.target_seconds)
        where = f", business hours {hours.name}" if hours else ""
        text = f"SLA breached: {_LABELS[clock.sla]} (target {target}{where})"
        recorded = await self.store.append(
            conv.id,
            EventDraft(
                kind=EventKind.STATUS,
                direction=Direction.INTERNAL,
                author=SYSTEM,
                text=text,
                data=data,
            ),
        )
        self.breaches[clock.sla] += 1
        bound.warning("sla.breach", sla=clock.sla, due_at=data["due_at"], policy=policy.name)
        await self.bus.publish(
            [
                recorded.event,
                Signal(
                    kind="sla_breach",
                    conversation_id=conv.id,
                    customer_id=conv.customer_id,
                    data={
                        **data,
                        "event_id": recorded.event.id,
                        "recipients": self._recipients(conv),
                    },
                ),
            ]
        )


__all__ = [
    "SLA_TARGETS",
    "SlaClock",
    "SlaSweeper",
    "SweepResult",
    "add_business_seconds",
    "business_seconds",
    "evaluate",
    "hours_for",
    "recorded_breaches",
    "running_intervals",
]
