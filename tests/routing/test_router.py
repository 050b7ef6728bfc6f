"""The router's rules one by one: queues, skills, strategies, capacity, hours, sticky,
offers, escalation, requeues and the waiting line."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time

import pytest

from hub.config import BusinessHours, QueueConfig, QueueMatch, RoutingSettings
from hub.model import Agent, Role
from hub.routing.router import (
    Assigned,
    Effect,
    Escalated,
    NoOffer,
    Offered,
    OfferEnded,
    Queued,
    Released,
    Requeued,
    RequeueDue,
    Router,
)
from hub.routing.rules import Contact

T0 = 1_000_000.0
_count = 0


def agent(agent_id: str, *skills: str, phone: str | None = None, **capacity: int) -> Agent:
    return Agent(
        id=agent_id,
        name=agent_id,
        login=agent_id,
        role=Role.AGENT,
        skills=skills,
        capacity=capacity or {"webchat": 3, "email": 10, "sms": 5, "voice": 1},
        phone=phone,
    )


def make_router(
    queues: list[QueueConfig],
    agents: list[Agent],
    *,
    online: tuple[str, ...] | None = None,
    hours: tuple[BusinessHours, ...] = (),
    **settings: object,
) -> Router:
    routing = RoutingSettings(queues=tuple(queues), default_queue=queues[-1].name, **settings)  # type: ignore[arg-type]
    router = Router(routing, agents, hours)
    for agent_id in online if online is not None else [a.id for a in agents]:
        router.set_presence(agent_id, True, T0)
    return router


def contact(ct: str = "webchat", text: str = "", **kw: object) -> Contact:
    global _count
    _count += 1
    fields: dict[str, object] = {"channel": ct, "customer_id": f"cust{_count}"} | kw
    return Contact(conversation_id=f"c{_count}", channel_type=ct, text=text, **fields)  # type: ignore[arg-type]


def given(effects: list[Effect]) -> list[str]:
    """Who got what: agent ids of assignments and offers, in order."""
    return [e.agent_id for e in effects if isinstance(e, Assigned | Offered)]


def only(effects: list[Effect], kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


# --- queues and match rules -------------------------------------------------------------


def test_first_matching_queue_wins_else_the_default() -> None:
    queues = [
        QueueConfig(name="voice", match=QueueMatch(channel_types=("voice",))),
        QueueConfig(name="billing", match=QueueMatch(keywords=("invoice", "refund request"))),
        QueueConfig(name="vip", match=QueueMatch(customer_tags=("VIP",))),
        QueueConfig(name="french", match=QueueMatch(languages=("fr",))),
        QueueConfig(name="sms-line", match=QueueMatch(channels=("sms-us",))),
        QueueConfig(name="general"),
    ]
    router = make_router(queues, [agent("a")])
    select = router.matcher.select
    assert select(contact("voice")) == "voice"
    assert select(contact(text="Where is my INVOICE?")) == "billing"
    assert select(contact(text="a Refund Request please")) == "billing"
    assert select(contact(text="invoices")) == "general"  # whole words only
    assert select(contact(customer_tags=("vip",))) == "vip"  # tags ignore case
    assert select(contact(language="fr-CA")) == "french"
    assert select(contact()) == "general"  # unknown language: not the language queue
    assert select(contact("sms", channel="sms-us")) == "sms-line"
    # An explicit queue (IVR choice, transfer) is kept as is.
    effects = router.arrive(contact(text="invoice", queue="vip"), T0)
    assert only(effects, Assigned)[0].ticket.queue == "vip"


def test_all_rules_of_a_queue_must_match() -> None:
    queues = [
        QueueConfig(
            name="chat-billing",
            match=QueueMatch(channel_types=("webchat",), keywords=("bill",)),
        ),
        QueueConfig(name="other"),
    ]
    router = make_router(queues, [agent("a")])
    assert router.matcher.select(contact("webchat", "my bill")) == "chat-billing"
    assert router.matcher.select(contact("email", "my bill")) == "other"
    assert router.matcher.select(contact("webchat", "hello")) == "other"


def test_skills_and_agent_lists_limit_who_gets_a_queue() -> None:
    queues = [
        QueueConfig(name="billing", skills=("billing",), match=QueueMatch(keywords=("bill",))),
        QueueConfig(name="vip", agents=("carol",), match=QueueMatch(keywords=("vip",))),
        QueueConfig(name="general"),
    ]
    team = [agent("ann"), agent("ben", "billing"), agent("carol")]
    router = make_router(queues, team)
    assert {*given(router.arrive(contact(text="bill"), T0))} == {"ben"}
    assert given(router.arrive(contact(text="bill"), T0)) == ["ben"]
    assert given(router.arrive(contact(text="vip"), T0)) == ["carol"]
    router.set_presence("ben", False, T0)
    effects = router.arrive(contact(text="bill"), T0)
    assert only(effects, Queued) and not given(effects)  # ann lacks the skill


# --- strategies -------------------------------------------------------------------------


def test_round_robin_takes_turns_in_order() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a"), agent("b"), agent("c")])
    picks = [given(router.arrive(contact("email"), T0))[0] for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_least_busy_picks_the_lowest_load_for_capacity() -> None:
    team = [agent("a", webchat=4), agent("b", webchat=2)]
    router = make_router([QueueConfig(name="q", strategy="least_busy")], team)
    picks = [given(router.arrive(contact(), T0))[0] for _ in range(6)]
    # a: 0/4 then b: 0/2; then a 1/4 < b 1/2, a 2/4 = b 1/2 -> longest idle (b)...
    assert picks.count("a") == 4 and picks.count("b") == 2
    assert picks[:2] == ["a", "b"]


def test_longest_idle_picks_who_was_assigned_least_recently() -> None:
    router = make_router([QueueConfig(name="q", strategy="longest_idle")], [agent("a"), agent("b")])
    first = router.arrive(contact("email"), T0)
    assert given(first) == ["a"]
    assert given(router.arrive(contact("email"), T0)) == ["b"]
    # Resolving does not make anyone "idler": a was assigned longest ago.
    router.resolve(first[0].ticket.conversation_id, T0)
    assert given(router.arrive(contact("email"), T0)) == ["a"]


# --- capacity -------------------------------------------------------------------------------


def test_capacity_is_per_channel_type() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a", webchat=1, email=2)])
    assert given(router.arrive(contact("webchat"), T0)) == ["a"]
    assert only(router.arrive(contact("webchat"), T0), Queued)
    assert given(router.arrive(contact("email"), T0)) == ["a"]
    assert given(router.arrive(contact("email"), T0)) == ["a"]
    assert only(router.arrive(contact("email"), T0), Queued)
    assert only(router.arrive(contact("sms"), T0), Queued)  # capacity 0: never


def test_a_call_blocks_new_chats_when_configured() -> None:
    team = [agent("a", phone="+14155550100", voice=1, webchat=3)]
    router = make_router([QueueConfig(name="q")], team, call_blocks_chat=True)
    call = router.arrive(contact("voice"), T0)
    assert given(call) == ["a"]
    chat = router.arrive(contact("webchat"), T0)
    assert only(chat, Queued)
    # The call ends: the waiting chat goes to the agent at once.
    after = router.resolve(call[0].ticket.conversation_id, T0)
    assert given(after) == ["a"]


def test_calls_go_only_to_agents_with_a_phone() -> None:
    team = [agent("nophone", voice=1), agent("phone", phone="+14155550100", voice=1)]
    router = make_router([QueueConfig(name="q")], team)
    assert given(router.arrive(contact("voice"), T0)) == ["phone"]
    assert only(router.arrive(contact("voice"), T0), Queued)


# --- the waiting line -----------------------------------------------------------------------


def test_waiting_line_is_priority_then_age_and_positions_are_reported() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a", webchat=1)], online=())
    old = contact()
    young = contact()
    urgent = contact(priority=5)
    for n, c in enumerate([old, young, urgent]):
        assert only(router.arrive(c, T0 + n), Queued)
    positions = router.state.positions("q")
    assert positions == {
        urgent.conversation_id: 1,
        old.conversation_id: 2,
        young.conversation_id: 3,
    }
    assert router.estimated_wait("q", 2) is None  # nothing served yet: no pace to go by
    served = []
    effects = router.set_presence("a", True, T0 + 10)
    for _ in range(3):
        (assigned,) = only(effects, Assigned)
        served.append(assigned.ticket.conversation_id)
        effects = router.resolve(assigned.ticket.conversation_id, T0 + 10 + 60 * len(served))
    assert served == [urgent.conversation_id, old.conversation_id, young.conversation_id]
    assert router.estimated_wait("q", 2) == pytest.approx(120, abs=30)


def test_queue_priority_adds_to_conversation_priority() -> None:
    queues = [
        QueueConfig(name="vip", priority=10, match=QueueMatch(customer_tags=("vip",))),
        QueueConfig(name="q"),
    ]
    router = make_router(queues, [agent("a", email=1)], online=())
    plain = contact("email", priority=3)
    vip = contact("email", customer_tags=("vip",))
    router.arrive(plain, T0)
    router.arrive(vip, T0 + 1)
    assert given(router.set_presence("a", True, T0 + 2)) == ["a"]
    assert router.state.holding(vip.conversation_id) is not None


# --- business hours -----------------------------------------------------------------------

OFFICE = BusinessHours(
    name="office",
    timezone="Europe/Paris",
    weekly={
        "mon": ((time(9), time(17)),),
        "tue": (),
        "wed": (),
        "thu": (),
        "fri": (),
        "sat": (),
        "sun": (),
    },
)
MONDAY_8 = datetime(2025, 1, 6, 7, 0, tzinfo=UTC).timestamp()  # 08:00 in Paris
MONDAY_10 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC).timestamp()  # 10:00 in Paris


def test_closed_queue_holds_contacts_and_reports_the_after_hours_action() -> None:
    queues = [
        QueueConfig(
            name="q",
            business_hours="office",
            after_hours="auto_reply",
            after_hours_message="We open at 9.",
        )
    ]
    router = make_router(queues, [agent("a")], hours=(OFFICE,))
    router.tick(MONDAY_8)
    effects = router.arrive(contact(), MONDAY_8)
    (queued,) = only(effects, Queued)
    assert queued.closed and queued.after_hours == "auto_reply"
    assert queued.message == "We open at 9."
    assert not given(effects)  # an online agent does not change that: the queue is closed
    opened = router.tick(MONDAY_10)
    assert given(opened) == ["a"]


def test_voicemail_after_hours_is_reported_for_calls() -> None:
    queues = [QueueConfig(name="q", business_hours="office", after_hours="voicemail")]
    router = make_router(queues, [agent("a", phone="+1415")], hours=(OFFICE,))
    (queued,) = only(router.arrive(contact("voice"), MONDAY_8), Queued)
    assert queued.after_hours == "voicemail"
    assert given(router.arrive(contact("voice"), MONDAY_10)) == ["a"]


# --- sticky -------------------------------------------------------------------------------


def test_sticky_agent_first_when_online_with_room() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a", email=1), agent("b"), agent("c")])
    assert given(router.arrive(contact("email", sticky_agent="c"), T0)) == ["c"]
    sticky = only(router.arrive(contact("email", sticky_agent="c"), T0), Assigned)
    assert sticky[0].agent_id == "c" and sticky[0].sticky
    router.set_presence("c", False, T0)
    assert given(router.arrive(contact("email", sticky_agent="c"), T0)) == ["a"]
    # a is full (email 1): sticky to a falls back to the strategy.
    assert given(router.arrive(contact("email", sticky_agent="a"), T0)) == ["b"]


# --- offers -------------------------------------------------------------------------------


def offer_queue(**kw: object) -> QueueConfig:
    return QueueConfig(
        name=str(kw.pop("name", "q")),
        require_accept=True,
        offer_timeout_seconds=20,
        **kw,  # type: ignore[arg-type]
    )


def test_offer_accept_assigns_and_only_the_offered_agent_may_answer() -> None:
    router = make_router([offer_queue()], [agent("a"), agent("b")])
    c = contact()
    (offer,) = only(router.arrive(c, T0), Offered)
    assert offer.agent_id == "a" and offer.expires_at == T0 + 20
    assert router.state.load("a", "webchat") == 1  # the slot is held while offered
    with pytest.raises(NoOffer):
        router.accept(c.conversation_id, "b", T0)
    (assigned,) = router.accept(c.conversation_id, "a", T0 + 1)
    assert isinstance(assigned, Assigned) and assigned.accepted
    with pytest.raises(NoOffer):
        router.decline(c.conversation_id, "a", T0 + 2)


def test_declines_and_timeouts_move_on_then_escalate_to_the_fallback() -> None:
    queues = [
        offer_queue(max_offers=2, fallback="seniors", match=QueueMatch(keywords=("help",))),
        offer_queue(name="seniors", agents=("s",)),
    ]
    router = make_router(queues, [agent("a"), agent("b"), agent("s")])
    c = contact(text="help")
    assert given(router.arrive(c, T0)) == ["a"]
    effects = router.decline(c.conversation_id, "a", T0 + 1)
    assert only(effects, OfferEnded)[0].reason == "declined"
    assert given(effects) == ["b"]
    assert router.tick(T0 + 10) == []  # not due yet
    effects = router.tick(T0 + 21)
    assert only(effects, OfferEnded)[0].reason == "expired"
    (escalated,) = only(effects, Escalated)
    assert (escalated.from_queue, escalated.to_queue) == ("q", "seniors")
    assert given(effects) == ["s"]


def test_without_fallback_offers_start_over_after_max_misses() -> None:
    router = make_router([offer_queue(max_offers=1)], [agent("a")])
    c = contact()
    router.arrive(c, T0)
    effects = router.decline(c.conversation_id, "a", T0)
    assert only(effects, Escalated)[0].to_queue is None
    assert given(effects) == ["a"]


def test_a_declined_ticket_waits_when_nobody_else_can_take_it() -> None:
    router = make_router([offer_queue(max_offers=3)], [agent("a")])
    c = contact()
    router.arrive(c, T0)
    effects = router.decline(c.conversation_id, "a", T0)
    assert only(effects, Queued) and not given(effects)
    # Another conversation may still go to a: only this one was declined.
    assert given(router.arrive(contact(), T0)) == ["a"]


def test_offers_to_an_agent_going_away_are_withdrawn_and_moved_on() -> None:
    router = make_router([offer_queue()], [agent("a"), agent("b")])
    c = contact()
    router.arrive(c, T0)
    effects = router.set_presence("a", False, T0 + 1)
    assert only(effects, OfferEnded)[0].reason == "withdrawn"
    assert given(effects) == ["b"]


# --- presence loss ----------------------------------------------------------------------


def test_assignments_of_an_absent_agent_come_due_for_requeue_after_the_delay() -> None:
    router = make_router(
        [QueueConfig(name="q")], [agent("a"), agent("b")], requeue_after_seconds=300
    )
    c = contact()
    assert given(router.arrive(c, T0)) == ["a"]
    router.set_presence("a", False, T0)
    assert router.tick(T0 + 299) == []
    (due,) = router.tick(T0 + 300)
    assert isinstance(due, RequeueDue) and due.conversation_ids == (c.conversation_id,)
    effects = router.requeue(c.conversation_id, T0 + 300)
    assert only(effects, Requeued)[0].agent_id == "a"
    assert given(effects) == ["b"]
    assert router.tick(T0 + 1000) == []  # reported once


def test_coming_back_in_time_keeps_the_conversations() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a")], requeue_after_seconds=300)
    router.arrive(contact(), T0)
    router.set_presence("a", False, T0)
    router.set_presence("a", True, T0 + 100)
    assert router.tick(T0 + 400) == []


# --- people deciding -------------------------------------------------------------------


def test_manual_assignment_counts_even_beyond_capacity_and_frees_the_old_agent() -> None:
    router = make_router([QueueConfig(name="q")], [agent("a", email=1), agent("b", email=1)])
    first = contact("email")
    assert given(router.arrive(first, T0)) == ["a"]
    waiting = contact("email")
    assert given(router.arrive(waiting, T0)) == ["b"]
    queued = contact("email")
    assert only(router.arrive(queued, T0), Queued)
    # A supervisor gives a's conversation to b: b is over capacity by choice, a is free.
    effects = router.adopt(first, "b", T0)
    assert only(effects, Released)[0].holding.agent_id == "a"
    assert given(effects) == ["a"]  # the waiting one goes to a
    assert router.state.load("b", "email") == 2


def test_transfer_to_another_queue_routes_there() -> None:
    queues = [QueueConfig(name="q", agents=("a",)), QueueConfig(name="other", agents=("b",))]
    router = make_router(queues, [agent("a"), agent("b")])
    c = contact(queue="q")
    assert given(router.arrive(c, T0)) == ["a"]
    effects = router.transfer(replace(c, queue="other"), T0)
    assert only(effects, Released)[0].holding.agent_id == "a"
    assert given(effects) == ["b"]
