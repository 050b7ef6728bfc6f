"""The visitor WebSocket protocol, against a whole hub app (SQLite file, in-process bus)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from hub.app import BUS, create_app
from hub.bus import Signal
from hub.channels.visitor_tokens import (
    InvalidToken,
    VisitorTokens,
    load_secret,
    user_hash,
    vouched,
)
from hub.channels.webchat import RateLimiter
from hub.config import Config
from hub.identities import normalize
from hub.inbox.presence import PresenceRegistry
from hub.model import (
    ChannelType,
    ConversationQuery,
    DeliveryState,
    EventKind,
    Identity,
    IdentityKind,
    Outbound,
    Presence,
)
from hub.timeline.sqlite import SqliteStore
from tests.webchat.conftest import (
    SHOP_ORIGIN,
    SITE_SECRET,
    ClientFactory,
    Visitor,
    VisitorFactory,
    adapter_of,
    agent_note,
    agent_reply,
    store_of,
    with_offline_email,
)


def chat(visitor_id: str) -> Identity:
    return normalize(IdentityKind.CHAT, visitor_id)


async def stored_messages(client: TestClient, visitor_id: str) -> list[str]:
    store = store_of(client)
    customer = await store.find_customer(chat(visitor_id))
    if customer is None:
        return []
    page = await store.customer_timeline(customer.id, limit=200)
    return [e.text for e in reversed(page.items) if e.kind is EventKind.MESSAGE]


async def conversation_of(client: TestClient, visitor_id: str) -> str:
    store = store_of(client)
    customer = await store.find_customer(chat(visitor_id))
    assert customer is not None
    conv = await store.active_conversation(customer.id)
    assert conv is not None
    return conv.id


async def customer_count(client: TestClient) -> int:
    page = await store_of(client).list_conversations(ConversationQuery(), limit=200)
    return len({c.customer_id for c in page.items})


# --- hello / welcome ---------------------------------------------------------------------


async def test_hello_without_token_mints_a_visitor_and_stores_nothing(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello()
    assert welcome["visitor_id"] and welcome["token"].startswith("v1.")
    assert welcome["agents_online"] is None  # no inbox wired: the hub cannot tell
    assert welcome["offline_email"] is False
    assert welcome["title"] == "Chat with us"
    assert welcome["max_message_chars"] == 4000
    await visitor.silent()  # no history for a new visitor
    assert await store_of(client).find_customer(chat(welcome["visitor_id"])) is None

    again = await connect()
    second = await again.hello(token=welcome["token"])
    assert second["visitor_id"] == welcome["visitor_id"]


async def test_message_is_acked_after_it_is_stored_once(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello(name="Ada")
    ack = await visitor.say("  Hello, is anyone there?  ", client_id="c-1")
    event = await store_of(client).get_event(ack["event_id"])
    assert event is not None
    assert event.text == "Hello, is anyone there?"
    assert event.channel == "web" and event.channel_type is ChannelType.WEBCHAT
    assert event.external_id == f"{welcome['visitor_id']}:c-1"
    customer = await store_of(client).get_customer(event.customer_id)
    assert customer is not None and customer.display_name == "Ada"
    # The visitor's own message comes back as an event too, matched by its client id.
    echo = await visitor.frame_of("event")
    assert echo["event"]["id"] == ack["event_id"]
    assert echo["event"]["client_id"] == "c-1"
    assert echo["event"]["direction"] == "in"
    assert await stored_messages(client, welcome["visitor_id"]) == ["Hello, is anyone there?"]


async def test_same_client_id_after_reconnect_is_the_same_event(
    client: TestClient, connect: VisitorFactory
) -> None:
    first = await connect()
    welcome = await first.hello()
    ack = await first.say("only once", client_id="dup-1")
    await first.close()

    second = await connect()
    await second.hello(token=welcome["token"])
    await second.drain()  # the replay of "only once"
    again = await second.say("only once", client_id="dup-1")
    assert again["event_id"] == ack["event_id"]
    assert await stored_messages(client, welcome["visitor_id"]) == ["only once"]


async def test_resume_replays_exactly_the_missed_agent_replies(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello()
    ack = await visitor.say("my order is late")
    echo = await visitor.frame_of("event")
    last_seen = echo["event"]["id"]
    assert last_seen == ack["event_id"]
    conversation = await conversation_of(client, welcome["visitor_id"])
    await visitor.close()

    first = await agent_reply(client.server.app, conversation, "Sorry! Let me check.")
    await agent_note(
        client.server.app, conversation, "customer seems upset"
    )  # never for the visitor
    second = await agent_reply(client.server.app, conversation, "It ships today.")

    back = await connect()
    await back.hello(token=welcome["token"], last_event_id=last_seen)
    replay = await back.drain()
    assert [f["type"] for f in replay] == ["event", "event"]
    assert [f["event"]["id"] for f in replay] == [first.event.id, second.event.id]
    assert [f["event"]["text"] for f in replay] == ["Sorry! Let me check.", "It ships today."]
    assert replay[0]["event"]["direction"] == "out"
    assert replay[0]["event"]["author_name"] == "Ann Agent"

    # Without a last event id (a fresh page), the whole conversation comes back.
    fresh = await connect()
    await fresh.hello(token=welcome["token"])
    texts = [f["event"]["text"] for f in await fresh.drain()]
    assert texts == ["my order is late", "Sorry! Let me check.", "It ships today."]


async def test_agent_reply_arrives_live_once_and_is_delivered(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello()
    await visitor.say("hi")
    await visitor.frame_of("event")  # own echo
    conversation = await conversation_of(client, welcome["visitor_id"])
    reply = await agent_reply(client.server.app, conversation, "Hello from Ann")
    frame = await visitor.frame_of("event")
    assert frame["event"] == {
        "id": reply.event.id,
        "direction": "out",
        "text": "Hello from Ann",
        "created_at": frame["event"]["created_at"],
        "author_name": "Ann Agent",
    }

    # The outbox hands the reply to the adapter: a connected visitor means DELIVERED,
    # and the delivery update republishes the event, which the visitor does not get twice.
    async def delivered() -> bool:
        event = await store_of(client).get_event(reply.event.id)
        return event is not None and event.delivery_state is DeliveryState.DELIVERED

    for _ in range(200):
        if await delivered():
            break
        await asyncio.sleep(0.02)
    assert await delivered()
    await visitor.silent()


# --- who sees what -------------------------------------------------------------------------


async def test_a_visitor_never_receives_another_visitors_events(
    client: TestClient, connect: VisitorFactory
) -> None:
    alice, bob = await connect(), await connect()
    a_welcome = await alice.hello()
    b_welcome = await bob.hello()
    a_ack = await alice.say("alice's secret order number 1234")
    await bob.say("bob here")
    a_conv = await conversation_of(client, a_welcome["visitor_id"])
    await agent_reply(client.server.app, a_conv, "Alice, your order ships")

    a_frames = await alice.drain()
    b_frames = await bob.drain()
    a_texts = [f["event"]["text"] for f in a_frames if f["type"] == "event"]
    b_texts = [f["event"]["text"] for f in b_frames if f["type"] == "event"]
    assert a_texts == ["alice's secret order number 1234", "Alice, your order ships"]
    assert b_texts == ["bob here"]

    # Bob replaying from before Alice's events still only sees his own conversation.
    bob_again = await connect()
    await bob_again.hello(token=b_welcome["token"], last_event_id="0" * 26)
    texts = [f["event"]["text"] for f in await bob_again.drain()]
    assert texts == ["bob here"]
    # Nor can Bob address Alice's message by its client id: ids are scoped per visitor.
    clash = await bob_again.say("clash", client_id=a_ack["client_id"])
    assert clash["event_id"] != a_ack["event_id"]


async def test_notes_and_internal_events_never_reach_visitors(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello()
    await visitor.say("hello")
    await visitor.frame_of("event")
    conversation = await conversation_of(client, welcome["visitor_id"])
    store = store_of(client)
    app = client.server.app
    await agent_note(client.server.app, conversation, "internal: VIP, offer a discount")
    assigned = await store.assign(conversation, "ann", actor="system", queue="general")
    await app[BUS].publish([assigned.event])
    await visitor.silent(0.5)

    again = await connect()
    await again.hello(token=welcome["token"])
    frames = await again.drain()
    assert [f["event"]["text"] for f in frames] == ["hello"]
    assert "VIP" not in json.dumps(frames)


# --- refusals --------------------------------------------------------------------------------


def forge(token: str, **changes: object) -> str:
    """The token with its payload changed but the old signature kept."""
    version, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return f"{version}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{mac}"


@pytest.mark.parametrize("kind", ["forged", "other_channel", "garbled", "wrong_secret"])
async def test_bad_tokens_are_refused_and_store_nothing(
    client: TestClient, connect: VisitorFactory, kind: str
) -> None:
    victim = await connect()
    victim_welcome = await victim.hello()
    secret = await load_secret(store_of(client))
    token = {
        "forged": forge(victim_welcome["token"], v="attackerVisitor1234"),
        "other_channel": VisitorTokens(secret).mint("other", "someVisitor123456"),
        "garbled": "v1.not-a-token",
        "wrong_secret": VisitorTokens(b"x" * 32).mint("web", "someVisitor123456"),
    }[kind]
    visitor = await connect()
    await visitor.ws.send_json({"type": "hello", "token": token})
    frame = await visitor.frame()
    assert frame["type"] == "error" and frame["code"] == "invalid_token"
    msg = await visitor.ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401
    assert await customer_count(client) == 0
    for visitor_id in ("attackerVisitor1234", "someVisitor123456"):
        assert await store_of(client).find_customer(chat(visitor_id)) is None


async def test_a_channels_token_works_only_on_that_channel(
    client: TestClient, connect: VisitorFactory
) -> None:
    web_visitor = await connect("web")
    welcome = await web_visitor.hello()
    other = await connect("other")
    await other.ws.send_json({"type": "hello", "token": welcome["token"]})
    assert (await other.frame())["code"] == "invalid_token"


async def test_origins_outside_the_allow_list_are_refused_before_upgrade(
    client: TestClient, connect: VisitorFactory
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect("shop", origin="https://evil.example")
    assert refused.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await connect("shop")  # no Origin at all: not a browser on an allowed site
    allowed = await connect("shop", origin=SHOP_ORIGIN)
    await allowed.hello()
    # The hub's own /demo page may always carry the widget.
    own = await connect("shop", origin="http://127.0.0.1:8080")
    await own.hello()
    # A channel without a list takes any origin.
    anywhere = await connect("web", origin="https://anything.example")
    await anywhere.hello()


async def test_too_long_messages_are_refused_and_not_stored(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect("shop", origin=SHOP_ORIGIN)
    welcome = await visitor.hello()
    await visitor.ws.send_json({"type": "message", "client_id": "long", "text": "x" * 21})
    frame = await visitor.frame()
    assert frame == {
        "type": "error",
        "code": "too_long",
        "message": "messages are limited to 20 characters",
        "client_id": "long",
    }
    assert await stored_messages(client, welcome["visitor_id"]) == []
    await visitor.say("x" * 20)  # exactly at the limit is fine


async def test_rate_limit_per_visitor(client: TestClient, connect: VisitorFactory) -> None:
    visitor = await connect("shop", origin=SHOP_ORIGIN)
    welcome = await visitor.hello()
    for n in range(3):
        await visitor.say(f"m{n}")
    await visitor.ws.send_json({"type": "message", "client_id": "m3", "text": "m3"})
    frame = await visitor.frame_of("error")
    assert frame["code"] == "rate_limited" and frame["client_id"] == "m3"
    # A second socket of the same visitor shares the bucket.
    twin = await connect("shop", origin=SHOP_ORIGIN)
    await twin.hello(token=welcome["token"])
    await twin.drain()
    await twin.ws.send_json({"type": "message", "client_id": "m4", "text": "m4"})
    assert (await twin.frame_of("error"))["code"] == "rate_limited"
    assert await stored_messages(client, welcome["visitor_id"]) == ["m0", "m1", "m2"]


def test_rate_limiter_refills_over_time() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.take("v", now=0.0) and limiter.take("v", now=0.0)
    assert not limiter.take("v", now=1.0)
    assert limiter.take("v", now=31.0)  # one token back after half a minute
    assert limiter.take("other", now=1.0)


async def test_malformed_frames_get_error_frames_and_never_end_the_chat(
    client: TestClient, connect: VisitorFactory
) -> None:
    visitor = await connect()
    welcome = await visitor.hello()
    bad_frames: list[str | bytes] = [
        "not json",
        "[1, 2]",
        '"hello"',
        "{}",
        '{"type": 5}',
        '{"type": "dance"}',
        '{"type": "hello"}',
        '{"type": "message", "client_id": "ok", "text": 5}',
        '{"type": "message", "client_id": "has spaces", "text": "hi"}',
        '{"type": "message", "text": "no client id"}',
        '{"type": "message", "client_id": "blank", "text": "   "}',
        '{"type": "contact", "email": "x@example.com"}',  # this channel offers no email
        b"\x00\x01binary",
    ]
    for raw in bad_frames:
        if isinstance(raw, bytes):
            await visitor.ws.send_bytes(raw)
        else:
            await visitor.ws.send_str(raw)
        frame = await visitor.frame()
        assert frame["type"] == "error", (raw, frame)
        assert frame["code"] in ("bad_frame", "empty", "unsupported"), (raw, frame)
    await visitor.ws.send_json({"type": "ping"})
    assert (await visitor.frame()) == {"type": "pong"}
    assert await stored_messages(client, welcome["visitor_id"]) == []


@pytest.mark.parametrize(
    "first",
    [
        "garbage",
        '{"type": "message", "client_id": "a", "text": "hi"}',
        '{"type": "hello", "token": 7}',
    ],
)
async def test_a_bad_first_frame_closes_with_4400(
    client: TestClient, connect: VisitorFactory, first: str
) -> None:
    visitor = await connect()
    await visitor.ws.send_str(first)
    frame = await visitor.frame()
    assert frame["type"] == "error"
    msg = await visitor.ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4400
    assert await customer_count(client) == 0


# --- pre-chat identity --------------------------------------------------------------------


async def existing_customer_with_history(client: TestClient) -> tuple[str, str]:
    """A customer who once chatted and whose email the website knows; (id, conversation)."""
    store = store_of(client)
    old = await client.ws_connect("/chat/web/ws")
    await old.send_json({"type": "hello"})
    welcome = await old.receive_json(timeout=5)
    await old.send_json({"type": "message", "client_id": "old-1", "text": "earlier question"})
    while (await old.receive_json(timeout=5))["type"] != "ack":
        pass
    await old.close()
    owner = await store.find_customer(chat(welcome["visitor_id"]))
    assert owner is not None
    await store.link_identity(owner.id, normalize(IdentityKind.EMAIL, "ada@example.com"))
    conv = await store.active_conversation(owner.id)
    assert conv is not None
    return owner.id, conv.id


async def test_vouched_email_of_a_known_customer_continues_their_history(
    client: TestClient, connect: VisitorFactory
) -> None:
    owner_id, _ = await existing_customer_with_history(client)
    visitor = await connect()
    welcome = await visitor.hello(
        email="Ada@Example.com", user_hash=user_hash(SITE_SECRET, "Ada@Example.com")
    )
    # Before this visitor said anything, it already is that customer, history included.
    assert [f["event"]["text"] for f in await visitor.drain()] == ["earlier question"]
    store = store_of(client)
    found = await store.find_customer(chat(welcome["visitor_id"]))
    assert found is not None and found.id == owner_id
    ack = await visitor.say("back again")
    event = await store.get_event(ack["event_id"])
    assert event is not None and event.customer_id == owner_id


async def test_vouched_email_merges_a_visitor_who_already_chatted(
    client: TestClient, connect: VisitorFactory
) -> None:
    owner_id, owner_conv = await existing_customer_with_history(client)
    visitor = await connect()
    welcome = await visitor.hello()
    first = await visitor.say("question as a stranger")
    await visitor.close()
    store = store_of(client)
    stranger = await store.find_customer(chat(welcome["visitor_id"]))
    assert stranger is not None and stranger.id != owner_id

    # Later the visitor signs in on the website, which vouches for the address.
    again = await connect()
    await again.hello(
        token=welcome["token"],
        email="ada@example.com",
        user_hash=user_hash(SITE_SECRET, "ada@example.com"),
    )
    merged = await store.get_customer(stranger.id)
    assert merged is not None and merged.merged_into == owner_id
    found = await store.find_customer(chat(welcome["visitor_id"]))
    assert found is not None and found.id == owner_id
    # The chat continues the owner's active conversation, with its history.
    texts = [f["event"]["text"] for f in await again.drain()]
    assert texts == ["earlier question"]
    moved = await store.get_event(first["event_id"])
    assert moved is not None and moved.customer_id == owner_id
    ack = await again.say("now signed in")
    event = await store.get_event(ack["event_id"])
    assert event is not None and event.conversation_id == owner_conv


async def test_vouched_user_id_links_devices_of_one_signed_in_user(
    client: TestClient, connect: VisitorFactory
) -> None:
    laptop = await connect()
    await laptop.hello(user_id="user-42", user_hash=user_hash(SITE_SECRET, "user-42"))
    await laptop.say("from my laptop")
    phone = await connect()
    await phone.hello(user_id="user-42", user_hash=user_hash(SITE_SECRET, "user-42"))
    assert [f["event"]["text"] for f in await phone.drain()] == ["from my laptop"]


@pytest.mark.parametrize("proof", ["none", "wrong", "other_value"])
async def test_unvouched_email_is_recorded_unverified_and_never_merges(
    client: TestClient, connect: VisitorFactory, proof: str
) -> None:
    owner_id, _ = await existing_customer_with_history(client)
    visitor = await connect()
    fields: dict[str, str] = {"email": "ada@example.com", "name": "Not Ada"}
    if proof == "wrong":
        fields["user_hash"] = "0" * 64
    elif proof == "other_value":
        fields["user_hash"] = user_hash(SITE_SECRET, "mallory@example.com")
    welcome = await visitor.hello(**fields)
    await visitor.silent()  # none of Ada's history
    await visitor.say("give me Ada's order details")
    store = store_of(client)
    claimant = await store.find_customer(chat(welcome["visitor_id"]))
    assert claimant is not None and claimant.id != owner_id
    email = Identity(IdentityKind.EMAIL, "ada@example.com", verified=False)
    assert email in claimant.identities
    owner = await store.get_customer(owner_id)
    assert owner is not None and owner.merged_into is None
    verified = await store.find_customer(normalize(IdentityKind.EMAIL, "ada@example.com"))
    assert verified is not None and verified.id == owner_id


def test_vouching_needs_the_secret_and_the_exact_value() -> None:
    good = user_hash("s3cret", "ada@example.com")
    assert vouched("s3cret", "ada@example.com", good)
    assert vouched("s3cret", "ada@example.com", good.upper())
    assert not vouched("s3cret", "ada@example.org", good)
    assert not vouched(None, "ada@example.com", good)
    assert not vouched("s3cret", "ada@example.com", 42)
    assert not vouched("s3cret", "ada@example.com", good[:-1])


def test_tokens_round_trip_and_refuse_tampering() -> None:
    tokens = VisitorTokens(b"k" * 32)
    token = tokens.mint("web", "visitorAbcdef123", issued_at=1_700_000_000)
    claims = tokens.verify(token, "web")
    assert (claims.channel, claims.visitor_id, claims.issued_at) == (
        "web",
        "visitorAbcdef123",
        1_700_000_000,
    )
    for bad in (
        None,
        "",
        token + "x",
        token.replace("v1.", "v2."),
        forge(token, v="someoneElse12345"),
        forge(token, c="other"),
        "v1." + "A" * 600,
        "v1.%%%.%%%",
    ):
        with pytest.raises(InvalidToken):
            tokens.verify(bad, "web")
    with pytest.raises(InvalidToken):
        tokens.verify(token, "other")


# --- typing, presence, offline email -----------------------------------------------------


async def test_typing_both_ways(client: TestClient, connect: VisitorFactory) -> None:
    bus = client.server.app[BUS]
    watcher = bus.subscribe("test-watcher")
    try:
        visitor = await connect()
        welcome = await visitor.hello()
        await visitor.say("hi")
        await visitor.drain()
        conversation = await conversation_of(client, welcome["visitor_id"])
        await visitor.ws.send_json({"type": "typing"})
        await visitor.ws.send_json({"type": "typing"})  # throttled: one signal

        signals = []
        async with asyncio.timeout(5):
            while not signals:
                item = await watcher.get()
                if isinstance(item, Signal) and item.kind == "typing":
                    signals.append(item)
        assert signals[0].conversation_id == conversation
        assert signals[0].data == {"from": "customer", "channel": "web"}

        await bus.publish(
            [
                Signal(
                    kind="typing",
                    conversation_id=conversation,
                    data={"from": "agent", "agent_id": "ann", "agent_name": "Ann Agent"},
                )
            ]
        )
        assert await visitor.frame() == {"type": "typing", "from": "agent"}
        # Another conversation's agent typing is not this visitor's business.
        await bus.publish([Signal(kind="typing", conversation_id="X" * 26, data={"from": "agent"})])
        await visitor.silent()
    finally:
        watcher.close()


async def test_agents_online_is_reported_and_followed_live(
    make_client: ClientFactory, config: Config, connect: VisitorFactory
) -> None:
    presence = PresenceRegistry()
    client = await make_client(with_offline_email(config), presence=presence)
    visitor = await connect(via=client)
    welcome = await visitor.hello()
    assert welcome["agents_online"] is False
    assert welcome["offline_email"] is True
    await presence.set("ann", Presence.ONLINE)
    await client.server.app[BUS].publish(
        [Signal(kind="presence", data={"agent_id": "ann", "presence": "online"})]
    )
    assert await visitor.frame() == {"type": "agents", "online": True}


async def test_continue_by_email_records_an_unverified_address_and_a_note(
    make_client: ClientFactory, config: Config, connect: VisitorFactory
) -> None:
    client = await make_client(with_offline_email(config), presence=PresenceRegistry())
    visitor = await connect(via=client)
    welcome = await visitor.hello()
    await visitor.ws.send_json({"type": "contact", "email": "not an email"})
    assert (await visitor.frame())["code"] == "invalid_email"
    await visitor.ws.send_json({"type": "contact", "email": "Grace@Example.com"})
    assert await visitor.frame() == {"type": "contact_saved", "email": "grace@example.com"}
    store = store_of(client)
    assert await store.find_customer(chat(welcome["visitor_id"])) is None  # nothing said yet
    await visitor.say("please email me the invoice")
    customer = await store.find_customer(chat(welcome["visitor_id"]))
    assert customer is not None
    assert Identity(IdentityKind.EMAIL, "grace@example.com", verified=False) in customer.identities
    conv = await store.active_conversation(customer.id)
    assert conv is not None
    events = (await store.conversation_events(conv.id)).items
    notes = [e for e in events if e.kind is EventKind.NOTE]
    assert len(notes) == 1 and "grace@example.com" in notes[0].text and "mail" in notes[0].text
    # The note is for agents only.
    again = await connect(via=client)
    await again.hello(token=welcome["token"])
    assert [f["event"]["text"] for f in await again.drain()] == ["please email me the invoice"]


# --- adapter contract ----------------------------------------------------------------------


async def test_send_reports_delivered_only_while_the_visitor_is_connected(
    client: TestClient, connect: VisitorFactory
) -> None:
    adapter = adapter_of(client)
    visitor = await connect()
    welcome = await visitor.hello()
    await visitor.say("hi")
    customer = await store_of(client).find_customer(chat(welcome["visitor_id"]))
    assert customer is not None
    outbound = Outbound(
        event_id="E",
        channel="web",
        channel_type=ChannelType.WEBCHAT,
        to=chat(welcome["visitor_id"]),
        text="hello",
        customer_id=customer.id,
    )
    assert adapter.status() == {"ok": True, "connections": 1}
    assert (await adapter.send(outbound)).state is DeliveryState.DELIVERED
    await visitor.close()
    for _ in range(100):
        if adapter.status()["connections"] == 0:
            break
        await asyncio.sleep(0.02)
    assert adapter.status() == {"ok": True, "connections": 0}
    assert (await adapter.send(outbound)).state is DeliveryState.SENT


async def test_widget_script_and_demo_page_are_served(client: TestClient) -> None:
    resp = await client.get("/widget.js")
    assert resp.status == 200
    assert resp.content_type == "application/javascript"
    body = await resp.read()
    assert len(body) < 25 * 1024
    assert b"innerHTML" not in body  # every text goes through textContent
    demo = await client.get("/demo")
    assert demo.status == 200
    page = await demo.text()
    assert '<script src="/widget.js" data-channel="web" async></script>' in page
    assert "script-src 'self'" in demo.headers["Content-Security-Policy"]
    ready = await client.get("/readyz")
    channels = (await ready.json())["channels"]
    assert channels["web"] == {"type": "webchat", "ok": True, "connections": 0}


async def test_the_websocket_url_wants_an_upgrade(client: TestClient) -> None:
    resp = await client.get("/chat/web/ws")
    assert resp.status == 400
    assert "WebSocket" in (await resp.json())["error"]


async def test_waiting_visitors_see_their_place_in_line(
    aiohttp_client: Any, config: Config, tmp_path: Path
) -> None:
    # The whole hub, router included; no agent is online, so every chat waits in line.
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"))
    client = await aiohttp_client(app)
    first = Visitor(await client.ws_connect("/chat/web/ws"))
    second = Visitor(await client.ws_connect("/chat/web/ws"))
    await first.hello()
    await second.hello()
    await first.say("I was here first")
    assert (await first.frame_of("queue"))["position"] == 1
    await second.say("me too")
    place = await second.frame_of("queue")
    assert place["position"] == 2
    assert place["estimated_wait_seconds"] is None or place["estimated_wait_seconds"] >= 0
    await first.close()
    await second.close()
