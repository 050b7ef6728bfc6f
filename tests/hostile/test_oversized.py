"""Oversized input is refused early, before the hub reads (or keeps) what it will refuse.

- A body whose Content-Length is over hub.max_body_bytes gets 413 at once: the test
  promises 1 GB and sends a few bytes, so a server that waited for the body would hang.
- A chunked body (no Content-Length) is cut off with 413 once it passes the limit, and
  the server holds at most about the limit in memory while doing so.
- Headers and URLs have their own (HTTP parser) limits; WebSocket frames over a socket's
  maximum close that socket (1009) and no other.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType

from hub.channels.webchat import MAX_NAME_CHARS
from hub.inbox.realtime import SocketSettings
from tests.hostile.conftest import (
    CHAT_CHANNEL,
    MAX_BODY_BYTES,
    MAX_CHAT_CHARS,
    PUBLIC_URL,
    SMS_ROUTES,
    VOICE_ROUTES,
    Hub,
    raw_http,
    sign,
    status_of,
)
from tests.hostile.test_fuzz_websockets import (
    open_agent,
    open_visitor,
    receive_until,
    still_served,
)

GIGABYTE = 1 << 30
# Generous for a loaded CI machine; a server that waits for the body never answers.
EARLY = 5.0


async def raw_request(hub: Hub, head: bytes, body: bytes = b"", *, wait: float = EARLY) -> bytes:
    server = hub.client.server
    return await raw_http(server.host, server.port, head + body, wait=wait)


def request_head(
    method: str, path: str, headers: dict[str, str], *, content_length: int | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if content_length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.fixture
async def admin_headers(hub: Hub) -> dict[str, str]:
    return {"Authorization": f"Bearer {await hub.token('root')}"}


def endpoints(admin: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """(path, headers) of every kind of endpoint that takes a body."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    # A signature is present (if wrong), so a webhook would go on to read the form.
    signed = {**form, "X-Twilio-Signature": sign(PUBLIC_URL + SMS_ROUTES[0], {})}
    as_json = {"Content-Type": "application/json"}
    return [
        (SMS_ROUTES[0], signed),
        (SMS_ROUTES[1], signed),
        (VOICE_ROUTES[0], signed),
        (VOICE_ROUTES[4], signed),
        ("/api/v1/auth/login", as_json),
        ("/api/v1/me/presence", {**as_json, **admin}),
        ("/api/v1/conversations/01HZZZZZZZZZZZZZZZZZZZZZZZ/notes", {**as_json, **admin}),
        ("/api/v1/conversations/bulk-assign", {**as_json, **admin}),
        ("/healthz", as_json),
        ("/no/such/route", as_json),
    ]


async def test_promised_gigabyte_is_refused_at_once(
    hub: Hub, admin_headers: dict[str, str]
) -> None:
    before = hub.events()
    for path, headers in endpoints(admin_headers):
        method = "PUT" if path.endswith("/presence") else "POST"
        head = request_head(method, path, headers, content_length=GIGABYTE)
        started = time.monotonic()
        answer = await raw_request(hub, head, b"MessageSid=SM1&From=%2B1415")
        elapsed = time.monotonic() - started
        # 404/405 are fine for routes that take no POST: nothing was read either way.
        assert status_of(answer) in (413, 404, 405), (path, answer)
        if path.startswith(("/twilio/", "/api/")):
            assert status_of(answer) == 413, (path, answer)
        assert elapsed < EARLY, (path, elapsed)
    assert hub.events() == before


async def test_just_over_the_limit_is_413_and_at_it_is_read(hub: Hub) -> None:
    path = "/api/v1/auth/login"
    headers = {"Content-Type": "application/json"}
    # At the limit: read and judged on its merits (a JSON object with unknown fields).
    padding = "x" * (MAX_BODY_BYTES - len(json.dumps({"pad": ""})))
    body = json.dumps({"pad": padding}).encode()
    assert len(body) == MAX_BODY_BYTES
    answer = await raw_request(
        hub, request_head("POST", path, headers, content_length=len(body)), body
    )
    assert status_of(answer) == 422, answer
    over = body + b" "
    answer = await raw_request(
        hub, request_head("POST", path, headers, content_length=len(over)), over
    )
    assert status_of(answer) == 413, answer


async def _chunked(total: int, chunk: int = 16_384) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(chunk, total - sent)
        sent += piece
        yield b"a" * piece


@pytest.mark.parametrize(
    "path",
    [SMS_ROUTES[0], VOICE_ROUTES[0], "/api/v1/auth/login"],
    ids=["sms", "voice", "login"],
)
async def test_chunked_body_past_the_limit_is_cut_off(hub: Hub, path: str) -> None:
    """No Content-Length to judge by: the server stops reading once past the limit."""
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": "present-but-wrong",
    }
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with hub.client.session.post(
            hub.client.make_url(path),
            data=_chunked(8 * MAX_BODY_BYTES * 4),  # 2 MB, in pieces
            headers=headers,
        ) as resp:
            status = resp.status
            await resp.read()
        _, peak = tracemalloc.get_traced_memory()
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        # The server may close the connection while the client is still sending.
        status, peak = 413, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 413
    # The client's and the server's buffers together, never the whole 2 MB body.
    assert peak < 16 * MAX_BODY_BYTES, peak


async def test_huge_headers_and_urls_are_refused(hub: Hub) -> None:
    huge_header = request_head(
        "POST", SMS_ROUTES[0], {"X-Twilio-Signature": "s" * 100_000}, content_length=0
    )
    assert status_of(await raw_request(hub, huge_header)) in (400, 413, 431)
    huge_url = request_head("GET", "/healthz?" + "a" * 100_000, {}, content_length=0)
    assert status_of(await raw_request(hub, huge_url)) in (400, 414)
    many = request_head(
        "POST", SMS_ROUTES[0], {f"X-H{i}": "v" for i in range(10_000)}, content_length=0
    )
    assert status_of(await raw_request(hub, many)) in (400, 413, 431)


async def test_too_many_form_fields_is_refused(hub: Hub) -> None:
    """A form of a hundred thousand tiny fields stays under the byte limit but not sane."""
    body = b"&".join(b"a=" for _ in range(20_000))
    assert len(body) < MAX_BODY_BYTES
    status, _ = await hub.post_raw(
        SMS_ROUTES[0],
        body,
        {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"},
    )
    assert status in (400, 403, 413), status


async def test_visitor_frame_over_the_limit_closes_only_that_socket(hub: Hub) -> None:
    bystander = await open_visitor(hub)
    ws = await open_visitor(hub)
    # The socket's limit is sized for max_message_chars of 6-byte characters, plus room.
    limit = max(16_384, MAX_CHAT_CHARS * 6 + 2048)
    await ws.send_str(json.dumps({"type": "message", "client_id": "big", "text": "x" * limit}))
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, msg
    await still_served(bystander)
    # Under the frame limit but over the message limit: an error frame, socket kept.
    await bystander.send_json(
        {"type": "message", "client_id": "long", "text": "x" * (MAX_CHAT_CHARS + 1)}
    )
    frame = await bystander.receive_json(timeout=5)
    assert frame["type"] == "error" and frame["code"] == "too_long", frame
    # A hello with a name over its limit is refused as a bad hello.
    async with hub.client.ws_connect(f"/chat/{CHAT_CHANNEL}/ws") as greedy:
        await greedy.send_json({"type": "hello", "name": "n" * (MAX_NAME_CHARS + 1)})
        frame = await greedy.receive_json(timeout=5)
        assert frame["type"] == "error", frame
        closed = await greedy.receive(timeout=5)
        assert closed.type is WSMsgType.CLOSE and closed.data == 4400, closed
    await bystander.close()


async def test_agent_frame_over_the_limit_closes_only_that_socket(hub: Hub) -> None:
    token = await hub.token("alice")
    bystander = await open_agent(hub, token)
    ws = await open_agent(hub, token)
    limit = SocketSettings().max_message_bytes
    await ws.send_str(json.dumps({"type": "ping", "pad": "x" * limit}))
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, msg
    await bystander.send_json({"type": "ping"})
    _, closed = await receive_until(bystander, "pong")
    assert closed is None, closed
    await bystander.close()
