"""The agents' WebSocket: live events, conversation changes and collision notices.

The bus only rings the doorbell; the store is the record. A socket that fell behind
(its bus queue overflowed) is told to resync, and a client that reconnects asks for
what it missed with `resume`, answered from the store. Because a live event may also be
part of a replay, each socket remembers what it sent and never sends the same event
state twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from hub.bus import Bus, BusItem, Signal, Subscription
from hub.ids import is_id
from hub.inbox.auth import Session, TokenService
from hub.inbox.presence import PresenceRegistry
from hub.model import DeliveryState, Event, event_to_dict
from hub.routing.cluster import INTERNAL_SIGNALS
from hub.timeline.store import StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

# Application close codes (4000-4999): the client shows "signed out" rather than retrying.
CLOSE_SIGNED_OUT = 4401

# Collision notices the client may send; others are refused with an error frame.
CLIENT_SIGNALS = ("viewing", "typing")
# A replay longer than this is cheaper as a refetch of the conversation.
MAX_REPLAY = 5_000
REPLAY_PAGE = 500
REMEMBERED_EVENTS = 10_000

_DELIVERY_RANK = {
    None: 0,
    DeliveryState.QUEUED: 1,
    DeliveryState.SENT: 2,
    DeliveryState.DELIVERED: 3,
    DeliveryState.UNDELIVERED: 3,
    DeliveryState.FAILED: 3,
}


@dataclass(frozen=True, slots=True)
class SocketSettings:
    heartbeat: float = 30.0
    queue_size: int = 1000
    max_message_bytes: int = 64 * 1024
    # How often an open socket re-checks its token (expiry, logout in another process).
    recheck_seconds: float = 60.0
    # Collision notices per socket: a burst allowance, refilled per second.
    signal_burst: int = 20
    signals_per_second: float = 5.0


class SignalBudget:
    """Token bucket: typing notices are chatty, and every one fans out to every agent."""

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# Signals addressed to one agent (data["agent_id"]); other agents never see them.
PERSONAL_SIGNALS = frozenset({"offer", "offer_ended", "assigned"})


def signal_frame(signal: Signal) -> dict[str, Any]:
    if signal.kind == "conversation" and "conversation" in signal.data:
        return {"type": "conversation", "conversation": signal.data["conversation"]}
    if signal.kind == "customer" and "customer" in signal.data:
        return {"type": "customer", "customer": signal.data["customer"]}
    return {
        **signal.data,
        "type": "signal",
        "kind": signal.kind,
        "conversation_id": signal.conversation_id,
        "customer_id": signal.customer_id,
    }


class AgentConnection:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        session: Session,
        store: TimelineStore,
        bus: Bus,
        settings: SocketSettings,
    ) -> None:
        self.ws = ws
        self.session = session
        self._store = store
        self._bus = bus
        self._settings = settings
        # Held while sending, and for a whole replay, so live events wait their turn and
        # the client sees a replay in order.
        self._send_lock = asyncio.Lock()
        self._sent: OrderedDict[str, tuple[DeliveryState | None, str | None]] = OrderedDict()
        self._dropped_seen = 0
        self._known_conversations: dict[str, str] = {}
        self._budget = SignalBudget(settings.signal_burst, settings.signals_per_second)
        # Set once the socket is fully gone (presence updated): sign-out waits for it.
        self.finished = asyncio.Event()
        self.log = log.bind(agent=session.agent.id)

    # --- server -> client -----------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame, separators=(",", ":")))

    def _is_news(self, event: Event) -> bool:
        """False when this socket already sent this event in this (or a later) state."""
        seen = self._sent.get(event.id)
        if seen is not None:
            state, error = seen
            if (state, error) == (event.delivery_state, event.delivery_error):
                return False
            # Callbacks and replays interleave: never step a delivery state backwards.
            if _DELIVERY_RANK[event.delivery_state] < _DELIVERY_RANK[state]:
                return False
        self._sent[event.id] = (event.delivery_state, event.delivery_error)
        self._sent.move_to_end(event.id)
        while len(self._sent) > REMEMBERED_EVENTS:
            self._sent.popitem(last=False)
        return True

    async def _send_event(self, event: Event) -> bool:
        if not self._is_news(event):
            return False
        await self.send({"type": "event", "event": event_to_dict(event)})
        return True

    async def forward(self, item: BusItem, dropped: int) -> None:
        async with self._send_lock:
            if dropped != self._dropped_seen:
                self._dropped_seen = dropped
                self.log.info("agent_ws.resync", dropped=dropped)
                await self.send({"type": "resync"})
            if isinstance(item, Event):
                await self._send_event(item)
                return
            if item.kind in CLIENT_SIGNALS and item.data.get("agent_id") == self.session.agent.id:
                return  # "you are viewing this" is noise, even from your other tab
            if item.kind in INTERNAL_SIGNALS:
                return  # the processes' own routing chatter, nothing an agent shows
            if item.kind in PERSONAL_SIGNALS and item.data.get("agent_id") != self.session.agent.id:
                return  # an offer or a hand-over (with its timeline page) is one agent's business
            await self.send(signal_frame(item))

    # --- client -> server -----------------------------------------------------------

    async def handle_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # integers past 4300 digits, deep nesting
            await self.send({"type": "error", "error": "frames must be JSON objects"})
            return
        if not isinstance(message, dict):
            await self.send({"type": "error", "error": "frames must be JSON objects"})
            return
        kind = message.get("type")
        if kind == "resume":
            await self._resume(message)
        elif kind in CLIENT_SIGNALS:
            await self._collision_notice(str(kind), message)
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            await self.send({"type": "error", "error": f"unknown message type {kind!r}"})

    async def _customer_of(self, conversation_id: object) -> str | None:
        """The customer of a conversation the client named, or None (error sent)."""
        if not isinstance(conversation_id, str) or not is_id(conversation_id):
            await self.send({"type": "error", "error": "conversation_id: not a conversation id"})
            return None
        known = self._known_conversations.get(conversation_id)
        if known is not None:
            return known
        conversation = await self._store.get_conversation(conversation_id)
        if conversation is None:
            await self.send({"type": "error", "error": f"no such conversation: {conversation_id}"})
            return None
        # Merges may move a conversation to another customer: a small, bounded cache.
        if len(self._known_conversations) >= 1_000:
            self._known_conversations.clear()
        self._known_conversations[conversation_id] = conversation.customer_id
        return conversation.customer_id

    async def _resume(self, message: dict[str, Any]) -> None:
        conversation_id = message.get("conversation_id")
        after = message.get("after")
        if after is not None and (not isinstance(after, str) or not is_id(after)):
            await self.send({"type": "error", "error": "after: must be an event id or null"})
            return
        if await self._customer_of(conversation_id) is None:
            return
        assert isinstance(conversation_id, str)
        async with self._send_lock:
            cursor: str | None = after
            replayed = 0
            while True:
                batch = await self._store.events_after(conversation_id, cursor, REPLAY_PAGE)
                for event in batch:
                    if await self._send_event(event):
                        replayed += 1
                if batch:
                    cursor = batch[-1].id
                if len(batch) < REPLAY_PAGE:
                    break
                if replayed >= MAX_REPLAY:
                    # Too far behind to catch up event by event: refetch is cheaper.
                    await self.send({"type": "resync", "conversation_id": conversation_id})
                    break
            await self.send(
                {
                    "type": "resumed",
                    "conversation_id": conversation_id,
                    "last_event_id": cursor,
                    "replayed": replayed,
                }
            )

    async def _collision_notice(self, kind: str, message: dict[str, Any]) -> None:
        conversation_id = message.get("conversation_id")
        active = message.get("active", True)
        if not isinstance(active, bool):
            await self.send({"type": "error", "error": "active: must be true or false"})
            return
        if not self._budget.take():
            return  # quietly shed: a lost "typing" is harmless, a flood is not
        customer_id = await self._customer_of(conversation_id)
        if customer_id is None:
            return
        agent = self.session.agent
        data: dict[str, Any] = {"agent_id": agent.id, "agent_name": agent.name, "active": active}
        if kind == "typing" and active:
            # The web chat widget shows "agent is typing" for signals marked from an agent.
            data["from"] = "agent"
        await self._bus.publish(
            [
                Signal(
                    kind=kind,
                    conversation_id=str(conversation_id),
                    customer_id=customer_id,
                    data=data,
                )
            ]
        )


class AgentSockets:
    """All agents' sockets of this process: serves them, and closes them on sign-out."""

    def __init__(
        self,
        store: TimelineStore,
        bus: Bus,
        presence: PresenceRegistry,
        tokens: TokenService,
        settings: SocketSettings | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._presence = presence
        self._tokens = tokens
        self.settings = settings or SocketSettings()
        self._open: set[AgentConnection] = set()

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def serve(self, request: web.Request, session: Session) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat, max_msg_size=self.settings.max_message_bytes
        )
        if not request.headers.get("Sec-WebSocket-Key", "").isascii():
            # aiohttp's handshake base64-decodes the key and lets the ValueError escape.
            raise web.HTTPBadRequest(text="Sec-WebSocket-Key is not base64")
        await ws.prepare(request)
        # Subscribe before saying hello: anything stored from here on reaches this socket
        # live, and anything before it is what `resume` is for.
        sub = self._bus.subscribe(f"agent-ws:{session.agent.id}", self.settings.queue_size)
        conn = AgentConnection(ws, session, self._store, self._bus, self.settings)
        self._open.add(conn)
        await self._presence.connected(session.agent.id)
        conn.log.info("agent_ws.open")
        pump = asyncio.create_task(self._pump(conn, sub), name="agent-ws-pump")
        watch = asyncio.create_task(self._watch_token(conn), name="agent-ws-token")
        try:
            await conn.send(
                {"type": "hello", "agent_id": session.agent.id, "name": session.agent.name}
            )
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._handle(conn, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await conn.send({"type": "error", "error": "send JSON text frames"})
                elif msg.type is WSMsgType.ERROR:
                    break
        except ConnectionResetError:
            pass
        finally:
            sub.close()
            for task in (pump, watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._open.discard(conn)
            await self._presence.disconnected(session.agent.id)
            conn.finished.set()
            conn.log.info("agent_ws.closed", code=ws.close_code)
            if not ws.closed:
                await ws.close()
        return ws

    async def _handle(self, conn: AgentConnection, text: str) -> None:
        # One bad moment (store briefly down) must cost one answer, not the whole socket.
        try:
            await conn.handle_text(text)
        except ConnectionResetError:
            raise
        except StoreUnavailable:
            await conn.send({"type": "error", "error": "storage unavailable, retry shortly"})
        except Exception:
            conn.log.exception("agent_ws.frame_failed")
            await conn.send({"type": "error", "error": "internal error"})

    async def _pump(self, conn: AgentConnection, sub: Subscription) -> None:
        try:
            async for item in sub:
                await conn.forward(item, sub.dropped)
        except ConnectionResetError:
            pass
        except Exception:
            conn.log.exception("agent_ws.pump_failed")
        # The feed ended (bus closed, socket broken): a socket without it would look live
        # but show nothing, so end it and let the client reconnect and resume.
        if not conn.ws.closed:
            await conn.ws.close(code=WSCloseCode.GOING_AWAY)

    async def _watch_token(self, conn: AgentConnection) -> None:
        while True:
            await asyncio.sleep(self.settings.recheck_seconds)
            try:
                session = await self._tokens.session(conn.session.token_digest)
            except StoreUnavailable:
                continue  # unknown is not signed out: check again next time
            if session is None:
                await conn.ws.close(code=CLOSE_SIGNED_OUT, message=b"signed out")
                return

    async def close_token(self, digest: str) -> None:
        """Close this token's sockets and wait until they are gone (presence included)."""
        closing = [c for c in self._open if c.session.token_digest == digest]
        for conn in closing:
            await conn.ws.close(code=CLOSE_SIGNED_OUT, message=b"signed out")
        for conn in closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.finished.wait(), timeout=5)

    async def close_all(self) -> None:
        for conn in list(self._open):
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
