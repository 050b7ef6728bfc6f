"""The Redis bus: what one hub process publishes reaches subscribers in every other one,
in order, including what was published while a reader had lost Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from hub.bus import BusItem, Signal, Subscription
from hub.model import (
    Attachment,
    ChannelType,
    DeliveryState,
    Direction,
    Event,
    EventKind,
    event_to_dict,
)
from hub.redis_bus import RedisBus, event_from_dict
from hub.timeline.store import StoreUnavailable
from tests.servers.common import free_port
from tests.servers.redis import RedisCluster, RedisFactory, RedisServer

pytestmark = pytest.mark.redis


def event(n: int, conversation: str = "C1") -> Event:
    return Event(
        id=f"{n:026d}",
        customer_id="CU1",
        conversation_id=conversation,
        channel="sms",
        channel_type=ChannelType.SMS,
        direction=Direction.IN,
        kind=EventKind.MESSAGE,
        author="customer",
        created_at=datetime(2024, 5, 1, 12, 0, 0, n % 1_000_000, tzinfo=UTC),
        text=f"message {n}",
    )


async def take(sub: Subscription, count: int, within: float = 10.0) -> list[BusItem]:
    items: list[BusItem] = []
    async with asyncio.timeout(within):
        while len(items) < count:
            items.append(await sub.get())
    return items


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    """Two buses on one Redis: what two hub processes look like to each other."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    buses = (
        RedisBus(redis_server.url, key_prefix=prefix),
        RedisBus(redis_server.url, key_prefix=prefix),
    )
    for bus in buses:
        await bus.start()
    try:
        yield buses
    finally:
        for bus in buses:
            await bus.close()


def test_events_survive_serialization() -> None:
    full = Event(
        id="01HZX0000000000000000000AB",
        customer_id="CU",
        conversation_id=None,
        channel="mail",
        channel_type=ChannelType.EMAIL,
        direction=Direction.OUT,
        kind=EventKind.MESSAGE,
        author="agent:7",
        created_at=datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        text="héllo",
        html="<p>héllo</p>",
        attachments=(Attachment("a.pdf", "application/pdf", 12, "blob:1"),),
        external_id="<id@x>",
        delivery_state=DeliveryState.FAILED,
        delivery_error="550 no such user",
        data={"to": {"kind": "email", "value": "x@y.z"}, "n": [1, 2.5, None]},
    )
    assert event_from_dict(event_to_dict(full)) == full
    assert event_from_dict(event_to_dict(event(3))) == event(3)


async def test_an_event_published_in_one_process_reaches_the_other_in_order(
    pair: tuple[RedisBus, RedisBus],
) -> None:
    a, b = pair
    on_b = b.subscribe("agent-ws", maxsize=2000)
    on_a = a.subscribe("router", maxsize=2000)
    sent = [event(n, conversation=f"C{n % 3}") for n in range(1000)]
    for item in sent:
        await a.publish([item])
    got_b = await take(on_b, 1000)
    got_a = await take(on_a, 1000)
    assert got_b == sent and got_a == sent
    for conversation in ("C0", "C1", "C2"):
        ids = [e.id for e in got_b if isinstance(e, Event) and e.conversation_id == conversation]
        assert ids == sorted(ids) and len(ids) >= 333


async def test_signals_and_batches_travel_too(pair: tuple[RedisBus, RedisBus]) -> None:
    a, b = pair
    sub = b.subscribe("ws")
    typing = Signal("typing", conversation_id="C9", customer_id="CU9", data={"who": "visitor"})
    await a.publish([event(1), typing, event(2)])
    assert await take(sub, 3) == [event(1), typing, event(2)]


async def test_a_new_reader_starts_at_the_present(
    pair: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    a, _ = pair
    await a.publish([event(1)])
    await a.flush()
    late = RedisBus(redis_server.url, key_prefix=a.stream.split(":")[0])
    await late.start()
    try:
        sub = late.subscribe("ws")
        await a.publish([event(2)])
        assert await take(sub, 1) == [event(2)]
    finally:
        await late.close()


async def test_nothing_is_missed_across_a_redis_restart(redis_factory: RedisFactory) -> None:
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    a = RedisBus(server.url, key_prefix=prefix, block_ms=200)
    b = RedisBus(server.url, key_prefix=prefix, block_ms=200)
    await a.start()
    await b.start()
    try:
        sub = b.subscribe("ws", maxsize=100)
        await a.publish([event(n) for n in range(5)])
        assert await take(sub, 5) == [event(n) for n in range(5)]
        server.kill()
        # Published while Redis is down: kept by the publisher, not lost.
        for n in range(5, 10):
            await a.publish([event(n)])
        await asyncio.sleep(0.3)
        assert a.pending == 5
        server.start()
        # Published after it came back, possibly before b's reader reconnected.
        for n in range(10, 15):
            await a.publish([event(n)])
        assert await take(sub, 10) == [event(n) for n in range(5, 15)]
        async with asyncio.timeout(2):
            await a.flush()  # the sender may not have seen its reply yet
        assert a.pending == 0
    finally:
        await a.close()
        await b.close()


async def test_start_fails_clearly_without_redis() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await bus.start()


async def test_bus_on_a_cluster(redis_cluster: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    a = RedisBus(redis_cluster.url, cluster=True, key_prefix=prefix)
    b = RedisBus(redis_cluster.url, cluster=True, key_prefix=prefix)
    await a.start()
    await b.start()
    try:
        sub = b.subscribe("ws")
        await a.publish([event(1), event(2)])
        assert await take(sub, 2) == [event(1), event(2)]
    finally:
        await a.close()
        await b.close()
