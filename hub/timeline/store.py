"""The timeline store contract: one Protocol, two backends (SQLite, Redis).

Every backend passes tests/contract/test_store.py unchanged. The semantics written
here are the contract; where a docstring says "must", the suite checks it.

Durability: every write method returns only after its data is durable at the backend's
configured level (SQLite: committed in WAL with synchronous=FULL; Redis: acknowledged
by the server, whose own fsync policy then applies).

Values read back equal the values a write returned: datetimes are tz-aware UTC and exact
to the microsecond, event data and attachments round-trip as JSON, ids are the store's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from hub.lease import Lease
from hub.model import (
    Conversation,
    ConversationQuery,
    ConversationStatus,
    Customer,
    DeliveryState,
    Event,
    EventDraft,
    Identity,
    Inbound,
    Page,
    Recorded,
)


class StoreError(Exception):
    """Base of the errors a store raises on purpose; the message is fit for a user."""


class NotFound(StoreError):
    pass


class IdentityConflict(StoreError):
    """The identity already belongs to another customer (merge them instead)."""

    def __init__(self, identity: Identity, owner_id: str) -> None:
        super().__init__(f"{identity.key} already belongs to customer {owner_id}")
        self.identity = identity
        self.owner_id = owner_id

    def __reduce__(self) -> tuple[type[IdentityConflict], tuple[Identity, str]]:
        # Rebuilt from its fields, not its message: it crosses from the SQLite writer
        # process by pickle.
        return (IdentityConflict, (self.identity, self.owner_id))


class InvalidOperation(StoreError):
    """A request that contradicts the stored state (merge a customer into itself...)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached; webhooks answer 503 so the provider retries."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    event: Event
    attempts: int  # delivery attempts made before this claim


@runtime_checkable
class TimelineStore(Protocol):
    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create or migrate the schema. Raises StoreUnavailable with a reason."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a round trip to the backend works now."""

    # --- ingest ----------------------------------------------------------------------

    async def record_inbound(self, inbound: Inbound) -> Recorded:
        """Store one inbound contact atomically; the single write path of `ingest`.

        In one atomic step:
        1. Idempotency: if (inbound.channel, inbound.external_id) was stored before, store
           nothing and return that event with created=False (concurrent duplicates too:
           exactly one of them creates, all get the same event).
        2. Identity: the customer owning `inbound.identity` (following merges); when none,
           a new customer with that identity and `display_name` (or the identity value).
           An unverified identity never resolves to an existing customer's verified one;
           it only finds a customer it was itself recorded on (unverified; the earliest
           such customer when several recorded the same claim).
        3. Threading: a conversation of *this customer* registered under one of
           `thread_refs` wins if it is active, or if the customer has no active one
           (then it is reopened: status event, author system; when refs point at several
           resolved conversations, the most recently active one). Otherwise the customer's
           active conversation (pending/snoozed go back to open, with a status event);
           otherwise a new open conversation. `thread_key`, if set, is registered for
           the chosen conversation, scoped to this customer.
        4. Append the event (direction in, author customer) and update the
           conversation: channel = inbound.channel, last_activity_at.
        Reopen/status events are returned in `side_events`, ordered before the message.
        5. A non-routable inbound (auto-reply, bounce) changes no conversation: it joins
           the conversation its thread_refs name (whatever its status) or the active one,
           without reopening it or touching channel/last_activity_at; with neither, it
           gets a new conversation created already resolved.
        """

    # --- customers -------------------------------------------------------------------

    async def get_customer(self, customer_id: str) -> Customer | None:
        """The customer as stored, merged_into set when it was merged away."""

    async def find_customer(self, identity: Identity) -> Customer | None:
        """The live customer owning this identity (merges followed), or None.

        An unverified identity finds only a customer it was recorded on unverified,
        never the customer who holds the same (kind, value) verified.
        """

    async def create_customer(
        self, display_name: str, identities: tuple[Identity, ...] = (), tags: tuple[str, ...] = ()
    ) -> Customer:
        """A new customer; IdentityConflict if any verified identity is already someone's.

        Unverified identities (claims) never conflict: several customers may hold the same
        claim, and a claim never collides with the verified owner of that identity.
        """

    async def link_identity(self, customer_id: str, identity: Identity) -> Customer:
        """Add an identity. Idempotent for the same customer; IdentityConflict for another.

        Conflicts concern verified identities only (see create_customer). Linking the
        verified form of a claim the customer holds lists the identity once, verified.
        NotFound for an unknown customer; InvalidOperation for one merged away (link to
        the customer it was merged into).
        """

    async def set_customer_tags(self, customer_id: str, tags: tuple[str, ...]) -> Customer: ...

    async def merge_customers(self, source_id: str, target_id: str, actor: str) -> Recorded:
        """Merge `source` into `target`: identities, conversations and events join target.

        After it, find_customer(any former source identity) is target, target's timeline
        holds every source event, get_customer(source).merged_into == target.id. If both
        had an active conversation, target's stays active and source's is resolved (a
        status event with data {"reason": "merge"}). A MERGE event (conversation None,
        data {"source": source_id, "target": target_id}) records who did it and when.
        Merging again is a no-op returning the existing MERGE event with created=False.
        Merging a customer into itself, or into one merged away, or a source already
        merged into a different customer, is InvalidOperation; NotFound for unknown ids.
        The Recorded: event is the MERGE event, customer is the target after the merge,
        conversation is None, side_events holds the resolve status event (if any).
        """

    async def unmerge_customers(self, source_id: str, actor: str) -> Recorded:
        """Undo the merge of `source`: its identities and conversations go back to it.

        Events follow their conversation (also ones appended while merged); customer-level
        events (earlier MERGE events) go back too. A MERGE event with data {"undo": true,
        "source": source_id, "target": target_id} is appended to target's timeline, and is
        the returned event; Recorded.customer is that target, conversation None.
        InvalidOperation if source is not merged (so a second unmerge is refused).
        Nested merges (A into B, then B into C) can be undone in either order: each unmerge
        takes back only what is still with the target, never what an earlier unmerge
        already returned to its own customer.
        """

    # --- conversations ---------------------------------------------------------------

    async def get_conversation(self, conversation_id: str) -> Conversation | None: ...

    async def active_conversation(self, customer_id: str) -> Conversation | None:
        """The customer's one active (not resolved) conversation, if any.

        None for a customer merged away: its conversations belong to the target now.
        """

    async def list_conversations(
        self, query: ConversationQuery, limit: int = 50, before: str | None = None
    ) -> Page[Conversation]:
        """Matching conversations, most recent activity first, cursor-paged, `total` set.

        Ties on last_activity_at are ordered by id, newest first. last_activity_at moves
        with content (messages, notes, calls, voicemails: inbound or appended), never
        backwards, and not with status or assignment changes, so that triage does not
        reshuffle the inbox. `unassigned` and `assignee` both set match nothing.
        A cursor the store did not make, or limit < 1, is InvalidOperation (this holds
        for every paged method).
        """

    async def set_status(
        self,
        conversation_id: str,
        status: ConversationStatus,
        actor: str,
        snoozed_until: datetime | None = None,
    ) -> Recorded:
        """Change status, appending a STATUS event {"from", "to"[, "until"]}.

        Setting the current status changes nothing: created=False, and `event` is the
        conversation's newest event. (Snoozing a snoozed conversation with a different
        `snoozed_until` is a change.) "until" is ISO 8601 UTC text; snoozed_until is
        ignored for other statuses and cleared when leaving SNOOZED.
        Reopening a resolved conversation while the customer has another active one is
        InvalidOperation. Resolving sets resolved_at; reopening clears it.
        NotFound for an unknown conversation (this holds for every conversation method).
        """

    async def assign(
        self,
        conversation_id: str,
        agent_id: str | None,
        actor: str,
        queue: str | None = None,
    ) -> Recorded:
        """Set assignee (None: unassign) and optionally the queue, with an ASSIGNMENT event
        {"from": old, "to": new, "queue": queue}. `queue` None keeps the current queue.

        Like set_status, a call that changes nothing (same assignee, same or no queue)
        appends nothing: created=False, `event` is the conversation's newest event.
        """

    async def set_conversation_tags(
        self, conversation_id: str, tags: tuple[str, ...]
    ) -> Conversation: ...

    async def append(self, conversation_id: str, draft: EventDraft) -> Recorded:
        """Append an event the hub made (reply, note, call, status...).

        An outbound MESSAGE sets first_response_at once. A draft with an external_id is
        idempotent on (draft.channel, external_id) like record_inbound. A draft with
        delivery_state QUEUED enters the outbox in the same atomic write (due at once). A
        draft with a thread_key registers it for this conversation and customer.
        Appending never changes the conversation's status (a note on a resolved one keeps
        it resolved); the event's customer is the conversation's customer.
        """

    # --- timeline --------------------------------------------------------------------

    async def get_event(self, event_id: str) -> Event | None: ...

    async def find_event(self, channel: str, external_id: str) -> Event | None:
        """The event stored for (channel, external id): inbound idempotency key or an
        outbound message's provider id (set by record_delivery)."""

    async def customer_timeline(
        self, customer_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        """Every event of the customer across all channels and conversations (including
        merged-in ones), newest first; `before` is a cursor from a previous page, and
        events that arrive meanwhile never shift or repeat later pages. `total` is set."""

    async def conversation_events(
        self, conversation_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        """A conversation's events, newest first, cursor-paged, `total` set."""

    async def events_after(
        self, conversation_id: str, after_id: str | None, limit: int = 500
    ) -> list[Event]:
        """Events with id > after_id, oldest first: what a reconnecting client missed."""

    # --- outbox ----------------------------------------------------------------------

    async def claim_outbound(self, now: datetime, limit: int, lease: timedelta) -> list[OutboxItem]:
        """Queued outbound events due at `now`, oldest first, each leased until now+lease
        so a concurrent claimer skips them; a crashed sender's lease simply expires.

        "Oldest" is by due time, then event id. A claim counts as an attempt: the
        stored count grows by one (OutboxItem.attempts is the count before it), so a
        message that crashes its sender every time still runs out of attempts; an
        `attempts` given to record_delivery replaces the stored count.
        """

    async def record_delivery(
        self,
        event_id: str,
        state: DeliveryState,
        *,
        error: str | None = None,
        provider_id: str | None = None,
        retry_at: datetime | None = None,
        attempts: int | None = None,
    ) -> Event:
        """Update an outbound event's delivery. `retry_at` with state QUEUED schedules a
        retry (QUEUED without retry_at: due at once); any other state leaves the outbox.
        A final state (delivered, undelivered, failed) is never overwritten by a non-final
        one (callbacks arrive out of order): such a call keeps state and error, but still
        stores a new provider_id. `error` replaces the stored error (None clears it).
        `provider_id` is stored as the event's external_id for status callbacks.
        NotFound for an unknown event; InvalidOperation for an event without a delivery
        state (not an outbound message), or a provider_id another event of the same
        channel already has. Returns the event after the update."""

    # --- small durable state for channels (IMAP positions, leases' owners...) --------

    async def get_state(self, key: str) -> str | None: ...

    async def set_state(self, key: str, value: str) -> None: ...

    def lease(self, name: str, owner: str, ttl_seconds: float) -> Lease:
        """A lease shared by every hub process on this store, for work that must run in
        one process at a time (an IMAP mailbox watch, a sweeper). SQLite serves one
        process, so its lease is process-local; Redis leases across processes."""
