"""The TimelineStore contract, as a user of the hub would notice it.

Runs once per backend (see conftest.py). Everything goes through the Protocol: a test
that needs to know how a backend stores things does not belong here.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from hub.model import (
    CUSTOMER,
    SYSTEM,
    ChannelType,
    ConversationQuery,
    ConversationStatus,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Recorded,
    agent_author,
    utcnow,
)
from hub.timeline.store import (
    IdentityConflict,
    InvalidOperation,
    NotFound,
    TimelineStore,
)

OPEN = ConversationStatus.OPEN
PENDING = ConversationStatus.PENDING
SNOOZED = ConversationStatus.SNOOZED
RESOLVED = ConversationStatus.RESOLVED
AGENT = agent_author("a1")

_CHANNEL_TYPES = {
    "sms": ChannelType.SMS,
    "mail": ChannelType.EMAIL,
    "chat": ChannelType.WEBCHAT,
    "voice": ChannelType.VOICE,
}
_ids = itertools.count()


def phone(n: int) -> Identity:
    return Identity(IdentityKind.PHONE, f"+1202555{n:04d}")


def email(name: str, *, verified: bool = True) -> Identity:
    return Identity(IdentityKind.EMAIL, f"{name}@example.com", verified)


def visitor(name: str) -> Identity:
    return Identity(IdentityKind.CHAT, f"visitor-{name}")


def inbound(
    identity: Identity,
    *,
    channel: str = "sms",
    external_id: str | None = None,
    text: str = "hello",
    **fields: object,
) -> Inbound:
    return Inbound(
        channel=channel,
        channel_type=_CHANNEL_TYPES[channel],
        external_id=external_id or f"ext-{next(_ids)}",
        identity=identity,
        text=text,
        **fields,  # type: ignore[arg-type]
    )


def reply(text: str = "on it", **fields: object) -> EventDraft:
    return EventDraft(
        kind=EventKind.MESSAGE,
        direction=Direction.OUT,
        author=AGENT,
        channel="sms",
        channel_type=ChannelType.SMS,
        text=text,
        **fields,  # type: ignore[arg-type]
    )


def note(text: str = "internal") -> EventDraft:
    return EventDraft(kind=EventKind.NOTE, direction=Direction.INTERNAL, author=AGENT, text=text)


def conv_id(recorded: Recorded) -> str:
    assert recorded.conversation is not None
    return recorded.conversation.id


async def all_timeline(store: TimelineStore, customer_id: str) -> list[Event]:
    events: list[Event] = []
    cursor: str | None = None
    while True:
        page = await store.customer_timeline(customer_id, limit=7, before=cursor)
        events.extend(page.items)
        if page.next_cursor is None:
            return events
        cursor = page.next_cursor


# --- lifecycle --------------------------------------------------------------------------


async def test_ping_answers_when_started(store: TimelineStore) -> None:
    await store.ping()


# --- record_inbound ---------------------------------------------------------------------


async def test_new_contact_creates_customer_and_open_conversation(store: TimelineStore) -> None:
    received = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=utcnow().tzinfo)
    rec = await store.record_inbound(
        inbound(phone(1), text="my order is late", display_name="Ada", received_at=received)
    )

    assert rec.created
    assert rec.side_events == ()
    assert rec.customer.display_name == "Ada"
    assert rec.customer.identities == (phone(1),)
    assert rec.customer.merged_into is None
    conv = rec.conversation
    assert conv is not None
    assert conv.status is OPEN
    assert conv.channel == "sms"
    assert conv.customer_id == rec.customer.id
    assert conv.assignee is None and conv.first_response_at is None and conv.resolved_at is None
    event = rec.event
    assert event.customer_id == rec.customer.id and event.conversation_id == conv.id
    assert event.direction is Direction.IN and event.author == CUSTOMER
    assert event.kind is EventKind.MESSAGE and event.channel_type is ChannelType.SMS
    assert event.text == "my order is late"
    assert event.created_at == received and event.created_at.utcoffset() == timedelta(0)

    assert await store.get_event(event.id) == event
    assert await store.get_customer(rec.customer.id) == rec.customer
    assert await store.find_customer(phone(1)) == rec.customer
    assert await store.active_conversation(rec.customer.id) == conv
    assert await store.get_conversation(conv.id) == conv


async def test_display_name_defaults_to_identity_value(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(2)))
    assert rec.customer.display_name == phone(2).value


async def test_inbound_keeps_content_attachments_and_data(store: TimelineStore) -> None:
    from hub.model import Attachment

    att = Attachment("photo.jpg", "image/jpeg", 1234, "https://media.example/1")
    rec = await store.record_inbound(
        inbound(
            email("html"),
            channel="mail",
            text="plain",
            html="<p>plain</p>",
            attachments=(att,),
            data={"subject": "Hi", "to": ["support@example.com"]},
        )
    )
    stored = await store.get_event(rec.event.id)
    assert stored is not None
    assert stored.html == "<p>plain</p>"
    assert stored.attachments == (att,)
    assert dict(stored.data) == {"subject": "Hi", "to": ["support@example.com"]}
    assert stored == rec.event


async def test_inbound_returns_what_reads_give_back(store: TimelineStore) -> None:
    """The customer, conversation and event a write returns are what reads return after
    it, however the customer was found (new, known, by a claim, merged away) and whatever
    the conversation did (opened, moved on, reopened)."""

    async def check(rec: Recorded) -> None:
        assert rec.created and rec.conversation is not None
        assert await store.get_customer(rec.customer.id) == rec.customer
        assert await store.get_conversation(rec.conversation.id) == rec.conversation
        assert await store.get_event(rec.event.id) == rec.event
        for side in rec.side_events:
            assert await store.get_event(side.id) == side

    first = await store.record_inbound(inbound(phone(40), data={"n": 1, "ok": True, "x": None}))
    await check(first)
    customer = first.customer
    await store.link_identity(customer.id, email("known40"))
    await store.set_customer_tags(customer.id, ("vip", "churn-risk"))
    known = await store.record_inbound(
        inbound(email("known40"), channel="mail", data={"to": ["a@example.com"], "n": 1.5})
    )
    await check(known)
    assert known.customer.tags == ("vip", "churn-risk") and len(known.customer.identities) == 2
    assert known.conversation == replace(
        first.conversation, channel="mail", last_activity_at=known.event.created_at
    )

    await store.set_status(conv_id(known), PENDING, AGENT)
    reopened = await store.record_inbound(inbound(phone(40)))
    await check(reopened)
    assert [e.kind for e in reopened.side_events] == [EventKind.STATUS]

    # A claim left behind on a customer merged away resolves to the one it joined.
    source = await store.create_customer("Source", (email("shared41", verified=False),))
    target = await store.create_customer("Target", (phone(41), email("shared41", verified=False)))
    await store.merge_customers(source.id, target.id, AGENT)
    by_claim = await store.record_inbound(
        inbound(email("shared41", verified=False), channel="chat")
    )
    await check(by_claim)
    assert by_claim.customer.id == target.id


async def test_same_identity_lands_on_same_customer_and_conversation(
    store: TimelineStore,
) -> None:
    first = await store.record_inbound(inbound(phone(3)))
    second = await store.record_inbound(inbound(phone(3), text="again"))
    assert second.created
    assert second.customer.id == first.customer.id
    assert conv_id(second) == conv_id(first)
    assert second.event.id > first.event.id
    page = await store.conversation_events(conv_id(first))
    assert [e.id for e in page.items] == [second.event.id, first.event.id]


async def test_linked_identity_on_another_channel_joins_the_active_conversation(
    store: TimelineStore,
) -> None:
    mail = await store.record_inbound(inbound(email("omni"), channel="mail"))
    await store.link_identity(mail.customer.id, phone(4))
    sms = await store.record_inbound(inbound(phone(4), channel="sms"))

    assert sms.customer.id == mail.customer.id
    assert conv_id(sms) == conv_id(mail)
    assert sms.conversation is not None and sms.conversation.channel == "sms"
    stored = await store.get_conversation(conv_id(mail))
    assert stored is not None and stored.channel == "sms"


async def test_redelivery_is_stored_once(store: TimelineStore) -> None:
    first = await store.record_inbound(inbound(phone(5), external_id="SM-dup"))
    again = await store.record_inbound(inbound(phone(5), external_id="SM-dup", text="other"))
    assert not again.created
    assert again.event == first.event
    assert again.customer.id == first.customer.id
    assert conv_id(again) == conv_id(first)
    assert (await store.customer_timeline(first.customer.id)).total == 1
    assert await store.find_event("sms", "SM-dup") == first.event
    # The key is (channel, external id): the same id on another channel is another message.
    other = await store.record_inbound(inbound(phone(5), channel="voice", external_id="SM-dup"))
    assert other.created and other.event.id != first.event.id


async def test_concurrent_duplicates_make_exactly_one_event(store: TimelineStore) -> None:
    results = await asyncio.gather(
        *(store.record_inbound(inbound(phone(6), external_id="SM-burst")) for _ in range(50))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.event.id for r in results}) == 1
    assert len({r.customer.id for r in results}) == 1
    assert (await store.customer_timeline(results[0].customer.id)).total == 1


async def test_concurrent_first_contacts_of_one_person_make_one_customer(
    store: TimelineStore,
) -> None:
    results = await asyncio.gather(*(store.record_inbound(inbound(phone(7))) for _ in range(20)))
    assert len({r.customer.id for r in results}) == 1
    assert len({conv_id(r) for r in results}) == 1
    assert (await store.customer_timeline(results[0].customer.id)).total == 20


async def test_thread_ref_reopens_resolved_conversation(store: TimelineStore) -> None:
    first = await store.record_inbound(
        inbound(email("thread"), channel="mail", thread_key="<m1@example.com>")
    )
    await store.set_status(conv_id(first), RESOLVED, AGENT)

    answer = await store.record_inbound(
        inbound(email("thread"), channel="mail", thread_refs=("<m1@example.com>",))
    )
    assert conv_id(answer) == conv_id(first)
    assert answer.conversation is not None
    assert answer.conversation.status is OPEN and answer.conversation.resolved_at is None
    assert len(answer.side_events) == 1
    status = answer.side_events[0]
    assert status.kind is EventKind.STATUS and status.author == SYSTEM
    assert dict(status.data)["from"] == "resolved" and dict(status.data)["to"] == "open"
    assert status.conversation_id == conv_id(first)
    assert status.id < answer.event.id
    events = await store.conversation_events(conv_id(first))
    assert [e.id for e in events.items[:2]] == [answer.event.id, status.id]


async def test_thread_key_of_a_later_message_threads_too(store: TimelineStore) -> None:
    first = await store.record_inbound(inbound(email("keys"), channel="mail", thread_key="<a>"))
    second = await store.record_inbound(inbound(email("keys"), channel="mail", thread_key="<b>"))
    await store.set_status(conv_id(first), RESOLVED, AGENT)
    third = await store.record_inbound(
        inbound(email("keys"), channel="mail", thread_refs=("<unknown>", "<b>"))
    )
    assert conv_id(third) == conv_id(second) == conv_id(first)


async def test_thread_ref_to_resolved_conversation_yields_to_the_active_one(
    store: TimelineStore,
) -> None:
    old = await store.record_inbound(inbound(email("busy"), channel="mail", thread_key="<old>"))
    await store.set_status(conv_id(old), RESOLVED, AGENT)
    current = await store.record_inbound(inbound(email("busy"), channel="mail"))
    assert conv_id(current) != conv_id(old)

    late = await store.record_inbound(
        inbound(email("busy"), channel="mail", thread_refs=("<old>",))
    )
    assert conv_id(late) == conv_id(current)
    assert late.side_events == ()
    stale = await store.get_conversation(conv_id(old))
    assert stale is not None and stale.status is RESOLVED


async def test_machine_mail_is_filed_without_reopening_anything(store: TimelineStore) -> None:
    first = await store.record_inbound(inbound(email("ooo"), channel="mail", thread_key="<q1>"))
    await store.set_status(conv_id(first), RESOLVED, AGENT)
    before = await store.get_conversation(conv_id(first))

    auto = await store.record_inbound(
        inbound(email("ooo"), channel="mail", thread_refs=("<q1>",), routable=False)
    )
    assert conv_id(auto) == conv_id(first)
    assert auto.side_events == ()
    after = await store.get_conversation(conv_id(first))
    assert after == before  # still resolved, same activity time
    assert await store.active_conversation(first.customer.id) is None

    # With nothing to join, it is filed on a conversation that starts resolved.
    stray = await store.record_inbound(inbound(email("stranger"), channel="mail", routable=False))
    assert stray.conversation is not None
    assert stray.conversation.status is RESOLVED
    assert await store.active_conversation(stray.customer.id) is None
    assert (await store.get_event(stray.event.id)) == stray.event


async def test_thread_refs_of_another_customer_are_ignored(store: TimelineStore) -> None:
    # A newsletter sent to A is registered under its Message-ID; B replies to a forward.
    a = await store.record_inbound(inbound(email("alice"), channel="mail"))
    await store.append(conv_id(a), reply("newsletter", thread_key="<news-1>"))
    await store.set_status(conv_id(a), RESOLVED, AGENT)

    b = await store.record_inbound(inbound(email("bob"), channel="mail", thread_refs=("<news-1>",)))
    assert b.customer.id != a.customer.id
    assert conv_id(b) != conv_id(a)
    assert b.conversation is not None and b.conversation.customer_id == b.customer.id
    assert b.side_events == ()
    alice_conv = await store.get_conversation(conv_id(a))
    assert alice_conv is not None and alice_conv.status is RESOLVED
    assert (await store.conversation_events(conv_id(a))).total == 3  # in, reply, status


async def test_new_contact_after_resolution_opens_a_new_conversation(
    store: TimelineStore,
) -> None:
    first = await store.record_inbound(inbound(phone(8)))
    await store.set_status(conv_id(first), RESOLVED, AGENT)
    second = await store.record_inbound(inbound(phone(8)))
    assert conv_id(second) != conv_id(first)
    assert second.conversation is not None and second.conversation.status is OPEN
    assert second.side_events == ()
    old = await store.get_conversation(conv_id(first))
    assert old is not None and old.status is RESOLVED


@pytest.mark.parametrize("status", [PENDING, SNOOZED])
async def test_waiting_conversation_goes_back_to_open_on_inbound(
    store: TimelineStore, status: ConversationStatus
) -> None:
    first = await store.record_inbound(inbound(phone(9)))
    until = utcnow() + timedelta(days=1) if status is SNOOZED else None
    await store.set_status(conv_id(first), status, AGENT, snoozed_until=until)

    again = await store.record_inbound(inbound(phone(9)))
    assert conv_id(again) == conv_id(first)
    assert again.conversation is not None
    assert again.conversation.status is OPEN and again.conversation.snoozed_until is None
    assert [dict(e.data)["to"] for e in again.side_events] == ["open"]
    assert dict(again.side_events[0].data)["from"] == status.value
    stored = await store.get_conversation(conv_id(first))
    assert stored == again.conversation


# --- customers and identities -----------------------------------------------------------


async def test_create_get_and_find_customer(store: TimelineStore) -> None:
    customer = await store.create_customer(
        "Grace", (email("grace"), phone(10)), tags=("vip", "beta")
    )
    assert customer.display_name == "Grace"
    assert set(customer.identities) == {email("grace"), phone(10)}
    assert customer.tags == ("vip", "beta")
    assert await store.get_customer(customer.id) == customer
    assert await store.find_customer(email("grace")) == customer
    assert await store.find_customer(phone(10)) == customer
    assert await store.find_customer(email("nobody")) is None
    assert await store.get_customer("no-such-customer") is None
    # Their next SMS lands on them, not on a new customer.
    rec = await store.record_inbound(inbound(phone(10)))
    assert rec.customer.id == customer.id


async def test_create_customer_with_a_taken_identity_conflicts(store: TimelineStore) -> None:
    owner = await store.create_customer("Owner", (email("taken"),))
    with pytest.raises(IdentityConflict) as info:
        await store.create_customer("Other", (phone(11), email("taken")))
    assert info.value.owner_id == owner.id
    assert info.value.identity == email("taken")
    # Nothing of the refused customer was kept.
    assert await store.find_customer(phone(11)) is None


async def test_link_identity_is_idempotent_and_conflicts_across_customers(
    store: TimelineStore,
) -> None:
    a = await store.create_customer("A", (phone(12),))
    b = await store.create_customer("B", (phone(13),))
    linked = await store.link_identity(a.id, email("linked"))
    assert set(linked.identities) == {phone(12), email("linked")}
    again = await store.link_identity(a.id, email("linked"))
    assert again == linked
    with pytest.raises(IdentityConflict) as info:
        await store.link_identity(b.id, email("linked"))
    assert info.value.owner_id == a.id
    assert await store.find_customer(email("linked")) == linked
    with pytest.raises(NotFound):
        await store.link_identity("no-such-customer", email("ghost"))


async def test_unverified_identity_never_resolves_to_the_verified_owner(
    store: TimelineStore,
) -> None:
    owner = await store.create_customer("Real Victor", (email("victor"),))
    claim = email("victor", verified=False)

    # Someone types the owner's address into a chat pre-form.
    chat = await store.record_inbound(inbound(claim, channel="chat"))
    assert chat.customer.id != owner.id
    assert claim in chat.customer.identities
    assert await store.find_customer(claim) == chat.customer
    assert await store.find_customer(email("victor")) == owner
    # The claim keeps leading to where it was recorded, never to the owner.
    again = await store.record_inbound(inbound(claim, channel="chat"))
    assert again.customer.id == chat.customer.id
    owner_timeline = await store.customer_timeline(owner.id)
    assert owner_timeline.total == 0


async def test_unverified_claims_do_not_conflict(store: TimelineStore) -> None:
    owner = await store.create_customer("Owner", (email("shared"),))
    claim = email("shared", verified=False)
    a = await store.create_customer("A", (phone(14),))
    linked = await store.link_identity(a.id, claim)
    assert claim in linked.identities
    b = await store.create_customer("B", (phone(15), claim))
    assert claim in b.identities
    assert await store.find_customer(email("shared")) == owner


async def test_verified_identity_is_not_taken_by_a_claim(store: TimelineStore) -> None:
    claimer = await store.record_inbound(inbound(email("later", verified=False), channel="chat"))
    mail = await store.record_inbound(inbound(email("later"), channel="mail"))
    assert mail.customer.id != claimer.customer.id
    assert await store.find_customer(email("later")) == mail.customer


async def test_verifying_a_claim_lists_the_identity_once(store: TimelineStore) -> None:
    chat = await store.record_inbound(inbound(email("upgrade", verified=False), channel="chat"))
    linked = await store.link_identity(chat.customer.id, email("upgrade"))
    same_address = [i for i in linked.identities if i.value == email("upgrade").value]
    assert same_address == [email("upgrade")]
    assert await store.find_customer(email("upgrade")) == linked


async def test_set_customer_tags(store: TimelineStore) -> None:
    customer = await store.create_customer("Tagged", (phone(16),))
    updated = await store.set_customer_tags(customer.id, ("gold", "churn-risk"))
    assert updated.tags == ("gold", "churn-risk")
    assert await store.get_customer(customer.id) == updated
    with pytest.raises(NotFound):
        await store.set_customer_tags("no-such-customer", ("x",))


# --- merge / unmerge --------------------------------------------------------------------


async def _two_customers(store: TimelineStore) -> tuple[Recorded, Recorded]:
    """Source (phone, an SMS conversation) and target (email, a mail conversation)."""
    source = await store.record_inbound(inbound(phone(20), text="sms 1"))
    await store.record_inbound(inbound(phone(20), text="sms 2"))
    target = await store.record_inbound(inbound(email("target"), channel="mail", text="mail 1"))
    return source, target


async def test_merge_joins_identities_conversations_and_events(store: TimelineStore) -> None:
    source, target = await _two_customers(store)
    await store.set_status(conv_id(source), RESOLVED, AGENT)  # one active: no resolve
    src_events = {e.id for e in await all_timeline(store, source.customer.id)}
    tgt_events = {e.id for e in await all_timeline(store, target.customer.id)}

    merged = await store.merge_customers(source.customer.id, target.customer.id, AGENT)

    assert merged.created
    assert merged.side_events == ()
    assert merged.event.kind is EventKind.MERGE
    assert merged.event.conversation_id is None
    assert merged.event.customer_id == target.customer.id
    assert merged.event.author == AGENT
    assert dict(merged.event.data) == {
        "source": source.customer.id,
        "target": target.customer.id,
    }
    assert merged.customer.id == target.customer.id
    assert set(merged.customer.identities) == {phone(20), email("target")}

    assert await store.find_customer(phone(20)) == merged.customer
    gone = await store.get_customer(source.customer.id)
    assert gone is not None and gone.merged_into == target.customer.id
    after = await all_timeline(store, target.customer.id)
    assert {e.id for e in after} == src_events | tgt_events | {merged.event.id}
    assert (await store.customer_timeline(target.customer.id)).total == len(after)
    moved = await store.get_conversation(conv_id(source))
    assert moved is not None and moved.customer_id == target.customer.id
    listed = await store.list_conversations(ConversationQuery(customer_id=target.customer.id))
    assert {c.id for c in listed.items} == {conv_id(source), conv_id(target)}
    with pytest.raises(InvalidOperation):  # a merged-away record takes no new identities
        await store.link_identity(source.customer.id, phone(99))


async def test_merge_with_two_active_conversations_resolves_the_source_one(
    store: TimelineStore,
) -> None:
    source, target = await _two_customers(store)
    merged = await store.merge_customers(source.customer.id, target.customer.id, AGENT)

    assert len(merged.side_events) == 1
    status = merged.side_events[0]
    assert status.kind is EventKind.STATUS
    assert status.conversation_id == conv_id(source)
    assert dict(status.data)["reason"] == "merge"
    assert dict(status.data)["to"] == "resolved"
    assert status.id < merged.event.id
    resolved = await store.get_conversation(conv_id(source))
    assert resolved is not None and resolved.status is RESOLVED
    assert resolved.resolved_at is not None
    active = await store.active_conversation(target.customer.id)
    assert active is not None and active.id == conv_id(target)
    # The source's next SMS continues the target's conversation.
    later = await store.record_inbound(inbound(phone(20)))
    assert later.customer.id == target.customer.id
    assert conv_id(later) == conv_id(target)


async def test_merge_moves_the_only_active_conversation_along(store: TimelineStore) -> None:
    source, target = await _two_customers(store)
    await store.set_status(conv_id(target), RESOLVED, AGENT)
    merged = await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    assert merged.side_events == ()
    active = await store.active_conversation(target.customer.id)
    assert active is not None and active.id == conv_id(source)
    assert await store.active_conversation(source.customer.id) is None


async def test_merging_again_is_a_no_op(store: TimelineStore) -> None:
    source, target = await _two_customers(store)
    first = await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    total = (await store.customer_timeline(target.customer.id)).total
    again = await store.merge_customers(source.customer.id, target.customer.id, "agent:a2")
    assert not again.created
    assert again.event == first.event
    assert (await store.customer_timeline(target.customer.id)).total == total


async def test_invalid_merges_are_refused(store: TimelineStore) -> None:
    source, target = await _two_customers(store)
    third = await store.create_customer("Third", (phone(21),))
    with pytest.raises(InvalidOperation):
        await store.merge_customers(target.customer.id, target.customer.id, AGENT)
    with pytest.raises(NotFound):
        await store.merge_customers("no-such-customer", target.customer.id, AGENT)
    with pytest.raises(NotFound):
        await store.merge_customers(source.customer.id, "no-such-customer", AGENT)
    await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    with pytest.raises(InvalidOperation):  # into one merged away
        await store.merge_customers(third.id, source.customer.id, AGENT)
    with pytest.raises(InvalidOperation):  # already merged elsewhere
        await store.merge_customers(source.customer.id, third.id, AGENT)


async def test_unmerge_restores_identities_conversations_and_events(
    store: TimelineStore,
) -> None:
    source, target = await _two_customers(store)
    src_before = {e.id for e in await all_timeline(store, source.customer.id)}
    tgt_before = {e.id for e in await all_timeline(store, target.customer.id)}
    merged = await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    status_ids = {e.id for e in merged.side_events}
    # Written while merged, in the source's former conversation: follows it back.
    while_merged = await store.append(conv_id(source), note("seen while merged"))

    undone = await store.unmerge_customers(source.customer.id, AGENT)

    assert undone.created
    assert undone.event.kind is EventKind.MERGE
    assert undone.event.customer_id == target.customer.id
    assert undone.event.conversation_id is None
    assert dict(undone.event.data)["undo"] is True
    assert dict(undone.event.data)["source"] == source.customer.id
    assert dict(undone.event.data)["target"] == target.customer.id
    assert undone.customer.id == target.customer.id

    restored = await store.get_customer(source.customer.id)
    assert restored is not None and restored.merged_into is None
    assert set(restored.identities) == {phone(20)}
    assert await store.find_customer(phone(20)) == restored
    tgt_customer = await store.get_customer(target.customer.id)
    assert tgt_customer is not None and set(tgt_customer.identities) == {email("target")}

    src_after = {e.id for e in await all_timeline(store, source.customer.id)}
    assert src_after == src_before | status_ids | {while_merged.event.id}
    tgt_after = {e.id for e in await all_timeline(store, target.customer.id)}
    assert tgt_after == tgt_before | {merged.event.id, undone.event.id}
    back = await store.get_conversation(conv_id(source))
    assert back is not None and back.customer_id == source.customer.id
    # The source's next SMS is its own again.
    later = await store.record_inbound(inbound(phone(20)))
    assert later.customer.id == source.customer.id

    with pytest.raises(InvalidOperation):
        await store.unmerge_customers(source.customer.id, AGENT)


async def test_unmerge_of_a_customer_never_merged_is_refused(store: TimelineStore) -> None:
    customer = await store.create_customer("Solo", (phone(22),))
    with pytest.raises(InvalidOperation):
        await store.unmerge_customers(customer.id, AGENT)
    with pytest.raises(NotFound):
        await store.unmerge_customers("no-such-customer", AGENT)


async def test_merge_and_unmerge_carry_unverified_claims(store: TimelineStore) -> None:
    shared = email("both-claim", verified=False)
    own = email("source-claim", verified=False)
    source = await store.record_inbound(inbound(visitor("claims01"), channel="chat"))
    await store.link_identity(source.customer.id, shared)
    await store.link_identity(source.customer.id, own)
    target = await store.create_customer("Target", (phone(24), shared))

    await store.merge_customers(source.customer.id, target.id, AGENT)
    for identity in (visitor("claims01"), shared, own):
        found = await store.find_customer(identity)
        assert found is not None and found.id == target.id
    merged = await store.get_customer(target.id)
    assert merged is not None and own in merged.identities

    await store.unmerge_customers(source.customer.id, AGENT)
    for identity in (visitor("claims01"), own):
        found = await store.find_customer(identity)
        assert found is not None and found.id == source.customer.id
    restored = await store.get_customer(target.id)
    assert restored is not None and set(restored.identities) == {phone(24), shared}


@pytest.mark.parametrize("inner_first", [True, False], ids=["inner-first", "outer-first"])
async def test_nested_merges_unmerge_in_any_order(store: TimelineStore, inner_first: bool) -> None:
    a = await store.record_inbound(inbound(phone(25)))
    b = await store.record_inbound(inbound(phone(26)))
    c = await store.record_inbound(inbound(phone(27)))
    await store.merge_customers(a.customer.id, b.customer.id, AGENT)
    await store.merge_customers(b.customer.id, c.customer.id, AGENT)
    for n in (25, 26, 27):
        found = await store.find_customer(phone(n))
        assert found is not None and found.id == c.customer.id

    order = [a, b] if inner_first else [b, a]
    for rec in order:
        await store.unmerge_customers(rec.customer.id, AGENT)

    for n, rec in ((25, a), (26, b), (27, c)):
        found = await store.find_customer(phone(n))
        assert found is not None and found.id == rec.customer.id
        assert found.merged_into is None
        conv = await store.get_conversation(conv_id(rec))
        assert conv is not None and conv.customer_id == rec.customer.id
        timeline = await all_timeline(store, rec.customer.id)
        assert rec.event.id in {e.id for e in timeline}
        assert {e.conversation_id for e in timeline if e.conversation_id} == {conv_id(rec)}


async def test_merge_after_unmerge_works_again(store: TimelineStore) -> None:
    source, target = await _two_customers(store)
    first = await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    await store.unmerge_customers(source.customer.id, AGENT)
    second = await store.merge_customers(source.customer.id, target.customer.id, AGENT)
    assert second.created and second.event.id != first.event.id
    assert await store.find_customer(phone(20)) == second.customer


# --- conversations ----------------------------------------------------------------------


async def test_set_status_records_events_and_timestamps(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(30)))
    cid = conv_id(rec)

    pending = await store.set_status(cid, PENDING, AGENT)
    assert pending.created
    assert pending.event.kind is EventKind.STATUS and pending.event.author == AGENT
    assert pending.event.conversation_id == cid
    assert dict(pending.event.data) == {"from": "open", "to": "pending"}
    assert pending.conversation is not None and pending.conversation.status is PENDING

    same = await store.set_status(cid, PENDING, AGENT)
    assert not same.created
    assert same.event == pending.event
    assert (await store.conversation_events(cid)).total == 2

    resolved = await store.set_status(cid, RESOLVED, AGENT)
    assert resolved.conversation is not None
    assert resolved.conversation.resolved_at is not None
    assert await store.active_conversation(rec.customer.id) is None
    stored = await store.get_conversation(cid)
    assert stored == resolved.conversation

    reopened = await store.set_status(cid, OPEN, AGENT)
    assert dict(reopened.event.data) == {"from": "resolved", "to": "open"}
    assert reopened.conversation is not None and reopened.conversation.resolved_at is None
    assert await store.active_conversation(rec.customer.id) == reopened.conversation


async def test_snooze_records_until(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(31)))
    until = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    snoozed = await store.set_status(conv_id(rec), SNOOZED, AGENT, snoozed_until=until)
    assert snoozed.conversation is not None and snoozed.conversation.snoozed_until == until
    assert datetime.fromisoformat(dict(snoozed.event.data)["until"]) == until
    later = until + timedelta(hours=1)
    again = await store.set_status(conv_id(rec), SNOOZED, AGENT, snoozed_until=later)
    assert again.created
    assert again.conversation is not None and again.conversation.snoozed_until == later


async def test_reopening_while_another_conversation_is_active_is_refused(
    store: TimelineStore,
) -> None:
    old = await store.record_inbound(inbound(phone(32)))
    await store.set_status(conv_id(old), RESOLVED, AGENT)
    await store.record_inbound(inbound(phone(32)))  # a new active conversation
    with pytest.raises(InvalidOperation):
        await store.set_status(conv_id(old), OPEN, AGENT)
    stored = await store.get_conversation(conv_id(old))
    assert stored is not None and stored.status is RESOLVED


async def test_conversation_methods_on_unknown_ids(store: TimelineStore) -> None:
    assert await store.get_conversation("no-such-conversation") is None
    with pytest.raises(NotFound):
        await store.set_status("no-such-conversation", RESOLVED, AGENT)
    with pytest.raises(NotFound):
        await store.assign("no-such-conversation", "a1", AGENT)
    with pytest.raises(NotFound):
        await store.append("no-such-conversation", note())
    with pytest.raises(NotFound):
        await store.set_conversation_tags("no-such-conversation", ("x",))
    assert await store.get_event("no-such-event") is None
    assert await store.find_event("sms", "no-such-external-id") is None


async def test_assign_records_events(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(33)))
    cid = conv_id(rec)
    first = await store.assign(cid, "a1", SYSTEM, queue="billing")
    assert first.created
    assert first.event.kind is EventKind.ASSIGNMENT and first.event.author == SYSTEM
    assert dict(first.event.data) == {"from": None, "to": "a1", "queue": "billing"}
    assert first.conversation is not None
    assert first.conversation.assignee == "a1" and first.conversation.queue == "billing"

    moved = await store.assign(cid, "a2", AGENT)
    assert dict(moved.event.data)["from"] == "a1" and dict(moved.event.data)["to"] == "a2"
    assert moved.conversation is not None and moved.conversation.queue == "billing"

    unassigned = await store.assign(cid, None, AGENT)
    assert unassigned.conversation is not None and unassigned.conversation.assignee is None
    stored = await store.get_conversation(cid)
    assert stored == unassigned.conversation
    unchanged = await store.assign(cid, None, AGENT)
    assert not unchanged.created and unchanged.event == unassigned.event
    assert (await store.conversation_events(cid)).total == 4


async def test_set_conversation_tags(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(34)))
    conv = await store.set_conversation_tags(conv_id(rec), ("refund", "urgent"))
    assert conv.tags == ("refund", "urgent")
    assert await store.get_conversation(conv_id(rec)) == conv


async def test_append_outbound_sets_first_response_once(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(35)))
    cid = conv_id(rec)
    noted = await store.append(cid, note())
    assert noted.created and noted.event.direction is Direction.INTERNAL
    assert noted.conversation is not None and noted.conversation.first_response_at is None

    answered = await store.append(cid, reply("first"))
    assert answered.event.customer_id == rec.customer.id
    assert answered.event.conversation_id == cid
    first_response = answered.conversation.first_response_at if answered.conversation else None
    assert first_response is not None

    await store.append(cid, reply("second"))
    stored = await store.get_conversation(cid)
    assert stored is not None and stored.first_response_at == first_response


async def test_append_is_idempotent_on_external_id(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(36)))
    call = EventDraft(
        kind=EventKind.CALL,
        direction=Direction.OUT,
        author=AGENT,
        channel="voice",
        channel_type=ChannelType.VOICE,
        external_id="CA-1",
        data={"duration": 42},
    )
    first = await store.append(conv_id(rec), call)
    again = await store.append(conv_id(rec), call)
    assert first.created and not again.created
    assert again.event == first.event
    assert await store.find_event("voice", "CA-1") == first.event
    assert (await store.conversation_events(conv_id(rec))).total == 2


async def test_append_to_a_resolved_conversation_keeps_it_resolved(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(37)))
    await store.set_status(conv_id(rec), RESOLVED, AGENT)
    noted = await store.append(conv_id(rec), note("follow-up done"))
    assert noted.conversation is not None and noted.conversation.status is RESOLVED


# --- timelines and paging ---------------------------------------------------------------


async def test_customer_timeline_spans_channels_newest_first(store: TimelineStore) -> None:
    customer = await store.create_customer("Multi", (email("multi"), phone(40), visitor("multi1")))
    ids = []
    for identity, channel in [
        (email("multi"), "mail"),
        (phone(40), "sms"),
        (visitor("multi1"), "chat"),
        (phone(40), "voice"),
    ]:
        rec = await store.record_inbound(inbound(identity, channel=channel))
        assert rec.customer.id == customer.id
        ids.append(rec.event.id)
    page = await store.customer_timeline(customer.id)
    assert [e.id for e in page.items] == ids[::-1]
    assert [e.channel for e in page.items] == ["voice", "chat", "sms", "mail"]
    assert page.total == 4 and page.next_cursor is None


async def test_timeline_paging_is_stable_while_events_arrive(store: TimelineStore) -> None:
    first = await store.record_inbound(inbound(phone(41), text="m0"))
    original = [first.event.id]
    for n in range(1, 25):
        original.append((await store.record_inbound(inbound(phone(41), text=f"m{n}"))).event.id)
    cid = first.customer.id

    seen: list[str] = []
    page = await store.customer_timeline(cid, limit=10)
    assert page.total == 25
    seen.extend(e.id for e in page.items)
    arrived = []
    while page.next_cursor is not None:
        # New events between page requests must not shift or repeat what follows.
        arrived.append((await store.record_inbound(inbound(phone(41), text="new"))).event.id)
        page = await store.customer_timeline(cid, limit=10, before=page.next_cursor)
        seen.extend(e.id for e in page.items)

    assert seen == original[::-1]
    assert page.total == 25 + len(arrived)
    newest = await store.customer_timeline(cid, limit=len(arrived))
    assert [e.id for e in newest.items] == arrived[::-1]


async def test_conversation_events_paging(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(42)))
    cid = conv_id(rec)
    for n in range(6):
        await store.append(cid, note(f"n{n}"))
    await store.record_inbound(inbound(phone(43)))  # someone else's events stay out

    first = await store.conversation_events(cid, limit=4)
    assert first.total == 7 and len(first.items) == 4 and first.next_cursor is not None
    second = await store.conversation_events(cid, limit=4, before=first.next_cursor)
    assert len(second.items) == 3 and second.next_cursor is None and second.total == 7
    ids = [e.id for e in first.items + second.items]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 7
    assert ids[-1] == rec.event.id
    assert all(e.conversation_id == cid for e in first.items + second.items)


async def test_events_after_returns_what_a_client_missed(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(44)))
    cid = conv_id(rec)
    later = [(await store.append(cid, note(f"n{n}"))).event.id for n in range(5)]

    everything = await store.events_after(cid, None)
    assert [e.id for e in everything] == [rec.event.id, *later]
    missed = await store.events_after(cid, later[1])
    assert [e.id for e in missed] == later[2:]
    assert [e.id for e in await store.events_after(cid, rec.event.id, limit=2)] == later[:2]
    assert await store.events_after(cid, later[-1]) == []


async def test_concurrent_writers_never_make_a_resuming_client_miss_events(
    store: TimelineStore,
) -> None:
    rec = await store.record_inbound(inbound(phone(45)))
    cid = conv_id(rec)
    cursor = rec.event.id
    received: list[str] = []

    async def write(n: int) -> str:
        return (await store.append(cid, note(f"c{n}"))).event.id

    for _ in range(5):
        written = await asyncio.gather(*(write(n) for n in range(10)))
        batch = await store.events_after(cid, cursor)
        received.extend(e.id for e in batch)
        cursor = batch[-1].id
        assert set(written) <= set(received)
    assert len(received) == len(set(received)) == 50


async def test_bad_cursors_and_limits_are_refused(store: TimelineStore) -> None:
    rec = await store.record_inbound(inbound(phone(46)))
    with pytest.raises(InvalidOperation):
        await store.customer_timeline(rec.customer.id, before="not a cursor")
    with pytest.raises(InvalidOperation):
        await store.conversation_events(conv_id(rec), limit=0)
    with pytest.raises(InvalidOperation):
        await store.list_conversations(ConversationQuery(), before="not a cursor")


# --- list_conversations -----------------------------------------------------------------


async def test_list_conversations_filters(store: TimelineStore) -> None:
    base = utcnow() - timedelta(hours=1)

    async def conversation(n: int, channel: str, identity: Identity) -> str:
        rec = await store.record_inbound(
            inbound(identity, channel=channel, received_at=base + timedelta(minutes=n))
        )
        return conv_id(rec)

    sms_open = await conversation(1, "sms", phone(50))
    mail_pending = await conversation(2, "mail", email("lc-pending"))
    chat_assigned = await conversation(3, "chat", visitor("lc-assigned"))
    sms_resolved = await conversation(4, "sms", phone(51))
    await store.set_status(mail_pending, PENDING, AGENT)
    await store.assign(chat_assigned, "a1", SYSTEM, queue="sales")
    await store.assign(sms_open, None, SYSTEM, queue="support")
    await store.set_status(sms_resolved, RESOLVED, AGENT)

    async def ids(query: ConversationQuery) -> list[str]:
        page = await store.list_conversations(query)
        assert page.total == len(page.items)
        return [c.id for c in page.items]

    # Newest activity first; status and assignment changes do not reorder.
    assert await ids(ConversationQuery()) == [sms_resolved, chat_assigned, mail_pending, sms_open]
    assert await ids(ConversationQuery(statuses=(OPEN,))) == [chat_assigned, sms_open]
    assert await ids(ConversationQuery(statuses=(OPEN, PENDING))) == [
        chat_assigned,
        mail_pending,
        sms_open,
    ]
    assert await ids(ConversationQuery(assignee="a1")) == [chat_assigned]
    assert await ids(ConversationQuery(unassigned=True)) == [sms_resolved, mail_pending, sms_open]
    assert await ids(ConversationQuery(channel="sms")) == [sms_resolved, sms_open]
    assert await ids(ConversationQuery(queue="sales")) == [chat_assigned]
    assert await ids(ConversationQuery(queue="support", statuses=(OPEN,))) == [sms_open]
    assert await ids(ConversationQuery(assignee="nobody")) == []


async def test_list_conversations_moves_a_conversation_up_on_new_content(
    store: TimelineStore,
) -> None:
    older = await store.record_inbound(inbound(phone(52)))
    newer = await store.record_inbound(inbound(phone(53)))
    query = ConversationQuery(statuses=(OPEN,))
    assert [c.id for c in (await store.list_conversations(query)).items][:2] == [
        conv_id(newer),
        conv_id(older),
    ]
    await store.record_inbound(inbound(phone(52)))
    assert [c.id for c in (await store.list_conversations(query)).items][:2] == [
        conv_id(older),
        conv_id(newer),
    ]


async def test_list_conversations_paging(store: TimelineStore) -> None:
    same_time = utcnow() - timedelta(minutes=5)
    expected = []
    for n in range(7):
        # Several share one timestamp: the cursor must still not skip or repeat them.
        at = same_time if n % 2 else same_time + timedelta(seconds=n)
        rec = await store.record_inbound(inbound(phone(60 + n), received_at=at))
        expected.append(conv_id(rec))

    pages = []
    cursor: str | None = None
    while True:
        page = await store.list_conversations(ConversationQuery(), limit=3, before=cursor)
        assert page.total == 7
        pages.append([c.id for c in page.items])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    flat = [cid for page_ids in pages for cid in page_ids]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(flat) == sorted(expected) and len(set(flat)) == 7
    everything = await store.list_conversations(ConversationQuery(), limit=50)
    assert [c.id for c in everything.items] == flat
    activity = [c.last_activity_at for c in everything.items]
    assert activity == sorted(activity, reverse=True)


# --- outbox -----------------------------------------------------------------------------


async def _queued(store: TimelineStore, n: int, text: str = "reply") -> Recorded:
    rec = await store.record_inbound(inbound(phone(n)))
    return await store.append(conv_id(rec), reply(text, delivery_state=DeliveryState.QUEUED))


async def test_queued_reply_is_claimed_and_leased(store: TimelineStore) -> None:
    first = await _queued(store, 70, "first")
    second = await _queued(store, 71, "second")
    assert first.event.delivery_state is DeliveryState.QUEUED
    now = utcnow() + timedelta(seconds=1)
    lease = timedelta(seconds=30)

    claimed = await store.claim_outbound(now, 10, lease)
    assert [item.event.id for item in claimed] == [first.event.id, second.event.id]
    assert [item.attempts for item in claimed] == [0, 0]
    assert claimed[0].event.text == "first"
    # Leased: a concurrent claimer gets nothing until the lease runs out.
    assert await store.claim_outbound(now, 10, lease) == []
    assert await store.claim_outbound(now + lease - timedelta(seconds=1), 10, lease) == []
    # The sender crashed without a word: the lease expires and the claim counts as an attempt.
    again = await store.claim_outbound(now + lease, 10, lease)
    assert [item.event.id for item in again] == [first.event.id, second.event.id]
    assert [item.attempts for item in again] == [1, 1]


async def test_claim_respects_limit_and_concurrent_claimers(store: TimelineStore) -> None:
    for n in range(6):
        await _queued(store, 72 + n)
    now = utcnow() + timedelta(seconds=1)
    results = await asyncio.gather(
        *(store.claim_outbound(now, 2, timedelta(minutes=1)) for _ in range(5))
    )
    claimed = [item.event.id for items in results for item in items]
    assert all(len(items) <= 2 for items in results)
    assert len(claimed) == len(set(claimed)) == 6


async def test_retry_is_scheduled_and_attempts_kept(store: TimelineStore) -> None:
    queued = await _queued(store, 80)
    now = utcnow() + timedelta(seconds=1)
    [item] = await store.claim_outbound(now, 10, timedelta(minutes=1))
    retry_at = now + timedelta(minutes=5)
    updated = await store.record_delivery(
        item.event.id, DeliveryState.QUEUED, error="timeout", retry_at=retry_at, attempts=1
    )
    assert updated.delivery_state is DeliveryState.QUEUED and updated.delivery_error == "timeout"
    assert (
        await store.claim_outbound(retry_at - timedelta(seconds=1), 10, timedelta(minutes=1)) == []
    )
    [retry] = await store.claim_outbound(retry_at, 10, timedelta(minutes=1))
    assert retry.event.id == queued.event.id and retry.attempts == 1


async def test_delivery_states_and_provider_ids(store: TimelineStore) -> None:
    queued = await _queued(store, 81)
    now = utcnow() + timedelta(seconds=1)
    await store.claim_outbound(now, 10, timedelta(minutes=1))

    sent = await store.record_delivery(
        queued.event.id, DeliveryState.SENT, provider_id="SM-out-1", attempts=1
    )
    assert sent.delivery_state is DeliveryState.SENT and sent.external_id == "SM-out-1"
    # Sent left the outbox, even once the lease is long gone.
    assert await store.claim_outbound(now + timedelta(hours=1), 10, timedelta(minutes=1)) == []
    # Status callbacks find the event by the provider's id.
    found = await store.find_event("sms", "SM-out-1")
    assert found is not None and found.id == queued.event.id

    delivered = await store.record_delivery(queued.event.id, DeliveryState.DELIVERED)
    assert delivered.delivery_state is DeliveryState.DELIVERED
    # A late "sent" callback does not undo "delivered".
    late = await store.record_delivery(queued.event.id, DeliveryState.SENT)
    assert late.delivery_state is DeliveryState.DELIVERED
    stored = await store.get_event(queued.event.id)
    assert stored is not None and stored.delivery_state is DeliveryState.DELIVERED
    assert stored == late


async def test_failed_delivery_keeps_its_reason(store: TimelineStore) -> None:
    queued = await _queued(store, 82)
    failed = await store.record_delivery(
        queued.event.id, DeliveryState.FAILED, error="21610: unsubscribed recipient"
    )
    assert failed.delivery_state is DeliveryState.FAILED
    assert failed.delivery_error == "21610: unsubscribed recipient"
    queued_again = await store.record_delivery(queued.event.id, DeliveryState.QUEUED)
    assert queued_again.delivery_state is DeliveryState.FAILED
    stored = await store.get_event(queued.event.id)
    assert stored == failed
    assert await store.claim_outbound(utcnow() + timedelta(hours=1), 10, timedelta(1)) == []


async def test_record_delivery_of_unknown_or_undeliverable_events(store: TimelineStore) -> None:
    with pytest.raises(NotFound):
        await store.record_delivery("no-such-event", DeliveryState.SENT)
    rec = await store.record_inbound(inbound(phone(83)))
    with pytest.raises(InvalidOperation):
        await store.record_delivery(rec.event.id, DeliveryState.SENT)


# --- small channel state ----------------------------------------------------------------


async def test_get_and_set_state(store: TimelineStore) -> None:
    assert await store.get_state("imap:support:uid") is None
    await store.set_state("imap:support:uid", "41")
    assert await store.get_state("imap:support:uid") == "41"
    await store.set_state("imap:support:uid", "42")
    assert await store.get_state("imap:support:uid") == "42"
    assert await store.get_state("imap:other:uid") is None


async def test_lease_admits_one_owner_at_a_time(store: TimelineStore) -> None:
    name = f"sweeper-{next(_ids)}"
    first = store.lease(name, "process-a", 5.0)
    second = store.lease(name, "process-b", 5.0)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.renew()
    await first.release()
    assert await second.acquire()
    assert not await first.renew()
    await second.release()
