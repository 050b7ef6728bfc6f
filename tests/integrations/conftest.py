"""A whole hub per test (real config parser, SQLite file, channels, every extension),
with the analytical half's sections given by each test, and loopback-only HTTP.

The SMS channel points at a loopback FakeTwilio when a test asks for one, and at a
closed port otherwise (outbound SMS then stays queued, retrying).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from hub.app import BUS, INGESTOR, STORE, create_app
from hub.bus import Bus
from hub.config import Config, parse_config
from hub.model import (
    ChannelType,
    ConversationStatus,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Recorded,
    agent_author,
)
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore
from hub.timeline.store import TimelineStore
from tests.twilio.fake_twilio import LOOPBACK_HOSTS, FakeTwilio

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "f3c2b1a0e9d8c7b6a5f4e3d2c1b0a987"
SMS_NUMBER = "+14155550100"
PUBLIC_URL = "https://hub.example.com"

# login -> (role, password)
AGENTS = {
    "alice": ("agent", "alice-pw"),
    "sam": ("supervisor", "sam-pw"),
    "root": ("admin", "root-pw"),
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every aiohttp client request in these tests must stay on this machine."""
    original = aiohttp.ClientSession._request

    async def guarded(self: aiohttp.ClientSession, method: str, url: Any, *a: Any, **kw: Any):
        host = URL(str(url)).host
        if host not in LOOPBACK_HOSTS:
            raise AssertionError(f"a test tried to reach {host} ({url}); loopback only")
        return await original(self, method, url, *a, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", guarded)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {login: hash_password(pw) for login, (_, pw) in AGENTS.items()}


def hub_yaml(
    data_dir: Path, hashes: dict[str, str], extra: str, twilio_url: str, hub_settings: str = ""
) -> str:
    agents = "".join(
        f"""
  - id: {login}
    role: {role}
    password_hash: "{hashes[login]}"
"""
        for login, (role, _) in AGENTS.items()
    )
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  {hub_settings}
channels:
  - name: web
    type: webchat
  - name: sms
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: {twilio_url}
routing:
  # File order: the first queue whose rules match takes the conversation.
  queues:
    - name: billing
      match:
        keywords: [invoice]
    - name: general
  default_queue: general
agents:{agents}
{extra}
"""


_ids = itertools.count(1)


@dataclass
class Hub:
    client: TestClient
    config: Config

    @property
    def app(self) -> web.Application:
        return self.client.server.app

    @property
    def store(self) -> TimelineStore:
        return self.app[STORE]

    @property
    def bus(self) -> Bus:
        return self.app[BUS]

    async def chat(self, visitor: str, text: str) -> Recorded:
        """A web chat message from `visitor`, through the app's ingestor."""
        return await self.app[INGESTOR].ingest(
            Inbound(
                channel="web",
                channel_type=ChannelType.WEBCHAT,
                external_id=f"{visitor}:m{next(_ids)}",
                identity=Identity(IdentityKind.CHAT, visitor),
                text=text,
            )
        )

    async def agent_reply(self, conversation_id: str, text: str = "On it!") -> Recorded:
        """An agent's answer, as the inbox API appends and announces it."""
        conv = await self.store.get_conversation(conversation_id)
        assert conv is not None
        recorded = await self.store.append(
            conversation_id,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.OUT,
                author=agent_author("alice"),
                channel="web",
                channel_type=ChannelType.WEBCHAT,
                text=text,
            ),
        )
        await self.bus.publish([recorded.event])
        return recorded

    async def set_status(self, conversation_id: str, status: ConversationStatus) -> Recorded:
        recorded = await self.store.set_status(conversation_id, status, agent_author("alice"))
        await self.bus.publish([*recorded.side_events, recorded.event])
        return recorded


MakeHub = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def fake_twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def make_hub(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    tmp_path: Path,
    password_hashes: dict[str, str],
) -> MakeHub:
    async def make(
        extra: str = "", *, fake: FakeTwilio | None = None, hub_settings: str = ""
    ) -> Hub:
        """`extra`: top-level YAML sections; `hub_settings`: one more key of `hub`."""
        twilio_url = fake.url if fake is not None else "http://127.0.0.1:9"
        text = hub_yaml(tmp_path, password_hashes, extra, twilio_url, hub_settings)
        config = parse_config(text, "<integrations test>", env={}, base_dir=tmp_path)
        app = create_app(config, store=SqliteStore(tmp_path / "hub.db"))
        client = await aiohttp_client(app)
        if fake is not None:
            fake.route(config.hub.public_url, str(client.make_url("")).rstrip("/"))
        return Hub(client=client, config=config)

    return make


async def eventually(probe: Callable[[], Awaitable[Any]], within: float = 5.0) -> Any:
    """The first truthy result of `probe`, polled until `within` seconds pass."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still false after {within}s: {probe}")
        await asyncio.sleep(0.02)
