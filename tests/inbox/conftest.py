"""A whole hub (real config parser, SQLite file, channels, inbox API) per test.

Agents have real argon2 hashes, made once per session because argon2 is slow on purpose.
A second channel of another type (SMS) is added only when its adapter exists in this
build; otherwise a second web chat channel plays that part.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub.app import CONFIG, EXTENSION_MODULES, INGESTOR, Extension, create_app
from hub.config import Config, parse_config
from hub.inbox.auth import TOKENS
from hub.model import ChannelType, Identity, IdentityKind, Inbound, Recorded
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore

SECOND_CHANNEL = "sms"
SECOND_TYPE = ChannelType.SMS

# login -> (agent id, role, password)
AGENTS: dict[str, tuple[str, str, str]] = {
    "alice": ("alice", "agent", "alice-secret-pw"),
    "bob": ("bob", "agent", "bob-secret-pw"),
    "sam": ("sam", "supervisor", "sam-secret-pw"),
    "root": ("root", "admin", "root-secret-pw"),
}

_SECOND_CHANNEL_YAML = (
    """
  - name: sms
    type: sms
    phone_number: "+14155550100"
    twilio:
      account_sid: AC00000000000000000000000000000000
      auth_token: test-auth-token
      # Nothing listens there: an SMS reply stays queued/retrying, never leaves the box.
      api_base_url: http://127.0.0.1:9
"""
)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {login: hash_password(pw) for login, (_, _, pw) in AGENTS.items()}


def hub_yaml(data_dir: Path, hashes: dict[str, str]) -> str:
    agents = "".join(
        f"""
  - id: {agent_id}
    name: {agent_id.title()} Example
    login: {login}
    role: {role}
    password_hash: "{hashes[login]}"
"""
        for login, (agent_id, role, _) in AGENTS.items()
    )
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
{_SECOND_CHANNEL_YAML}
routing:
  away_grace_seconds: 1
  queues:
    - name: general
    - name: billing
agents:{agents}
"""


@pytest.fixture
def config(tmp_path: Path, password_hashes: dict[str, str]) -> Config:
    return parse_config(hub_yaml(tmp_path, password_hashes), "test-hub.yaml", {}, tmp_path)


def inbox_extensions() -> tuple[Extension, ...]:
    """The app's extensions minus the router.

    The router assigns conversations on its own, from the bus, as soon as they arrive;
    these tests check what the API does when agents act, and must not race it. The
    router's behaviour has its own tests; the authorization matrix and the OpenAPI check
    use the whole app (see `full_client`).
    """
    return tuple(
        import_module(name).install
        for name in EXTENSION_MODULES
        if not name.startswith("hub.routing")
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    config: Config,
    tmp_path: Path,
) -> TestClient:
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"), extensions=inbox_extensions())
    return await aiohttp_client(app)


@pytest.fixture
async def full_client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    config: Config,
    tmp_path: Path,
) -> TestClient:
    """The hub exactly as `hub serve` builds it: every extension, router included."""
    return await aiohttp_client(create_app(config, store=SqliteStore(tmp_path / "hub.db")))


@pytest.fixture
def app(client: TestClient) -> web.Application:
    return client.server.app


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: TestClient, login_name: str, password: str | None = None) -> str:
    password = AGENTS[login_name][2] if password is None else password
    resp = await client.post("/api/v1/auth/login", json={"login": login_name, "password": password})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return str(body["token"])


@dataclass
class Tokens:
    alice: str
    bob: str
    sam: str
    root: str


@pytest.fixture
async def tokens(client: TestClient) -> Tokens:
    """Signed-in sessions, issued directly: argon2 login is tested in test_auth.py, and
    four password checks per test would only make the suite slow."""
    app = client.server.app
    issued = [
        (await app[TOKENS].issue(app[CONFIG].agent(agent_id)))[0]
        for agent_id in ("alice", "bob", "sam", "root")
    ]
    return Tokens(*issued)


_counter = itertools.count(1)


class Customers:
    """Makes customers the way channels do: by ingesting their messages."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    async def chat(
        self, visitor: str, text: str = "hello", channel: str = "web", name: str | None = None
    ) -> Recorded:
        return await self.app[INGESTOR].ingest(
            Inbound(
                channel=channel,
                channel_type=ChannelType.WEBCHAT,
                external_id=f"chat-{next(_counter)}",
                identity=Identity(IdentityKind.CHAT, visitor),
                text=text,
                display_name=name,
            )
        )

    async def second(self, identity: Identity, text: str = "hi again") -> Recorded:
        """A message on the second channel (SMS when available) from `identity`."""
        return await self.app[INGESTOR].ingest(
            Inbound(
                channel=SECOND_CHANNEL,
                channel_type=SECOND_TYPE,
                external_id=f"second-{next(_counter)}",
                identity=identity,
                text=text,
            )
        )


@pytest.fixture
def customers(app: web.Application) -> Customers:
    return Customers(app)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll until `check` passes: for effects of background work (outbox, timers)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def agent_ws(client: TestClient) -> AsyncIterator[Callable[[str], Awaitable[Any]]]:
    """Opens agent WebSockets and closes them at the end of the test."""
    opened: list[Any] = []

    async def connect(token: str) -> Any:
        ws = await client.ws_connect(f"/api/v1/ws?token={token}")
        opened.append(ws)
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello"
        return ws

    yield connect
    for ws in opened:
        await ws.close()
