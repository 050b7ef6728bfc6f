"""SLA clocks on hand-built timelines with known answers, and the sweeper on a real hub:
a warning before the breach, one breach event on the timeline, never recorded twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest

from hub.bus import Signal
from hub.config import BusinessHours, SlaPolicy
from hub.model import (
    CUSTOMER,
    SYSTEM,
    ChannelType,
    Conversation,
    ConversationStatus,
    Direction,
    Event,
    EventKind,
    agent_author,
    utcnow,
)
from hub.reports.integrations import SLA
from hub.reports.sla import (
    SlaClock,
    SlaSweeper,
    add_business_seconds,
    business_seconds,
    evaluate,
    running_intervals,
)
from tests.integrations.conftest import MakeHub

T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)  # a Monday
PARIS = BusinessHours(
    name="office",
    timezone="Europe/Paris",
    weekly={
        "mon": ((time(9), time(17)),),
        "tue": ((time(9), time(17)),),
        "wed": ((time(9), time(17)),),
        "thu": ((time(9), time(17)),),
        "fri": ((time(9), time(17)),),
        "sat": (),
        "sun": (),
    },
    holidays=(date(2025, 12, 29),),
)
ALWAYS = BusinessHours(
    name="always",
    timezone="Europe/Paris",
    weekly={d: ((time(0), time.max),) for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def conv(created: datetime = T0, status: ConversationStatus = ConversationStatus.OPEN, **kw: Any):
    return Conversation(
        id="C",
        customer_id="K",
        status=status,
        channel="web",
        created_at=created,
        last_activity_at=created,
        **kw,
    )


_n = iter(range(10_000))


def ev(at: datetime, kind: EventKind, direction: Direction, author: str, **data: Any) -> Event:
    return Event(
        id=f"E{next(_n):05d}",
        customer_id="K",
        conversation_id="C",
        channel="web",
        channel_type=ChannelType.WEBCHAT,
        direction=direction,
        kind=kind,
        author=author,
        created_at=at,
        data=data,
    )


def customer(at: datetime, **data: Any) -> Event:
    return ev(at, EventKind.MESSAGE, Direction.IN, CUSTOMER, **data)


def agent(at: datetime) -> Event:
    return ev(at, EventKind.MESSAGE, Direction.OUT, agent_author("alice"))


def status(at: datetime, frm: str, to: str) -> Event:
    return ev(at, EventKind.STATUS, Direction.INTERNAL, SYSTEM, **{"from": frm, "to": to})


def by_name(clocks: list[SlaClock], sla: str) -> list[SlaClock]:
    return [c for c in clocks if c.sla == sla]


def first_response(events: list[Event], now: datetime) -> SlaClock:
    [clock] = by_name(evaluate(POLICY, None, conv(), events, now), "first_response")
    return clock


# --- business time ------------------------------------------------------------------------


def test_business_time_across_a_weekend_and_a_holiday() -> None:
    # Friday 26 Dec 2025, 16:00 in Paris (15:00 UTC); Monday 29 is a holiday.
    start = datetime(2025, 12, 26, 15, 0, tzinfo=UTC)
    due = add_business_seconds(PARIS, start, 2 * 3600)
    # One hour on Friday, nothing on the weekend or the holiday, one on Tuesday morning.
    assert due == datetime(2025, 12, 30, 9, 0, tzinfo=UTC)  # 10:00 in Paris
    assert business_seconds(PARIS, start, due) == 2 * 3600
    assert business_seconds(PARIS, start, datetime(2025, 12, 29, 23, 0, tzinfo=UTC)) == 3600
    assert business_seconds(None, start, due) == (due - start).total_seconds()


def test_business_time_counts_a_short_dst_day_as_23_hours() -> None:
    start = datetime(2025, 3, 29, 23, 0, tzinfo=UTC)  # midnight in Paris, 30 March
    end = datetime(2025, 3, 30, 22, 0, tzinfo=UTC)  # midnight in Paris, 31 March
    assert business_seconds(ALWAYS, start, end) == 23 * 3600


def test_hours_that_never_open_have_no_due_time() -> None:
    closed = BusinessHours(name="closed", timezone="UTC", weekly={d: () for d in PARIS.weekly})
    assert add_business_seconds(closed, T0, 60) is None
    assert business_seconds(closed, T0, T0 + timedelta(days=30)) == 0


# --- clocks ----------------------------------------------------------------------------------

POLICY = SlaPolicy(name="p", first_response=3600, next_response=1800, resolution=7200)


def test_first_response_in_time_and_late() -> None:
    [on_time] = by_name(
        evaluate(POLICY, None, conv(), [agent(minutes(30))], minutes(90)), "first_response"
    )
    assert (on_time.breached, on_time.running, on_time.elapsed_seconds) == (False, False, 1800)
    assert on_time.due_at == minutes(60) and on_time.warn_at is None
    [late] = by_name(
        evaluate(POLICY, None, conv(), [agent(minutes(75))], minutes(90)), "first_response"
    )
    assert late.breached and late.stopped_at == minutes(75)


def test_a_running_clock_warns_at_80_percent_by_default() -> None:
    [clock] = by_name(evaluate(POLICY, None, conv(), [customer(T0)], minutes(50)), "first_response")
    assert clock.running and not clock.breached
    assert clock.due_at == minutes(60) and clock.warn_at == minutes(48)
    explicit = SlaPolicy(name="p", first_response=3600, warn_before=300)
    [clock] = evaluate(explicit, None, conv(), [customer(T0)], minutes(50))
    assert clock.warn_at == minutes(55)


def test_pending_pauses_the_clocks_unless_told_otherwise() -> None:
    events = [
        customer(T0),
        status(minutes(20), "open", "pending"),
        status(minutes(60), "pending", "open"),  # the customer wrote back
    ]
    assert running_intervals(conv(), events, True) == [(T0, minutes(20)), (minutes(60), None)]
    [resolution] = by_name(evaluate(POLICY, None, conv(), events, minutes(90)), "resolution")
    assert resolution.elapsed_seconds == 50 * 60  # 20 before pending + 30 after
    assert resolution.due_at == minutes(60 + 100)  # 120 minutes of open time
    paused_now = evaluate(POLICY, None, conv(), events[:2], minutes(300))
    assert all(not c.running and not c.breached and c.due_at is None for c in paused_now)
    no_pause = SlaPolicy(name="p", resolution=7200, pause_while_pending=False)
    [clock] = evaluate(no_pause, None, conv(), events[:2], minutes(130))
    assert clock.breached and clock.due_at == minutes(120)


def test_snoozed_does_not_pause() -> None:
    events = [status(minutes(10), "open", "snoozed")]
    [resolution] = by_name(evaluate(POLICY, None, conv(), events, minutes(121)), "resolution")
    assert resolution.breached


def test_next_response_cycles_start_at_the_customers_waiting_message() -> None:
    events = [
        customer(T0),
        agent(minutes(10)),  # first response
        customer(minutes(20)),  # waits: cycle 1
        customer(minutes(25)),  # still the same wait
        agent(minutes(70)),  # 50 minutes: late
        customer(minutes(80), routable=False),  # an auto-reply never waits for an answer
        customer(minutes(85), csat={"score": 5}),  # nor does a CSAT answer
        customer(minutes(90)),  # cycle 2, open
    ]
    clocks = by_name(evaluate(POLICY, None, conv(), events, minutes(100)), "next_response")
    assert [(c.cycle, c.stopped_at, c.breached) for c in clocks] == [
        (minutes(20), minutes(70), True),
        (minutes(90), None, False),
    ]
    assert clocks[1].due_at == minutes(120)


def test_auto_replies_are_not_first_responses() -> None:
    auto = ev(minutes(1), EventKind.MESSAGE, Direction.OUT, SYSTEM, auto_reply="after_hours")
    [clock] = by_name(
        evaluate(POLICY, None, conv(), [customer(T0), auto], minutes(61)), "first_response"
    )
    assert clock.breached and clock.stopped_at is None


def test_business_hours_clock_waits_for_opening_time() -> None:
    friday_evening = datetime(2025, 12, 26, 15, 30, tzinfo=UTC)  # 16:30 in Paris
    policy = SlaPolicy(name="p", first_response=3600, warn_before=600)
    [clock] = evaluate(
        policy, PARIS, conv(friday_evening), [], datetime(2025, 12, 28, 12, 0, tzinfo=UTC)
    )
    assert clock.elapsed_seconds == 1800 and not clock.breached
    assert clock.due_at == datetime(2025, 12, 30, 8, 30, tzinfo=UTC)  # Tuesday 09:30 Paris
    assert clock.warn_at == datetime(2025, 12, 30, 8, 20, tzinfo=UTC)


def test_resolved_conversation_stops_resolution() -> None:
    events = [agent(minutes(5)), status(minutes(30), "open", "resolved")]
    resolved = conv(status=ConversationStatus.RESOLVED, resolved_at=minutes(30))
    [clock] = by_name(evaluate(POLICY, None, resolved, events, minutes(500)), "resolution")
    assert clock.stopped_at == minutes(30) and not clock.breached and not clock.running


# --- the sweeper on a real hub -------------------------------------------------------------

SLA_YAML = """
sla:
  check_every_seconds: 1h
  policies:
    - name: standard
      first_response: 1h
      warn_before: 10m
"""


async def drain(sub: Any, kinds: set[str]) -> list[Any]:
    await asyncio.sleep(0.05)
    out = []
    while sub.pending():
        item = await sub.get()
        if isinstance(item, Signal) and item.kind in kinds:
            out.append(item)
        elif isinstance(item, Event) and item.kind is EventKind.STATUS and "sla" in item.data:
            out.append(item)
    return out


async def test_sweeper_warns_then_records_one_breach(make_hub: MakeHub) -> None:
    hub = await make_hub(SLA_YAML)
    sweeper = hub.app[SLA]
    await sweeper.stop()  # the test drives it, one sweep at a time
    recorded = await hub.chat("visitor-sla", "hello, anyone?")
    conv_id = recorded.event.conversation_id
    assert conv_id is not None
    created = recorded.conversation.created_at if recorded.conversation else utcnow()
    sub = hub.bus.subscribe("test-sla", maxsize=1000)
    kinds = {"sla_warning", "sla_breach"}

    sweeper.clock = lambda: created + timedelta(minutes=30)
    assert (await sweeper.sweep_once()).warnings == 0

    sweeper.clock = lambda: created + timedelta(minutes=52)
    result = await sweeper.sweep_once()
    assert (result.conversations, result.warnings, result.breaches) == (1, 1, 0)
    [warning] = await drain(sub, kinds)
    assert warning.kind == "sla_warning" and warning.conversation_id == conv_id
    assert warning.data["sla"] == "first_response"
    assert warning.data["recipients"] == ["sam", "root"]  # supervisors and admins
    assert warning.data["remaining_seconds"] == pytest.approx(480, abs=1)
    assert (await sweeper.sweep_once()).warnings == 0  # once per clock
    assert await drain(sub, kinds) == []

    sweeper.clock = lambda: created + timedelta(minutes=61)
    assert (await sweeper.sweep_once()).breaches == 1
    found = await drain(sub, kinds)
    event = next(i for i in found if isinstance(i, Event))
    signal = next(i for i in found if isinstance(i, Signal))
    assert event.kind is EventKind.STATUS and event.author == SYSTEM
    assert event.data["sla"] == "first_response" and event.data["breached"] is True
    assert "to" not in event.data and event.data["late"] is False
    assert signal.kind == "sla_breach" and signal.data["event_id"] == event.id
    conv_after = await hub.store.get_conversation(conv_id)
    assert conv_after is not None and conv_after.status is ConversationStatus.OPEN

    # Never twice: not by this sweeper, nor by a fresh one (it reads the timeline).
    assert (await sweeper.sweep_once()).breaches == 0
    fresh = SlaSweeper(hub.config, hub.store, hub.bus, clock=lambda: created + timedelta(hours=5))
    assert (await fresh.sweep_once()).breaches == 0
    page = await hub.store.conversation_events(conv_id, limit=50)
    assert sum(1 for e in page.items if e.data.get("sla")) == 1
    sub.close()


async def test_sweeper_skips_answered_and_paused_conversations(make_hub: MakeHub) -> None:
    hub = await make_hub(SLA_YAML)
    sweeper = hub.app[SLA]
    await sweeper.stop()
    answered = await hub.chat("visitor-answered", "hi")
    paused = await hub.chat("visitor-paused", "hi")
    assert answered.conversation and paused.conversation
    await hub.agent_reply(answered.conversation.id)
    await hub.set_status(paused.conversation.id, ConversationStatus.PENDING)
    sweeper.clock = lambda: utcnow() + timedelta(hours=50)
    result = await sweeper.sweep_once()
    assert (result.conversations, result.warnings, result.breaches) == (2, 0, 0)


async def test_an_answer_after_the_due_time_is_recorded_as_late(make_hub: MakeHub) -> None:
    hub = await make_hub("sla:\n  policies:\n    - {name: quick, first_response: 1s}\n")
    sweeper = hub.app[SLA]
    await sweeper.stop()
    recorded = await hub.chat("visitor-slow", "hello")
    assert recorded.conversation
    await asyncio.sleep(1.1)
    await hub.agent_reply(recorded.conversation.id)  # as if the sweeper had been down
    assert (await sweeper.sweep_once()).breaches == 1
    page = await hub.store.conversation_events(recorded.conversation.id, limit=50)
    [breach] = [e for e in page.items if e.data.get("sla")]
    assert breach.data["late"] is True and breach.data["target_seconds"] == 1
    assert (await sweeper.sweep_once()).breaches == 0
