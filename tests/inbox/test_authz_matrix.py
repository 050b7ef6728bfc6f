"""Every /api/v1 route x every kind of caller: each gets exactly the access it should.

Routes come from the app's own router, and the table below must classify each of them:
a route added without a line here fails this test instead of escaping the matrix.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient

from hub.inbox.auth import TOKENS
from hub.inbox.openapi import OPERATIONS, registered_operations
from hub.model import utcnow
from tests.inbox.conftest import Customers, auth, login

HAS_WEBCHAT = importlib.util.find_spec("hub.channels.webchat") is not None

PUBLIC, AGENT, SUPERVISOR, ADMIN = "public", "agent", "supervisor", "admin"
RANK = {AGENT: 0, SUPERVISOR: 1, ADMIN: 2}

# Who may call each route. Keep in step with docs/api.md.
EXPECTED: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/auth/login"): PUBLIC,
    ("POST", "/api/v1/auth/logout"): AGENT,
    ("GET", "/api/v1/me"): AGENT,
    ("PUT", "/api/v1/me/presence"): AGENT,
    ("GET", "/api/v1/agents"): AGENT,
    ("GET", "/api/v1/channels"): AGENT,
    ("GET", "/api/v1/queues"): AGENT,
    ("GET", "/api/v1/conversations"): AGENT,
    ("GET", "/api/v1/conversations/{id}"): AGENT,
    ("POST", "/api/v1/conversations/{id}/read"): AGENT,
    ("POST", "/api/v1/conversations/{id}/replies"): AGENT,
    ("POST", "/api/v1/conversations/{id}/notes"): AGENT,
    ("POST", "/api/v1/conversations/{id}/call-back"): AGENT,
    ("POST", "/api/v1/conversations/{id}/assign"): AGENT,
    ("POST", "/api/v1/conversations/{id}/status"): AGENT,
    ("PUT", "/api/v1/conversations/{id}/tags"): AGENT,
    ("POST", "/api/v1/conversations/bulk-assign"): SUPERVISOR,
    ("GET", "/api/v1/customers/{id}"): AGENT,
    ("GET", "/api/v1/customers/{id}/timeline"): AGENT,
    ("POST", "/api/v1/customers/{id}/identities"): AGENT,
    ("POST", "/api/v1/customers/{id}/merge"): AGENT,
    ("POST", "/api/v1/customers/{id}/unmerge"): AGENT,
    ("POST", "/api/v1/conversations/{id}/accept"): AGENT,
    ("POST", "/api/v1/conversations/{id}/decline"): AGENT,
    ("GET", "/api/v1/admin/status"): ADMIN,
    ("GET", "/api/v1/ws"): AGENT,
    ("GET", "/api/v1/reports/summary"): SUPERVISOR,
    ("GET", "/api/v1/reports/timeseries"): SUPERVISOR,
    ("GET", "/api/v1/reports/export.csv"): SUPERVISOR,
    ("GET", "/api/v1/reports/queues"): SUPERVISOR,
}


@pytest.fixture
def client(full_client: TestClient) -> TestClient:
    """The whole hub as `hub serve` builds it: every route it serves is in the matrix."""
    return full_client


async def visitor_token(client: TestClient, visitor_name: str) -> str:
    """A real chat visitor's token, as the widget gets it; forged when no web chat exists."""
    if not HAS_WEBCHAT:
        return f"forged-visitor-token-{visitor_name}"
    ws = await client.ws_connect("/chat/web/ws")
    try:
        await ws.send_json({"type": "hello", "name": visitor_name})
        while True:
            frame = await ws.receive_json(timeout=5)
            if frame["type"] == "welcome":
                return str(frame["token"])
    finally:
        await ws.close()


async def expired_token(client: TestClient) -> str:
    tokens = client.server.app[TOKENS]
    tokens.clock = lambda: utcnow() - timedelta(hours=13)
    try:
        return await login(client, "root")  # an admin's, so only expiry can refuse it
    finally:
        tokens.clock = utcnow


def concrete(path: str, ids: dict[str, str]) -> str:
    if path.startswith("/api/v1/conversations/{id}"):
        return path.replace("{id}", ids["conversation"])
    return path.replace("{id}", ids["customer"])


async def call(client: TestClient, method: str, path: str, token: str | None) -> int:
    headers = auth(token) if token else {}
    # An empty object: enough to pass authorization and then fail validation, so an
    # allowed call proves it got past the gate without changing anything.
    resp = await client.request(method, path, headers=headers, json={})
    await resp.read()
    return resp.status


def allowed(status: int) -> bool:
    # Past the gate: a success, or the handler's own verdict on the (empty) body.
    return status not in (401, 403) and status < 500


async def test_every_route_is_in_the_matrix(client: TestClient) -> None:
    assert set(registered_operations(client.server.app)) == set(EXPECTED)


async def test_authorization_matrix(client: TestClient, customers: Customers) -> None:
    recorded = await customers.chat("visitor-matrix1", "hello")
    assert recorded.conversation
    ids = {"conversation": recorded.conversation.id, "customer": recorded.customer.id}
    callers: dict[str, str | None] = {
        "anonymous": None,
        "visitor A": await visitor_token(client, "Visitor A"),
        "visitor B": await visitor_token(client, "Visitor B"),
        "expired admin": await expired_token(client),
        AGENT: await login(client, "alice"),
        SUPERVISOR: await login(client, "sam"),
        ADMIN: await login(client, "root"),
    }
    failures: list[str] = []
    for (method, template), needed in sorted(EXPECTED.items()):
        path = concrete(template, ids)
        for caller, token in callers.items():
            if template == "/api/v1/auth/logout" and caller in RANK:
                token = await login(
                    client, {AGENT: "alice", SUPERVISOR: "sam", ADMIN: "root"}[caller]
                )  # logging out must not spend the token the other rows use
            status = await call(client, method, path, token)
            if needed == PUBLIC:
                ok = allowed(status)
            elif caller not in RANK:
                ok = status == 401
            elif RANK[caller] >= RANK[needed]:
                ok = allowed(status)
            else:
                ok = status == 403
            if not ok:
                failures.append(f"{method} {template} as {caller}: {status} (needs {needed})")
    assert not failures, "\n".join(failures)
    # The allowed calls above had empty bodies: no agent changed anything. (The router
    # may have queued the conversation meanwhile; that is the system acting, not them.)
    view = await client.get(
        f"/api/v1/conversations/{ids['conversation']}", headers=auth(callers[AGENT] or "")
    )
    body: dict[str, Any] = await view.json()
    by_agents = [e for e in body["timeline"]["items"] if e["author"].startswith("agent:")]
    assert by_agents == []
    assert body["conversation"]["assignee"] is None and body["conversation"]["tags"] == []


@pytest.mark.parametrize("who", ["anonymous", "visitor", "garbage"])
async def test_agent_websocket_refuses_non_agents_before_upgrading(
    client: TestClient, who: str
) -> None:
    token = {"anonymous": "", "visitor": await visitor_token(client, "V"), "garbage": "abc"}[who]
    with pytest.raises(WSServerHandshakeError) as caught:
        await client.ws_connect(f"/api/v1/ws?token={token}")
    assert caught.value.status == 401


# --- the OpenAPI document -------------------------------------------------------------


async def test_openapi_document_matches_the_routes(client: TestClient) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    registered = registered_operations(client.server.app)
    assert set(registered) == set(OPERATIONS), "document every /api/v1 route in openapi.py"
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == set(registered)
    assert doc["paths"]["/api/v1/admin/status"]["get"]["x-required-role"] == "admin"
    assert doc["paths"]["/api/v1/conversations/bulk-assign"]["post"]["x-required-role"] == (
        "supervisor"
    )
    assert doc["paths"]["/api/v1/auth/login"]["post"]["security"] == []
