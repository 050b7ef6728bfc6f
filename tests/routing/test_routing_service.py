"""The routing service inside a whole hub: real config parser, SQLite file, bus, inbox API.

Conversations come in through the ingestor as channels make them; agents go online
through the presence registry as the inbox does; everything else is the service's own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub.app import BUS, CONFIG, INGESTOR, STORE, create_app
from hub.bus import Signal, Subscription
from hub.config import Config, parse_config
from hub.inbox.auth import TOKENS
from hub.inbox.presence import PRESENCE_KEY
from hub.model import (
    ChannelType,
    ConversationStatus,
    Direction,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Presence,
    Recorded,
)
from hub.passwords import hash_password
from hub.routing.service import ROUTER
from hub.timeline.sqlite import SqliteStore

AGENT_IDS = ("alice", "bob")


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password("routing-test-pw")


def hub_yaml(data_dir: Path, password_hash: str, queue_extra: str = "") -> str:
    agents = "".join(
        f"""
  - id: {agent_id}
    password_hash: "{password_hash}"
    capacity: {{webchat: 1, email: 2}}
"""
        for agent_id in AGENT_IDS
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
routing:
  requeue_after_seconds: 0
  queues:
    - name: general
{queue_extra}
agents:{agents}
"""


Factory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_hub(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    tmp_path: Path,
    password_hash: str,
) -> Factory:
    async def make(queue_extra: str = "") -> TestClient:
        text = hub_yaml(tmp_path, password_hash, queue_extra)
        config: Config = parse_config(text, "routing-test.yaml", {}, tmp_path)
        client = await aiohttp_client(create_app(config, store=SqliteStore(tmp_path / "hub.db")))
        client.server.app[ROUTER].tick_seconds = 0.02
        return client

    return make


_ids = itertools.count(1)


async def chat(app: web.Application, visitor: str, text: str = "hello") -> Recorded:
    return await app[INGESTOR].ingest(
        Inbound(
            channel="web",
            channel_type=ChannelType.WEBCHAT,
            external_id=f"msg-{next(_ids)}",
            identity=Identity(IdentityKind.CHAT, visitor),
            text=text,
        )
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def assignee_is(app: web.Application, conv_id: str, agent: str | None) -> None:
    async def check() -> bool:
        conv = await app[STORE].get_conversation(conv_id)
        return conv is not None and conv.assignee == agent

    await eventually(check)


async def online(app: web.Application, *agents: str) -> None:
    for agent in agents:
        await app[PRESENCE_KEY].set(agent, Presence.ONLINE)
    await eventually(lambda: _all_online(app, agents))


async def _all_online(app: web.Application, agents: tuple[str, ...]) -> bool:
    return all(app[ROUTER].router.state.is_online(a) for a in agents)


async def signal(sub: Subscription, kind: str, **match: Any) -> Signal:
    while True:
        item = await asyncio.wait_for(sub.get(), 5)
        if isinstance(item, Signal) and item.kind == kind:
            if all(item.data.get(k) == v for k, v in match.items()):
                return item


async def token(app: web.Application, agent_id: str) -> dict[str, str]:
    issued, _ = await app[TOKENS].issue(app[CONFIG].agent(agent_id))
    return {"Authorization": f"Bearer {issued}"}


async def test_webchat_message_is_assigned_with_the_customers_timeline(make_hub: Factory) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice")
    sub = app[BUS].subscribe("test")
    first = await chat(app, "visitor-1", "hi, I need help")
    conv_id = first.event.conversation_id
    assert conv_id is not None
    await assignee_is(app, conv_id, "alice")
    assigned = await signal(sub, "assigned", agent_id="alice")
    timeline = assigned.data["timeline"]
    assert assigned.data["conversation_id"] == conv_id
    assert timeline["total"] >= 2  # the message and the assignment
    assert timeline["items"][-1]["text"] == "hi, I need help"  # newest first
    kinds = [i["kind"] for i in timeline["items"]]
    assert kinds[0] == EventKind.ASSIGNMENT.value
    conv = await app[STORE].get_conversation(conv_id)
    assert conv is not None and conv.queue == "general"


async def test_capacity_one_second_waits_until_first_is_resolved(make_hub: Factory) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice")
    sub = app[BUS].subscribe("test")
    first = (await chat(app, "visitor-1")).event.conversation_id
    assert first is not None
    await assignee_is(app, first, "alice")
    second = (await chat(app, "visitor-2")).event.conversation_id
    assert second is not None
    position = await signal(sub, "queue_position")
    assert position.conversation_id == second
    assert position.data["position"] == 1
    conv = await app[STORE].get_conversation(second)
    assert conv is not None and conv.assignee is None
    # Resolving through the API, as an agent would.
    resp = await client.post(
        f"/api/v1/conversations/{first}/status",
        json={"status": "resolved"},
        headers=await token(app, "alice"),
    )
    assert resp.status == 200, await resp.text()
    await assignee_is(app, second, "alice")


async def test_agent_coming_online_drains_the_queue_oldest_first(make_hub: Factory) -> None:
    client = await make_hub()
    app = client.server.app
    convs = []
    for n in range(3):
        conv_id = (await chat(app, f"visitor-{n}")).event.conversation_id
        convs.append(conv_id)
        await eventually(lambda c=conv_id: _waiting(app, c))
    await online(app, "bob")
    await assignee_is(app, convs[0], "bob")
    await asyncio.sleep(0.05)
    later = [await app[STORE].get_conversation(c) for c in convs[1:]]
    assert [c.assignee for c in later if c] == [None, None]


async def _waiting(app: web.Application, conv_id: str | None) -> bool:
    return conv_id is not None and app[ROUTER].router.state.waiting(conv_id) is not None


async def test_offer_declined_moves_on_and_accept_assigns(make_hub: Factory) -> None:
    client = await make_hub("      require_accept: true\n      offer_timeout_seconds: 30")
    app = client.server.app
    await online(app, "alice", "bob")
    sub = app[BUS].subscribe("test")
    conv_id = (await chat(app, "visitor-1")).event.conversation_id
    first = await signal(sub, "offer")
    assert first.data["conversation_id"] == conv_id
    offered_to = first.data["agent_id"]
    other = next(a for a in AGENT_IDS if a != offered_to)
    # Only the agent holding the offer may answer it.
    resp = await client.post(
        f"/api/v1/conversations/{conv_id}/accept", headers=await token(app, other)
    )
    assert resp.status == 409
    resp = await client.post(
        f"/api/v1/conversations/{conv_id}/decline", headers=await token(app, offered_to)
    )
    assert resp.status == 200, await resp.text()
    second = await signal(sub, "offer")
    assert second.data["agent_id"] == other
    resp = await client.post(
        f"/api/v1/conversations/{conv_id}/accept", headers=await token(app, other)
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["conversation"]["assignee"] == other
    resp = await client.post(f"/api/v1/conversations/{conv_id}/accept")
    assert resp.status == 401


async def test_unanswered_conversations_of_an_agent_going_away_are_requeued(
    make_hub: Factory,
) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice")
    answered = (await chat(app, "visitor-1")).event.conversation_id
    assert answered is not None
    await assignee_is(app, answered, "alice")
    resp = await client.post(
        f"/api/v1/conversations/{answered}/replies",
        json={"text": "on it"},
        headers=await token(app, "alice"),
    )
    assert resp.status < 300, await resp.text()
    # Alice is full (one chat): the second chat waits for bob.
    waiting = (await chat(app, "visitor-2")).event.conversation_id
    assert waiting is not None
    await eventually(lambda: _waiting(app, waiting))
    await online(app, "bob")
    await assignee_is(app, waiting, "bob")
    await app[PRESENCE_KEY].set("bob", Presence.AWAY)
    # requeue_after_seconds is 0: bob's unanswered chat goes back to the queue at once...
    await assignee_is(app, waiting, None)
    events = await app[STORE].conversation_events(waiting)
    assert any(
        e.kind is EventKind.ASSIGNMENT and e.data.get("from") == "bob" and e.data.get("to") is None
        for e in events.items
    )
    # ...while alice's answered one stays with her when she goes away.
    await app[PRESENCE_KEY].set("alice", Presence.OFFLINE)
    await asyncio.sleep(0.1)
    conv = await app[STORE].get_conversation(answered)
    assert conv is not None and conv.assignee == "alice"
    out = await app[STORE].conversation_events(answered)
    assert any(e.direction is Direction.OUT for e in out.items)


async def test_restart_rebuilds_loads_and_waiting_queue(make_hub: Factory, tmp_path: Path) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice")
    first = (await chat(app, "visitor-1")).event.conversation_id
    assert first is not None
    await assignee_is(app, first, "alice")
    second = (await chat(app, "visitor-2")).event.conversation_id
    await eventually(lambda: _waiting(app, second))
    await client.close()

    client = await make_hub()
    app = client.server.app
    state = app[ROUTER].router.state
    assert state.load("alice", "webchat") == 1
    assert second is not None and state.waiting(second) is not None
    await online(app, "alice")
    await asyncio.sleep(0.05)
    conv = await app[STORE].get_conversation(second)
    assert conv is not None and conv.assignee is None  # alice is still full
    await app[STORE].set_status(first, ConversationStatus.RESOLVED, "agent:alice")
    # Not published on the bus: only the rebuild or an event tells the router. Publish it.
    events = await app[STORE].conversation_events(first, limit=1)
    await app[BUS].publish(list(events.items))
    await assignee_is(app, second, "alice")


async def test_contacts_marked_not_routable_are_left_alone(make_hub: Factory) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice")
    recorded = await app[INGESTOR].ingest(
        Inbound(
            channel="web",
            channel_type=ChannelType.WEBCHAT,
            external_id="auto-1",
            identity=Identity(IdentityKind.CHAT, "visitor-auto"),
            text="I am out of office",
            data={"routable": False},
        )
    )
    conv_id = recorded.event.conversation_id
    await chat(app, "visitor-2")  # a routable one after it, to know the router got this far
    await eventually(lambda: _has_load(app, "alice"))
    assert conv_id is not None and not app[ROUTER].router.knows(conv_id)
    conv = await app[STORE].get_conversation(conv_id)
    assert conv is not None and conv.assignee is None and conv.queue is None


async def _has_load(app: web.Application, agent: str) -> bool:
    return app[ROUTER].router.state.load(agent, "webchat") > 0


async def test_after_hours_auto_reply_is_sent_once_and_the_contact_waits(
    make_hub: Factory,
) -> None:
    extra = (
        "      business_hours: never\n"
        "      after_hours: auto_reply\n"
        "      after_hours_message: We are closed, back tomorrow.\n"
        "business_hours:\n"
        "  - name: never\n"
        "    timezone: UTC\n"
        "    weekly: {}\n"
    )
    client = await make_hub(extra)
    app = client.server.app
    await online(app, "alice")
    conv_id = (await chat(app, "visitor-1")).event.conversation_id
    assert conv_id is not None
    await eventually(lambda: _waiting(app, conv_id))
    await chat(app, "visitor-1", "hello again?")

    async def replied() -> bool:
        page = await app[STORE].conversation_events(conv_id)
        return any(e.direction is Direction.OUT for e in page.items)

    await eventually(replied)
    await asyncio.sleep(0.05)
    page = await app[STORE].conversation_events(conv_id)
    replies = [e for e in page.items if e.direction is Direction.OUT]
    assert [(r.text, r.author) for r in replies] == [("We are closed, back tomorrow.", "system")]
    conv = await app[STORE].get_conversation(conv_id)
    assert conv is not None and conv.assignee is None


async def test_returning_customer_goes_back_to_their_last_agent(make_hub: Factory) -> None:
    client = await make_hub()
    app = client.server.app
    await online(app, "alice", "bob")
    first = (await chat(app, "regular")).event.conversation_id
    assert first is not None
    await eventually(lambda: _assigned(app, first))
    conv = await app[STORE].get_conversation(first)
    assert conv is not None and conv.assignee is not None
    served_by = conv.assignee
    resp = await client.post(
        f"/api/v1/conversations/{first}/status",
        json={"status": "resolved"},
        headers=await token(app, served_by),
    )
    assert resp.status == 200
    await eventually(lambda: _free(app, served_by))
    # Forget what this process remembers: the timeline alone must say who served them.
    app[ROUTER]._last_served.clear()
    second = (await chat(app, "regular", "me again")).event.conversation_id
    assert second is not None and second != first
    await assignee_is(app, second, served_by)


async def _assigned(app: web.Application, conv_id: str) -> bool:
    conv = await app[STORE].get_conversation(conv_id)
    return conv is not None and conv.assignee is not None


async def _free(app: web.Application, agent: str) -> bool:
    return app[ROUTER].router.state.load(agent, "webchat") == 0
