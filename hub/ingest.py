"""The one path from an adapter's `Inbound` to stored, threaded, published facts."""

from __future__ import annotations

from dataclasses import replace

import structlog

from hub.bus import Bus
from hub.model import Inbound, Recorded
from hub.timeline.store import TimelineStore

log = structlog.get_logger(__name__)


class Ingestor:
    """Stores an inbound contact durably, then announces it on the bus.

    Returning means the event is committed: callers (webhook handlers) acknowledge the
    provider only after `ingest` returns, so an acknowledged message is never lost.
    Routing and fan-out hang off the bus, not this call, to keep webhooks fast.
    """

    def __init__(self, store: TimelineStore, bus: Bus) -> None:
        self._store = store
        self._bus = bus

    async def ingest(self, inbound: Inbound) -> Recorded:
        if not inbound.routable and inbound.data.get("routable") is not False:
            # The router reads this off the stored event: auto-replies and bounces are
            # kept on the timeline but never handed to an agent.
            inbound = replace(inbound, data={**inbound.data, "routable": False})
        recorded = await self._store.record_inbound(inbound)
        event = recorded.event
        if recorded.created:
            await self._bus.publish([*recorded.side_events, event])
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
