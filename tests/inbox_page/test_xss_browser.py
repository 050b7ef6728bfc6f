"""Hostile customer input never runs in the agent's page, and is shown exactly as sent.

Every payload of tests/fixtures/xss/corpus.txt calls `window.__xss(N)` if it ever
executes; the trap (tests/inbox_page/conftest.py) is installed in every frame before any
page script, and the test fails on any call, any dialog, or any uncaught page error.
Payloads travel the real paths: the visitor WebSocket (messages, names), the ingest path
(customer names in the list), the agent's own note, and email HTML.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from hub.model import ChannelType, Identity, IdentityKind
from tests.browser import serve_app
from tests.inbox_page.conftest import Hub, corpus, new_page, settle, sign_in

pytestmark = pytest.mark.browser

# Elements that only markup made from data could create in the page.
DATA_BORN = (
    "#app img, #app svg, #app script, #app iframe:not(.email-frame), #app object, "
    "#app embed, #app video, #app audio, #app math, #app marquee, #app details:not(.actions), "
    "#app template, #app style, #app meta, #app base, #app x, #app noscript, "
    "#timeline form, #timeline input, #conv-list form, #conv-list input"
)

NO_HANDLERS = """() => [...document.querySelectorAll('*')].flatMap((el) =>
  [...el.attributes].filter((a) => /^on/i.test(a.name)).map((a) => el.tagName + ' ' + a.name))"""


async def assert_inert(page) -> None:
    born = await page.eval_on_selector_all(DATA_BORN, "els => els.map((e) => e.outerHTML)")
    assert born == []
    assert await page.evaluate(NO_HANDLERS) == []
    assert await page.evaluate("window.__xssHits || []") == []
    hrefs = await page.evaluate(
        "() => [...document.querySelectorAll('a[href]')].map((a) => a.href)"
    )
    assert not [h for h in hrefs if not h.startswith(("http:", "https:"))]


async def test_corpus_as_chat_messages_and_names_never_runs(hub: Hub, browser) -> None:
    payloads = corpus()
    assert len(payloads) >= 20
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")

    # Live path: through the real visitor WebSocket while the agent watches. A visitor
    # may send 30 messages a minute, so two visitors share the corpus.
    half = len(payloads) // 2
    await hub.visitor_chat(payloads[:half], name="Xavier Tester")
    await hub.visitor_chat(payloads[half:], name=payloads[1])  # the name itself is hostile

    first = page.locator(".conv-item", has_text="Xavier Tester")
    await first.click()
    texts = page.locator("#timeline .event.dir-in .text")
    await page.wait_for_function(
        f"() => document.querySelectorAll('#timeline .event.dir-in .text').length >= {half}"
    )
    assert await texts.all_text_contents() == payloads[:half]

    second = page.locator(".conv-item .conv-name").filter(has_text=payloads[1])
    await second.click()
    await page.locator("#conv-title").filter(has_text=payloads[1]).wait_for()
    await page.wait_for_function(
        "n => document.querySelectorAll('#timeline .event.dir-in .text').length >= n",
        arg=len(payloads) - half,
    )
    assert await texts.all_text_contents() == payloads[half:]
    assert await page.locator("#conv-title").text_content() == payloads[1]

    # Every payload as a customer's name in the list, arriving live.
    for i, payload in enumerate(payloads):
        await hub.ingest("hello", visitor=f"v-name-{i:03d}", name=payload)
    await page.wait_for_function(
        "n => document.querySelectorAll('.conv-item').length >= n", arg=len(payloads) + 2
    )
    names = set(await page.locator(".conv-item .conv-name").all_text_contents())
    assert set(payloads) <= names

    # The agent's own note, pasted from somewhere hostile, is text too.
    await first.click()
    await page.locator("#conv-title", has_text="Xavier Tester").wait_for()
    note_text = "\n".join(payloads[:10])
    await page.get_by_label("Private note").check()
    await page.get_by_label("Note, only agents see it").fill(note_text)
    await page.get_by_role("button", name="Add note").click()
    note = page.locator("#timeline .event.kind-note .text")
    await note.wait_for()
    assert await note.text_content() == note_text

    await settle(page, 1.0)
    await assert_inert(page)
    watch.assert_clean()

    # History path: after a reload everything comes from the API, still inert.
    await page.reload()
    await page.locator("#live-state.is-live").wait_for()
    await page.locator(".conv-item", has_text="Xavier Tester").click()
    await page.wait_for_function(
        f"() => document.querySelectorAll('#timeline .event.dir-in .text').length >= {half}"
    )
    assert await texts.all_text_contents() == payloads[:half]
    await settle(page, 1.0)
    await assert_inert(page)
    watch.assert_clean()


@pytest.fixture
async def remote_images() -> AsyncIterator[tuple[str, list[str]]]:
    """Another origin serving images, recording every request: the "remote" in remote images."""
    hits: list[str] = []
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000000000500010d0a2db40000000049454e44ae426082"
    )

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=png, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", image)
    async with serve_app(app) as url:
        yield url, hits


async def test_email_html_sandboxed_and_remote_images_opt_in(
    hub: Hub, browser, remote_images: tuple[str, list[str]]
) -> None:
    remote, hits = remote_images
    payloads = corpus()
    # Not even sanitized here (the email channel does that): the frame alone must hold.
    html = (
        "<p>Your invoice is attached.</p>"
        f'<img src="{remote}/tracker.png" alt="tracking pixel">'
        f"<div style=\"background:url('{remote}/bg.png')\">styled</div>" + "".join(payloads)
    )
    await hub.ingest(
        "Your invoice is attached.",
        html=html,
        channel="mail",
        channel_type=ChannelType.EMAIL,
        identity=Identity(IdentityKind.EMAIL, "pat@example.com"),
        name="Pat Mailer",
    )
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    await page.locator(".conv-item", has_text="Pat Mailer").click()

    frame_el = page.locator("#timeline .email-frame")
    await frame_el.wait_for()
    assert await frame_el.get_attribute("sandbox") == "allow-popups"  # never allow-scripts
    email = page.frame_locator("#timeline .email-frame")
    await email.locator("p", has_text="Your invoice is attached.").wait_for()
    await settle(page, 1.0)
    assert hits == [], "remote images must stay blocked until the agent asks"
    assert await page.locator("#timeline .badge").first.text_content() == "mail · email"

    # One click shows this message's images, in a frame that still runs nothing of it.
    await page.get_by_role("button", name="Show remote images").click()
    shown = page.frame_locator("#timeline .email-frame").frame_locator("iframe")
    await shown.locator("p", has_text="Your invoice is attached.").wait_for()
    for _ in range(50):
        if "/tracker.png" in hits:
            break
        await asyncio.sleep(0.1)
    assert "/tracker.png" in hits
    assert await page.locator("#timeline .email-frame").get_attribute("sandbox") == (
        "allow-scripts allow-popups"  # opaque origin: no access to the inbox or its token
    )

    await settle(page, 1.0)
    assert await page.evaluate("window.__xssHits || []") == []
    watch.assert_clean()
