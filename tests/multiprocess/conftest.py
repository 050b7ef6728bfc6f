"""Several real `hub serve` processes on one redis-server that the test starts.

Each hub is `python -m hub.cli serve --config FILE --port P` (the console script's
entry point) on a free loopback port, all of them with the same YAML: Redis storage, a
web chat channel `web`, an SMS channel `sms` whose Twilio REST client points at a
loopback port nobody listens on (nothing leaves the machine), and two agents. Their
public URL is https://hub.example.com, as behind a load balancer: webhooks are signed
for it and delivered to whichever process the test picks.

Fixtures: `agent_hash` (argon2 hash of AGENT_PASSWORD, made once), `start_hubs`
(`await start_hubs(redis, 2)` -> started and ready `HubProcess`es, stopped after the
test). Helpers: `sms_params`, `signature`, `post_sms`, `login`, `frame_where`,
`open_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from twilio.request_validator import RequestValidator
from yarl import URL

from hub.passwords import hash_password
from hub.timeline.redis import RedisStore
from tests.servers.common import free_port
from tests.servers.redis import RedisServer

REPO = Path(__file__).resolve().parents[2]
PUBLIC_URL = "https://hub.example.com"
ACCOUNT_SID = "AC5e1f0a2b3c4d5e6f708192a3b4c5d6e7"
AUTH_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SMS_NUMBER = "+14155550100"
SMS_PATH = "/twilio/sms/sms"
AGENT_LOGIN = "ann"
AGENT_PASSWORD = "ann-multiprocess-secret"


@pytest.fixture(scope="session")
def agent_hash() -> str:
    return hash_password(AGENT_PASSWORD)


def hub_yaml(
    redis_url: str, data_dir: Path, password_hash: str, *, durability: str = "none"
) -> str:
    dead_port = free_port()  # nothing listens there: an SMS reply would fail, none is sent
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  log_level: warning
storage:
  backend: redis
  url: {redis_url}
  durability: {durability}
channels:
  - name: web
    type: webchat
    rate_limit_per_minute: 600
  - name: sms
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: http://127.0.0.1:{dead_port}
agents:
  - id: ann
    name: Ann Agent
    login: {AGENT_LOGIN}
    password_hash: "{password_hash}"
  - id: ben
    name: Ben Agent
    password_hash: "{password_hash}"
"""


class HubProcess:
    """One `hub serve` subprocess: started, waited for, terminated or killed."""

    def __init__(self, name: str, config: Path, directory: Path) -> None:
        self.name = name
        self.config = config
        self.port = free_port()
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> HubProcess:
        argv = [sys.executable, "-m", "hub.cli", "serve", "--config", str(self.config)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*argv, "--port", str(self.port)],
                cwd=self.config.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def ready_status(self) -> int | None:
        """/readyz's status, or None when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
                )
            if self.ready_status() == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL if it hangs; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


StartHubs = Callable[..., Awaitable[list[HubProcess]]]
Frame = dict[str, Any]


@pytest.fixture
async def start_hubs(tmp_path: Path, agent_hash: str) -> AsyncIterator[StartHubs]:
    started: list[HubProcess] = []

    async def start(
        redis: RedisServer, count: int = 2, *, durability: str = "none"
    ) -> list[HubProcess]:
        directory = tmp_path / f"hubs{len(started)}"
        directory.mkdir()
        config = directory / "hub.yaml"
        text = hub_yaml(redis.url, directory / "data", agent_hash, durability=durability)
        config.write_text(text)
        hubs = [HubProcess(chr(ord("A") + i), config, directory) for i in range(count)]
        for hub in hubs:  # all at once, as a deployment would
            started.append(hub.start())
        await asyncio.gather(*(asyncio.to_thread(hub.wait_ready) for hub in hubs))
        return hubs

    yield start
    for hub in started:
        code = hub.terminate()
        # A hub that crashed during the test says so here, with its log.
        assert code in (0, -signal.SIGTERM, -signal.SIGKILL), f"{hub.name}: {hub.output()}"


# --- signed SMS webhooks -----------------------------------------------------------------

_validator = RequestValidator(AUTH_TOKEN)


def sms_params(sid: str, sender: str, body: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "SmsMessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": sender,
        "To": SMS_NUMBER,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsStatus": "received",
        "ApiVersion": "2010-04-01",
    }


def signature(params: Mapping[str, str], path: str = SMS_PATH) -> str:
    """X-Twilio-Signature as Twilio computes it, for the public URL."""
    return str(_validator.compute_signature(PUBLIC_URL + path, dict(params)))


def signed_request(params: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature(params),
    }
    return urlencode(params).encode(), headers


async def post_sms(
    session: aiohttp.ClientSession,
    hub: HubProcess,
    params: Mapping[str, str],
    *,
    within: float = 30.0,
) -> int:
    """Deliver a signed inbound-SMS webhook to one process; its status code."""
    body, headers = signed_request(params)
    async with session.post(
        hub.url + SMS_PATH,
        data=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=within),
    ) as response:
        await response.read()
        return response.status


async def frame_where(
    ws: aiohttp.ClientWebSocketResponse, match: Callable[[Frame], bool], wait: float = 10.0
) -> Frame:
    """The next JSON frame that matches, skipping others; fails after `wait` seconds."""
    deadline = time.monotonic() + wait
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching frame within {wait} s; saw {seen[-20:]}")
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            continue
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"socket ended: {msg.type} {msg.data!r}; saw {seen[-20:]}")
        frame: Frame = json.loads(msg.data)
        if match(frame):
            return frame
        seen.append(str(frame.get("type")))


# --- agents and the store ----------------------------------------------------------------


async def login(session: aiohttp.ClientSession, hub: HubProcess) -> str:
    async with session.post(
        hub.url + "/api/v1/auth/login",
        json={"login": AGENT_LOGIN, "password": AGENT_PASSWORD},
    ) as response:
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
    return str(data["token"])


@contextlib.asynccontextmanager
async def open_store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    """The hubs' Redis store, opened in the test to check what was stored."""
    store = RedisStore(redis.url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every aiohttp request the test makes stays on this machine."""
    original = aiohttp.ClientSession._request

    async def guarded(self: aiohttp.ClientSession, method: str, url: Any, *a: Any, **kw: Any):
        host = URL(str(url)).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"a test tried to reach {host} ({url}); loopback only")
        return await original(self, method, url, *a, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", guarded)
    yield
