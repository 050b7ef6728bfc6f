"""Agent sign-in: bearer tokens, roles, and the middleware that guards /api/v1.

Tokens are opaque random strings. Only their sha256 is stored, in the store's small
state, so a leaked database does not hand out sessions, and any hub process sharing the
store accepts a token another process issued. Every /api/v1 handler declares who may
call it (`requires`/`public`); a handler that declares nothing is admin-only, so a route
added without thought fails closed rather than open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from aiohttp import web

from hub.model import Agent, Role, utcnow
from hub.passwords import hash_password, verify_password
from hub.timeline.store import TimelineStore

log = structlog.get_logger(__name__)

TOKEN_TTL = timedelta(hours=12)
STATE_PREFIX = "auth.token."
API_PREFIX = "/api/v1/"

_RANK = {Role.AGENT: 0, Role.SUPERVISOR: 1, Role.ADMIN: 2}


def role_allows(held: Role, required: Role) -> bool:
    """agent < supervisor < admin: a role may do what every lower role may."""
    return _RANK[held] >= _RANK[required]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    agent: Agent
    token_digest: str
    expires_at: datetime

    @property
    def role(self) -> Role:
        return self.agent.role


AgentLookup = Callable[[str], Agent | None]


class TokenService:
    """Issues, checks and revokes bearer tokens kept hashed in the store's state."""

    def __init__(
        self,
        store: TimelineStore,
        agents: AgentLookup,
        *,
        ttl: timedelta = TOKEN_TTL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._agents = agents
        self.ttl = ttl
        # Swappable so tests can move time forward instead of sleeping 12 hours.
        self.clock = clock

    async def issue(self, agent: Agent) -> tuple[str, datetime]:
        token = secrets.token_urlsafe(32)
        expires_at = self.clock() + self.ttl
        record = {
            "agent_id": agent.id,
            "role": agent.role.value,
            "expires_at": expires_at.timestamp(),
        }
        await self._store.set_state(STATE_PREFIX + token_digest(token), json.dumps(record))
        return token, expires_at

    async def authenticate(self, token: str | None) -> Session | None:
        # Tokens are ASCII; raw header bytes arrive as surrogates that can't be hashed.
        if not token or len(token) > 200 or not token.isascii():
            return None
        return await self.session(token_digest(token))

    async def session(self, digest: str) -> Session | None:
        """The live session of a token digest: None when unknown, revoked or expired."""
        raw = await self._store.get_state(STATE_PREFIX + digest)
        if not raw:  # never issued, or revoked (the store has no delete: "" marks it)
            return None
        try:
            record: dict[str, Any] = json.loads(raw)
            expires_at = datetime.fromtimestamp(float(record["expires_at"]), UTC)
            agent_id = str(record["agent_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("auth.bad_token_record", digest=digest[:12])
            return None
        if expires_at <= self.clock():
            return None
        # The configuration is the authority on who exists and with which role: an agent
        # removed or demoted in the YAML loses that access at once, token or not.
        agent = self._agents(agent_id)
        if agent is None:
            return None
        return Session(agent=agent, token_digest=digest, expires_at=expires_at)

    async def revoke(self, digest: str) -> None:
        await self._store.set_state(STATE_PREFIX + digest, "")


class LoginThrottle:
    """Refuses a login after too many recent failures, so passwords can't be guessed fast.

    Per process and in memory: an attacker spreading guesses over processes gets N times
    the budget, which still keeps guessing at a crawl.
    """

    def __init__(
        self,
        max_failures: int = 10,
        window_seconds: float = 60.0,
        *,
        max_tracked: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self._max_tracked = max_tracked
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, login: str) -> float | None:
        """Seconds until this login may try again, or None if it may try now."""
        times = self._recent(login.casefold())
        if times is None or len(times) < self.max_failures:
            return None
        return max(times[0] + self.window - self._clock(), 0.0) or None

    def failed(self, login: str) -> None:
        key = login.casefold()
        if key not in self._failures and len(self._failures) >= self._max_tracked:
            # Bounded memory under a spray of made-up logins: forget the stalest entry.
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(key, deque()).append(self._clock())

    def succeeded(self, login: str) -> None:
        self._failures.pop(login.casefold(), None)


class CredentialChecker:
    """Checks a login and password the same way whether or not the login exists.

    An unknown login is verified against a throwaway hash, so the answer takes as long
    and reads the same as a wrong password: nobody can learn which logins exist.
    """

    def __init__(self, find_agent: Callable[[str], Agent | None]) -> None:
        self._find_agent = find_agent
        self._dummy_hash: str | None = None

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(hash_password, secrets.token_urlsafe(16))
        return self._dummy_hash

    async def check(self, login: str, password: str) -> Agent | None:
        agent = self._find_agent(login)
        usable = agent is not None and bool(agent.password_hash)
        stored = agent.password_hash if agent is not None and usable else await self._dummy()
        # argon2 takes tens of milliseconds of CPU: off the event loop.
        ok = await asyncio.to_thread(verify_password, stored, password)
        return agent if ok and usable else None


# --- route declarations and the middleware ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Access:
    role: Role | None  # None: no token needed
    # Browsers cannot set headers on a WebSocket, so the WS takes its token in the URL.
    query_token: bool = False


ACCESS_ATTR = "hub_access"
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def requires(role: Role, *, query_token: bool = False) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        setattr(handler, ACCESS_ATTR, Access(role, query_token))
        return handler

    return mark


def public(handler: H) -> H:
    setattr(handler, ACCESS_ATTR, Access(None))
    return handler


def access_of(handler: object) -> Access:
    """What a handler declared; undeclared handlers are admin-only (fail closed)."""
    declared = getattr(handler, ACCESS_ATTR, None)
    return declared if isinstance(declared, Access) else Access(Role.ADMIN)


TOKENS = web.AppKey("inbox_tokens", TokenService)
SESSION = web.RequestKey("inbox_session", Session)


def _denied(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="hub"'} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


def bearer_token(request: web.Request, *, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return request.query.get("token") or None
    return None


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    match_info = request.match_info
    if match_info.http_exception is not None:
        return await handler(request)  # unknown path or method: the router's 404/405
    access = access_of(match_info.handler)
    if access.role is None:
        return await handler(request)
    token = bearer_token(request, allow_query=access.query_token)
    if token is None:
        return _denied(401, "sign in first: send Authorization: Bearer TOKEN")
    session = await request.app[TOKENS].authenticate(token)
    if session is None:
        return _denied(401, "token expired, revoked or unknown: sign in again")
    if not role_allows(session.role, access.role):
        log.info(
            "auth.forbidden",
            agent=session.agent.id,
            role=session.role.value,
            needed=access.role.value,
            path=request.path,
        )
        return _denied(403, f"this needs the {access.role.value} role")
    request[SESSION] = session
    with structlog.contextvars.bound_contextvars(agent=session.agent.id):
        return await handler(request)
