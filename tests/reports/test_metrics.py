"""Metric definitions on hand-built timelines whose answers are known.

Every expected figure here was worked out by hand from the timeline written next to it;
docs/reports.md states the definitions these follow.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from hub.config import WEEKDAYS, BusinessHours
from hub.ids import IdGenerator
from hub.model import CUSTOMER, SYSTEM, ChannelType, Direction, Event, EventKind
from hub.reports.metrics import (
    ABANDON_AFTER_US,
    US,
    BusinessClock,
    ConversationFacts,
    Mark,
    bucket_starts,
    business_seconds,
    calendar_span,
    code,
    conversation_facts,
    missed_calls,
    stats,
    summarize,
    summarize_groups,
    to_us,
)
from hub.reports.source import CODE_SQL, Digest, Period, event_row

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)  # a Monday
NY = "America/New_York"


class Timeline:
    """Events of one conversation, written in order with times as minutes after T0."""

    def __init__(self, conversation_id: str = "C1", channel: str = "web") -> None:
        self.conversation_id = conversation_id
        self.channel = channel
        self.channel_type = {"web": ChannelType.WEBCHAT, "phone": ChannelType.VOICE}.get(
            channel, ChannelType.SMS
        )
        self.events: list[Event] = []
        self._ids = IdGenerator()

    def add(
        self,
        minute: float,
        kind: EventKind,
        direction: Direction,
        author: str,
        data: Mapping[str, Any] | None = None,
        *,
        channel: bool = True,
    ) -> Timeline:
        at = T0 + timedelta(minutes=minute)
        self.events.append(
            Event(
                # Ids in writing order, whatever the times say (commit order).
                id=self._ids.new(int(T0.timestamp() * 1000) + len(self.events)),
                customer_id="U1",
                conversation_id=self.conversation_id,
                channel=self.channel if channel else "",
                channel_type=self.channel_type if channel else None,
                direction=direction,
                kind=kind,
                author=author,
                created_at=at,
                data=dict(data or {}),
            )
        )
        return self

    def customer(self, minute: float) -> Timeline:
        return self.add(minute, EventKind.MESSAGE, Direction.IN, CUSTOMER)

    def agent(self, minute: float, who: str = "alice") -> Timeline:
        return self.add(minute, EventKind.MESSAGE, Direction.OUT, f"agent:{who}")

    def auto_reply(self, minute: float) -> Timeline:
        return self.add(minute, EventKind.MESSAGE, Direction.OUT, SYSTEM, {"auto_reply": "x"})

    def note(self, minute: float) -> Timeline:
        return self.add(minute, EventKind.NOTE, Direction.INTERNAL, "agent:alice", channel=False)

    def assign(self, minute: float, to: str | None, queue: str | None = "general") -> Timeline:
        data = {"from": None, "to": to, "queue": queue}
        return self.add(
            minute, EventKind.ASSIGNMENT, Direction.INTERNAL, SYSTEM, data, channel=False
        )

    def status(self, minute: float, old: str, new: str, who: str = "agent:alice") -> Timeline:
        data = {"from": old, "to": new}
        return self.add(minute, EventKind.STATUS, Direction.INTERNAL, who, data, channel=False)

    def call(self, minute: float, sid: str, status: str, **extra: Any) -> Timeline:
        data = {"call_sid": sid, "status": status, **extra}
        return self.add(minute, EventKind.CALL, Direction.IN, CUSTOMER, data)

    def facts(self) -> ConversationFacts:
        facts = conversation_facts(self.events)
        assert facts is not None
        return facts


def minutes(value: float | None) -> float | None:
    return None if value is None else value / 60


# --- one conversation ---------------------------------------------------------------------


def worked_chat() -> Timeline:
    """A web chat with two more turns, a follow-up, a note, a resolution and a reopen."""
    return (
        Timeline()
        .customer(0)  # arrival; turn 1 starts
        .assign(0.05, None)  # the router queues it: not an assignment to an agent
        .assign(2, "alice")  # queue wait 2 min
        .agent(5)  # first response: 5 min
        .auto_reply(6)  # the hub's own message: no response
        .customer(10)  # turn 2 starts
        .customer(11)  # still turn 2
        .agent(14)  # next response: 14 - 10 = 4 min
        .agent(15)  # a follow-up: no turn waiting, ends nothing
        .note(20)
        .status(30, "open", "resolved")  # resolution 30 min; handle 30 - 2 = 28 min
        .status(40, "resolved", "open", SYSTEM)  # reopened
        .customer(40)  # turn 3
        .agent(45)  # next response: 5 min
        .status(50, "open", "resolved")  # a later resolution: not the first
    )


def test_a_worked_conversation() -> None:
    f = worked_chat().facts()
    d = f.calendar
    assert f.arrived == to_us(T0)
    assert f.channel == "web" and f.channel_type == "webchat"
    assert minutes(d.first_response) == 5
    assert [minutes(x) for x in d.next_responses] == [4, 5]
    assert minutes(d.queue_wait) == 2
    assert minutes(d.handle) == 28
    assert minutes(d.resolution) == 30
    assert f.reopened == 1
    assert f.waiting_since is None
    assert f.abandoned(to_us(T0 + timedelta(days=1))) is False  # answered after 5 min


def test_marks() -> None:
    t = worked_chat()
    marks = [m.name for m in map(_mark, t.events)]
    assert marks == [
        "CONTACT", "OTHER", "ASSIGNED", "RESPONSE", "OTHER", "CONTACT", "CONTACT",
        "RESPONSE", "RESPONSE", "OTHER", "RESOLVED", "REOPENED", "CONTACT", "RESPONSE",
        "RESOLVED",
    ]  # fmt: skip


def _mark(event: Event) -> Mark:
    from hub.reports.metrics import mark

    return mark(event)


def test_nothing_counts_before_the_first_contact_and_unanswered_turns_stay_open() -> None:
    t = (
        Timeline()
        .assign(0, "bob")  # before any contact: ignored
        .agent(1)  # an agent writing first: no turn
        .status(2, "open", "resolved")  # ignored too
        .customer(10)
        .customer(12)
    )
    f = t.facts()
    assert f.arrived == to_us(T0 + timedelta(minutes=10))
    assert f.turns == () and f.first_response is None
    assert f.assigned is None and f.resolved is None and f.reopened == 0
    assert f.waiting_since == f.arrived
    assert f.calendar.first_response is None and f.calendar.queue_wait is None


def test_a_conversation_without_any_contact_has_no_facts() -> None:
    assert conversation_facts(Timeline().agent(0).note(1).events) is None
    assert conversation_facts([]) is None


def test_handle_time_needs_an_assignment_before_the_resolution() -> None:
    t = (
        Timeline()
        .customer(0)
        .status(3, "open", "resolved")  # resolved unassigned: resolution 3 min, no handle
        .status(4, "resolved", "open", SYSTEM)
        .customer(4)
        .assign(6, "bob")
        .agent(7)
        .status(9, "open", "resolved")  # handle: 6 -> 9
    )
    d = t.facts().calendar
    assert minutes(d.resolution) == 3
    assert minutes(d.queue_wait) == 6
    assert minutes(d.handle) == 3
    assert minutes(d.first_response) == 7


def test_durations_never_go_below_zero() -> None:
    # A provider's time on the customer's message later than the reply the hub recorded
    # after it (clock skew): commit order decides, and the duration is 0, not negative.
    t = Timeline().customer(10).agent(9)
    assert t.facts().calendar.first_response == 0.0


def test_calls_answered_and_missed() -> None:
    t = (
        Timeline(channel="phone")
        .call(0, "CA1", "ringing")  # contact
        .assign(0.2, "alice")
        .call(0.5, "CA1", "answered", agent="alice", duration=120)  # response: 30 s
        .call(2.5, "CA1", "completed", duration=150)
        .status(4, "open", "resolved")
        .call(60, "CA2", "ringing")  # next turn
        .call(60.5, "CA2", "missed", reason="no-answer")
        .add(61, EventKind.VOICEMAIL, Direction.IN, CUSTOMER, {"call_sid": "CA2"})
        .call(61.5, "CA2", "completed", duration=80)
        .call(90, "CA3", "ringing")  # still ringing: not over, not missed (yet)
    )
    f = t.facts()
    assert f.calendar.first_response == 30.0
    assert f.calendar.next_responses == ()
    assert f.waiting_since == to_us(T0 + timedelta(minutes=60))  # CA2 was never answered
    calls = missed_calls(t.events)
    assert {sid: (c.answered, c.ended, c.missed) for sid, c in calls.items()} == {
        "CA1": (True, True, False),
        "CA2": (False, True, True),
        "CA3": (False, False, False),
    }
    assert calls["CA2"].started == to_us(T0 + timedelta(minutes=60))


# --- abandoned chats ------------------------------------------------------------------------


def at_minute(minute: float) -> int:
    return to_us(T0 + timedelta(minutes=minute))


def test_a_chat_left_unanswered_is_abandoned_once_the_window_has_passed() -> None:
    f = Timeline().customer(0).customer(3).status(60, "open", "resolved").facts()
    assert ABANDON_AFTER_US == 10 * 60 * US
    assert f.last_contact == at_minute(3)
    assert f.abandoned(at_minute(12)) is False  # 9 min since the last message: maybe still there
    assert f.abandoned(at_minute(13)) is True  # 10 min of silence: gone
    assert f.abandoned(at_minute(24 * 60)) is True


def test_a_late_first_answer_does_not_save_the_chat() -> None:
    assert Timeline().customer(0).customer(3).agent(20).facts().abandoned(at_minute(99)) is True
    # The customer kept writing: their last message was 4 minutes before the answer.
    assert Timeline().customer(0).customer(16).agent(20).facts().abandoned(at_minute(99)) is False
    # Later silences do not matter: only the wait for the first answer does.
    late = Timeline().customer(0).agent(2).customer(3).agent(300).facts()
    assert late.abandoned(at_minute(999)) is False


def test_only_web_chats_can_be_abandoned() -> None:
    assert Timeline(channel="sms").customer(0).facts().abandoned(at_minute(999)) is None


# --- the SQL transcription of classify ------------------------------------------------------


def test_sql_classification_matches_the_python_definition() -> None:
    kinds = [k.value for k in EventKind]
    directions = [d.value for d in Direction]
    authors = [CUSTOMER, SYSTEM, "agent:alice", "agent:", "Agent:x", ""]
    datas: list[dict[str, Any] | None] = [None, {}]
    for status in ("ringing", "answered", "completed", "missed", "callback", "busy"):
        datas.append({"status": status, "call_sid": "CA9"})
    for old, new in itertools.product(("open", "resolved", "pending", None), repeat=2):
        datas.append({"from": old, "to": new})
    datas.append({"from": None, "to": "alice", "queue": "general"})
    datas.append({"to": {"kind": "sms", "value": "+1"}, "auto_reply": "after_hours"})
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE events (kind, direction, author, data)")
    cases = list(itertools.product(kinds, directions, authors, datas))
    conn.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?)",
        [(k, d, a, None if data is None else _json(data)) for k, d, a, data in cases],
    )
    got = [row[0] for row in conn.execute(f"SELECT {CODE_SQL} FROM events ORDER BY rowid")]
    from hub.reports.metrics import data_fields

    want = [code(k, d, a, *data_fields(k, data or {})) for k, d, a, data in cases]
    assert got == want
    assert len(set(want)) >= 6  # the grid reaches every mark, and the outbound flag


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data)


# --- the digest folds like the definition ---------------------------------------------------


def test_the_digest_agrees_with_the_pure_definition() -> None:
    timelines = [
        worked_chat(),
        Timeline("C2", "sms").customer(1).assign(3, "bob").agent(8).customer(9).agent(10),
        Timeline("C3", "phone")
        .call(2, "CAx", "ringing")
        .call(3, "CAx", "missed")
        .call(4, "CAx", "completed"),
        Timeline("C4").customer(30).customer(31),
    ]
    events = sorted((e for t in timelines for e in t.events), key=lambda e: e.id)
    digest = Digest()
    rows = [row for e in events if (row := event_row(e)) is not None]
    digest.add(rows[:7])  # in two batches, as a catch-up would
    digest.add(rows[7:])
    period = Period(to_us(T0), to_us(T0 + timedelta(days=1)))
    by_id = {f.conversation_id: f for f in digest.facts(period)}
    for t in timelines:
        assert by_id[t.conversation_id] == t.facts()
    assert [f.conversation_id for f in digest.facts(period)] == ["C1", "C2", "C3", "C4"]
    assert digest.facts(Period(to_us(T0) + 1, to_us(T0) + 2 * 60 * US)) == [by_id["C2"]]
    calls = digest.calls(period)
    assert [(c.channel, c.missed) for c in calls] == [("phone", True)]
    times = digest.times()
    # Contacts in: web 0, 10, 11, 40 and 30, 31; sms 1, 9; the call's ringing 2.
    assert [(t - to_us(T0)) // (60 * US) for t in times["web"][0]] == [0, 10, 11, 30, 31, 40]
    # Out: every outbound message, the hub's own auto-reply included.
    assert len(times["web"][1]) == 5 and len(times["sms"][1]) == 2
    assert len(times["phone"][0]) == 1 and len(times["phone"][1]) == 0


# --- business hours -------------------------------------------------------------------------


def office(*holidays: date, tz: str = NY) -> BusinessHours:
    nine_to_five = ((time(9), time(17)),)
    weekly = {day: nine_to_five if day not in ("sat", "sun") else () for day in WEEKDAYS}
    return BusinessHours(name="office", timezone=tz, weekly=weekly, holidays=holidays)


def always(tz: str = NY) -> BusinessHours:
    return BusinessHours(
        name="always", timezone=tz, weekly={day: ((time(0), time.max),) for day in WEEKDAYS}
    )


def local(tz: str, *args: int) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz))


HOUR = 3600.0


def test_business_hours_across_a_weekend_that_springs_forward() -> None:
    # Friday 16:00 -> Monday 10:00 in New York: 1 h on Friday, 1 h on Monday. The clocks
    # go forward on Sunday 9 March 2025, so Monday's 09:00 is 13:00 UTC, not 14:00.
    start = local(NY, 2025, 3, 7, 16, 0)
    end = local(NY, 2025, 3, 10, 10, 0)
    assert business_seconds(start, end, office()) == 2 * HOUR
    elapsed = end.astimezone(UTC) - start.astimezone(UTC)
    assert elapsed == timedelta(hours=65)  # 66 on the wall clock: one hour was skipped


def test_business_hours_skip_a_holiday() -> None:
    # Tuesday 08:00 -> Thursday 12:00 with Wednesday 12 March a holiday: 8 h + 3 h.
    start, end = local(NY, 2025, 3, 11, 8, 0), local(NY, 2025, 3, 13, 12, 0)
    assert business_seconds(start, end, office(date(2025, 3, 12))) == 11 * HOUR
    assert business_seconds(start, end, office()) == 19 * HOUR


def test_business_hours_inside_one_day_and_outside_all_days() -> None:
    hours = office()
    assert (
        business_seconds(local(NY, 2025, 3, 4, 10, 0), local(NY, 2025, 3, 4, 10, 30), hours) == 1800
    )
    assert business_seconds(local(NY, 2025, 3, 8, 0), local(NY, 2025, 3, 9, 23), hours) == 0
    assert business_seconds(local(NY, 2025, 3, 4, 18), local(NY, 2025, 3, 4, 10), hours) == 0


def test_twenty_four_seven_counts_real_elapsed_time_across_dst_changes() -> None:
    # Noon to noon over the spring-forward night is 23 h; over the fall-back night 25 h.
    spring = business_seconds(local(NY, 2025, 3, 8, 12), local(NY, 2025, 3, 9, 12), always())
    fall = business_seconds(local(NY, 2025, 11, 1, 12), local(NY, 2025, 11, 2, 12), always())
    assert (spring, fall) == (23 * HOUR, 25 * HOUR)


def test_a_repeated_local_hour_counts_twice_when_it_is_open() -> None:
    # Open 01:00-02:00 every day: on 2 November 2025 that local hour happens twice in
    # New York (EDT, then EST), and BusinessHours.is_open is true through both.
    hours = BusinessHours(
        name="night",
        timezone=NY,
        weekly={day: ((time(1), time(2)),) for day in WEEKDAYS},
    )
    day = (local(NY, 2025, 11, 2, 0), local(NY, 2025, 11, 3, 0))
    assert business_seconds(*day, hours) == 2 * HOUR
    assert business_seconds(local(NY, 2025, 11, 3, 0), local(NY, 2025, 11, 4, 0), hours) == HOUR


@pytest.mark.parametrize(
    ("tz", "first_day"),
    [(NY, date(2025, 3, 6)), (NY, date(2025, 10, 30)), ("Europe/London", date(2025, 3, 27)),
     ("Asia/Kolkata", date(2025, 3, 6)), ("Australia/Lord_Howe", date(2025, 4, 3))],
)  # fmt: skip
def test_business_seconds_equal_the_minutes_is_open_says_are_open(tz: str, first_day: date) -> None:
    """Brute force over ten days around a DST change (none for Kolkata; a half-hour one
    at Lord Howe): every minute that BusinessHours.is_open calls open, and no other."""
    hours = BusinessHours(
        name="mixed",
        timezone=tz,
        weekly={
            "mon": ((time(0), time(2, 30)), (time(9), time(17))),
            "tue": ((time(1, 15), time(3)),),
            "wed": ((time(9), time.max),),
            "thu": ((time(0), time.max),),
            "fri": ((time(9), time(12)), (time(13), time(18))),
            "sat": ((time(1), time(2)),),
            "sun": ((time(1, 30), time(3, 15)),),
        },
        holidays=(first_day + timedelta(days=4),),
    )
    start = datetime.combine(first_day, time(), ZoneInfo(tz)).astimezone(UTC)
    end = start + timedelta(days=10)
    minute = timedelta(minutes=1)
    open_minutes = sum(
        hours.is_open(start + i * minute) for i in range(int((end - start) / minute))
    )
    assert business_seconds(start, end, hours) == open_minutes * 60
    # And any sub-range, through the same precomputed clock.
    clock = BusinessClock(hours, to_us(start), to_us(start))
    rng = random.Random(tz)
    for _ in range(40):
        a = start + rng.randrange(0, 14400) * minute
        b = a + rng.randrange(0, 600) * minute
        brute = sum(hours.is_open(a + i * minute) for i in range(int((b - a) / minute)))
        assert clock.open_us(to_us(a), to_us(b)) == brute * 60 * US


# --- local buckets ------------------------------------------------------------------------


def test_day_buckets_follow_local_midnight_across_dst() -> None:
    tz = ZoneInfo(NY)
    lo, hi = to_us(local(NY, 2025, 3, 8, 0)), to_us(local(NY, 2025, 3, 11, 0))
    starts = bucket_starts(tz, lo, hi, "day")
    lengths = [(b - a) / US / 3600 for a, b in zip(starts, [*starts[1:], hi], strict=True)]
    assert lengths == [24, 23, 24]


def test_hour_buckets_repeat_the_fall_back_hour() -> None:
    tz = ZoneInfo(NY)
    lo = to_us(local(NY, 2025, 11, 2, 0))
    starts = bucket_starts(tz, lo, lo + 4 * 3600 * US, "hour")
    hours = [datetime.fromtimestamp(s / US, tz).strftime("%H %Z") for s in starts]
    assert hours == ["00 EDT", "01 EDT", "01 EST", "02 EST"]


def test_buckets_start_at_the_period_start_even_off_the_hour() -> None:
    tz = ZoneInfo("UTC")
    lo = to_us(datetime(2025, 1, 1, 10, 30, tzinfo=UTC))
    starts = bucket_starts(tz, lo, lo + 2 * 3600 * US, "hour")
    assert [(s - lo) // (60 * US) for s in starts] == [0, 30, 90]


# --- aggregation --------------------------------------------------------------------------


def test_stats() -> None:
    assert stats([]).count == 0 and stats([]).median is None
    s = stats([4.0, 1.0, 3.0, 2.0])
    assert (s.count, s.mean, s.median, s.p90) == (4, 2.5, 2.5, 4.0)
    s = stats([float(x) for x in range(10, 0, -1)])
    assert (s.median, s.p90) == (5.5, 9.0)  # nearest rank: the 9th of 10
    assert stats([7.0]).p90 == 7.0


def test_summary_of_known_conversations() -> None:
    sms = Timeline("C2", "sms").customer(0).assign(1, "bob").agent(3)
    facts = [
        worked_chat().facts(),  # first response 5 min, resolution 30
        sms.status(9, "open", "resolved").facts(),  # first response 3, wait 1, handle 8
        Timeline("C3").customer(0).customer(3).facts(),  # abandoned web chat, unanswered
    ]
    body = summarize(facts, as_of=at_minute(60))
    assert body["conversations"] == 3
    assert (body["resolved"], body["reopened"], body["unanswered"]) == (2, 1, 1)
    assert (body["webchats"], body["abandoned_chats"]) == (2, 1)
    assert body["first_response"] == {"count": 2, "mean": 240.0, "median": 240.0, "p90": 300.0}
    assert body["next_response"]["count"] == 2 and body["next_response"]["median"] == 270.0
    assert body["queue_wait"] == {"count": 2, "mean": 90.0, "median": 90.0, "p90": 120.0}
    assert body["handle"]["median"] == (28 * 60 + 8 * 60) / 2
    assert body["resolution"]["p90"] == 1800.0
    overall, groups = summarize_groups(
        facts, lambda f: (f.channel,), as_of=at_minute(60), partition=True
    )
    assert overall == body
    assert [(g["key"], g["conversations"]) for g in groups] == [("web", 2), ("sms", 1)]
    assert groups[1]["first_response"]["median"] == 180.0


def test_merged_groups_equal_a_fresh_summary() -> None:
    rng = random.Random(3)
    facts = []
    for n in range(200):
        t = Timeline(f"C{n:03d}", rng.choice(["web", "sms", "email"])).customer(0)
        if rng.random() < 0.8:
            t.assign(rng.uniform(0, 5), "alice").agent(rng.uniform(5, 50))
        if rng.random() < 0.5:
            t.customer(60).agent(60 + rng.uniform(0, 9))
        if rng.random() < 0.7:
            t.status(120, "open", "resolved")
        facts.append(t.facts())
    # The precomputed calendar durations are the definition's, inlined.
    assert all(f.calendar == f.durations(calendar_span) for f in facts)
    business = [f.durations(lambda a, b: (b - a) / US / 2) for f in facts]
    for keys, partition in (
        (lambda f: (f.channel,), True),
        (lambda f: (f.conversation_id[-1],), True),
        (lambda f: (f.channel, "all") if f.resolved else (), False),
    ):
        overall, groups = summarize_groups(
            facts, keys, as_of=at_minute(999), business=business, partition=partition
        )
        assert overall == summarize(facts, as_of=at_minute(999), business=business)
        for g in groups:
            members = [i for i, f in enumerate(facts) if g["key"] in keys(f)]
            expected = summarize(
                [facts[i] for i in members],
                as_of=at_minute(999),
                business=[business[i] for i in members],
            )
            assert {k: v for k, v in g.items() if k != "key"} == expected
