"""Two `hub serve` processes on one Redis behave as one hub (issue 3).

- A chat visitor on process A and an agent on process B talk live, both ways.
- The visitor's token, minted by A, is honoured by B (the hubs share one secret).
- 1,000 concurrent deliveries of one signed SMS webhook, split across both processes,
  are each answered 200 and store exactly one event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from hub.model import Identity, IdentityKind
from tests.multiprocess.conftest import (
    Frame,
    HubProcess,
    StartHubs,
    frame_where,
    login,
    open_store,
    post_sms,
    sms_params,
)
from tests.servers.redis import RedisFactory

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def is_event(text: str, direction: str) -> Callable[[Frame], bool]:
    def match(frame: Frame) -> bool:
        event = frame.get("event") or {}
        return (
            frame.get("type") == "event"
            and event.get("text") == text
            and event.get("direction") == direction
        )

    return match


async def visitor_hello(
    session: aiohttp.ClientSession, hub: HubProcess, **hello: Any
) -> tuple[aiohttp.ClientWebSocketResponse, Frame]:
    ws = await session.ws_connect(f"{hub.ws_url}/chat/web/ws")
    await ws.send_json({"type": "hello", **hello})
    welcome = await frame_where(ws, lambda f: f["type"] in ("welcome", "error"))
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def test_chat_on_one_process_reaches_an_agent_on_the_other(
    redis_factory: RedisFactory, start_hubs: StartHubs
) -> None:
    redis = redis_factory()
    a, b = await start_hubs(redis, 2)
    async with aiohttp.ClientSession() as session:
        token = await login(session, b)
        agent = await session.ws_connect(f"{b.ws_url}/api/v1/ws?token={token}")
        hello = await frame_where(agent, lambda f: True)
        assert hello["type"] == "hello", hello

        visitor, welcome = await visitor_hello(session, a, name="Vera Visitor")
        question = "Hello from process A: is my parcel on its way?"
        started = time.monotonic()
        await visitor.send_json({"type": "message", "client_id": "q1", "text": question})
        ack = await frame_where(visitor, lambda f: f["type"] in ("ack", "error"))
        assert ack["type"] == "ack", ack

        # Live on B: the event pushed through the Redis bus, not found by polling.
        seen = await frame_where(agent, is_event(question, "in"))
        assert seen["event"]["id"] == ack["event_id"]
        assert time.monotonic() - started < 5.0
        conversation_id = seen["event"]["conversation_id"]

        answer = "Hello from process B: it ships today."
        async with session.post(
            f"{b.url}/api/v1/conversations/{conversation_id}/replies",
            json={"text": answer},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 202, await response.text()
            reply = (await response.json())["event"]

        # ...and the reply reaches the visitor's socket on A.
        got = await frame_where(visitor, is_event(answer, "out"))
        assert got["event"]["id"] == reply["id"]
        # The agent on B sees it leave (delivered: A's outbox or B's found the socket).
        await frame_where(
            agent,
            lambda f: (
                f["type"] == "event"
                and f["event"]["id"] == reply["id"]
                and f["event"].get("delivery_state") in ("sent", "delivered")
            ),
        )

        # The token A minted works on B: the visitor resumes there, same identity,
        # and is replayed what came after the question.
        await visitor.close()
        resumed, again = await visitor_hello(
            session, b, token=welcome["token"], last_event_id=ack["event_id"]
        )
        assert again["visitor_id"] == welcome["visitor_id"]
        replayed = await frame_where(resumed, lambda f: f["type"] == "event")
        assert replayed["event"]["id"] == reply["id"]
        await resumed.close()
        await agent.close()


async def test_concurrent_duplicates_across_processes_store_one_event(
    redis_factory: RedisFactory, start_hubs: StartHubs
) -> None:
    redis = redis_factory()
    hubs = await start_hubs(redis, 2)
    sid = "SM" + "d0" * 16
    sender = "+12025550147"
    params = sms_params(sid, sender, "Same message, delivered a thousand times")
    deliveries = 1000
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Event()

        async def deliver(i: int) -> int:
            await gate.wait()
            return await post_sms(session, hubs[i % 2], params, within=60)

        tasks = [asyncio.create_task(deliver(i)) for i in range(deliveries)]
        await asyncio.sleep(0)
        gate.set()
        statuses = await asyncio.gather(*tasks, return_exceptions=True)

    errors = [s for s in statuses if not isinstance(s, int)]
    assert not errors, f"{len(errors)} failed, e.g. {errors[0]!r}"
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert counts == {200: deliveries}, counts

    async with open_store(redis) as store:
        event = await store.find_event("sms", sid)
        assert event is not None
        customer = await store.find_customer(Identity(IdentityKind.PHONE, sender))
        assert customer is not None and customer.id == event.customer_id
        page = await store.customer_timeline(customer.id, limit=200)
        stored = [e for e in page.items if e.external_id == sid]
        assert [e.id for e in stored] == [event.id]
        messages = [e for e in page.items if e.kind.value == "message"]
        assert len(messages) == 1, messages
