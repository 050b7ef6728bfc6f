"""SMTP out through the durable outbox, against a capturing aiosmtpd server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hub import outbox
from hub.channels.email_token import token_in_address, verify_token
from hub.model import (
    SYSTEM,
    ChannelType,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    agent_author,
)
from hub.outbox import OutboxWorker
from tests.email.conftest import ADDRESS, CHANNEL, make_mail
from tests.servers.smtp import SmtpServer


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "retry_delay", lambda attempts: 0.0)


def reply(text: str, to: str = "customer@client.example") -> EventDraft:
    return EventDraft(
        kind=EventKind.MESSAGE,
        direction=Direction.OUT,
        author=agent_author("alice"),
        channel=CHANNEL,
        channel_type=ChannelType.EMAIL,
        text=text,
        delivery_state=DeliveryState.QUEUED,
        data={"to": {"kind": "email", "value": to}},
    )


async def setup(hub, smtp: SmtpServer):  # type: ignore[no-untyped-def]
    h = await hub(None, smtp)
    adapter = await h.prepared_adapter()
    recorded = await adapter.process_raw(make_mail(1, subject="Where is my order?"))
    worker = OutboxWorker(h.store, h.bus, {CHANNEL: adapter})
    return h, adapter, recorded.conversation, worker


async def test_reply_has_threading_headers_token_and_both_parts(
    hub, smtp_server: SmtpServer
) -> None:
    h, adapter, conv, worker = await setup(hub, smtp_server)
    queued = await h.store.append(conv.id, reply("It ships today.\n\n<b>not bold</b>"))
    assert await worker.run_once() == 1

    [captured] = smtp_server.messages
    assert captured.mail_from == ADDRESS and captured.rcpt_tos == ("customer@client.example",)
    msg = captured.message
    event_id = queued.event.id
    assert msg["Message-ID"] == f"<{event_id}@example.test>"
    assert msg["In-Reply-To"] == "<mail-1@client.example>"
    assert msg["References"] == "<mail-1@client.example>"
    assert msg["Subject"] == "Re: Where is my order?"
    assert msg["From"] == f"Example Support <{ADDRESS}>"
    token = token_in_address(ADDRESS, msg["Reply-To"].addresses[0].addr_spec)
    assert token is not None and verify_token(adapter.info.secret, token) == conv.id
    assert msg.get_content_type() == "multipart/alternative"
    assert (
        msg.get_body(("plain",)).get_content().replace("\r\n", "\n").strip()
        == "It ships today.\n\n<b>not bold</b>"
    )
    assert "&lt;b&gt;not bold&lt;/b&gt;" in msg.get_body(("html",)).get_content()

    sent = await h.store.get_event(event_id)
    assert sent.delivery_state is DeliveryState.SENT
    assert sent.external_id == f"<{event_id}@example.test>"
    # The Message-ID is now a key of this event: a reply or a bounce finds it.
    assert (await h.store.find_event(CHANNEL, sent.external_id)).id == event_id


async def test_second_reply_references_the_first(hub, smtp_server: SmtpServer) -> None:
    h, _, conv, worker = await setup(hub, smtp_server)
    first = await h.store.append(conv.id, reply("One"))
    await worker.run_once()
    await h.store.append(conv.id, reply("Two"))
    await worker.run_once()
    second = smtp_server.messages[1].message
    assert second["References"] == f"<mail-1@client.example> <{first.event.id}@example.test>"
    assert second["In-Reply-To"] == "<mail-1@client.example>"


async def test_temporary_failure_is_retried_then_sent(hub, smtp_server: SmtpServer) -> None:
    h, _, conv, worker = await setup(hub, smtp_server)
    smtp_server.fail_with("451 4.3.0 Greylisted, try again later", times=1)
    queued = await h.store.append(conv.id, reply("Hello"))
    await worker.run_once()
    event = await h.store.get_event(queued.event.id)
    assert event.delivery_state is DeliveryState.QUEUED
    assert "451" in (event.delivery_error or "")
    assert smtp_server.messages == []

    await worker.run_once()
    event = await h.store.get_event(queued.event.id)
    assert event.delivery_state is DeliveryState.SENT
    assert len(smtp_server.messages) == 1


async def test_permanent_failure_shows_the_server_reply(hub, smtp_server: SmtpServer) -> None:
    h, _, conv, worker = await setup(hub, smtp_server)
    smtp_server.fail_with("550 5.7.1 Message rejected as spam")
    queued = await h.store.append(conv.id, reply("Hello"))
    await worker.run_once()
    event = await h.store.get_event(queued.event.id)
    assert event.delivery_state is DeliveryState.FAILED
    assert event.delivery_error == "550 5.7.1 Message rejected as spam"
    assert await worker.run_once() == 0  # not retried


async def test_server_down_is_temporary(hub, smtp_server: SmtpServer) -> None:
    h, _, conv, worker = await setup(hub, smtp_server)
    smtp_server.stop()
    queued = await h.store.append(conv.id, reply("Hello"))
    await worker.run_once()
    event = await h.store.get_event(queued.event.id)
    assert event.delivery_state is DeliveryState.QUEUED
    assert event.delivery_error


async def test_automatic_replies_say_so(hub, smtp_server: SmtpServer) -> None:
    h, _, conv, worker = await setup(hub, smtp_server)
    draft = reply("We're closed; we will answer tomorrow.")
    await h.store.append(conv.id, replace(draft, author=SYSTEM))
    await h.store.append(conv.id, reply("Hello, Alice here."))
    await worker.run_once()
    by_text = {
        m.message.get_body(("plain",)).get_content().strip(): m.message
        for m in smtp_server.messages
    }
    assert by_text["We're closed; we will answer tomorrow."]["Auto-Submitted"] == "auto-replied"
    assert by_text["Hello, Alice here."]["Auto-Submitted"] is None
