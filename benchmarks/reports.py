"""Reports over a SQLite store holding 1,000,000 events: every report must answer in < 1 s.

    python benchmarks/reports.py [--quick] [--events 1000000] [--rounds 5]
                                 [--catch-up 10000] [--db FILE] [--keep]

(`--db FILE` fills FILE once and reuses it on later runs; without it a temporary file is
filled and deleted.)

How the store is filled, and why not through the store's API: 1,000,000 events through
`record_inbound`/`append` (one SAVEPOINT each, group-committed) take many minutes on a
2-core machine, and the fill is not what is measured. So the script opens the store once
with `SqliteStore.start()` (which creates the real schema by its migrations), closes it,
and then writes rows in exactly that schema with `executemany` in large transactions:
customers, conversations, events. The rows are what the store itself would have written
for the same story (the ids are minted by hub.ids in time order, so id order is commit
order; event data has the shapes the channels and the router write: STATUS {"from","to"},
ASSIGNMENT {"from","to","queue"}, CALL {"call_sid","status",...}); tests/reports checks
the reports against data written through the real store API.

Each conversation follows a script with random times: a contact on one of four channels
(web chat, SMS, email with HTML bodies, voice), queued and then assigned by the router,
an agent's reply, a few more customer/agent turns, notes, sometimes pending, mostly
resolved, sometimes reopened; web chats are sometimes abandoned; calls are answered or
missed (then a voicemail and a call-back by SMS); a few are still waiting in their queue.

Measured, all in one process on the same file:
- start-up: the report source folds the whole timeline into its digest (what
  hub.reports.api.install starts in the background), then counts business-hours
  durations of every conversation for one business-hours definition;
- each report the API serves (median of `--rounds` runs, wall time and the report
  thread's own CPU time; JSON reports include encoding the JSON): summaries over the
  whole 90 days grouped four ways, in business hours, filtered, over one week; time
  series per hour and per day; both CSV exports; the live queue view;
- a summary right after new events were committed (`--catch-up` of them in all, spread
  over the rounds): the digest folds only what is new before answering.
Baseline, same run, same file: `SELECT count(*), avg(created_at) FROM events`, one plain
pass over the table. Target: every report under 1 s. Exit 1 if one is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine_note, print_table  # noqa: E402
from hub.config import WEEKDAYS, BusinessHours  # noqa: E402
from hub.ids import IdGenerator  # noqa: E402
from hub.reports.metrics import to_us  # noqa: E402
from hub.reports.source import Period, SqliteReportSource  # noqa: E402

# The story's clock: 90 days ending on a Sunday, across the US spring DST change.
END = datetime(2025, 3, 31, tzinfo=UTC)
DAYS = 90
START = END - timedelta(days=DAYS)
US = 1_000_000

CHANNELS = (  # name, type, share of contacts
    ("web", "webchat", 0.35),
    ("sms", "sms", 0.25),
    ("email", "email", 0.30),
    ("phone", "voice", 0.10),
)
QUEUES = ("general", "billing", "tech")
AGENTS = tuple(f"agent{n:02d}" for n in range(1, 21))
TAGS = ("vip", "refund", "bug", "billing", "new")
# Hour-of-day weights (UTC): busy afternoons, quiet nights.
HOUR_WEIGHTS = tuple(1 + 6 * math.exp(-(((h - 15) / 4) ** 2)) for h in range(24))
TEXTS = (
    "Hello, I need help with my order",
    "Thanks, that works for me.",
    "Could you check the status of my refund please? It has been two weeks.",
    "The app crashes when I open the settings page on my phone.",
    "Is there a discount for annual plans?",
)
REPLIES = (
    "Thanks for reaching out! Let me check that for you.",
    "I have refunded the order; you will see it in 3-5 business days.",
    "Could you send a screenshot of the error?",
    "Happy to help. Anything else?",
)
EMAIL_HTML = (
    "<div><p>Hello team,</p><p>" + "I am writing about my last invoice. " * 8 + "</p>"
    "<p>Best regards,<br>A customer</p><blockquote>"
    + "Earlier message quoted. " * 6
    + "</blockquote></div>"
)

EVENT_SQL = (
    "INSERT INTO events (id, customer_id, conversation_id, channel, channel_type, direction, "
    "kind, author, created_at, text, html, attachments, external_id, delivery_state, "
    "delivery_error, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
CONVERSATION_SQL = (
    "INSERT INTO conversations (id, customer_id, status, channel, created_at, "
    "last_activity_at, assignee, queue, priority, tags, first_response_at, resolved_at, "
    "snoozed_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


# --- the story --------------------------------------------------------------------------


@dataclass
class Conv:
    id: str
    customer_id: str
    channel: str
    channel_type: str
    arrival: int
    queue: str
    agent: str | None = None
    status: str = "open"
    tags: tuple[str, ...] = ()
    first_response_at: int | None = None
    resolved_at: int | None = None
    last_activity_at: int = 0
    # (time, direction, kind, author, channel, channel_type, text, html, delivery, data)
    events: list[tuple[Any, ...]] = field(default_factory=list)


class Story:
    """Writes one conversation's events with a random but plausible course."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.calls = 0

    def expo(self, mean_seconds: float) -> int:
        return int(self.rng.expovariate(1 / mean_seconds) * US) + US

    def add(self, conv: Conv, at: int, direction: str, kind: str, author: str, **kw: Any) -> None:
        channel = kw.get("channel", "")
        conv.events.append(
            (
                at,
                direction,
                kind,
                author,
                channel,
                kw.get("channel_type"),
                kw.get("text", ""),
                kw.get("html"),
                kw.get("delivery"),
                kw.get("data"),
            )
        )
        if kind in ("message", "note", "call", "voicemail"):
            conv.last_activity_at = max(conv.last_activity_at, at)

    def contact(self, conv: Conv, at: int) -> None:
        html = EMAIL_HTML if conv.channel_type == "email" else None
        self.add(
            conv,
            at,
            "in",
            "message",
            "customer",
            channel=conv.channel,
            channel_type=conv.channel_type,
            text=self.rng.choice(TEXTS),
            html=html,
        )

    def reply(self, conv: Conv, at: int, channel: str | None = None) -> None:
        agent = conv.agent or self.rng.choice(AGENTS)
        self.add(
            conv,
            at,
            "out",
            "message",
            f"agent:{agent}",
            channel=channel or conv.channel,
            channel_type="sms" if channel == "sms" else conv.channel_type,
            text=self.rng.choice(REPLIES),
            delivery="delivered",
        )
        if conv.first_response_at is None:
            conv.first_response_at = at

    def status(self, conv: Conv, at: int, to: str, author: str) -> None:
        self.add(conv, at, "internal", "status", author, data={"from": conv.status, "to": to})
        conv.status = to
        conv.resolved_at = at if to == "resolved" else None

    def assign(self, conv: Conv, at: int, agent: str | None) -> None:
        data = {"from": conv.agent, "to": agent, "queue": conv.queue}
        self.add(conv, at, "internal", "assignment", "system", data=data)
        conv.agent = agent

    def call(self, conv: Conv, at: int) -> int:
        """An incoming call: answered (a response) or missed (voicemail, call-back)."""
        self.calls += 1
        sid = f"CA{self.calls:032x}"
        base = {"channel": conv.channel, "channel_type": "voice"}
        ring = {"call_sid": sid, "status": "ringing", "from": "+14155550100", "to": "+1415"}
        self.add(conv, at, "in", "call", "customer", text="Incoming call", data=ring, **base)
        self.assign(conv, at + 50_000, None)
        t = at + self.expo(25)
        if self.rng.random() < 0.7:
            agent = self.rng.choice(AGENTS)
            self.assign(conv, t, agent)
            duration = int(self.rng.expovariate(1 / 240)) + 10
            answered = {"call_sid": sid, "status": "answered", "agent": agent, "duration": duration}
            self.add(
                conv, t + 1000, "in", "call", "customer", text="Answered", data=answered, **base
            )
            t += duration * US
            done = {"call_sid": sid, "status": "completed", "duration": duration}
            self.add(conv, t, "in", "call", "customer", text="Call ended", data=done, **base)
            return t
        missed = {"call_sid": sid, "status": "missed", "reason": "no-answer", "agent": None}
        self.add(conv, t, "in", "call", "customer", text="Missed call", data=missed, **base)
        t += self.expo(20)
        vm = {"call_sid": sid, "recording_sid": f"RE{self.calls:032x}", "duration": 20}
        self.add(conv, t, "in", "voicemail", "customer", text="Voicemail (20 s)", data=vm, **base)
        t += self.expo(30)
        done = {"call_sid": sid, "status": "completed", "duration": 45}
        self.add(conv, t, "in", "call", "customer", text="Call ended", data=done, **base)
        t += self.expo(60)
        self.assign(conv, t, self.rng.choice(AGENTS))
        t += self.expo(900)
        self.reply(conv, t, channel="sms")
        return t

    def play(self, conv: Conv) -> None:
        rng = self.rng
        t = conv.arrival
        conv.tags = tuple(rng.sample(TAGS, rng.choice((0, 0, 1, 1, 2))))
        if conv.channel_type == "voice":
            t = self.call(conv, t)
        else:
            self.contact(conv, t)
            self.assign(conv, t + 50_000, None)  # the router queues it
            if rng.random() < 0.003:
                return  # still waiting for an agent (the live queue view has something)
            if conv.channel_type == "webchat" and rng.random() < 0.08:
                # Abandoned: the visitor leaves; an agent closes it much later.
                self.status(conv, t + self.expo(4 * 3600), "resolved", f"agent:{AGENTS[0]}")
                return
            t += self.expo(120 if conv.channel_type == "webchat" else 1800)
            self.assign(conv, t, rng.choice(AGENTS))
            t += self.expo(60 if conv.channel_type == "webchat" else 900)
            self.reply(conv, t)
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
            t += self.expo(600)
            self.contact(conv, t)
            if rng.random() < 0.3:
                self.contact(conv, t + self.expo(30))
                t += 60 * US
            t += self.expo(300)
            self.reply(conv, t)
        if rng.random() < 0.25:
            t += self.expo(60)
            agent = conv.agent or AGENTS[0]
            self.add(conv, t, "internal", "note", f"agent:{agent}", text="Checked the account.")
        if rng.random() < 0.15:
            t += self.expo(60)
            self.status(conv, t, "pending", f"agent:{conv.agent}")
            t += self.expo(3600)
            self.status(conv, t, "open", "system")
            self.contact(conv, t)
            t += self.expo(600)
            self.reply(conv, t)
        if rng.random() < 0.88:
            t += self.expo(1800)
            self.status(conv, t, "resolved", f"agent:{conv.agent}")
            if rng.random() < 0.06:
                t += self.expo(86400)
                self.status(conv, t, "open", "system")
                self.contact(conv, t)
                t += self.expo(900)
                self.reply(conv, t)
                t += self.expo(900)
                self.status(conv, t, "resolved", f"agent:{conv.agent}")


def _arrival(rng: random.Random) -> int:
    day = rng.randrange(DAYS)
    hour = rng.choices(range(24), HOUR_WEIGHTS)[0]
    at = START + timedelta(days=day, hours=hour, seconds=rng.randrange(3600))
    return int(at.timestamp()) * US + rng.randrange(US)


# --- filling the store --------------------------------------------------------------------


def create_schema(path: Path) -> None:
    """The store's own schema, by the store's own migrations."""
    import asyncio

    from hub.timeline.sqlite import SqliteStore

    async def run() -> None:
        store = SqliteStore(path)
        await store.start()
        await store.close()

    asyncio.run(run())


def stories(target_events: int, seed: int) -> Iterator[Conv]:
    rng = random.Random(seed)
    story = Story(rng)
    ids = IdGenerator()
    customers: list[str] = []
    made = 0
    weights = [share for _, _, share in CHANNELS]
    while made < target_events:
        arrival = _arrival(rng)
        if customers and rng.random() < 0.4:
            customer_id = rng.choice(customers)  # a returning customer
        else:
            customer_id = ids.new(arrival // 1000)
            customers.append(customer_id)
        name, ctype, _ = rng.choices(CHANNELS, weights)[0]
        conv = Conv(
            id=ids.new(arrival // 1000),
            customer_id=customer_id,
            channel=name,
            channel_type=ctype,
            arrival=arrival,
            queue=rng.choice(QUEUES),
            last_activity_at=arrival,
        )
        story.play(conv)
        made += len(conv.events)
        yield conv


def fill(path: Path, target_events: int, seed: int = 7) -> tuple[int, int]:
    """Write about `target_events` events (whole conversations); returns (events, convs)."""
    create_schema(path)
    convs = list(stories(target_events, seed))
    # One customer may hold several conversations over the 90 days, but at most one
    # active (the store's rule): only the last one of a customer may stay unresolved.
    last_of: dict[str, Conv] = {}
    for conv in sorted(convs, key=lambda c: c.arrival):
        previous = last_of.get(conv.customer_id)
        if previous is not None and previous.status != "resolved":
            previous.status = "resolved"
            previous.resolved_at = previous.last_activity_at
            data = {"from": "open", "to": "resolved"}
            previous.events.append(
                (
                    previous.last_activity_at + 1,
                    "internal",
                    "status",
                    "system",
                    "",
                    None,
                    "",
                    None,
                    None,
                    data,
                )
            )
        last_of[conv.customer_id] = conv
    rows: list[tuple[Any, ...]] = []
    for conv in convs:
        for ev in conv.events:
            rows.append((ev[0], conv, ev))
    rows.sort(key=lambda r: r[0])
    ids = IdGenerator()
    external = 0
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    customer_ids = {c.customer_id: c.arrival for c in sorted(convs, key=lambda c: -c.arrival)}
    conn.executemany(
        "INSERT INTO customers (id, display_name, tags, created_at) VALUES (?, ?, '[]', ?)",
        [(cid, f"Customer {i}", at) for i, (cid, at) in enumerate(customer_ids.items())],
    )
    conn.executemany(
        CONVERSATION_SQL,
        [
            (
                c.id,
                c.customer_id,
                c.status,
                c.channel,
                c.arrival,
                c.last_activity_at,
                c.agent,
                c.queue,
                0,
                json.dumps(list(c.tags)),
                c.first_response_at,
                c.resolved_at,
                None,
            )
            for c in convs
        ],
    )

    def event_rows() -> Iterator[tuple[Any, ...]]:
        nonlocal external
        for at, conv, ev in rows:
            _, direction, kind, author, channel, ctype, text, html, delivery, data = ev
            ext = None
            if kind in ("message", "call", "voicemail") and channel:
                external += 1
                ext = f"x{external}"
            yield (
                ids.new(at // 1000),
                conv.customer_id,
                conv.id,
                channel,
                ctype,
                direction,
                kind,
                author,
                at,
                text,
                html,
                None,
                ext,
                delivery,
                None,
                json.dumps(data, separators=(",", ":")) if data else None,
            )

    conn.executemany(EVENT_SQL, event_rows())
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return len(rows), len(convs)


# --- measuring ----------------------------------------------------------------------------


def office_hours() -> BusinessHours:
    """Mon-Fri 09:00-17:00 in New York, with two holidays inside the 90 days."""
    nine_to_five = ((dtime(9), dtime(17)),)
    weekly = {d: nine_to_five if d not in ("sat", "sun") else () for d in WEEKDAYS}
    holidays = (date(2025, 1, 20), date(2025, 2, 17))
    return BusinessHours(
        name="office", timezone="America/New_York", weekly=weekly, holidays=holidays
    )


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # the report thread's own CPU time


async def measure(
    source: SqliteReportSource, period: Period, fn: Callable[[Any], Any], rounds: int
) -> tuple[Timing, Any]:
    timing = Timing()
    result: Any = None

    def timed(view: Any) -> Any:
        t0 = time.thread_time()
        out = fn(view)
        timing.cpu.append(time.thread_time() - t0)
        return out

    for _ in range(rounds):
        t0 = time.perf_counter()
        result = await source.report(period, timed)
        timing.wall.append(time.perf_counter() - t0)
    return timing, result


def anon_kib() -> int:
    """This process's anonymous resident memory (heap), KiB. Not VmRSS: the report
    source maps the database file, and those pages are the OS's file cache."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def median_seconds(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # warm the page cache
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def baseline_seconds(path: Path, rounds: int) -> float:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.execute("PRAGMA mmap_size = 1073741824")
    sql = "SELECT count(*), avg(created_at) FROM events"
    return median_seconds(lambda: conn.execute(sql).fetchall(), rounds)


def append_events(path: Path, n: int, seed: int = 11) -> None:
    """n more events in new conversations, committed after the digest was built."""
    rng = random.Random(seed)
    story = Story(rng)
    ids = IdGenerator()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    made = 0
    while made < n:
        arrival = int((END - timedelta(hours=1)).timestamp()) * US + rng.randrange(3_000 * US)
        customer_id = ids.new(arrival // 1000)
        conv = Conv(ids.new(arrival // 1000), customer_id, "web", "webchat", arrival, "general")
        story.play(conv)
        conv.status = "resolved"  # keeps the one-active-conversation index happy
        conn.execute(
            "INSERT INTO customers (id, display_name, tags, created_at) VALUES (?, ?, '[]', ?)",
            (customer_id, "late", arrival),
        )
        conn.execute(
            CONVERSATION_SQL,
            (
                conv.id,
                customer_id,
                "resolved",
                "web",
                arrival,
                conv.last_activity_at,
                conv.agent,
                conv.queue,
                0,
                "[]",
                conv.first_response_at,
                conv.resolved_at,
                None,
            ),
        )
        for ev in conv.events:
            at, direction, kind, author, channel, ctype, text, html, delivery, data = ev
            conn.execute(
                EVENT_SQL,
                (
                    ids.new(max(at // 1000, int(time.time() * 1000) + 10**6)),
                    customer_id,
                    conv.id,
                    channel,
                    ctype,
                    direction,
                    kind,
                    author,
                    at,
                    text,
                    html,
                    None,
                    None,
                    delivery,
                    None,
                    json.dumps(data) if data else None,
                ),
            )
        made += len(conv.events)
    conn.execute("COMMIT")
    conn.close()


async def run(path: Path, rounds: int, catch_up: int) -> list[list[str]]:
    from hub.reports.api import (
        Query,
        csv_report,
        summary_report,
        timeseries_report,
    )

    source = SqliteReportSource(path)
    await source.start()
    rows: list[list[str]] = []
    try:
        # Start-up, as hub.reports.api.install does it in the background: fold the whole
        # timeline, then count open time of every conversation for each business hours.
        hours = office_hours()
        rss_before = anon_kib()
        t0 = time.perf_counter()
        await source.warm()
        cold = time.perf_counter() - t0
        rss_digest = anon_kib()
        t0 = time.perf_counter()
        await source.warm([hours])
        cold_hours = time.perf_counter() - t0
        rss_hours = anon_kib()
        n_convs = await source.report(Period(0, 2**62), lambda v: len(v.facts()))
        print(f"start-up, in the background: folded the timeline ({n_convs:,} conversations)")
        print(f"  in {cold:.2f} s, then business-hours durations in {cold_hours:.2f} s")
        print(
            f"  memory (anonymous RSS growth): digest {(rss_digest - rss_before) / 1024:.0f} MiB "
            f"({(rss_digest - rss_before) * 1024 / n_convs:.0f} bytes per conversation), "
            f"business-hours durations {(rss_hours - rss_digest) / 1024:.0f} MiB"
        )
        utc, ny = ZoneInfo("UTC"), ZoneInfo("America/New_York")
        full = Period(to_us(START), to_us(END))
        week = Period(to_us(END - timedelta(days=7)), to_us(END))
        as_of = to_us(END)
        q_full = Query(period=full, tz=ny, as_of=as_of)
        q_week = Query(period=week, tz=ny, as_of=as_of)
        q_hours = Query(period=full, tz=ny, hours=hours, as_of=as_of)
        q_agent = Query(period=full, tz=utc, agent="agent07", as_of=as_of)

        def summary(q: Query, by: str) -> Callable[[Any], Any]:
            # The API answers JSON: encoding it is part of the report's cost.
            return lambda view: json.dumps(summary_report(view, q, by))

        def series(q: Query, metric: str, interval: str) -> Callable[[Any], Any]:
            return lambda view: json.dumps(timeseries_report(view, q, metric, interval))

        def table(q: Query, group: str) -> Callable[[Any], Any]:
            return lambda view: csv_report(view, q, group)

        cases: list[tuple[str, Period, Callable[[Any], Any]]] = [
            ("summary by channel, 90 days", full, summary(q_full, "channel")),
            ("summary by queue, 90 days", full, summary(q_full, "queue")),
            ("summary by agent, 90 days", full, summary(q_full, "agent")),
            ("summary by tag, 90 days", full, summary(q_full, "tag")),
            ("summary in business hours, 90 days", full, summary(q_hours, "channel")),
            ("summary of one agent, 90 days", full, summary(q_agent, "channel")),
            ("summary by channel, 7 days", week, summary(q_week, "channel")),
            ("conversations per day, 90 days", full, series(q_full, "conversations", "day")),
            ("first response per hour, 90 days", full, series(q_full, "first_response", "hour")),
            ("resolution per day in business hours", full, series(q_hours, "resolution", "day")),
            ("volume in per hour, 90 days", full, series(q_full, "volume_in", "hour")),
            ("missed calls per day, 90 days", full, series(q_full, "missed_calls", "day")),
            ("CSV, a row per conversation, 90 days", full, table(q_full, "conversation")),
            ("CSV by agent, 90 days", full, table(q_full, "agent")),
        ]
        for label, period, fn in cases:
            timing, _ = await measure(source, period, fn, rounds)
            rows.append(_row(label, timing))
        t0 = time.perf_counter()
        waiting = await source.waiting()
        rows.append(
            _row(f"live queues ({len(waiting)} waiting)", Timing([time.perf_counter() - t0], []))
        )
        if catch_up:
            # Each round commits catch_up / rounds new events, then asks for a summary:
            # the digest folds just those before answering.
            each = max(catch_up // rounds, 1)
            timing = Timing()
            for i in range(rounds):
                append_events(path, each, seed=11 + i)
                one, _ = await measure(source, full, summary(q_full, "channel"), 1)
                timing.wall += one.wall
                timing.cpu += one.cpu
            rows.append(_row(f"summary right after {each:,} new events (catch-up)", timing))
    finally:
        await source.close()
    return rows


def _row(label: str, timing: Timing) -> list[str]:
    wall = statistics.median(timing.wall)
    cpu = f"{statistics.median(timing.cpu) * 1000:.0f}" if timing.cpu else "-"
    return [label, f"{wall * 1000:.0f}", cpu, "yes" if wall < 1.0 else "NO"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--catch-up", type=int, default=10_000, help="events added at the end")
    parser.add_argument("--db", type=Path, help="reuse (or create) this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary file")
    parser.add_argument("--quick", action="store_true", help="smoke: 20,000 events, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.catch_up = 20_000, 1, 500
    tmp = None
    if args.db is None:
        tmp = tempfile.mkdtemp(prefix="hub-reports-bench-")
        path = Path(tmp) / "hub.db"
    else:
        path = args.db
    try:
        if not path.exists():
            t0 = time.perf_counter()
            n_events, n_convs = fill(path, args.events)
            print(
                f"filled {path}: {n_events:,} events, {n_convs:,} conversations "
                f"in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            # Measure in a fresh process: this one's heap is full of the fill's freed
            # objects, which would hide the digest's memory and skew the timings.
            argv = [sys.executable, __file__, "--db", str(path), "--rounds", str(args.rounds)]
            return subprocess.run([*argv, "--catch-up", str(args.catch_up)], check=False).returncode
        total = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()[0]
        print(f"{machine_note()}; SQLite {sqlite3.sqlite_version}; {total:,} events")
        base = baseline_seconds(path, args.rounds)
        load_before = os.getloadavg()[0]
        rows = asyncio.run(run(path, args.rounds, args.catch_up))
        load_after = os.getloadavg()[0]
        # A shared machine: the other tenants' load moves wall time, not CPU time.
        print(f"load average (1 min) before {load_before:.1f}, after {load_after:.1f}")
        print()
        baseline = "baseline: SELECT count(*), avg(created_at) FROM events"
        print_table(
            ["report", "median ms", "CPU ms", "< 1 s"],
            [[baseline, f"{base * 1000:.0f}", "-", "-"], *rows],
        )
        slow = [r for r in rows if r[3] == "NO"]
        return 1 if slow else 0
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
