"""Signing in and out: tokens that expire and can be revoked, and no secret ever leaks."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from aiohttp.test_utils import TestClient

from hub.app import CONFIG, STORE
from hub.inbox.auth import STATE_PREFIX, TOKENS, TokenService
from hub.model import utcnow
from tests.inbox.conftest import AGENTS, auth, login


async def test_login_returns_a_working_token_and_the_agent(client: TestClient) -> None:
    resp = await client.post(
        "/api/v1/auth/login", json={"login": "alice", "password": "alice-secret-pw"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["agent"] == {
        "id": "alice",
        "name": "Alice Example",
        "login": "alice",
        "role": "agent",
        "skills": [],
        "capacity": body["agent"]["capacity"],
        "presence": "offline",
    }
    me = await client.get("/api/v1/me", headers=auth(body["token"]))
    assert me.status == 200
    assert (await me.json())["agent"]["id"] == "alice"


async def test_login_is_case_insensitive_on_the_login(client: TestClient) -> None:
    assert await login(client, "ALICE", "alice-secret-pw")


async def test_token_expires_after_twelve_hours(client: TestClient) -> None:
    before = utcnow()
    resp = await client.post(
        "/api/v1/auth/login", json={"login": "bob", "password": "bob-secret-pw"}
    )
    body = await resp.json()
    token = body["token"]
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert timedelta(hours=11, minutes=59) < expires_at - before <= timedelta(hours=12, seconds=5)

    tokens = client.server.app[TOKENS]
    tokens.clock = lambda: utcnow() + timedelta(hours=11, minutes=59)
    assert (await client.get("/api/v1/me", headers=auth(token))).status == 200
    tokens.clock = lambda: utcnow() + timedelta(hours=12, seconds=1)
    resp = await client.get("/api/v1/me", headers=auth(token))
    assert resp.status == 401
    assert "expired" in (await resp.json())["error"]


async def test_logout_revokes_the_token(client: TestClient) -> None:
    token = await login(client, "alice")
    other = await login(client, "alice")
    resp = await client.post("/api/v1/auth/logout", headers=auth(token))
    assert resp.status == 204
    assert (await client.get("/api/v1/me", headers=auth(token))).status == 401
    assert (await client.post("/api/v1/auth/logout", headers=auth(token))).status == 401
    # Only that session ended: the agent's other sign-in still works.
    assert (await client.get("/api/v1/me", headers=auth(other))).status == 200


async def test_wrong_password_and_unknown_login_get_the_same_answer(client: TestClient) -> None:
    wrong = await client.post("/api/v1/auth/login", json={"login": "alice", "password": "nope"})
    unknown = await client.post("/api/v1/auth/login", json={"login": "mallory", "password": "x"})
    assert wrong.status == unknown.status == 401
    assert await wrong.json() == await unknown.json() == {"error": "wrong login or password"}


async def test_garbage_tokens_are_refused(client: TestClient) -> None:
    for header in ("Bearer nope", "Bearer " + "x" * 500, "Basic YWxpY2U6cHc=", "Bearer"):
        resp = await client.get("/api/v1/me", headers={"Authorization": header})
        assert resp.status == 401, header
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # A token in the URL is for the WebSocket only (URLs end up in logs).
    token = await login(client, "alice")
    assert (await client.get(f"/api/v1/me?token={token}")).status == 401


async def test_tokens_are_stored_hashed_and_work_in_another_process(client: TestClient) -> None:
    app = client.server.app
    token = await login(client, "alice")
    store = app[STORE]
    assert await store.get_state(STATE_PREFIX + token) is None
    digest = hashlib.sha256(token.encode()).hexdigest()
    record = await store.get_state(STATE_PREFIX + digest)
    assert record and token not in record
    # Another hub process has its own TokenService over the same store.
    config = app[CONFIG]
    other = TokenService(store, lambda agent_id: config.agent(agent_id))
    session = await other.authenticate(token)
    assert session is not None and session.agent.id == "alice"


async def test_password_hashes_never_appear_in_responses(
    client: TestClient, password_hashes: dict[str, str]
) -> None:
    login_resp = await client.post(
        "/api/v1/auth/login", json={"login": "root", "password": "root-secret-pw"}
    )
    token = (await login_resp.json())["token"]
    texts = [await login_resp.text()]
    for path in ("/api/v1/me", "/api/v1/agents", "/api/v1/admin/status", "/api/openapi.json"):
        resp = await client.get(path, headers=auth(token))
        assert resp.status == 200, path
        texts.append(await resp.text())
    for text in texts:
        assert "argon2" not in text
        assert "password_hash" not in text
        for value in password_hashes.values():
            assert value not in text


async def test_repeated_failures_lock_that_login_for_a_while(client: TestClient) -> None:
    for _ in range(10):
        resp = await client.post("/api/v1/auth/login", json={"login": "bob", "password": "guess"})
        assert resp.status == 401
    # Even the right password is refused now: guessing must not be able to continue.
    resp = await client.post(
        "/api/v1/auth/login", json={"login": "BOB", "password": AGENTS["bob"][2]}
    )
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # Other agents are not locked out by someone hammering bob.
    assert await login(client, "alice")


async def test_malformed_login_requests_get_clear_errors(client: TestClient) -> None:
    cases = [
        (b"", 400),
        (b"{not json", 400),
        (b"[]", 422),
        (b'{"login": "alice"}', 422),
        (b'{"login": 5, "password": "x"}', 422),
        (b'{"login": "alice", "password": "x", "remember": true}', 422),
    ]
    for body, status in cases:
        resp = await client.post(
            "/api/v1/auth/login", data=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status == status, body
        assert "error" in await resp.json()
