"""The agents' and admins' REST API under /api/v1, and its wiring into the app.

Each handler declares its role (`requires`), checks its input completely before writing
anything, and publishes what it changed on the bus so that every agent's page updates
live. docs/api.md is the readable summary; hub/inbox/openapi.py the formal one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from hub.app import ADAPTERS, BUS, CONFIG, OUTBOX, STORE
from hub.bus import BusItem, Signal
from hub.channels.base import PermanentSendError, TemporarySendError
from hub.channels.voice import VoiceAdapter
from hub.config import Config
from hub.identities import InvalidIdentity, normalize
from hub.ids import is_id
from hub.inbox.auth import (
    SESSION,
    TOKENS,
    CredentialChecker,
    LoginThrottle,
    Session,
    TokenService,
    auth_middleware,
    public,
    requires,
)
from hub.inbox.inputs import (
    aware_time,
    cursor_query,
    fail,
    int_query,
    name_field,
    only_keys,
    path_id,
    read_json,
    store_errors_middleware,
    string_list,
    text_field,
)
from hub.inbox.openapi import openapi_document
from hub.inbox.presence import PRESENCE_KEY, PresenceDetails, PresenceRegistry
from hub.inbox.realtime import AgentSockets
from hub.inbox.replies import (
    MAX_REPLY_CHARS,
    ReplyRefused,
    address_for,
    channel_type,
    choose_route,
    note_draft,
    reachable_channels,
    reply_draft,
)
from hub.model import (
    Agent,
    Conversation,
    ConversationQuery,
    ConversationStatus,
    Customer,
    Direction,
    IdentityKind,
    Presence,
    Recorded,
    Role,
    agent_author,
    conversation_to_dict,
    customer_to_dict,
    event_to_dict,
    iso,
    utcnow,
)
from hub.timeline.store import InvalidOperation, StoreError, TimelineStore

log = structlog.get_logger(__name__)

PRESENCE = PRESENCE_KEY
SOCKETS = web.AppKey("inbox_sockets", AgentSockets)
THROTTLE = web.AppKey("inbox_login_throttle", LoginThrottle)
CREDENTIALS = web.AppKey("inbox_credentials", CredentialChecker)

MAX_NOTE_CHARS = 10_000
MAX_PAGE = 200
MAX_TAGS = 50
MAX_TAG_CHARS = 64
MAX_BULK = 200
# Unread counts stop here ("99+"): counting further costs reads and tells nobody more.
UNREAD_CAP = 100
READ_STATE_PREFIX = "inbox.read."

routes = web.RouteTableDef()


# --- shapes ---------------------------------------------------------------------------


def agent_to_dict(agent: Agent, presence: Presence) -> dict[str, Any]:
    # Spelled out field by field so that password_hash can never slip into a response.
    return {
        "id": agent.id,
        "name": agent.name,
        "login": agent.login,
        "role": agent.role.value,
        "skills": list(agent.skills),
        "capacity": dict(agent.capacity),
        "presence": presence.value,
    }


def _session(request: web.Request) -> Session:
    return request[SESSION]


def _config(request: web.Request) -> Config:
    return request.app[CONFIG]


def _store(request: web.Request) -> TimelineStore:
    return request.app[STORE]


def _find_agent(config: Config, agent_id: str) -> Agent | None:
    try:
        return config.agent(agent_id)
    except KeyError:
        return None


async def _publish(request: web.Request, items: Sequence[BusItem]) -> None:
    if items:
        await request.app[BUS].publish(items)


def conversation_signal(conversation: Conversation) -> Signal:
    return Signal(
        kind="conversation",
        conversation_id=conversation.id,
        customer_id=conversation.customer_id,
        data={"conversation": conversation_to_dict(conversation)},
    )


def customer_signal(customer: Customer) -> Signal:
    return Signal(
        kind="customer", customer_id=customer.id, data={"customer": customer_to_dict(customer)}
    )


def recorded_items(recorded: Recorded) -> list[BusItem]:
    """What a write changed, in the order a client should apply it."""
    if not recorded.created:
        return []
    items: list[BusItem] = [*recorded.side_events, recorded.event]
    if recorded.conversation is not None:
        items.append(conversation_signal(recorded.conversation))
    return items


async def _conversation(request: web.Request) -> Conversation:
    conversation_id = path_id(request, "conversation")
    conversation = await _store(request).get_conversation(conversation_id)
    if conversation is None:
        fail(404, f"no such conversation: {conversation_id}")
    return conversation


async def _customer(request: web.Request, customer_id: str) -> Customer:
    customer = await _store(request).get_customer(customer_id)
    if customer is None:
        fail(404, f"no such customer: {customer_id}")
    return customer


def _query_keys(request: web.Request, allowed: Sequence[str]) -> None:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        fail(400, f"unknown query parameter(s): {', '.join(unknown)}")


def _event_cursor(request: web.Request) -> str | None:
    before = cursor_query(request)
    if before is not None and not is_id(before):
        fail(400, "before: not a cursor this API returned")
    return before


def _page_dict(items: list[dict[str, Any]], next_cursor: str | None, total: int | None) -> dict:
    return {"items": items, "next_cursor": next_cursor, "total": total}


# --- sign-in and agents ---------------------------------------------------------------


@routes.post("/api/v1/auth/login")
@public
async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    only_keys(body, ("login", "password"))
    login_name = name_field(body, "login", required=True)
    password = text_field(body, "password", max_chars=1024)
    assert login_name is not None and password is not None
    throttle = request.app[THROTTLE]
    wait = throttle.retry_after(login_name)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        return web.json_response(
            {"error": f"too many failed sign-ins for this login: try again in {seconds} s"},
            status=429,
            headers={"Retry-After": str(seconds)},
        )
    agent = await request.app[CREDENTIALS].check(login_name, password)
    if agent is None:
        throttle.failed(login_name)
        log.info("auth.login_failed", login=login_name[:80])
        # One message for unknown login and wrong password: nothing to learn from it.
        fail(401, "wrong login or password")
    throttle.succeeded(login_name)
    token, expires_at = await request.app[TOKENS].issue(agent)
    log.info("auth.login", agent=agent.id)
    presence = await request.app[PRESENCE].get(agent.id)
    return web.json_response(
        {"token": token, "expires_at": iso(expires_at), "agent": agent_to_dict(agent, presence)}
    )


@routes.post("/api/v1/auth/logout")
@requires(Role.AGENT)
async def logout(request: web.Request) -> web.Response:
    session = _session(request)
    await request.app[TOKENS].revoke(session.token_digest)
    await request.app[SOCKETS].close_token(session.token_digest)
    await request.app[PRESENCE].signed_out(session.agent.id)
    log.info("auth.logout")
    return web.Response(status=204)


@routes.get("/api/v1/me")
@requires(Role.AGENT)
async def me(request: web.Request) -> web.Response:
    agent = _session(request).agent
    presence = await request.app[PRESENCE].get(agent.id)
    return web.json_response(
        {"agent": agent_to_dict(agent, presence), "expires_at": iso(_session(request).expires_at)}
    )


@routes.put("/api/v1/me/presence")
@requires(Role.AGENT)
async def set_presence(request: web.Request) -> web.Response:
    body = await read_json(request)
    only_keys(body, ("presence",))
    raw = body.get("presence")
    try:
        presence = Presence(raw)
    except ValueError:
        fail(422, "presence: one of online, away, offline")
    agent = _session(request).agent
    await request.app[PRESENCE].set(agent.id, presence)
    return web.json_response({"agent": agent_to_dict(agent, presence)})


@routes.get("/api/v1/agents")
@requires(Role.AGENT)
async def list_agents(request: web.Request) -> web.Response:
    registry = request.app[PRESENCE]
    items = [agent_to_dict(a, await registry.get(a.id)) for a in _config(request).agents]
    return web.json_response({"items": items})


@routes.get("/api/v1/channels")
@requires(Role.AGENT)
async def list_channels(request: web.Request) -> web.Response:
    items = [{"name": c.name, "type": channel_type(c).value} for c in _config(request).channels]
    return web.json_response({"items": items})


@routes.get("/api/v1/queues")
@requires(Role.AGENT)
async def list_queues(request: web.Request) -> web.Response:
    queues = _config(request).routing.queues
    return web.json_response({"items": [{"name": q.name} for q in queues]})


# --- conversations --------------------------------------------------------------------


async def _unread(store: TimelineStore, agent_id: str, conversation_id: str) -> int:
    marker = await store.get_state(f"{READ_STATE_PREFIX}{agent_id}.{conversation_id}")
    events = await store.events_after(conversation_id, marker or None, UNREAD_CAP)
    return sum(1 for e in events if e.direction is Direction.IN)


async def _list_item(store: TimelineStore, agent_id: str, conv: Conversation) -> dict[str, Any]:
    customer, unread = await asyncio.gather(
        store.get_customer(conv.customer_id), _unread(store, agent_id, conv.id)
    )
    return {
        "conversation": conversation_to_dict(conv),
        "customer": customer_to_dict(customer) if customer else None,
        "unread": unread,
    }


@routes.get("/api/v1/conversations")
@requires(Role.AGENT)
async def list_conversations(request: web.Request) -> web.Response:
    _query_keys(request, ("view", "status", "channel", "queue", "limit", "before"))
    agent = _session(request).agent
    view = request.query.get("view") or "all"
    if view not in ("mine", "unassigned", "all"):
        fail(400, "view: one of mine, unassigned, all")
    statuses: list[ConversationStatus] = []
    for part in filter(None, (request.query.get("status") or "").split(",")):
        try:
            statuses.append(ConversationStatus(part.strip()))
        except ValueError:
            fail(400, f"status: {part[:40]!r} is not one of open, pending, snoozed, resolved")
    channel = request.query.get("channel") or None
    queue = request.query.get("queue") or None
    for name, value in (("channel", channel), ("queue", queue)):
        if value is not None and len(value) > 200:
            fail(400, f"{name}: too long")
    limit = int_query(request, "limit", 50, 1, MAX_PAGE)
    before = cursor_query(request)
    query = ConversationQuery(
        statuses=tuple(statuses),
        assignee=agent.id if view == "mine" else None,
        unassigned=view == "unassigned",
        channel=channel,
        queue=queue,
    )
    store = _store(request)
    try:
        page = await store.list_conversations(query, limit, before)
    except InvalidOperation:
        fail(400, "before: not a cursor this API returned")
    items = await asyncio.gather(*(_list_item(store, agent.id, c) for c in page.items))
    return web.json_response(_page_dict(list(items), page.next_cursor, page.total))


@routes.get("/api/v1/conversations/{id}")
@requires(Role.AGENT)
async def get_conversation(request: web.Request) -> web.Response:
    _query_keys(request, ("limit", "before"))
    conversation = await _conversation(request)
    limit = int_query(request, "limit", 50, 1, MAX_PAGE)
    before = _event_cursor(request)
    store = _store(request)
    customer = await _customer(request, conversation.customer_id)
    page = await store.customer_timeline(customer.id, limit, before)
    channels = reachable_channels(customer, _config(request).channels, conversation.channel)
    return web.json_response(
        {
            "conversation": conversation_to_dict(conversation),
            "customer": customer_to_dict(customer),
            "timeline": _page_dict(
                [event_to_dict(e) for e in page.items], page.next_cursor, page.total
            ),
            "reply_channels": [{"name": c.name, "type": channel_type(c).value} for c in channels],
        }
    )


@routes.post("/api/v1/conversations/{id}/read")
@requires(Role.AGENT)
async def mark_read(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request) if request.can_read_body else {}
    only_keys(body, ("event_id",))
    store = _store(request)
    event_id = name_field(body, "event_id")
    if event_id is None:
        newest = await store.conversation_events(conversation.id, limit=1)
        event_id = newest.items[0].id if newest.items else None
    elif not is_id(event_id):
        fail(422, "event_id: not an event id")
    agent = _session(request).agent
    key = f"{READ_STATE_PREFIX}{agent.id}.{conversation.id}"
    current = await store.get_state(key)
    # The marker only moves forward: an older tab catching up must not resurrect unread.
    if event_id is not None and (not current or event_id > current):
        await store.set_state(key, event_id)
    return web.json_response(
        {
            "conversation_id": conversation.id,
            "unread": await _unread(store, agent.id, conversation.id),
        }
    )


@routes.post("/api/v1/conversations/{id}/replies")
@requires(Role.AGENT)
async def reply(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("text", "channel"))
    text = text_field(body, "text", max_chars=MAX_REPLY_CHARS)
    requested = name_field(body, "channel")
    assert text is not None
    customer = await _customer(request, conversation.customer_id)
    try:
        channel, to = choose_route(conversation, customer, _config(request).channels, requested)
    except ReplyRefused as exc:
        fail(422, str(exc))
    agent = _session(request).agent
    recorded = await _store(request).append(
        conversation.id, reply_draft(agent.id, channel, to, text)
    )
    request.app[OUTBOX].nudge()
    await _publish(request, recorded_items(recorded))
    log.info(
        "inbox.reply_queued",
        conversation=conversation.id,
        event_id=recorded.event.id,
        channel=channel.name,
    )
    return web.json_response({"event": event_to_dict(recorded.event)}, status=202)


@routes.post("/api/v1/conversations/{id}/notes")
@requires(Role.AGENT)
async def add_note(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("text",))
    text = text_field(body, "text", max_chars=MAX_NOTE_CHARS)
    assert text is not None
    agent = _session(request).agent
    recorded = await _store(request).append(conversation.id, note_draft(agent.id, text))
    await _publish(request, recorded_items(recorded))
    log.info("inbox.note", conversation=conversation.id, event_id=recorded.event.id)
    return web.json_response({"event": event_to_dict(recorded.event)}, status=201)


@routes.post("/api/v1/conversations/{id}/call-back")
@requires(Role.AGENT)
async def call_back(request: web.Request) -> web.Response:
    """Ring the agent's phone; when they pick up, the customer is dialled."""
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("channel",))
    requested = name_field(body, "channel")
    voice = [
        a
        for name, a in request.app[ADAPTERS].items()
        if isinstance(a, VoiceAdapter) and (requested is None or name == requested)
    ]
    if not voice:
        fail(422, f"channel: no voice channel {requested!r}" if requested else "no voice channel")
    customer = await _customer(request, conversation.customer_id)
    phone = address_for(customer, IdentityKind.PHONE)
    if phone is None:
        fail(422, "the customer has no phone number: link one first")
    agent = _session(request).agent
    try:
        call_sid = await voice[0].call_back(phone.value, agent, conversation_id=conversation.id)
    except PermanentSendError as exc:
        fail(422, str(exc))
    except TemporarySendError as exc:
        fail(503, f"the phone provider cannot be reached now: {exc}")
    log.info("inbox.call_back", conversation=conversation.id, agent=agent.id, call_sid=call_sid)
    return web.json_response({"call_sid": call_sid}, status=202)


def _assign_target(request: web.Request, body: dict[str, Any]) -> tuple[str | None, str | None]:
    config = _config(request)
    agent_id = body.get("agent_id")
    if agent_id is not None:
        if not isinstance(agent_id, str) or _find_agent(config, agent_id) is None:
            fail(422, f"agent_id: no such agent: {str(agent_id)[:80]!r}")
    queue = name_field(body, "queue")
    if queue is not None and queue not in {q.name for q in config.routing.queues}:
        fail(422, f"queue: no such queue: {queue[:80]!r}")
    return agent_id, queue


def _change_response(recorded: Recorded) -> web.Response:
    return web.json_response(
        {
            "event": event_to_dict(recorded.event),
            "conversation": conversation_to_dict(recorded.conversation)
            if recorded.conversation
            else None,
            "changed": recorded.created,
        }
    )


@routes.post("/api/v1/conversations/{id}/assign")
@requires(Role.AGENT)
async def assign(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("agent_id", "queue"))
    if "agent_id" not in body:
        fail(422, "agent_id: required (null to unassign)")
    agent_id, queue = _assign_target(request, body)
    actor = agent_author(_session(request).agent.id)
    recorded = await _store(request).assign(conversation.id, agent_id, actor, queue)
    await _publish(request, recorded_items(recorded))
    log.info("inbox.assign", conversation=conversation.id, to=agent_id, queue=queue)
    return _change_response(recorded)


@routes.post("/api/v1/conversations/{id}/status")
@requires(Role.AGENT)
async def set_status(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("status", "until"))
    try:
        status = ConversationStatus(body.get("status"))
    except ValueError:
        fail(422, "status: one of open, pending, snoozed, resolved")
    until = aware_time(body, "until")
    if status is ConversationStatus.SNOOZED:
        if until is None:
            fail(422, "until: required when snoozing (when the conversation wakes up)")
        if until <= utcnow():
            fail(422, "until: must be in the future")
    elif until is not None:
        fail(422, "until: only for status snoozed")
    actor = agent_author(_session(request).agent.id)
    recorded = await _store(request).set_status(conversation.id, status, actor, until)
    await _publish(request, recorded_items(recorded))
    log.info("inbox.status", conversation=conversation.id, status=status.value)
    return _change_response(recorded)


@routes.put("/api/v1/conversations/{id}/tags")
@requires(Role.AGENT)
async def set_tags(request: web.Request) -> web.Response:
    conversation = await _conversation(request)
    body = await read_json(request)
    only_keys(body, ("tags",))
    raw = string_list(body, "tags", max_items=MAX_TAGS, max_chars=MAX_TAG_CHARS)
    tags = tuple(dict.fromkeys(t.strip() for t in raw))  # trimmed, first spelling kept
    updated = await _store(request).set_conversation_tags(conversation.id, tags)
    await _publish(request, [conversation_signal(updated)])
    return web.json_response({"conversation": conversation_to_dict(updated)})


@routes.post("/api/v1/conversations/bulk-assign")
@requires(Role.SUPERVISOR)
async def bulk_assign(request: web.Request) -> web.Response:
    body = await read_json(request)
    only_keys(body, ("conversation_ids", "agent_id", "queue"))
    ids = string_list(body, "conversation_ids", max_items=MAX_BULK, max_chars=40)
    if not ids:
        fail(422, "conversation_ids: give at least one")
    if "agent_id" not in body and body.get("queue") is None:
        fail(422, "give agent_id (null to unassign) and/or queue")
    agent_id, queue = _assign_target(request, body)
    store = _store(request)
    unique = list(dict.fromkeys(ids))
    found = await asyncio.gather(
        *(store.get_conversation(i) if is_id(i) else _none() for i in unique)
    )
    missing = [i for i, conv in zip(unique, found, strict=True) if conv is None]
    if missing:
        # All or nothing: check every id before moving any conversation.
        fail(404, f"no such conversation(s): {', '.join(m[:40] for m in missing)}")
    actor = agent_author(_session(request).agent.id)
    results = []
    for conversation_id in unique:
        recorded = await store.assign(conversation_id, agent_id, actor, queue)
        await _publish(request, recorded_items(recorded))
        results.append(
            {
                "conversation": conversation_to_dict(recorded.conversation)
                if recorded.conversation
                else None,
                "event": event_to_dict(recorded.event),
                "changed": recorded.created,
            }
        )
    log.info("inbox.bulk_assign", count=len(unique), to=agent_id, queue=queue)
    return web.json_response({"items": results})


async def _none() -> None:
    return None


# --- customers ------------------------------------------------------------------------


@routes.get("/api/v1/customers/{id}")
@requires(Role.AGENT)
async def get_customer(request: web.Request) -> web.Response:
    customer = await _customer(request, path_id(request, "customer"))
    return web.json_response({"customer": customer_to_dict(customer)})


@routes.get("/api/v1/customers/{id}/timeline")
@requires(Role.AGENT)
async def customer_timeline(request: web.Request) -> web.Response:
    _query_keys(request, ("limit", "before"))
    customer = await _customer(request, path_id(request, "customer"))
    limit = int_query(request, "limit", 50, 1, MAX_PAGE)
    before = _event_cursor(request)
    page = await _store(request).customer_timeline(customer.id, limit, before)
    return web.json_response(
        _page_dict([event_to_dict(e) for e in page.items], page.next_cursor, page.total)
    )


@routes.post("/api/v1/customers/{id}/identities")
@requires(Role.AGENT)
async def link_identity(request: web.Request) -> web.Response:
    customer_id = path_id(request, "customer")
    body = await read_json(request)
    only_keys(body, ("kind", "value"))
    kind = body.get("kind")
    if kind not in (IdentityKind.EMAIL.value, IdentityKind.PHONE.value):
        # Chat visitor ids come from the widget, never typed by an agent.
        fail(422, "kind: one of email, phone")
    value = name_field(body, "value", required=True)
    assert value is not None
    try:
        identity = normalize(kind, value, default_region=_config(request).hub.default_region)
    except InvalidIdentity as exc:
        fail(422, f"value: {exc}")
    customer = await _store(request).link_identity(customer_id, identity)
    await _publish(request, [customer_signal(customer)])
    log.info("inbox.identity_linked", customer=customer_id, kind=kind)
    return web.json_response({"customer": customer_to_dict(customer)})


async def _merge_follow_up(request: web.Request, recorded: Recorded) -> None:
    items = recorded_items(recorded)
    if recorded.created:
        items.append(customer_signal(recorded.customer))
    await _publish(request, items)


@routes.post("/api/v1/customers/{id}/merge")
@requires(Role.AGENT)
async def merge(request: web.Request) -> web.Response:
    source_id = path_id(request, "customer")
    body = await read_json(request)
    only_keys(body, ("into",))
    target_id = name_field(body, "into", required=True)
    assert target_id is not None
    if not is_id(target_id):
        fail(404, f"no such customer: {target_id[:40]!r}")
    actor = agent_author(_session(request).agent.id)
    recorded = await _store(request).merge_customers(source_id, target_id, actor)
    await _merge_follow_up(request, recorded)
    log.info("inbox.merge", customer=source_id, into=target_id)
    return web.json_response(
        {
            "event": event_to_dict(recorded.event),
            "customer": customer_to_dict(recorded.customer),
            "changed": recorded.created,
        }
    )


@routes.post("/api/v1/customers/{id}/unmerge")
@requires(Role.AGENT)
async def unmerge(request: web.Request) -> web.Response:
    source_id = path_id(request, "customer")
    if request.can_read_body:
        only_keys(await read_json(request), ())
    actor = agent_author(_session(request).agent.id)
    store = _store(request)
    recorded = await store.unmerge_customers(source_id, actor)
    source = await _customer(request, source_id)
    await _merge_follow_up(request, recorded)
    await _publish(request, [customer_signal(source)])
    log.info("inbox.unmerge", customer=source_id, was_in=recorded.customer.id)
    return web.json_response(
        {
            "event": event_to_dict(recorded.event),
            "customer": customer_to_dict(source),
            "target": customer_to_dict(recorded.customer),
        }
    )


# --- admin and realtime ---------------------------------------------------------------


@routes.get("/api/v1/admin/status")
@requires(Role.ADMIN)
async def admin_status(request: web.Request) -> web.Response:
    app = request.app
    store: dict[str, Any] = {"ok": True, "backend": _config(request).storage.backend}
    try:
        await app[STORE].ping()
    except StoreError as exc:
        store.update(ok=False, error=str(exc))
    channels = {
        name: {"type": adapter.type.value, **adapter.status()}
        for name, adapter in app[ADAPTERS].items()
    }
    return web.json_response(
        {
            "store": store,
            "channels": channels,
            "agents_online": list(await app[PRESENCE].online_agents()),
            "agent_sockets": app[SOCKETS].open_count,
        }
    )


@routes.get("/api/v1/ws")
@requires(Role.AGENT, query_token=True)
async def agent_ws(request: web.Request) -> web.StreamResponse:
    return await request.app[SOCKETS].serve(request, _session(request))


@public
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app))


# --- wiring ---------------------------------------------------------------------------


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Sign-in and roles, then store refusals as 404/409, for /api/ only.

    One layer in front of every route instead of two: everything else (webhooks, pages)
    passes through it with one prefix test.
    """
    if not request.path.startswith("/api/"):
        return await handler(request)
    return await auth_middleware(request, partial(store_errors_middleware, handler=handler))


def install(app: web.Application) -> Any:
    """Routes and middlewares now; services that need the store at start-up."""
    app.middlewares.append(api_middleware)
    app.router.add_routes(routes)
    app.router.add_get("/api/openapi.json", openapi_json)
    app.on_shutdown.append(_close_sockets)
    return _inbox_ctx


async def _close_sockets(app: web.Application) -> None:
    # Open sockets would hold shutdown for its whole timeout; tell clients to reconnect.
    if SOCKETS in app:
        await app[SOCKETS].close_all()


async def _inbox_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = app[STORE]
    bus = app[BUS]

    async def announce(agent_id: str, presence: Presence, details: PresenceDetails) -> None:
        # The router and other agents learn presence from the bus, like everything else;
        # `details` let the router weigh what each hub process says (hub/routing/cluster.py).
        await bus.publish(
            [
                Signal(
                    kind="presence",
                    data={"agent_id": agent_id, "presence": presence.value, **details},
                )
            ]
        )

    tokens = TokenService(store, lambda agent_id: _find_agent(config, agent_id))
    presence = PresenceRegistry(
        grace_seconds=float(config.routing.away_grace_seconds), on_change=announce
    )
    app[TOKENS] = tokens
    app[PRESENCE] = presence
    app[THROTTLE] = LoginThrottle()
    app[CREDENTIALS] = CredentialChecker(config.agent_by_login)
    app[SOCKETS] = AgentSockets(store, bus, presence, tokens)
    try:
        yield
    finally:
        await presence.close()
