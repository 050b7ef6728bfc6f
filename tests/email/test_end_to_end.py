"""A customer and an agent writing back and forth through real IMAP and SMTP servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.model import (
    ChannelType,
    ConversationStatus,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    agent_author,
)
from hub.outbox import OutboxWorker
from tests.email.conftest import ADDRESS, CHANNEL, FIXTURES, make_config, make_mail
from tests.servers.dovecot import DovecotServer, wait_until
from tests.servers.smtp import Captured, SmtpServer


class Scene:
    def __init__(self, h, adapter, smtp: SmtpServer, dovecot: DovecotServer) -> None:  # type: ignore[no-untyped-def]
        self.h = h
        self.store = h.store
        self.adapter = adapter
        self.smtp = smtp
        self.dovecot = dovecot
        self.worker = OutboxWorker(h.store, h.bus, {CHANNEL: adapter})

    async def deliver(self, raw: bytes, message_id: str) -> Event:
        """The customer's mail arrives in the mailbox; returns its stored event."""
        await self.dovecot.append([raw])

        async def stored() -> Event | None:
            return await self.store.find_event(CHANNEL, message_id)

        await wait_until(stored)
        event = await stored()
        assert event is not None
        return event

    async def agent_replies(
        self, conversation_id: str, text: str, to: str
    ) -> tuple[Event, Captured]:
        before = len(self.smtp.messages)
        queued = await self.store.append(
            conversation_id,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.OUT,
                author=agent_author("alice"),
                channel=CHANNEL,
                channel_type=ChannelType.EMAIL,
                text=text,
                delivery_state=DeliveryState.QUEUED,
                data={"to": {"kind": "email", "value": to}},
            ),
        )
        assert await self.worker.run_once() == 1
        assert len(self.smtp.messages) == before + 1
        event = await self.store.get_event(queued.event.id)
        assert event is not None and event.delivery_state is DeliveryState.SENT
        return event, self.smtp.messages[-1]


@pytest.fixture
async def scene(dovecot: DovecotServer, smtp_server: SmtpServer, hub) -> Scene:  # type: ignore[no-untyped-def]
    h = await hub(dovecot, smtp_server)
    adapter = await h.start_adapter()
    await wait_until(lambda: adapter.status()["connected"])
    return Scene(h, adapter, smtp_server, dovecot)


async def test_reply_to_the_agents_reply_joins_and_reopens_the_conversation(scene: Scene) -> None:
    first = await scene.deliver(make_mail(1, subject="Broken login"), "<mail-1@client.example>")
    conv_id = first.conversation_id
    assert conv_id is not None

    sent, captured = await scene.agent_replies(
        conv_id, "Try resetting your password.", "customer@client.example"
    )
    hub_id = captured.message["Message-ID"]
    reply_to = captured.message["Reply-To"].addresses[0].addr_spec

    # A well-behaved client: In-Reply-To and References, to the Reply-To address.
    second = await scene.deliver(
        make_mail(
            2,
            subject="Re: Broken login",
            to=reply_to,
            in_reply_to=hub_id,
            references=f"<mail-1@client.example> {hub_id}",
        ),
        "<mail-2@client.example>",
    )
    assert second.conversation_id == conv_id

    # Resolved, then a reply that only says In-Reply-To the hub's message: reopened.
    await scene.store.set_status(conv_id, ConversationStatus.RESOLVED, agent_author("alice"))
    third = await scene.deliver(
        make_mail(3, subject="Re: Broken login", in_reply_to=hub_id), "<mail-3@client.example>"
    )
    assert third.conversation_id == conv_id
    conv = await scene.store.get_conversation(conv_id)
    assert conv is not None and conv.status is ConversationStatus.OPEN

    # Resolved again, and a client that kept only the reply address: reopened too.
    await scene.store.set_status(conv_id, ConversationStatus.RESOLVED, agent_author("alice"))
    fourth = await scene.deliver(
        make_mail(4, subject="One more thing", to=reply_to), "<mail-4@client.example>"
    )
    assert fourth.conversation_id == conv_id

    # Without any trace of the thread, a mail after resolution starts a new conversation.
    await scene.store.set_status(conv_id, ConversationStatus.RESOLVED, agent_author("alice"))
    fifth = await scene.deliver(make_mail(5, subject="New topic"), "<mail-5@client.example>")
    assert fifth.conversation_id != conv_id
    assert sent.conversation_id == conv_id


async def test_forged_reply_token_is_ignored(scene: Scene) -> None:
    first = await scene.deliver(make_mail(1), "<mail-1@client.example>")
    _, captured = await scene.agent_replies(first.conversation_id, "Hi", "customer@client.example")
    token_address = captured.message["Reply-To"].addresses[0].addr_spec
    forged = token_address[: -len("@example.test") - 1] + (
        "0" if token_address[-14] != "0" else "1"
    )
    forged += "@example.test"
    await scene.store.set_status(first.conversation_id, ConversationStatus.RESOLVED, "system")
    other = await scene.deliver(make_mail(2, to=forged), "<mail-2@client.example>")
    assert other.conversation_id != first.conversation_id


async def test_thread_is_scoped_to_the_sender(scene: Scene) -> None:
    first = await scene.deliver(make_mail(1), "<mail-1@client.example>")
    _, captured = await scene.agent_replies(
        first.conversation_id, "Our offer", "customer@client.example"
    )
    hub_id = captured.message["Message-ID"]
    # Someone else answers the same thread (it was forwarded to them, or a newsletter).
    other = await scene.deliver(
        make_mail(
            2,
            sender="dana@elsewhere.example",
            name="Dana",
            in_reply_to=hub_id,
            references=f"<mail-1@client.example> {hub_id}",
        ),
        "<mail-2@client.example>",
    )
    assert other.conversation_id != first.conversation_id
    assert other.customer_id != first.customer_id


async def test_out_of_office_is_recorded_but_not_routable(scene: Scene) -> None:
    first = await scene.deliver(make_mail(1), "<mail-1@client.example>")
    _, captured = await scene.agent_replies(
        first.conversation_id, "Hello", "customer@client.example"
    )
    ooo = await scene.deliver(
        make_mail(
            2,
            subject="Automatic reply: Hello",
            in_reply_to=captured.message["Message-ID"],
            headers={"Auto-Submitted": "auto-replied"},
        ),
        "<mail-2@client.example>",
    )
    assert ooo.conversation_id == first.conversation_id
    assert ooo.data["routable"] is False
    assert ooo.data["auto"] == "auto-submitted: auto-replied"


async def test_bounce_marks_the_outbound_message_failed(scene: Scene) -> None:
    first = await scene.deliver(make_mail(1), "<mail-1@client.example>")
    sent, captured = await scene.agent_replies(
        first.conversation_id, "Hello", "customer@client.example"
    )
    template = (FIXTURES / "bounce_dsn.eml").read_bytes()
    raw = template.replace(
        b"<ORIGINAL-MESSAGE-ID@example.com>", captured.message["Message-ID"].encode()
    )
    raw = raw.replace(b"ORIGINAL-EVENT-ID", b"unknown")  # match by Message-ID alone
    bounce = await scene.deliver(raw, "<20240308130005.4Tq9@mx.example.com>")

    async def marked() -> bool:
        event = await scene.store.get_event(sent.id)
        return event is not None and event.delivery_state is DeliveryState.FAILED

    await wait_until(marked)  # right after the bounce itself is stored
    failed = await scene.store.get_event(sent.id)
    assert failed is not None
    assert failed.delivery_error == (
        "bounced: 550 5.1.1 <nobody@nowhere.example>: Recipient address rejected: User unknown"
    )
    # The bounce itself is on the customer's conversation, recorded but not routable.
    assert bounce.conversation_id == first.conversation_id
    assert bounce.customer_id == first.customer_id
    assert bounce.data["routable"] is False and bounce.data["auto"] == "bounce"


async def test_attachments_are_stored_and_oversize_ones_skipped(
    dovecot: DovecotServer, hub, tmp_path: Path
) -> None:
    h = await hub(dovecot)
    h.max_attachment_bytes = 1000
    await dovecot.append([(FIXTURES / "attachments.eml").read_bytes()])
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 1)
    event = await h.store.find_event(CHANNEL, "<attachments-1@ivanova.example>")
    assert event is not None
    assert [(a.filename, a.size) for a in event.attachments] == [
        ("claim.pdf", 69),
        ("Rechnung März.pdf", 75),
    ]
    assert adapter.blobs.get(event.attachments[0].url).startswith(b"%PDF")
    [skipped] = event.data["skipped_attachments"]
    assert skipped["filename"] == "scan.bin" and skipped["size"] == 4096
    assert skipped["reason"].startswith("too large")
    assert (tmp_path / "data" / "blobs").is_dir()


async def test_own_mail_is_not_a_customer_but_a_web_form_reply_to_is(scene: Scene) -> None:
    await scene.dovecot.append([make_mail(1, sender=ADDRESS, name="Example Support")])
    await scene.deliver(make_mail(2), "<mail-2@client.example>")
    assert await scene.store.find_event(CHANNEL, "<mail-1@client.example>") is None

    # A contact form on the website sends From: us, Reply-To: the visitor.
    form = make_mail(3, sender=ADDRESS, name="Website", headers={"Reply-To": "vic@v.example"})
    event = await scene.deliver(form, "<mail-3@client.example>")
    customer = await scene.store.get_customer(event.customer_id)
    assert customer is not None
    assert [i.value for i in customer.identities] == ["vic@v.example"]
    assert customer.display_name == "vic@v.example"


async def test_readyz_shows_the_mailbox(
    dovecot: DovecotServer, tmp_path: Path, aiohttp_client
) -> None:  # type: ignore[no-untyped-def]
    from hub.app import create_app

    config = make_config(tmp_path / "data", imap_port=dovecot.port)
    client = await aiohttp_client(create_app(config, extensions=()))

    async def connected() -> bool:
        body = await (await client.get("/readyz")).json()
        return bool(body["channels"][CHANNEL]["connected"])

    await wait_until(connected)
    response = await client.get("/readyz")
    assert response.status == 200
    mailbox = (await response.json())["channels"][CHANNEL]
    assert mailbox["ok"] is True and mailbox["type"] == "email" and mailbox["mailbox"] == "INBOX"
