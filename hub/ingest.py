"""The one path from an adapter's `Inbound` to stored, threaded, published facts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from hub.bus import Bus
from hub.model import Inbound, Recorded
from hub.timeline.store import TimelineStore

log = structlog.get_logger(__name__)

# Takes an inbound it recognises (a CSAT rating answering a survey) and records it its
# own way through the store; None lets the normal path store it.
Interceptor = Callable[[Inbound], Awaitable[Recorded | None]]
# Sees every ingest after it is durable (metrics counters); must not raise or block.
Observer = Callable[[Inbound, Recorded], None]


class Ingestor:
    """Stores an inbound contact durably, then announces it on the bus.

    Returning means the event is committed: callers (webhook handlers) acknowledge the
    provider only after `ingest` returns, so an acknowledged message is never lost.
    Routing and fan-out hang off the bus, not this call, to keep webhooks fast.
    Consumers of the bus must treat an event id they have seen as already handled.
    """

    def __init__(self, store: TimelineStore, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._interceptors: list[Interceptor] = []
        self._observers: list[Observer] = []

    def add_interceptor(self, interceptor: Interceptor) -> Callable[[], None]:
        """Register; returns the function that unregisters it (for cleanup contexts)."""
        self._interceptors.append(interceptor)
        return lambda: self._interceptors.remove(interceptor)

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    async def ingest(self, inbound: Inbound) -> Recorded:
        if not inbound.routable and inbound.data.get("routable") is not False:
            # The router reads this off the stored event: auto-replies and bounces are
            # kept on the timeline but never handed to an agent.
            inbound = replace(inbound, data={**inbound.data, "routable": False})
        recorded: Recorded | None = None
        for interceptor in self._interceptors:
            recorded = await interceptor(inbound)
            if recorded is not None:
                break
        if recorded is None:
            recorded = await self._store.record_inbound(inbound)
        for observer in self._observers:
            observer(inbound, recorded)
        event = recorded.event
        # Announced again on redelivery: the first delivery may have been stored and then
        # lost its answer (a crash, a dropped Redis reply) before anyone heard of it.
        # Every subscriber keys on event ids, so a repeat changes nothing downstream.
        await self._bus.publish([*recorded.side_events, event])
        if recorded.created:
            log.info(
                "ingest.stored",
                channel=inbound.channel,
                customer=event.customer_id,
                conversation=event.conversation_id,
                event_id=event.id,
                kind=event.kind.value,
            )
        else:
            log.info(
                "ingest.duplicate",
                channel=inbound.channel,
                customer=event.customer_id,
                conversation=event.conversation_id,
                event_id=event.id,
                external_id=inbound.external_id,
            )
        return recorded
