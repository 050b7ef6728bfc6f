"""Hostile frames on both WebSockets: the visitor's (/chat/{channel}/ws) and the agents'.

Arbitrary text and binary frames, JSON of every shape, right frame types with wrong
fields: the server answers with error frames (or closes with its documented codes),
never with an "internal" error (an unhandled exception) or an abnormal close, and a
bystander socket opened before the barrage is still served after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from hypothesis import given
from hypothesis import strategies as st

from hub.app import INGESTOR
from hub.channels.visitor_tokens import user_hash
from hub.model import ChannelType, Identity, IdentityKind, Inbound
from tests.hostile.conftest import CHAT_CHANNEL, IDENTITY_SECRET, SHOP_CHANNEL, Hub, scaled

VISITOR_WS = f"/chat/{CHAT_CHANNEL}/ws"
RECEIVE_TIMEOUT = 5.0

# Error codes the visitor protocol documents (webchat.py); "internal" is not among the
# acceptable ones here: it means a frame raised something nobody expected.
VISITOR_ERROR_CODES = frozenset(
    {
        "bad_frame",
        "hello_required",
        "invalid_token",
        "too_long",
        "empty",
        "rate_limited",
        "invalid_email",
        "unsupported",
        "unavailable",
        "csat_closed",
    }
)
VISITOR_FRAME_TYPES = frozenset(
    {
        "welcome",
        "event",
        "typing",
        "agents",
        "error",
        "ack",
        "contact_saved",
        "csat_saved",
        "pong",
        "queue",
    }
)
AGENT_FRAME_TYPES = frozenset(
    {"hello", "event", "conversation", "customer", "signal", "resync", "resumed", "error", "pong"}
)
# 4400 bad hello, 4401 invalid token; 1000 a normal close.
VISITOR_REFUSAL_CLOSES = frozenset({4400, 4401})

# --- frames ----------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ID_LIKE = st.sampled_from(
    [
        "01HZZZZZZZZZZZZZZZZZZZZZZZ",
        "00000000000000000000000000",
        "0" * 25,
        "not-an-id",
        "",
        "ILOU" * 7,
    ]
)

# Raw JSON texts json.dumps would never write: lone surrogates, huge numbers, deep nesting,
# duplicate keys, NaN, trailing garbage.
RAW_TEXTS = st.sampled_from(
    [
        "",
        " ",
        "null",
        "[]",
        "{}",
        '"hello"',
        "{",
        '{"type":',
        '{"type": null}',
        '{"type": 1e999}',
        '{"type": NaN}',
        '{"type": "hello"} trailing',
        '{"type": "ping", "type": "message"}',
        '{"type": "message", "client_id": "a1", "text": "\\ud800"}',
        '{"type": "message", "client_id": "a2", "text": "ok \\udfff ok"}',
        '{"type": "contact", "email": "\\ud83d@example.com"}',
        '{"type": "hello", "name": "\\ud800"}',
        '{"type": "hello", "token": "\\udc80"}',
        '{"type": "resume", "conversation_id": "\\ud800"}',
        '{"type": "typing", "conversation_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "active": "\\ud800"}',
        '{"type": "message", "client_id": "a3", "text": ' + "9" * 5000 + "}",
        "[" * 5000 + "]" * 5000,
        '{"a":' * 2000 + "1" + "}" * 2000,
        "\x00",
        "\ufeff{}",
    ]
)


def typed_frames(types: list[str], extra_keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of a known type with fields of the wrong kinds (and some right ones)."""
    value = st.one_of(JSON_VALUES, ID_LIKE, st.text(max_size=600))
    return st.builds(
        lambda kind, fields: {"type": kind, **fields},
        st.one_of(st.sampled_from(types), JSON_VALUES),
        st.dictionaries(st.one_of(st.sampled_from(extra_keys), st.text(max_size=8)), value),
    )


VISITOR_TYPED = typed_frames(
    ["hello", "message", "typing", "contact", "csat", "ping", "event", "welcome"],
    [
        "client_id",
        "text",
        "email",
        "token",
        "last_event_id",
        "name",
        "user_id",
        "user_hash",
        "survey",
        "score",
        "comment",
    ],
)
AGENT_TYPED = typed_frames(
    ["resume", "viewing", "typing", "ping", "hello", "event", "error"],
    ["conversation_id", "after", "active", "agent_id", "from"],
)


def _vouched_hello(user_id: str, email: str, good: bool) -> dict[str, Any]:
    # The website's HMAC of what it vouches for: fuzzing reaches the identity-claim paths.
    value = email or user_id
    digest = user_hash(IDENTITY_SECRET, value) if good else "0" * 64
    hello: dict[str, Any] = {"type": "hello", "user_hash": digest}
    if user_id:
        hello["user_id"] = user_id
    if email:
        hello["email"] = email
    return hello


VOUCHED_HELLOS = st.builds(
    _vouched_hello,
    st.text(max_size=300),
    st.one_of(st.text(max_size=60), st.emails().map(str)),
    st.booleans(),
)


def frames(typed: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[tuple[str, Any]]:
    """(kind, payload): a text frame, a binary frame, or JSON of some shape as text."""
    return st.one_of(
        st.tuples(st.just("text"), st.text(max_size=300)),
        st.tuples(st.just("text"), RAW_TEXTS),
        st.tuples(st.just("bytes"), st.binary(max_size=300)),
        st.tuples(st.just("json"), JSON_VALUES),
        st.tuples(st.just("json"), typed),
    )


async def send_frame(ws: aiohttp.ClientWebSocketResponse, frame: tuple[str, Any]) -> None:
    kind, payload = frame
    if kind == "bytes":
        await ws.send_bytes(payload)
    elif kind == "json":
        await ws.send_str(json.dumps(payload))
    else:
        await ws.send_str(payload)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse, frame_type: str
) -> tuple[list[dict[str, Any]], aiohttp.WSMessage | None]:
    """Frames up to and including one of `frame_type`; (frames, close message) if closed."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=RECEIVE_TIMEOUT)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
            return seen, msg
        assert msg.type is WSMsgType.TEXT, (msg.type, msg.data)
        frame = json.loads(msg.data)
        assert isinstance(frame, dict), frame
        seen.append(frame)
        if frame.get("type") == frame_type:
            return seen, None


def check_visitor_frames(frames_seen: list[dict[str, Any]]) -> None:
    for frame in frames_seen:
        assert frame.get("type") in VISITOR_FRAME_TYPES, frame
        if frame["type"] == "error":
            assert frame.get("code") in VISITOR_ERROR_CODES, frame


def check_agent_frames(frames_seen: list[dict[str, Any]]) -> None:
    for frame in frames_seen:
        assert frame.get("type") in AGENT_FRAME_TYPES, frame
        if frame["type"] == "error":
            assert frame.get("error") != "internal error", frame
            assert frame.get("error") != "storage unavailable, retry shortly", frame


# --- visitor socket --------------------------------------------------------------------


async def open_visitor(hub: Hub) -> aiohttp.ClientWebSocketResponse:
    ws = await hub.client.ws_connect(VISITOR_WS)
    await ws.send_json({"type": "hello"})
    seen, closed = await receive_until(ws, "welcome")
    assert closed is None and seen[-1]["type"] == "welcome", (seen, closed)
    return ws


async def still_served(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_json({"type": "ping"})
    _seen, closed = await receive_until(ws, "pong")
    assert closed is None, closed


@pytest.fixture
async def visitor_bystander(hub: Hub) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    ws = await open_visitor(hub)
    yield ws
    await ws.close()


@scaled(1.5)
@given(first=st.one_of(frames(VISITOR_TYPED), st.tuples(st.just("json"), VOUCHED_HELLOS)))
async def test_visitor_first_frame(
    hub: Hub, visitor_bystander: aiohttp.ClientWebSocketResponse, first: tuple[str, Any]
) -> None:
    """Anything as the first frame: a welcome, or an error frame and a refusal close."""
    async with hub.client.ws_connect(VISITOR_WS) as ws:
        await send_frame(ws, first)
        seen, closed = await receive_until(ws, "welcome")
        check_visitor_frames(seen)
        if closed is None:
            assert seen[-1]["type"] == "welcome"
        else:
            assert closed.type is WSMsgType.CLOSE, closed
            assert closed.data in VISITOR_REFUSAL_CLOSES, (closed, seen)
            assert seen and seen[-1]["type"] == "error", seen
    await still_served(visitor_bystander)


@scaled(1.5)
@given(barrage=st.lists(frames(VISITOR_TYPED), min_size=1, max_size=8))
async def test_visitor_frames_after_hello(
    hub: Hub,
    visitor_bystander: aiohttp.ClientWebSocketResponse,
    barrage: list[tuple[str, Any]],
) -> None:
    """After a good hello, every bad frame gets an error frame and the socket lives on."""
    ws = await open_visitor(hub)
    try:
        for frame in barrage:
            await send_frame(ws, frame)
        seen, closed = await receive_until_marker(ws, *visitor_marker())
        check_visitor_frames(seen)
        assert closed is None, (closed, seen)
    finally:
        await ws.close()
    await still_served(visitor_bystander)


async def receive_until_marker(
    ws: aiohttp.ClientWebSocketResponse, marker: dict[str, Any], answer: Callable[[dict], bool]
) -> tuple[list[dict[str, Any]], aiohttp.WSMessage | None]:
    """Every frame the server sends until it answers `marker`, sent after the barrage.

    Frames are handled in order, so the answer to the marker comes after every answer to
    the barrage; the marker carries something unique so a barrage can't fake its answer.
    """
    await ws.send_json(marker)
    frames_seen: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=RECEIVE_TIMEOUT)
        if msg.type is not WSMsgType.TEXT:
            return frames_seen, msg
        frame = json.loads(msg.data)
        assert isinstance(frame, dict), frame
        frames_seen.append(frame)
        if answer(frame):
            return frames_seen, None


_markers = itertools.count()


def visitor_marker() -> tuple[dict[str, Any], Callable[[dict], bool]]:
    client_id = f"marker-{next(_markers)}"
    frame = {"type": "message", "client_id": client_id, "text": "marker"}
    return frame, lambda f: f.get("type") == "ack" and f.get("client_id") == client_id


# --- agent socket ----------------------------------------------------------------------


@pytest.fixture
async def agent_token(hub: Hub) -> str:
    return await hub.token("alice")


@pytest.fixture
async def conversation_id(hub: Hub) -> str:
    """A real conversation, so resume/viewing frames can reach the store with a real id."""
    recorded = await hub.app[INGESTOR].ingest(
        Inbound(
            channel=CHAT_CHANNEL,
            channel_type=ChannelType.WEBCHAT,
            external_id="fuzz-visitor:first",
            identity=Identity(IdentityKind.CHAT, "fuzz-visitor"),
            text="hello",
        )
    )
    assert recorded.event.conversation_id is not None
    return recorded.event.conversation_id


async def open_agent(hub: Hub, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await hub.client.ws_connect(f"/api/v1/ws?token={token}")
    _seen, closed = await receive_until(ws, "hello")
    assert closed is None, closed
    return ws


@pytest.fixture
async def agent_bystander(hub: Hub, agent_token: str) -> AsyncIterator[Any]:
    ws = await open_agent(hub, agent_token)
    yield ws
    await ws.close()


@scaled(1.5)
@given(barrage=st.lists(frames(AGENT_TYPED), min_size=1, max_size=8), data=st.data())
async def test_agent_frames(
    hub: Hub,
    agent_token: str,
    conversation_id: str,
    agent_bystander: aiohttp.ClientWebSocketResponse,
    barrage: list[tuple[str, Any]],
    data: st.DataObject,
) -> None:
    ws = await open_agent(hub, agent_token)
    try:
        # Some frames name the real conversation, so fuzzing reaches the store paths.
        real = data.draw(
            st.lists(
                st.builds(
                    lambda kind, after, active: (
                        "json",
                        {
                            "type": kind,
                            "conversation_id": conversation_id,
                            "after": after,
                            "active": active,
                        },
                    ),
                    st.sampled_from(["resume", "viewing", "typing"]),
                    st.one_of(st.none(), ID_LIKE, JSON_VALUES),
                    st.one_of(st.booleans(), JSON_VALUES),
                ),
                max_size=3,
            )
        )
        for frame in [*barrage, *real]:
            await send_frame(ws, frame)
        seen, closed = await receive_until_marker(ws, *agent_marker(conversation_id))
        check_agent_frames(seen)
        assert closed is None, (closed, seen)
    finally:
        await ws.close()
    await ws_still_served_agent(agent_bystander)


def agent_marker(conversation_id: str) -> tuple[dict[str, Any], Callable[[dict], bool]]:
    # A cursor past every stored event: the answer echoes it as last_event_id.
    after = f"7ZZZZZZZZZZZZZZZZZZZZZ{next(_markers) % 10_000:04d}"
    frame = {"type": "resume", "conversation_id": conversation_id, "after": after}
    return frame, lambda f: f.get("type") == "resumed" and f.get("last_event_id") == after


async def ws_still_served_agent(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_json({"type": "ping"})
    seen, closed = await receive_until(ws, "pong")
    assert closed is None, closed
    check_agent_frames(seen)


@scaled(0.5)
@given(token=st.one_of(st.text(max_size=300), st.sampled_from(["", "%00", "a" * 5000])))
async def test_agent_socket_refuses_bad_tokens(hub: Hub, token: str) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await hub.client.ws_connect("/api/v1/ws", params={"token": token})
    assert refused.value.status == 401


def vanish(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Cut the TCP connection under a socket, as a crashed client or a lost network would:
    no closing handshake."""
    sock = ws.get_extra_info("socket")
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


async def test_many_sockets_opened_and_dropped_abruptly(hub: Hub, agent_token: str) -> None:
    """Clients that vanish mid-conversation must not hurt the others."""
    bystander = await open_visitor(hub)
    dropped = []
    for i in range(20):
        ws = await hub.client.ws_connect(VISITOR_WS)
        await ws.send_json({"type": "hello"})
        await ws.send_json({"type": "message", "client_id": f"x{i}", "text": "hi"})
        vanish(ws)
        agent = await hub.client.ws_connect(f"/api/v1/ws?token={agent_token}")
        vanish(agent)
        dropped += [ws, agent]
    await asyncio.sleep(0.2)
    await still_served(bystander)
    agent = await open_agent(hub, agent_token)
    await ws_still_served_agent(agent)
    for ws in [*dropped, agent, bystander]:
        await ws.close()


ORIGINS = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "http://[::1",
            "http://[zz]",
            "http://shop.example:99999",
            "https://shop.example:x",
            "https://SHOP.example:443",
            "null",
            "",
        ]
    ),
)


@scaled(0.5)
@given(origin=ORIGINS)
async def test_visitor_socket_origin_header(hub: Hub, origin: str) -> None:
    """A channel limited to some websites reads the Origin header: any value is safe."""
    headers = {"Origin": origin}
    try:
        ws = await hub.client.ws_connect(f"/chat/{SHOP_CHANNEL}/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as refused:
        assert refused.status == 403, refused
        return
    except ValueError:
        return  # the client itself would not send that header (e.g. a newline in it)
    await ws.send_json({"type": "hello"})
    _seen, closed = await receive_until(ws, "welcome")
    assert closed is None, closed
    await ws.close()
