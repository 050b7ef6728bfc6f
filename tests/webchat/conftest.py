"""A hub with web chat channels per test: real config parser, SQLite file, in-process bus.

The inbox extensions are left out (`extensions=()`): these tests drive the visitor side
and act as the agent through the store and bus directly, the way the inbox API does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient

from hub.app import ADAPTERS, BUS, STORE, create_app
from hub.channels.webchat import WebchatAdapter
from hub.config import Config, parse_config
from hub.inbox.presence import PRESENCE_KEY, PresenceRegistry
from hub.model import (
    ChannelType,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    Recorded,
    agent_author,
)
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore
from hub.timeline.store import TimelineStore
from tests.browser import browser, page  # noqa: F401  (fixtures shared with browser tests)

SITE_SECRET = "site-identity-secret"
SHOP_ORIGIN = "https://shop.example"


@pytest.fixture(scope="session")
def agent_hash() -> str:
    return hash_password("ann-secret-password")


def hub_yaml(data_dir: Path, agent_hash: str) -> str:
    return f"""
hub:
  public_url: http://127.0.0.1:8080
  data_dir: {data_dir}
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: web
    type: webchat
    identity_secret: {SITE_SECRET}
  - name: shop
    type: webchat
    allowed_origins: ["{SHOP_ORIGIN}"]
    max_message_chars: 20
    rate_limit_per_minute: 3
  - name: other
    type: webchat
    title: Other chat
agents:
  - id: ann
    name: Ann Agent
    password_hash: "{agent_hash}"
"""


@pytest.fixture
def config(tmp_path: Path, agent_hash: str) -> Config:
    return parse_config(hub_yaml(tmp_path, agent_hash), "webchat-test.yaml", {}, tmp_path)


def with_offline_email(config: Config, channel: str = "web") -> Config:
    """The config with `channel` offering "continue by email" through a channel "mail".

    Set on the parsed value: the schema would insist that "mail" is a configured email
    channel, whose adapter (IMAP, SMTP) these tests have no use for.
    """
    channels = tuple(
        replace(c, offline_email_channel="mail") if c.name == channel else c
        for c in config.channels
    )
    return replace(config, channels=channels)


ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]], tmp_path: Path
) -> ClientFactory:
    async def make(config: Config, *, presence: PresenceRegistry | None = None) -> TestClient:
        app = create_app(config, store=SqliteStore(tmp_path / "hub.db"), extensions=())
        if presence is not None:
            app[PRESENCE_KEY] = presence
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: ClientFactory, config: Config) -> TestClient:
    return await make_client(config)


def store_of(client: TestClient) -> TimelineStore:
    return client.server.app[STORE]


def adapter_of(client: TestClient, name: str = "web") -> WebchatAdapter:
    adapter = client.server.app[ADAPTERS][name]
    assert isinstance(adapter, WebchatAdapter)
    return adapter


class Visitor:
    """One visitor socket, with the few moves these tests make."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.ws.send_json({"type": "hello", **fields})
        frame = await self.frame()
        assert frame["type"] == "welcome", frame
        self.welcome = frame
        return frame

    async def frame(self, wait: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=wait)
        assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        data: dict[str, Any] = json.loads(msg.data)
        return data

    async def frame_of(self, kind: str, wait: float = 5.0) -> dict[str, Any]:
        """The next frame of `kind`, skipping others (e.g. the echo of one's own message)."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            left = deadline - asyncio.get_running_loop().time()
            frame = await self.frame(max(left, 0.01))
            if frame["type"] == kind:
                return frame

    async def silent(self, within: float = 0.3) -> None:
        """Assert that nothing arrives for a while."""
        try:
            msg = await self.ws.receive(timeout=within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {msg.type} {msg.data!r}")

    async def say(self, text: str, client_id: str | None = None) -> dict[str, Any]:
        client_id = client_id or str(uuid.uuid4())
        await self.ws.send_json({"type": "message", "client_id": client_id, "text": text})
        frame = await self.frame_of("ack")
        assert frame["client_id"] == client_id
        return frame

    async def drain(self, within: float = 0.3) -> list[dict[str, Any]]:
        frames = []
        while True:
            try:
                msg = await self.ws.receive(timeout=within)
            except TimeoutError:
                return frames
            if msg.type is not WSMsgType.TEXT:
                return frames
            frames.append(json.loads(msg.data))

    async def close(self) -> None:
        await self.ws.close()


VisitorFactory = Callable[..., Awaitable[Visitor]]


@pytest.fixture
async def connect(client: TestClient) -> AsyncIterator[VisitorFactory]:
    opened: list[Visitor] = []

    async def open_visitor(
        channel: str = "web", *, via: TestClient | None = None, origin: str | None = None
    ) -> Visitor:
        headers = {"Origin": origin} if origin else {}
        ws = await (via or client).ws_connect(f"/chat/{channel}/ws", headers=headers)
        visitor = Visitor(ws)
        opened.append(visitor)
        return visitor

    yield open_visitor
    for visitor in opened:
        await visitor.close()


async def agent_reply(
    app: web.Application, conversation_id: str, text: str, *, channel: str = "web"
) -> Recorded:
    """What the inbox does for a reply: append a queued outbound event, then publish it."""
    recorded = await app[STORE].append(
        conversation_id,
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=agent_author("ann"),
            channel=channel,
            channel_type=ChannelType.WEBCHAT,
            text=text,
            delivery_state=DeliveryState.QUEUED,
        ),
    )
    await app[BUS].publish([recorded.event])
    return recorded


async def agent_note(app: web.Application, conversation_id: str, text: str) -> Recorded:
    recorded = await app[STORE].append(
        conversation_id,
        EventDraft(
            kind=EventKind.NOTE,
            direction=Direction.INTERNAL,
            author=agent_author("ann"),
            text=text,
        ),
    )
    await app[BUS].publish([recorded.event])
    return recorded
