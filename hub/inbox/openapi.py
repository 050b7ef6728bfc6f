"""The OpenAPI 3.1 document of /api/v1, served at GET /api/openapi.json.

Operations are written here by hand, next to the handlers in hub/inbox/api.py; the
roles come from the handlers' own declarations at serving time, so the document can't
claim a role the middleware doesn't enforce. tests/inbox/test_api.py checks that the
operations here and the routes registered on the app are the same set, including
routes other modules register under /api/v1 (the router's accept/decline).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from hub.inbox.auth import API_PREFIX, access_of
from hub.model import ConversationStatus, DeliveryState, Direction, EventKind, Presence, Role

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


STR = {"type": "string"}
ID = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"}
TIME = {"type": "string", "format": "date-time"}


def _page(item: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        ("items", "next_cursor"),
        items={"type": "array", "items": item},
        next_cursor=_nullable(STR),
        total=_nullable({"type": "integer"}),
    )


SCHEMAS: dict[str, Any] = {
    "Error": _obj(("error",), error=STR),
    "Agent": _obj(
        ("id", "name", "login", "role", "presence"),
        id=STR,
        name=STR,
        login=STR,
        role={"enum": [r.value for r in Role]},
        skills={"type": "array", "items": STR},
        capacity={"type": "object", "additionalProperties": {"type": "integer"}},
        presence={"enum": [p.value for p in Presence]},
    ),
    "Identity": _obj(
        ("kind", "value", "verified"),
        kind={"enum": ["email", "phone", "chat"]},
        value=STR,
        verified={"type": "boolean"},
    ),
    "Customer": _obj(
        ("id", "display_name", "identities", "tags", "created_at"),
        id=ID,
        display_name=STR,
        identities={"type": "array", "items": _ref("Identity")},
        tags={"type": "array", "items": STR},
        created_at=TIME,
        merged_into=_nullable(ID),
    ),
    "Conversation": _obj(
        ("id", "customer_id", "status", "channel"),
        id=ID,
        customer_id=ID,
        status={"enum": [s.value for s in ConversationStatus]},
        channel=STR,
        assignee=_nullable(STR),
        queue=_nullable(STR),
        priority={"type": "integer"},
        tags={"type": "array", "items": STR},
        created_at=TIME,
        last_activity_at=TIME,
        first_response_at=_nullable(TIME),
        resolved_at=_nullable(TIME),
        snoozed_until=_nullable(TIME),
    ),
    "Event": _obj(
        ("id", "customer_id", "direction", "kind", "author", "created_at"),
        id=ID,
        customer_id=ID,
        conversation_id=_nullable(ID),
        channel=STR,
        channel_type=_nullable({"enum": ["email", "sms", "voice", "webchat"]}),
        direction={"enum": [d.value for d in Direction]},
        kind={"enum": [k.value for k in EventKind]},
        author={"type": "string", "description": "customer, system, or agent:<agent id>"},
        created_at=TIME,
        text=STR,
        html=_nullable({"type": "string", "description": "sanitized email HTML"}),
        attachments={"type": "array", "items": {"type": "object"}},
        external_id=_nullable(STR),
        delivery_state=_nullable({"enum": [s.value for s in DeliveryState]}),
        delivery_error=_nullable(STR),
        data={"type": "object"},
    ),
    "ChannelRef": _obj(("name", "type"), name=STR, type=STR),
    "ConversationListItem": _obj(
        ("conversation", "customer", "unread"),
        conversation=_ref("Conversation"),
        customer=_ref("Customer"),
        unread={
            "type": "integer",
            "description": "inbound events since your read marker, counted up to 100",
        },
    ),
    "Change": _obj(
        ("event", "conversation", "changed"),
        event=_ref("Event"),
        conversation=_ref("Conversation"),
        changed={"type": "boolean", "description": "false: it was already so, nothing stored"},
    ),
}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {JSON: {"schema": schema}}
    return response


def _err(description: str) -> dict[str, Any]:
    return _ok(description, _ref("Error"))


def _param(name: str, where: str, schema: dict[str, Any], description: str = "") -> dict:
    param: dict[str, Any] = {"name": name, "in": where, "schema": schema}
    if where == "path":
        param["required"] = True
    if description:
        param["description"] = description
    return param


ID_PARAM = _param("id", "path", ID)
PAGING = [
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
    _param("before", "query", STR, "next_cursor of the previous page"),
]
TIMELINE = _page(_ref("Event"))
REPORT_DIMENSIONS = ("channel", "queue", "agent", "tag")
REPORT_METRICS = (
    "conversations",
    "abandoned_chats",
    "volume_in",
    "volume_out",
    "missed_calls",
    "first_response",
    "next_response",
    "queue_wait",
    "handle",
    "resolution",
)
REPORT_PARAMS = [
    _param("from", "query", STR, "YYYY-MM-DD (local day) or ISO 8601 time with a zone"),
    _param("to", "query", STR, "YYYY-MM-DD (included) or ISO 8601 time (excluded)"),
    _param("tz", "query", STR, "IANA zone for dates, hours and days"),
    _param("channel", "query", STR),
    _param("queue", "query", STR),
    _param("agent", "query", STR),
    _param("tag", "query", STR),
    _param("business_hours", "query", STR, "a business_hours name: durations in open time"),
]

# (method, path) -> operation, without security (added from the handlers' roles).
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/auth/login"): {
        "summary": "Sign in; same 401 for an unknown login and a wrong password",
        "requestBody": _body(_obj(("login", "password"), login=STR, password=STR)),
        "responses": {
            "200": _ok(
                "signed in",
                _obj(
                    ("token", "expires_at", "agent"),
                    token=STR,
                    expires_at=TIME,
                    agent=_ref("Agent"),
                ),
            ),
            "401": _err("wrong login or password"),
            "429": _err("too many failed sign-ins for this login; see Retry-After"),
        },
    },
    ("POST", "/api/v1/auth/logout"): {
        "summary": "Revoke this token and close its WebSockets",
        "responses": {"204": _ok("signed out")},
    },
    ("GET", "/api/v1/me"): {
        "summary": "The signed-in agent with presence",
        "responses": {"200": _ok("you", _obj(("agent",), agent=_ref("Agent"), expires_at=TIME))},
    },
    ("PUT", "/api/v1/me/presence"): {
        "summary": "Set your own presence (your choice sticks across reconnects)",
        "requestBody": _body(_obj(("presence",), presence={"enum": [p.value for p in Presence]})),
        "responses": {"200": _ok("changed", _obj(("agent",), agent=_ref("Agent")))},
    },
    ("GET", "/api/v1/agents"): {
        "summary": "Agents with presence (never password hashes)",
        "responses": {
            "200": _ok("agents", _obj(("items",), items={"type": "array", "items": _ref("Agent")}))
        },
    },
    ("GET", "/api/v1/channels"): {
        "summary": "Configured channels (for filters and the reply channel picker)",
        "responses": {
            "200": _ok(
                "channels", _obj(("items",), items={"type": "array", "items": _ref("ChannelRef")})
            )
        },
    },
    ("GET", "/api/v1/queues"): {
        "summary": "Configured routing queues",
        "responses": {
            "200": _ok(
                "queues",
                _obj(("items",), items={"type": "array", "items": _obj(("name",), name=STR)}),
            )
        },
    },
    ("GET", "/api/v1/conversations"): {
        "summary": "Conversations, most recent activity first, cursor-paged",
        "parameters": [
            _param("view", "query", {"enum": ["mine", "unassigned", "all"], "default": "all"}),
            _param("status", "query", STR, "comma-separated: open,pending,snoozed,resolved"),
            _param("channel", "query", STR, "channel name"),
            _param("queue", "query", STR, "queue name"),
            *PAGING,
        ],
        "responses": {
            "200": _ok("a page", _page(_ref("ConversationListItem"))),
            "400": _err("bad query parameter or cursor"),
        },
    },
    ("GET", "/api/v1/conversations/{id}"): {
        "summary": "A conversation with the customer's whole cross-channel timeline",
        "parameters": [ID_PARAM, *PAGING],
        "responses": {
            "200": _ok(
                "the conversation",
                _obj(
                    ("conversation", "customer", "timeline", "reply_channels"),
                    conversation=_ref("Conversation"),
                    customer=_ref("Customer"),
                    timeline=TIMELINE,
                    reply_channels={
                        "type": "array",
                        "items": _ref("ChannelRef"),
                        "description": "channels that can reach the customer, default first",
                    },
                ),
            ),
            "404": _err("no such conversation"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/read"): {
        "summary": "Move your read marker (to the newest event when event_id is omitted)",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj(event_id=ID), required=False),
        "responses": {
            "200": _ok(
                "marked",
                _obj(("conversation_id", "unread"), conversation_id=ID, unread={"type": "integer"}),
            ),
            "404": _err("no such conversation"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/replies"): {
        "summary": "Reply to the customer: queued in the outbox, sent on the chosen channel",
        "parameters": [ID_PARAM],
        "requestBody": _body(
            _obj(
                ("text",),
                text={"type": "string", "maxLength": 10_000},
                channel={"type": "string", "description": "another configured channel"},
            )
        ),
        "responses": {
            "202": _ok("queued", _obj(("event",), event=_ref("Event"))),
            "404": _err("no such conversation"),
            "413": _err("text longer than 10,000 characters"),
            "422": _err("invalid body, or the channel cannot reach this customer"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/notes"): {
        "summary": "Private note for agents, never delivered to the customer",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj(("text",), text={"type": "string", "maxLength": 10_000})),
        "responses": {
            "201": _ok("stored", _obj(("event",), event=_ref("Event"))),
            "404": _err("no such conversation"),
            "413": _err("text too long"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/call-back"): {
        "summary": "Call the customer back: the agent's phone rings, then the customer's",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj((), channel={**STR, "description": "a voice channel"})),
        "responses": {
            "202": _ok("calling", _obj(("call_sid",), call_sid=STR)),
            "404": _err("no such conversation"),
            "422": _err("no voice channel, no customer phone, or no agent phone"),
            "503": _err("the phone provider cannot be reached now"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/assign"): {
        "summary": "Assign, transfer (another agent and/or queue) or unassign (null)",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj(("agent_id",), agent_id=_nullable(STR), queue=_nullable(STR))),
        "responses": {"200": _ok("done", _ref("Change")), "422": _err("unknown agent/queue")},
    },
    ("POST", "/api/v1/conversations/{id}/status"): {
        "summary": "Open, pending, snoozed (until a time) or resolved",
        "parameters": [ID_PARAM],
        "requestBody": _body(
            _obj(
                ("status",),
                status={"enum": [s.value for s in ConversationStatus]},
                until={**TIME, "description": "required for snoozed; with a timezone"},
            )
        ),
        "responses": {
            "200": _ok("done", _ref("Change")),
            "409": _err("reopening while the customer has another active conversation"),
            "422": _err("bad status or until"),
        },
    },
    ("PUT", "/api/v1/conversations/{id}/tags"): {
        "summary": "Replace the conversation's tags",
        "parameters": [ID_PARAM],
        "requestBody": _body(
            _obj(
                ("tags",),
                tags={
                    "type": "array",
                    "maxItems": 50,
                    "items": {"type": "string", "maxLength": 64},
                },
            )
        ),
        "responses": {
            "200": _ok("done", _obj(("conversation",), conversation=_ref("Conversation")))
        },
    },
    ("POST", "/api/v1/conversations/bulk-assign"): {
        "summary": "Reassign many conversations at once (all or nothing on unknown ids)",
        "requestBody": _body(
            _obj(
                ("conversation_ids",),
                conversation_ids={"type": "array", "items": ID, "maxItems": 200},
                agent_id=_nullable(STR),
                queue=STR,
            )
        ),
        "responses": {
            "200": _ok("done", _obj(("items",), items={"type": "array", "items": _ref("Change")})),
            "404": _err("some conversation ids are unknown; nothing changed"),
        },
    },
    # Served by the router (hub/routing/service.py), documented here with the rest.
    ("POST", "/api/v1/conversations/{id}/accept"): {
        "summary": "Accept the router's offer of this conversation to you",
        "parameters": [ID_PARAM],
        "responses": {
            "200": _ok(
                "assigned to you",
                _obj(("conversation",), conversation=_nullable(_ref("Conversation"))),
            ),
            "409": _err("no open offer of this conversation to you (it may have timed out)"),
        },
    },
    ("POST", "/api/v1/conversations/{id}/decline"): {
        "summary": "Decline the router's offer; it moves on to the next candidate",
        "parameters": [ID_PARAM],
        "responses": {
            "200": _ok("declined", _obj(("declined",), declined={"const": True})),
            "409": _err("no open offer of this conversation to you"),
        },
    },
    ("GET", "/api/v1/customers/{id}"): {
        "summary": "A customer with identities",
        "parameters": [ID_PARAM],
        "responses": {
            "200": _ok("the customer", _obj(("customer",), customer=_ref("Customer"))),
            "404": _err("no such customer"),
        },
    },
    ("GET", "/api/v1/customers/{id}/timeline"): {
        "summary": "The customer's whole timeline, newest first, cursor-paged",
        "parameters": [ID_PARAM, *PAGING],
        "responses": {"200": _ok("a page", TIMELINE), "404": _err("no such customer")},
    },
    ("POST", "/api/v1/customers/{id}/identities"): {
        "summary": "Link an email address or phone number to the customer",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj(("kind", "value"), kind={"enum": ["email", "phone"]}, value=STR)),
        "responses": {
            "200": _ok("linked", _obj(("customer",), customer=_ref("Customer"))),
            "409": _err("the identity is another customer's (owner_id says whose): merge"),
            "422": _err("not a valid email address or phone number"),
        },
    },
    ("POST", "/api/v1/customers/{id}/merge"): {
        "summary": "Merge this customer into another (timeline shows who and when)",
        "parameters": [ID_PARAM],
        "requestBody": _body(_obj(("into",), into=ID)),
        "responses": {
            "200": _ok(
                "merged",
                _obj(
                    ("event", "customer", "changed"),
                    event=_ref("Event"),
                    customer=_ref("Customer"),
                    changed={"type": "boolean"},
                ),
            ),
            "404": _err("no such customer"),
            "409": _err("merge not possible (into itself, into a merged customer...)"),
        },
    },
    ("POST", "/api/v1/customers/{id}/unmerge"): {
        "summary": "Undo the merge of this customer",
        "parameters": [ID_PARAM],
        "responses": {
            "200": _ok(
                "unmerged",
                _obj(
                    ("event", "customer", "target"),
                    event=_ref("Event"),
                    customer=_ref("Customer"),
                    target=_ref("Customer"),
                ),
            ),
            "409": _err("this customer is not merged"),
        },
    },
    ("GET", "/api/v1/admin/status"): {
        "summary": "Channels' status, the store, agents online",
        "responses": {"200": _ok("status", {"type": "object"})},
    },
    # Served by hub/reports/api.py; figures defined in docs/reports.md.
    ("GET", "/api/v1/reports/summary"): {
        "summary": "Response, wait, handle and resolution times, volumes, missed calls",
        "parameters": [*REPORT_PARAMS, _param("by", "query", {"enum": list(REPORT_DIMENSIONS)})],
        "responses": {
            "200": _ok("the figures of the period", {"type": "object"}),
            "400": _err("bad or unknown query parameter"),
        },
    },
    ("GET", "/api/v1/reports/timeseries"): {
        "summary": "One figure per local hour or day of the period",
        "parameters": [
            *REPORT_PARAMS,
            _param("metric", "query", {"enum": list(REPORT_METRICS)}),
            _param("interval", "query", {"enum": ["hour", "day"], "default": "day"}),
        ],
        "responses": {
            "200": _ok("points", {"type": "object"}),
            "400": _err("bad or unknown query parameter"),
        },
    },
    ("GET", "/api/v1/reports/export.csv"): {
        "summary": "The period as CSV: one row per conversation, or per group",
        "parameters": [
            *REPORT_PARAMS,
            _param("group", "query", {"enum": ["conversation", *REPORT_DIMENSIONS]}),
        ],
        "responses": {
            "200": {"description": "CSV", "content": {"text/csv": {"schema": STR}}},
            "400": _err("bad or unknown query parameter"),
        },
    },
    ("GET", "/api/v1/reports/queues"): {
        "summary": "Live: waiting per queue, longest wait, agents per presence state",
        "responses": {
            "200": _ok("now", {"type": "object"}),
            "400": _err("it takes no query parameters"),
        },
    },
    ("GET", "/api/v1/ws"): {
        "summary": "The agents' realtime WebSocket (token in ?token=); see docs/api.md",
        "parameters": [_param("token", "query", STR, "the bearer token")],
        "responses": {
            "101": _ok("switching protocols"),
            "400": _err("not a WebSocket upgrade request"),
        },
    },
}


def _security(role: Role | None) -> dict[str, Any]:
    if role is None:
        return {"security": []}
    return {"security": [{"bearer": []}], "x-required-role": role.value}


def registered_operations(app: web.Application) -> dict[tuple[str, str], object]:
    """(method, path) -> handler of every /api/v1 route on the app (HEAD excluded)."""
    found: dict[tuple[str, str], object] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(API_PREFIX) and route.method != "HEAD":
            found[(route.method, path)] = route.handler
    return found


def _refusals(path: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The 4xx every operation of this shape can answer (tests/hostile/test_schemathesis.py
    holds the served answers to the document); an operation's own entries win."""
    out: dict[str, Any] = {}
    takes_body = "requestBody" in operation
    if takes_body or any(p["in"] == "query" for p in operation.get("parameters", ())):
        out["400"] = _err("malformed JSON, or a bad or unknown query parameter")
    if "{id}" in path:
        out["404"] = _err("no such conversation or customer")
    if takes_body:
        out["413"] = _err("body over hub.max_body_bytes, or a text over its limit")
        out["422"] = _err("a field missing, unknown, or of the wrong type or value")
    return out


def openapi_document(app: web.Application) -> dict[str, Any]:
    handlers = registered_operations(app)
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        handler = handlers.get((method, path))
        role = access_of(handler).role if handler is not None else Role.ADMIN
        common = {
            "401": _err("no, expired or revoked token"),
            "403": _err("your role may not do this"),
        }
        op = {**operation, **_security(role)}
        op["responses"] = {
            **(common if role is not None else {}),
            **_refusals(path, operation),
            **operation["responses"],
        }
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hub agents' API",
            "version": "1",
            "description": 'Errors are {"error": message} with a 4xx status. '
            "Roles: agent < supervisor < admin.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
