"""Agent presence: who is online, away or offline, as agents and their sockets say.

In memory and per process. Several hub processes share presence through the bus: each
registry has an `origin` (this process's name) and tells its listener, with every
change, what other processes need to weigh it (`PresenceDetails`: its origin, the
agent's connections here, and the agent's choice when the change was their own act);
the router (hub/routing/cluster.py) merges what every process says. The methods are
async so that a shared implementation can keep the same interface.

Two sources decide presence: the agent's own choice (the switch in the inbox page) and
their realtime connections. Opening the inbox makes an agent online unless they chose
away/offline; when their last socket closes they turn away only after a grace period,
so a page reload or a brief network drop does not bounce their conversations.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from hub.model import Presence

log = structlog.get_logger(__name__)

DEFAULT_AWAY_GRACE_SECONDS = 60.0

# What goes with a change for other hub processes: {"origin", "connections"}, plus
# "choice" when the agent acted (the switch, signing out): the presence they chose, or
# None for "follow my connections" (choosing online, signing out).
PresenceDetails = dict[str, Any]
PresenceListener = Callable[[str, Presence, PresenceDetails], Awaitable[None]]


class PresenceRegistry:
    def __init__(
        self,
        *,
        grace_seconds: float = DEFAULT_AWAY_GRACE_SECONDS,
        on_change: PresenceListener | None = None,
        origin: str | None = None,
    ) -> None:
        self.grace_seconds = grace_seconds
        # Names this process (this app) in what it announces: who says an agent is online.
        self.origin = origin or secrets.token_hex(6)
        self._on_change = on_change
        self._presence: dict[str, Presence] = {}
        # What the agent picked themselves; None means "follow my connections".
        self._chosen: dict[str, Presence] = {}
        self._connections: dict[str, int] = {}
        self._away_timers: dict[str, asyncio.Task[None]] = {}

    # --- what a router reads --------------------------------------------------------

    async def get(self, agent_id: str) -> Presence:
        return self._presence.get(agent_id, Presence.OFFLINE)

    async def online_agents(self) -> tuple[str, ...]:
        return tuple(a for a, p in self._presence.items() if p is Presence.ONLINE)

    def connected_agents(self) -> tuple[str, ...]:
        """Agents with a live connection to this process."""
        return tuple(self._connections)

    def connections(self, agent_id: str) -> int:
        return self._connections.get(agent_id, 0)

    # --- what changes it ------------------------------------------------------------

    async def set(self, agent_id: str, presence: Presence, *, chosen: bool = True) -> None:
        """Set presence; `chosen` records it as the agent's own choice (the switch)."""
        if chosen:
            if presence is Presence.ONLINE:
                self._chosen.pop(agent_id, None)
            else:
                self._chosen[agent_id] = presence
        # A choice is announced even when this process already thought so: another
        # process may have said otherwise since (the agent's last word wins).
        await self._apply(agent_id, presence, act=chosen)

    async def connected(self, agent_id: str) -> None:
        self._cancel_timer(agent_id)
        count = self._connections.get(agent_id, 0) + 1
        self._connections[agent_id] = count
        if count == 1:
            await self._apply(agent_id, self._chosen.get(agent_id, Presence.ONLINE))

    async def disconnected(self, agent_id: str) -> None:
        count = self._connections.get(agent_id, 0) - 1
        if count > 0:
            self._connections[agent_id] = count
            return
        self._connections.pop(agent_id, None)
        if await self.get(agent_id) is Presence.ONLINE:
            self._away_timers[agent_id] = asyncio.create_task(
                self._away_after_grace(agent_id), name=f"presence-away:{agent_id}"
            )

    async def signed_out(self, agent_id: str) -> None:
        """The agent logged out: offline at once unless another session is connected."""
        if self.connections(agent_id) == 0:
            self._cancel_timer(agent_id)
            self._chosen.pop(agent_id, None)
            await self._apply(agent_id, Presence.OFFLINE, act=True)

    async def close(self) -> None:
        for agent_id in list(self._away_timers):
            self._cancel_timer(agent_id)

    # --- internals ------------------------------------------------------------------

    async def _away_after_grace(self, agent_id: str) -> None:
        await asyncio.sleep(self.grace_seconds)
        self._away_timers.pop(agent_id, None)
        if self.connections(agent_id) == 0 and await self.get(agent_id) is Presence.ONLINE:
            await self._apply(agent_id, Presence.AWAY)

    def _cancel_timer(self, agent_id: str) -> None:
        task = self._away_timers.pop(agent_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _apply(self, agent_id: str, presence: Presence, *, act: bool = False) -> None:
        """`act`: the agent's own doing, announced even if this process saw no change."""
        previous = self._presence.get(agent_id, Presence.OFFLINE)
        self._presence[agent_id] = presence
        if previous is presence and not act:
            return
        log.info("presence.changed", agent=agent_id, presence=presence.value)
        if self._on_change is not None:
            # A listener failing (bus down) must not undo the change or fail the caller.
            try:
                details: PresenceDetails = {
                    "origin": self.origin,
                    "connections": self.connections(agent_id),
                }
                if act:
                    chosen = self._chosen.get(agent_id)
                    details["choice"] = chosen.value if chosen is not None else None
                await self._on_change(agent_id, presence, details)
            except Exception:
                log.exception("presence.listener_failed", agent=agent_id)


# Where the app keeps the registry. Named PRESENCE_KEY because the web chat channel finds
# it by that name (without importing the inbox) to tell visitors whether anyone is online.
PRESENCE_KEY = web.AppKey("inbox_presence", PresenceRegistry)
