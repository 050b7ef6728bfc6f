"""Shared browser-test fixtures: headless Chromium driven by Playwright (async API).

Use from a test package's conftest.py:

    from tests.browser import browser, page  # noqa: F401

and serve the app under test with `serve_app`. The async API keeps the browser, the
hub and the test on one event loop, so a test can act on the store between clicks.

Chromium is Debian's /usr/bin/chromium (scripts/test installs it). When it is missing the
tests fail under CI=true and are skipped elsewhere (tests.servers.common.require_binary).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from tests.servers.common import free_port, require_binary

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
PHONE_VIEWPORT: ViewportSize = {"width": 375, "height": 667}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium, one per test (each test gets its own event loop)."""
    executable = require_binary(CHROMIUM)
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a fresh context (own cookies and localStorage); page errors printed."""
    context = await browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(10_000)
    tab = await context.new_page()
    tab.on("pageerror", lambda exc: print(f"[page error] {exc}"))
    tab.on("console", lambda msg: print(f"[console.{msg.type}] {msg.text}"))
    try:
        yield tab
    finally:
        await context.close()


@asynccontextmanager
async def serve_app(app: web.Application, *, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL (no trailing slash).

    A short shutdown timeout: WebSocket handlers still open at the end of a test must
    not hold the teardown for aiohttp's default minute.
    """
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
