"""Routing state: loads, holdings (assignments and offers), the waiting queue, and the
indexes that keep every routing decision cheap with thousands of agents and waiters.

One process, in memory. At start the service rebuilds it from the store's active
conversations (the store is the record; this is a cache with indexes). Nothing here
decides anything: the router (hub/routing/router.py) reads and changes it.

Indexes, and why:
- Pools: per (queue, channel type), a heap of the agents who could take work there
  right now, ranked by the queue's strategy. Without it a decision scans every agent
  (milliseconds with 10,000); with it a decision pops one heap top.
- Buckets: per (queue, channel type), a heap of waiting tickets ordered by (priority
  desc, arrival asc). When an agent frees a slot the router looks at a handful of heads.
Both heaps delete lazily: an entry is live only while it matches the current version
of its agent (or the current entry id of its ticket), and stale entries are dropped when
they surface or when a heap grows to several times its live size.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hub.config import QueueConfig
from hub.routing.rules import (
    CHANNEL_TYPES,
    VOICE,
    WEBCHAT,
    AgentProfile,
    AgentStats,
    StrategyKey,
    eligible,
    strategy_key,
)

Pool = tuple[str, str]  # (queue name, channel type)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A conversation looking for an agent, or held by one (then kept in its Holding)."""

    conversation_id: str
    customer_id: str
    channel: str
    channel_type: str
    queue: str
    priority: int  # effective: the conversation's own plus its queue's
    arrival: float  # epoch seconds when it started waiting; kept across requeues
    seq: int  # tie-breaker for equal arrivals, in the order tickets were made
    base_priority: int = 0  # the conversation's own, to recompute on escalation
    sticky_agent: str | None = None
    excluded: frozenset[str] = frozenset()  # agents who declined or let an offer lapse
    misses: int = 0

    @property
    def order(self) -> tuple[int, float, int]:
        return (-self.priority, self.arrival, self.seq)


@dataclass(frozen=True, slots=True)
class Holding:
    """A conversation an agent holds: assigned, or offered and awaiting an answer."""

    ticket: Ticket
    agent_id: str
    offered: bool
    since: float
    expires_at: float | None = None  # offers only
    serial: int = 0  # tells one offer's deadline from a later offer's at the same time


@dataclass(slots=True)
class _Bucket:
    heap: list[tuple[tuple[int, float, int], int, str]] = field(default_factory=list)
    live: int = 0


class MemoryRoutingState:
    def __init__(
        self,
        agents: Sequence[AgentProfile],
        queues: Sequence[QueueConfig],
        *,
        call_blocks_chat: bool = False,
    ) -> None:
        self._agents: dict[str, AgentProfile] = {a.id: a for a in agents}
        self._strategy = {q.name: q.strategy for q in queues}
        self._call_blocks_chat = call_blocks_chat
        pools_of: dict[str, list[Pool]] = defaultdict(list)
        self._pool_members: dict[Pool, int] = defaultdict(int)
        for agent in agents:
            for queue in queues:
                if not eligible(agent, queue):
                    continue
                for ct in CHANNEL_TYPES:
                    if agent.takes(ct):
                        pools_of[agent.id].append((queue.name, ct))
                        self._pool_members[(queue.name, ct)] += 1
        self._pools_of: dict[str, tuple[Pool, ...]] = {a: tuple(p) for a, p in pools_of.items()}
        self._pools: dict[Pool, list[tuple[StrategyKey, int, str]]] = defaultdict(list)
        self._online: set[str] = set()
        self._load: dict[str, dict[str, int]] = {
            a.id: dict.fromkeys(CHANNEL_TYPES, 0) for a in agents
        }
        self._version: dict[str, int] = dict.fromkeys(self._agents, 0)
        self._stamps = itertools.count(1)
        self._last_assigned: dict[str, int] = {}
        self._turn: dict[tuple[str, str], int] = {}
        self._holdings: dict[str, Holding] = {}
        self._held_by: dict[str, dict[str, Holding]] = defaultdict(dict)
        self._deadlines: list[tuple[float, int, str]] = []
        self._serials = itertools.count(1)
        self._waiting: dict[str, Ticket] = {}
        self._entry: dict[str, int] = {}
        self._entries = itertools.count(1)
        self._buckets: dict[Pool, _Bucket] = defaultdict(_Bucket)
        self._queue_counts: dict[str, int] = defaultdict(int)
        self._seqs = itertools.count(1)

    # --- agents and presence ------------------------------------------------------------

    def agent(self, agent_id: str) -> AgentProfile | None:
        return self._agents.get(agent_id)

    def agent_ids(self) -> tuple[str, ...]:
        return tuple(self._agents)

    def pools_of(self, agent_id: str) -> tuple[Pool, ...]:
        return self._pools_of.get(agent_id, ())

    def is_online(self, agent_id: str) -> bool:
        return agent_id in self._online

    def set_online(self, agent_id: str, online: bool) -> None:
        if agent_id not in self._agents:
            return
        if online:
            self._online.add(agent_id)
        else:
            self._online.discard(agent_id)
        self._refresh(agent_id)

    def load(self, agent_id: str, channel_type: str) -> int:
        return self._load.get(agent_id, {}).get(channel_type, 0)

    def loads(self, agent_id: str) -> Mapping[str, int]:
        return dict(self._load.get(agent_id, {}))

    def room(self, agent_id: str, channel_type: str) -> bool:
        """Online, able to take this channel type, and below capacity for it."""
        profile = self._agents.get(agent_id)
        if profile is None or agent_id not in self._online or not profile.takes(channel_type):
            return False
        load = self._load[agent_id]
        if load.get(channel_type, 0) >= profile.capacity.get(channel_type, 0):
            return False
        # One call at a time is the capacity; a call also blocking chats is the option.
        return not (self._call_blocks_chat and channel_type == WEBCHAT and load.get(VOICE, 0) > 0)

    def stats(self, agent_id: str, queue: str) -> AgentStats:
        profile = self._agents[agent_id]
        return AgentStats(
            order=profile.order,
            load=self._load[agent_id],
            capacity=profile.capacity,
            last_assigned=self._last_assigned.get(agent_id, 0),
            queue_turn=self._turn.get((queue, agent_id), 0),
        )

    def best_agent(self, queue: str, channel_type: str, excluded: frozenset[str]) -> str | None:
        """The agent the queue's strategy ranks first among those with room now."""
        heap = self._pools.get((queue, channel_type))
        if not heap:
            return None
        version = self._version
        while heap and heap[0][1] != version[heap[0][2]]:
            heapq.heappop(heap)
        if not heap:
            return None
        if heap[0][2] not in excluded:
            return heap[0][2]
        # Rare: the best agents declined this ticket. Look past them, then put them back.
        skipped = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            if entry[1] != version[entry[2]]:
                continue
            skipped.append(entry)
            if entry[2] not in excluded:
                found = entry[2]
                break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _refresh(self, agent_id: str) -> None:
        """Re-rank an agent in every pool after anything that could move them changed."""
        version = self._version[agent_id] + 1
        self._version[agent_id] = version
        pools = self._pools_of.get(agent_id, ())
        if not pools or agent_id not in self._online:
            return  # the version bump alone retires their entries
        rooms = {ct: self.room(agent_id, ct) for ct in CHANNEL_TYPES}
        for pool in pools:
            queue, ct = pool
            if not rooms[ct]:
                continue
            heap = self._pools[pool]
            key = strategy_key(self._strategy[queue], ct, self.stats(agent_id, queue))
            heapq.heappush(heap, (key, version, agent_id))
            if len(heap) > 4 * self._pool_members[pool] + 64:
                live = [e for e in heap if e[1] == self._version[e[2]]]
                heapq.heapify(live)
                self._pools[pool] = live

    # --- holdings -----------------------------------------------------------------------

    def holding(self, conversation_id: str) -> Holding | None:
        return self._holdings.get(conversation_id)

    def held_by(self, agent_id: str) -> tuple[Holding, ...]:
        return tuple(self._held_by.get(agent_id, {}).values())

    def holdings(self) -> Iterable[Holding]:
        return self._holdings.values()

    def hold(
        self,
        ticket: Ticket,
        agent_id: str,
        *,
        now: float,
        offered: bool = False,
        expires_at: float | None = None,
        force: bool = False,
    ) -> bool:
        """Give a ticket to an agent if they have room (`force`: a person decided, so
        capacity is not checked). False, changing nothing, when it cannot be held."""
        conv = ticket.conversation_id
        if conv in self._holdings or conv in self._waiting or agent_id not in self._agents:
            return False
        if not force and not self.room(agent_id, ticket.channel_type):
            return False
        holding = Holding(
            ticket, agent_id, offered, now, expires_at if offered else None, next(self._serials)
        )
        self._holdings[conv] = holding
        self._held_by[agent_id][conv] = holding
        load = self._load[agent_id]
        load[ticket.channel_type] = load.get(ticket.channel_type, 0) + 1
        stamp = next(self._stamps)
        self._last_assigned[agent_id] = stamp
        self._turn[(ticket.queue, agent_id)] = stamp
        if holding.expires_at is not None:
            heapq.heappush(self._deadlines, (holding.expires_at, holding.serial, conv))
        self._refresh(agent_id)
        return True

    def confirm(self, conversation_id: str) -> Holding | None:
        """An offer accepted: the same slot, now an assignment."""
        holding = self._holdings.get(conversation_id)
        if holding is None or not holding.offered:
            return None
        confirmed = Holding(
            holding.ticket, holding.agent_id, False, holding.since, serial=holding.serial
        )
        self._holdings[conversation_id] = confirmed
        self._held_by[holding.agent_id][conversation_id] = confirmed
        return confirmed

    def release(self, conversation_id: str) -> Holding | None:
        holding = self._holdings.pop(conversation_id, None)
        if holding is None:
            return None
        agent_id = holding.agent_id
        held = self._held_by.get(agent_id)
        if held is not None:
            held.pop(conversation_id, None)
            if not held:
                del self._held_by[agent_id]
        load = self._load[agent_id]
        ct = holding.ticket.channel_type
        load[ct] = max(load.get(ct, 0) - 1, 0)
        self._refresh(agent_id)
        return holding

    def due_offers(self, now: float) -> list[Holding]:
        """Offers whose deadline has passed, still unanswered."""
        due = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, serial, conv = heapq.heappop(self._deadlines)
            holding = self._holdings.get(conv)
            if holding is not None and holding.offered and holding.serial == serial:
                due.append(holding)
        return due

    def next_deadline(self) -> float | None:
        while self._deadlines:
            expires_at, serial, conv = self._deadlines[0]
            holding = self._holdings.get(conv)
            if holding is not None and holding.offered and holding.serial == serial:
                return expires_at
            heapq.heappop(self._deadlines)
        return None

    # --- the waiting queue --------------------------------------------------------------

    def next_seq(self) -> int:
        return next(self._seqs)

    def waiting(self, conversation_id: str) -> Ticket | None:
        return self._waiting.get(conversation_id)

    def waiting_count(self, queue: str | None = None) -> int:
        return len(self._waiting) if queue is None else self._queue_counts.get(queue, 0)

    def waiting_in(self, queue: str, channel_type: str) -> int:
        bucket = self._buckets.get((queue, channel_type))
        return 0 if bucket is None else bucket.live

    def online_agents(self) -> tuple[str, ...]:
        return tuple(self._online)

    def enqueue(self, ticket: Ticket) -> None:
        conv = ticket.conversation_id
        if conv in self._waiting or conv in self._holdings:
            raise ValueError(f"conversation {conv} is already queued or held")
        entry = next(self._entries)
        self._waiting[conv] = ticket
        self._entry[conv] = entry
        bucket = self._buckets[(ticket.queue, ticket.channel_type)]
        heapq.heappush(bucket.heap, (ticket.order, entry, conv))
        bucket.live += 1
        self._queue_counts[ticket.queue] += 1

    def dequeue(self, conversation_id: str) -> Ticket | None:
        ticket = self._waiting.pop(conversation_id, None)
        if ticket is None:
            return None
        del self._entry[conversation_id]
        bucket = self._buckets[(ticket.queue, ticket.channel_type)]
        bucket.live -= 1
        self._queue_counts[ticket.queue] -= 1
        if len(bucket.heap) > 4 * bucket.live + 64:
            bucket.heap = [e for e in bucket.heap if self._entry.get(e[2]) == e[1]]
            heapq.heapify(bucket.heap)
        return ticket

    def head(self, queue: str, channel_type: str, agent_id: str | None = None) -> Ticket | None:
        """The first waiting ticket of a bucket that `agent_id` has not declined."""
        bucket = self._buckets.get((queue, channel_type))
        if bucket is None or not bucket.live:
            return None
        heap = bucket.heap
        entry_of = self._entry
        while heap and entry_of.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        if not heap:
            return None
        first = self._waiting[heap[0][2]]
        if agent_id is None or agent_id not in first.excluded:
            return first
        skipped = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            if entry_of.get(entry[2]) != entry[1]:
                continue
            skipped.append(entry)
            ticket = self._waiting[entry[2]]
            if agent_id not in ticket.excluded:
                found = ticket
                break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def ordered_waiting(self) -> list[Ticket]:
        """Every waiting ticket, first to be served first (a snapshot)."""
        return sorted(self._waiting.values(), key=lambda t: t.order)

    def positions(self, queue: str) -> dict[str, int]:
        """1-based place of every ticket waiting in `queue` (all channel types)."""
        tickets = sorted(
            (
                self._waiting[conv]
                for ct in CHANNEL_TYPES
                for _, entry, conv in self._buckets[(queue, ct)].heap
                if self._entry.get(conv) == entry
            )
            if self._queue_counts.get(queue)
            else (),
            key=lambda t: t.order,
        )
        return {t.conversation_id: i for i, t in enumerate(tickets, 1)}
