"""Customer segments: the pure filter on known facts, and evaluation over a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hub.app import INGESTOR
from hub.config import SegmentConfig
from hub.model import (
    CUSTOMER,
    ChannelType,
    ConversationStatus,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Recorded,
)
from hub.reports.integrations import SEGMENTS
from hub.reports.segments import CustomerFacts, Segments, customer_facts, matches
from tests.integrations.conftest import Hub, MakeHub

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
FACTS = CustomerFacts(
    customer_id="K",
    tags=("vip", "emea"),
    channels=frozenset({"web", "sms"}),
    channel_types=frozenset({"webchat", "sms"}),
    last_contact_at=NOW - timedelta(days=3),
    last_csat=2,
    has_open_conversation=True,
)


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        (SegmentConfig("a", tags=("vip",)), True),
        (SegmentConfig("a", tags=("gold", "emea")), True),  # any of the listed tags
        (SegmentConfig("a", tags=("gold",)), False),
        (SegmentConfig("a", channels=("email",)), False),
        (SegmentConfig("a", channels=("sms",), channel_types=("webchat",)), True),
        (SegmentConfig("a", channel_types=("voice",)), False),
        (SegmentConfig("a", last_contact_within=7 * 86400), True),
        (SegmentConfig("a", last_contact_within=86400), False),
        (SegmentConfig("a", csat_at_most=2), True),
        (SegmentConfig("a", csat_at_most=1), False),
        (SegmentConfig("a", has_open_conversation=True), True),
        (SegmentConfig("a", has_open_conversation=False), False),
        (SegmentConfig("a", tags=("vip",), csat_at_most=3, has_open_conversation=True), True),
        (SegmentConfig("a", tags=("vip",), csat_at_most=1), False),  # every filter must hold
    ],
)
def test_matches(segment: SegmentConfig, expected: bool) -> None:
    assert matches(segment, FACTS, NOW) is expected


def test_no_score_or_no_contact_never_matches_those_filters() -> None:
    blank = CustomerFacts("K", (), frozenset(), frozenset(), None, None, False)
    assert not matches(SegmentConfig("a", csat_at_most=5), blank, NOW)
    assert not matches(SegmentConfig("a", last_contact_within=10**9), blank, NOW)
    assert matches(SegmentConfig("a", has_open_conversation=False), blank, NOW)


SEGMENTS_YAML = """
segments:
  - name: unhappy
    csat_at_most: 2
  - name: vip-open
    tags: [vip]
    has_open_conversation: true
  - name: texters
    channel_types: [sms]
    last_contact_within: 1d
"""


async def sms(hub: Hub, phone: str, text: str, sid: str) -> Recorded:
    return await hub.app[INGESTOR].ingest(
        Inbound(
            channel="sms",
            channel_type=ChannelType.SMS,
            external_id=sid,
            identity=Identity(IdentityKind.PHONE, phone),
            text=text,
        )
    )


async def test_segments_over_the_store(make_hub: MakeHub) -> None:
    hub = await make_hub(SEGMENTS_YAML)
    segments: Segments = hub.app[SEGMENTS]
    vip = await hub.chat("visitor-vip", "hello")
    await hub.store.set_customer_tags(vip.customer.id, ("vip",))
    texter = await sms(hub, "+14155550199", "hi by text", "SM1")
    unhappy = await hub.chat("visitor-sad", "it broke")
    conv_id = unhappy.event.conversation_id or ""
    await hub.set_status(conv_id, ConversationStatus.RESOLVED)
    await hub.store.append(  # a CSAT answer, as hub/reports/csat.py records it
        conv_id,
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.IN,
            author=CUSTOMER,
            channel="web",
            channel_type=ChannelType.WEBCHAT,
            text="1/5",
            data={"csat": {"score": 1, "comment": ""}, "routable": False},
        ),
    )

    assert await segments.segments_of(vip.customer.id) == ("vip-open",)
    assert await segments.segments_of(texter.customer.id) == ("texters",)
    assert await segments.segments_of(unhappy.customer.id) == ("unhappy",)
    assert await segments.segments_of("no-such-customer") == ()
    assert await segments.contains("vip-open", vip.customer.id)
    assert await segments.members("unhappy") == [unhappy.customer.id]
    assert set(await segments.members("vip-open")) == {vip.customer.id}
    with pytest.raises(KeyError):
        await segments.contains("nope", vip.customer.id)

    facts = await customer_facts(hub.store, texter.customer.id)
    assert facts is not None and facts.channels == frozenset({"sms"})
    assert facts.has_open_conversation and facts.last_csat is None

    # Two days on, the texter's last contact is too old.
    later = Segments(hub.config, hub.store, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert await later.segments_of(texter.customer.id) == ()

    # A merged customer is read as the one it joined: the vip now texted too.
    await hub.store.merge_customers(texter.customer.id, vip.customer.id, "agent:alice")
    assert await segments.segments_of(texter.customer.id) == ("vip-open", "texters")
