"""The routing service: the router wired to the store, the bus, presence and the clock.

It listens to the bus (stored events, presence signals), asks the router what to do,
and carries out the router's effects: ASSIGNMENT events in the store (published like
any write), offer and queue-position signals, after-hours auto-replies, requeues.
One lock serializes every step, so the router's state only changes between complete
decisions; store writes happen inside it, so a decision and its record stay in order.

Several hub processes on one store route as one (hub/routing/cluster.py): every
process runs this service, but only the holder of the store's lease "router" decides
and writes; the others keep track of presence and forward accept, decline and calls
to it over the bus. Taking the lead (at start, or when the leader died) rebuilds the
router's state from the store: assigned active conversations count toward their
agent's load, open unassigned ones wait in their queue by age. Offers in flight are
not stored: after a restart or a takeover those conversations are offered again.

Endpoints (in this module): POST /api/v1/conversations/{id}/accept and /decline, for
the agent holding the offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from hub.app import ADAPTERS, BUS, CONFIG, OUTBOX, STORE, json_error
from hub.bus import Bus, BusItem, InProcessBus, Signal, Subscription
from hub.config import Config
from hub.inbox.auth import SESSION, requires
from hub.inbox.inputs import fail, path_id
from hub.inbox.presence import PRESENCE_KEY
from hub.inbox.replies import ReplyRefused, choose_route
from hub.lease import run_while_leader
from hub.model import (
    SYSTEM,
    Agent,
    Conversation,
    ConversationQuery,
    ConversationStatus,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Recorded,
    Role,
    conversation_to_dict,
    iso,
)
from hub.routing.cluster import (
    CLUSTER_SIGNALS,
    LEASE_NAME,
    PRESENCE,
    PRESENCE_GONE,
    PRESENCE_SNAPSHOT,
    ROUTE_REPLY,
    ROUTE_REQUEST,
    GuardedLease,
    NotLeader,
    PresenceBook,
    Requests,
    RouterUnavailable,
    RoutingTiming,
    new_origin,
    reply_to,
)
from hub.routing.router import (
    Assigned,
    Dequeued,
    Effect,
    Escalated,
    NoOffer,
    Offered,
    OfferEnded,
    Queued,
    Released,
    Requeued,
    RequeueDue,
    Router,
)
from hub.routing.rules import WEBCHAT, Contact
from hub.routing.state import Ticket
from hub.routing.timeline_summary import assigned_signal
from hub.timeline.store import NotFound, StoreError, StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

ROUTABLE_KINDS = frozenset({EventKind.MESSAGE, EventKind.CALL, EventKind.VOICEMAIL})
ACTIVE = (ConversationStatus.OPEN, ConversationStatus.PENDING, ConversationStatus.SNOOZED)
REBUILD_PAGE = 500
# How far back sticky and "answered?" look in a timeline before giving up.
SCAN_PAGES = 4
SCAN_PAGE_SIZE = 100


def _ts(value: datetime) -> float:
    return value.timestamp()


def is_routable(event: Event) -> bool:
    """A customer's contact that needs an agent (not an auto-reply, bounce or keyword)."""
    return (
        event.direction is Direction.IN
        and event.kind in ROUTABLE_KINDS
        and event.conversation_id is not None
        and event.data.get("routable") is not False
    )


def recorded_items(recorded: Recorded) -> list[BusItem]:
    """What a store write changed, as the inbox publishes it: events, then the
    conversation as it is now, so every agent's list updates."""
    if not recorded.created:
        return []
    items: list[BusItem] = [*recorded.side_events, recorded.event]
    conv = recorded.conversation
    if conv is not None:
        items.append(
            Signal(
                kind="conversation",
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                data={"conversation": conversation_to_dict(conv)},
            )
        )
    return items


class RoutingService:
    def __init__(
        self,
        config: Config,
        store: TimelineStore,
        bus: Bus,
        *,
        online_agents: Callable[[], Any] | None = None,
        connected_agents: Callable[[], Iterable[str]] | None = None,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 0.5,
        nudge_outbox: Callable[[], None] | None = None,
        origin: str | None = None,
        timing: RoutingTiming | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.router = Router(config.routing, config.agents, config.business_hours)
        self._online_agents = online_agents
        self._connected_agents = connected_agents
        self.clock = clock
        self.tick_seconds = tick_seconds
        self._nudge_outbox = nudge_outbox
        self._agents = {a.id: a for a in config.agents}
        self._channel_types = {c.name: c.type.value for c in config.channels}
        self._lock = asyncio.Lock()
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_served: dict[str, tuple[str, float]] = {}  # customer -> (agent, when)
        self._dirty_queues: set[str] = set()
        self._positions: dict[str, int] = {}  # conversation -> last published position
        # --- several processes (hub/routing/cluster.py) ---
        self.origin = origin or new_origin()
        self.timing = timing or RoutingTiming()
        # An in-process bus reaches this process only: there is nobody to tell.
        self._shared = not isinstance(bus, InProcessBus)
        self.presence = PresenceBook(
            self.origin,
            expire_after=self.timing.expiry if self._shared else None,
            known=self._agents.__contains__,
        )
        self._requests = Requests(bus, self.origin)
        self._lease: GuardedLease | None = None
        self._leading = False
        # The router's state may disagree with the store (a write failed, the leader
        # could not keep up): rebuild it from the store before the next decision.
        self._stale = False

    # --- lifecycle ------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this process routes now (holds the router's lease, surely)."""
        return self._leading and self._lease is not None and self._lease.held()

    @property
    def routing(self) -> bool:
        """Whether this process leads with its state rebuilt from the store."""
        return self.leading and not self._stale

    async def start(self) -> None:
        # Subscribe first: whatever happens during the rebuild is then handled after it.
        self._subscription = self.bus.subscribe("router", maxsize=10_000)
        online, connected = await self._local_presence()
        self.presence.snapshot(self.origin, online, connected)
        timing = self.timing
        self._lease = GuardedLease(
            self.store.lease(LEASE_NAME, self.origin, timing.lease_seconds),
            margin=timing.renew_every,
        )
        # Lead at once if nobody does (always, with one process): routing starts with the
        # hub rather than a renewal later.
        try:
            first = await self._lease.acquire()
        except Exception as exc:  # the store is unreachable: contend later, like the rest
            log.warning("router.lease_failed", error=str(exc))
            first = False
        if first:
            async with self._lock:
                await self._take_lead()
        self._tasks = [
            asyncio.create_task(self._consume(self._subscription), name="router-bus"),
            asyncio.create_task(self._leadership(), name="router-leadership"),
        ]
        if self._shared:
            self._tasks.append(asyncio.create_task(self._heartbeat(), name="router-heartbeat"))

    async def stop(self) -> None:
        # Let the item in hand finish (its store write and its messages belong together).
        locked = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._lock.acquire()
                locked = True
        try:
            if self._subscription is not None:
                self._subscription.close()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks = []
            self._leading = False
        finally:
            if locked:
                self._lock.release()
        await self._hand_over()

    async def _hand_over(self) -> None:
        """Leaving: let another process lead now rather than after the lease's TTL, and
        tell the leader that what this process said about presence no longer holds."""
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.release()
        if self._shared:
            with contextlib.suppress(Exception):
                await self.bus.publish([Signal(kind=PRESENCE_GONE, data={"origin": self.origin})])

    async def _leadership(self) -> None:
        """Lead whenever this process holds the lease; wait for it otherwise."""
        while True:
            try:
                assert self._lease is not None
                await run_while_leader(self._lease, self._lead, renew_every=self.timing.renew_every)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router.leadership_failed")
            await asyncio.sleep(self.timing.renew_every)

    async def _lead(self) -> None:
        """The work while holding the lease; returns (stepping down) if the lease may
        have lapsed, and is cancelled when a renewal says it is lost."""
        try:
            async with self._lock:
                if not self.leading:  # else: taken at start, with nothing missed since
                    await self._take_lead()
            await self._ticking()
        finally:
            if self._leading:
                log.info("router.stepped_down", origin=self.origin)
            self._leading = False

    async def _take_lead(self) -> None:
        """Become the router: a fresh state from the store. Holds the lock."""
        log.info("router.leading", origin=self.origin)
        self._leading = True
        try:
            await self._resync()
        except NotLeader:
            self._leading = False  # the lease lapsed meanwhile: contend again
        except Exception:
            # The store is unreachable: lead anyway, and rebuild when it answers.
            log.exception("router.rebuild_failed")
            self._stale = True

    async def _resync(self) -> None:
        self._stale = True
        self.router = Router(self.config.routing, self.config.agents, self.config.business_hours)
        self._positions.clear()
        self._dirty_queues.clear()
        await self._rebuild()
        self._stale = False

    async def _rebuild(self) -> None:
        now = self.clock()
        router = self.router
        cursor: str | None = None
        waiting = adopted = 0
        while True:
            page = await self.store.list_conversations(
                ConversationQuery(statuses=ACTIVE), limit=REBUILD_PAGE, before=cursor
            )
            for conv in page.items:
                contact = self._contact_of(conv)
                if conv.assignee:
                    router.adopt(contact, conv.assignee, now)
                    adopted += 1
                elif conv.status is ConversationStatus.OPEN:
                    # Nobody is online yet in the router's eyes, so this only queues;
                    # the effects (after-hours replies) were carried out the first time.
                    router.arrive(contact, now, arrival=_ts(conv.created_at))
                    waiting += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        self.presence.expire()  # a dead leader's agents are not handed anything
        online = self.presence.online()
        effects: list[Effect] = []
        for agent_id in online:
            effects += router.set_presence(agent_id, True, now)
        log.info("router.rebuilt", waiting=waiting, assigned=adopted, online=len(online))
        await self._execute(effects)

    def _check_leader(self) -> None:
        """Before any write or message: only the leader acts."""
        if not self.leading:
            raise NotLeader(f"hub process {self.origin} does not hold the router's lease")

    async def _ready(self) -> bool:
        """Whether this process leads, with a state that agrees with the store. Holds
        the lock."""
        if not self.leading:
            return False
        if self._stale:
            await self._resync()
        return True

    # --- inputs ---------------------------------------------------------------------

    async def _consume(self, subscription: Subscription) -> None:
        dropped = 0
        async for item in subscription:
            try:
                async with self._lock:
                    if isinstance(item, Signal) and item.kind in CLUSTER_SIGNALS:
                        await self._cluster_signal(item)
                    elif not self.leading:
                        # The leader handles it; the store is the record if this
                        # process takes over later.
                        dropped = subscription.dropped
                    else:
                        if subscription.dropped != dropped:
                            # We missed events: the store is the record, start again.
                            dropped = subscription.dropped
                            log.warning("router.resync", dropped=dropped)
                            self._stale = True
                        if await self._ready():
                            await self._handle(item)
            except asyncio.CancelledError:
                raise
            except NotLeader:
                log.info("router.not_leader", item=type(item).__name__)
            except Exception:
                # One bad item must not stop routing for everyone.
                log.exception("router.item_failed", item=type(item).__name__)

    async def _ticking(self) -> None:
        """The leader's clock; returns when the lease may have lapsed (step down)."""
        while True:
            await asyncio.sleep(self.tick_seconds)
            async with self._lock:
                if not self.leading:
                    return
                try:
                    if not await self._ready():
                        return
                    now = self.clock()
                    for agent_id, online in self.presence.expire():
                        await self._execute(self.router.set_presence(agent_id, online, now))
                    await self._execute(self.router.tick(now))
                    await self._publish_positions()
                except asyncio.CancelledError:
                    raise
                except NotLeader:
                    return
                except Exception:
                    log.exception("router.tick_failed")

    async def _heartbeat(self) -> None:
        """Tell every process (the leader) who is online here, every few seconds."""
        while True:
            try:
                online, connected = await self._local_presence()
                await self.bus.publish(
                    [
                        Signal(
                            kind=PRESENCE_SNAPSHOT,
                            data={"origin": self.origin, "online": online, "connected": connected},
                        )
                    ]
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router.heartbeat_failed")
            await asyncio.sleep(self.timing.heartbeat_seconds)

    async def _local_presence(self) -> tuple[list[str], list[str]]:
        """Who is online in this process's registry, and who is connected to it."""
        online = list(await self._online_agents()) if self._online_agents is not None else []
        connected = list(self._connected_agents()) if self._connected_agents is not None else []
        return online, connected

    async def _cluster_signal(self, signal: Signal) -> None:
        """Presence from any process, and requests to the leader. Holds the lock."""
        data = signal.data
        origin = str(data.get("origin") or "")
        changes: list[tuple[str, bool]] = []
        if signal.kind == ROUTE_REPLY:
            self._requests.answered(signal)
        elif signal.kind == ROUTE_REQUEST:
            if await self._ready():
                await self._answer(signal)
        elif signal.kind == PRESENCE:
            agent_id = data.get("agent_id")
            if isinstance(agent_id, str):
                changes = self.presence.report(origin, agent_id, data)
        elif signal.kind == PRESENCE_SNAPSHOT:
            online_ids = data.get("online")
            connected = data.get("connected")
            if isinstance(online_ids, list):
                changes = self.presence.snapshot(
                    origin,
                    [a for a in online_ids if isinstance(a, str)],
                    [a for a in connected if isinstance(a, str)]
                    if isinstance(connected, list)
                    else (),
                )
        elif signal.kind == PRESENCE_GONE:
            changes = self.presence.forget(origin)
        if changes and await self._ready():
            now = self.clock()
            for agent_id, online in changes:
                await self._execute(self.router.set_presence(agent_id, online, now))

    async def _answer(self, request: Signal) -> None:
        """A forwarded accept, decline or call, carried out by the leader."""
        data = request.data
        op = data.get("op")
        conv_id = data.get("conversation_id")
        agent_id = data.get("agent_id")
        if not isinstance(conv_id, str):
            return
        reply: dict[str, Any] = {"ok": True}
        if op in ("accept", "decline") and isinstance(agent_id, str):
            decide = self.router.accept if op == "accept" else self.router.decline
            try:
                await self._execute(decide(conv_id, agent_id, self.clock()))
            except NoOffer:
                reply = {"ok": False, "error": "no_offer"}
        elif op == "call":
            queue = data.get("queue")
            reply["agent_id"] = await self._route_call(
                conv_id, queue if isinstance(queue, str) else None
            )
        else:
            return
        self._check_leader()
        await self.bus.publish([reply_to(request, **reply)])

    async def _handle(self, item: BusItem) -> None:
        if isinstance(item, Signal):
            return
        conv_id = item.conversation_id
        if conv_id is None:
            return
        if is_routable(item):
            if not self.router.knows(conv_id):
                await self._on_contact(conv_id, item)
        elif item.kind is EventKind.STATUS:
            await self._on_status(conv_id, item)
        elif item.kind is EventKind.ASSIGNMENT and not self._matches_state(conv_id, item):
            await self._on_assignment(conv_id)

    def _matches_state(self, conv_id: str, event: Event) -> bool:
        """Whether an ASSIGNMENT event says what the router already knows (its own)."""
        state = self.router.state
        holding = state.holding(conv_id)
        to = event.data.get("to")
        if to is None:
            waiting = state.waiting(conv_id)
            queue = event.data.get("queue")
            if waiting is not None:
                return queue is None or waiting.queue == queue
            return holding is not None and holding.offered
        return holding is not None and not holding.offered and holding.agent_id == to

    async def _on_contact(self, conv_id: str, event: Event) -> None:
        """A customer wrote or called in a conversation the router does not hold."""
        conv = await self.store.get_conversation(conv_id)
        if conv is None or not conv.status.active:
            return
        now = self.clock()
        if conv.assignee is not None:
            # Back in a conversation that still names an agent (reopened): keep them
            # together if the agent can take it now, else route it afresh.
            contact = self._contact_of(conv)
            if self.router.state.room(conv.assignee, contact.channel_type):
                await self._execute(self.router.adopt(contact, conv.assignee, now))
                return
            self._check_leader()
            recorded = await self.store.assign(conv_id, None, SYSTEM)
            await self._publish(recorded_items(recorded))
        contact = await self._contact_for_event(conv, event)
        await self._execute(self.router.arrive(contact, now))

    async def _on_status(self, conv_id: str, event: Event) -> None:
        to = event.data.get("to")
        now = self.clock()
        if to == ConversationStatus.RESOLVED.value:
            await self._execute(self.router.resolve(conv_id, now))
        elif to in (ConversationStatus.PENDING.value, ConversationStatus.SNOOZED.value):
            # The customer has the turn: an assigned one stays with its agent (and in
            # their load); a waiting one leaves the queue until the customer writes.
            if self.router.state.waiting(conv_id) is not None:
                await self._execute(self.router.resolve(conv_id, now))
        elif to == ConversationStatus.OPEN.value and event.author != SYSTEM:
            # Reopened by a person; a customer's message reopens with a system status
            # event followed by the message itself, which is routed on its own.
            if not self.router.knows(conv_id):
                await self._on_assignment(conv_id)

    async def _on_assignment(self, conv_id: str) -> None:
        """A person assigned, unassigned or moved the conversation: follow the store."""
        now = self.clock()
        conv = await self.store.get_conversation(conv_id)
        if conv is None or not conv.status.active:
            await self._execute(self.router.resolve(conv_id, now))
            return
        contact = self._contact_of(conv)
        if conv.assignee is not None:
            await self._execute(self.router.adopt(contact, conv.assignee, now))
        elif conv.status is not ConversationStatus.OPEN:
            await self._execute(self.router.resolve(conv_id, now))
        elif self.router.knows(conv_id):
            await self._execute(self.router.transfer(contact, now))
        else:
            sticky = await self._sticky_agent(conv.customer_id)
            await self._execute(self.router.arrive(replace(contact, sticky_agent=sticky), now))

    # --- what a contact looks like to the router --------------------------------------

    def _channel_type(self, channel: str) -> str:
        # A channel removed from the configuration: count it as email (the largest
        # capacity), rather than lose the conversation.
        return self._channel_types.get(channel, "email")

    def _contact_of(self, conv: Conversation) -> Contact:
        return Contact(
            conversation_id=conv.id,
            customer_id=conv.customer_id,
            channel=conv.channel,
            channel_type=self._channel_type(conv.channel),
            priority=conv.priority,
            queue=conv.queue,
        )

    async def _contact_for_event(
        self, conv: Conversation, event: Event, previous_agent: str | None = None
    ) -> Contact:
        customer = await self.store.get_customer(conv.customer_id)
        queue = event.data.get("queue")
        language = event.data.get("language")
        return Contact(
            conversation_id=conv.id,
            customer_id=conv.customer_id,
            channel=conv.channel,
            channel_type=(
                event.channel_type.value if event.channel_type else self._channel_type(conv.channel)
            ),
            text=event.text,
            customer_tags=customer.tags if customer else (),
            language=language if isinstance(language, str) else None,
            priority=conv.priority,
            queue=queue if isinstance(queue, str) and queue in self.router.queues else conv.queue,
            sticky_agent=previous_agent or await self._sticky_agent(conv.customer_id),
        )

    async def _sticky_agent(self, customer_id: str) -> str | None:
        """Who last served this customer within the sticky window: the newest ASSIGNMENT
        to an agent in their timeline (this process remembers its own, too)."""
        window = self.config.routing.sticky_window_seconds
        if window <= 0:
            return None
        since = self.clock() - window
        remembered = self._last_served.get(customer_id)
        if remembered is not None and remembered[1] >= since:
            return remembered[0]
        cursor: str | None = None
        for _ in range(SCAN_PAGES):
            page = await self.store.customer_timeline(
                customer_id, limit=SCAN_PAGE_SIZE, before=cursor
            )
            for event in page.items:
                if _ts(event.created_at) < since:
                    return None
                to = event.data.get("to") if event.kind is EventKind.ASSIGNMENT else None
                if isinstance(to, str) and to in self._agents:
                    return to
            cursor = page.next_cursor
            if cursor is None:
                return None
        return None

    async def _unanswered(self, conv_id: str, agent_id: str) -> bool:
        """No outbound message since the conversation was assigned to this agent."""
        cursor: str | None = None
        for _ in range(SCAN_PAGES):
            try:
                page = await self.store.conversation_events(
                    conv_id, limit=SCAN_PAGE_SIZE, before=cursor
                )
            except NotFound:
                return False
            for event in page.items:
                if event.kind is EventKind.MESSAGE and event.direction is Direction.OUT:
                    return False
                if event.kind is EventKind.ASSIGNMENT and event.data.get("to") == agent_id:
                    return True
            cursor = page.next_cursor
            if cursor is None:
                return True
        return False  # a long conversation: leave it with its agent rather than guess

    # --- effects ----------------------------------------------------------------------

    async def _execute(self, effects: list[Effect]) -> None:
        for effect in effects:
            try:
                await self._carry_out(effect)
            except NotFound:
                # Gone meanwhile (merged away): forget it.
                conv = effect_conversation(effect)
                if conv is not None:
                    self.router.resolve(conv, self.clock())
            except StoreError as exc:
                log.exception("router.effect_failed", effect=type(effect).__name__)
                if isinstance(exc, StoreUnavailable):
                    # Decided but maybe not recorded: start again from the store.
                    self._stale = True

    async def _announce(self, kind: str, ticket: Ticket, **data: Any) -> None:
        """Publish a routing signal about one conversation (data carries its id too)."""
        await self.bus.publish(
            [
                Signal(
                    kind=kind,
                    conversation_id=ticket.conversation_id,
                    customer_id=ticket.customer_id,
                    data={"conversation_id": ticket.conversation_id, **data},
                )
            ]
        )

    async def _carry_out(self, effect: Effect) -> None:
        # A deposed leader's decision may clash with the new leader's: drop it.
        self._check_leader()
        if isinstance(effect, Assigned):
            await self._assign(effect)
        elif isinstance(effect, Offered):
            ticket = effect.ticket
            self._dirty_queues.add(ticket.queue)
            log.info(
                "router.offered",
                conversation=ticket.conversation_id,
                agent=effect.agent_id,
                queue=ticket.queue,
            )
            expires = datetime.fromtimestamp(effect.expires_at, UTC)
            await self._announce(
                "offer",
                ticket,
                agent_id=effect.agent_id,
                queue=ticket.queue,
                expires_at=iso(expires),
            )
        elif isinstance(effect, OfferEnded):
            ticket = effect.ticket
            log.info(
                "router.offer_ended",
                conversation=ticket.conversation_id,
                agent=effect.agent_id,
                reason=effect.reason,
            )
            await self._announce(
                "offer_ended", ticket, agent_id=effect.agent_id, reason=effect.reason
            )
        elif isinstance(effect, Queued):
            await self._queued(effect)
        elif isinstance(effect, Dequeued):
            self._dirty_queues.add(effect.ticket.queue)
            self._positions.pop(effect.ticket.conversation_id, None)
        elif isinstance(effect, Escalated):
            ticket = effect.ticket
            log.warning(
                "router.escalated",
                conversation=ticket.conversation_id,
                from_queue=effect.from_queue,
                to_queue=effect.to_queue,
            )
            await self._announce(
                "escalated", ticket, from_queue=effect.from_queue, to_queue=effect.to_queue
            )
        elif isinstance(effect, RequeueDue):
            for conv_id in effect.conversation_ids:
                if await self._unanswered(conv_id, effect.agent_id):
                    await self._execute(self.router.requeue(conv_id, self.clock()))
        elif isinstance(effect, Requeued):
            ticket = effect.ticket
            log.info(
                "router.requeued",
                conversation=ticket.conversation_id,
                agent=effect.agent_id,
                queue=ticket.queue,
            )
            recorded = await self.store.assign(
                ticket.conversation_id, None, SYSTEM, queue=ticket.queue
            )
            await self._publish(recorded_items(recorded))
        elif isinstance(effect, Released):
            pass  # the store already says so (resolved, reassigned); loads are updated

    async def _assign(self, effect: Assigned) -> None:
        ticket = effect.ticket
        conv_id = ticket.conversation_id
        recorded = await self.store.assign(conv_id, effect.agent_id, SYSTEM, queue=ticket.queue)
        self._dirty_queues.add(ticket.queue)
        self._positions.pop(conv_id, None)
        conv = recorded.conversation
        if conv is not None and not conv.status.active:
            # Resolved (through another process, say) while this was decided: recorded,
            # but nobody is handed a closed conversation, and the slot is free again.
            log.info("router.resolved_meanwhile", conversation=conv_id, agent=effect.agent_id)
            await self._publish(recorded_items(recorded))
            await self._execute(self.router.resolve(conv_id, self.clock()))
            return
        self._last_served[ticket.customer_id] = (effect.agent_id, self.clock())
        log.info(
            "router.assigned",
            conversation=conv_id,
            agent=effect.agent_id,
            queue=ticket.queue,
            sticky=effect.sticky,
            accepted=effect.accepted,
            waited=round(max(self.clock() - ticket.arrival, 0.0), 3),
        )
        items = recorded_items(recorded)
        items.append(
            await assigned_signal(
                self.store,
                conversation_id=conv_id,
                customer_id=ticket.customer_id,
                agent_id=effect.agent_id,
                queue=ticket.queue,
            )
        )
        await self._publish(items)

    async def _queued(self, effect: Queued) -> None:
        ticket = effect.ticket
        conv_id = ticket.conversation_id
        self._dirty_queues.add(ticket.queue)
        # Writing the queue records where the conversation waits (the inbox shows it, and
        # a restart finds it there without matching again); unchanged, it writes nothing.
        recorded = await self.store.assign(conv_id, None, SYSTEM, queue=ticket.queue)
        await self._publish(recorded_items(recorded))
        log.info("router.queued", conversation=conv_id, queue=ticket.queue, closed=effect.closed)
        if effect.after_hours == "auto_reply" and effect.message:
            await self._auto_reply(recorded.conversation, effect.message)

    async def _auto_reply(self, conv: Conversation | None, text: str) -> None:
        if conv is None:
            return
        customer = await self.store.get_customer(conv.customer_id)
        if customer is None:
            return
        try:
            channel, to = choose_route(conv, customer, self.config.channels, None)
        except ReplyRefused as exc:
            log.info("router.auto_reply_skipped", conversation=conv.id, reason=str(exc))
            return
        draft = EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=SYSTEM,
            channel=channel.name,
            channel_type=channel.type,
            text=text,
            delivery_state=DeliveryState.QUEUED,
            data={"to": {"kind": to.kind.value, "value": to.value}, "auto_reply": "after_hours"},
        )
        self._check_leader()
        recorded = await self.store.append(conv.id, draft)
        await self._publish(recorded_items(recorded))
        if self._nudge_outbox is not None:
            self._nudge_outbox()

    async def _publish(self, items: list[BusItem]) -> None:
        if items:
            await self.bus.publish(items)

    async def _publish_positions(self) -> None:
        """Tell each waiting web chat customer their place and the expected wait."""
        dirty, self._dirty_queues = self._dirty_queues, set()
        state = self.router.state
        signals = []
        for queue in dirty:
            if not state.waiting_in(queue, WEBCHAT):
                continue  # only chat customers are told; skip ranking the whole line
            for conv_id, position in state.positions(queue).items():
                ticket = state.waiting(conv_id)
                if ticket is None or ticket.channel_type != WEBCHAT:
                    continue
                if self._positions.get(conv_id) == position:
                    continue
                self._positions[conv_id] = position
                signals.append(
                    Signal(
                        kind="queue_position",
                        conversation_id=conv_id,
                        customer_id=ticket.customer_id,
                        data={
                            "queue": queue,
                            "position": position,
                            "estimated_wait_seconds": self.router.estimated_wait(queue, position),
                        },
                    )
                )
        if signals:
            await self.bus.publish(signals)

    # --- what agents and calls ask ------------------------------------------------------

    async def accept(self, conversation_id: str, agent_id: str) -> Conversation | None:
        """The agent takes the offer; NoOffer if they hold none for this conversation,
        RouterUnavailable if the leader (another process) did not answer in time."""
        async with self._lock:
            if await self._ready():
                await self._execute(self.router.accept(conversation_id, agent_id, self.clock()))
                return await self.store.get_conversation(conversation_id)
        await self._forward("accept", conversation_id, agent_id)
        return await self.store.get_conversation(conversation_id)

    async def decline(self, conversation_id: str, agent_id: str) -> None:
        async with self._lock:
            if await self._ready():
                await self._execute(self.router.decline(conversation_id, agent_id, self.clock()))
                return
        await self._forward("decline", conversation_id, agent_id)

    async def _forward(self, op: str, conversation_id: str, agent_id: str) -> None:
        reply = await self._requests.ask(
            op,
            self.timing.request_timeout_seconds,
            conversation_id=conversation_id,
            agent_id=agent_id,
        )
        if reply.get("error") == "no_offer":
            raise NoOffer(f"no open offer of conversation {conversation_id} to {agent_id}")

    async def choose_for_call(self, call: Any) -> Agent | None:
        """The voice channel's agent chooser: route the call's conversation now and ring
        its agent (who needs a phone). None while it waits: the caller then hears the
        queue or leaves a voicemail, and the conversation stays in the router's queue.
        In a process that does not lead, the leader is asked (briefly: the caller waits)."""
        conv_id = getattr(call, "conversation_id", None)
        if conv_id is None:
            return None
        ivr_queue = getattr(call, "queue", None)
        async with self._lock:
            if await self._ready():
                return self._phone_agent(await self._route_call(conv_id, ivr_queue))
        try:
            reply = await self._requests.ask(
                "call", self.timing.call_timeout_seconds, conversation_id=conv_id, queue=ivr_queue
            )
        except RouterUnavailable:
            log.warning("router.call_unanswered", conversation=conv_id)
            return None
        agent_id = reply.get("agent_id")
        return self._phone_agent(agent_id if isinstance(agent_id, str) else None)

    def _phone_agent(self, agent_id: str | None) -> Agent | None:
        agent = self._agents.get(agent_id) if agent_id else None
        return agent if agent is not None and agent.phone else None

    async def _route_call(self, conv_id: str, ivr_queue: str | None) -> str | None:
        """Route a call's conversation at once; who has it now (None: it waits or is
        offered). The leader, holding the lock."""
        router = self.router
        conv = await self.store.get_conversation(conv_id)
        if conv is None or not conv.status.active:
            return None
        holding = router.state.holding(conv_id)
        waiting = router.state.waiting(conv_id)
        contact = self._contact_of(conv)
        if ivr_queue in router.queues:
            contact = replace(contact, queue=ivr_queue)
        now = self.clock()
        if holding is None and waiting is None and conv.assignee is None:
            sticky = await self._sticky_agent(conv.customer_id)
            await self._execute(router.arrive(replace(contact, sticky_agent=sticky), now))
        elif waiting is not None and ivr_queue in router.queues and waiting.queue != ivr_queue:
            # The caller picked a queue in the menu: wait there instead.
            await self._execute(router.transfer(contact, now))
        holding = router.state.holding(conv_id)
        return holding.agent_id if holding and not holding.offered else conv.assignee


def effect_conversation(effect: Effect) -> str | None:
    if isinstance(effect, Released):
        return effect.holding.ticket.conversation_id
    if isinstance(effect, RequeueDue):
        return None
    return effect.ticket.conversation_id


# --- REST ---------------------------------------------------------------------------------

ROUTER = web.AppKey("routing_service", RoutingService)
# Set before the app starts to change how fast hub processes notice each other (tests).
ROUTING_TIMING = web.AppKey("routing_timing", RoutingTiming)
routes = web.RouteTableDef()

UNAVAILABLE = "the router did not answer (another hub process may be taking over); retry"


def _unavailable() -> web.Response:
    response = json_error(503, UNAVAILABLE)
    response.headers["Retry-After"] = "2"
    return response


@routes.post("/api/v1/conversations/{id}/accept")
@requires(Role.AGENT)
async def accept_offer(request: web.Request) -> web.Response:
    conversation_id = path_id(request, "conversation")
    agent_id = request[SESSION].agent.id
    try:
        conv = await request.app[ROUTER].accept(conversation_id, agent_id)
    except NoOffer:
        fail(409, "no open offer of this conversation to you (it may have timed out)")
    except (RouterUnavailable, NotLeader):
        return _unavailable()
    return web.json_response({"conversation": conversation_to_dict(conv) if conv else None})


@routes.post("/api/v1/conversations/{id}/decline")
@requires(Role.AGENT)
async def decline_offer(request: web.Request) -> web.Response:
    conversation_id = path_id(request, "conversation")
    agent_id = request[SESSION].agent.id
    try:
        await request.app[ROUTER].decline(conversation_id, agent_id)
    except NoOffer:
        fail(409, "no open offer of this conversation to you (it may have timed out)")
    except (RouterUnavailable, NotLeader):
        return _unavailable()
    return web.json_response({"declined": True})


# --- wiring -------------------------------------------------------------------------------


def install(app: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    app.router.add_routes(routes)
    return _routing_ctx


async def _routing_ctx(app: web.Application) -> AsyncIterator[None]:
    presence = app.get(PRESENCE_KEY)
    outbox = app.get(OUTBOX)
    service = RoutingService(
        app[CONFIG],
        app[STORE],
        app[BUS],
        online_agents=presence.online_agents if presence is not None else None,
        connected_agents=presence.connected_agents if presence is not None else None,
        nudge_outbox=outbox.nudge if outbox is not None else None,
        origin=presence.origin if presence is not None else None,
        timing=app.get(ROUTING_TIMING),
    )
    app[ROUTER] = service
    await service.start()
    # The voice channel rings whoever the router picks, instead of its own default.
    for adapter in app[ADAPTERS].values():
        if adapter.type.value == "voice" and hasattr(adapter, "choose_agent"):
            adapter.choose_agent = service.choose_for_call  # type: ignore[attr-defined]
    try:
        yield
    finally:
        await service.stop()
