import asyncio

from hub.bus import InProcessBus, Signal


async def test_every_subscriber_gets_every_item_in_order() -> None:
    bus = InProcessBus()
    first, second = bus.subscribe("a"), bus.subscribe("b")
    items = [Signal(kind="typing", data={"n": n}) for n in range(5)]
    await bus.publish(items)
    for sub in (first, second):
        got = [await sub.get() for _ in range(5)]
        assert got == items


async def test_a_slow_subscriber_never_blocks_the_publisher_and_its_drops_are_counted() -> None:
    bus = InProcessBus()
    slow = bus.subscribe("slow", maxsize=3)
    fast = bus.subscribe("fast", maxsize=100)
    # No one reads `slow`; publishing must still complete at once.
    await asyncio.wait_for(bus.publish([Signal(kind="x", data={"n": n}) for n in range(10)]), 1)
    assert slow.dropped == 7
    assert fast.dropped == 0
    assert [(await fast.get()).data["n"] for _ in range(10)] == list(range(10))


async def test_closed_subscription_ends_iteration_and_stops_receiving() -> None:
    bus = InProcessBus()
    sub = bus.subscribe("s")
    sub.close()
    assert bus.subscriber_count == 0
    await bus.publish([Signal(kind="x")])
    received = [item async for item in sub]
    assert received == []
