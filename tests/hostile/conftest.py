"""One hub with every HTTP-facing channel (SMS, voice, web chat) and the inbox, for fuzzing.

The hub's public URL is https://hub.example.com, as behind a reverse proxy: Twilio
webhooks are signed for that URL and delivered to the loopback test server, so fuzzed
bodies get past the signature check and reach the handlers.

Hypothesis settings come from two profiles registered here and applied per test (not
loaded globally, which would change the settings of every other test module in the same
run): "hostile" by hand, "hostile-ci" when CI=true (fewer examples, derandomized so a
CI failure replays the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, settings
from twilio.request_validator import RequestValidator
from yarl import URL

from hub.app import CONFIG, create_app
from hub.config import Config, parse_config
from hub.inbox.auth import TOKENS
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "f3c2b1a0e9d8c7b6a5f4e3d2c1b0a987"
PUBLIC_URL = "https://hub.example.com"
SMS_CHANNEL = "sms"
VOICE_CHANNEL = "phone"
CHAT_CHANNEL = "web"
# A chat channel only one website may embed: the Origin header is checked.
SHOP_CHANNEL = "shop"
SHOP_ORIGIN = "https://shop.example"
# Small, so that "over the limit" costs little to send; the schema's minimum is 1024.
MAX_BODY_BYTES = 65_536
MAX_CHAT_CHARS = 500
IDENTITY_SECRET = "site-identity-secret"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# login -> (agent id, role, password)
AGENTS: dict[str, tuple[str, str, str]] = {
    "alice": ("alice", "agent", "alice-secret-pw"),
    "root": ("root", "admin", "root-secret-pw"),
}

# One app per test serves all of its examples (that is the point: it must survive them),
# hence function-scoped fixtures under @given. Each example is a real request, and some
# tens per test, scaled per test, keep tests/hostile near a minute in all.
_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile(
    "hostile", max_examples=60, deadline=None, suppress_health_check=_SUPPRESS
)
settings.register_profile(
    "hostile-ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    # A failure is reported as found: shrinking a stateful example can take minutes.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=_SUPPRESS,
)
FUZZ = settings.get_profile("hostile-ci" if os.environ.get("CI") == "true" else "hostile")


def scaled(factor: float) -> settings:
    """The active profile with `factor` times its examples (for cheap or costly tests)."""
    return settings(FUZZ, max_examples=max(5, int(FUZZ.max_examples * factor)))


# Webhook routes, relative to the public URL, with the channel they belong to.
SMS_ROUTES = (f"/twilio/{SMS_CHANNEL}/sms", f"/twilio/{SMS_CHANNEL}/sms/status")
VOICE_ROUTES = tuple(
    f"/twilio/{VOICE_CHANNEL}/voice{suffix}"
    for suffix in (
        "",
        "/gather",
        "/dial-result",
        "/status",
        "/recording",
        "/transcription",
        "/wait",
        "/connect",
    )
)
WEBHOOK_ROUTES = SMS_ROUTES + VOICE_ROUTES
# What a webhook may answer to anything at all; 500 never.
WEBHOOK_STATUSES = frozenset({200, 204, 400, 403, 404, 413, 422})


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
    # argon2 is slow on purpose: once per session.
    return {login: hash_password(pw) for login, (_, _, pw) in AGENTS.items()}


def hub_yaml(data_dir: Path, hashes: Mapping[str, str]) -> str:
    agents = "".join(
        f"""
  - id: {agent_id}
    name: {agent_id.title()} Example
    login: {login}
    role: {role}
    password_hash: "{hashes[login]}"
    phone: "+1415555017{index}"
"""
        for index, (login, (agent_id, role, _)) in enumerate(AGENTS.items())
    )
    # Nothing listens on port 9: anything the outbox tries to send stays on this machine.
    twilio = f"""
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: http://127.0.0.1:9"""
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  default_region: US
  max_body_bytes: {MAX_BODY_BYTES}
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: {SMS_CHANNEL}
    type: sms
    phone_number: "+14155550100"{twilio}
  - name: {VOICE_CHANNEL}
    type: voice
    phone_number: "+14155550111"{twilio}
    voicemail: true
    record_calls: true
    ivr:
      - {{digit: "1", label: Sales, queue: sales}}
      - {{digit: "2", label: Support, queue: support}}
  - name: {CHAT_CHANNEL}
    type: webchat
    max_message_chars: {MAX_CHAT_CHARS}
    identity_secret: {IDENTITY_SECRET}
    rate_limit_per_minute: 1000
  - name: {SHOP_CHANNEL}
    type: webchat
    allowed_origins: ["{SHOP_ORIGIN}"]
routing:
  queues:
    - name: sales
    - name: support
agents:{agents}
"""


@pytest.fixture
def config(tmp_path: Path, password_hashes: dict[str, str]) -> Config:
    return parse_config(hub_yaml(tmp_path, password_hashes), "hostile.yaml", {}, tmp_path)


def count_rows(db: Path, table: str) -> int:
    """Rows committed to the SQLite file, read on a connection of our own."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count)


def sign(url: str, params: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """X-Twilio-Signature for a POST of `params` to `url`, as Twilio computes it."""
    if isinstance(params, list):
        multi: dict[str, list[str]] = {}
        for key, value in params:
            multi.setdefault(key, []).append(value)
        return RequestValidator(AUTH_TOKEN).compute_signature(url, _MultiParams(multi))
    return RequestValidator(AUTH_TOKEN).compute_signature(url, params)


class _MultiParams(dict[str, list[str]]):
    """Repeated form keys, in the shape the validator reads multi-dicts (getall)."""

    def getall(self, key: str) -> list[str]:
        return self[key]


@dataclass
class Hub:
    client: TestClient
    config: Config

    @property
    def app(self) -> web.Application:
        return self.client.server.app

    @property
    def db(self) -> Path:
        return self.config.storage.path

    def events(self) -> int:
        return count_rows(self.db, "events")

    def customers(self) -> int:
        return count_rows(self.db, "customers")

    async def token(self, agent_id: str) -> str:
        """A signed-in session, issued directly (argon2 login has its own tests)."""
        app = self.app
        token, _ = await app[TOKENS].issue(app[CONFIG].agent(agent_id))
        return token

    async def post_form(
        self,
        path: str,
        params: Mapping[str, str] | list[tuple[str, str]],
        *,
        query: Mapping[str, str] | None = None,
        signature: str | None = None,
        signed: bool = True,
        content_type: str = "application/x-www-form-urlencoded; charset=UTF-8",
    ) -> tuple[int, str]:
        """A webhook POST; signed for the public URL unless told otherwise."""
        raw_path = f"{path}?{urlencode(query)}" if query else path
        body = urlencode(list(params.items()) if isinstance(params, Mapping) else params)
        headers = {"Content-Type": content_type}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif signed:
            headers["X-Twilio-Signature"] = sign(PUBLIC_URL + raw_path, params)
        return await self.post_raw(raw_path, body.encode("utf-8"), headers)

    async def post_raw(
        self, raw_path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str]:
        # encoded=True: the path and query go out byte for byte as signed.
        url = self.client.make_url("").join(URL(raw_path, encoded=True))
        async with self.client.session.post(url, data=body, headers=dict(headers)) as resp:
            return resp.status, await resp.text()


async def raw_http(host: str, port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send bytes no HTTP client library would; the head of the answer (up to the blank
    line), read without waiting for the rest: a refused body may never be read."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), 1)


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


@pytest.fixture
async def hub(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    config: Config,
    tmp_path: Path,
) -> Hub:
    """The hub exactly as `hub serve` builds it (inbox, router, reports), on a test server."""
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"))
    return Hub(client=await aiohttp_client(app), config=config)


# --- a hub for a client that is not aiohttp's and not async (schemathesis) ------------


@dataclass
class ServedHub:
    base_url: str
    config: Config
    loop: asyncio.AbstractEventLoop
    app: web.Application

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop from this (test) thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def token(self, agent_id: str) -> str:
        async def issue() -> str:
            token, _ = await self.app[TOKENS].issue(self.app[CONFIG].agent(agent_id))
            return token

        return str(self.run(issue()))


@pytest.fixture(scope="module")
def served_hub(
    tmp_path_factory: pytest.TempPathFactory, password_hashes: dict[str, str]
) -> Iterator[ServedHub]:
    """The whole hub on a free loopback port, its event loop in a thread of its own,
    so that a blocking client (schemathesis uses requests) can call it from the test."""
    data_dir = tmp_path_factory.mktemp("served")
    config = parse_config(hub_yaml(data_dir, password_hashes), "hostile.yaml", {}, data_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="served-hub", daemon=True)
    thread.start()
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=2.0)

    async def start() -> int:
        await runner.setup()
        # Port 0: the kernel picks a free one, with no window for another process to take it.
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield ServedHub(base_url=f"http://127.0.0.1:{port}", config=config, loop=loop, app=app)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
