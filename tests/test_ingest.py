"""The one ingest path: stored durably first, announced once, duplicates silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.bus import InProcessBus
from hub.ingest import Ingestor
from hub.model import ChannelType, Event, EventKind, Identity, IdentityKind, Inbound
from hub.timeline.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    instance = SqliteStore(tmp_path / "hub.db")
    await instance.start()
    yield instance
    await instance.close()


def sms(external_id: str, text: str = "hello", phone: str = "+12025550143") -> Inbound:
    return Inbound(
        channel="sms",
        channel_type=ChannelType.SMS,
        external_id=external_id,
        identity=Identity(IdentityKind.PHONE, phone),
        text=text,
    )


async def test_an_ingested_message_is_stored_before_it_is_announced(store: SqliteStore) -> None:
    bus = InProcessBus()
    sub = bus.subscribe("agent")
    recorded = await Ingestor(store, bus).ingest(sms("SM1", "where is my order?"))
    announced = await asyncio.wait_for(sub.get(), 1)
    assert isinstance(announced, Event)
    assert announced.id == recorded.event.id
    # What was announced can be read back: the store had it before the bus did.
    assert await store.get_event(announced.id) == announced
    assert announced.text == "where is my order?"


async def test_redelivery_returns_the_same_event_and_announces_only_that_event(
    store: SqliteStore,
) -> None:
    bus = InProcessBus()
    sub = bus.subscribe("agent")
    ingestor = Ingestor(store, bus)
    results = await asyncio.gather(*(ingestor.ingest(sms("SM2")) for _ in range(20)))
    assert len({r.event.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    # Each delivery announces the one stored event (a consumer that missed the first
    # announcement hears it on the provider's retry); nothing else is announced.
    announced = [await asyncio.wait_for(sub.get(), 1) for _ in range(20)]
    assert {a.id for a in announced if isinstance(a, Event)} == {results[0].event.id}
    assert sub.pending() == 0
    page = await store.customer_timeline(results[0].customer.id)
    assert [e.id for e in page.items] == [results[0].event.id]


async def test_auto_replies_are_stored_but_marked_not_routable(store: SqliteStore) -> None:
    ingestor = Ingestor(store, InProcessBus())
    inbound = Inbound(
        channel="support",
        channel_type=ChannelType.EMAIL,
        external_id="<ooo-1@example.com>",
        identity=Identity(IdentityKind.EMAIL, "bob@example.com"),
        text="I am out of office until Monday",
        routable=False,
    )
    recorded = await ingestor.ingest(inbound)
    stored = await store.get_event(recorded.event.id)
    assert stored is not None
    assert stored.kind is EventKind.MESSAGE
    assert stored.data["routable"] is False
    assert (await ingestor.ingest(sms("SM3"))).event.data.get("routable") is None
