"""Outgoing webhooks, checked by an independent receiver: its own aiohttp server on a
free loopback port, verifying every delivery with the Python snippet published in
docs/webhooks.md (extracted from the page and run as is). A receiver that is down for a
while, or a hub restart, still ends with every event, once, in order."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from hub.model import (
    ChannelType,
    DeliveryState,
    Direction,
    Event,
    EventKind,
    utcnow,
)
from hub.reports.integrations import WEBHOOKS
from hub.reports.webhooks import Delivery, StateQueue, classify, make_delivery, sign
from hub.timeline.sqlite import SqliteStore
from tests.integrations.conftest import MakeHub, eventually

SECRET = "s3cret-for-the-receiver-0123456789"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def documented_verifier() -> Callable[..., bool]:
    """The verification function exactly as docs/webhooks.md publishes it."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Verifying") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert snippet is not None, "docs/webhooks.md lost its Python snippet"
    namespace: dict[str, Any] = {}
    exec(compile(snippet.group(1), str(DOCS), "exec"), namespace)
    verifier: Callable[..., bool] = namespace["verify_hub_webhook"]
    return verifier


verify_hub_webhook = documented_verifier()


class Receiver:
    """Somebody else's webhook endpoint. Knows the secret and the docs, nothing else."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = 0
        self.attempts: list[tuple[str, str, str]] = []  # (id, timestamp, signature)
        self.accepted: dict[str, dict[str, Any]] = {}  # first delivery of each id
        self.order: list[str] = []
        self.repeats = 0
        self.forged = 0
        self.fail_next = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/hub?source=test"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        self.attempts.append(
            (
                headers.get("Hub-Webhook-Id", ""),
                headers.get("Hub-Webhook-Timestamp", ""),
                headers.get("Hub-Webhook-Signature", ""),
            )
        )
        if not verify_hub_webhook(self.secret, headers, body):
            self.forged += 1
            return web.Response(status=401)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500)
        payload = json.loads(body)
        delivery_id = headers["Hub-Webhook-Id"]
        assert payload["id"] == delivery_id and payload["type"] == headers["Hub-Webhook-Event"]
        if delivery_id in self.accepted:
            self.repeats += 1
        else:
            self.accepted[delivery_id] = payload
            self.order.append(delivery_id)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/hub", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def texts(self) -> list[str]:
        return [self.accepted[i]["data"]["event"]["text"] for i in self.order]


def webhook_yaml(url: str, events: str = "[message.received]", max_attempts: int = 20) -> str:
    return f"""
webhooks:
  - name: crm
    url: "{url}"
    events: {events}
    secret: {SECRET}
    timeout_seconds: 2
    max_attempts: {max_attempts}
"""


async def started_receiver() -> Receiver:
    receiver = Receiver(SECRET)
    await receiver.start()
    return receiver


# --- the documented snippet -----------------------------------------------------------------


def signed(timestamp: str, body: bytes) -> dict[str, str]:
    return {
        "Hub-Webhook-Timestamp": timestamp,
        "Hub-Webhook-Signature": sign(SECRET, timestamp, body),
    }


def test_documented_snippet_refuses_tampering_and_old_timestamps() -> None:
    delivery = make_delivery("message.received", "01TEST", {"event": {"text": "hi"}})
    now = str(int(time.time()))
    good = signed(now, delivery.body)
    assert verify_hub_webhook(SECRET, good, delivery.body)
    assert not verify_hub_webhook(SECRET, good, delivery.body.replace(b"hi", b"ho"))
    assert not verify_hub_webhook("another-secret-0123456789", good, delivery.body)
    old = str(int(time.time()) - 3600)
    stale = {
        "Hub-Webhook-Timestamp": old,
        "Hub-Webhook-Signature": sign(SECRET, old, delivery.body),
    }
    assert not verify_hub_webhook(SECRET, stale, delivery.body)
    assert not verify_hub_webhook(SECRET, {}, delivery.body)


# --- deliveries ---------------------------------------------------------------------------------


async def test_chosen_events_arrive_signed(make_hub: MakeHub) -> None:
    receiver = await started_receiver()
    try:
        hub = await make_hub(webhook_yaml(receiver.url, "[message.received, conversation.status]"))
        recorded = await hub.chat("visitor-hook", "Hello from the widget")
        await hub.agent_reply(recorded.event.conversation_id or "")  # message.sent: not chosen

        async def arrived() -> bool:
            return len(receiver.accepted) >= 1

        await eventually(arrived)
        [delivery_id] = receiver.order
        payload = receiver.accepted[delivery_id]
        assert delivery_id == recorded.event.id
        assert payload["type"] == "message.received"
        event = payload["data"]["event"]
        assert event["text"] == "Hello from the widget" and event["channel"] == "web"
        assert event["customer_id"] == recorded.customer.id
        assert receiver.forged == 0 and receiver.repeats == 0
        await asyncio.sleep(0.2)
        assert len(receiver.accepted) == 1  # the agent's reply was not subscribed to
    finally:
        await receiver.stop()


async def test_a_receiver_down_for_a_while_gets_every_event_once_back(make_hub: MakeHub) -> None:
    receiver = await started_receiver()
    hub = await make_hub(webhook_yaml(receiver.url))
    sender = hub.app[WEBHOOKS].senders["crm"]
    sender.retry_delay = lambda attempts: 0.05 * attempts  # the real 1 s doubling, sped up
    await receiver.stop()  # the receiver goes down
    texts = [f"message {n}" for n in range(6)]
    for text in texts:
        await hub.chat(f"visitor-{text[-1]}", text)

    async def failing() -> bool:
        return sender.outcomes["failed_attempt"] >= 3

    await eventually(failing)
    assert receiver.accepted == {} and len(sender.queue) == 6
    await receiver.start()  # back, on the same port

    async def all_in() -> bool:
        return len(receiver.accepted) == 6

    await eventually(all_in)
    assert receiver.texts() == texts  # every event, in order
    assert receiver.forged == 0 and receiver.repeats == 0
    assert len(sender.queue) == 0 and sender.outcomes["ok"] == 6
    await receiver.stop()


async def test_queued_deliveries_survive_a_hub_restart(make_hub: MakeHub) -> None:
    receiver = await started_receiver()
    await receiver.stop()
    hub = await make_hub(webhook_yaml(receiver.url))
    for n in range(3):
        await hub.chat(f"visitor-r{n}", f"before restart {n}")
    sender = hub.app[WEBHOOKS].senders["crm"]

    async def queued() -> bool:
        return len(sender.queue) == 3

    await eventually(queued)
    await hub.client.close()  # the hub stops with three deliveries undelivered

    await receiver.start()
    try:
        again = await make_hub(webhook_yaml(receiver.url))
        await again.chat("visitor-r9", "after restart")

        async def all_in() -> bool:
            return len(receiver.accepted) == 4

        await eventually(all_in)
        assert receiver.texts() == [
            "before restart 0",
            "before restart 1",
            "before restart 2",
            "after restart",
        ]
        assert receiver.repeats == 0
    finally:
        await receiver.stop()


async def test_failed_attempts_keep_the_delivery_id_and_give_up_after_max_attempts(
    make_hub: MakeHub,
) -> None:
    receiver = await started_receiver()
    try:
        hub = await make_hub(webhook_yaml(receiver.url, max_attempts=2))
        sender = hub.app[WEBHOOKS].senders["crm"]
        sender.retry_delay = lambda attempts: 0.05
        receiver.fail_next = 3  # first delivery: 2 failures, dropped; second: 1, then ok
        first = await hub.chat("visitor-f1", "doomed")
        second = await hub.chat("visitor-f2", "delivered")

        async def done() -> bool:
            return len(receiver.accepted) == 1

        await eventually(done)
        assert receiver.order == [second.event.id]
        ids = [a[0] for a in receiver.attempts]
        assert ids == [first.event.id, first.event.id, second.event.id, second.event.id]
        assert len({a[2] for a in receiver.attempts}) >= 2  # re-signed per attempt
        assert sender.outcomes == {"failed_attempt": 3, "dropped": 1, "ok": 1}
    finally:
        await receiver.stop()


# --- units ----------------------------------------------------------------------------------------


def outbound(state: DeliveryState | None, error: str | None = None) -> Event:
    return Event(
        id="01JD3ZK8V4T2X6Q9B1N5M7C0RA",
        customer_id="K",
        conversation_id="C",
        channel="sms",
        channel_type=ChannelType.SMS,
        direction=Direction.OUT,
        kind=EventKind.MESSAGE,
        author="agent:alice",
        created_at=utcnow(),
        delivery_state=state,
        delivery_error=error,
    )


def test_classify_gives_stable_ids_through_a_message_lifecycle() -> None:
    queued = outbound(DeliveryState.QUEUED)
    assert classify(queued)[:2] == ("message.sent", queued.id)  # type: ignore[index]
    assert classify(outbound(DeliveryState.QUEUED, "HTTP 503")) is None  # retrying
    sent = classify(outbound(DeliveryState.SENT))
    delivered = classify(outbound(DeliveryState.DELIVERED))
    assert sent is not None and delivered is not None
    assert sent[:2] == ("message.delivery", f"{queued.id}.sent")
    assert delivered[:2] == ("message.delivery", f"{queued.id}.delivered")
    breach = replace(queued, kind=EventKind.STATUS, direction=Direction.INTERNAL, data={"sla": "x"})
    assert classify(breach)[0] == "sla.breach"  # type: ignore[index]
    csat = replace(queued, direction=Direction.IN, data={"csat": {"score": 5}})
    assert classify(csat)[0] == "csat.received"  # type: ignore[index]


async def test_state_queue_keeps_order_and_reports_overflow(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.db")
    await store.start()
    try:
        queue = StateQueue(store, "webhooks.t", capacity=3)
        await queue.load()
        await queue.push([Delivery(f"d{n}", "x", b"{}") for n in range(2)])
        reopened = StateQueue(store, "webhooks.t", capacity=3)
        await reopened.load()
        assert len(reopened) == 2
        head = await reopened.peek()
        assert head is not None and head[1] is not None and head[1].id == "d0"
        await reopened.pop(head[0])
        await reopened.push([Delivery(f"d{n}", "x", b"{}") for n in range(2, 6)])
        # Capacity 3: d1 and d2 fell off the front; d3..d5 wait.
        assert len(reopened) == 3 and reopened.dropped == 2
        seen = []
        while (item := await reopened.peek()) is not None:
            assert item[1] is not None
            seen.append(item[1].id)
            await reopened.pop(item[0])
        assert seen == ["d3", "d4", "d5"]
        assert await store.get_state("webhooks.t.slot.0") == ""  # delivered slots blanked
    finally:
        await store.close()
