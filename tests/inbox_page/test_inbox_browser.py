"""The shared inbox page in a real browser against a real hub.

The end-to-end test is the story of issue 4: a customer chats from /demo with the widget,
an agent signed in to /inbox/ sees it live, answers, the customer sees the answer, and
after a reload the history is still there. The others pin down the page's own promises:
security headers, live list and unread counts, notes and status, collision notices,
resume after a dropped socket, phone width.
"""

from __future__ import annotations

import re

import aiohttp
import pytest

from hub.app import BUS, STORE
from hub.inbox.api import SOCKETS
from hub.inbox.page import PAGE_CSP
from hub.model import DeliveryState, Identity, IdentityKind
from tests.inbox_page.conftest import Hub, new_page, settle, sign_in

pytestmark = pytest.mark.browser


async def test_inbox_page_headers(hub: Hub) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.url}/inbox", allow_redirects=False) as resp:
            assert resp.status in (301, 302, 307, 308)
            assert resp.headers["Location"] == "/inbox/"
        async with http.get(f"{hub.url}/inbox/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            csp = resp.headers["Content-Security-Policy"]
            assert csp == PAGE_CSP
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["default-src"] == "'self'"
            assert directives["script-src"] == "'self'"  # no inline script, no eval
            assert directives["img-src"] == "'self'"  # remote images blocked
            assert directives["connect-src"] == "'self' ws: wss:"
            assert directives["frame-ancestors"] == "'none'"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert "no-cache" in resp.headers["Cache-Control"]
            body = await resp.text()
            # Every script is an external file: nothing inline for the CSP to refuse.
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", body)
        for name, kind in (("inbox.js", "text/javascript"), ("inbox.css", "text/css")):
            async with http.get(f"{hub.url}/inbox/static/{name}") as resp:
                assert resp.status == 200
                assert resp.content_type == kind
                assert resp.headers["Content-Security-Policy"] == PAGE_CSP
                assert resp.headers["Cache-Control"] == "no-cache"
                etag = resp.headers.get("ETag")
            if etag:
                async with http.get(
                    f"{hub.url}/inbox/static/{name}", headers={"If-None-Match": etag}
                ) as resp:
                    assert resp.status == 304
        for bad in ("..%2Fpage.py", "%2E%2E/page.py", "missing.js", ".hidden.js", "index.html"):
            async with http.get(f"{hub.url}/inbox/static/{bad}") as resp:
                assert resp.status == 404, bad
        async with http.get(f"{hub.url}/inbox/mail-frame") as resp:
            assert resp.status == 200
            frame_csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in frame_csp
            assert "frame-ancestors 'self'" in frame_csp


async def open_widget(customer) -> None:
    launcher = customer.get_by_role("button", name=re.compile("^Open chat"))
    await launcher.wait_for()
    if await launcher.get_attribute("aria-expanded") != "true":
        await launcher.click()
    await customer.get_by_label("Message", exact=True).wait_for()


async def test_customer_chats_agent_answers_end_to_end(hub: Hub, browser) -> None:
    agent, agent_watch = await new_page(browser)
    await sign_in(agent, hub, "alice")
    customer, customer_watch = await new_page(browser)
    await customer.goto(f"{hub.url}/demo")

    # The customer writes from the demo website's widget...
    await open_widget(customer)
    await customer.get_by_label("Message", exact=True).fill("Hi! My monstera has yellow leaves.")
    await customer.get_by_role("button", name="Send", exact=True).click()

    # ...and the agent, already signed in, sees the new conversation appear live.
    item = agent.locator(".conv-item").first
    await item.wait_for()
    await item.locator(".count", has_text="1").wait_for()
    await item.click()
    timeline = agent.locator("#timeline")
    await timeline.locator(".event.dir-in .text", has_text="yellow leaves").wait_for()
    assert await timeline.locator(".event.dir-in .badge").first.text_content() == "web · webchat"

    # The customer typing shows in the agent's conversation.
    # (The widget says "typing" at most every 2 s, so type like a person.)
    await customer.get_by_label("Message", exact=True).press_sequentially(
        "One more thing", delay=250
    )
    await agent.locator("#collision", has_text="is typing").wait_for()
    await customer.get_by_label("Message", exact=True).fill("")

    # The agent answers; the customer sees it in the widget.
    answer = "Less water and more light, please."
    await agent.get_by_label("Reply", exact=True).fill(answer)
    await agent.get_by_role("button", name="Send", exact=True).click()
    await timeline.locator(".event.dir-out .text", has_text=answer).wait_for()
    await customer.locator(".msg.out .text", has_text=answer).wait_for()

    # The customer answers back, live in the agent's open conversation.
    await customer.get_by_label("Message", exact=True).fill("Thank you!")
    await customer.get_by_role("button", name="Send", exact=True).click()
    await timeline.locator(".event.dir-in .text", has_text="Thank you!").wait_for()

    # After a reload the customer's history is still there, in order, once each.
    await customer.reload()
    await open_widget(customer)
    messages = customer.locator(".msg .text")
    await messages.filter(has_text="Thank you!").wait_for()
    assert await messages.all_text_contents() == [
        "Hi! My monstera has yellow leaves.",
        answer,
        "Thank you!",
    ]
    agent_watch.assert_clean()
    customer_watch.assert_clean()


async def test_list_updates_live_and_conversation_works(hub: Hub, browser) -> None:
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    assert await page.locator("#me-name").text_content() == "Alice Agent"

    # A new contact appears in the list without a reload, with an unread count.
    await hub.ingest("Where is my order #123?", visitor="v-live-1", name="Dana Customer")
    item = page.locator(".conv-item", has_text="Dana Customer")
    await item.wait_for()
    await page.locator(".conv-item .count", has_text="1").wait_for()
    await hub.ingest("Hello? <b>anyone</b>", visitor="v-live-1")
    await item.locator(".count", has_text="2").wait_for()
    assert re.match(r"\(2\) Inbox", await page.title())

    # Opening it shows the whole timeline, each event with its channel, and clears unread.
    await item.click()
    timeline = page.locator("#timeline")
    await timeline.locator(".event.dir-in .text", has_text="Where is my order #123?").wait_for()
    assert await timeline.locator(".event.dir-in .text").last.text_content() == (
        "Hello? <b>anyone</b>"
    )
    assert await timeline.locator(".event.dir-in .badge").first.text_content() == "web · webchat"
    assert await page.locator("#conv-title").text_content() == "Dana Customer"
    await page.locator(".conv-item .count").wait_for(state="detached")
    assert await page.get_by_label("Send via").input_value() == "web"

    # Live: a message arriving while the conversation is open shows up in it, unread 0.
    await hub.ingest("Still there?", visitor="v-live-1")
    await timeline.locator(".text", has_text="Still there?").wait_for()
    assert await page.locator(".conv-item .count").count() == 0

    # A private note is visually distinct, and never a reply.
    await page.get_by_label("Private note").check()
    await page.get_by_label("Note, only agents see it").fill("VIP, be nice")
    await page.get_by_role("button", name="Add note").click()
    note = timeline.locator(".event.kind-note")
    await note.locator(".text", has_text="VIP, be nice").wait_for()
    assert await note.locator(".kind-label").text_content() == "Private note"
    assert await note.locator(".badge").text_content() == "internal"

    # A reply leaves on the chat and shows its delivery state.
    await page.get_by_label("Private note").uncheck()
    await page.get_by_label("Reply", exact=True).fill("On its way, Dana!")
    await page.get_by_role("button", name="Send").click()
    reply = timeline.locator(".event.dir-out.kind-message", has_text="On its way, Dana!")
    await reply.wait_for()
    await reply.locator(".delivery").wait_for()
    await page.wait_for_function(
        "() => /sent|delivered/.test(document.querySelector('.event.dir-out.kind-message "
        ".delivery').textContent)"
    )

    # Assign to me, then tags, then resolve: each shows in the header and the timeline.
    await page.get_by_role("button", name="Assign to me").click()
    await page.locator("#conv-meta", has_text="assigned to me").wait_for()
    await timeline.locator(".event.system", has_text="Assigned to me").wait_for()
    await page.get_by_label("Tags").fill("vip, shipping")
    await page.get_by_role("button", name="Save tags").click()
    await page.locator("#conv-meta .tag", has_text="shipping").wait_for()
    await page.get_by_role("button", name="Resolve").click()
    await page.locator("#conv-meta .status", has_text="resolved").wait_for()
    await timeline.locator(".event.system", has_text="Status open → resolved").wait_for()
    assert await page.get_by_role("button", name="Resolve").get_attribute("aria-pressed") == "true"
    # Resolved conversations leave the default (active) list; the "Resolved" filter has it.
    await item.wait_for(state="detached")
    await page.locator("#f-status").select_option("resolved")
    await item.wait_for()

    # Snoozing needs a time; a clear message says so.
    await page.get_by_role("button", name="Snooze").click()
    assert "future" in (await page.locator("#action-error").text_content() or "")

    # Presence switch.
    await page.get_by_label("My presence").select_option("away")
    await settle(page, 0.3)
    async with aiohttp.ClientSession() as http:
        token = await page.evaluate("sessionStorage.getItem('hub.inbox.token')")
        async with http.get(
            f"{hub.url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert (await resp.json())["agent"]["presence"] == "away"

    # Sign out drops to the form and forgets the token.
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_role("button", name="Sign in").wait_for()
    assert await page.evaluate("sessionStorage.getItem('hub.inbox.token')") is None
    watch.assert_clean()


async def test_wrong_password_is_refused_clearly(hub: Hub, browser) -> None:
    page, watch = await new_page(browser)
    await page.goto(f"{hub.url}/inbox/")
    await page.get_by_label("Login").fill("alice")
    await page.get_by_label("Password").fill("not-her-password")
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("alert").filter(has_text="Wrong login or password").wait_for()
    assert await page.locator("#app").is_hidden()
    watch.assert_clean()


async def test_collision_notices_between_agents(hub: Hub, browser) -> None:
    await hub.ingest("Can someone help?", visitor="v-collide", name="Eve Customer")
    alice, alice_watch = await new_page(browser)
    bob, bob_watch = await new_page(browser)
    await sign_in(alice, hub, "alice")
    await sign_in(bob, hub, "bob")
    await alice.locator(".conv-item", has_text="Eve Customer").click()
    await alice.locator("#timeline .text", has_text="Can someone help?").wait_for()

    await bob.locator(".conv-item", has_text="Eve Customer").click()
    await alice.locator("#collision", has_text="Bob Agent is viewing").wait_for()
    await bob.locator("#collision", has_text="Alice Agent is viewing").wait_for()

    await bob.get_by_label("Reply", exact=True).press_sequentially("I'll take it")
    await alice.locator("#collision", has_text="Bob Agent is replying").wait_for()
    alice_watch.assert_clean()
    bob_watch.assert_clean()


async def test_reconnects_and_resumes_missed_events(hub: Hub, browser) -> None:
    await hub.ingest("First message", visitor="v-resume", name="Finn Customer")
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    await page.locator(".conv-item", has_text="Finn Customer").click()
    await page.locator("#timeline .text", has_text="First message").wait_for()

    # The hub drops every agent socket; what is stored meanwhile comes back by resume.
    await hub.app[SOCKETS].close_all()
    await hub.ingest("Sent while you were away", visitor="v-resume")
    await page.locator("#timeline .text", has_text="Sent while you were away").wait_for()
    await page.locator("#live-state.is-live").wait_for()
    await hub.ingest("And after", visitor="v-resume")
    await page.locator("#timeline .text", has_text="And after").wait_for()
    # Exactly once each: no duplicates from replay + live.
    for text in ("First message", "Sent while you were away", "And after"):
        assert await page.locator("#timeline .text", has_text=text).count() == 1
    watch.assert_clean()


async def test_phone_width_one_pane_at_a_time(hub: Hub, browser) -> None:
    await hub.ingest("From my phone", visitor="v-phone", name="Gus Customer")
    page, watch = await new_page(browser, viewport={"width": 375, "height": 667})
    await sign_in(page, hub, "alice")
    item = page.locator(".conv-item", has_text="Gus Customer")
    await item.wait_for()
    assert await page.locator("#conversation").is_hidden()
    # Keyboard only: focus the conversation and press Enter.
    await item.focus()
    await page.keyboard.press("Enter")
    await page.locator("#timeline .text", has_text="From my phone").wait_for()
    assert await page.locator(".list-pane").is_hidden()
    # Nothing wider than the screen.
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375
    await page.get_by_role("button", name="Back to conversations").click()
    await item.wait_for(state="visible")
    assert await page.evaluate("document.activeElement.classList.contains('conv-item')")
    watch.assert_clean()


async def test_paging_load_more_and_load_older(hub: Hub, browser) -> None:
    # 60 events for one customer: the first page shows 50, "Load older" the rest.
    for i in range(60):
        await hub.ingest(f"message {i:02d}", visitor="v-many", name="Hana Customer")
    # 55 conversations: the list pages by 50 too.
    for i in range(54):
        await hub.ingest("hi", visitor=f"v-crowd-{i:02d}", name=f"Crowd {i:02d}")
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    # The first page holds 50 (the router, assigning waiting conversations to the agent
    # who just came online, may add a few of the older ones live meanwhile).
    await page.wait_for_function("() => document.querySelectorAll('.conv-item').length >= 50")
    await page.get_by_role("button", name="Load more").click()
    await page.wait_for_function("() => document.querySelectorAll('.conv-item').length === 55")
    await page.get_by_role("button", name="Load more").wait_for(state="hidden")

    await page.locator(".conv-item", has_text="Hana Customer").click()
    texts = page.locator("#timeline .event.dir-in .text")
    await page.wait_for_function("() => document.querySelectorAll('#timeline .text').length > 0")
    # One page: the newest 50 events (the router's assignment event may be one of them).
    assert await page.locator("#timeline .event").count() in (50, 51)  # 51: assigned live
    assert await texts.last.text_content() == "message 59"
    assert await texts.first.text_content() in ("message 10", "message 11")
    await page.get_by_role("button", name="Load older").click()
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline .event.dir-in .text').length === 60"
    )
    assert await texts.all_text_contents() == [f"message {i:02d}" for i in range(60)]
    assert await page.get_by_role("button", name="Load older").is_hidden()
    watch.assert_clean()


async def test_failed_delivery_shows_its_reason(hub: Hub, browser) -> None:
    await hub.ingest("Please call me back", visitor="v-fail", name="Ivy Customer")
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    await page.locator(".conv-item", has_text="Ivy Customer").click()
    await page.get_by_label("Reply", exact=True).fill("Calling in 5 minutes")
    await page.get_by_role("button", name="Send", exact=True).click()
    reply = page.locator("#timeline .event.dir-out", has_text="Calling in 5 minutes")
    await reply.wait_for()
    event_id = await reply.get_attribute("data-id")
    assert event_id

    # A provider's late verdict (a status callback) reaches the page live.
    failed = await hub.app[STORE].record_delivery(
        event_id, DeliveryState.FAILED, error="carrier rejected: unknown number"
    )
    await hub.app[BUS].publish([failed])
    delivery = reply.locator(".delivery.state-failed")
    await delivery.wait_for()
    assert "failed: carrier rejected: unknown number" in (await delivery.text_content() or "")
    watch.assert_clean()


async def test_reply_channel_picker(hub: Hub, browser) -> None:
    identity = Identity(IdentityKind.CHAT, "v-two-sites")
    await hub.ingest("Hi from the blog", identity=identity, name="Jo Customer")
    await hub.ingest("And now from the shop", identity=identity, channel="shop")
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    await page.locator(".conv-item", has_text="Jo Customer").click()
    timeline = page.locator("#timeline")
    await timeline.locator(".text", has_text="And now from the shop").wait_for()
    badges = await timeline.locator(".event.dir-in .badge").all_text_contents()
    assert badges == ["web · webchat", "shop · webchat"]

    # Default: where the customer last wrote; the other channel is offered too.
    picker = page.get_by_label("Send via")
    assert await picker.input_value() == "shop"
    options = await picker.locator("option").all_text_contents()
    assert options == ["shop (webchat) · default", "web (webchat)"]
    await picker.select_option("web")
    await page.get_by_label("Reply", exact=True).fill("Answering on the blog chat")
    await page.keyboard.press("Control+Enter")  # sends from the keyboard
    reply = timeline.locator(".event.dir-out", has_text="Answering on the blog chat")
    await reply.wait_for()
    assert await reply.locator(".badge").text_content() == "web · webchat"

    # A note has no channel: the picker is off while the note toggle is on.
    await page.get_by_label("Private note").check()
    assert await picker.is_disabled()
    watch.assert_clean()


async def test_revoked_session_returns_to_sign_in(hub: Hub, browser) -> None:
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    # Every control has a label (screen readers, voice control).
    unlabeled = await page.evaluate(
        """() => [...document.querySelectorAll('#app input, #app select, #app textarea')]
          .filter((el) => !el.labels.length && !el.getAttribute('aria-label'))
          .map((el) => el.id || el.outerHTML)"""
    )
    assert unlabeled == []
    token = await page.evaluate("sessionStorage.getItem('hub.inbox.token')")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{hub.url}/api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 204
    # The hub closes the agent socket of a revoked token; the page drops to sign-in.
    await page.get_by_role("alert").filter(has_text="session has ended").wait_for()
    assert await page.evaluate("sessionStorage.getItem('hub.inbox.token')") is None
    watch.assert_clean()


ACCEPT_QUEUE = """
routing:
  queues:
    - name: general
      require_accept: true
      offer_timeout_seconds: 60
      agents: [alice]
"""


@pytest.mark.parametrize("hub", [ACCEPT_QUEUE], indirect=True)
async def test_offers_can_be_accepted_or_declined(hub: Hub, browser) -> None:
    page, watch = await new_page(browser)
    await sign_in(page, hub, "alice")
    offers = page.get_by_role("region", name="Offered conversations")

    await hub.ingest("I need help with my plant", visitor="v-offer-1", name="Kim Customer")
    offer = offers.locator(".offer", has_text="Kim Customer is waiting")
    await offer.wait_for()
    await offer.get_by_role("button", name="Accept").click()
    await page.locator("#conv-title", has_text="Kim Customer").wait_for()
    await page.locator("#conv-meta", has_text="assigned to me").wait_for()
    await offers.wait_for(state="hidden")

    await hub.ingest("Me too", visitor="v-offer-2", name="Lee Customer")
    offer = offers.locator(".offer", has_text="Lee Customer is waiting")
    await offer.wait_for()
    await offer.get_by_role("button", name="Decline").click()
    await offers.wait_for(state="hidden")
    assert await page.locator("#conv-title").text_content() == "Kim Customer"
    watch.assert_clean()
