"""The bus across hub processes: one Redis Stream, read by every process.

Why a stream and not pub/sub: pub/sub forgets whatever is published while a subscriber
is disconnected. Here `publish` appends to a stream (trimmed to about `maxlen` items),
and each process runs one reader that asks for "entries after the last id I
delivered"; after a lost connection it asks again from that id, so a brief Redis
outage or network blip delays items but drops none. The reader hands items to an
in-process bus, whose subscriptions are what WebSockets and workers hold.

Order: the stream is one total order, so every process sees items in the order they
were appended, and items of one conversation published by one process stay in order.
Publishing never raises for an unreachable Redis: items wait in memory (bounded) and
are appended, in order, when Redis is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog
from redis.asyncio.cluster import RedisCluster

from hub.bus import BusItem, InProcessBus, Signal, Subscription
from hub.model import (
    Attachment,
    ChannelType,
    DeliveryState,
    Direction,
    Event,
    EventKind,
    event_to_dict,
)
from hub.timeline.redis import safe_url
from hub.timeline.store import StoreUnavailable

log = structlog.get_logger(__name__)

_BATCH = 500  # stream entries appended per round trip

_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterError,
    rexc.RedisClusterException,
    rexc.TryAgainError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def _cancelled() -> bool:
    """Whether this task is being cancelled. On Python 3.11, asyncio.wait_for (which
    redis-py wraps around every send) may swallow a cancellation that races with the
    send; the request still shows in cancelling(), so loops check it after each call."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """The inverse of hub.model.event_to_dict."""
    channel_type = data.get("channel_type")
    state = data.get("delivery_state")
    return Event(
        id=data["id"],
        customer_id=data["customer_id"],
        conversation_id=data.get("conversation_id"),
        channel=data.get("channel", ""),
        channel_type=ChannelType(channel_type) if channel_type else None,
        direction=Direction(data["direction"]),
        kind=EventKind(data["kind"]),
        author=data["author"],
        created_at=datetime.fromisoformat(data["created_at"]),
        text=data.get("text", ""),
        html=data.get("html"),
        attachments=tuple(Attachment(**a) for a in data.get("attachments") or ()),
        external_id=data.get("external_id"),
        delivery_state=DeliveryState(state) if state else None,
        delivery_error=data.get("delivery_error"),
        data=dict(data.get("data") or {}),
    )


def item_to_dict(item: BusItem) -> dict[str, Any]:
    if isinstance(item, Event):
        return {"t": "e", "v": event_to_dict(item)}
    return {
        "t": "s",
        "v": {
            "kind": item.kind,
            "conversation_id": item.conversation_id,
            "customer_id": item.customer_id,
            "data": dict(item.data),
        },
    }


def item_from_dict(data: Mapping[str, Any]) -> BusItem:
    value = data["v"]
    if data["t"] == "e":
        return event_from_dict(value)
    return Signal(
        kind=value["kind"],
        conversation_id=value.get("conversation_id"),
        customer_id=value.get("customer_id"),
        data=dict(value.get("data") or {}),
    )


class RedisBus:
    """The Bus protocol over a Redis Stream; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        key_prefix: str = "hub",
        maxlen: int = 100_000,
        block_ms: int = 1000,
        max_pending: int = 10_000,
    ) -> None:
        self.url = url
        self.cluster = cluster
        # Its own hash tag: on a cluster the stream lives on one node, whole.
        self.stream = f"{key_prefix}:{{bus}}:stream"
        self._maxlen = maxlen
        self._block_ms = block_ms
        self._local = InProcessBus()
        self._redis: Any = None
        self._reader_redis: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._pending: collections.deque[str] = collections.deque()
        self._max_pending = max_pending
        self._wake_sender = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self.last_id = "0-0"
        self.delivered = 0
        self.dropped = 0

    def _client(self, socket_timeout: float | None) -> Any:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": 2.0,
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return aioredis.Redis.from_url(self.url, **options)

    async def start(self) -> None:
        if self._reader is not None:
            return
        self._redis = self._client(5.0)
        # A blocked XREAD must outlive the socket timeout, or every wait looks like a fault.
        self._reader_redis = self._client(self._block_ms / 1000 + 10.0)
        try:
            self.last_id = await self._stream_end()
        except _UNAVAILABLE as exc:
            await self._close_clients()
            raise StoreUnavailable(
                f"cannot reach Redis at {safe_url(self.url)} for the bus: {exc}"
            ) from None
        self._reader = asyncio.create_task(self._read_loop(), name="redis-bus-reader")
        self._sender = asyncio.create_task(self._send_loop(), name="redis-bus-sender")

    async def _stream_end(self) -> str:
        """The id of the newest entry (items before it are history, not news)."""
        newest = await self._redis.xrevrange(self.stream, count=1)
        return newest[0][0] if newest else "0-0"

    async def close(self) -> None:
        if self._sender is not None and self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.flush()
        self._closing = True
        if self._reader is not None:
            # Cancelling a task blocked in XREAD does not always interrupt it (seen with
            # redis-py 8 on Python 3.11): cut its connection instead, then it sees
            # `_closing`; cancel only as the last resort.
            with contextlib.suppress(*_UNAVAILABLE):
                await self._reader_redis.aclose()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._block_ms / 1000 + 1.0):
                    await asyncio.shield(self._reader)
        for task in (self._reader, self._sender):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._sender = None
        if self._pending:
            log.warning("redis_bus.unsent_on_close", items=len(self._pending))
        await self._local.close()
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._redis, self._reader_redis):
            if client is not None:
                await client.aclose()
        self._redis = self._reader_redis = None

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, items: Sequence[BusItem]) -> None:
        """Queue items for the stream and return: one sender task appends everything
        queued meanwhile in one pipelined round trip, in order, and keeps them (bounded)
        while Redis is unreachable."""
        if not items:
            return
        if self._sender is None:
            raise StoreUnavailable("the Redis bus is not started (or closed)")
        payload = json.dumps([item_to_dict(i) for i in items], separators=(",", ":"))
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("redis_bus.pending_overflow", dropped=self.dropped)
        self._pending.append(payload)
        self._drained.clear()
        self._wake_sender.set()

    async def flush(self) -> None:
        """Wait until everything published so far reached Redis (callers bound it with
        asyncio.timeout: while Redis is down this waits for it)."""
        await self._drained.wait()

    async def _send_loop(self) -> None:
        delay = 0.05
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while self._pending:
                batch = list(itertools.islice(self._pending, 0, _BATCH))
                try:
                    pipe = self._redis.pipeline(transaction=False)
                    for payload in batch:
                        pipe.xadd(
                            self.stream, {"d": payload}, maxlen=self._maxlen, approximate=True
                        )
                    await pipe.execute()
                    if _cancelled():
                        raise asyncio.CancelledError
                except _UNAVAILABLE as exc:
                    if _cancelled():
                        raise asyncio.CancelledError from exc
                    # A batch cut off mid-way may be appended twice: subscribers see an
                    # item again rather than never (they dedupe by event id if they care).
                    if delay == 0.05:
                        log.warning(
                            "redis_bus.publish_deferred", error=str(exc), pending=len(self._pending)
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                for _ in batch:
                    self._pending.popleft()
                delay = 0.05
            self._drained.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- receiving ----------------------------------------------------------------------

    def subscribe(self, name: str, maxsize: int = 1000) -> Subscription:
        return self._local.subscribe(name, maxsize)

    @property
    def subscriber_count(self) -> int:
        return self._local.subscriber_count

    async def _read_loop(self) -> None:
        delay = 0.05
        down = False
        while not self._closing:
            try:
                answer = await self._reader_redis.xread(
                    {self.stream: self.last_id}, count=500, block=self._block_ms
                )
                if _cancelled():
                    raise asyncio.CancelledError
            except asyncio.CancelledError:
                raise
            except _UNAVAILABLE as exc:
                if _cancelled():
                    raise asyncio.CancelledError from exc
                if self._closing:
                    return
                if not down:
                    log.warning("redis_bus.reader_disconnected", error=str(exc))
                    down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if down:
                log.info("redis_bus.reader_reconnected", last_id=self.last_id)
                down = False
            delay = 0.05
            for _stream, entries in answer or ():
                for entry_id, fields in entries:
                    self._deliver(entry_id, fields)

    def _deliver(self, entry_id: str, fields: Mapping[str, str]) -> None:
        self.last_id = entry_id
        try:
            items = [item_from_dict(d) for d in json.loads(fields["d"])]
        except (KeyError, ValueError, TypeError) as exc:
            # Somebody else's entry, or a newer hub's: skip it rather than stop reading.
            log.warning("redis_bus.bad_entry", id=entry_id, error=str(exc))
            return
        self.delivered += len(items)
        self._local.deliver_local(items)


__all__ = ["RedisBus", "event_from_dict", "item_from_dict", "item_to_dict"]
