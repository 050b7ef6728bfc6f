"""Two hub processes on one Redis route as one (issue 5).

Two whole hub apps run in this test process, each with its own RedisStore and RedisBus
on the same redis-server (as two `hub serve` processes would be) and its own presence
registry: agents go online in either. Contacts come in through either app's ingestor,
people resolve and answer offers through either app's API. A third bus reader, the
*ledger*, replays everything both apps publish in the stream's one order and fails on:

- an agent holding (assigned or offered) more than their capacity at any moment;
- a conversation given by the router while someone holds it, or given twice.

Only one app (the leader, holder of the store's "router" lease) may route; the other
must never assign. When the leader goes (shut down, or killed without a word), the other
takes over within the lease's TTL, rebuilds from the store and routes what comes next.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub.app import BUS, CONFIG, INGESTOR, STORE, create_app
from hub.bus import BusItem, Signal
from hub.config import Config, parse_config
from hub.inbox.auth import TOKENS
from hub.inbox.presence import PRESENCE_KEY, PresenceRegistry
from hub.model import (
    SYSTEM,
    ChannelType,
    ConversationQuery,
    ConversationStatus,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Presence,
)
from hub.passwords import hash_password
from hub.redis_bus import RedisBus
from hub.routing.cluster import PresenceBook, RoutingTiming
from hub.routing.service import ROUTER, ROUTING_TIMING, RoutingService
from hub.timeline.redis import RedisStore
from tests.servers.redis import RedisServer

pytestmark = pytest.mark.redis

# Fast enough for tests: a dead leader is replaced within 1.5 s (+ a renewal, 0.5 s).
TIMING = RoutingTiming(
    lease_seconds=1.5,
    heartbeat_seconds=0.2,
    request_timeout_seconds=2.0,
    call_timeout_seconds=1.0,
)
ACTIVE = (ConversationStatus.OPEN, ConversationStatus.PENDING, ConversationStatus.SNOOZED)


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password("two-process-routing")


def hub_yaml(
    redis_url: str,
    data_dir: Path,
    password_hash: str,
    capacity: dict[str, int],
    *,
    queue_extra: str = "",
    requeue_after: int = 3600,
    phones: dict[str, str] | None = None,
) -> str:
    phones = phones or {}
    agents = "".join(
        f"""
  - id: {agent_id}
    password_hash: "{password_hash}"
    capacity: {{webchat: {cap}}}
"""
        + (f'    phone: "{phones[agent_id]}"\n' if agent_id in phones else "")
        for agent_id, cap in capacity.items()
    )
    return f"""
hub:
  data_dir: {data_dir}
  log_level: warning
storage:
  backend: redis
  url: {redis_url}
  durability: none
channels:
  - name: web
    type: webchat
    rate_limit_per_minute: 100000
routing:
  requeue_after_seconds: {requeue_after}
  queues:
    - name: general
{queue_extra}
agents:{agents}
"""


# --- the ledger: everything published, in the stream's order --------------------------


@dataclass
class Ledger:
    capacity: dict[str, int]
    holder: dict[str, str] = field(default_factory=dict)  # conversation -> agent
    offered: dict[str, str] = field(default_factory=dict)  # conversation -> agent
    loads: Counter[str] = field(default_factory=Counter)  # holdings and offers
    given: Counter[str] = field(default_factory=Counter)  # conversation -> router's gifts
    closed: set[str] = field(default_factory=set)  # resolved: an assignment holds no slot
    violations: list[str] = field(default_factory=list)
    seen: int = 0

    def see(self, item: BusItem) -> None:
        self.seen += 1
        if isinstance(item, Signal):
            self._signal(item)
            return
        conv = item.conversation_id
        if conv is None:
            return
        if item.kind is EventKind.ASSIGNMENT:
            to = item.data.get("to")
            if item.author == SYSTEM and to is not None:
                self._given(conv, to, item.data.get("from"))
            self._release(conv)
            if to is not None and conv not in self.closed:
                self.holder[conv] = to
                self._load(to, conv)
        elif item.kind is EventKind.STATUS:
            if item.data.get("to") == "resolved":
                self.closed.add(conv)
                self._release(conv)
            else:
                self.closed.discard(conv)

    def _signal(self, signal: Signal) -> None:
        conv = signal.data.get("conversation_id")
        agent = signal.data.get("agent_id")
        if not isinstance(conv, str) or not isinstance(agent, str):
            return
        if signal.kind == "offer":
            if conv in self.holder or conv in self.offered:
                self.violations.append(f"{conv} offered to {agent} while held or offered")
            self.offered[conv] = agent
            self._load(agent, conv)
        elif signal.kind == "offer_ended" and self.offered.get(conv) == agent:
            del self.offered[conv]
            self.loads[agent] -= 1

    def _given(self, conv: str, to: str, previous: Any) -> None:
        self.given[conv] += 1
        if previous is not None:
            self.violations.append(f"router gave {conv} to {to} while {previous} held it")
        offered_to = self.offered.get(conv)
        if offered_to is not None and offered_to != to:
            self.violations.append(f"router gave {conv} to {to}, offered to {offered_to}")

    def _release(self, conv: str) -> None:
        agent = self.holder.pop(conv, None)
        if agent is not None:
            self.loads[agent] -= 1
        offered_to = self.offered.pop(conv, None)  # an accepted offer becomes the holding
        if offered_to is not None:
            self.loads[offered_to] -= 1

    def _load(self, agent: str, conv: str) -> None:
        self.loads[agent] += 1
        if self.loads[agent] > self.capacity.get(agent, 0):
            self.violations.append(
                f"{agent} over capacity with {conv}: {self.loads[agent]} > {self.capacity[agent]}"
            )


# --- two hubs on one Redis --------------------------------------------------------------


@dataclass
class Hub:
    name: str
    client: TestClient

    @property
    def app(self) -> web.Application:
        return self.client.server.app

    @property
    def service(self) -> RoutingService:
        return self.app[ROUTER]

    @property
    def registry(self) -> PresenceRegistry:
        return self.app[PRESENCE_KEY]

    @property
    def store(self) -> RedisStore:
        store = self.app[STORE]
        assert isinstance(store, RedisStore)
        return store

    async def online(self, *agents: str, presence: Presence = Presence.ONLINE) -> None:
        for agent in agents:
            await self.registry.set(agent, presence)
        bus = self.app[BUS]
        assert isinstance(bus, RedisBus)
        await bus.flush()  # in the stream before whatever the test does next

    async def chat(self, visitor: str, text: str = "hello") -> str:
        recorded = await self.app[INGESTOR].ingest(
            Inbound(
                channel="web",
                channel_type=ChannelType.WEBCHAT,
                external_id=f"msg-{uuid.uuid4().hex}",
                identity=Identity(IdentityKind.CHAT, visitor),
                text=text,
            )
        )
        assert recorded.event.conversation_id is not None
        return recorded.event.conversation_id

    async def headers(self, agent_id: str) -> dict[str, str]:
        issued, _ = await self.app[TOKENS].issue(self.app[CONFIG].agent(agent_id))
        return {"Authorization": f"Bearer {issued}"}

    async def post(self, path: str, agent_id: str, body: Any = None) -> tuple[int, Any]:
        resp = await self.client.post(path, json=body, headers=await self.headers(agent_id))
        return resp.status, await resp.json()

    async def resolve(self, conv_id: str, agent_id: str) -> None:
        status, body = await self.post(
            f"/api/v1/conversations/{conv_id}/status", agent_id, {"status": "resolved"}
        )
        assert status == 200, body


class Cluster:
    def __init__(
        self,
        make_client: Callable[[web.Application], Awaitable[TestClient]],
        redis: RedisServer,
        tmp_path: Path,
        password_hash: str,
    ) -> None:
        self._make_client = make_client
        self._redis = redis
        self._tmp_path = tmp_path
        self._password_hash = password_hash
        self.prefix = f"rt{uuid.uuid4().hex[:10]}"  # this test's keys only
        self.hubs: list[Hub] = []
        self.ledger = Ledger({})
        self._monitor: RedisBus | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self, capacity: dict[str, int], count: int = 2, **yaml: Any) -> list[Hub]:
        self.ledger = Ledger(dict(capacity))
        self._monitor = RedisBus(self._redis.url)
        await self._monitor.start()
        sub = self._monitor.subscribe("ledger", maxsize=100_000)

        async def follow() -> None:
            async for item in sub:
                self.ledger.see(item)

        self._follow = asyncio.create_task(follow())
        text = hub_yaml(self._redis.url, self._tmp_path, self._password_hash, capacity, **yaml)
        self.config: Config = parse_config(text, "two-processes.yaml", {}, self._tmp_path)
        for name in "AB"[:count]:
            await self.add(name)
        return self.hubs

    async def add(self, name: str) -> Hub:
        app = create_app(self.config, store=RedisStore(self._redis.url, key_prefix=self.prefix))
        app[ROUTING_TIMING] = TIMING
        client = await self._make_client(app)
        app[ROUTER].tick_seconds = 0.02
        hub = Hub(name, client)
        self.hubs.append(hub)
        return hub

    def leader(self) -> Hub:
        leading = [h for h in self.hubs if h.service.leading]
        assert len(leading) == 1, [h.name for h in leading]
        return leading[0]

    async def settle(self) -> None:
        """Until every bus is drained and the leader idle for a little while."""
        assert self._monitor is not None
        quiet = 0
        deadline = time.monotonic() + 10
        while quiet < 8:
            assert time.monotonic() < deadline, "the hubs never settled"
            await asyncio.sleep(0.02)
            busy = self._monitor.pending > 0
            for hub in self.hubs:
                bus = hub.app[BUS]
                sub = hub.service._subscription
                busy = busy or (isinstance(bus, RedisBus) and bus.pending > 0)
                busy = busy or (sub is not None and sub.pending() > 0)
                busy = busy or hub.service._lock.locked()
            quiet = 0 if busy else quiet + 1

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._monitor is not None:
            await self._monitor.close()


@pytest.fixture
async def cluster(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    redis_server: RedisServer,
    tmp_path: Path,
    password_hash: str,
) -> AsyncIterator[Cluster]:
    made = Cluster(aiohttp_client, redis_server, tmp_path, password_hash)
    try:
        yield made
    finally:
        await made.close()
    assert made.ledger.violations == []


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 5.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {within} s")
        await asyncio.sleep(0.01)


async def active(store: RedisStore) -> dict[str, str | None]:
    """Every active conversation and its assignee."""
    page = await store.list_conversations(ConversationQuery(statuses=ACTIVE), limit=500)
    assert page.next_cursor is None
    return {c.id: c.assignee for c in page.items}


async def assigned_count(store: RedisStore, expected: int) -> None:
    async def check() -> bool:
        convs = await active(store)
        return sum(1 for a in convs.values() if a is not None) == expected

    await eventually(check, what=f"{expected} assigned")


def router_knows_online(hub: Hub, *agents: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        state = hub.service.router.state
        return hub.service.leading and all(state.is_online(a) for a in agents)

    return check


def loads_of(convs: dict[str, str | None]) -> Counter[str]:
    return Counter(a for a in convs.values() if a is not None)


# --- the scenario -------------------------------------------------------------------------

CAPACITY = {"a1": 2, "a2": 2, "a3": 2, "a4": 2}


async def test_arrivals_and_resolutions_through_both_processes_route_as_one(
    cluster: Cluster,
) -> None:
    a, b = await cluster.start(CAPACITY)
    assert a.service.leading and not b.service.leading
    await a.online("a1", "a2")
    await b.online("a3", "a4")
    await eventually(router_knows_online(a, "a1", "a2", "a3", "a4"), what="everyone online")

    # Twelve chats at once, alternating between the processes: eight places, four wait.
    hubs = itertools.cycle((a, b))
    first = await asyncio.gather(*(next(hubs).chat(f"visitor-{n}") for n in range(12)))
    assert len(set(first)) == 12
    await assigned_count(a.store, 8)
    await cluster.settle()
    convs = await active(b.store)
    assert loads_of(convs) == dict.fromkeys(CAPACITY, 2)
    waiting = [c for c, agent in convs.items() if agent is None]
    assert len(waiting) == 4
    assert {c for c in waiting if a.service.router.state.waiting(c) is not None} == set(waiting)

    # People resolve five, through either process: the four waiting ones get agents.
    held = [(c, agent) for c, agent in convs.items() if agent is not None]
    await asyncio.gather(
        *(next(hubs).resolve(c, agent) for c, agent in held[:5] if agent is not None)
    )
    await assigned_count(a.store, 7)
    convs = await active(a.store)
    assert all(convs[c] is not None for c in waiting)

    # Six more: one free place, five wait.
    await asyncio.gather(*(next(hubs).chat(f"late-{n}") for n in range(6)))
    await assigned_count(a.store, 8)
    await cluster.settle()
    convs = await active(a.store)
    assert len(convs) == 13 and sum(1 for x in convs.values() if x is None) == 5
    assert max(loads_of(convs).values()) <= 2

    ledger = cluster.ledger
    assert ledger.violations == []
    assert set(ledger.given.values()) == {1}  # nothing was assigned twice
    assert len(ledger.given) == 8 + 4 + 1
    # The follower never routed: no state, and it still does not lead.
    assert not b.service.leading
    assert list(b.service.router.state.holdings()) == []
    assert b.service.router.state.waiting_count() == 0


async def test_a_new_leader_takes_over_when_the_leader_shuts_down(cluster: Cluster) -> None:
    a, b = await cluster.start({"a1": 2, "a3": 2})
    await a.online("a1")
    await b.online("a3")
    await eventually(router_knows_online(a, "a1", "a3"), what="both online")
    convs = [await a.chat(f"visitor-{n}") for n in range(5)]
    await assigned_count(a.store, 4)
    waiting = [c for c, agent in (await active(a.store)).items() if agent is None]
    assert len(waiting) == 1

    started = time.monotonic()
    await a.client.close()  # a clean shutdown hands the lease over at once
    await eventually(lambda: _leads(b), within=TIMING.lease_seconds + 1, what="takeover")
    took = time.monotonic() - started
    assert took < TIMING.lease_seconds + TIMING.renew_every, took
    state = b.service.router.state
    # Rebuilt from the store: the loads, the waiting one; a1 left with process A.
    assert state.load("a1", "webchat") == 2 and state.load("a3", "webchat") == 2
    assert state.waiting(waiting[0]) is not None
    assert state.is_online("a3") and not state.is_online("a1")

    # a3 finishes one: the waiting conversation is hers; a new arrival waits for her.
    mine = next(c for c, agent in (await active(b.store)).items() if agent == "a3")
    await b.resolve(mine, "a3")
    await eventually(lambda: _assignee_is(b, waiting[0], "a3"), what="waiting one served")
    late = await b.chat("late-visitor")
    await eventually(lambda: _waits(b, late), what="late one waits")
    await b.resolve(waiting[0], "a3")
    await eventually(lambda: _assignee_is(b, late, "a3"), what="late one served")
    assert len(convs) == 5
    assert set(cluster.ledger.given.values()) == {1}


async def test_a_killed_leader_is_replaced_within_the_lease_ttl(cluster: Cluster) -> None:
    a, b = await cluster.start({"a1": 2, "a3": 2})
    await a.online("a1")
    await b.online("a3")
    await eventually(router_knows_online(a, "a1", "a3"), what="both online")
    first = await b.chat("before")
    await eventually(lambda: _assigned(b, first), what="first assigned")

    # Process A dies: no lease released, no goodbye, no more heartbeats.
    async def silent() -> None:
        return None

    a.service._hand_over = silent  # type: ignore[method-assign]
    killed = time.monotonic()
    await a.client.close()
    assert not b.service.leading
    await eventually(lambda: _leads(b), within=TIMING.lease_seconds + 2, what="takeover")
    took = time.monotonic() - killed
    assert took < TIMING.lease_seconds + TIMING.renew_every + 0.5, took
    # What A said about a1 died with it (a1's sockets were there).
    await eventually(lambda: _not_online(b, "a1"), within=TIMING.expiry + 1, what="a1 forgotten")
    later = [await b.chat(f"after-{n}") for n in range(2)]
    for conv in later:
        await eventually(lambda c=conv: _assigned(b, c), what="served after takeover")
    convs = await active(b.store)
    assert {convs[c] for c in later} <= {"a3", convs[first]}
    assert loads_of(convs)["a3"] <= 2


async def _leads(hub: Hub) -> bool:
    return hub.service.routing


async def _not_online(hub: Hub, agent: str) -> bool:
    return not hub.service.router.state.is_online(agent)


async def _assigned(hub: Hub, conv_id: str) -> bool:
    conv = await hub.store.get_conversation(conv_id)
    return conv is not None and conv.assignee is not None


async def _assignee_is(hub: Hub, conv_id: str, agent: str) -> bool:
    conv = await hub.store.get_conversation(conv_id)
    return conv is not None and conv.assignee == agent


async def _waits(hub: Hub, conv_id: str) -> bool:
    return hub.service.router.state.waiting(conv_id) is not None


# --- offers answered in the process that does not lead -------------------------------------


async def test_accept_and_decline_on_the_follower_reach_the_leader(cluster: Cluster) -> None:
    extra = "      require_accept: true\n      offer_timeout_seconds: 30"
    a, b = await cluster.start({"a3": 1, "a4": 1}, queue_extra=extra)
    await b.online("a3", "a4")
    await eventually(router_knows_online(a, "a3", "a4"), what="both online")
    conv = await a.chat("visitor")

    async def offered() -> str | None:
        holding = a.service.router.state.holding(conv)
        return holding.agent_id if holding is not None and holding.offered else None

    await eventually(lambda: _true(offered()), what="offer")
    first = await offered()
    assert first is not None
    other = "a4" if first == "a3" else "a3"
    # Answered through process B, which forwards to A and answers with A's outcome.
    status, body = await b.post(f"/api/v1/conversations/{conv}/accept", other)
    assert status == 409, body
    status, body = await b.post(f"/api/v1/conversations/{conv}/decline", first)
    assert (status, body) == (200, {"declined": True})
    await eventually(lambda: _offered_to(a, conv, other), what="second offer")
    status, body = await b.post(f"/api/v1/conversations/{conv}/accept", other)
    assert status == 200, body
    assert body["conversation"]["assignee"] == other
    assert cluster.ledger.given[conv] == 1


async def test_a_call_on_the_follower_rings_whoever_the_leader_picks(cluster: Cluster) -> None:
    a, b = await cluster.start({"a1": 1, "a3": 1}, phones={"a3": "+14155550103"})
    await b.online("a3")
    await eventually(router_knows_online(a, "a3"), what="a3 online")
    conv = await b.chat("caller")
    # The voice channel asks the process that took the call; B asks A, A routes it.
    agent = await b.service.choose_for_call(SimpleNamespace(conversation_id=conv, queue=None))
    assert agent is not None and agent.id == "a3"
    assert (await b.store.get_conversation(conv)).assignee == "a3"  # type: ignore[union-attr]
    # Nobody free: no agent to ring, and nothing assigned by the follower.
    other = await b.chat("second-caller")
    assert await b.service.choose_for_call(SimpleNamespace(conversation_id=other)) is None
    await cluster.settle()
    assert (await b.store.get_conversation(other)).assignee is None  # type: ignore[union-attr]
    assert a.service.router.state.waiting(other) is not None


async def _true(value: Awaitable[Any]) -> bool:
    return bool(await value)


async def _offered_to(hub: Hub, conv: str, agent: str) -> bool:
    holding = hub.service.router.state.holding(conv)
    return holding is not None and holding.offered and holding.agent_id == agent


async def test_without_a_leader_nobody_routes_and_answers_are_503(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    # Someone else holds the router's lease (a process that hangs, say).
    squatter_store = RedisStore(redis_server.url, key_prefix=cluster.prefix)
    await squatter_store.start()
    try:
        squatter = squatter_store.lease("router", "squatter", 30)
        assert await squatter.acquire()
        a, b = await cluster.start({"a1": 2}, queue_extra="      require_accept: true")
        await a.online("a1")
        conv = await b.chat("visitor")
        await asyncio.sleep(TIMING.lease_seconds)  # long enough for a wrong decision
        assert not a.service.leading and not b.service.leading
        assert (await a.store.get_conversation(conv)).assignee is None  # type: ignore[union-attr]
        assert cluster.ledger.given[conv] == 0 and conv not in cluster.ledger.offered
        status, body = await b.post(f"/api/v1/conversations/{conv}/accept", "a1")
        assert status == 503, body
        # The squatter lets go: one of the two takes over and offers it.
        await squatter.release()
        await eventually(lambda: _true(_any_leads(a, b)), what="a leader")
        await eventually(lambda: _true(_offered_anywhere(a, b, conv)), what="offer")
        status, body = await b.post(f"/api/v1/conversations/{conv}/accept", "a1")
        assert status == 200, body
        assert body["conversation"]["assignee"] == "a1"
    finally:
        await squatter_store.close()


async def _any_leads(*hubs: Hub) -> bool:
    return sum(h.service.leading for h in hubs) == 1


async def _offered_anywhere(a: Hub, b: Hub, conv: str) -> bool:
    leader = a if a.service.leading else b
    return await _offered_to(leader, conv, "a1")


# --- random sequences, as tests/routing/test_router_properties.py plays them ---------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_sequences_keep_the_invariants_across_processes(
    cluster: Cluster, seed: int
) -> None:
    rng = random.Random(seed)
    agents = [f"a{i}" for i in range(1, rng.randint(2, 4) + 1)]
    capacity = {agent: rng.randint(0, 2) for agent in agents}
    capacity[agents[0]] = max(capacity[agents[0]], 1)
    require_accept = rng.random() < 0.5
    extra = "      require_accept: true\n      offer_timeout_seconds: 1" if require_accept else ""
    a, b = await cluster.start(capacity, queue_extra=extra, requeue_after=rng.choice([0, 3600]))
    hubs = (a, b)
    said: dict[str, Presence] = {}
    for agent in agents:  # most start online, in either process
        if rng.random() < 0.8:
            await rng.choice(hubs).online(agent)
            said[agent] = Presence.ONLINE
    convs: list[str] = []
    for step in range(50):
        hub = rng.choice(hubs)
        op = rng.choices(["arrive", "presence", "resolve", "answer"], [4, 1, 3, 3])[0]
        if op == "arrive":
            convs.append(await hub.chat(f"visitor-{seed}-{step % 7}", f"message {step}"))
        elif op == "presence":
            agent = rng.choice(agents)
            presence = rng.choice([Presence.ONLINE, Presence.ONLINE, Presence.AWAY])
            await hub.online(agent, presence=presence)
            said[agent] = presence
        elif op == "resolve" and convs:
            current = await active(hub.store)
            open_ones = [c for c in convs if c in current]
            if open_ones:
                conv = rng.choice(open_ones)
                await hub.resolve(conv, current[conv] or agents[0])
        elif op == "answer":
            leader = next((h for h in hubs if h.service.leading), None)
            offers = [
                x for x in (leader.service.router.state.holdings() if leader else ()) if x.offered
            ]
            if offers:
                offer = rng.choice(offers)
                verb = rng.choice(["accept", "accept", "decline"])
                conv = offer.ticket.conversation_id
                status, body = await hub.post(
                    f"/api/v1/conversations/{conv}/{verb}", offer.agent_id
                )
                assert status in (200, 409), (status, body)  # 409: it lapsed meanwhile
        if rng.random() < 0.2:
            await asyncio.sleep(rng.choice([0.01, 0.05, 0.3]))
        assert cluster.ledger.violations == [], (seed, step)

    await cluster.settle()
    leader = cluster.leader()
    state = leader.service.router.state
    assert cluster.ledger.violations == []
    # The leader's view is the store's: every assignment, and nobody else's.
    stored = await active(leader.store)
    held = {h.ticket.conversation_id: h for h in state.holdings()}
    for conv, agent in stored.items():
        if agent is not None:
            assert held[conv].agent_id == agent and not held[conv].offered, conv
    for conv, holding in held.items():
        assert conv in stored and (holding.offered or stored[conv] == holding.agent_id)
    # Presence is the agents' last word, whichever process heard it.
    for agent, presence in said.items():
        assert state.is_online(agent) == (presence is Presence.ONLINE), agent
    # Nothing waits while an online agent has room for it.
    for agent in agents:
        if not state.is_online(agent) or not state.room(agent, "webchat"):
            continue
        for conv in stored:
            ticket = state.waiting(conv)
            assert ticket is None or agent in ticket.excluded, (conv, agent)
    for hub in hubs:
        if hub is not leader:
            assert list(hub.service.router.state.holdings()) == []


# --- how the presence of every process adds up (hub/routing/cluster.py) --------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def saying(presence: str, connections: int, choice: Any = "-") -> dict[str, Any]:
    data: dict[str, Any] = {"presence": presence, "connections": connections}
    if choice != "-":
        data["choice"] = choice  # the agent's own act
    return data


def test_a_socket_moving_to_another_process_keeps_the_agent_online() -> None:
    book = PresenceBook("A", expire_after=None)
    assert book.report("A", "ann", saying("online", 1)) == [("ann", True)]
    assert book.report("B", "ann", saying("online", 1)) == []  # page reloaded on B
    # A's grace period ends long after: "away" there, but ann is connected on B.
    assert book.report("A", "ann", saying("away", 0)) == []
    assert book.is_online("ann")
    assert book.report("B", "ann", saying("away", 0)) == [("ann", False)]


def test_the_agents_choice_holds_in_every_process() -> None:
    book = PresenceBook("A", expire_after=None)
    book.report("A", "ann", saying("online", 1))  # her socket is on A
    # The switch in her page is a request that lands on B.
    assert book.report("B", "ann", saying("away", 0, "away")) == [("ann", False)]
    # A's snapshots still say online (A never heard of the choice): she stays away.
    assert book.snapshot("A", ["ann"], ["ann"]) == []
    assert not book.is_online("ann")
    assert book.report("A", "ann", saying("online", 1, None)) == [("ann", True)]
    # Signing out (through B, no connection there) clears the choice but not A's socket.
    book.report("B", "ann", saying("away", 0, "away"))
    assert book.report("B", "ann", saying("offline", 0, None)) == [("ann", True)]


def test_switched_online_where_not_connected_then_gone_everywhere() -> None:
    book = PresenceBook("A", expire_after=None)
    book.report("A", "ann", saying("online", 0, None))  # the switch, on A
    book.report("B", "ann", saying("online", 1))  # her socket, on B
    assert book.report("B", "ann", saying("away", 0)) == [("ann", False)]  # the newest word


def test_a_silent_process_is_forgotten_with_what_it_said() -> None:
    clock = FakeClock()
    book = PresenceBook("B", expire_after=1.0, clock=clock)
    book.report("A", "ann", saying("online", 1))
    book.snapshot("B", ["bob"], ["bob"])
    clock.now = 0.9
    book.snapshot("B", ["bob"], ["bob"])
    assert book.expire() == []
    clock.now = 1.5  # A said nothing for 1.5 s; B (this process) never expires
    assert book.expire() == [("ann", False)]
    assert book.online() == ("bob",)
    # A snapshot only catches up: an unchanged word keeps its age.
    book.report("C", "cy", saying("online", 0))
    book.report("D", "cy", saying("away", 0))
    assert book.snapshot("C", ["cy"]) == [] and not book.is_online("cy")
    assert book.forget("D") == [("cy", True)]
