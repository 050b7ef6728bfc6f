"""Where reports get their data: a digest of the timeline, kept current, per period.

Computing a report straight from the events of a big store is too slow: on 1,000,000
events, ordering a period's events by conversation and walking each one's turns in SQL
(window functions) takes seconds, mostly in random reads of the events table
(benchmarks/reports.py printed the figures that led here). So both sources fold events
into a `Digest` once, in id (commit) order, through hub.reports.metrics.FactsBuilder, and
answer every report from it:

- per conversation: its ConversationFacts, indexed by arrival time;
- per (channel, direction): the sorted times of contacts in and messages out;
- per inbound call: whether it was answered or missed.

The digest is derived data, never a record: it can always be rebuilt from the timeline,
and reports for any period are recomputed from it.

`SqliteReportSource` reads the store's file through its own read-only connection on its
own thread, which also owns the digest. The first report folds the whole timeline (a few
seconds at 1,000,000 events; `install` starts this in the background at start-up), and
each report after that first folds only the events committed since the last one: store
ids grow in commit order, so "id > the last one folded" misses nothing. A conversation's
agent and queue come from its ASSIGNMENT events like everything else; its tags, which
change without an event, are read from the conversations table by the reports that
group or filter by tag. Memory: about 1.4 KiB per conversation (see the benchmark).

`StoreReportSource` works over any TimelineStore (Redis) through the store contract,
which has no "all events since" read: each report re-reads every conversation active
since the period's start, page by page, and folds a fresh digest. Correct, and slow on a
big store (one round trip per page of every such conversation); the SQLite backend is the
one for large report volumes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from array import array
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from hub.config import BusinessHours
from hub.model import ConversationQuery, ConversationStatus, Direction, Event, EventKind
from hub.reports.metrics import (
    ASSIGNMENT_FLAG,
    MARK_MASK,
    OUT_FLAG,
    BusinessClock,
    CallFacts,
    ConversationFacts,
    Durations,
    FactsBuilder,
    Mark,
    business_span,
    code,
    data_fields,
    to_us,
)
from hub.timeline.store import StoreUnavailable, TimelineStore

T = TypeVar("T")

# Kinds of events any report looks at; notes, voicemails, deliveries and merges are not.
FED_KINDS = (EventKind.MESSAGE, EventKind.CALL, EventKind.ASSIGNMENT, EventKind.STATUS)
# Rows folded per fetch, so a long catch-up does not hold the whole result in memory.
FETCH_ROWS = 20_000
PAGE = 200

# What the digest folds, one row per event that matters, in id order:
# (conversation id, created_at us, code, channel, channel type, p, q) where
# code = metrics.code(...), and (p, q) is (call sid, call status) for inbound CALL events,
# (to, queue) for ASSIGNMENT events, else (None, None).
Row = tuple[str | None, int, int, str | None, str | None, Any, Any]


@dataclass(frozen=True, slots=True)
class Period:
    """[start, end) in microseconds, UTC."""

    start: int
    end: int


# A conversation's tags are not on its timeline (changing them records no event): they
# are read as they are now, per report, and only by reports that group or filter by tag.
Tags = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Waiting:
    """An open, unassigned conversation: waiting for an agent since `since` (us)."""

    conversation_id: str
    queue: str | None
    priority: int
    since: int


def event_row(event: Event) -> Row | None:
    """The Row of one event, or None for an event no report looks at."""
    if event.kind not in FED_KINDS:
        return None
    a, b = data_fields(event.kind, event.data)
    code_ = code(event.kind, event.direction, event.author, a, b)
    p = q = None
    if event.kind == EventKind.CALL and event.direction == Direction.IN:
        p, q = b, a  # call sid, status
    elif event.kind == EventKind.ASSIGNMENT:
        p, q = a, event.data.get("queue")  # to, queue
    if not code_ and p is None:
        return None
    return (
        event.conversation_id,
        to_us(event.created_at),
        code_,
        event.channel,
        event.channel_type.value if event.channel_type else None,
        p,
        q,
    )


class Digest:
    """The timeline folded for reports; see the module docstring. Not thread-safe: each
    source touches its digest from one thread only."""

    def __init__(self) -> None:
        self.watermark = ""  # the newest event id folded (SQLite source)
        self._builders: dict[str, FactsBuilder] = {}
        self._touched: set[str] = set()
        self._facts: dict[str, ConversationFacts] = {}
        self._arrivals: list[tuple[int, str]] = []  # (arrived, conversation id), sorted
        self._times: dict[str, tuple[array[int], array[int]]] = {}  # channel -> (in, out)
        self._calls: dict[str, CallFacts] = {}
        self._call_starts: list[tuple[int, str]] = []  # (started, call sid), sorted
        self._cached: tuple[int, int, list[ConversationFacts]] | None = None
        self._names: dict[Any, Any] = {}
        self._clocks: dict[str, BusinessClock] = {}
        self._business: dict[str, dict[str, tuple[ConversationFacts, Durations]]] = {}

    def add(self, rows: Iterable[Row]) -> None:
        """Fold rows given in id order. The hot loop of a cold start: keep it lean."""
        builders, times, calls, touched = self._builders, self._times, self._calls, self._touched
        known = self._facts
        # Every row brings new string objects; the few distinct channel, agent and queue
        # names are kept once each, or 100,000s of facts would each hold their own copy.
        names = self._names
        for cid, at, code_, channel, ctype, p, q in rows:
            channel = names.setdefault(channel, channel)
            ctype = names.setdefault(ctype, ctype)
            mark = code_ & MARK_MASK
            if code_ & OUT_FLAG or mark == Mark.CONTACT:
                pair = times.get(channel or "")
                if pair is None:
                    pair = times[channel or ""] = (array("q"), array("q"))
                column = pair[1] if code_ & OUT_FLAG else pair[0]
                if not column or column[-1] <= at:
                    column.append(at)
                else:  # dated earlier than one already folded (a provider's own time)
                    insort(column, at)
            assignment = code_ & ASSIGNMENT_FLAG
            if p is not None and not assignment:  # an inbound call: (sid, status)
                call = calls.get(p)
                if call is None:
                    call = calls[p] = CallFacts(at, channel or "")
                    _insert_sorted(self._call_starts, (at, p))
                call.add(q)
            if cid is None or not (mark or assignment):
                continue
            builder = builders.get(cid)
            if builder is None:
                earlier = known.get(cid)
                if earlier is not None:
                    builder = FactsBuilder.resume(earlier)
                elif mark != Mark.CONTACT and not assignment:
                    continue  # the builder would ignore it: nothing counts before arrival
                else:
                    builder = FactsBuilder(cid)
                builders[cid] = builder
            if assignment:
                builder.assign(names.setdefault(p, p), names.setdefault(q, q))
            builder.add(at, mark, channel or "", ctype)
            touched.add(cid)

    def _settle(self) -> None:
        """Turn the builders fed since the last read into facts, and drop them: facts
        take less memory, and a builder is resumed from them when more events come."""
        arrived: list[tuple[int, str]] = []
        known = self._facts
        for cid in self._touched:
            facts = self._builders[cid].facts()
            if facts is None:
                continue  # no contact yet: the builder stays to remember its assignments
            del self._builders[cid]
            if cid not in known:
                arrived.append((facts.arrived, cid))
            known[cid] = facts
        if self._touched:
            self._cached = None
        self._touched.clear()
        if arrived:
            arrived.sort()
            arrivals = self._arrivals
            late = bool(arrivals) and arrived[0] < arrivals[-1]
            arrivals.extend(arrived)
            if late:  # two sorted runs: Timsort merges them in linear time
                arrivals.sort()

    @property
    def conversations(self) -> int:
        self._settle()
        return len(self._facts)

    def facts(self, period: Period) -> list[ConversationFacts]:
        """Conversations that arrived in the period, oldest arrival first."""
        self._settle()
        lo = bisect_left(self._arrivals, (period.start,))
        hi = bisect_left(self._arrivals, (period.end,))
        # The same period asked again with nothing new folded (a page's several reports).
        if self._cached is not None and self._cached[:2] == (lo, hi):
            return list(self._cached[2])
        facts = self._facts
        found = [facts[cid] for _, cid in self._arrivals[lo:hi]]
        self._cached = (lo, hi, found)
        return list(found)

    def calls(self, period: Period) -> list[CallFacts]:
        """Inbound calls whose first event lies in the period."""
        lo = bisect_left(self._call_starts, (period.start,))
        hi = bisect_left(self._call_starts, (period.end,))
        return [self._calls[sid] for _, sid in self._call_starts[lo:hi]]

    def times(self) -> Mapping[str, tuple[Sequence[int], Sequence[int]]]:
        """channel -> (sorted times of contacts in, sorted times of messages out)."""
        return self._times

    def business(self, facts: Sequence[ConversationFacts], hours: BusinessHours) -> list[Durations]:
        """Each conversation's durations in business hours, aligned with `facts`.

        Remembered per conversation until its facts change: counting open time is the
        costly part of a business-hours report, and most conversations are finished.
        """
        clock = self._clocks.get(hours.name)
        if clock is None or clock.hours != hours:
            start = facts[0].arrived if facts else 0
            clock = self._clocks[hours.name] = BusinessClock(hours, start, start)
            self._business[hours.name] = {}
        memo = self._business[hours.name]
        span = business_span(clock)
        out = []
        for f in facts:
            hit = memo.get(f.conversation_id)
            if hit is None or hit[0] is not f:
                hit = memo[f.conversation_id] = (f, f.durations(span))
            out.append(hit[1])
        return out


def _insert_sorted(items: list[tuple[int, str]], item: tuple[int, str]) -> None:
    if not items or items[-1] <= item:
        items.append(item)
    else:
        insort(items, item)


class PeriodView:
    """What a report function gets: the digest, and the period's conversations' tags,
    read only if the report asks for them."""

    def __init__(
        self,
        period: Period,
        digest: Digest,
        load_tags: Callable[[], Tags],
    ) -> None:
        self.period = period
        self.digest = digest
        self._load_tags = load_tags
        self._facts: list[ConversationFacts] | None = None
        self._tags: Tags | None = None

    def facts(self) -> list[ConversationFacts]:
        """Conversations that arrived in the period, oldest arrival first."""
        if self._facts is None:
            self._facts = self.digest.facts(self.period)
        return self._facts

    @property
    def tags(self) -> Tags:
        """conversation id -> its tags now (untagged conversations may be missing)."""
        if self._tags is None:
            self._tags = self._load_tags()
        return self._tags


@runtime_checkable
class ReportSource(Protocol):
    async def start(self) -> None:
        """Open what the source reads; does not wait for the first fold."""

    async def close(self) -> None: ...

    async def warm(self, hours: Sequence[BusinessHours] = ()) -> None:
        """Bring the digest up to date now, and count open time of every conversation
        in each of `hours` (start-up calls this in the background)."""

    async def report(self, period: Period, fn: Callable[[PeriodView], T]) -> T:
        """Fold what is new, then run `fn` (off the event loop) over the period."""

    async def waiting(self) -> list[Waiting]:
        """Open, unassigned conversations now."""


# --- SQLite -----------------------------------------------------------------------------

# metrics.code() transcribed into SQL, so that 1,000,000 events are classified in C and
# only the rows that matter cross into Python. tests/reports/test_metrics.py checks it
# against the Python definition on every combination of its inputs.
CODE_SQL = f"""
CASE kind
  WHEN 'message' THEN
    CASE direction
      WHEN 'out' THEN CASE WHEN substr(author, 1, 6) = 'agent:' THEN {Mark.RESPONSE | OUT_FLAG}
                           ELSE {OUT_FLAG} END
      WHEN 'in' THEN CASE WHEN author = 'customer' THEN {Mark.CONTACT} ELSE 0 END
      ELSE 0 END
  WHEN 'call' THEN
    CASE json_extract(data, '$.status')
      WHEN 'answered' THEN {Mark.RESPONSE}
      WHEN 'ringing' THEN CASE WHEN direction = 'in' THEN {Mark.CONTACT} ELSE 0 END
      WHEN 'callback' THEN CASE WHEN direction = 'out' THEN {OUT_FLAG} ELSE 0 END
      ELSE 0 END
  WHEN 'assignment' THEN
    CASE WHEN json_extract(data, '$.to') IS NOT NULL THEN {Mark.ASSIGNED | ASSIGNMENT_FLAG}
         ELSE {ASSIGNMENT_FLAG} END
  WHEN 'status' THEN
    CASE WHEN json_extract(data, '$.to') = 'resolved' THEN {Mark.RESOLVED}
         WHEN json_extract(data, '$.from') = 'resolved' THEN {Mark.REOPENED}
         ELSE 0 END
  ELSE 0 END
"""

# Channel and type only where the fold uses them (contacts, outbound, calls): fewer
# Python strings made per row.
_FEED_SQL = f"""
SELECT conversation_id, created_at, code,
  CASE WHEN code = {Mark.CONTACT} OR code & {OUT_FLAG} OR kind = 'call' THEN channel END,
  CASE WHEN code = {Mark.CONTACT} THEN channel_type END,
  p, q
FROM (
  SELECT id, conversation_id, created_at, channel, channel_type, kind, {CODE_SQL} AS code,
    CASE WHEN kind = 'call' AND direction = 'in' THEN json_extract(data, '$.call_sid')
         WHEN kind = 'assignment' THEN json_extract(data, '$.to') END AS p,
    CASE WHEN kind = 'call' AND direction = 'in' THEN json_extract(data, '$.status')
         WHEN kind = 'assignment' THEN json_extract(data, '$.queue') END AS q
  FROM events
  WHERE id > ? AND id <= ? AND kind IN ({", ".join(f"'{k.value}'" for k in FED_KINDS)})
)
WHERE code != 0 OR p IS NOT NULL
ORDER BY id
"""

_TAGS_SQL = (
    "SELECT id, tags FROM conversations WHERE created_at >= ? AND created_at < ? AND tags != '[]'"
)

_WAITING_SQL = """
SELECT c.id, c.queue, c.priority, c.created_at,
  (SELECT MAX(e.created_at) FROM events e
   WHERE e.conversation_id = c.id AND e.kind IN ('status', 'assignment'))
FROM conversations c
WHERE c.status = 'open' AND c.assignee IS NULL
"""


@lru_cache(maxsize=4096)
def _tags(text: str) -> tuple[str, ...]:
    # Few distinct tag lists recur across many conversations: parse each once.
    return () if text == "[]" else tuple(json.loads(text))


class SqliteReportSource:
    """Reports over the SQLite store's file, through a read-only connection of its own."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._digest = Digest()
        self._conn: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._closing = False  # stops a long first fold at shutdown

    async def start(self) -> None:
        if self._thread is None:
            # One thread: it alone touches the connection and the digest.
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="hub-reports")

    async def close(self) -> None:
        self._closing = True
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.shutdown, True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            raise StoreUnavailable("the report source is not started")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
                )
                conn.execute("PRAGMA busy_timeout = 5000")
                # Reads are large and sequential; map the file instead of copying pages.
                conn.execute("PRAGMA mmap_size = 1073741824")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot read {self.path} for reports: {exc}") from exc
            self._conn = conn
        return self._conn

    def _refresh(self) -> None:
        conn = self._connection()
        digest = self._digest
        folding = False
        try:
            newest = conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or ""
            if newest <= digest.watermark:
                return
            # Ids grow in commit order: with `newest` visible, every smaller id is too, so
            # (watermark, newest] is complete whatever is committed meanwhile.
            cursor = conn.execute(_FEED_SQL, (digest.watermark, newest))
            folding = True
            while rows := cursor.fetchmany(FETCH_ROWS):
                if self._closing:
                    raise StoreUnavailable("the report source is closing")
                digest.add(rows)
        except BaseException as exc:
            # Part of the range is folded and the watermark cannot say which part: start
            # again from nothing next time rather than count anything twice.
            if folding:
                self._digest = Digest()
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"SQLite error while reading for reports: {exc}") from exc
            raise
        digest.watermark = newest

    def _tags(self, period: Period) -> Tags:
        # By created_at, which is the arrival: the store creates a conversation with its
        # first contact, at that contact's time. Untagged conversations are left out.
        try:
            rows = self._connection().execute(_TAGS_SQL, (period.start, period.end))
            return {cid: _tags(text) for cid, text in rows}
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite error while reading for reports: {exc}") from exc

    async def warm(self, hours: Sequence[BusinessHours] = ()) -> None:
        def job() -> None:
            self._refresh()
            everything = self._digest.facts(Period(0, 2**62))  # settles every builder
            for h in hours:
                self._digest.business(everything, h)

        await self._run(job)

    async def report(self, period: Period, fn: Callable[[PeriodView], T]) -> T:
        def job() -> T:
            self._refresh()
            return fn(PeriodView(period, self._digest, lambda: self._tags(period)))

        return await self._run(job)

    async def waiting(self) -> list[Waiting]:
        def job() -> list[Waiting]:
            try:
                rows = self._connection().execute(_WAITING_SQL).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite error while reading for reports: {exc}") from exc
            return [
                Waiting(cid, queue, priority, max(created, changed or created))
                for cid, queue, priority, created, changed in rows
            ]

        return await self._run(job)


# --- any TimelineStore ------------------------------------------------------------------


class StoreReportSource:
    """Reports over any TimelineStore via its contract; slow on big stores (see above)."""

    def __init__(self, store: TimelineStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def warm(self, hours: Sequence[BusinessHours] = ()) -> None:
        return None  # nothing is kept between reports

    async def _events(self, conversation_id: str) -> list[Event]:
        events: list[Event] = []
        cursor: str | None = None
        while True:
            page = await self.store.conversation_events(conversation_id, PAGE, cursor)
            events.extend(page.items)
            if page.next_cursor is None:
                return events
            cursor = page.next_cursor

    async def _last_change(self, conversation_id: str, since: int) -> int:
        """The time of the conversation's newest status or assignment event, if later."""
        cursor: str | None = None
        while True:
            page = await self.store.conversation_events(conversation_id, PAGE, cursor)
            for event in page.items:  # newest first
                if event.kind in (EventKind.STATUS, EventKind.ASSIGNMENT):
                    return max(since, to_us(event.created_at))
            if page.next_cursor is None:
                return since
            cursor = page.next_cursor

    async def report(self, period: Period, fn: Callable[[PeriodView], T]) -> T:
        tags: dict[str, tuple[str, ...]] = {}
        events: list[Event] = []
        cursor: str | None = None
        reached = True
        while reached:
            page = await self.store.list_conversations(ConversationQuery(), PAGE, cursor)
            for conv in page.items:
                # Most recent activity first: from here on nothing reaches the period.
                reached = to_us(conv.last_activity_at) >= period.start
                if not reached:
                    break
                tags[conv.id] = conv.tags
                events.extend(await self._events(conv.id))
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        events.sort(key=lambda e: e.id)
        digest = Digest()
        digest.add(row for e in events if (row := event_row(e)) is not None)
        return await asyncio.to_thread(fn, PeriodView(period, digest, lambda: tags))

    async def waiting(self) -> list[Waiting]:
        query = ConversationQuery(statuses=(ConversationStatus.OPEN,), unassigned=True)
        waiting: list[Waiting] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_conversations(query, PAGE, cursor)
            for conv in page.items:
                since = await self._last_change(conv.id, to_us(conv.created_at))
                waiting.append(Waiting(conv.id, conv.queue, conv.priority, since))
            if page.next_cursor is None:
                return waiting
            cursor = page.next_cursor


def source_for(store: TimelineStore) -> ReportSource:
    """The fast SQLite source when the store is the SQLite backend, else the generic one."""
    from hub.timeline.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return SqliteReportSource(store.path)
    return StoreReportSource(store)
