"""A real hub on a loopback port and headless Chromium driving the inbox page.

The hub is the whole app (config parser, SQLite file, web chat channel, inbox API and
page) served by aiohttp's AppRunner (tests.browser.serve_app), so the browser talks to
it exactly as in production. Agents have real argon2 hashes, made once per session
(argon2 is slow on purpose).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.app import INGESTOR, create_app
from hub.config import parse_config
from hub.model import ChannelType, Identity, IdentityKind, Inbound, Recorded
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore
from tests.browser import VIEWPORT, browser, serve_app  # noqa: F401 (fixture)

# login -> (agent id, display name, password)
AGENTS = {
    "alice": ("alice", "Alice Agent", "alice-secret-pw"),
    "bob": ("bob", "Bob Agent", "bob-secret-pw"),
}

XSS_CORPUS = Path(__file__).parent.parent / "fixtures" / "xss" / "corpus.txt"

# Installed before any page script, in every frame that may run scripts. Every corpus
# payload calls __xss(N) if it ever executes: record it in the top page when reachable
# and always on the console (which the test watches for every frame).
XSS_TRAP = """
(() => {
  const hit = (n) => {
    try { (window.top.__xssHits = window.top.__xssHits || []).push(String(n)); } catch (e) {}
    console.error("XSS-FIRED " + n);
  };
  Object.defineProperty(window, "__xss", { value: hit, writable: false });
})();
"""


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {login: hash_password(pw) for login, (_, _, pw) in AGENTS.items()}


def hub_yaml(data_dir: Path, hashes: dict[str, str], extra: str = "") -> str:
    agents = "".join(
        f"""
  - id: {agent_id}
    name: {name}
    login: {login}
    role: agent
    password_hash: "{hashes[login]}"
"""
        for login, (agent_id, name, _) in AGENTS.items()
    )
    return f"""
hub:
  data_dir: {data_dir}
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: web
    type: webchat
    title: Chat with Example
  # A second chat (another website of the same business) for the reply channel picker.
  - name: shop
    type: webchat
agents:{agents}
{extra}"""


_ids = itertools.count(1)


@dataclass
class Hub:
    url: str
    app: Any
    ws_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.ws_url = self.url.replace("http://", "ws://", 1)

    async def ingest(
        self,
        text: str = "",
        *,
        visitor: str | None = None,
        name: str | None = None,
        html: str | None = None,
        channel: str = "web",
        channel_type: ChannelType = ChannelType.WEBCHAT,
        identity: Identity | None = None,
    ) -> Recorded:
        """A customer message stored the way channels store them."""
        n = next(_ids)
        return await self.app[INGESTOR].ingest(
            Inbound(
                channel=channel,
                channel_type=channel_type,
                external_id=f"test-{n}",
                identity=identity or Identity(IdentityKind.CHAT, visitor or f"visitor-{n:04d}"),
                text=text,
                html=html,
                display_name=name,
            )
        )

    async def visitor_chat(self, texts: list[str], name: str | None = None) -> dict[str, Any]:
        """Send messages through the real visitor WebSocket; returns the welcome frame."""
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{self.ws_url}/chat/web/ws", headers={"Origin": self.url}) as ws,
        ):
            hello: dict[str, Any] = {"type": "hello"}
            if name is not None:
                hello["name"] = name
            await ws.send_str(json.dumps(hello))
            welcome = await _receive(ws, "welcome")
            for i, text in enumerate(texts):
                client_id = f"c{next(_ids)}x{i}"
                frame = {"type": "message", "client_id": client_id, "text": text}
                await ws.send_str(json.dumps(frame))
                ack = await _receive(ws, "ack", "error")
                assert ack["type"] == "ack", ack
            return welcome


async def _receive(ws: aiohttp.ClientWebSocketResponse, *types: str) -> dict[str, Any]:
    while True:
        frame = json.loads(await ws.receive_str(timeout=10))
        if frame.get("type") in types:
            return frame


@pytest.fixture
async def hub(
    request: pytest.FixtureRequest, tmp_path: Path, password_hashes: dict[str, str]
) -> AsyncIterator[Hub]:
    """The hub; `@pytest.mark.parametrize("hub", [YAML], indirect=True)` adds top-level
    YAML sections (routing...)."""
    extra = getattr(request, "param", "")
    yaml_text = hub_yaml(tmp_path, password_hashes, extra)
    config = parse_config(yaml_text, "inbox-page.yaml", {}, tmp_path)
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"))
    async with serve_app(app) as url:
        yield Hub(url=url, app=app)


@dataclass
class Watch:
    """What went wrong in a page: trapped XSS, dialogs, uncaught script errors."""

    xss: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.xss, f"payloads executed: {self.xss}"
        assert not self.dialogs, f"dialogs opened: {self.dialogs}"
        assert not self.errors, f"uncaught page errors: {self.errors}"


async def new_page(chromium: Any, *, viewport: Any = None) -> tuple[Any, Watch]:
    """A page in its own context (own storage, like another person's browser)."""
    context = await chromium.new_context(viewport=viewport or VIEWPORT)
    await context.add_init_script(XSS_TRAP)
    page = await context.new_page()
    watch = Watch()

    def on_console(msg: Any) -> None:
        if "XSS-FIRED" in msg.text:
            watch.xss.append(msg.text)

    async def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("console", on_console)
    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    page.set_default_timeout(10_000)
    return page, watch


async def sign_in(page: Any, hub: Hub, login: str) -> None:
    await page.goto(f"{hub.url}/inbox/")
    await page.get_by_label("Login").fill(login)
    await page.get_by_label("Password").fill(AGENTS[login][2])
    await page.get_by_role("button", name="Sign in").click()
    # Live: the agent WebSocket is open, so nothing stored from now on is missed.
    await page.locator("#live-state.is-live").wait_for()


def corpus() -> list[str]:
    lines = XSS_CORPUS.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


async def settle(page: Any, seconds: float = 0.5) -> None:
    """Give late handlers (onerror of a failed image, autofocus) a chance to fire."""
    await asyncio.sleep(seconds)
    await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => r()))")
