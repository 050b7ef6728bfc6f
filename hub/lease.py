"""Leases: work that must run in exactly one process (an IMAP poll, a timer sweep).

A Redis lease is one key holding its owner's name with a TTL. Taking it is `SET NX PX`;
renewing and releasing are scripts that act only while the key still names this owner,
so a process that stalled past its TTL cannot extend or drop a lease someone else took
meanwhile. When the holder dies its key expires and another process takes over within
about one TTL. `LocalLease` has the same interface for the single-process (SQLite) case.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol, TypeVar

import redis.exceptions as rexc
import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Redis unreachable: the lease's state is unknown, not lost (see run_while_leader).
_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterError,
    rexc.RedisClusterException,
    ConnectionError,
    TimeoutError,
    OSError,
)


def _check_cancelled() -> None:
    """On Python 3.11, asyncio.wait_for (which redis-py wraps around every send) may
    swallow a cancellation racing with the send; it still shows in cancelling()."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


class Lease(Protocol):
    name: str
    owner: str
    ttl_seconds: float

    async def acquire(self) -> bool: ...

    async def renew(self) -> bool: ...

    async def release(self) -> None: ...


class RedisLease:
    """A lease on a Redis (or Redis Cluster) client; the key has a hash tag of its own."""

    def __init__(
        self,
        redis: Any,
        name: str,
        owner: str,
        ttl_seconds: float,
        *,
        key_prefix: str = "hub",
    ) -> None:
        self.name = name
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self.key = f"{key_prefix}:{{lease:{name}}}"
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        """Take the lease if free (or already ours, which renews it)."""
        return bool(await self._acquire(keys=[self.key], args=[self.owner, self._ttl_ms]))

    async def renew(self) -> bool:
        """Extend the lease by a TTL from now; False if it is no longer ours."""
        return bool(await self._renew(keys=[self.key], args=[self.owner, self._ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.owner])


class LocalLease:
    """A lease among the tasks of one process: enough when only one hub process runs.

    Leases sharing one `holders` table exclude each other; a store passes its own table
    so that two stores in one process (tests, tools) do not contend.
    """

    _shared: ClassVar[dict[str, tuple[str, float]]] = {}

    def __init__(
        self,
        name: str,
        owner: str,
        ttl_seconds: float = 30.0,
        *,
        holders: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self._holders = self._shared if holders is None else holders

    def _free_or_mine(self) -> bool:
        holder = self._holders.get(self.name)
        return holder is None or holder[0] == self.owner or holder[1] <= time.monotonic()

    async def acquire(self) -> bool:
        if not self._free_or_mine():
            return False
        self._holders[self.name] = (self.owner, time.monotonic() + self.ttl_seconds)
        return True

    async def renew(self) -> bool:
        holder = self._holders.get(self.name)
        if holder is None or holder[0] != self.owner:
            return False
        self._holders[self.name] = (self.owner, time.monotonic() + self.ttl_seconds)
        return True

    async def release(self) -> None:
        holder = self._holders.get(self.name)
        if holder is not None and holder[0] == self.owner:
            del self._holders[self.name]


async def run_while_leader(
    lease: Lease,
    work: Callable[[], Awaitable[T]],
    *,
    renew_every: float,
) -> T:
    """Run `work` only while holding `lease`, waiting for it when another process has it.

    The lease is renewed every `renew_every` seconds (pick about a third of its TTL).
    When a renewal says it is lost, or renewals fail (Redis unreachable) until the TTL
    may have run out, the work is cancelled, since another process may take over from
    then on, and this one goes back to waiting. Returns what `work` returns (releasing
    the lease); an exception from `work` releases the lease and propagates.
    """
    while True:
        try:
            held = await lease.acquire()
        except _UNAVAILABLE as exc:
            log.warning("lease.acquire_failed", lease=lease.name, error=str(exc))
            held = False
        _check_cancelled()
        if not held:
            await asyncio.sleep(renew_every)
            continue
        log.info("lease.acquired", lease=lease.name, owner=lease.owner)
        # Margin for clock drift and the renewal round trip itself.
        valid_until = time.monotonic() + lease.ttl_seconds - min(renew_every, 0.5)
        task: asyncio.Task[T] = asyncio.ensure_future(work())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=renew_every)
                if task in done:
                    with contextlib.suppress(*_UNAVAILABLE):
                        await lease.release()
                    return task.result()
                try:
                    still = await lease.renew()
                    _check_cancelled()
                except _UNAVAILABLE as exc:
                    log.warning("lease.renew_failed", lease=lease.name, error=str(exc))
                    still = time.monotonic() < valid_until
                else:
                    if still:
                        valid_until = time.monotonic() + lease.ttl_seconds - min(renew_every, 0.5)
                if not still:
                    log.warning("lease.lost", lease=lease.name, owner=lease.owner)
                    break
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


__all__ = ["Lease", "LocalLease", "RedisLease", "run_while_leader"]
