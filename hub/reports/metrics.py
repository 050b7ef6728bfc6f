"""Report metrics: their exact definitions, over a conversation's events. Pure, no I/O.

docs/reports.md explains each metric in prose; this module is the definition. Both report
sources (hub/reports/source.py) fold events through the same `FactsBuilder`, so a
metric means the same on SQLite and Redis.

Conventions:
- A conversation's events are taken in id order, which is commit order: the order in
  which the hub learned of them. Durations are differences of `created_at` (an inbound
  event's time may be the provider's), never below zero.
- Times inside this module are integer microseconds since the epoch, UTC (`to_us`), so
  that sums and comparisons are exact and cheap; durations leave it as float seconds.
- A conversation belongs to the period in which it arrived: all of its measurements
  (even a resolution after the period's end) count in that period.

Which events count as what (`classify`):
- contact: a customer's inbound message, or an inbound call starting to ring;
- response: an agent's outbound message (author "agent:<id>"; the hub's own automatic
  messages do not count), or a call an agent answered (CALL status "answered");
- assigned: an ASSIGNMENT event naming an agent (not a queue-only or unassign event);
- resolved / reopened: a STATUS event to / from "resolved".
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import IntEnum
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from hub.config import WEEKDAYS, BusinessHours
from hub.model import CUSTOMER, ChannelType, Direction, Event, EventKind

US = 1_000_000
DAY_US = 86_400 * US
HOUR_US = 3_600 * US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A web chat whose customer was left this long without an answer counts as abandoned:
# the widget has no "visitor left" event, so silence is how the timeline shows leaving.
ABANDON_AFTER_US = 10 * 60 * US

AGENT_PREFIX = "agent:"
ANSWERED = "answered"
RINGING = "ringing"
RESOLVED = "resolved"
# A call's status events that mean the call is over (answered or not).
CALL_ENDED = frozenset({"completed", "missed", "busy", "no-answer", "failed", "canceled"})
CALLBACK = "callback"
WEBCHAT = ChannelType.WEBCHAT.value

# The duration metrics, in the order reports show them.
DURATIONS = ("first_response", "next_response", "queue_wait", "handle", "resolution")


def to_us(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


# --- what an event is to the metrics ----------------------------------------------------


class Mark(IntEnum):
    OTHER = 0
    CONTACT = 1
    RESPONSE = 2
    ASSIGNED = 3
    RESOLVED = 4
    REOPENED = 5


# Plain ints for the hot loops (an IntEnum compares equal to them).
_CONTACT, _RESPONSE, _ASSIGNED, _RESOLVED, _REOPENED = 1, 2, 3, 4, 5


def data_fields(kind: str, data: Mapping[str, Any]) -> tuple[Any, Any]:
    """The two facts of `data` that classification reads: (a, b).

    call: (status, call_sid); status and assignment: (to, from). The SQLite source
    extracts the same two with json_extract, so both backends classify identically.
    """
    if kind == EventKind.CALL:
        return data.get("status"), data.get("call_sid")
    if kind in (EventKind.STATUS, EventKind.ASSIGNMENT):
        return data.get("to"), data.get("from")
    return None, None


def classify(kind: str, direction: str, author: str, a: Any, b: Any) -> Mark:
    """What an event is to the metrics; (a, b) from `data_fields`.

    hub/reports/source.py transcribes this into SQL (CODE_SQL); tests check that the
    two agree on every combination that matters.
    """
    if kind == EventKind.MESSAGE:
        if direction == Direction.OUT:
            return Mark.RESPONSE if author.startswith(AGENT_PREFIX) else Mark.OTHER
        if direction == Direction.IN and author == CUSTOMER:
            return Mark.CONTACT
        return Mark.OTHER
    if kind == EventKind.CALL:
        if a == ANSWERED:
            return Mark.RESPONSE
        if a == RINGING and direction == Direction.IN:
            return Mark.CONTACT
        return Mark.OTHER
    if kind == EventKind.ASSIGNMENT:
        return Mark.ASSIGNED if a is not None else Mark.OTHER
    if kind == EventKind.STATUS:
        if a == RESOLVED:
            return Mark.RESOLVED
        if b == RESOLVED:
            return Mark.REOPENED
    return Mark.OTHER


def is_outbound(kind: str, direction: str, a: Any) -> bool:
    """Counts in "volume out": any outbound message (agents' and the hub's automatic
    ones), and each call-back an agent placed (one CALL event with status "callback")."""
    if direction != Direction.OUT:
        return False
    return kind == EventKind.MESSAGE or (kind == EventKind.CALL and a == CALLBACK)


# `code` packs what the fold needs to know of an event in one small int: its mark, plus
# OUT_FLAG when it counts as outbound volume, plus ASSIGNMENT_FLAG for every ASSIGNMENT
# event (they set the conversation's agent and queue, whatever their mark).
OUT_FLAG = 8
ASSIGNMENT_FLAG = 16
MARK_MASK = 7


def code(kind: str, direction: str, author: str, a: Any, b: Any) -> int:
    value = int(classify(kind, direction, author, a, b))
    if is_outbound(kind, direction, a):
        value |= OUT_FLAG
    if kind == EventKind.ASSIGNMENT:
        value |= ASSIGNMENT_FLAG
    return value


def mark(event: Event) -> Mark:
    a, b = data_fields(event.kind, event.data)
    return classify(event.kind, event.direction, event.author, a, b)


# --- one conversation -------------------------------------------------------------------


# Durations and ConversationFacts are NamedTuples, not frozen dataclasses: a cold start
# makes one of each per conversation (100,000s), and a frozen dataclass costs several
# times more to construct. They are just as immutable.


class Durations(NamedTuple):
    """One conversation's measurements in seconds (calendar or business hours)."""

    first_response: float | None = None
    next_responses: tuple[float, ...] = ()
    queue_wait: float | None = None
    handle: float | None = None
    resolution: float | None = None


Span = Callable[[int, int], float]


def calendar_span(start: int, end: int) -> float:
    return (end - start) / US if end > start else 0.0


def _calendar(
    turns: Sequence[tuple[int, int]],
    arrived: int,
    assigned: int | None,
    handled_until: int | None,
    resolved: int | None,
) -> Durations:
    """_durations(calendar_span, ...) inlined: it runs once per conversation folded."""
    return Durations(
        (turns[0][1] - turns[0][0] if turns[0][1] > turns[0][0] else 0) / US if turns else None,
        tuple([(e - s if e > s else 0) / US for s, e in turns[1:]]),
        None if assigned is None else (assigned - arrived if assigned > arrived else 0) / US,
        None
        if assigned is None or handled_until is None
        else (handled_until - assigned if handled_until > assigned else 0) / US,
        None if resolved is None else (resolved - arrived if resolved > arrived else 0) / US,
    )


def _durations(
    span: Span,
    turns: Sequence[tuple[int, int]],
    arrived: int,
    assigned: int | None,
    handled_until: int | None,
    resolved: int | None,
) -> Durations:
    return Durations(
        span(*turns[0]) if turns else None,
        tuple([span(s, e) for s, e in turns[1:]]),
        None if assigned is None else span(arrived, assigned),
        None if assigned is None or handled_until is None else span(assigned, handled_until),
        None if resolved is None else span(arrived, resolved),
    )


class ConversationFacts(NamedTuple):
    """The instants a conversation's metrics are made of (microseconds, UTC).

    turns: answered customer turns, oldest first, as (start, response). A turn starts
    at a contact with no unanswered contact before it and ends at the next response;
    turns[0] is the first response, the others are the next responses. A response
    with no contact waiting (a follow-up) ends no turn.

    Build with FactsBuilder (or `conversation_facts`), which also fills `calendar`.
    """

    conversation_id: str
    arrived: int  # the first contact
    channel: str  # the first contact's channel and its type
    channel_type: str | None
    turns: tuple[tuple[int, int], ...]
    waiting_since: int | None  # start of the turn still unanswered, if any
    assigned: int | None  # first assignment to an agent after arrival
    resolved: int | None  # first resolution after arrival
    handled_until: int | None  # first resolution after `assigned`
    reopened: int
    # The last contact before the first response (while there is none: the last contact).
    last_contact: int
    # Who has it and where it waits, as its last ASSIGNMENT events say (the store's
    # `assign` is the only thing that changes either, and it always records one).
    agent: str | None
    queue: str | None
    # durations(calendar_span), computed once: reports over many conversations read it.
    calendar: Durations

    @property
    def first_response(self) -> int | None:
        return self.turns[0][1] if self.turns else None

    def durations(self, span: Span) -> Durations:
        """The measurements, each `span(start, end)`:
        first_response: arrival -> first response (turns[0]);
        next_responses: each later turn's start -> its response;
        queue_wait: arrival -> first assignment to an agent;
        handle: that assignment -> the first resolution after it;
        resolution: arrival -> first resolution."""
        return _durations(
            span, self.turns, self.arrived, self.assigned, self.handled_until, self.resolved
        )

    def abandoned(self, as_of: int) -> bool | None:
        """None for conversations that did not arrive by web chat.

        Abandoned: the customer was left without any response for ABANDON_AFTER after
        their last message, before the first response came (or, with none yet, by
        `as_of`). A chat still inside that window is not abandoned (yet).
        """
        if self.channel_type != WEBCHAT:
            return None
        until = self.turns[0][1] if self.turns else as_of
        return until - self.last_contact >= ABANDON_AFTER_US


class FactsBuilder:
    """Folds one conversation's events, in id order, into ConversationFacts.

    The sources keep one per conversation and feed it new events as they are committed,
    so facts stay current without rereading a conversation's history. `mark` is a Mark
    or its int value.
    """

    __slots__ = (
        "agent",
        "arrived",
        "assigned",
        "channel",
        "channel_type",
        "conversation_id",
        "handled_until",
        "last_contact",
        "queue",
        "reopened",
        "resolved",
        "turns",
        "waiting_since",
    )

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.arrived: int | None = None
        self.channel = ""
        self.channel_type: str | None = None
        self.turns: list[tuple[int, int]] = []
        self.waiting_since: int | None = None
        self.assigned: int | None = None
        self.resolved: int | None = None
        self.handled_until: int | None = None
        self.reopened = 0
        self.last_contact = 0
        self.agent: str | None = None
        self.queue: str | None = None

    @classmethod
    def resume(cls, facts: ConversationFacts) -> FactsBuilder:
        """A builder in the state that made `facts`, to fold later events into: a
        digest keeps only the (smaller) facts between folds."""
        builder = cls(facts.conversation_id)
        builder.arrived = facts.arrived
        builder.channel = facts.channel
        builder.channel_type = facts.channel_type
        builder.turns = list(facts.turns)
        builder.waiting_since = facts.waiting_since
        builder.assigned = facts.assigned
        builder.resolved = facts.resolved
        builder.handled_until = facts.handled_until
        builder.reopened = facts.reopened
        builder.last_contact = facts.last_contact
        builder.agent = facts.agent
        builder.queue = facts.queue
        return builder

    def assign(self, to: str | None, queue: str | None) -> None:
        """An ASSIGNMENT event {"to", "queue"}: `to` is the agent now (None: nobody);
        a queue of None keeps the current one, as the store's `assign` does."""
        self.agent = to
        if queue is not None:
            self.queue = queue

    def add(self, at: int, mark: int, channel: str, channel_type: str | None) -> None:
        if self.arrived is None:
            if mark != _CONTACT:
                return  # nothing counts before the customer's first contact
            self.arrived = at
            self.channel = channel
            self.channel_type = channel_type
        if mark == _CONTACT:
            if self.waiting_since is None:
                self.waiting_since = at
            if not self.turns:
                self.last_contact = at
        elif mark == _RESPONSE:
            if self.waiting_since is not None:
                self.turns.append((self.waiting_since, at))
                self.waiting_since = None
        elif mark == _ASSIGNED:
            if self.assigned is None:
                self.assigned = at
        elif mark == _RESOLVED:
            if self.resolved is None:
                self.resolved = at
            if self.assigned is not None and self.handled_until is None:
                self.handled_until = at
        elif mark == _REOPENED:
            self.reopened += 1

    def facts(self) -> ConversationFacts | None:
        """None while the conversation has had no customer contact."""
        arrived = self.arrived
        if arrived is None:
            return None
        turns = tuple(self.turns)
        assigned, handled_until, resolved = self.assigned, self.handled_until, self.resolved
        return ConversationFacts(
            self.conversation_id,
            arrived,
            self.channel,
            self.channel_type,
            turns,
            self.waiting_since,
            assigned,
            resolved,
            handled_until,
            self.reopened,
            self.last_contact,
            self.agent,
            self.queue,
            _calendar(turns, arrived, assigned, handled_until, resolved),
        )


def conversation_facts(events: Iterable[Event]) -> ConversationFacts | None:
    """The facts of one conversation from its events (any order; sorted by id here)."""
    ordered = sorted(events, key=lambda e: e.id)
    if not ordered:
        return None
    builder = FactsBuilder(ordered[0].conversation_id or "")
    for event in ordered:
        if event.kind == EventKind.ASSIGNMENT:
            builder.assign(event.data.get("to"), event.data.get("queue"))
        channel_type = event.channel_type.value if event.channel_type else None
        builder.add(to_us(event.created_at), mark(event), event.channel, channel_type)
    return builder.facts()


# --- calls ------------------------------------------------------------------------------


@dataclass(slots=True)
class CallFacts:
    """One inbound call (its CALL events share a call_sid), as far as it has got."""

    started: int
    channel: str
    answered: bool = False
    ended: bool = False

    @property
    def missed(self) -> bool:
        """Missed: the call is over and no agent answered it (voicemail or not)."""
        return self.ended and not self.answered

    def add(self, status: Any) -> None:
        if status == ANSWERED:
            self.answered = True
        elif status in CALL_ENDED:
            self.ended = True


def missed_calls(events: Iterable[Event]) -> dict[str, CallFacts]:
    """Inbound calls by call_sid, from any events (others are skipped)."""
    calls: dict[str, CallFacts] = {}
    for event in sorted(events, key=lambda e: e.id):
        if event.kind != EventKind.CALL or event.direction != Direction.IN:
            continue
        status, sid = data_fields(event.kind, event.data)
        if not sid:
            continue
        call = calls.get(sid)
        if call is None:
            call = calls[sid] = CallFacts(to_us(event.created_at), event.channel)
        call.add(status)
    return calls


# --- business hours ---------------------------------------------------------------------


def offset_segments(tz: ZoneInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """[lo, hi) split where the zone's UTC offset changes: (start, end, offset), in us.

    zoneinfo does not publish its transitions, so they are found by probing every six
    hours (no zone changes offset twice within that) and bisecting to the second.
    """
    if hi <= lo:
        return []

    def offset(at_us: int) -> int:
        at = datetime.fromtimestamp(at_us // US, tz)
        utcoffset = at.utcoffset() or timedelta()
        return utcoffset // timedelta(microseconds=1)

    step = 6 * HOUR_US
    segments: list[tuple[int, int, int]] = []
    start, current = lo, offset(lo)
    probe = lo
    while probe < hi:
        nxt = min(probe + step, hi)
        if offset(nxt) != current:
            # The change lies in (probe, nxt]: find the first second with the new offset.
            a, b = probe // US, -(-nxt // US)
            while b - a > 1:
                mid = (a + b) // 2
                if offset(mid * US) == current:
                    a = mid
                else:
                    b = mid
            change = max(b * US, lo)
            if change < hi:
                segments.append((start, change, current))
                start, current = change, offset(change)
        probe = nxt
    segments.append((start, hi, current))
    return [s for s in segments if s[0] < s[1]]


def _day_us(day: date) -> int:
    return (day.toordinal() - date(1970, 1, 1).toordinal()) * DAY_US


def _time_us(value: time, *, end: bool) -> int:
    if end and value == time.max:  # "24:00"
        return DAY_US
    return ((value.hour * 60 + value.minute) * 60 + value.second) * US + value.microsecond


class BusinessClock:
    """Counts open time of BusinessHours between instants, fast enough for bulk use.

    Open time is exactly the instants at which `hours.is_open` is true: each stretch of
    constant UTC offset is mapped to local wall-clock time, where the weekly ranges and
    holidays (local dates) apply. So a day that springs forward is an hour shorter, a
    day that falls back may count a repeated local hour twice, and nothing depends on
    the server's own zone. The open intervals of the covered span are precomputed with
    prefix sums; a query is two binary searches. The span grows on demand.
    """

    def __init__(self, hours: BusinessHours, lo: int, hi: int) -> None:
        self.hours = hours
        self._tz = ZoneInfo(hours.timezone)
        self._holidays = frozenset(hours.holidays)
        self._ranges = [
            tuple(
                (_time_us(s, end=False), _time_us(e, end=True)) for s, e in hours.weekly.get(d, ())
            )
            for d in WEEKDAYS
        ]
        self._lo = self._hi = lo
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._before: list[int] = []  # open time before each interval
        self._cover(lo, hi)

    def _cover(self, lo: int, hi: int) -> None:
        # Whole local days (plus a margin) so that a rebuild is rare.
        lo = min(lo, self._lo) - DAY_US
        hi = max(hi, self._hi) + DAY_US
        intervals: list[tuple[int, int]] = []
        for seg_lo, seg_hi, off in offset_segments(self._tz, lo, hi):
            local_lo, local_hi = seg_lo + off, seg_hi + off
            day = date(1970, 1, 1) + timedelta(microseconds=local_lo - local_lo % DAY_US)
            while _day_us(day) < local_hi:
                base = _day_us(day)
                if day not in self._holidays:
                    for start, end in self._ranges[day.weekday()]:
                        a, b = max(base + start, local_lo), min(base + end, local_hi)
                        if a < b:
                            if intervals and intervals[-1][1] == a - off:
                                intervals[-1] = (intervals[-1][0], b - off)
                            else:
                                intervals.append((a - off, b - off))
                day += timedelta(days=1)
        self._lo, self._hi = lo, hi
        self._starts = [a for a, _ in intervals]
        self._ends = [b for _, b in intervals]
        self._before = []
        total = 0
        for a, b in intervals:
            self._before.append(total)
            total += b - a

    def _open_before(self, at: int) -> int:
        i = bisect_right(self._starts, at) - 1
        if i < 0:
            return 0
        return self._before[i] + min(at, self._ends[i]) - self._starts[i]

    def open_us(self, start: int, end: int) -> int:
        if end <= start:
            return 0
        if start < self._lo or end > self._hi:
            self._cover(start, end)
        return self._open_before(end) - self._open_before(start)

    def seconds(self, start: datetime, end: datetime) -> float:
        return self.open_us(to_us(start), to_us(end)) / US


def business_seconds(start: datetime, end: datetime, hours: BusinessHours) -> float:
    """Seconds of [start, end) during which `hours` are open (0 if end <= start)."""
    a, b = to_us(start), to_us(end)
    return BusinessClock(hours, a, b).open_us(a, b) / US


# --- local time buckets -----------------------------------------------------------------


def bucket_starts(tz: ZoneInfo, lo: int, hi: int, interval: str) -> list[int]:
    """Starts (UTC us) of the local hours or days that meet [lo, hi); the first is lo.

    Local boundaries are mapped through each constant-offset stretch, so a day with a
    DST change is a 23- or 25-hour bucket and a repeated local hour is its own bucket.
    """
    size = HOUR_US if interval == "hour" else DAY_US
    starts = {lo}
    for seg_lo, seg_hi, off in offset_segments(tz, lo, hi):
        first = -(-(seg_lo + off) // size) * size  # first local boundary >= segment start
        for local in range(first, seg_hi + off, size):
            starts.add(local - off)
    return sorted(s for s in starts if lo <= s < hi)


def local_hour(tz: ZoneInfo, at: int) -> int:
    return datetime.fromtimestamp(at / US, tz).hour


# --- aggregation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    """count, mean, median (mean of the middle two for even counts), p90 (nearest rank)."""

    count: int
    mean: float | None = None
    median: float | None = None
    p90: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "median": self.median, "p90": self.p90}


def stats(values: list[float], *, is_sorted: bool = False) -> Stats:
    """Stats of seconds, rounded to the millisecond; sorts `values` in place."""
    n = len(values)
    if n == 0:
        return Stats(0)
    if not is_sorted:
        values.sort()
    mid = n // 2
    median = values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
    p90 = values[max(math.ceil(0.9 * n), 1) - 1]
    return Stats(n, round(sum(values) / n, 3), round(median, 3), round(p90, 3))


def business_span(clock: BusinessClock) -> Span:
    return lambda start, end: clock.open_us(start, end) / US


def values_of(durations: Sequence[Durations], metric: str) -> list[float]:
    """Every value of one duration metric (next_response: every later turn)."""
    if metric == "next_response":
        return [x for d in durations for x in d[1]]
    i = _FIELD[metric]
    return [v for d in durations if (v := d[i]) is not None]


_FIELD = {"first_response": 0, "queue_wait": 2, "handle": 3, "resolution": 4}


class _Tally:
    """Counts and sorted duration values of a set of conversations."""

    __slots__ = ("abandoned", "business", "counts", "values")

    def __init__(
        self,
        counts: list[int],
        values: dict[str, list[float]],
        business: dict[str, list[float]] | None,
    ) -> None:
        # conversations, resolved, reopened, unanswered, webchats, abandoned chats
        self.counts = counts
        self.values = values
        self.business = business

    @classmethod
    def of(
        cls,
        facts: Sequence[ConversationFacts],
        as_of: int,
        business: Sequence[Durations] | None,
    ) -> _Tally:
        webchat = [f for f in facts if f.channel_type == WEBCHAT]
        counts = [
            len(facts),
            sum(1 for f in facts if f.resolved is not None),
            sum(1 for f in facts if f.reopened),
            sum(1 for f in facts if not f.turns),
            len(webchat),
            sum(1 for f in webchat if f.abandoned(as_of)),
        ]
        calendar = [f.calendar for f in facts]
        values = {metric: sorted(values_of(calendar, metric)) for metric in DURATIONS}
        hours = None
        if business is not None:
            hours = {metric: sorted(values_of(business, metric)) for metric in DURATIONS}
        return cls(counts, values, hours)

    @classmethod
    def merged(cls, parts: Sequence[_Tally], business: bool) -> _Tally:
        """The tally of disjoint parts. Their values are sorted runs, which Timsort
        merges in near-linear time: far cheaper than tallying everything again."""

        def merge(pick: Callable[[_Tally], dict[str, list[float]] | None], m: str) -> list[float]:
            out: list[float] = []
            for part in parts:
                out.extend((pick(part) or {}).get(m, ()))
            out.sort()
            return out

        counts = [sum(part.counts[i] for part in parts) for i in range(6)]
        values = {m: merge(lambda t: t.values, m) for m in DURATIONS}
        hours = {m: merge(lambda t: t.business, m) for m in DURATIONS} if business else None
        return cls(counts, values, hours)

    def report(self) -> dict[str, Any]:
        c = self.counts
        body: dict[str, Any] = {
            "conversations": c[0],
            "resolved": c[1],
            "reopened": c[2],
            "unanswered": c[3],
            "webchats": c[4],
            "abandoned_chats": c[5],
        }
        for metric, values in self.values.items():
            body[metric] = stats(values, is_sorted=True).to_dict()
        if self.business is not None:
            body["business"] = {
                m: stats(v, is_sorted=True).to_dict() for m, v in self.business.items()
            }
        return body


def summarize(
    facts: Sequence[ConversationFacts],
    *,
    as_of: int,
    business: Sequence[Durations] | None = None,
) -> dict[str, Any]:
    """Counts and duration stats over these conversations (calendar seconds).

    Counts: conversations, resolved (at least once), reopened (at least once),
    unanswered (no response yet), webchats (arrived by web chat), abandoned_chats.
    Each duration: count, mean, median, p90 in seconds. `business`, aligned with
    `facts`, adds the same stats in business hours under "business".
    """
    return _Tally.of(facts, as_of, business).report()


Keys = Callable[[ConversationFacts], Iterable[str | None]]


def group_indices(facts: Sequence[ConversationFacts], keys: Keys) -> dict[str | None, list[int]]:
    """Positions in `facts` of each group's members; a conversation may be in several
    groups (tags) or none."""
    groups: dict[str | None, list[int]] = {}
    for i, f in enumerate(facts):
        for key in keys(f):
            members = groups.get(key)
            if members is None:
                groups[key] = [i]
            else:
                members.append(i)
    return groups


def summarize_groups(
    facts: Sequence[ConversationFacts],
    keys: Keys,
    *,
    as_of: int,
    business: Sequence[Durations] | None = None,
    partition: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The overall summary and one per group (biggest first, then by key; None last).

    `partition`: every conversation is in exactly one group (channel, queue, agent), so
    the overall summary is merged from the groups' instead of computed again.
    """
    tallies: dict[str | None, _Tally] = {}
    for key, members in group_indices(facts, keys).items():
        sub = [facts[i] for i in members]
        sub_business = None if business is None else [business[i] for i in members]
        tallies[key] = _Tally.of(sub, as_of, sub_business)
    if partition:
        overall = _Tally.merged(list(tallies.values()), business is not None)
    else:
        overall = _Tally.of(facts, as_of, business)
    groups = [{"key": key, **tally.report()} for key, tally in tallies.items()]
    groups.sort(key=lambda g: (-g["conversations"], g["key"] is None, g["key"] or ""))
    return overall.report(), groups


def arrival_slices(
    facts: Sequence[ConversationFacts], starts: Sequence[int], end: int
) -> list[slice]:
    """For facts sorted by arrival: the slice of each bucket [starts[i], starts[i+1] or end)."""
    arrivals = [f.arrived for f in facts]
    bounds = [bisect_left(arrivals, s) for s in starts] + [bisect_left(arrivals, end)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def count_between(times: Sequence[int], lo: int, hi: int) -> int:
    """How many of the sorted `times` lie in [lo, hi)."""
    return bisect_left(times, hi) - bisect_left(times, lo)
