"""Publish/subscribe of stored events and ephemeral signals to live connections.

The bus is a doorbell, not the record: the store holds every event, and a subscriber
that fell behind (dropped items, reconnect) re-reads from the store by last event id.
That is why a slow subscriber may lose items here without anything being lost overall.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from hub.model import Event

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Signal:
    """Something live but not worth storing: typing, viewing, presence, queue position."""

    kind: str
    conversation_id: str | None = None
    customer_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


BusItem = Event | Signal


class Subscription:
    """A bounded queue of bus items for one consumer (one WebSocket, one worker)."""

    def __init__(self, bus: InProcessBus, name: str, maxsize: int) -> None:
        self.name = name
        self._bus = bus
        self._queue: asyncio.Queue[BusItem | None] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def offer(self, item: BusItem) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # Never block the publisher for one slow reader; the reader resyncs from the
            # store when it sees `dropped` grow (or on reconnect).
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("bus.subscriber_dropped", subscriber=self.name, dropped=self.dropped)

    async def get(self) -> BusItem:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def pending(self) -> int:
        """Items queued and not yet read."""
        return self._queue.qsize()

    def __aiter__(self) -> AsyncIterator[BusItem]:
        return self

    async def __anext__(self) -> BusItem:
        return await self.get()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._remove(self)
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:
                pass


class Bus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, items: Sequence[BusItem]) -> None:
        """Deliver to every subscriber (of every process, for a shared bus)."""

    def subscribe(self, name: str, maxsize: int = 1000) -> Subscription: ...


class InProcessBus:
    """Fan-out within one process; publish never awaits a subscriber."""

    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for sub in list(self._subscribers):
            sub.close()

    async def publish(self, items: Sequence[BusItem]) -> None:
        self.deliver_local(items)

    def deliver_local(self, items: Sequence[BusItem]) -> None:
        """Hand items to this process's subscribers (a shared bus calls this on receipt)."""
        for sub in tuple(self._subscribers):
            for item in items:
                sub.offer(item)

    def subscribe(self, name: str, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, name, maxsize)
        self._subscribers.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        try:
            self._subscribers.remove(sub)
        except ValueError:
            pass

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
