"""Web chat: the visitor WebSocket of each webchat channel, plus the widget and demo page.

Routes
------
- `GET /chat/{channel}/ws`: the visitor WebSocket (one per webchat channel).
- `GET /widget.js`, `GET /demo`: shared by every webchat channel (see `shared_routes`).

Protocol (JSON text frames; docs/webchat.md is the readable version)
--------------------------------------------------------------------
client -> server
  {"type":"hello", "token"?, "last_event_id"?, "name"?, "email"?, "user_id"?, "user_hash"?}
      must be the first frame. No token: the server mints a visitor id and a signed token.
      A token that is garbled, forged or of another channel: error `invalid_token` and
      close 4401; nothing is stored. `user_hash` = hex HMAC-SHA256(identity_secret,
      email or user_id) is the website vouching for its logged-in user.
  {"type":"message", "client_id", "text"}   -> {"type":"ack","client_id","event_id"}
      acked only once stored; the same client_id again (after a reconnect) is the same
      event, never a second one.
  {"type":"typing"}                          the visitor is typing (rate-limited, no reply)
  {"type":"contact", "email"}                -> {"type":"contact_saved","email"}
      "continue by email" when no agent is online (channels with offline_email_channel)
  {"type":"ping"}                            -> {"type":"pong"}
  {"type":"csat", "survey", "score": 1-5, "comment"?}  -> {"type":"csat_saved","survey","score"}
      the visitor's rating of a resolved conversation (hub/reports/csat.py); error
      `csat_closed` when that survey is not open (answered, expired, or none).
server -> client
  {"type":"welcome", "token", "visitor_id", "agents_online": bool|null,
   "offline_email": bool, "title", "max_message_chars"}
      then every customer-visible event of the visitor's conversation after
      `last_event_id` (all of it without one), oldest first, then live events:
  {"type":"event", "event": {"id","direction":"in"|"out","text","created_at",
                             "author_name"?, "client_id"?}}
  {"type":"typing", "from":"agent"}
  {"type":"agents", "online": bool}          agents' presence changed
  {"type":"error", "code", "message", "client_id"?}
      codes: bad_frame, hello_required, invalid_token, too_long, empty, rate_limited,
      invalid_email, unsupported, unavailable, internal, csat_closed.
  An event that is a satisfaction survey carries "csat": {"survey", "scale": 5}: the
  widget shows rating buttons under it.
Close codes: 4400 no/bad hello, 4401 invalid token, 4408 hello timeout or too slow a
reader (reconnect and resume), 1001 hub shutting down, 1013 storage unavailable.

Customer-visible means a MESSAGE event with direction in or out: notes, assignments,
status changes and merges never reach a visitor, and a visitor only ever receives
events of the customer its own chat identity resolves to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from hub.bus import Signal, Subscription
from hub.channels.base import HubServices, SendResult
from hub.channels.visitor_tokens import (
    InvalidToken,
    VisitorTokens,
    load_secret,
    new_visitor_id,
    vouched,
)
from hub.identities import InvalidIdentity, normalize, normalize_email
from hub.ids import is_id
from hub.inbox.presence import PRESENCE_KEY
from hub.model import (
    SYSTEM,
    ChannelType,
    Conversation,
    ConversationQuery,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Outbound,
    iso,
)
from hub.timeline.store import IdentityConflict, StoreError, StoreUnavailable, TimelineStore

if TYPE_CHECKING:
    from hub.config import Config, WebchatChannel

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

HELLO_TIMEOUT_SECONDS = 10.0
HEARTBEAT_SECONDS = 30.0
# Frames queued for one socket before it counts as too slow and is closed (it resumes
# from the store on reconnect, so closing loses nothing).
OUTGOING_LIMIT = 1000
# A replay is paged through the store this many events at a time, up to REPLAY_MAX.
REPLAY_PAGE = 500
REPLAY_MAX = 5000
TYPING_MIN_INTERVAL = 2.0
SENT_MEMORY = 256
MAX_NAME_CHARS = 120
MAX_USER_ID_CHARS = 256
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Records a visitor's CSAT rating: (customer id, channel, survey id, score, comment) ->
# the stored answer, or None when that survey is not open. Set by hub.reports.integrations.
CsatRecorder = Callable[[str, str, str, int, str], Awaitable[Event | None]]

CLOSE_BAD_HELLO = 4400
CLOSE_INVALID_TOKEN = 4401
CLOSE_TOO_SLOW = 4408


class FrameError(Exception):
    """A client frame the server refuses; becomes an error frame, never a crash."""

    def __init__(self, code: str, message: str, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id


def error_frame(code: str, message: str, client_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


def load_frame(text: str) -> Any:
    """A frame's JSON; ValueError also for what json.loads takes but the hub can't keep.

    Lone surrogates (a "\\ud800" escape) can't be encoded as UTF-8, so the store would
    fail on them; nesting thousands deep makes json.loads raise RecursionError.
    """
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return value


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def customer_visible(event: Event) -> bool:
    """Only what the customer said or was told; never notes, assignments or other internals."""
    return event.kind is EventKind.MESSAGE and event.direction in (Direction.IN, Direction.OUT)


def normalize_origin(origin: str) -> str:
    """scheme://host[:port] lower-cased, default ports dropped, as config.py writes them."""
    parts = urlsplit(origin.strip())
    host = (parts.hostname or "").lower()
    port = parts.port if parts.port not in (None, 80, 443) else None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return f"{parts.scheme.lower()}://{netloc}"


# --- presence: who can answer now ------------------------------------------------------


async def agents_online(app: web.Application | None) -> bool | None:
    """Whether any agent is online; None when the hub cannot tell (no inbox wired)."""
    registry = None if app is None else app.get(PRESENCE_KEY)
    if registry is None:
        return None
    return bool(await registry.online_agents())


# --- per-visitor limits ----------------------------------------------------------------


class RateLimiter:
    """A token bucket per visitor: `per_minute` burst, refilled at per_minute/60 a second."""

    MAX_KEYS = 50_000

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_KEYS:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely carries no information: forget it.
        full = [
            k
            for k, (tokens, stamp) in self._buckets.items()
            if tokens + (now - stamp) * self.rate >= self.capacity
        ]
        for key in full:
            del self._buckets[key]


# --- live connections ------------------------------------------------------------------


@dataclass
class Claims:
    """What a visitor said about themselves, applied once a customer record exists."""

    vouched: list[Identity] = field(default_factory=list)  # the website signed these
    unverified: list[Identity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # need a conversation to land on

    def __bool__(self) -> bool:
        return bool(self.vouched or self.unverified or self.notes)


class VisitorConnection:
    """One visitor socket: who it is, what it may see, and its outgoing frame queue.

    Every frame leaves through one writer task reading `queue`, so acks, live events and
    errors never interleave mid-frame. While the welcome and replay are being written
    directly, live frames wait in `held` so the visitor sees them after the replay.
    """

    def __init__(
        self, ws: web.WebSocketResponse, visitor_id: str, identity: Identity, display_name: str
    ) -> None:
        self.ws = ws
        self.visitor_id = visitor_id
        self.identity = identity
        self.display_name = display_name
        self.customer_id: str | None = None
        self.conversation_id: str | None = None
        self.last_event_id = ""  # the newest event id this socket was given
        # Recently sent event ids: a delivery-state update republishes the same event,
        # and the visitor needs each message once.
        self._sent: OrderedDict[str, None] = OrderedDict()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(OUTGOING_LIMIT)
        self.held: list[str] | None = []
        self.claims = Claims()
        self.merged = False
        self.last_typing = 0.0
        self.evicted = False
        self.log = log.bind(visitor=visitor_id)

    def rebind(self, channel: str) -> None:
        self.log = log.bind(
            channel=channel,
            visitor=self.visitor_id,
            customer=self.customer_id,
            conversation=self.conversation_id,
        )

    def push_text(self, text: str) -> bool:
        """Queue a serialized frame; False when the socket's queue is full."""
        if self.held is not None:
            self.held.append(text)
            return True
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            return False
        return True

    def push(self, frame: dict[str, Any]) -> bool:
        return self.push_text(dumps(frame))

    def mark_sent(self, event_id: str) -> bool:
        """Remember `event_id` as sent; False if it already was."""
        if event_id in self._sent:
            return False
        self._sent[event_id] = None
        if len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        if event_id > self.last_event_id:
            self.last_event_id = event_id
        return True

    def push_event(self, frame_text: str, event_id: str) -> bool:
        if not self.mark_sent(event_id):
            return True
        return self.push_text(frame_text)

    def go_live(self) -> bool:
        held, self.held = self.held or [], None
        return all(self.push_text(text) for text in held)


class ConnectionIndex:
    """Live sockets by visitor, customer and conversation, for O(1) fan-out."""

    def __init__(self) -> None:
        self.by_visitor: dict[str, set[VisitorConnection]] = {}
        self.by_customer: dict[str, set[VisitorConnection]] = {}
        self.by_conversation: dict[str, set[VisitorConnection]] = {}
        self.all: set[VisitorConnection] = set()

    @staticmethod
    def _add(table: dict[str, set[VisitorConnection]], key: str | None, conn: Any) -> None:
        if key is not None:
            table.setdefault(key, set()).add(conn)

    @staticmethod
    def _discard(table: dict[str, set[VisitorConnection]], key: str | None, conn: Any) -> None:
        if key is None:
            return
        members = table.get(key)
        if members is not None:
            members.discard(conn)
            if not members:
                del table[key]

    def add(self, conn: VisitorConnection) -> None:
        self.all.add(conn)
        self._add(self.by_visitor, conn.visitor_id, conn)
        self._add(self.by_customer, conn.customer_id, conn)
        self._add(self.by_conversation, conn.conversation_id, conn)

    def remove(self, conn: VisitorConnection) -> None:
        self.all.discard(conn)
        self._discard(self.by_visitor, conn.visitor_id, conn)
        self._discard(self.by_customer, conn.customer_id, conn)
        self._discard(self.by_conversation, conn.conversation_id, conn)

    def move(
        self, conn: VisitorConnection, customer_id: str | None, conversation_id: str | None
    ) -> bool:
        """Re-file a connection; True when anything changed."""
        if (conn.customer_id, conn.conversation_id) == (customer_id, conversation_id):
            return False
        registered = conn in self.all
        if registered:
            self.remove(conn)
        conn.customer_id, conn.conversation_id = customer_id, conversation_id
        if registered:
            self.add(conn)
        return True

    def of_customer(self, customer_id: str | None) -> Iterable[VisitorConnection]:
        return tuple(self.by_customer.get(customer_id, ())) if customer_id else ()

    def of_conversation(self, conversation_id: str | None) -> Iterable[VisitorConnection]:
        return tuple(self.by_conversation.get(conversation_id, ())) if conversation_id else ()


# --- the adapter -----------------------------------------------------------------------


class WebchatAdapter:
    """One webchat channel: its visitor sockets, their fan-out and their limits."""

    type = ChannelType.WEBCHAT

    def __init__(self, channel_cfg: WebchatChannel, config: Config) -> None:
        self.name = channel_cfg.name
        self.cfg = channel_cfg
        self.config = config
        allowed = {normalize_origin(o) if o != "*" else o for o in channel_cfg.allowed_origins}
        if allowed:
            # The hub's own /demo page always may carry its widget.
            allowed.add(normalize_origin(config.hub.public_url))
        self._allowed_origins = frozenset(allowed)
        self._limiter = RateLimiter(channel_cfg.rate_limit_per_minute)
        self._index = ConnectionIndex()
        self._services: HubServices | None = None
        self._tokens: VisitorTokens | None = None
        self._subscription: Subscription | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._app: web.Application | None = None
        self._agents_online: bool | None = None
        self._dropped_seen = 0
        self._log = log.bind(channel=self.name)
        self.record_csat: CsatRecorder | None = None

    # --- the adapter contract ------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get(f"/chat/{self.name}/ws", self.handle_socket)]

    async def start(self, services: HubServices) -> None:
        self._services = services
        self._tokens = VisitorTokens(await load_secret(services.store))
        # One bus subscription for the whole channel, fanned out through the index:
        # per-socket subscriptions would make every publish cost O(all sockets).
        self._subscription = services.bus.subscribe(f"webchat:{self.name}", maxsize=10_000)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"webchat:{self.name}")
        self._log.info("webchat.started", origins=sorted(self._allowed_origins) or "any")

    async def stop(self) -> None:
        await self.close_connections()
        if self._subscription is not None:
            self._subscription.close()
        for task in (self._dispatcher, *self._background):
            if task is not None:
                task.cancel()
        for task in (self._dispatcher, *self._background):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background.clear()
        self._dispatcher = None

    async def close_connections(self) -> None:
        """Tell every visitor the hub is going away (they reconnect and resume)."""
        conns = tuple(self._index.all)
        await asyncio.gather(
            *(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"hub stopping") for c in conns),
            return_exceptions=True,
        )

    async def send(self, outbound: Outbound) -> SendResult:
        # The bus already pushed the event to any live socket of this customer; here we
        # only say whether someone was there to see it.
        connected = bool(self._index.by_visitor.get(outbound.to.value)) or bool(
            self._index.by_customer.get(outbound.customer_id)
        )
        return SendResult(state=DeliveryState.DELIVERED if connected else DeliveryState.SENT)

    def status(self) -> dict[str, Any]:
        return {"ok": self._services is not None, "connections": len(self._index.all)}

    @property
    def connection_count(self) -> int:
        return len(self._index.all)

    # --- the socket ------------------------------------------------------------------

    def origin_allowed(self, origin: str | None) -> bool:
        if not self._allowed_origins or "*" in self._allowed_origins:
            return True
        if origin is None:
            return False
        try:
            return normalize_origin(origin) in self._allowed_origins
        except ValueError:
            return False  # not a URL at all: a bad port, a broken IPv6 host

    async def handle_socket(self, request: web.Request) -> web.StreamResponse:
        if self._services is None or self._tokens is None:
            raise web.HTTPServiceUnavailable(text="web chat is starting, retry shortly")
        origin = request.headers.get("Origin")
        if not self.origin_allowed(origin):
            self._log.warning("webchat.origin_refused", origin=origin)
            raise web.HTTPForbidden(text="this website may not use this chat channel")
        self._app = request.app
        max_size = max(16_384, self.cfg.max_message_chars * 6 + 2048)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=max_size)
        if not request.headers.get("Sec-WebSocket-Key", "").isascii():
            # aiohttp's handshake base64-decodes the key and lets the ValueError escape.
            raise web.HTTPBadRequest(text="Sec-WebSocket-Key is not base64")
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="this URL takes a WebSocket upgrade")
        await ws.prepare(request)
        conn: VisitorConnection | None = None
        writer: asyncio.Task[None] | None = None
        try:
            conn = await self._greet(ws)
            if conn is None:
                return ws
            writer = asyncio.create_task(
                self._write_loop(conn), name=f"webchat-writer:{conn.visitor_id}"
            )
            await self._read_loop(conn)
        finally:
            if conn is not None:
                self._index.remove(conn)
                conn.log.info("webchat.disconnected", code=ws.close_code)
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            if not ws.closed:
                await ws.close()
        return ws

    async def _refuse(
        self, ws: web.WebSocketResponse, close_code: int, code: str, msg: str
    ) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(dumps(error_frame(code, msg)))
        await ws.close(code=close_code, message=code.encode())

    async def _greet(self, ws: web.WebSocketResponse) -> VisitorConnection | None:
        """Read the hello, identify the visitor, welcome and replay; None if refused."""
        assert self._tokens is not None
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_SECONDS):
                msg = await ws.receive()
        except TimeoutError:
            await self._refuse(ws, CLOSE_TOO_SLOW, "hello_required", "send hello first")
            return None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        try:
            hello = parse_hello(msg)
        except FrameError as exc:
            await self._refuse(ws, CLOSE_BAD_HELLO, exc.code, exc.message)
            return None
        token = hello.get("token")
        if token is not None:
            try:
                claims = self._tokens.verify(token, self.name)
            except InvalidToken as exc:
                self._log.warning("webchat.invalid_token", reason=str(exc))
                await self._refuse(ws, CLOSE_INVALID_TOKEN, "invalid_token", str(exc))
                return None
            visitor_id = claims.visitor_id
        else:
            visitor_id = new_visitor_id()
            token = self._tokens.mint(self.name, visitor_id)
        identity = normalize(IdentityKind.CHAT, visitor_id)
        name = hello.get("name") or f"Visitor {visitor_id[:6]}"
        conn = VisitorConnection(ws, visitor_id, identity, name)
        conn.claims = self._claims_from_hello(hello)
        try:
            await self._identify(conn)
        except StoreUnavailable:
            await self._refuse(ws, WSCloseCode.TRY_AGAIN_LATER, "unavailable", "try again shortly")
            return None
        except Exception:
            conn.log.exception("webchat.identify_failed")
            await self._refuse(ws, WSCloseCode.INTERNAL_ERROR, "internal", "try again later")
            return None
        # Filed before the replay is read, so nothing committed meanwhile slips between
        # the replay and the live stream (it waits in `held`; duplicates are harmless,
        # the widget de-duplicates by id).
        self._index.add(conn)
        conn.rebind(self.name)
        self._agents_online = online = await agents_online(self._app)
        welcome = {
            "type": "welcome",
            "token": token,
            "visitor_id": visitor_id,
            "agents_online": online,
            "offline_email": self.cfg.offline_email_channel is not None,
            "title": self.cfg.title,
            "max_message_chars": self.cfg.max_message_chars,
        }
        try:
            await ws.send_str(dumps(welcome))
            after = hello.get("last_event_id")
            for event in await self._replay(conn, after if isinstance(after, str) else None):
                if conn.mark_sent(event.id):
                    await ws.send_str(self._event_frame(event))
        except (ConnectionError, RuntimeError):
            self._index.remove(conn)
            return None
        except StoreUnavailable:
            self._index.remove(conn)
            await self._refuse(ws, WSCloseCode.TRY_AGAIN_LATER, "unavailable", "try again shortly")
            return None
        except Exception:
            self._index.remove(conn)
            conn.log.exception("webchat.replay_failed")
            await self._refuse(ws, WSCloseCode.INTERNAL_ERROR, "internal", "try again later")
            return None
        if not conn.go_live():
            self._evict(conn)
        conn.log.info("webchat.connected", resumed=hello.get("last_event_id") is not None)
        return conn

    def _claims_from_hello(self, hello: dict[str, Any]) -> Claims:
        claims = Claims()
        secret = self.cfg.identity_secret
        user_hash = hello.get("user_hash")
        user_id = hello.get("user_id")
        if user_id and vouched(secret, user_id, user_hash):
            claims.vouched.append(website_user_identity(self.name, user_id))
        email_text = hello.get("email")
        if email_text:
            try:
                email = normalize_email(email_text)
            except InvalidIdentity:
                email = None
            if email is not None:
                # The website's HMAC covers the address exactly as it sent it.
                verified = vouched(secret, email_text, user_hash) or vouched(
                    secret, email, user_hash
                )
                target = claims.vouched if verified else claims.unverified
                target.append(Identity(IdentityKind.EMAIL, email, verified=verified))
        return claims

    async def _identify(self, conn: VisitorConnection) -> None:
        """Resolve the visitor's customer and conversation, applying what can be applied."""
        store = self._store
        customer = await store.find_customer(conn.identity)
        conv = await current_conversation(store, customer.id) if customer else None
        conn.customer_id = customer.id if customer else None
        conn.conversation_id = conv.id if conv else None
        if conn.claims:
            await self._settle_claims(conn)

    async def _settle_claims(self, conn: VisitorConnection) -> None:
        """Apply identity claims and pending notes as far as the stored state allows.

        A vouched identity owned by another customer merges the visitor's customer into
        that owner (or, if the visitor has no record yet, joins the owner outright). An
        unverified claim is only ever recorded on the visitor's own customer.
        """
        store, claims = self._store, conn.claims
        remaining: list[Identity] = []
        for identity in claims.vouched:
            owner = await store.find_customer(identity)
            if owner is None:
                if conn.customer_id is None:
                    remaining.append(identity)
                else:
                    await self._link(conn, conn.customer_id, identity)
            elif owner.id == conn.customer_id:
                continue
            elif conn.customer_id is None:
                # No record of this visitor yet: its chat identity simply joins the owner.
                await self._link(conn, owner.id, conn.identity)
                await self._refile(conn, owner.id)
            elif not conn.merged:
                await self._merge_into(conn, owner.id)
            else:
                conn.log.warning("webchat.conflicting_claims", identity=identity.key)
        claims.vouched = remaining
        if conn.customer_id is not None:
            for identity in claims.unverified:
                await self._link(conn, conn.customer_id, identity)
            claims.unverified = []
        if conn.conversation_id is not None and claims.notes:
            for text in claims.notes:
                recorded = await store.append(
                    conn.conversation_id,
                    EventDraft(
                        kind=EventKind.NOTE,
                        direction=Direction.INTERNAL,
                        author=SYSTEM,
                        text=text,
                        data={"source": "webchat", "channel": self.name},
                    ),
                )
                await self._publish([recorded.event])
            claims.notes = []

    async def _link(self, conn: VisitorConnection, customer_id: str, identity: Identity) -> None:
        try:
            await self._store.link_identity(customer_id, identity)
        except StoreUnavailable:
            raise
        except IdentityConflict as exc:
            # Someone else got it meanwhile; a claim is never worth failing the chat.
            conn.log.warning("webchat.identity_conflict", identity=identity.key, owner=exc.owner_id)
        except StoreError as exc:
            conn.log.warning("webchat.link_refused", identity=identity.key, error=str(exc))
        else:
            conn.log.info(
                "webchat.identity_linked", identity=identity.key, verified=identity.verified
            )

    async def _merge_into(self, conn: VisitorConnection, owner_id: str) -> None:
        assert conn.customer_id is not None
        source = conn.customer_id
        try:
            recorded = await self._store.merge_customers(source, owner_id, actor=SYSTEM)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            conn.log.warning("webchat.merge_refused", target=owner_id, error=str(exc))
            return
        conn.merged = True
        if recorded.created:
            await self._publish([*recorded.side_events, recorded.event])
        conn.log.info("webchat.merged", source=source, target=owner_id)
        await self._refile(conn, owner_id)

    async def _refile(self, conn: VisitorConnection, customer_id: str) -> None:
        conv = await current_conversation(self._store, customer_id)
        self._index.move(conn, customer_id, conv.id if conv else None)
        conn.rebind(self.name)

    async def _replay(self, conn: VisitorConnection, after: str | None) -> list[Event]:
        """The visitor-visible events of its current conversation after `after`."""
        if conn.conversation_id is None:
            return []
        cursor = after if after is not None and is_id(after) else None
        visible: list[Event] = []
        fetched = 0
        while fetched < REPLAY_MAX:
            page = await self._store.events_after(conn.conversation_id, cursor, REPLAY_PAGE)
            visible.extend(e for e in page if customer_visible(e))
            fetched += len(page)
            if len(page) < REPLAY_PAGE:
                break
            cursor = page[-1].id
        return visible

    async def _read_loop(self, conn: VisitorConnection) -> None:
        async for msg in conn.ws:
            if msg.type is WSMsgType.ERROR:
                break
            try:
                if msg.type is not WSMsgType.TEXT:
                    raise FrameError("bad_frame", "frames must be JSON text")
                await self._on_frame(conn, msg.data)
            except FrameError as exc:
                conn.push(error_frame(exc.code, exc.message, exc.client_id))
            except StoreUnavailable:
                conn.push(error_frame("unavailable", "not stored, try again shortly"))
            except Exception:
                conn.log.exception("webchat.frame_failed")
                conn.push(error_frame("internal", "something went wrong, try again"))
            if conn.evicted:
                break

    async def _write_loop(self, conn: VisitorConnection) -> None:
        try:
            while (text := await conn.queue.get()) is not None:
                await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass  # the reader sees the socket close and cleans up

    def _evict(self, conn: VisitorConnection) -> None:
        if conn.evicted:
            return
        conn.evicted = True
        conn.log.warning("webchat.too_slow", queued=conn.queue.qsize())
        self._spawn(conn.ws.close(code=CLOSE_TOO_SLOW, message=b"too slow, reconnect"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- frames from the visitor ---------------------------------------------------

    async def _on_frame(self, conn: VisitorConnection, data: str) -> None:
        try:
            frame = load_frame(data)
        except ValueError:
            raise FrameError("bad_frame", "frames must be JSON objects") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise FrameError("bad_frame", 'frames must be JSON objects with a "type"')
        kind = frame["type"]
        if kind == "message":
            await self._on_message(conn, frame)
        elif kind == "typing":
            await self._on_typing(conn)
        elif kind == "contact":
            await self._on_contact(conn, frame)
        elif kind == "ping":
            conn.push({"type": "pong"})
        elif kind == "csat":
            await self._on_csat(conn, frame)
        elif kind == "hello":
            raise FrameError("bad_frame", "already greeted; reconnect to start over")
        else:
            raise FrameError("bad_frame", f"unknown frame type {kind[:40]!r}")

    async def _on_message(self, conn: VisitorConnection, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_id")
        if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
            raise FrameError("bad_frame", "client_id must be 1-64 characters of A-Z a-z 0-9 _ -")
        text = frame.get("text")
        if not isinstance(text, str):
            raise FrameError("bad_frame", "text must be a string", client_id)
        text = text.strip()
        if not text:
            raise FrameError("empty", "the message is empty", client_id)
        if len(text) > self.cfg.max_message_chars:
            raise FrameError(
                "too_long",
                f"messages are limited to {self.cfg.max_message_chars} characters",
                client_id,
            )
        if not self._limiter.take(conn.visitor_id):
            raise FrameError("rate_limited", "too many messages, wait a moment", client_id)
        recorded = await self._ingest(
            Inbound(
                channel=self.name,
                channel_type=ChannelType.WEBCHAT,
                external_id=f"{conn.visitor_id}:{client_id}",
                identity=conn.identity,
                text=text,
                display_name=conn.display_name,
            )
        )
        event = recorded.event
        if self._index.move(conn, event.customer_id, event.conversation_id):
            conn.rebind(self.name)
        if conn.claims:
            # Before the ack, so that an acknowledged visitor is also fully linked.
            try:
                await self._settle_claims(conn)
            except StoreUnavailable:
                conn.log.warning("webchat.claims_postponed")  # retried with the next message
        # Only now, with the event committed, may the visitor forget its copy.
        conn.push({"type": "ack", "client_id": client_id, "event_id": event.id})

    async def _on_typing(self, conn: VisitorConnection) -> None:
        now = time.monotonic()
        if conn.conversation_id is None or now - conn.last_typing < TYPING_MIN_INTERVAL:
            return  # nobody to tell yet, or told recently enough
        conn.last_typing = now
        await self._publish(
            [
                Signal(
                    kind="typing",
                    conversation_id=conn.conversation_id,
                    customer_id=conn.customer_id,
                    data={"from": "customer", "channel": self.name},
                )
            ]
        )

    async def _on_contact(self, conn: VisitorConnection, frame: dict[str, Any]) -> None:
        reply_channel = self.cfg.offline_email_channel
        if reply_channel is None:
            raise FrameError("unsupported", "this chat does not offer to continue by email")
        raw = frame.get("email")
        if not isinstance(raw, str):
            raise FrameError("bad_frame", "email must be a string")
        try:
            email = normalize_email(raw)
        except InvalidIdentity:
            raise FrameError("invalid_email", "that does not look like an email address") from None
        if not self._limiter.take(conn.visitor_id):
            raise FrameError("rate_limited", "too many requests, wait a moment")
        conn.claims.unverified.append(Identity(IdentityKind.EMAIL, email, verified=False))
        conn.claims.notes.append(
            f"The visitor asked to continue by email at {email} (not verified); "
            f"reply on channel {reply_channel}."
        )
        await self._settle_claims(conn)
        conn.push({"type": "contact_saved", "email": email})

    async def _on_csat(self, conn: VisitorConnection, frame: dict[str, Any]) -> None:
        if self.record_csat is None:
            raise FrameError("unsupported", "this chat does not ask for ratings")
        survey, score, comment = frame.get("survey"), frame.get("score"), frame.get("comment", "")
        if not isinstance(survey, str) or not is_id(survey):
            raise FrameError("bad_frame", "survey must be the id of the survey event")
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            raise FrameError("bad_frame", "score must be a whole number from 1 to 5")
        if not isinstance(comment, str) or len(comment) > self.cfg.max_message_chars:
            raise FrameError("bad_frame", "comment must be a string of limited length")
        if not self._limiter.take(conn.visitor_id):
            raise FrameError("rate_limited", "too many messages, wait a moment")
        answer = None
        if conn.customer_id is not None:
            answer = await self.record_csat(conn.customer_id, self.name, survey, score, comment)
        if answer is None:
            raise FrameError("csat_closed", "this survey is closed")
        conn.push({"type": "csat_saved", "survey": survey, "score": score})

    # --- fan-out from the bus ------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._subscription is not None
        sub = self._subscription
        async for item in sub:
            try:
                if isinstance(item, Event):
                    self._dispatch_event(item)
                elif isinstance(item, Signal):
                    self._dispatch_signal(item)
            except Exception:
                self._log.exception("webchat.dispatch_failed")
            if sub.dropped != self._dropped_seen:
                # The bus dropped items for us: every socket re-reads from the store.
                self._dropped_seen = sub.dropped
                self._spawn(self._resync_all())

    def _dispatch_event(self, event: Event) -> None:
        if event.kind is EventKind.MERGE:
            data = event.data
            affected = {event.customer_id, data.get("source"), data.get("target")}
            conns = {
                c for cid in affected if isinstance(cid, str) for c in self._index.of_customer(cid)
            }
            if conns:
                self._spawn(self._reresolve(conns))
            return
        if not customer_visible(event):
            return
        conns = self._index.of_customer(event.customer_id)
        if not conns:
            return
        text = self._event_frame(event)
        for conn in conns:
            if event.conversation_id and event.id > conn.last_event_id:
                # A new message in another conversation (a reopened or new one): follow it.
                if self._index.move(conn, conn.customer_id, event.conversation_id):
                    conn.rebind(self.name)
            if not conn.push_event(text, event.id):
                self._evict(conn)

    def _dispatch_signal(self, signal: Signal) -> None:
        if signal.kind == "typing" and signal.data.get("from") == "agent":
            conns = set(self._index.of_conversation(signal.conversation_id))
            conns.update(self._index.of_customer(signal.customer_id))
            for conn in conns:
                if not conn.push({"type": "typing", "from": "agent"}):
                    self._evict(conn)
        elif signal.kind == "queue_position" and signal.conversation_id:
            frame = {
                "type": "queue",
                "position": signal.data.get("position"),
                "estimated_wait_seconds": signal.data.get("estimated_wait_seconds"),
            }
            for conn in tuple(self._index.of_conversation(signal.conversation_id)):
                if not conn.push(frame):
                    self._evict(conn)
        elif signal.kind == "presence" and self._index.all:
            self._spawn(self._announce_presence())

    async def _announce_presence(self) -> None:
        online = await agents_online(self._app)
        if online is None or online == self._agents_online:
            return
        self._agents_online = online
        text = dumps({"type": "agents", "online": online})
        for conn in tuple(self._index.all):
            if not conn.push_text(text):
                self._evict(conn)

    async def _reresolve(self, conns: Iterable[VisitorConnection]) -> None:
        """After a merge or unmerge: find each visitor's customer again, show its history."""
        for conn in conns:
            if conn not in self._index.all:
                continue
            customer = await self._store.find_customer(conn.identity)
            conv = await current_conversation(self._store, customer.id) if customer else None
            changed_conv = conv is not None and conv.id != conn.conversation_id
            if self._index.move(conn, customer.id if customer else None, conv.id if conv else None):
                conn.rebind(self.name)
                conn.log.info("webchat.refiled")
            if changed_conv:
                await self._push_missing(conn, None)

    async def _resync_all(self) -> None:
        for conn in tuple(self._index.all):
            if conn.conversation_id is not None:
                await self._push_missing(conn, conn.last_event_id or None)

    async def _push_missing(self, conn: VisitorConnection, after: str | None) -> None:
        for event in await self._replay(conn, after):
            if not conn.push_event(self._event_frame(event), event.id):
                self._evict(conn)
                return

    def _event_frame(self, event: Event) -> str:
        body: dict[str, Any] = {
            "id": event.id,
            "direction": event.direction.value,
            "text": event.text,
            "created_at": iso(event.created_at),
        }
        name = self._author_name(event.author)
        if name:
            body["author_name"] = name
        if "csat_request" in event.data and event.direction is Direction.OUT:
            body["csat"] = {"survey": event.id, "scale": 5}
        if (
            event.direction is Direction.IN
            and event.channel_type is ChannelType.WEBCHAT
            and event.external_id
        ):
            # Lets the widget match its own pending message even before the ack.
            body["client_id"] = event.external_id.partition(":")[2]
        return dumps({"type": "event", "event": body})

    def _author_name(self, author: str) -> str | None:
        kind, _, agent_id = author.partition(":")
        if kind != "agent":
            return None
        try:
            return self.config.agent(agent_id).name
        except KeyError:
            return None

    # --- services --------------------------------------------------------------------

    @property
    def _store(self) -> TimelineStore:
        assert self._services is not None
        return self._services.store

    async def _ingest(self, inbound: Inbound) -> Any:
        assert self._services is not None
        return await self._services.ingestor.ingest(inbound)

    async def _publish(self, items: list[Any]) -> None:
        assert self._services is not None
        await self._services.bus.publish(items)


def website_user_identity(channel: str, user_id: str) -> Identity:
    """The chat identity of a website's logged-in user, scoped to the channel.

    Hashed because website user ids are arbitrary text while chat identities are short
    and URL-safe; the same user on another device resolves to the same customer.
    """
    digest = hashlib.sha256(f"{channel}\x00{user_id}".encode()).hexdigest()[:40]
    return normalize(IdentityKind.CHAT, f"u-{digest}")


def parse_hello(msg: Any) -> dict[str, Any]:
    """The first frame, validated: field types and sizes, nothing else."""
    if msg.type is not WSMsgType.TEXT:
        raise FrameError("hello_required", "the first frame must be a JSON hello")
    try:
        frame = load_frame(msg.data)
    except ValueError:
        raise FrameError("hello_required", "the first frame must be a JSON hello") from None
    if not isinstance(frame, dict) or frame.get("type") != "hello":
        raise FrameError("hello_required", 'the first frame must be {"type": "hello", ...}')
    limits = {
        "token": 512,
        "last_event_id": 64,
        "name": MAX_NAME_CHARS,
        "email": 254,
        "user_id": MAX_USER_ID_CHARS,
        "user_hash": 128,
    }
    hello: dict[str, Any] = {}
    for key, limit in limits.items():
        value = frame.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > limit:
            raise FrameError("bad_frame", f"{key} must be a string of at most {limit} characters")
        value = value.strip()
        if value:
            hello[key] = value
    return hello


async def current_conversation(store: TimelineStore, customer_id: str) -> Conversation | None:
    """The customer's active conversation, else the one with the latest activity."""
    conv = await store.active_conversation(customer_id)
    if conv is not None:
        return conv
    page = await store.list_conversations(ConversationQuery(customer_id=customer_id), limit=1)
    return page.items[0] if page.items else None


# --- the widget script and the demo page -----------------------------------------------


def shared_routes(config: Config) -> list[web.RouteDef]:
    """`GET /widget.js` and `GET /demo`, added once by the app when any webchat exists."""
    webchats = [c for c in config.channels if c.type == ChannelType.WEBCHAT]
    if not webchats:
        return []
    script = (STATIC_DIR / "widget.js").read_bytes()
    first = webchats[0]
    page = (
        (STATIC_DIR / "demo.html")
        .read_text(encoding="utf-8")
        .replace("{{channel}}", html.escape(first.name, quote=True))
        .replace("{{title}}", html.escape(getattr(first, "title", "Chat with us"), quote=True))
    )

    async def widget_js(request: web.Request) -> web.Response:
        return web.Response(
            body=script,
            content_type="application/javascript",
            charset="utf-8",
            headers={
                "Cache-Control": "public, max-age=300",
                "X-Content-Type-Options": "nosniff",
                # Any website may embed the widget; it carries no secrets.
                "Cross-Origin-Resource-Policy": "cross-origin",
            },
        )

    async def demo(request: web.Request) -> web.Response:
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'self'; connect-src 'self'; "
                    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
                    "form-action 'none'; frame-ancestors 'none'"
                ),
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    return [web.get("/widget.js", widget_js), web.get("/demo", demo)]
