"""Routing decisions per second and their latency, at call-centre scale, beside the
store's own read+write round trip measured in the same run.

    python benchmarks/routing.py [--agents 10000] [--waiting 100000] [--decisions 20000]
                                 [--store-ops 2000] [--redis-url redis://127.0.0.1:6379/0]

Set-up: `agents` agents in 4 queues (skills and strategies differ), all online and full,
and `waiting` conversations waiting on top, mixed channel types and priorities.
Measured, alternating so the waiting line stays the same length:
- free: a conversation is resolved, so its agent's slot frees and the router hands it
  the best waiting conversation that agent can take (a drain decision);
- arrive: a new conversation arrives, finds every eligible agent full and is queued.
Each decision is timed alone (perf_counter_ns around the router call, no I/O).

Baseline: what the service writes for one decision: get_conversation + assign on the
store (SQLite file in WAL, synchronous=FULL; Redis too when --redis-url is given).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_note, percentile, print_table
from hub.config import QueueConfig, QueueMatch, RoutingSettings
from hub.model import (
    SYSTEM,
    ChannelType,
    Identity,
    IdentityKind,
    Inbound,
    Role,
)
from hub.model import Agent as AgentModel
from hub.routing.router import Assigned, Router
from hub.routing.rules import Contact
from hub.timeline.store import TimelineStore

CHANNELS = ("webchat", "email", "sms", "voice")
QUEUES = (
    QueueConfig(name="billing", skills=("billing",), match=QueueMatch(keywords=("invoice",))),
    QueueConfig(
        name="french",
        skills=("french",),
        strategy="least_busy",
        match=QueueMatch(languages=("fr",)),
    ),
    QueueConfig(
        name="vip", priority=5, strategy="longest_idle", match=QueueMatch(customer_tags=("vip",))
    ),
    QueueConfig(name="general"),
)


def build(agents: int, waiting: int, seed: int) -> tuple[Router, list[str], random.Random]:
    rng = random.Random(seed)
    team = []
    for i in range(agents):
        skills = tuple(s for s in ("billing", "french") if rng.random() < 0.3)
        team.append(
            AgentModel(
                id=f"agent{i}",
                name=f"Agent {i}",
                login=f"agent{i}",
                role=Role.AGENT,
                skills=skills,
                capacity={"webchat": 3, "email": 10, "sms": 5, "voice": 1},
                phone=f"+1415555{i:04d}"[:12],
            )
        )
    routing = RoutingSettings(queues=QUEUES, default_queue="general")
    router = Router(routing, team)
    for agent in team:
        router.set_presence(agent.id, True, 0.0)
    held: list[str] = []
    n = 0
    now = 1.0
    # Fill every agent, then pile the waiting line on top.
    while router.state.waiting_count() < waiting:
        n += 1
        now += 0.001
        effects = router.arrive(contact(n, rng), now)
        held += [e.ticket.conversation_id for e in effects if isinstance(e, Assigned)]
    return router, held, rng


def contact(n: int, rng: random.Random) -> Contact:
    roll = rng.random()
    return Contact(
        conversation_id=f"conv{n}",
        customer_id=f"cust{n}",
        channel="ch",
        channel_type=rng.choices(CHANNELS, weights=(4, 4, 2, 1))[0],
        text="about my invoice" if roll < 0.2 else "hello",
        customer_tags=("vip",) if 0.2 <= roll < 0.25 else (),
        language="fr" if 0.25 <= roll < 0.35 else None,
        priority=rng.choice((0, 0, 0, 1)),
    )


def measure_router(router: Router, held: list[str], rng: random.Random, decisions: int) -> dict:
    frees: list[float] = []
    arrivals: list[float] = []
    n = 10_000_000
    now = 10_000.0
    started = time.perf_counter()
    for i in range(decisions):
        now += 0.001
        if i % 2 == 0:
            conv = held.pop(rng.randrange(len(held)))
            t0 = time.perf_counter_ns()
            effects = router.resolve(conv, now)
            frees.append(time.perf_counter_ns() - t0)
            held += [e.ticket.conversation_id for e in effects if isinstance(e, Assigned)]
        else:
            n += 1
            c = contact(n, rng)
            t0 = time.perf_counter_ns()
            effects = router.arrive(c, now)
            arrivals.append(time.perf_counter_ns() - t0)
            held += [e.ticket.conversation_id for e in effects if isinstance(e, Assigned)]
    elapsed = time.perf_counter() - started
    both = frees + arrivals
    return {
        "rate": decisions / elapsed,
        "all": both,
        "free": frees,
        "arrive": arrivals,
        "waiting": router.state.waiting_count(),
    }


async def measure_store(store: TimelineStore, ops: int) -> list[float]:
    await store.start()
    try:
        conv_ids = []
        for i in range(min(ops, 500)):
            recorded = await store.record_inbound(
                Inbound(
                    channel="web",
                    channel_type=ChannelType.WEBCHAT,
                    external_id=f"bench-{i}",
                    identity=Identity(IdentityKind.CHAT, f"visitor-{i}"),
                    text="hello",
                )
            )
            assert recorded.conversation is not None
            conv_ids.append(recorded.conversation.id)
        times = []
        for i in range(ops):
            conv_id = conv_ids[i % len(conv_ids)]
            agent = f"agent{i % 7}"
            t0 = time.perf_counter_ns()
            await store.get_conversation(conv_id)
            await store.assign(conv_id, agent, SYSTEM, queue="general")
            times.append(time.perf_counter_ns() - t0)
        return times
    finally:
        await store.close()


def us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def row(name: str, times: list[float], rate: float | None = None) -> list[str]:
    rate = rate if rate is not None else 1e9 / statistics.mean(times)
    return [
        name,
        f"{rate:,.0f}",
        us(percentile(times, 50)),
        us(percentile(times, 99)),
        us(max(times)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--store-ops", type=int, default=2_000)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    t0 = time.perf_counter()
    router, held, rng = build(args.agents, args.waiting, args.seed)
    setup = time.perf_counter() - t0
    print(
        f"set-up: {args.agents:,} agents online and full ({len(held):,} assigned), "
        f"{router.state.waiting_count():,} waiting, in {setup:.1f} s"
    )
    result = measure_router(router, held, rng, args.decisions)
    rows = [
        row("router: any decision", result["all"], result["rate"]),
        row("router: slot freed -> next waiting", result["free"]),
        row("router: arrival -> queued", result["arrive"]),
    ]
    from hub.timeline.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as tmp:
        sqlite_times = asyncio.run(
            measure_store(SqliteStore(Path(tmp) / "bench.db"), args.store_ops)
        )
    rows.append(row("baseline: SQLite get + assign", sqlite_times))
    if args.redis_url:
        from hub.timeline.redis import RedisStore

        redis_times = asyncio.run(
            measure_store(
                RedisStore(args.redis_url, key_prefix=f"bench{int(time.time())}"), args.store_ops
            )
        )
        rows.append(row("baseline: Redis get + assign", redis_times))
    print()
    print_table(["what", "per second", "p50 µs", "p99 µs", "max µs"], rows)
    print()
    print(f"waiting at the end: {result['waiting']:,}; {machine_note()}")


if __name__ == "__main__":
    main()
