"""Durable, retried delivery of outbound messages.

The outbox *is* the store: an outbound event appended with delivery_state QUEUED is the
job. This worker claims due jobs with a lease (so a crash mid-send only delays it, and
several processes never send one message twice at the same time), hands them to the
channel adapter, and records the outcome on the event for the agent to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from datetime import timedelta

import structlog

from hub.bus import Bus
from hub.channels.base import ChannelAdapter, PermanentSendError, TemporarySendError
from hub.model import DeliveryState, Event, Identity, IdentityKind, Outbound, utcnow
from hub.timeline.store import OutboxItem, StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 12
LEASE = timedelta(seconds=60)
# How long stop() lets sends already on their way finish. Cancelling one the provider has
# accepted would leave it queued, and the next start would send it a second time.
STOP_GRACE_SECONDS = 20.0


def retry_delay(attempts: int) -> float:
    """Exponential backoff with jitter: 1s, 2s, 4s ... capped at 5 minutes."""
    base: float = min(2.0 ** max(attempts - 1, 0), 300.0)
    return base * random.uniform(0.8, 1.2)


def outbound_from_event(event: Event, attempts: int) -> Outbound:
    to = event.data.get("to") or {}
    if event.channel_type is None:
        raise PermanentSendError("event has no channel type")
    return Outbound(
        event_id=event.id,
        channel=event.channel,
        channel_type=event.channel_type,
        to=Identity(kind=IdentityKind(to.get("kind", "chat")), value=str(to.get("value", ""))),
        text=event.text,
        html=event.html,
        attachments=event.attachments,
        customer_id=event.customer_id,
        conversation_id=event.conversation_id or "",
        thread_refs=tuple(event.data.get("thread_refs", ())),
        thread_key=event.data.get("thread_key"),
        attempt=attempts + 1,
    )


class OutboxWorker:
    def __init__(
        self,
        store: TimelineStore,
        bus: Bus,
        adapters: Mapping[str, ChannelAdapter],
        *,
        poll_seconds: float = 1.0,
        batch: int = 50,
    ) -> None:
        self._store = store
        self._bus = bus
        self._adapters = adapters
        self._poll_seconds = poll_seconds
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def nudge(self) -> None:
        """Something was queued: look now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="outbox")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Take no new work, let deliveries in progress finish (up to `grace` seconds,
        then cancel them: those are sent again after their lease), and return."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _run(self) -> None:
        while not self._stopping:
            try:
                sent = await self.run_once()
            except StoreUnavailable as exc:
                log.warning("outbox.store_unavailable", error=str(exc))
                sent = 0
            except Exception:
                log.exception("outbox.crashed_iteration")
                sent = 0
            if self._stopping:
                break
            if sent >= self._batch:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)

    async def run_once(self) -> int:
        items = await self._store.claim_outbound(utcnow(), self._batch, LEASE)
        if items:
            await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def _deliver(self, item: OutboxItem) -> None:
        event = item.event
        bound = log.bind(
            channel=event.channel,
            customer=event.customer_id,
            conversation=event.conversation_id,
            event_id=event.id,
        )
        adapter = self._adapters.get(event.channel)
        attempts = item.attempts + 1
        try:
            if adapter is None:
                raise PermanentSendError(f"channel {event.channel!r} is not configured")
            result = await adapter.send(outbound_from_event(event, item.attempts))
        except PermanentSendError as exc:
            bound.warning("outbox.failed", error=str(exc), attempts=attempts)
            updated = await self._store.record_delivery(
                event.id, DeliveryState.FAILED, error=str(exc), attempts=attempts
            )
        except (TemporarySendError, OSError, TimeoutError) as exc:
            if attempts >= MAX_ATTEMPTS:
                bound.error("outbox.gave_up", error=str(exc), attempts=attempts)
                updated = await self._store.record_delivery(
                    event.id,
                    DeliveryState.FAILED,
                    error=f"gave up after {attempts} attempts: {exc}",
                    attempts=attempts,
                )
            else:
                delay = retry_delay(attempts)
                bound.info("outbox.retry", error=str(exc), attempts=attempts, delay=delay)
                updated = await self._store.record_delivery(
                    event.id,
                    DeliveryState.QUEUED,
                    error=str(exc),
                    retry_at=utcnow() + timedelta(seconds=delay),
                    attempts=attempts,
                )
        else:
            # A provider that "queued" the message has accepted it: for us it has left.
            # Recording QUEUED would put it back in the outbox and send it twice.
            state = DeliveryState.SENT if result.state is DeliveryState.QUEUED else result.state
            bound.info("outbox.sent", state=state.value, provider_id=result.provider_id)
            updated = await self._store.record_delivery(
                event.id, state, provider_id=result.provider_id, attempts=attempts
            )
        await self._bus.publish([updated])
