"""Leases: one holder at a time, handed over within about a TTL when the holder dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from hub.lease import LocalLease, RedisLease, run_while_leader
from tests.servers.redis import RedisCluster, RedisServer

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()


def lease_name() -> str:
    return f"poll-{uuid.uuid4().hex[:8]}"


async def test_one_holder_at_a_time(client: aioredis.Redis) -> None:
    name = lease_name()
    first = RedisLease(client, name, "process-a", ttl_seconds=5)
    second = RedisLease(client, name, "process-b", ttl_seconds=5)
    assert await first.acquire()
    assert await first.acquire()  # again: still ours, renewed
    assert not await second.acquire()
    assert await first.renew()
    assert not await second.renew()
    await second.release()  # not the owner: changes nothing
    assert not await second.acquire()
    await first.release()
    assert await second.acquire()
    assert not await first.renew()


async def test_an_unrenewed_lease_expires(client: aioredis.Redis) -> None:
    name = lease_name()
    first = RedisLease(client, name, "a", ttl_seconds=0.3)
    second = RedisLease(client, name, "b", ttl_seconds=0.3)
    assert await first.acquire()
    assert not await second.acquire()
    await asyncio.sleep(0.4)
    assert await second.acquire()


async def test_work_runs_only_while_leading_and_moves_on_release(
    client: aioredis.Redis,
) -> None:
    name = lease_name()
    running: list[str] = []
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def work_of(owner: str) -> asyncio.Future[None]:
        async def work() -> None:
            running.append(owner)
            started[owner].set()
            try:
                await asyncio.Event().wait()
            finally:
                running.remove(owner)

        return asyncio.ensure_future(
            run_while_leader(RedisLease(client, name, owner, 1.0), work, renew_every=0.1)
        )

    a = work_of("a")
    await asyncio.wait_for(started["a"].wait(), 2)
    b = work_of("b")
    await asyncio.sleep(0.3)
    assert running == ["a"]
    a.cancel()  # a shuts down; b takes over once the lease is free
    with pytest.raises(asyncio.CancelledError):
        await a
    await asyncio.wait_for(started["b"].wait(), 2)
    assert running == ["b"]
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b


async def test_work_is_cancelled_when_the_lease_is_lost(client: aioredis.Redis) -> None:
    name = lease_name()
    lease = RedisLease(client, name, "a", ttl_seconds=1.0)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = asyncio.ensure_future(run_while_leader(lease, work, renew_every=0.1))
    await asyncio.wait_for(started.wait(), 2)
    # Somebody else holds it now (as after a stall longer than the TTL).
    await client.set(lease.key, "b", px=5000)
    await asyncio.wait_for(cancelled.wait(), 2)
    assert not runner.done()  # back to waiting for the lease
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert await client.get(lease.key) == "b"


async def test_work_result_is_returned_and_lease_released(client: aioredis.Redis) -> None:
    lease = RedisLease(client, lease_name(), "a", ttl_seconds=5)

    async def work() -> str:
        return "done"

    assert await run_while_leader(lease, work, renew_every=0.1) == "done"
    assert await client.get(lease.key) is None


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from hub.lease import RedisLease, run_while_leader

    async def main(url, name):
        client = aioredis.Redis.from_url(url)
        async def work():
            print("leading", flush=True)
            await asyncio.Event().wait()
        await run_while_leader(RedisLease(client, name, "doomed", 1.0), work, renew_every=0.2)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_another_process_takes_over_within_the_ttl_after_a_crash(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    name = lease_name()
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        redis_server.url,
        name,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(10):
            while (line := await holder.stdout.readline()) and line.strip() != b"leading":
                pass  # log lines come first
        assert line.strip() == b"leading"
        took_over = asyncio.Event()

        async def work() -> None:
            took_over.set()
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(
            run_while_leader(RedisLease(client, name, "survivor", 1.0), work, renew_every=0.2)
        )
        await asyncio.sleep(0.5)
        assert not took_over.is_set()
        holder.send_signal(signal.SIGKILL)  # no release: the key has to expire
        killed_at = time.monotonic()
        await asyncio.wait_for(took_over.wait(), 3)
        assert time.monotonic() - killed_at < 1.0 + 0.2 + 0.5
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_lease_on_a_cluster(redis_cluster: RedisCluster) -> None:
    client = ClusterClient.from_url(redis_cluster.url, decode_responses=True)
    try:
        name = lease_name()
        first = RedisLease(client, name, "a", 5)
        second = RedisLease(client, name, "b", 5)
        assert await first.acquire()
        assert not await second.acquire()
        await first.release()
        assert await second.acquire()
    finally:
        await client.aclose()


async def test_local_lease() -> None:
    name = lease_name()
    first, second = LocalLease(name, "a", 0.2), LocalLease(name, "b", 0.2)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.renew() and not await second.renew()
    await first.release()
    assert await second.acquire()
    await asyncio.sleep(0.25)  # expired: the other may take it
    assert await first.acquire()
    await first.release()
