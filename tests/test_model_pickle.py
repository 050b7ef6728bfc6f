"""Domain values cross to the SQLite writer process and back by pickle: exactly."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest

from hub.model import (
    Attachment,
    ChannelType,
    Conversation,
    ConversationStatus,
    Customer,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Recorded,
)

PHONE = Identity(IdentityKind.PHONE, "+12025551000")
CLAIM = Identity(IdentityKind.EMAIL, "ana@example.com", verified=False)
CUSTOMER = Customer("C1", "Ana", (PHONE, CLAIM), ("vip",), datetime.now(UTC), None)
CONVERSATION = Conversation(
    "V1",
    "C1",
    ConversationStatus.OPEN,
    "sms",
    datetime.now(UTC),
    # Another offset than UTC must come back as it was, not converted.
    datetime.now(timezone(timedelta(hours=2))),
    queue="billing",
    tags=("refund",),
)
EVENT = Event(
    "E1",
    "C1",
    "V1",
    "sms",
    None,  # an optional enum left empty
    Direction.IN,
    EventKind.MESSAGE,
    "customer",
    datetime.now(UTC),
    "hello",
    attachments=(Attachment("a.png", "image/png", 3, "https://example.com/a"),),
    delivery_state=DeliveryState.SENT,
    data={"nested": [1, {"deep": True}], "text": "é"},
)
VALUES = [
    PHONE,
    CUSTOMER,
    CONVERSATION,
    EVENT,
    Recorded(EVENT, CONVERSATION, CUSTOMER, True, (EVENT,)),
    Recorded(EVENT, None, CUSTOMER, False),
    Inbound(
        channel="sms",
        channel_type=ChannelType.SMS,
        external_id="SM1",
        identity=PHONE,
        received_at=datetime(2020, 1, 1),  # naive stays naive
        data={"a": 1},
    ),
    EventDraft(kind=EventKind.NOTE, direction=Direction.INTERNAL, author="system"),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_a_value_comes_back_equal_with_its_enums_and_times(value: object) -> None:
    back = pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    assert back == value
    assert type(back) is type(value)
    for name in getattr(value, "__slots__", ()):
        original, copied = getattr(value, name), getattr(back, name)
        assert type(copied) is type(original), name
        if isinstance(original, datetime):
            assert copied.tzinfo == original.tzinfo, name


def test_frozen_values_stay_frozen_after_the_trip() -> None:
    back = pickle.loads(pickle.dumps(EVENT))
    with pytest.raises(AttributeError):
        back.text = "changed"  # type: ignore[misc]
    assert back.channel_type is None and back.delivery_state is DeliveryState.SENT
