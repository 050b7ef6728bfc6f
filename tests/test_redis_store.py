"""What the Redis store promises beyond the contract suite: round trips, outages,
persistence checks, several processes at once, and merges interrupted by a crash."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from redis.asyncio.connection import AbstractConnection

import hub.timeline.redis as redis_store
from hub.model import (
    ChannelType,
    ConversationQuery,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    utcnow,
)
from hub.timeline.redis import RedisStore
from hub.timeline.store import InvalidOperation, StoreUnavailable
from tests.servers.common import free_port
from tests.servers.redis import RedisCluster, RedisFactory, RedisServer

pytestmark = pytest.mark.redis


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def sms(number: int, external_id: str | None = None, text: str = "hi") -> Inbound:
    return Inbound(
        channel="sms",
        channel_type=ChannelType.SMS,
        external_id=external_id or f"SM{uuid.uuid4().hex}",
        identity=Identity(IdentityKind.PHONE, f"+1202555{number:04d}"),
        text=text,
    )


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    instance = RedisStore(redis_server.url, key_prefix=prefix())
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@contextmanager
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts what the client sends: one packet per command or per whole pipeline."""
    sent = [0]
    original = AbstractConnection.send_packed_command

    async def counting(
        self: AbstractConnection, command: object, check_health: bool = True
    ) -> None:
        sent[0] += 1
        await original(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    try:
        yield sent
    finally:
        monkeypatch.setattr(AbstractConnection, "send_packed_command", original)


# --- round trips -------------------------------------------------------------------------


async def test_round_trips_per_ingest(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Warm up: connections open and scripts loaded, so only the ingest itself is counted.
    await store.record_inbound(sms(1))
    message = sms(2, external_id="SM-rt")
    with round_trips(monkeypatch) as sent:
        first = await store.record_inbound(message)
    assert first.created
    assert sent[0] <= 2, f"a new inbound took {sent[0]} round trips"
    with round_trips(monkeypatch) as sent:
        again = await store.record_inbound(message)
    assert not again.created and again.event == first.event
    assert sent[0] <= 2, f"a duplicate took {sent[0]} round trips"
    with round_trips(monkeypatch) as sent:
        follow_up = await store.record_inbound(sms(2, text="more"))
    assert follow_up.conversation is not None
    assert follow_up.conversation.id == first.event.conversation_id
    assert sent[0] <= 2, f"a second message took {sent[0]} round trips"


# --- outages -------------------------------------------------------------------------------


async def test_start_reports_an_unreachable_redis_clearly() -> None:
    port = free_port()
    for cluster in (False, True):
        store = RedisStore(f"redis://:secret@127.0.0.1:{port}", cluster=cluster)
        with pytest.raises(StoreUnavailable) as caught:
            await store.start()
        message = str(caught.value)
        assert message.startswith(f"cannot reach Redis at redis://:***@127.0.0.1:{port}: ")
        assert "secret" not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_outage_raises_unavailable_then_recovers(redis_factory: RedisFactory) -> None:
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    store = RedisStore(server.url, key_prefix=prefix())
    await store.start()
    try:
        before = await store.record_inbound(sms(7))
        server.kill()
        calls = [
            store.ping(),
            store.record_inbound(sms(7)),
            store.get_customer(before.customer.id),
            store.customer_timeline(before.customer.id),
            store.list_conversations(ConversationQuery()),
            store.append(
                before.event.conversation_id or "",
                EventDraft(kind=EventKind.NOTE, direction=Direction.INTERNAL, author="system"),
            ),
            store.claim_outbound(utcnow(), 10, timedelta(seconds=30)),
            store.set_state("k", "v"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call
        server.start()
        # No reconnect call: the pool notices by itself, and scripts are reloaded.
        after = await store.record_inbound(sms(7, text="back"))
        assert after.customer.id == before.customer.id
        assert after.conversation is not None
        assert after.conversation.id == before.event.conversation_id
        timeline = await store.customer_timeline(before.customer.id)
        assert [e.id for e in timeline.items] == [after.event.id, before.event.id]
    finally:
        await store.close()


async def test_every_acknowledged_message_survives_a_redis_crash(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    store = RedisStore(server.url, key_prefix=prefix())
    await store.start()
    acknowledged: list[str] = []
    refused = 0
    stop = asyncio.Event()

    async def webhook_traffic(worker: int) -> None:
        nonlocal refused
        n = 0
        while not stop.is_set():
            n += 1
            try:
                recorded = await store.record_inbound(sms(100 + worker, f"SM-{worker}-{n}"))
            except StoreUnavailable:
                refused += 1  # a 503: the provider retries later, nothing was promised
                await asyncio.sleep(0.01)
                continue
            acknowledged.append(recorded.event.id)

    try:
        workers = [asyncio.create_task(webhook_traffic(w)) for w in range(20)]
        await asyncio.sleep(0.3)
        server.kill()
        await asyncio.sleep(0.3)
        server.start()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        assert refused > 0 and len(acknowledged) > 100
        stored = await store._read_events(acknowledged)
        missing = set(acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged messages lost"
    finally:
        await store.close()


# --- persistence check ---------------------------------------------------------------------


async def warnings(server: RedisServer) -> dict[str, str | None]:
    store = RedisStore(server.url)
    await store.start()
    try:
        return {d: await store.persistence_warning(d) for d in ("always", "everysec", "none")}
    finally:
        await store.close()


async def test_persistence_warning(redis_factory: RedisFactory, redis_server: RedisServer) -> None:
    without = await warnings(redis_server)  # --appendonly no
    assert without["always"] and "appendonly no" in without["always"]
    assert without["everysec"] and "appendonly no" in without["everysec"]
    assert without["none"] is None

    always = await warnings(redis_factory("--appendonly", "yes", "--appendfsync", "always"))
    assert always == {"always": None, "everysec": None, "none": None}

    everysec = await warnings(redis_factory("--appendonly", "yes", "--appendfsync", "everysec"))
    assert everysec["always"] and "appendfsync everysec" in everysec["always"]
    assert everysec["everysec"] is None

    hidden = await warnings(redis_factory("--rename-command", "CONFIG", ""))
    assert hidden["always"] and "cannot read the persistence settings" in hidden["always"]
    assert hidden["none"] is None


async def test_persistence_warning_on_a_cluster(redis_cluster: RedisCluster) -> None:
    store = RedisStore(redis_cluster.url, cluster=True)
    await store.start()
    try:
        warning = await store.persistence_warning("always")
        assert warning and "appendonly no" in warning
    finally:
        await store.close()


# --- several processes ---------------------------------------------------------------------


@pytest.fixture(params=["redis", "redis-cluster"])
async def two_stores(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on the same data: what two hub processes look like to Redis."""
    cluster = request.param == "redis-cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    shared = prefix()
    stores = (
        RedisStore(server.url, cluster=cluster, key_prefix=shared),
        RedisStore(server.url, cluster=cluster, key_prefix=shared),
    )
    for s in stores:
        await s.start()
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_duplicates_from_two_processes_store_one_event(
    two_stores: tuple[RedisStore, RedisStore],
) -> None:
    message = sms(11, external_id="SM-dup")
    results = await asyncio.gather(*(two_stores[i % 2].record_inbound(message) for i in range(300)))
    assert sum(r.created for r in results) == 1
    assert len({r.event.id for r in results}) == 1
    assert len({r.customer.id for r in results}) == 1
    timeline = await two_stores[0].customer_timeline(results[0].customer.id)
    assert timeline.total == 1
    assert await two_stores[1].find_event("sms", "SM-dup") == results[0].event


async def test_ids_follow_commit_order_across_processes_with_skewed_clocks(
    two_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_stores
    # The second "process" runs 50 ms ahead: the first's candidates then keep losing the
    # race and have to move past the newest id, as across real hosts.
    ahead = second._prefixes
    real_next = ahead.next

    def skewed(floor: str = "") -> str:
        base = real_next(floor)
        return redis_store._inc(base[:9]) + base[9:]  # +32 ms: the 9th character counts 32s

    monkeypatch.setattr(ahead, "next", skewed)
    opening = await first.record_inbound(sms(12))
    conversation_id = opening.event.conversation_id
    assert conversation_id is not None
    seen: list[str] = [opening.event.id]
    done = asyncio.Event()

    async def follow() -> None:
        # A client resuming "events after X" must never miss one that commits later
        # with a smaller id.
        while not done.is_set():
            seen.extend(e.id for e in await first.events_after(conversation_id, seen[-1]))
            await asyncio.sleep(0)

    follower = asyncio.create_task(follow())
    writes = await asyncio.gather(
        *(two_stores[i % 2].record_inbound(sms(12, text=str(i))) for i in range(200))
    )
    done.set()
    await follower
    seen.extend(e.id for e in await first.events_after(conversation_id, seen[-1]))
    assert {w.event.conversation_id for w in writes} == {conversation_id}
    assert sorted(seen) == seen
    assert set(seen) == {opening.event.id, *(w.event.id for w in writes)}


# --- merges ----------------------------------------------------------------------------------


async def test_merge_interrupted_by_a_crash_is_finished_by_the_next_writer(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await store.record_inbound(sms(21))
    target = await store.record_inbound(sms(22))
    real_apply = store._apply
    applied = 0

    async def crash_after_first_step(*args: object, **kwargs: object) -> None:
        nonlocal applied
        applied += 1
        if applied == 2:  # the target imported, the source's step never ran
            raise RuntimeError("process died")
        await real_apply(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_apply", crash_after_first_step)
    with pytest.raises(RuntimeError):
        await store.merge_customers(source.customer.id, target.customer.id, "agent:a")
    monkeypatch.setattr(store, "_apply", real_apply)
    monkeypatch.setattr(redis_store, "LOCK_STALE_MS", 200)
    # The source is still locked by the dead merge; a delivery to it waits, then finishes
    # the merge itself and lands on the target.
    late = await store.record_inbound(sms(21, text="after the crash"))
    assert late.customer.id == target.customer.id
    merged = await store.get_customer(source.customer.id)
    assert merged is not None and merged.merged_into == target.customer.id
    timeline = await store.customer_timeline(target.customer.id)
    ids = {e.id for e in timeline.items}
    assert {source.event.id, target.event.id, late.event.id} <= ids
    kinds = [e.kind for e in timeline.items]
    assert kinds.count(EventKind.MERGE) == 1


@pytest.fixture(params=["redis", "redis-cluster"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    cluster = request.param == "redis-cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    instance = RedisStore(server.url, cluster=cluster, key_prefix=prefix())
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def test_merge_chain_then_unmerge_the_first(any_store: RedisStore) -> None:
    store = any_store
    a = await store.record_inbound(sms(31))
    b = await store.record_inbound(sms(32))
    c = await store.record_inbound(sms(33))
    await store.merge_customers(a.customer.id, b.customer.id, "agent:x")
    # b's conversation stays active: a's was resolved by the merge.
    reply = await store.append(
        a.event.conversation_id or "",
        EventDraft(kind=EventKind.NOTE, direction=Direction.INTERNAL, author="agent:x"),
    )
    await store.merge_customers(b.customer.id, c.customer.id, "agent:x")
    everything = await store.customer_timeline(c.customer.id, limit=100)
    assert {a.event.id, b.event.id, c.event.id, reply.event.id} <= {e.id for e in everything.items}
    found = await store.find_customer(a.customer.identities[0])
    assert found is not None and found.id == c.customer.id

    undo = await store.unmerge_customers(a.customer.id, "agent:x")
    assert undo.event.customer_id == c.customer.id
    assert undo.event.data == {"undo": True, "source": a.customer.id, "target": b.customer.id}
    back = await store.find_customer(a.customer.identities[0])
    assert back is not None and back.id == a.customer.id and back.merged_into is None
    a_events = {e.id for e in (await store.customer_timeline(a.customer.id)).items}
    assert {a.event.id, reply.event.id} <= a_events
    c_events = {e.id for e in (await store.customer_timeline(c.customer.id, limit=100)).items}
    assert not ({a.event.id, reply.event.id} & c_events)
    assert b.event.id in c_events
    moved = await store.get_event(reply.event.id)
    assert moved is not None and moved.customer_id == a.customer.id
    # Deliveries to a's identity land on a again, in a's own conversation.
    again = await store.record_inbound(sms(31, text="me again"))
    assert again.customer.id == a.customer.id


# --- outbox ----------------------------------------------------------------------------------


async def test_outbox_drops_entries_whose_write_never_committed(store: RedisStore) -> None:
    rec = await store.record_inbound(sms(41))
    queued = await store.append(
        rec.event.conversation_id or "",
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author="agent:q",
            channel="sms",
            channel_type=ChannelType.SMS,
            text="reply",
            delivery_state=DeliveryState.QUEUED,
        ),
    )
    # Entries written ahead of scripts that then refused or never ran: one long ago
    # (an orphan) and one a moment ago (maybe still in flight).
    old = "01AAAAAAAAAAAAAAAAAAAA" + redis_store.tag_of(rec.customer.id)
    fresh = store._prefixes.next() + redis_store.tag_of(rec.customer.id)
    due = f"{store._outbox}:due"
    await store._command("ZADD", due, 0, old, 0, fresh)
    items = await store.claim_outbound(utcnow(), 10, timedelta(seconds=30))
    assert [i.event.id for i in items] == [queued.event.id]
    assert await store._command("ZSCORE", due, old) is None
    assert await store._command("ZSCORE", due, fresh) is not None


async def test_random_merges_and_unmerges_keep_everything_in_one_place(
    any_store: RedisStore,
) -> None:
    """Merges into merged customers, unmerges out of chains, traffic in between: every
    event stays in exactly one live timeline and every identity with its live owner."""
    store = any_store
    rnd = random.Random(23)
    customers: dict[int, str] = {}
    events: set[str] = set()
    for n in range(6):
        first = await store.record_inbound(sms(200 + n))
        customers[n] = first.customer.id
        events.add(first.event.id)
    for step in range(160):
        n, roll = rnd.randrange(6), rnd.random()
        if roll < 0.45:
            message = sms(200 + n, external_id=f"SM-r{step}")
            rec = await store.record_inbound(message)
            events.update([rec.event.id, *(e.id for e in rec.side_events)])
            assert (await store.record_inbound(message)).event.id == rec.event.id
        elif roll < 0.75:
            with contextlib.suppress(InvalidOperation):
                rec = await store.merge_customers(customers[n], customers[rnd.randrange(6)], "x")
                events.update([rec.event.id, *(e.id for e in rec.side_events)])
        else:
            with contextlib.suppress(InvalidOperation):
                events.add((await store.unmerge_customers(customers[n], "x")).event.id)
    placed: dict[str, str] = {}
    holders: dict[str, str] = {}
    for customer_id in customers.values():
        customer = await store.get_customer(customer_id)
        assert customer is not None
        timeline = await store.customer_timeline(customer_id, limit=1000)
        if customer.merged_into is not None:
            assert timeline.total == 0
            continue
        holders.update((i.key, customer_id) for i in customer.identities)
        for event in timeline.items:
            assert event.id not in placed and event.customer_id == customer_id
            placed[event.id] = customer_id
    assert set(placed) == events
    for n in customers:
        identity = Identity(IdentityKind.PHONE, f"+1202555{200 + n:04d}")
        live = await store.find_customer(identity)
        assert live is not None and holders[identity.key] == live.id
