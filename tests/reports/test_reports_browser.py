"""The reports page in headless Chromium: sign in, charts drawn from the API's data,
the CSV download, the live queue view, and an agent kept out."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Download, Page

from hub.config import Config
from tests.browser import VIEWPORT, browser, serve_app  # noqa: F401 (fixture)
from tests.reports.conftest import AGENTS, build_app, tell

pytestmark = pytest.mark.browser


@pytest.fixture
async def hub(config: Config, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    app = build_app(config, tmp_path)
    async with serve_app(app) as url:
        await tell(app)
        yield url, app


async def open_page(chromium: Browser) -> tuple[Page, list[str]]:
    context = await chromium.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.set_default_timeout(10_000)
    return page, errors


async def downloaded(download: Download) -> str:
    path = Path(await download.path())
    return await asyncio.to_thread(path.read_text, encoding="utf-8")


async def sign_in(page: Page, url: str, login: str) -> None:
    await page.goto(f"{url}/inbox/reports")
    await page.get_by_label("Login").fill(login)
    await page.get_by_label("Password").fill(AGENTS[login][2])
    await page.get_by_role("button", name="Sign in").click()


async def test_charts_csv_and_live_queues(browser: Browser, hub: tuple[str, Any]) -> None:  # noqa: F811
    url, _ = hub
    page, errors = await open_page(browser)
    await sign_in(page, url, "sam")

    # The line chart: one point per day of the default week, drawn from the API's values.
    series = page.locator("#chart-series svg[data-metric='conversations']")
    await series.wait_for()
    assert await series.get_attribute("data-points") == "7"
    points = page.locator("#chart-series circle.point")
    values = [int(v or 0) for v in await points.evaluate_all("cs => cs.map(c => c.dataset.value)")]
    assert sum(values) == 5 and len(values) >= 1
    assert await page.locator("#chart-series path.series").get_attribute("d")

    # Volume by hour of day: 24 pairs of bars; by channel: one pair per channel.
    hours = page.locator("#chart-hours rect.bar-in")
    assert await hours.count() == 24
    in_values = await hours.evaluate_all("rs => rs.map(r => Number(r.dataset.value))")
    assert sum(in_values) == 6
    heights = await hours.evaluate_all("rs => rs.map(r => Number(r.getAttribute('height')))")
    assert max(heights) > 0
    channels = page.locator("#chart-channels rect.bar-in")
    assert await channels.count() == 3

    # Key figures and the breakdown table.
    await page.locator("#kpis dd").first.wait_for()
    assert (await page.locator("#kpis dd").first.inner_text()).startswith("5")
    assert await page.locator("#groups-table tbody tr").count() == 3

    # Another figure: the chart is redrawn with durations.
    await page.locator("#f-metric").select_option("first_response")
    await page.locator("#chart-series svg[data-metric='first_response']").wait_for()
    assert await page.locator("#chart-series circle.point").count() >= 1

    # The live view: queues with waiting conversations.
    await page.locator("#queue-table tbody tr").first.wait_for()
    rows = await page.locator("#queue-table tbody tr").all_inner_texts()
    assert any(r.startswith("general") and "\t1\t" in r for r in rows), rows
    assert "updated" in await page.locator("#live-updated").inner_text()

    # CSV: one row per conversation, downloaded through the page.
    async with page.expect_download() as caught:
        await page.locator("#export").click()
    download = await caught.value
    assert download.suggested_filename.startswith("hub-conversations-")
    text = await downloaded(download)
    rows_csv = list(csv.DictReader(io.StringIO(text)))
    assert len(rows_csv) == 5
    assert {r["channel"] for r in rows_csv} == {"web", "shop", "phone"}

    # And the breakdown as CSV.
    await page.locator("#f-by").select_option("queue")
    await page.locator("#groups-table tbody th", has_text="billing").wait_for()
    await page.locator("#f-export").select_option("group")
    async with page.expect_download() as caught:
        await page.locator("#export").click()
    grouped = await downloaded(await caught.value)
    assert [line.split(",")[0] for line in grouped.splitlines()] == [
        "queue",
        "(all)",
        "general",
        "billing",
    ]
    assert errors == []


async def test_filters_change_the_figures(browser: Browser, hub: tuple[str, Any]) -> None:  # noqa: F811
    url, _ = hub
    page, errors = await open_page(browser)
    await sign_in(page, url, "root")
    await page.locator("#chart-series svg[data-points]").wait_for()
    await page.locator("#f-channel").select_option("phone")
    async with page.expect_response(lambda r: "/reports/summary" in r.url) as caught:
        await page.get_by_role("button", name="Show").click()
    body = json.loads(await (await caught.value).text())
    assert body["filters"]["channel"] == "phone" and body["overall"]["conversations"] == 2
    await page.locator("#kpis dd", has_text="2").first.wait_for()
    assert await page.locator("#chart-channels rect.bar-in").count() == 1
    assert errors == []


async def test_an_agent_is_kept_out(browser: Browser, hub: tuple[str, Any]) -> None:  # noqa: F811
    url, _ = hub
    page, _errors = await open_page(browser)
    await sign_in(page, url, "alice")
    denied = page.locator("#denied")
    await denied.wait_for()
    assert "supervisor" in await denied.inner_text()
    assert await page.locator("#content").is_hidden()
