"""The agents' REST API as an agent uses it: list, read, answer, triage, fix customers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from hub.app import BUS, STORE
from hub.bus import Signal
from hub.inbox.openapi import registered_operations
from hub.model import Event, Identity, IdentityKind, utcnow
from tests.inbox.conftest import (
    SECOND_CHANNEL,
    Customers,
    Tokens,
    auth,
    eventually,
)

PHONE = "+14155552671"


class Api:
    """Calls as one agent, asserting the status so each test reads as a story."""

    def __init__(self, client: TestClient, token: str) -> None:
        self.client = client
        self.headers = auth(token)

    async def call(self, method: str, path: str, status: int, body: Any = None) -> Any:
        kwargs: dict[str, Any] = {"headers": self.headers}
        if isinstance(body, bytes):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        resp = await self.client.request(method, path, **kwargs)
        text = await resp.text()
        assert resp.status == status, f"{method} {path}: {resp.status} {text}"
        return await resp.json() if text else None

    async def get(self, path: str, status: int = 200) -> Any:
        return await self.call("GET", path, status)

    async def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        return await self.call("POST", path, status, {} if body is None else body)

    async def put(self, path: str, body: Any, status: int = 200) -> Any:
        return await self.call("PUT", path, status, body)


@pytest.fixture
def alice(client: TestClient, tokens: Tokens) -> Api:
    return Api(client, tokens.alice)


@pytest.fixture
def sam(client: TestClient, tokens: Tokens) -> Api:
    return Api(client, tokens.sam)


def ids(page: dict[str, Any]) -> list[str]:
    return [item["conversation"]["id"] for item in page["items"]]


# --- listing --------------------------------------------------------------------------


async def test_conversation_list_filters_and_pages(alice: Api, customers: Customers) -> None:
    first = (await customers.chat("visitor-aaaa1")).conversation
    second = (await customers.chat("visitor-bbbb2")).conversation
    third = (await customers.chat("visitor-cccc3")).conversation
    fourth = (await customers.second(Identity(IdentityKind.PHONE, PHONE))).conversation
    assert first and second and third and fourth
    await alice.post(f"/api/v1/conversations/{first.id}/assign", {"agent_id": "alice"})
    await alice.post(
        f"/api/v1/conversations/{second.id}/assign", {"agent_id": "bob", "queue": "billing"}
    )
    await alice.post(f"/api/v1/conversations/{third.id}/status", {"status": "pending"})

    everything = await alice.get("/api/v1/conversations")
    # Most recent activity first; triage (assign, status) does not reorder.
    assert ids(everything) == [fourth.id, third.id, second.id, first.id]
    assert everything["total"] == 4
    assert ids(await alice.get("/api/v1/conversations?view=mine")) == [first.id]
    assert ids(await alice.get("/api/v1/conversations?view=unassigned")) == [fourth.id, third.id]
    assert ids(await alice.get("/api/v1/conversations?status=pending")) == [third.id]
    assert ids(await alice.get("/api/v1/conversations?status=open,pending&view=unassigned")) == [
        fourth.id,
        third.id,
    ]
    assert ids(await alice.get(f"/api/v1/conversations?channel={SECOND_CHANNEL}")) == [fourth.id]
    assert ids(await alice.get("/api/v1/conversations?queue=billing")) == [second.id]
    assert ids(await alice.get("/api/v1/conversations?status=resolved")) == []

    seen: list[str] = []
    path = "/api/v1/conversations?limit=1"
    while True:
        page = await alice.get(path)
        assert len(page["items"]) <= 1 and page["total"] == 4
        seen += ids(page)
        if page["next_cursor"] is None:
            break
        path = f"/api/v1/conversations?limit=1&before={page['next_cursor']}"
    assert seen == ids(everything)


async def test_list_refuses_bad_query_parameters(alice: Api) -> None:
    for query in (
        "view=everyone",
        "status=closed",
        "limit=0",
        "limit=1000",
        "limit=ten",
        "before=garbage",
        "sort=asc",
    ):
        body = await alice.get(f"/api/v1/conversations?{query}", status=400)
        assert body["error"], query


async def test_unread_counts_follow_the_read_marker(alice: Api, customers: Customers) -> None:
    conv = (await customers.chat("visitor-unread1", "one")).conversation
    assert conv
    await customers.chat("visitor-unread1", "two")
    page = await alice.get("/api/v1/conversations")
    assert page["items"][0]["unread"] == 2
    assert (await alice.post(f"/api/v1/conversations/{conv.id}/read"))["unread"] == 0
    await customers.chat("visitor-unread1", "three")
    page = await alice.get("/api/v1/conversations")
    assert page["items"][0]["unread"] == 1


# --- one conversation and its customer ------------------------------------------------


async def test_conversation_shows_the_whole_cross_channel_timeline(
    alice: Api, customers: Customers
) -> None:
    chat = await customers.chat("visitor-xchan1", "my order is late")
    conv = chat.conversation
    assert conv
    await alice.post(
        f"/api/v1/customers/{chat.customer.id}/identities", {"kind": "phone", "value": PHONE}
    )
    sms = await customers.second(Identity(IdentityKind.PHONE, PHONE), "any news?")
    # Omnichannel: the second channel continues the same customer and conversation.
    assert sms.customer.id == chat.customer.id
    assert sms.conversation and sms.conversation.id == conv.id

    view = await alice.get(f"/api/v1/conversations/{conv.id}")
    assert view["conversation"]["channel"] == SECOND_CHANNEL  # last inbound message's channel
    assert view["customer"]["id"] == chat.customer.id
    timeline = view["timeline"]
    assert [e["text"] for e in timeline["items"]] == ["any news?", "my order is late"]
    assert [e["channel"] for e in timeline["items"]] == [SECOND_CHANNEL, "web"]
    assert timeline["total"] == 2
    assert view["reply_channels"][0]["name"] == SECOND_CHANNEL

    page = await alice.get(f"/api/v1/conversations/{conv.id}?limit=1")
    assert [e["text"] for e in page["timeline"]["items"]] == ["any news?"]
    older = await alice.get(
        f"/api/v1/conversations/{conv.id}?limit=1&before={page['timeline']['next_cursor']}"
    )
    assert [e["text"] for e in older["timeline"]["items"]] == ["my order is late"]
    assert older["timeline"]["next_cursor"] is None

    customer = await alice.get(f"/api/v1/customers/{chat.customer.id}")
    assert {i["kind"] for i in customer["customer"]["identities"]} >= {"chat"}
    timeline2 = await alice.get(f"/api/v1/customers/{chat.customer.id}/timeline")
    assert [e["id"] for e in timeline2["items"]] == [e["id"] for e in timeline["items"]]


async def test_unknown_ids_are_404(alice: Api, customers: Customers) -> None:
    known = (await customers.chat("visitor-known01")).customer
    unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    for path in (
        f"/api/v1/conversations/{unknown}",
        "/api/v1/conversations/not-an-id",
        f"/api/v1/customers/{unknown}",
        f"/api/v1/customers/{unknown}/timeline",
    ):
        assert (await alice.get(path, status=404))["error"]
    await alice.post(f"/api/v1/conversations/{unknown}/replies", {"text": "hi"}, status=404)
    await alice.post(f"/api/v1/customers/{unknown}/merge", {"into": known.id}, status=404)
    await alice.post(f"/api/v1/customers/{known.id}/merge", {"into": unknown}, status=404)
    await alice.post(f"/api/v1/customers/{known.id}/merge", {"into": "nope"}, status=404)
    await alice.post(f"/api/v1/customers/{unknown}/unmerge", status=404)


# --- replies and notes ----------------------------------------------------------------


async def test_reply_is_queued_then_sent_by_the_outbox(
    alice: Api, customers: Customers, client: TestClient
) -> None:
    chat = await customers.chat("visitor-reply1", "hello?")
    conv = chat.conversation
    assert conv
    sub = client.server.app[BUS].subscribe("test-reply", 100)
    body = await alice.post(
        f"/api/v1/conversations/{conv.id}/replies", {"text": "Hi! How can I help?"}, status=202
    )
    event = body["event"]
    assert event["delivery_state"] == "queued"
    assert event["direction"] == "out" and event["kind"] == "message"
    assert event["author"] == "agent:alice"
    assert event["channel"] == "web" and event["channel_type"] == "webchat"
    assert event["data"]["to"] == {"kind": "chat", "value": "visitor-reply1"}

    store = client.server.app[STORE]

    async def sent() -> bool:
        stored = await store.get_event(event["id"])
        return (
            stored is not None
            and stored.delivery_state is not None
            and (stored.delivery_state.value in ("sent", "delivered"))
        )

    await eventually(sent)
    view = await alice.get(f"/api/v1/conversations/{conv.id}")
    assert view["timeline"]["items"][0]["id"] == event["id"]
    assert view["timeline"]["items"][0]["delivery_state"] in ("sent", "delivered")
    assert view["conversation"]["first_response_at"] is not None

    # Published for live pages: the event, then the conversation that changed with it.
    published = [sub._queue.get_nowait() for _ in range(2)]
    sub.close()
    assert isinstance(published[0], Event) and published[0].id == event["id"]
    assert isinstance(published[1], Signal) and published[1].kind == "conversation"


async def test_reply_on_another_channel_needs_an_address_there(
    alice: Api, customers: Customers
) -> None:
    chat = await customers.chat("visitor-pick1", "text me instead")
    conv = chat.conversation
    assert conv
    refused = await alice.post(
        f"/api/v1/conversations/{conv.id}/replies",
        {"text": "ok", "channel": "sms"},
        status=422,
    )
    assert "phone" in refused["error"]
    await alice.post(
        f"/api/v1/customers/{chat.customer.id}/identities", {"kind": "phone", "value": PHONE}
    )
    view = await alice.get(f"/api/v1/conversations/{conv.id}")
    assert [c["name"] for c in view["reply_channels"]] == ["web", "sms"]
    queued = await alice.post(
        f"/api/v1/conversations/{conv.id}/replies",
        {"text": "ok", "channel": "sms"},
        status=202,
    )
    assert queued["event"]["channel"] == "sms"
    assert queued["event"]["data"]["to"] == {"kind": "phone", "value": PHONE}


async def test_bad_replies_are_refused_and_store_nothing(alice: Api, customers: Customers) -> None:
    conv = (await customers.chat("visitor-bad01")).conversation
    assert conv
    path = f"/api/v1/conversations/{conv.id}/replies"
    await alice.post(path, {"text": ""}, status=422)
    await alice.post(path, {"text": "   "}, status=422)
    await alice.post(path, {"text": 42}, status=422)
    await alice.post(path, {}, status=422)
    await alice.post(path, {"text": "x" * 10_001}, status=413)
    await alice.post(path, {"text": "hi", "channel": "fax"}, status=422)
    await alice.post(path, {"text": "hi", "cc": "boss"}, status=422)
    await alice.post(path, b"{oops", status=400)
    await alice.post(path, b'"just a string"', status=422)
    # Past the app's body limit (hub.max_body_bytes, 1 MiB by default): refused unread.
    huge = await alice.post(path, {"text": "z" * 2_000_000}, status=413)
    assert huge["error"]
    view = await alice.get(f"/api/v1/conversations/{conv.id}")
    assert view["timeline"]["total"] == 1  # only the customer's message
    # The longest allowed reply goes through.
    await alice.post(path, {"text": "y" * 10_000}, status=202)


async def test_note_is_internal_and_never_queued_for_delivery(
    alice: Api, customers: Customers, client: TestClient
) -> None:
    conv = (await customers.chat("visitor-note1")).conversation
    assert conv
    body = await alice.post(
        f"/api/v1/conversations/{conv.id}/notes", {"text": "VIP, be nice"}, status=201
    )
    note = body["event"]
    assert note["direction"] == "internal" and note["kind"] == "note"
    assert note["delivery_state"] is None and note["author"] == "agent:alice"
    store = client.server.app[STORE]
    claimed = await store.claim_outbound(utcnow() + timedelta(hours=1), 10, timedelta(seconds=1))
    assert note["id"] not in [item.event.id for item in claimed]
    await alice.post(f"/api/v1/conversations/{conv.id}/notes", {"text": ""}, status=422)


# --- triage ---------------------------------------------------------------------------


async def test_assign_transfer_and_unassign_are_events_with_the_actor(
    alice: Api, sam: Api, customers: Customers
) -> None:
    conv = (await customers.chat("visitor-assign1")).conversation
    assert conv
    path = f"/api/v1/conversations/{conv.id}/assign"
    first = await alice.post(path, {"agent_id": "alice"})
    assert first["conversation"]["assignee"] == "alice" and first["changed"]
    moved = await alice.post(path, {"agent_id": "bob", "queue": "billing"})
    assert moved["conversation"]["assignee"] == "bob"
    assert moved["conversation"]["queue"] == "billing"
    assert moved["event"]["data"]["from"] == "alice" and moved["event"]["data"]["to"] == "bob"
    again = await alice.post(path, {"agent_id": "bob"})
    assert again["changed"] is False
    gone = await sam.post(path, {"agent_id": None})
    assert gone["conversation"]["assignee"] is None
    assert gone["event"]["author"] == "agent:sam"

    await alice.post(path, {"agent_id": "nobody"}, status=422)
    await alice.post(path, {"agent_id": "bob", "queue": "no-such-queue"}, status=422)
    await alice.post(path, {"queue": "billing"}, status=422)

    view = await alice.get(f"/api/v1/conversations/{conv.id}")
    assignments = [e for e in view["timeline"]["items"] if e["kind"] == "assignment"]
    assert [e["author"] for e in assignments] == ["agent:sam", "agent:alice", "agent:alice"]


async def test_bulk_assign_is_for_supervisors_and_all_or_nothing(
    alice: Api, sam: Api, customers: Customers
) -> None:
    one = (await customers.chat("visitor-bulk01")).conversation
    two = (await customers.chat("visitor-bulk02")).conversation
    assert one and two
    await alice.post(
        "/api/v1/conversations/bulk-assign",
        {"conversation_ids": [one.id, two.id], "agent_id": "bob"},
        status=403,
    )
    await sam.post(
        "/api/v1/conversations/bulk-assign",
        {"conversation_ids": [one.id, "01ARZ3NDEKTSV4RRFFQ69G5FAV"], "agent_id": "bob"},
        status=404,
    )
    assert (await alice.get(f"/api/v1/conversations/{one.id}"))["conversation"]["assignee"] is None
    done = await sam.post(
        "/api/v1/conversations/bulk-assign",
        {"conversation_ids": [one.id, two.id], "agent_id": "bob", "queue": "billing"},
    )
    assert [i["conversation"]["assignee"] for i in done["items"]] == ["bob", "bob"]
    assert ids(await alice.get("/api/v1/conversations?queue=billing")) == [two.id, one.id]


async def test_status_changes_snooze_and_resolve(alice: Api, customers: Customers) -> None:
    conv = (await customers.chat("visitor-status1")).conversation
    assert conv
    path = f"/api/v1/conversations/{conv.id}/status"
    assert (await alice.post(path, {"status": "pending"}))["conversation"]["status"] == "pending"
    until = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    snoozed = await alice.post(path, {"status": "snoozed", "until": until.isoformat()})
    assert snoozed["conversation"]["status"] == "snoozed"
    assert datetime.fromisoformat(snoozed["conversation"]["snoozed_until"]) == until
    assert snoozed["event"]["data"]["to"] == "snoozed"
    assert snoozed["event"]["author"] == "agent:alice"

    await alice.post(path, {"status": "snoozed"}, status=422)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    await alice.post(path, {"status": "snoozed", "until": past}, status=422)
    await alice.post(path, {"status": "snoozed", "until": "2030-01-01T09:00:00"}, status=422)
    await alice.post(path, {"status": "snoozed", "until": "tomorrow"}, status=422)
    await alice.post(path, {"status": "open", "until": until.isoformat()}, status=422)
    await alice.post(path, {"status": "closed"}, status=422)

    resolved = await alice.post(path, {"status": "resolved"})
    assert resolved["conversation"]["status"] == "resolved"
    assert resolved["conversation"]["resolved_at"] is not None
    assert resolved["conversation"]["snoozed_until"] is None
    unchanged = await alice.post(path, {"status": "resolved"})
    assert unchanged["changed"] is False
    reopened = await alice.post(path, {"status": "open"})
    assert reopened["conversation"]["resolved_at"] is None


async def test_reopening_when_the_customer_has_another_active_conversation_is_409(
    alice: Api, customers: Customers
) -> None:
    old = (await customers.chat("visitor-reopen1", "first")).conversation
    assert old
    await alice.post(f"/api/v1/conversations/{old.id}/status", {"status": "resolved"})
    new = (await customers.chat("visitor-reopen1", "second")).conversation
    assert new and new.id != old.id
    body = await alice.post(
        f"/api/v1/conversations/{old.id}/status", {"status": "open"}, status=409
    )
    assert body["error"]


async def test_tags_are_replaced_trimmed_and_deduplicated(alice: Api, customers: Customers) -> None:
    conv = (await customers.chat("visitor-tags01")).conversation
    assert conv
    path = f"/api/v1/conversations/{conv.id}/tags"
    body = await alice.put(path, {"tags": ["vip", " refund ", "vip"]})
    assert body["conversation"]["tags"] == ["vip", "refund"]
    assert (await alice.put(path, {"tags": []}))["conversation"]["tags"] == []
    await alice.put(path, {"tags": "vip"}, status=422)
    await alice.put(path, {"tags": [1]}, status=422)
    await alice.put(path, {"tags": ["x" * 65]}, status=422)
    await alice.put(path, {"tags": [f"t{i}" for i in range(51)]}, status=422)


# --- customers: identities, merge, unmerge --------------------------------------------


async def test_link_identity_and_conflict(alice: Api, customers: Customers) -> None:
    ann = (await customers.chat("visitor-ann001")).customer
    ben = (await customers.chat("visitor-ben001")).customer
    linked = await alice.post(
        f"/api/v1/customers/{ann.id}/identities", {"kind": "email", "value": "Ann@Example.COM"}
    )
    assert {"kind": "email", "value": "ann@example.com", "verified": True} in linked["customer"][
        "identities"
    ]
    # Linking it again is harmless.
    await alice.post(
        f"/api/v1/customers/{ann.id}/identities", {"kind": "email", "value": "ann@example.com"}
    )
    conflict = await alice.post(
        f"/api/v1/customers/{ben.id}/identities",
        {"kind": "email", "value": "ann@example.com"},
        status=409,
    )
    assert "ann@example.com" in conflict["error"] and conflict["owner_id"] == ann.id
    await alice.post(
        f"/api/v1/customers/{ben.id}/identities", {"kind": "email", "value": "nope"}, status=422
    )
    await alice.post(
        f"/api/v1/customers/{ben.id}/identities", {"kind": "phone", "value": "12"}, status=422
    )
    await alice.post(
        f"/api/v1/customers/{ben.id}/identities",
        {"kind": "chat", "value": "visitor-x0000"},
        status=422,
    )


async def test_merge_and_unmerge_show_who_did_it(
    alice: Api, sam: Api, customers: Customers
) -> None:
    dup = await customers.chat("visitor-dup0001", "from the phone browser")
    main = await customers.chat("visitor-main001", "from the laptop")
    merged = await alice.post(
        f"/api/v1/customers/{dup.customer.id}/merge", {"into": main.customer.id}
    )
    assert merged["event"]["kind"] == "merge"
    assert merged["event"]["author"] == "agent:alice"
    assert merged["customer"]["id"] == main.customer.id
    assert {i["value"] for i in merged["customer"]["identities"]} >= {
        "visitor-dup0001",
        "visitor-main001",
    }
    timeline = await alice.get(f"/api/v1/customers/{main.customer.id}/timeline")
    texts = [e["text"] for e in timeline["items"] if e["kind"] == "message"]
    assert sorted(texts) == ["from the laptop", "from the phone browser"]
    merge_events = [e for e in timeline["items"] if e["kind"] == "merge"]
    assert merge_events[0]["author"] == "agent:alice"
    assert merge_events[0]["created_at"]

    again = await alice.post(
        f"/api/v1/customers/{dup.customer.id}/merge", {"into": main.customer.id}
    )
    assert again["changed"] is False
    await alice.post(
        f"/api/v1/customers/{main.customer.id}/merge", {"into": main.customer.id}, status=409
    )

    undone = await sam.post(f"/api/v1/customers/{dup.customer.id}/unmerge")
    assert undone["event"]["kind"] == "merge" and undone["event"]["data"]["undo"] is True
    assert undone["event"]["author"] == "agent:sam"
    assert undone["customer"]["merged_into"] is None
    timeline = await alice.get(f"/api/v1/customers/{main.customer.id}/timeline")
    newest_merge = next(e for e in timeline["items"] if e["kind"] == "merge")
    assert newest_merge["author"] == "agent:sam"
    assert [e["text"] for e in timeline["items"] if e["kind"] == "message"] == ["from the laptop"]
    await sam.post(f"/api/v1/customers/{dup.customer.id}/unmerge", status=409)


# --- agents and presence --------------------------------------------------------------


async def test_presence_switch_and_agent_list(alice: Api) -> None:
    assert (await alice.put("/api/v1/me/presence", {"presence": "online"}))["agent"][
        "presence"
    ] == "online"
    agents = {a["id"]: a for a in (await alice.get("/api/v1/agents"))["items"]}
    assert agents["alice"]["presence"] == "online"
    assert agents["bob"]["presence"] == "offline"
    assert set(agents) == {"alice", "bob", "sam", "root"}
    await alice.put("/api/v1/me/presence", {"presence": "busy"}, status=422)
    assert (await alice.get("/api/v1/me"))["agent"]["presence"] == "online"


async def test_channels_and_queues_for_the_pickers(alice: Api) -> None:
    channels = (await alice.get("/api/v1/channels"))["items"]
    assert channels[0] == {"name": "web", "type": "webchat"}
    assert [c["name"] for c in channels] == ["web", SECOND_CHANNEL]
    assert (await alice.get("/api/v1/queues"))["items"] == [
        {"name": "general"},
        {"name": "billing"},
    ]


# --- hostile input --------------------------------------------------------------------

HOSTILE_BODIES = [
    b"",
    b"null",
    b"[]",
    b"\xff\xfe\x00",
    b'{"text": null}',
    b'{"text": ["hi"]}',
    b'{"unknown": 1}',
    b'{"status": ["open"]}',
    b'{"status": "snoozed", "until": 12}',
    b'{"agent_id": 5}',
    b'{"agent_id": {"id": "bob"}}',
    b'{"tags": {"a": 1}}',
    b'{"tags": [null]}',
    b'{"kind": "email", "value": 7}',
    b'{"into": 5}',
    b'{"into": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}',
    b'{"conversation_ids": "all", "agent_id": "bob"}',
    b'{"presence": true}',
    b'{"text": "hi", "channel": 3}',
]


async def test_hostile_bodies_get_4xx_and_change_nothing(
    client: TestClient, tokens: Tokens, customers: Customers
) -> None:
    recorded = await customers.chat("visitor-hostile1", "hello")
    conv, customer = recorded.conversation, recorded.customer
    assert conv
    root = Api(client, tokens.root)
    before = await root.get(f"/api/v1/conversations/{conv.id}")
    mutating = [
        (method, path)
        for method, path in registered_operations(client.server.app)
        if method in ("POST", "PUT") and not path.startswith("/api/v1/auth/")
    ]
    assert len(mutating) >= 10
    for method, template in mutating:
        path = template.replace(
            "{id}", conv.id if template.startswith("/api/v1/conversations/") else customer.id
        )
        for body in HOSTILE_BODIES:
            resp = await client.request(
                method,
                path,
                data=body,
                headers={**auth(tokens.root), "Content-Type": "application/json"},
            )
            text = await resp.text()
            if template.endswith("/read") and resp.status == 200:
                continue  # an empty body there means "mark everything read": harmless
            assert 400 <= resp.status < 500, f"{method} {template} {body!r}: {resp.status} {text}"
            assert "error" in await resp.json()
    after = await root.get(f"/api/v1/conversations/{conv.id}")
    assert after["timeline"] == before["timeline"]
    assert after["conversation"] == before["conversation"]
    assert after["customer"] == before["customer"]
