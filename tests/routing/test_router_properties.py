"""Properties of the router over random teams, queues and event sequences.

Each example builds a random team (capacities per channel type, skills, phones) and
random queues (strategy, skills, acceptance, fallback), then plays a random sequence of
arrivals, presence changes, accepts, declines, clock moves (offer timeouts, requeues)
and resolutions. After every step the test recomputes, independently of the router's
indexes, what must hold:

- no agent holds more of a channel type than their capacity;
- no conversation is held by two agents, or held and waiting at once;
- nothing waits while an agent who could take it (eligible, online, room, not declined)
  is free, and no ticket was given to an agent while an older ticket of at least equal
  priority, of the same channel type, waited for that same agent;
- round robin shares work within one of even.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.config import QueueConfig, QueueMatch, RoutingSettings
from hub.model import Agent, Role
from hub.routing.router import (
    Assigned,
    Dequeued,
    Effect,
    Escalated,
    Offered,
    OfferEnded,
    Queued,
    Released,
    Requeued,
    RequeueDue,
    Router,
)
from hub.routing.rules import CHANNEL_TYPES, Contact, eligible
from hub.routing.state import Ticket

SKILLS = ("billing", "french")
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def agents(draw: st.DrawFn) -> list[Agent]:
    count = draw(st.integers(1, 5))
    out = []
    for i in range(count):
        capacity = {ct: draw(st.integers(0, 3)) for ct in CHANNEL_TYPES}
        out.append(
            Agent(
                id=f"a{i}",
                name=f"A{i}",
                login=f"a{i}",
                role=Role.AGENT,
                skills=tuple(draw(st.sets(st.sampled_from(SKILLS)))),
                capacity=capacity,
                phone=draw(st.sampled_from([None, f"+1415555010{i}"])),
            )
        )
    return out


@st.composite
def routing(draw: st.DrawFn, team: list[Agent]) -> RoutingSettings:
    count = draw(st.integers(1, 3))
    queues = []
    for i in range(count):
        # Fallbacks only point forward, so there is never a cycle (config refuses those).
        fallback = draw(st.sampled_from([None, *[f"q{j}" for j in range(i + 1, count)]]))
        members = draw(st.sets(st.sampled_from([a.id for a in team]), max_size=3))
        queues.append(
            QueueConfig(
                name=f"q{i}",
                match=QueueMatch(
                    channel_types=tuple(draw(st.sets(st.sampled_from(CHANNEL_TYPES), max_size=2)))
                ),
                skills=tuple(draw(st.sets(st.sampled_from(SKILLS), max_size=1))),
                priority=draw(st.integers(0, 2)),
                strategy=draw(st.sampled_from(["round_robin", "least_busy", "longest_idle"])),
                require_accept=draw(st.booleans()),
                offer_timeout_seconds=draw(st.integers(1, 30)),
                max_offers=draw(st.integers(1, 3)),
                fallback=fallback,
                agents=tuple(sorted(members)) if draw(st.booleans()) else (),
            )
        )
    return RoutingSettings(
        queues=tuple(queues),
        default_queue=queues[-1].name,
        requeue_after_seconds=draw(st.integers(0, 60)),
        call_blocks_chat=draw(st.booleans()),
    )


OPS = st.one_of(
    st.tuples(
        st.just("arrive"),
        st.sampled_from(CHANNEL_TYPES),
        st.integers(0, 2),
        st.one_of(st.none(), st.integers(0, 4)),
    ),
    st.tuples(st.just("presence"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("accept"), st.integers(0, 50)),
    st.tuples(st.just("decline"), st.integers(0, 50)),
    st.tuples(st.just("clock"), st.integers(0, 45)),
    st.tuples(st.just("resolve"), st.integers(0, 50)),
)


@dataclass
class Sim:
    """Plays operations on a router and checks every property after each one."""

    team: list[Agent]
    settings: RoutingSettings
    router: Router = field(init=False)
    now: float = 1_000.0
    count: int = 0
    # What the effects said, kept apart from the router's own state to cross-check it.
    holder: dict[str, tuple[str, bool]] = field(default_factory=dict)  # conv -> (agent, offered)
    waiting: dict[str, Ticket] = field(default_factory=dict)
    given: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.router = Router(self.settings, self.team)
        self.queues = {q.name: q for q in self.settings.queues}
        self.profiles = {a.id: self.router.state.agent(a.id) for a in self.team}

    # --- operations -----------------------------------------------------------------

    def play(self, op: tuple) -> None:
        kind = op[0]
        router = self.router
        if kind == "arrive":
            _, ct, priority, sticky = op
            self.count += 1
            sticky_id = f"a{sticky}" if sticky is not None and sticky < len(self.team) else None
            contact = Contact(
                f"c{self.count}",
                f"cust{self.count % 3}",
                "ch",
                ct,
                priority=priority,
                sticky_agent=sticky_id,
            )
            self.apply(router.arrive(contact, self.now))
        elif kind == "presence":
            _, index, online = op
            if index < len(self.team):
                self.apply(router.set_presence(self.team[index].id, online, self.now))
        elif kind in ("accept", "decline"):
            offers = sorted(c for c, (_, offered) in self.holder.items() if offered)
            if offers:
                conv = offers[op[1] % len(offers)]
                agent = self.holder[conv][0]
                call = router.accept if kind == "accept" else router.decline
                self.apply(call(conv, agent, self.now))
        elif kind == "clock":
            self.now += op[1]
            self.apply(router.tick(self.now))
        elif kind == "resolve":
            known = sorted({*self.holder, *self.waiting})
            if known:
                self.apply(router.resolve(known[op[1] % len(known)], self.now))
        self.check_state()

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Assigned | Offered):
                conv = effect.ticket.conversation_id
                offered = isinstance(effect, Offered)
                if isinstance(effect, Assigned) and effect.accepted:
                    assert self.holder.get(conv) == (effect.agent_id, True)
                else:
                    assert conv not in self.holder, f"{conv} given while held"
                    self.check_not_passing_over(effect.ticket, effect.agent_id)
                    self.waiting.pop(conv, None)
                    self.given[effect.agent_id] += 1
                self.holder[conv] = (effect.agent_id, offered)
            elif isinstance(effect, OfferEnded):
                assert self.holder.pop(effect.ticket.conversation_id) == (effect.agent_id, True)
            elif isinstance(effect, Released | Requeued):
                agent = effect.holding.agent_id if isinstance(effect, Released) else effect.agent_id
                assert self.holder.pop(effect_conv(effect))[0] == agent
            elif isinstance(effect, Queued):
                conv = effect.ticket.conversation_id
                assert conv not in self.holder and conv not in self.waiting
                self.waiting[conv] = effect.ticket
            elif isinstance(effect, Dequeued):
                del self.waiting[effect.ticket.conversation_id]
            elif isinstance(effect, RequeueDue):
                # As if no agent had answered any of them.
                for conv in effect.conversation_ids:
                    self.apply(self.router.requeue(conv, self.now))
            elif isinstance(effect, Escalated):
                assert effect.ticket.misses == 0
            else:  # pragma: no cover
                raise AssertionError(effect)

    # --- properties -----------------------------------------------------------------

    def can_take(self, agent_id: str, ticket: Ticket, loads: Counter[tuple[str, str]]) -> bool:
        profile = self.profiles[agent_id]
        assert profile is not None
        ct = ticket.channel_type
        if not self.router.state.is_online(agent_id) or not profile.takes(ct):
            return False
        if agent_id in ticket.excluded or not eligible(profile, self.queues[ticket.queue]):
            return False
        if self.settings.call_blocks_chat and ct == "webchat" and loads[(agent_id, "voice")]:
            return False
        return loads[(agent_id, ct)] < profile.capacity.get(ct, 0)

    def loads(self) -> Counter[tuple[str, str]]:
        return Counter((h.agent_id, h.ticket.channel_type) for h in self.router.state.holdings())

    def check_not_passing_over(self, ticket: Ticket, agent_id: str) -> None:
        for other in self.waiting.values():
            if other.conversation_id == ticket.conversation_id:
                continue
            if other.channel_type != ticket.channel_type or other.order > ticket.order:
                continue
            profile = self.profiles[agent_id]
            assert profile is not None
            if agent_id in other.excluded or not eligible(profile, self.queues[other.queue]):
                continue
            raise AssertionError(
                f"{ticket.conversation_id} given to {agent_id} while older "
                f"{other.conversation_id} waited for them"
            )

    def check_state(self) -> None:
        state = self.router.state
        loads = self.loads()
        for (agent_id, ct), load in loads.items():
            profile = self.profiles[agent_id]
            assert profile is not None and profile.takes(ct), (agent_id, ct)
            assert load <= profile.capacity[ct], f"{agent_id} over capacity on {ct}"
            assert state.load(agent_id, ct) == load
        held = {h.ticket.conversation_id: (h.agent_id, h.offered) for h in state.holdings()}
        assert held == self.holder
        assert {c: state.waiting(c) for c in self.waiting} == self.waiting
        assert state.waiting_count() == len(self.waiting)
        assert not set(held) & set(self.waiting), "held and waiting at once"
        for ticket in self.waiting.values():
            free = [a.id for a in self.team if self.can_take(a.id, ticket, loads)]
            assert not free, f"{ticket.conversation_id} waits while {free} could take it"


def effect_conv(effect: Released | Requeued) -> str:
    ticket = effect.holding.ticket if isinstance(effect, Released) else effect.ticket
    return ticket.conversation_id


@SETTINGS
@given(data=st.data(), ops=st.lists(OPS, max_size=60))
def test_router_invariants_hold_over_random_sequences(data: st.DataObject, ops: list) -> None:
    team = data.draw(agents())
    sim = Sim(team, data.draw(routing(team)))
    for op in ops:
        sim.play(op)


@SETTINGS
@given(
    size=st.integers(2, 6),
    ops=st.lists(
        st.one_of(st.tuples(st.just("arrive")), st.tuples(st.just("resolve"), st.integers(0, 99))),
        max_size=80,
    ),
)
def test_round_robin_shares_within_one(size: int, ops: list) -> None:
    team = [
        Agent(id=f"a{i}", name="", login=f"a{i}", role=Role.AGENT, capacity={"email": 1000})
        for i in range(size)
    ]
    router = Router(RoutingSettings(queues=(QueueConfig(name="q"),), default_queue="q"), team)
    for agent in team:
        router.set_presence(agent.id, True, 0)
    given_to: Counter[str] = Counter()
    open_convs: list[str] = []
    for n, op in enumerate(ops):
        if op[0] == "arrive":
            effects = router.arrive(Contact(f"c{n}", "x", "mail", "email"), n)
            for effect in effects:
                assert isinstance(effect, Assigned)
                given_to[effect.agent_id] += 1
                open_convs.append(effect.ticket.conversation_id)
        elif open_convs:
            router.resolve(open_convs.pop(op[1] % len(open_convs)), n)
        counts = [given_to[a.id] for a in team]
        assert max(counts) - min(counts) <= 1, counts
