"""Outgoing webhooks: chosen hub events POSTed as signed JSON, durably, at least once.

docs/webhooks.md is the receiver's guide (headers, payloads, a verification snippet,
retries). In short, each delivery is

    POST <url>
    Content-Type: application/json
    Hub-Webhook-Id: <delivery id: the same on every retry; de-duplicate on it>
    Hub-Webhook-Event: <event type>
    Hub-Webhook-Timestamp: <unix seconds of this attempt>
    Hub-Webhook-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

    {"id": <delivery id>, "type": <event type>, "created_at": ISO, "data": {...}}

Durability: the dispatcher (leader process only) reads the bus, turns each item a
webhook subscribes to into a delivery, and appends it to that webhook's queue in the
store's small state (`StateQueue`: a ring of slots with a head and a tail key), before
anything is sent. A sender per webhook delivers its queue in order, one at a time; a
delivery leaves the queue only after a 2xx answer, so a receiver that is down (or a hub
restart) only delays deliveries. Failed attempts back off exponentially (1 s doubling,
at most 5 min, with jitter); after `max_attempts` a delivery is dropped (logged and
counted) so one poisoned event cannot block the rest forever.

Known limits: events published while no process leads (a failover) are not queued; a
queue holds at most `QUEUE_CAPACITY` deliveries, beyond which the oldest are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from hub.bus import Bus, BusItem, Signal, Subscription
from hub.config import WebhookConfig
from hub.model import Direction, EventKind, event_to_dict, iso, utcnow
from hub.outbox import retry_delay
from hub.timeline.store import StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

ID_HEADER = "Hub-Webhook-Id"
EVENT_HEADER = "Hub-Webhook-Event"
TIMESTAMP_HEADER = "Hub-Webhook-Timestamp"
SIGNATURE_HEADER = "Hub-Webhook-Signature"
USER_AGENT = "hub-webhooks/1"
QUEUE_CAPACITY = 100_000
STATE_PREFIX = "webhooks."
# Delivery ids recently queued, to skip an item the bus hands over twice.
RECENT_IDS = 20_000


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + digest.hexdigest()


# --- what is sent -----------------------------------------------------------------------

_KIND_TYPES = {
    EventKind.NOTE: "note.created",
    EventKind.CALL: "call",
    EventKind.VOICEMAIL: "voicemail",
    EventKind.STATUS: "conversation.status",
    EventKind.ASSIGNMENT: "conversation.assigned",
    EventKind.MERGE: "customer.merged",
    EventKind.DELIVERY: "message.delivery",
}


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str  # stable across retries and restarts: the receiver's de-duplication key
    type: str
    body: bytes  # the exact JSON that is signed and sent


def classify(item: BusItem) -> tuple[str, str, dict[str, Any]] | None:
    """(event type, delivery id, payload data) of a bus item, or None if never sent."""
    if isinstance(item, Signal):
        if item.kind != "sla_warning":
            return None  # breaches are sent from their timeline event; the rest is chatter
        data = dict(item.data)
        key = f"sla-warning.{item.conversation_id}.{data.get('sla')}.{data.get('cycle')}"
        data.update(conversation_id=item.conversation_id, customer_id=item.customer_id)
        return "sla.warning", key, data
    event = item
    body = {"event": event_to_dict(event)}
    if "csat" in event.data and event.direction is Direction.IN:
        return "csat.received", event.id, {**body, "csat": dict(event.data["csat"])}
    if event.kind is EventKind.STATUS and "sla" in event.data:
        return "sla.breach", event.id, body
    if event.kind is EventKind.MESSAGE:
        if event.direction is Direction.IN:
            return "message.received", event.id, body
        state = event.delivery_state
        if state is None or (state.value == "queued" and not event.delivery_error):
            return "message.sent", event.id, body
        if state.value == "queued":
            return None  # a retry in progress: the final outcome is what receivers want
        return "message.delivery", f"{event.id}.{state.value}", body
    event_type = _KIND_TYPES.get(event.kind)
    return (event_type, event.id, body) if event_type else None


def make_delivery(event_type: str, delivery_id: str, data: Mapping[str, Any]) -> Delivery:
    payload = {"id": delivery_id, "type": event_type, "created_at": iso(utcnow()), "data": data}
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Delivery(delivery_id, event_type, body)


# --- the durable queue ----------------------------------------------------------------------


class StateQueue:
    """A FIFO of deliveries in the store's key/value state: `<prefix>.head`,
    `<prefix>.tail` and one `<prefix>.slot.<n % capacity>` per entry.

    One writer (the leader's dispatcher and sender, serialized by a lock). An entry is
    written before the tail moves past it, and the head moves only after a delivery
    succeeded, so a crash at any point loses nothing that was queued and at worst sends
    one delivery again (same id). Delivered slots are blanked to keep the state small.
    """

    def __init__(self, store: TimelineStore, prefix: str, capacity: int = QUEUE_CAPACITY) -> None:
        self.store = store
        self.prefix = prefix
        self.capacity = capacity
        self.head = 0
        self.tail = 0
        self.dropped = 0
        self._lock = asyncio.Lock()

    def _slot(self, seq: int) -> str:
        return f"{self.prefix}.slot.{seq % self.capacity}"

    async def load(self) -> None:
        self.head = int(await self.store.get_state(f"{self.prefix}.head") or 0)
        self.tail = int(await self.store.get_state(f"{self.prefix}.tail") or 0)
        self.tail = max(self.tail, self.head)

    def __len__(self) -> int:
        return self.tail - self.head

    async def push(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        async with self._lock:
            start = self.tail
            writes = [
                self.store.set_state(
                    self._slot(start + i),
                    json.dumps(
                        {"seq": start + i, "id": d.id, "type": d.type, "body": d.body.decode()},
                        ensure_ascii=False,
                    ),
                )
                for i, d in enumerate(deliveries)
            ]
            await asyncio.gather(*writes)
            self.tail = start + len(deliveries)
            await self.store.set_state(f"{self.prefix}.tail", str(self.tail))
            overflow = len(self) - self.capacity
            if overflow > 0:
                # The ring wrapped onto undelivered entries: those are lost; say so.
                self.head += overflow
                self.dropped += overflow
                await self.store.set_state(f"{self.prefix}.head", str(self.head))
                log.error("webhooks.queue_overflow", queue=self.prefix, dropped=overflow)

    async def peek(self) -> tuple[int, Delivery | None] | None:
        """(seq, delivery) at the head; delivery None for an unreadable slot. None: empty."""
        async with self._lock:
            if self.head >= self.tail:
                return None
            seq = self.head
        raw = await self.store.get_state(self._slot(seq))
        try:
            entry = json.loads(raw or "")
            if entry.get("seq") != seq:
                raise ValueError("stale slot")
            return seq, Delivery(str(entry["id"]), str(entry["type"]), entry["body"].encode())
        except (ValueError, KeyError, TypeError, AttributeError):
            return seq, None

    async def pop(self, seq: int) -> None:
        async with self._lock:
            if seq != self.head:
                return  # the overflow above moved past it meanwhile
            self.head = seq + 1
            await asyncio.gather(
                self.store.set_state(f"{self.prefix}.head", str(self.head)),
                self.store.set_state(self._slot(seq), ""),
            )


# --- sending ------------------------------------------------------------------------------


class WebhookSender:
    """Delivers one webhook's queue, in order, with retries."""

    def __init__(
        self,
        cfg: WebhookConfig,
        store: TimelineStore,
        session: aiohttp.ClientSession,
        *,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = StateQueue(store, f"{STATE_PREFIX}{cfg.name}")
        self.session = session
        self.retry_delay: Callable[[int], float] = retry_delay
        self._observe = observe
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.outcomes: Counter[str] = Counter()  # ok, failed_attempt, dropped
        self.last_success_at: float | None = None
        self.attempts = 0  # of the delivery at the head
        self.log = log.bind(webhook=cfg.name)

    async def start(self) -> None:
        await self.queue.load()
        self._task = asyncio.create_task(self._run(), name=f"webhook-{self.cfg.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def enqueue(self, deliveries: Sequence[Delivery]) -> None:
        await self.queue.push(deliveries)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                head = await self.queue.peek()
            except StoreUnavailable as exc:
                self.log.warning("webhooks.store_unavailable", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            seq, delivery = head
            if delivery is None:
                self.log.error("webhooks.unreadable_entry", seq=seq)
                await self.queue.pop(seq)
                continue
            await self._attempt(seq, delivery)

    async def _attempt(self, seq: int, delivery: Delivery) -> None:
        self.attempts += 1
        bound = self.log.bind(delivery=delivery.id, type=delivery.type, attempt=self.attempts)
        ok, reason = await self.post(delivery)
        if ok:
            self.outcomes["ok"] += 1
            self.last_success_at = time.time()
            self.attempts = 0
            bound.info("webhooks.delivered")
            await self.queue.pop(seq)
            return
        self.outcomes["failed_attempt"] += 1
        if self.attempts >= self.cfg.max_attempts:
            self.outcomes["dropped"] += 1
            bound.error("webhooks.gave_up", reason=reason)
            self.attempts = 0
            await self.queue.pop(seq)
            return
        delay = self.retry_delay(self.attempts)
        bound.info("webhooks.retry", reason=reason, delay=round(delay, 3))
        await asyncio.sleep(delay)

    async def post(self, delivery: Delivery) -> tuple[bool, str]:
        """One attempt: (2xx?, why not)."""
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            ID_HEADER: delivery.id,
            EVENT_HEADER: delivery.type,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.cfg.secret, timestamp, delivery.body),
        }
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.cfg.url,
                data=delivery.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            if self._observe is not None:
                self._observe(self.cfg.name, time.perf_counter() - started)
        if 200 <= status < 300:
            return True, ""
        return False, f"HTTP {status}"


class WebhookDispatcher:
    """Reads the bus and queues each item for every webhook that wants its type."""

    def __init__(
        self,
        webhooks: Sequence[WebhookConfig],
        store: TimelineStore,
        bus: Bus,
        *,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.bus = bus
        self.store = store
        self._webhooks = webhooks
        self._observe = observe
        self.senders: dict[str, WebhookSender] = {}
        self._session: aiohttp.ClientSession | None = None
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._recent: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        # Subscribe before anything else, so nothing published from now on is missed.
        self._subscription = self.bus.subscribe("webhooks", maxsize=50_000)
        self._session = aiohttp.ClientSession()
        for cfg in self._webhooks:
            sender = WebhookSender(cfg, self.store, self._session, observe=self._observe)
            await sender.start()
            self.senders[cfg.name] = sender
        self._task = asyncio.create_task(self._consume(self._subscription), name="webhooks")

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sender in self.senders.values():
            await sender.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _consume(self, subscription: Subscription) -> None:
        while True:
            batch = [await subscription.get()]
            # Whatever else is already waiting goes in the same writes.
            while subscription.pending() and len(batch) < 500:
                batch.append(await subscription.get())
            while True:
                try:
                    await self.dispatch(batch)
                    break
                except StoreUnavailable as exc:
                    # Keep the batch: retrying is what makes "queued" mean "will be sent".
                    log.warning("webhooks.store_unavailable", error=str(exc))
                    await asyncio.sleep(1.0)
                except Exception:
                    log.exception("webhooks.dispatch_failed")
                    break

    async def dispatch(self, items: Sequence[BusItem]) -> int:
        """Queue `items` for the webhooks that want them; returns deliveries queued."""
        per_hook: dict[str, list[Delivery]] = {}
        ids: dict[str, None] = {}
        for item in items:
            found = classify(item)
            if found is None:
                continue
            event_type, delivery_id, data = found
            if delivery_id in self._recent or delivery_id in ids:
                continue
            ids[delivery_id] = None
            delivery: Delivery | None = None
            for cfg in self._webhooks:
                if cfg.wants(event_type):
                    delivery = delivery or make_delivery(event_type, delivery_id, data)
                    per_hook.setdefault(cfg.name, []).append(delivery)
        for name, deliveries in per_hook.items():
            await self.senders[name].enqueue(deliveries)
        # Only once queued: a batch retried after a store outage must not be skipped.
        self._recent.update(ids)
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return sum(len(d) for d in per_hook.values())


__all__ = [
    "EVENT_HEADER",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Delivery",
    "StateQueue",
    "WebhookDispatcher",
    "WebhookSender",
    "classify",
    "make_delivery",
    "sign",
]
