"""The router: every routing decision, applied to the routing state, with no I/O.

Each input (a contact needing an agent, a resolution, a presence change, an accept, a
decline, the clock) returns the list of effects it caused, in order: assigned, offered,
offer ended, queued, escalated, requeued... The service (hub/routing/service.py) turns
effects into store writes and bus messages; tests drive the router directly.

The rules, in the order they apply to one ticket:
1. Its queue: an explicit one (IVR choice, transfer, earlier routing), else the first
   queue whose match rules fit, else the default queue.
2. A queue outside its business hours holds the ticket until it opens; on arrival the
   queue's after-hours action is reported (auto-reply, voicemail) for the service to do.
3. Sticky: the agent who last served the customer, if online with room for the
   channel type (their skills are not checked again: they know the customer).
4. Otherwise the queue's strategy picks among agents eligible for the queue (skills,
   agent list), online, below capacity for the channel type, and who have not declined.
5. The queue requires acceptance: an offer that holds the slot until answered or timed
   out; each miss moves on, and `max_offers` misses escalate to the fallback queue.
6. Nobody can take it: it waits. Waiting tickets are served by priority, then arrival,
   whenever capacity frees up (resolution, decline, an agent coming online, a queue
   opening), so a younger ticket never overtakes an older one an agent could take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hub.config import BusinessHours, QueueConfig, RoutingSettings
from hub.model import Agent
from hub.routing.rules import AgentProfile, Contact, HoursBook, QueueMatcher
from hub.routing.state import Holding, MemoryRoutingState, Ticket

# --- effects ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assigned:
    ticket: Ticket
    agent_id: str
    sticky: bool = False
    accepted: bool = False  # the end of an offer, rather than a direct assignment


@dataclass(frozen=True, slots=True)
class Offered:
    ticket: Ticket
    agent_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class OfferEnded:
    ticket: Ticket
    agent_id: str
    reason: Literal["declined", "expired", "withdrawn"]


@dataclass(frozen=True, slots=True)
class Queued:
    ticket: Ticket
    closed: bool  # waiting because the queue is outside its business hours
    # Set on arrival outside business hours: what the queue says to do about it.
    after_hours: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Dequeued:
    """A waiting ticket left the queue without an agent (resolved, taken by hand)."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Released:
    """An agent's assignment ended (resolved, reassigned): their slot is free."""

    holding: Holding


@dataclass(frozen=True, slots=True)
class Escalated:
    ticket: Ticket  # as it goes on: in the fallback queue, or starting over in its own
    from_queue: str
    to_queue: str | None  # None: no fallback configured, offers start over


@dataclass(frozen=True, slots=True)
class RequeueDue:
    """An agent has been away long enough: the service checks which of these
    conversations are unanswered and hands those back with `Router.requeue`."""

    agent_id: str
    conversation_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Requeued:
    ticket: Ticket
    agent_id: str  # who lost it


Effect = (
    Assigned
    | Offered
    | OfferEnded
    | Queued
    | Dequeued
    | Released
    | Escalated
    | RequeueDue
    | Requeued
)


class NoOffer(Exception):
    """Accept/decline of an offer that this agent does not hold (expired, never made)."""


# --- the router -----------------------------------------------------------------------


class Router:
    def __init__(
        self,
        routing: RoutingSettings,
        agents: Sequence[Agent],
        hours: Sequence[BusinessHours] = (),
        state: MemoryRoutingState | None = None,
    ) -> None:
        self.settings = routing
        self.queues: dict[str, QueueConfig] = {q.name: q for q in routing.queues}
        profiles = [AgentProfile.of(a, i) for i, a in enumerate(agents)]
        self.state = state or MemoryRoutingState(
            profiles, routing.queues, call_blocks_chat=routing.call_blocks_chat
        )
        self.matcher = QueueMatcher(routing.queues, routing.default_queue)
        self.hours = HoursBook(routing.queues, hours)
        self._away_since: dict[str, float] = {}
        self._was_open: dict[str, bool] = {}
        # Seconds between two tickets leaving each queue (moving average): the wait
        # estimate is the position times that.
        self._pace: dict[str, float] = {}
        self._last_take: dict[str, float] = {}

    # --- inputs ---------------------------------------------------------------------

    def knows(self, conversation_id: str) -> bool:
        state = self.state
        return (
            state.waiting(conversation_id) is not None or state.holding(conversation_id) is not None
        )

    def ticket_for(self, contact: Contact, now: float, arrival: float | None = None) -> Ticket:
        queue = contact.queue if contact.queue in self.queues else self.matcher.select(contact)
        return Ticket(
            conversation_id=contact.conversation_id,
            customer_id=contact.customer_id,
            channel=contact.channel,
            channel_type=contact.channel_type,
            queue=queue,
            priority=contact.priority + self.queues[queue].priority,
            base_priority=contact.priority,
            arrival=now if arrival is None else arrival,
            seq=self.state.next_seq(),
            sticky_agent=contact.sticky_agent,
        )

    def arrive(self, contact: Contact, now: float, arrival: float | None = None) -> list[Effect]:
        """A conversation without an agent needs one. Known conversations are left be."""
        if self.knows(contact.conversation_id):
            return []
        return self._place(self.ticket_for(contact, now, arrival), now, arriving=True)

    def resolve(self, conversation_id: str, now: float) -> list[Effect]:
        """The conversation no longer needs an agent (resolved, or gone)."""
        ticket = self.state.dequeue(conversation_id)
        if ticket is not None:
            return [Dequeued(ticket)]
        holding = self.state.release(conversation_id)
        if holding is None:
            return []
        effects: list[Effect] = []
        if holding.offered:
            effects.append(OfferEnded(holding.ticket, holding.agent_id, "withdrawn"))
        else:
            effects.append(Released(holding))
        effects += self._drain_agent(holding.agent_id, now)
        return effects

    def set_presence(self, agent_id: str, online: bool, now: float) -> list[Effect]:
        state = self.state
        if state.agent(agent_id) is None or state.is_online(agent_id) == online:
            return []
        state.set_online(agent_id, online)
        if online:
            self._away_since.pop(agent_id, None)
            return self._drain_agent(agent_id, now)
        self._away_since[agent_id] = now
        effects: list[Effect] = []
        # Nobody is there to answer an offer: withdraw it now, without counting a miss.
        for holding in state.held_by(agent_id):
            if holding.offered:
                state.release(holding.ticket.conversation_id)
                effects.append(OfferEnded(holding.ticket, agent_id, "withdrawn"))
                effects += self._place(holding.ticket, now, arriving=False)
        return effects

    def accept(self, conversation_id: str, agent_id: str, now: float) -> list[Effect]:
        holding = self._offer(conversation_id, agent_id)
        self.state.confirm(conversation_id)
        return [Assigned(holding.ticket, agent_id, accepted=True)]

    def decline(self, conversation_id: str, agent_id: str, now: float) -> list[Effect]:
        holding = self._offer(conversation_id, agent_id)
        self.state.release(conversation_id)
        return [OfferEnded(holding.ticket, agent_id, "declined"), *self._miss(holding, now)]

    def tick(self, now: float) -> list[Effect]:
        """The clock moved: lapsed offers, agents away long enough, queues opening."""
        effects: list[Effect] = []
        for holding in self.state.due_offers(now):
            self.state.release(holding.ticket.conversation_id)
            effects.append(OfferEnded(holding.ticket, holding.agent_id, "expired"))
            effects += self._miss(holding, now)
        after = self.settings.requeue_after_seconds
        for agent_id, since in list(self._away_since.items()):
            if now - since >= after:
                del self._away_since[agent_id]
                held = tuple(
                    h.ticket.conversation_id for h in self.state.held_by(agent_id) if not h.offered
                )
                if held:
                    effects.append(RequeueDue(agent_id, held))
        opened = False
        for name in self.queues:
            if not self.hours.has_hours(name):
                continue
            is_open = self.hours.is_open(name, now)
            opened = opened or (is_open and not self._was_open.get(name, True))
            self._was_open[name] = is_open
        if opened:
            effects += self.drain(now)
        return effects

    def requeue(self, conversation_id: str, now: float) -> list[Effect]:
        """Take an assigned conversation back from its agent and route it again."""
        holding = self.state.holding(conversation_id)
        if holding is None or holding.offered:
            return []
        self.state.release(conversation_id)
        ticket = replace(holding.ticket, excluded=frozenset(), misses=0, sticky_agent=None)
        return [Requeued(ticket, holding.agent_id), *self._place(ticket, now, arriving=False)]

    def adopt(self, contact: Contact, agent_id: str, now: float) -> list[Effect]:
        """Record an assignment a person made (or found at start-up): it is counted in
        the agent's load even beyond capacity, since a person chose it."""
        conv = contact.conversation_id
        current = self.state.holding(conv)
        if current is not None and current.agent_id == agent_id and not current.offered:
            return []
        effects: list[Effect] = []
        ticket = self.state.dequeue(conv)
        if ticket is not None:
            effects.append(Dequeued(ticket))
        else:
            ticket = self.ticket_for(contact, now)
        previous = self.state.release(conv)
        if previous is not None:
            ticket = previous.ticket
            if previous.offered:
                effects.append(OfferEnded(previous.ticket, previous.agent_id, "withdrawn"))
        self.state.hold(ticket, agent_id, now=now, force=True)
        if previous is not None:
            if not previous.offered:
                effects.append(Released(previous))
            effects += self._drain_agent(previous.agent_id, now)
        return effects

    def transfer(self, contact: Contact, now: float) -> list[Effect]:
        """A person put the conversation (back) in a queue: `contact.queue`, or matched."""
        conv = contact.conversation_id
        effects: list[Effect] = []
        arrival: float | None = None
        waiting = self.state.dequeue(conv)
        if waiting is not None:
            arrival = waiting.arrival
            effects.append(Dequeued(waiting))
        previous = self.state.release(conv)
        if previous is not None:
            arrival = previous.ticket.arrival
            if previous.offered:
                effects.append(OfferEnded(previous.ticket, previous.agent_id, "withdrawn"))
            else:
                effects.append(Released(previous))
        effects += self._place(self.ticket_for(contact, now, arrival), now, arriving=False)
        if previous is not None:
            effects += self._drain_agent(previous.agent_id, now)
        return effects

    def drain(self, now: float) -> list[Effect]:
        """Serve every waiting ticket that can be served, first come first (after a
        rebuild, or when a queue opens)."""
        effects: list[Effect] = []
        open_now: dict[str, bool] = {}
        state = self.state
        for ticket in state.ordered_waiting():
            queue = ticket.queue
            if queue not in open_now:
                open_now[queue] = self.hours.is_open(queue, now)
            if not open_now[queue] or state.waiting(ticket.conversation_id) is not ticket:
                continue
            choice = self._choose(ticket)
            if choice is None:
                continue
            state.dequeue(ticket.conversation_id)
            effects += self._give(ticket, choice[0], choice[1], now)
        return effects

    # --- what a caller or an agent sees ---------------------------------------------

    def estimated_wait(self, queue: str, position: int) -> int | None:
        pace = self._pace.get(queue)
        return None if pace is None else round(pace * position)

    def away_since(self, agent_id: str) -> float | None:
        return self._away_since.get(agent_id)

    # --- internals ------------------------------------------------------------------

    def _offer(self, conversation_id: str, agent_id: str) -> Holding:
        holding = self.state.holding(conversation_id)
        if holding is None or not holding.offered or holding.agent_id != agent_id:
            raise NoOffer(f"no open offer of conversation {conversation_id} to {agent_id}")
        return holding

    def _choose(self, ticket: Ticket) -> tuple[str, bool] | None:
        state = self.state
        sticky = ticket.sticky_agent
        if (
            sticky is not None
            and sticky not in ticket.excluded
            and state.room(sticky, ticket.channel_type)
        ):
            return sticky, True
        agent_id = state.best_agent(ticket.queue, ticket.channel_type, ticket.excluded)
        return None if agent_id is None else (agent_id, False)

    def _place(self, ticket: Ticket, now: float, *, arriving: bool) -> list[Effect]:
        queue = self.queues[ticket.queue]
        if not self.hours.is_open(queue.name, now):
            self.state.enqueue(ticket)
            action = queue.after_hours if arriving else None
            message = queue.after_hours_message if arriving else None
            return [Queued(ticket, closed=True, after_hours=action, message=message)]
        choice = self._choose(ticket)
        if choice is None:
            self.state.enqueue(ticket)
            return [Queued(ticket, closed=False)]
        return self._give(ticket, choice[0], choice[1], now)

    def _give(self, ticket: Ticket, agent_id: str, sticky: bool, now: float) -> list[Effect]:
        queue = self.queues[ticket.queue]
        self._note_take(queue.name, now)
        if queue.require_accept:
            expires_at = now + queue.offer_timeout_seconds
            held = self.state.hold(ticket, agent_id, now=now, offered=True, expires_at=expires_at)
            assert held, "the router only offers to agents with room"
            return [Offered(ticket, agent_id, expires_at)]
        held = self.state.hold(ticket, agent_id, now=now)
        assert held, "the router only assigns to agents with room"
        return [Assigned(ticket, agent_id, sticky=sticky)]

    def _note_take(self, queue: str, now: float) -> None:
        last = self._last_take.get(queue)
        self._last_take[queue] = now
        if last is None:
            return
        gap = max(now - last, 0.0)
        pace = self._pace.get(queue)
        self._pace[queue] = gap if pace is None else 0.8 * pace + 0.2 * gap

    def _miss(self, holding: Holding, now: float) -> list[Effect]:
        """An offer declined or lapsed: the next candidate, or escalation."""
        ticket = holding.ticket
        agent_id = holding.agent_id
        queue = self.queues[ticket.queue]
        misses = ticket.misses + 1
        effects: list[Effect] = []
        if misses >= queue.max_offers:
            target = queue.fallback
            to_queue = self.queues[target] if target in self.queues else queue
            ticket = replace(
                ticket,
                queue=to_queue.name,
                priority=ticket.base_priority + to_queue.priority,
                excluded=frozenset(),
                misses=0,
                sticky_agent=None,
            )
            effects.append(Escalated(ticket, queue.name, target))
        else:
            ticket = replace(
                ticket,
                excluded=ticket.excluded | {agent_id},
                misses=misses,
                sticky_agent=None if ticket.sticky_agent == agent_id else ticket.sticky_agent,
            )
        # Back in line before the freed slot is handed out: the slot goes to whoever is
        # first in line for it, which may be a waiting ticket rather than this one.
        self.state.enqueue(ticket)
        effects += self._drain_agent(agent_id, now)
        if self.state.waiting(ticket.conversation_id) is ticket:
            self.state.dequeue(ticket.conversation_id)
            effects += self._place(ticket, now, arriving=False)
        return effects

    def _drain_agent(self, agent_id: str, now: float) -> list[Effect]:
        """An agent may have room now: serve the best waiting tickets they can take."""
        state = self.state
        effects: list[Effect] = []
        open_now: dict[str, bool] = {}
        pools = state.pools_of(agent_id)
        while True:
            best: Ticket | None = None
            for queue, ct in pools:
                if not state.room(agent_id, ct):
                    continue
                if queue not in open_now:
                    open_now[queue] = self.hours.is_open(queue, now)
                if not open_now[queue]:
                    continue
                ticket = state.head(queue, ct, agent_id)
                if ticket is not None and (best is None or ticket.order < best.order):
                    best = ticket
            if best is None:
                return effects
            choice = self._choose(best)
            if choice is None:  # cannot happen while this agent has room; stay safe
                return effects
            state.dequeue(best.conversation_id)
            effects += self._give(best, choice[0], choice[1], now)
