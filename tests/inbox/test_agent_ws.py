"""The agents' WebSocket: live events, resume without gaps or duplicates, collision notices."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, WSServerHandshakeError
from aiohttp.test_utils import TestClient

from hub.app import BUS
from hub.bus import Signal
from hub.inbox.api import PRESENCE, SOCKETS
from hub.inbox.realtime import CLOSE_SIGNED_OUT, SocketSettings
from hub.model import Presence
from tests.inbox.conftest import Customers, Tokens, auth, eventually

Connect = Callable[[str], Awaitable[Any]]


async def next_frame(ws: Any, wanted: Callable[[dict[str, Any]], bool], within: float = 5) -> dict:
    """The next frame matching `wanted`, skipping others (presence, conversation updates)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError("no matching frame in time")
        frame: dict[str, Any] = await ws.receive_json(timeout=remaining)
        if wanted(frame):
            return frame


async def frames_until(ws: Any, last: Callable[[dict[str, Any]], bool]) -> list[dict]:
    frames = []
    while True:
        frame = await ws.receive_json(timeout=5)
        frames.append(frame)
        if last(frame):
            return frames


def is_event(event_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == "event" and f["event"]["id"] == event_id


async def test_new_events_arrive_live(
    tokens: Tokens, customers: Customers, agent_ws: Connect
) -> None:
    ws = await agent_ws(tokens.alice)
    recorded = await customers.chat("visitor-live001", "is anyone there?")
    frame = await next_frame(ws, is_event(recorded.event.id))
    assert frame["event"]["text"] == "is anyone there?"
    assert frame["event"]["direction"] == "in"
    assert frame["event"]["conversation_id"] == recorded.conversation.id  # type: ignore[union-attr]


async def test_replies_and_status_changes_arrive_with_the_conversation(
    client: TestClient, tokens: Tokens, customers: Customers, agent_ws: Connect
) -> None:
    conv = (await customers.chat("visitor-live002")).conversation
    assert conv
    bob_ws = await agent_ws(tokens.bob)
    resp = await client.post(
        f"/api/v1/conversations/{conv.id}/replies",
        json={"text": "on it"},
        headers=auth(tokens.alice),
    )
    reply_id = (await resp.json())["event"]["id"]
    queued = await next_frame(bob_ws, is_event(reply_id))
    assert queued["event"]["delivery_state"] == "queued"
    update = await next_frame(bob_ws, lambda f: f["type"] == "conversation")
    assert update["conversation"]["id"] == conv.id
    assert update["conversation"]["first_response_at"] is not None
    # The outbox's delivery update reaches the page as the same event, further along.
    sent = await next_frame(bob_ws, is_event(reply_id))
    assert sent["event"]["delivery_state"] in ("sent", "delivered")

    await client.post(
        f"/api/v1/conversations/{conv.id}/status",
        json={"status": "resolved"},
        headers=auth(tokens.alice),
    )
    status = await next_frame(
        bob_ws, lambda f: f["type"] == "event" and f["event"]["kind"] == "status"
    )
    assert status["event"]["data"]["to"] == "resolved"
    changed = await next_frame(bob_ws, lambda f: f["type"] == "conversation")
    assert changed["conversation"]["status"] == "resolved"


async def test_resume_replays_exactly_the_missed_events(
    client: TestClient, tokens: Tokens, customers: Customers, agent_ws: Connect
) -> None:
    first = await customers.chat("visitor-resume1", "one")
    conv = first.conversation
    assert conv
    # The page was closed while these happened.
    missed = [
        (await customers.chat("visitor-resume1", "two")).event.id,
        (await customers.chat("visitor-resume1", "three")).event.id,
    ]
    resp = await client.post(
        f"/api/v1/conversations/{conv.id}/notes", json={"text": "hmm"}, headers=auth(tokens.bob)
    )
    missed.append((await resp.json())["event"]["id"])

    ws = await agent_ws(tokens.alice)
    # One more arrives live after reconnecting and before the resume: it must show once.
    live = await customers.chat("visitor-resume1", "four")
    missed.append(live.event.id)
    await ws.send_json({"type": "resume", "conversation_id": conv.id, "after": first.event.id})
    frames = await frames_until(ws, lambda f: f["type"] == "resumed")
    events = [f["event"]["id"] for f in frames if f["type"] == "event"]
    # "four" may come live before the replay or within it, but exactly once.
    assert sorted(events) == missed
    assert frames[-1]["last_event_id"] == missed[-1]

    # Nothing is sent twice afterwards either; the next frame is the next new event.
    later = await customers.chat("visitor-resume1", "five")
    frame = await next_frame(ws, lambda f: f["type"] == "event")
    assert frame["event"]["id"] == later.event.id

    # Resuming from the start replays the whole conversation the socket has not sent.
    ws2 = await agent_ws(tokens.sam)
    await ws2.send_json({"type": "resume", "conversation_id": conv.id, "after": None})
    frames = await frames_until(ws2, lambda f: f["type"] == "resumed")
    assert [f["event"]["id"] for f in frames if f["type"] == "event"] == [
        first.event.id,
        *missed,
        later.event.id,
    ]


async def test_viewing_and_typing_reach_other_agents_only(
    tokens: Tokens, customers: Customers, agent_ws: Connect
) -> None:
    conv = (await customers.chat("visitor-collide1")).conversation
    assert conv
    alice = await agent_ws(tokens.alice)
    bob = await agent_ws(tokens.bob)
    await alice.send_json({"type": "viewing", "conversation_id": conv.id})
    frame = await next_frame(bob, lambda f: f["type"] == "signal" and f["kind"] == "viewing")
    assert frame["conversation_id"] == conv.id
    assert frame["agent_id"] == "alice" and frame["agent_name"] == "Alice Example"

    await alice.send_json({"type": "typing", "conversation_id": conv.id})
    frame = await next_frame(bob, lambda f: f["type"] == "signal" and f["kind"] == "typing")
    assert frame["agent_id"] == "alice" and frame["active"] is True

    # Alice is not told about herself: her next frame is the answer to her ping.
    await alice.send_json({"type": "ping"})
    frames = await frames_until(alice, lambda f: f["type"] == "pong")
    assert not [f for f in frames if f["type"] == "signal" and f["kind"] in ("viewing", "typing")]


async def test_bad_frames_get_an_error_and_the_socket_stays(
    tokens: Tokens, agent_ws: Connect
) -> None:
    ws = await agent_ws(tokens.alice)
    for raw in (
        "not json",
        "[1]",
        '{"type": "dance"}',
        '{"type": "viewing"}',
        '{"type": "resume", "conversation_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}',
        '{"type": "resume", "conversation_id": "x", "after": 5}',
    ):
        await ws.send_str(raw)
        frame = await next_frame(ws, lambda f: f["type"] == "error")
        assert frame["error"], raw
    await ws.send_json({"type": "ping"})
    await next_frame(ws, lambda f: f["type"] == "pong")


async def test_a_socket_that_fell_behind_is_told_to_resync(
    client: TestClient, tokens: Tokens, agent_ws: Connect
) -> None:
    app = client.server.app
    app[SOCKETS].settings = SocketSettings(queue_size=2)
    ws = await agent_ws(tokens.alice)
    # Published in one go, faster than any socket drains: the bus drops for this one.
    await app[BUS].publish([Signal(kind="test", data={"n": n}) for n in range(50)])
    frame = await next_frame(ws, lambda f: f["type"] == "resync")
    assert frame == {"type": "resync"}


async def test_presence_follows_the_sockets_with_a_grace_period(
    client: TestClient, tokens: Tokens, agent_ws: Connect
) -> None:
    registry = client.server.app[PRESENCE]
    assert await registry.get("alice") is Presence.OFFLINE
    bob = await agent_ws(tokens.bob)
    alice = await agent_ws(tokens.alice)
    assert await registry.get("alice") is Presence.ONLINE
    signal = await next_frame(
        bob,
        lambda f: f["type"] == "signal" and f["kind"] == "presence" and f["agent_id"] == "alice",
    )
    assert signal["presence"] == "online"
    await alice.close()
    await asyncio.sleep(0.3)
    # A reload is not a departure: still online within the grace period (1 s here).
    assert await registry.get("alice") is Presence.ONLINE

    async def away() -> bool:
        return await registry.get("alice") is Presence.AWAY

    await eventually(away, within=5)
    signal = await next_frame(
        bob,
        lambda f: f["type"] == "signal" and f["kind"] == "presence" and f["agent_id"] == "alice",
    )
    assert signal["presence"] == "away"


async def test_a_chosen_away_survives_reconnecting(
    client: TestClient, tokens: Tokens, agent_ws: Connect
) -> None:
    resp = await client.put(
        "/api/v1/me/presence", json={"presence": "away"}, headers=auth(tokens.alice)
    )
    assert resp.status == 200
    await agent_ws(tokens.alice)
    assert await client.server.app[PRESENCE].get("alice") is Presence.AWAY


async def test_logout_closes_the_socket(
    client: TestClient, tokens: Tokens, agent_ws: Connect
) -> None:
    ws = await agent_ws(tokens.alice)
    resp = await client.post("/api/v1/auth/logout", headers=auth(tokens.alice))
    assert resp.status == 204
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is not WSMsgType.TEXT:
            break
    # The page can tell "signed out" (don't reconnect) from a network drop.
    assert msg.type is WSMsgType.CLOSE and msg.data == CLOSE_SIGNED_OUT
    assert await client.server.app[PRESENCE].get("alice") is Presence.OFFLINE
    with pytest.raises(WSServerHandshakeError) as caught:
        await client.ws_connect(f"/api/v1/ws?token={tokens.alice}")
    assert caught.value.status == 401


async def test_offers_and_hand_overs_reach_only_the_agent_they_name(
    app: Any, tokens: Tokens, agent_ws: Connect
) -> None:
    alice = await agent_ws(tokens.alice)
    bob = await agent_ws(tokens.bob)
    await app[BUS].publish(
        [
            Signal(kind="offer", conversation_id="c1", data={"agent_id": "alice"}),
            Signal(kind="assigned", conversation_id="c1", data={"agent_id": "alice"}),
            Signal(kind="viewing", conversation_id="c1", data={"agent_id": "carol"}),
        ]
    )
    offer = await next_frame(alice, lambda f: f.get("kind") == "offer")
    assert offer["conversation_id"] == "c1"
    await next_frame(alice, lambda f: f.get("kind") == "assigned")
    # Bob gets the public signal published after them, and nothing addressed to Alice
    # before it (the bus keeps order per subscriber).
    frames = await frames_until(bob, lambda f: f.get("kind") == "viewing")
    kinds = [f.get("kind") for f in frames if f["type"] == "signal"]
    assert "offer" not in kinds and "assigned" not in kinds
