"""What lets several hub processes on one store route as one.

- **One leader.** The router's decisions run in one process at a time, the holder of the
  store's lease "router" (`GuardedLease` around `TimelineStore.lease`). Every other
  process only listens. With SQLite (one process) the lease is local and always won.
- **A write guard.** A leader whose lease may have run out must not write: it could be
  deposed already. `GuardedLease.held()` says whether the lease is surely still ours
  (the time an acquire or renewal was *sent*, plus the TTL, less a margin), and the
  service checks it before every write and bus message it makes (`NotLeader`).
- **Shared presence.** Each process's presence registry announces changes on the bus
  with its `origin` (and the agent's connections there, and their choice when they
  acted), and every process publishes a snapshot of who is online and connected in it
  every few seconds. `PresenceBook` merges what every process says (see its rule); a
  process that fell silent (crashed) is forgotten, along with whatever it said: its
  agents' sockets died with it.
- **Requests to the leader.** Accept, decline and "who takes this call" may arrive at
  any process; a process that does not lead publishes a `route_request` signal and
  waits (bounded) for the leader's `route_reply` (`Requests`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hub.bus import Bus, Signal
from hub.lease import Lease

# Bus signals between hub processes (not for people; sockets may ignore them).
# data: agent_id, presence, origin, connections[, choice] (the inbox's own signal)
PRESENCE = "presence"
PRESENCE_SNAPSHOT = "presence_snapshot"  # data: origin, online, connected (agent ids)
PRESENCE_GONE = "presence_gone"  # data: origin (that process is shutting down)
ROUTE_REQUEST = "route_request"  # data: request_id, origin, op, conversation_id, ...
ROUTE_REPLY = "route_reply"  # data: request_id, origin (the asker), ok, error, agent_id
INTERNAL_SIGNALS = frozenset({PRESENCE_SNAPSHOT, PRESENCE_GONE, ROUTE_REQUEST, ROUTE_REPLY})
CLUSTER_SIGNALS = INTERNAL_SIGNALS | {PRESENCE}

LEASE_NAME = "router"


@dataclass(frozen=True, slots=True)
class RoutingTiming:
    """How fast the processes notice each other. Tests shorten all of it."""

    lease_seconds: float = 6.0  # a dead leader is replaced within about this (+ a renewal)
    heartbeat_seconds: float = 2.0  # how often each process says who is online in it
    # A process silent this long is taken for dead (default: three heartbeats and a half).
    presence_expiry_seconds: float | None = None
    request_timeout_seconds: float = 5.0  # accept/decline forwarded to the leader
    call_timeout_seconds: float = 3.0  # a caller waits for our TwiML meanwhile

    @property
    def renew_every(self) -> float:
        return self.lease_seconds / 3

    @property
    def expiry(self) -> float:
        if self.presence_expiry_seconds is not None:
            return self.presence_expiry_seconds
        return self.heartbeat_seconds * 3.5


def new_origin() -> str:
    """A name for one hub process (one app): unique across restarts and hosts."""
    return secrets.token_hex(6)


class NotLeader(Exception):
    """This process may no longer hold the router's lease: it must not write."""


class RouterUnavailable(Exception):
    """The leader did not answer a forwarded request in time (none yet, or taking over)."""


class GuardedLease:
    """A lease that knows until when it is surely still held.

    Redis counts a lease's TTL from when it got the command; this side counts from
    before sending it, so `held()` turns false before the key can expire, by `margin`
    seconds at least: room for the last write to reach the store.
    """

    def __init__(
        self, inner: Lease, margin: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.owner = inner.owner
        self.ttl_seconds = inner.ttl_seconds
        self._margin = margin
        self._clock = clock
        self._until = 0.0

    def held(self) -> bool:
        return self._clock() < self._until

    async def acquire(self) -> bool:
        return self._noted(self._clock(), await self.inner.acquire())

    async def renew(self) -> bool:
        # An exception (store unreachable) leaves the bound as it was: still true.
        return self._noted(self._clock(), await self.inner.renew())

    async def release(self) -> None:
        self._until = 0.0
        await self.inner.release()

    def _noted(self, sent: float, ok: bool) -> bool:
        self._until = sent + self.ttl_seconds - self._margin if ok else 0.0
        return ok


Changes = list[tuple[str, bool]]  # (agent, online now)


@dataclass(frozen=True, slots=True)
class Word:
    """What one process last said about one agent."""

    online: bool
    connected: bool  # the agent has a live connection to that process
    seq: int  # when the book read it (the bus gives every process the same order)


class PresenceBook:
    """Who is online, as every hub process says; see the module docstring.

    Per agent, each process's latest word and the agent's latest own choice (wherever
    they made it). An agent is online when:
    1. their latest choice is not away/offline (the switch holds in every process), and
    2. some process where they are connected says online (a page reload that lands on
       another process must not lose them to the first one's "gone away"), or else
       the newest word of all says online (the switch flipped on a process they have
       no connection to, connections lost everywhere).
    Methods return the agents whose effective presence changed.
    """

    def __init__(
        self,
        own_origin: str,
        *,
        expire_after: float | None,
        known: Callable[[str], bool] = lambda _agent: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.own_origin = own_origin
        self._expire_after = expire_after
        self._known = known
        self._clock = clock
        self._words: dict[str, dict[str, Word]] = {}  # agent -> origin -> word
        self._away_by_choice: set[str] = set()
        self._heard: dict[str, float] = {}  # origin -> when it last said anything
        self._seq = 0

    def is_online(self, agent_id: str) -> bool:
        if agent_id in self._away_by_choice:
            return False
        words = self._words.get(agent_id)
        if not words:
            return False
        if any(w.online and w.connected for w in words.values()):
            return True
        return max(words.values(), key=lambda w: w.seq).online

    def online(self) -> tuple[str, ...]:
        return tuple(a for a in self._words if self.is_online(a))

    def report(self, origin: str, agent_id: str, data: Mapping[str, Any]) -> Changes:
        """One process announced a presence change (the inbox's presence signal)."""
        if origin:  # any word shows the process alive (unnamed ones never expire)
            self._heard[origin] = self._clock()
        if not self._known(agent_id):
            return []
        before = self.is_online(agent_id)
        self._seq += 1
        online = data.get("presence") == "online"
        connections = data.get("connections")
        # Without a count (an older hub), take an online word as backed by a connection.
        connected = connections > 0 if isinstance(connections, int) else online
        self._words.setdefault(agent_id, {})[origin] = Word(online, connected, self._seq)
        if "choice" in data:  # the agent's own act
            if data["choice"] in ("away", "offline"):
                self._away_by_choice.add(agent_id)
            else:
                self._away_by_choice.discard(agent_id)
        return self._diff({agent_id: before})

    def snapshot(
        self, origin: str, online: Iterable[str], connected: Iterable[str] = ()
    ) -> Changes:
        """A process says who is online in it now, and who is connected to it (anyone
        else: not, in its view). A word whose online-ness did not change keeps its
        age: a snapshot is a catch-up, not news."""
        self._heard[origin] = self._clock()
        now_online = {a for a in online if self._known(a)}
        now_connected = {a for a in connected if self._known(a)}
        before: dict[str, bool] = {}
        mentioned = now_online | now_connected
        for agent_id in mentioned | {a for a, w in self._words.items() if origin in w}:
            words = self._words.setdefault(agent_id, {})
            word = words.get(origin)
            says = agent_id in now_online
            conn = agent_id in now_connected
            if word is not None and (word.online, word.connected) == (says, conn):
                continue
            if word is None and not says and not conn:
                continue
            before[agent_id] = self.is_online(agent_id)
            if word is not None and word.online == says:
                words[origin] = Word(says, conn, word.seq)
            else:
                self._seq += 1
                words[origin] = Word(says, conn, self._seq)
        return self._diff(before)

    def forget(self, origin: str) -> Changes:
        """A process is gone: whatever it said no longer holds (the agents' choices do)."""
        self._heard.pop(origin, None)
        before: dict[str, bool] = {}
        for agent_id, words in self._words.items():
            if origin in words:
                before[agent_id] = self.is_online(agent_id)
                del words[origin]
        return self._diff(before)

    def expire(self) -> Changes:
        """Forget the processes that fell silent (crashed, cut off)."""
        if self._expire_after is None:
            return []
        deadline = self._clock() - self._expire_after
        changes: Changes = []
        for origin, heard in list(self._heard.items()):
            if heard < deadline and origin != self.own_origin:
                changes += self.forget(origin)
        return changes

    def _diff(self, before: Mapping[str, bool]) -> Changes:
        return [(a, now) for a, was in before.items() if (now := self.is_online(a)) != was]


class Requests:
    """Questions to the leader over the bus, each answered by one `route_reply`."""

    def __init__(self, bus: Bus, origin: str) -> None:
        self._bus = bus
        self.origin = origin
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def ask(self, op: str, wait: float, **data: Any) -> dict[str, Any]:
        """The leader's reply; RouterUnavailable if none came within `wait` seconds."""
        request_id = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._bus.publish(
                [
                    Signal(
                        kind=ROUTE_REQUEST,
                        data={"request_id": request_id, "origin": self.origin, "op": op, **data},
                    )
                ]
            )
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            raise RouterUnavailable(f"no answer from the router to {op} in {wait} s") from None
        finally:
            self._waiting.pop(request_id, None)

    def answered(self, reply: Signal) -> None:
        if reply.data.get("origin") != self.origin:
            return
        future = self._waiting.get(str(reply.data.get("request_id")))
        if future is not None and not future.done():
            future.set_result(dict(reply.data))


def reply_to(request: Signal, **data: Any) -> Signal:
    return Signal(
        kind=ROUTE_REPLY,
        data={
            "request_id": request.data.get("request_id"),
            "origin": request.data.get("origin"),
            **data,
        },
    )


__all__ = [
    "CLUSTER_SIGNALS",
    "INTERNAL_SIGNALS",
    "GuardedLease",
    "NotLeader",
    "PresenceBook",
    "Requests",
    "RouterUnavailable",
    "RoutingTiming",
    "new_origin",
    "reply_to",
]
