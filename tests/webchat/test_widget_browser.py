"""The widget in a real browser: headless Chromium on the hub's /demo page."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Page, expect

from hub.app import ADAPTERS, STORE, create_app
from hub.channels.webchat import WebchatAdapter
from hub.config import Config
from hub.inbox.presence import PRESENCE_KEY, PresenceRegistry
from hub.model import ConversationQuery, Event, EventKind, Identity, IdentityKind
from hub.timeline.sqlite import SqliteStore
from hub.timeline.store import TimelineStore
from tests.browser import PHONE_VIEWPORT, serve_app
from tests.webchat.conftest import agent_reply, with_offline_email

pytestmark = pytest.mark.browser


@dataclass
class Hub:
    url: str
    app: web.Application

    @property
    def store(self) -> TimelineStore:
        return self.app[STORE]

    async def only_conversation(self) -> str:
        page = await self.store.list_conversations(ConversationQuery(), limit=10)
        assert len(page.items) == 1, page.items
        return page.items[0].id

    async def messages(self) -> list[Event]:
        conv = await self.only_conversation()
        events = (await self.store.conversation_events(conv, limit=100)).items
        return [e for e in reversed(events) if e.kind is EventKind.MESSAGE]


@asynccontextmanager
async def start_hub(
    config: Config, tmp_path: Path, presence: PresenceRegistry | None = None
) -> AsyncIterator[Hub]:
    """The hub served on a free loopback port; `presence` makes agents' availability known."""
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"), extensions=())
    if presence is not None:
        app[PRESENCE_KEY] = presence
    async with serve_app(app) as url:
        try:
            yield Hub(url, app)
        finally:
            # Until the app closes channel sockets on shutdown itself, open widget
            # sockets would hold the server's teardown for its whole shutdown timeout.
            for adapter in app[ADAPTERS].values():
                if isinstance(adapter, WebchatAdapter):
                    await adapter.close_connections()


@pytest.fixture
async def hub(config: Config, tmp_path: Path) -> AsyncIterator[Hub]:
    async with start_hub(config, tmp_path) as running:
        yield running


class Widget:
    """The widget as a user finds it: by roles and labels (they pierce its shadow root)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.launcher = page.get_by_role("button", name=re.compile(r"^Open chat"))
        self.dialog = page.get_by_role("dialog", name="Chat with us")
        self.log = page.get_by_role("log", name="Messages")
        self.box = page.get_by_role("textbox", name="Message")

    async def open(self) -> None:
        await self.launcher.click()
        await expect(self.dialog).to_be_visible()

    async def send(self, text: str) -> None:
        await self.box.fill(text)
        await self.box.press("Enter")

    def mine(self, text: str) -> object:
        return self.log.locator(".msg.in", has_text=text)


async def test_send_ack_store_and_resume_after_reload(page: Page, hub: Hub) -> None:
    await page.goto(f"{hub.url}/demo")
    widget = Widget(page)
    await widget.open()
    await widget.send("Do you ship to Lisbon?")
    mine = widget.log.locator(".msg.in", has_text="Do you ship to Lisbon?")
    await expect(mine).to_have_count(1)
    await expect(mine.locator(".meta")).to_contain_text("Sent")
    await expect(widget.box).to_have_value("")
    stored = await hub.messages()
    assert [e.text for e in stored] == ["Do you ship to Lisbon?"]
    assert await mine.get_attribute("data-id") == stored[0].id

    # Reload: the conversation is back (from the widget's cache, resumed from the server).
    await page.reload()
    await widget.open()
    await expect(widget.log.locator(".msg")).to_have_count(1)
    await expect(widget.log.locator(".msg.in")).to_have_text(re.compile("Do you ship to Lisbon"))

    # An agent answers while the page is closed; a fresh page (no cached messages, only
    # the token) gets the whole history from the hub.
    await page.goto("about:blank")
    await agent_reply_to_only_conversation(hub, "Yes, in 2-3 days.")
    await page.goto(f"{hub.url}/demo")
    await page.evaluate(
        """() => {
            for (const key of Object.keys(localStorage)) {
                const state = JSON.parse(localStorage.getItem(key));
                state.messages = []; state.last_event_id = null;
                localStorage.setItem(key, JSON.stringify(state));
            }
        }"""
    )
    await page.reload()
    await widget.open()
    await expect(widget.log.locator(".msg")).to_have_count(2)
    await expect(widget.log.locator(".msg").nth(0)).to_contain_text("Do you ship to Lisbon?")
    await expect(widget.log.locator(".msg.out")).to_contain_text("Yes, in 2-3 days.")
    assert len(await hub.messages()) == 2  # nothing was sent twice


async def agent_reply_to_only_conversation(hub: Hub, text: str) -> None:
    await agent_reply(hub.app, await hub.only_conversation(), text)


async def test_agent_reply_appears_live(page: Page, hub: Hub) -> None:
    await page.goto(f"{hub.url}/demo")
    widget = Widget(page)
    await widget.open()
    await widget.send("Is the monstera pet safe?")
    await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
    await agent_reply_to_only_conversation(hub, "Not for cats, sadly.")
    reply = widget.log.locator(".msg.out")
    await expect(reply).to_contain_text("Not for cats, sadly.")
    await expect(reply.locator(".who")).to_have_text("Ann Agent")
    # Closed widget: a reply shows as unread on the launcher.
    await page.keyboard.press("Escape")
    await expect(widget.dialog).to_be_hidden()
    await agent_reply_to_only_conversation(hub, "But great for offices.")
    await expect(
        page.get_by_role("button", name="Open chat: Chat with us (1 unread)")
    ).to_be_visible()


async def test_message_text_is_never_markup(page: Page, hub: Hub) -> None:
    await page.goto(f"{hub.url}/demo")
    widget = Widget(page)
    await widget.open()
    attack = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    await widget.send(attack)
    await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
    await agent_reply_to_only_conversation(hub, '<svg onload="window.__pwned=3"></svg>')
    await expect(widget.log.locator(".msg.out .text")).to_have_text(
        '<svg onload="window.__pwned=3"></svg>'
    )
    await expect(widget.log.locator(".msg.in .text")).to_have_text(attack)
    assert await widget.log.locator("img, script, svg").count() == 0
    assert await page.evaluate("() => window.__pwned") is None


async def test_accessible_and_usable_on_a_phone(page: Page, hub: Hub) -> None:
    await page.set_viewport_size(PHONE_VIEWPORT)
    await page.goto(f"{hub.url}/demo")
    widget = Widget(page)
    await expect(widget.launcher).to_have_attribute("aria-expanded", "false")
    await expect(widget.launcher).to_have_attribute("aria-haspopup", "dialog")
    # Keyboard only: focus the launcher and press Enter.
    await widget.launcher.focus()
    await page.keyboard.press("Enter")
    await expect(widget.dialog).to_be_visible()
    await expect(widget.launcher).to_have_attribute("aria-expanded", "true")
    await expect(widget.box).to_be_focused()
    await expect(widget.log).to_have_attribute("aria-live", "polite")
    await expect(page.get_by_role("button", name="Close chat")).to_be_visible()

    box = await widget.dialog.bounding_box()
    assert box is not None
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE_VIEWPORT["width"] + 0.5
    assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE_VIEWPORT["height"] + 0.5
    send = page.get_by_role("button", name="Send")
    send_box = await send.bounding_box()
    assert send_box is not None and send_box["x"] + send_box["width"] <= PHONE_VIEWPORT["width"]

    await page.keyboard.type("Typed on a phone")
    await page.keyboard.press("Enter")
    await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
    # Escape closes and gives focus back to the launcher.
    await page.keyboard.press("Escape")
    await expect(widget.dialog).to_be_hidden()
    await expect(widget.launcher).to_be_focused()


async def test_offline_notice_offers_email(page: Page, config: Config, tmp_path: Path) -> None:
    async with start_hub(with_offline_email(config), tmp_path, PresenceRegistry()) as hub:
        await page.goto(f"{hub.url}/demo")
        widget = Widget(page)
        await widget.open()
        await expect(page.get_by_role("status")).to_have_text(
            "No one is online right now \u2014 leave a message or continue by email"
        )
        email = page.get_by_role("textbox", name="Your email, to continue by email")
        await email.fill("grace@example.com")
        await page.get_by_role("button", name="Continue by email").click()
        await expect(page.get_by_role("status")).to_contain_text("grace@example.com")
        await widget.send("Please send me the invoice")
        await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
        customer_id = (await hub.messages())[0].customer_id
        customer = await hub.store.get_customer(customer_id)
        assert customer is not None
        assert any(i.value == "grace@example.com" and not i.verified for i in customer.identities)


async def test_reconnects_after_a_drop_resends_and_catches_up(page: Page, hub: Hub) -> None:
    await page.goto(f"{hub.url}/demo")
    widget = Widget(page)
    await widget.open()
    await widget.send("first")
    await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
    adapter = hub.app[ADAPTERS]["web"]
    assert isinstance(adapter, WebchatAdapter)

    # The hub drops the socket; meanwhile an agent answers and the visitor writes on.
    await adapter.close_connections()
    await agent_reply_to_only_conversation(hub, "answer written while you were away")
    await widget.send("second, sent while reconnecting")
    await expect(widget.log.locator(".msg.out")).to_contain_text("answer written while")
    second = widget.log.locator(".msg.in", has_text="second, sent while reconnecting")
    await expect(second.locator(".meta")).to_contain_text("Sent")
    assert [e.text for e in await hub.messages()] == [
        "first",
        "answer written while you were away",
        "second, sent while reconnecting",
    ]
    await expect(widget.log.locator(".msg")).to_have_count(3)


async def test_embedded_on_another_site_with_a_pre_chat_form(page: Page, hub: Hub) -> None:
    # A website on its own origin carrying the widget with one tag that points at the
    # hub: the widget finds the hub's address from that src. (Served from loopback too:
    # Chromium refuses a public origin reaching a loopback hub.)
    site_html = f"""<!doctype html><html lang="en"><head><title>Shop</title></head><body>
        <h1>Shop</h1>
        <script src="{hub.url}/widget.js" data-channel="web" data-prechat="true" async></script>
        </body></html>"""

    async def home(request: web.Request) -> web.Response:
        return web.Response(text=site_html, content_type="text/html")

    site = web.Application()
    site.router.add_get("/", home)
    async with serve_app(site) as site_url:
        assert site_url != hub.url
        await page.goto(f"{site_url}/")
        widget = Widget(page)
        await widget.launcher.click()
        name = page.get_by_role("textbox", name="Your name")
        await expect(name).to_be_focused()
        await expect(widget.box).to_be_hidden()
        await name.fill("Grace")
        await page.get_by_role("textbox", name="Your email (optional)").fill("grace@example.com")
        await page.get_by_role("button", name="Start chat").click()
        await expect(widget.box).to_be_focused()
        await widget.send("Hi from the shop")
        await expect(widget.log.locator(".msg.in .meta")).to_contain_text("Sent")
    event = (await hub.messages())[0]
    assert event.channel == "web"
    customer = await hub.store.get_customer(event.customer_id)
    assert customer is not None and customer.display_name == "Grace"
    email = Identity(IdentityKind.EMAIL, "grace@example.com", verified=False)
    assert email in customer.identities
