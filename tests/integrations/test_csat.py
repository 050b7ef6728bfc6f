"""CSAT end to end: resolved conversations are surveyed on the customer's channel; an
SMS "1-5" or a widget button within the window is recorded on that conversation, which
stays resolved, and no agent is offered it."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest

from hub.model import (
    ChannelType,
    ConversationStatus,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    agent_author,
)
from hub.reports.csat import SURVEY_PREFIX, parse_answer
from hub.reports.integrations import CSAT
from hub.routing.service import is_routable
from tests.integrations.conftest import SMS_NUMBER, Hub, MakeHub, eventually
from tests.twilio.fake_twilio import FakeTwilio

CUSTOMER_PHONE = "+14155550123"
QUESTION = "How did we do? Reply with a number from 1 to 5."
CSAT_YAML = f"""
csat:
  enabled: true
  delay_seconds: 0
  question: {QUESTION}
"""

_sids = itertools.count(1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", (5, "")),
        (" 4 ", (4, "")),
        ("3 - slow but fine", (3, "slow but fine")),
        ("5/5 great service", (5, "great service")),
        ("4 out of 5, thanks", (4, "thanks")),
        ("2.", (2, "")),
        ("1\n\nnobody answered for days", (1, "nobody answered for days")),
        ("10", None),
        ("0", None),
        ("6", None),
        ("1234 Main St", None),
        ("5great", None),
        ("great, 5", None),
        ("2 questions: where is my order?", None),  # a new request, not a rating
        ("", None),
    ],
)
def test_parse_answer(text: str, expected: tuple[int, str] | None) -> None:
    assert parse_answer(text) == expected


async def sms_in(fake: FakeTwilio, hub: Hub, body: str, sid: str | None = None) -> str:
    sid = sid or f"SM{next(_sids):032x}"
    params = {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": fake.account_sid,
        "From": CUSTOMER_PHONE,
        "To": SMS_NUMBER,
        "Body": body,
        "NumMedia": "0",
    }
    status, text = await fake.post_webhook(f"{hub.config.hub.public_url}/twilio/sms/sms", params)
    assert status == 200, text
    return sid


async def sms_reply(hub: Hub, conversation_id: str) -> None:
    recorded = await hub.store.append(
        conversation_id,
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=agent_author("alice"),
            channel="sms",
            channel_type=ChannelType.SMS,
            text="Your order ships today.",
            delivery_state=DeliveryState.QUEUED,
            data={"to": {"kind": "phone", "value": CUSTOMER_PHONE}},
        ),
    )
    await hub.bus.publish([recorded.event])


async def timeline(hub: Hub) -> list[Event]:
    customer = await hub.store.find_customer(Identity(IdentityKind.PHONE, CUSTOMER_PHONE))
    assert customer is not None
    page = await hub.store.customer_timeline(customer.id, limit=100)
    return list(reversed(page.items))


async def resolved_and_surveyed(hub: Hub, fake: FakeTwilio) -> tuple[str, str]:
    """A customer's SMS conversation, answered, resolved and surveyed: (conv, survey)."""
    await sms_in(fake, hub, "Where is my order?")
    [first] = await timeline(hub)
    assert first.conversation_id
    await sms_reply(hub, first.conversation_id)
    await hub.set_status(first.conversation_id, ConversationStatus.RESOLVED)

    async def asked() -> Any:
        questions = [m for m in fake.sent_messages if m.value("Body") == QUESTION]
        return questions if questions else None

    [question] = await eventually(asked)
    assert question.value("To") == CUSTOMER_PHONE
    raw = await hub.store.get_state(SURVEY_PREFIX + first.customer_id)
    assert raw
    survey = next(e for e in await timeline(hub) if "csat_request" in e.data)
    assert survey.author == "system" and survey.channel == "sms"
    return first.conversation_id, survey.id


async def test_sms_answer_is_recorded_on_the_resolved_conversation(
    make_hub: MakeHub, fake_twilio: FakeTwilio
) -> None:
    hub = await make_hub(CSAT_YAML, fake=fake_twilio)
    conv_id, survey_id = await resolved_and_surveyed(hub, fake_twilio)

    sid = await sms_in(fake_twilio, hub, "4 - quick, thanks")
    await sms_in(fake_twilio, hub, "4 - quick, thanks", sid=sid)  # Twilio retries: same event
    events = await timeline(hub)
    answers = [e for e in events if "csat" in e.data]
    assert len(answers) == 1
    [answer] = answers
    assert answer.conversation_id == conv_id and answer.direction is Direction.IN
    assert answer.data["csat"]["score"] == 4
    assert answer.data["csat"]["comment"] == "quick, thanks"
    assert answer.data["csat"]["survey"] == survey_id
    assert answer.data["routable"] is False and not is_routable(answer)
    conv = await hub.store.get_conversation(conv_id)
    assert conv is not None and conv.status is ConversationStatus.RESOLVED
    assert await hub.store.active_conversation(answer.customer_id) is None
    csat = hub.app[CSAT]
    assert csat.responses[4] == 1 and csat.asked == 1

    # The survey is closed now: another "5" is a new message for an agent.
    await sms_in(fake_twilio, hub, "5")
    last = (await timeline(hub))[-1]
    assert last.text == "5" and "csat" not in last.data and last.conversation_id != conv_id
    assert is_routable(last)


async def test_answers_outside_the_window_or_with_questions_are_normal_messages(
    make_hub: MakeHub, fake_twilio: FakeTwilio
) -> None:
    hub = await make_hub(CSAT_YAML, fake=fake_twilio)
    conv_id, _ = await resolved_and_surveyed(hub, fake_twilio)
    assert await hub.app[CSAT].ask(conv_id) is None  # its survey is open: not asked twice
    await sms_in(fake_twilio, hub, "3 but where is my refund?")
    question = (await timeline(hub))[-1]
    assert "csat" not in question.data and question.conversation_id != conv_id
    await hub.set_status(question.conversation_id or "", ConversationStatus.RESOLVED)

    csat = hub.app[CSAT]
    later = csat.clock() + timedelta(days=4)
    csat.clock = lambda: later
    await sms_in(fake_twilio, hub, "5")
    last = (await timeline(hub))[-1]
    assert last.text == "5" and "csat" not in last.data


async def test_unanswered_or_reopened_conversations_are_not_surveyed(
    make_hub: MakeHub, fake_twilio: FakeTwilio
) -> None:
    hub = await make_hub(CSAT_YAML, fake=fake_twilio)
    csat = hub.app[CSAT]
    await sms_in(fake_twilio, hub, "spam spam")
    [first] = await timeline(hub)
    assert first.conversation_id
    assert await csat.ask(first.conversation_id) is None  # still open
    await hub.set_status(first.conversation_id, ConversationStatus.RESOLVED)
    assert await csat.ask(first.conversation_id) is None  # nobody ever answered it
    assert not [m for m in fake_twilio.sent_messages if m.value("Body") == QUESTION]


async def test_widget_buttons_record_the_rating(make_hub: MakeHub) -> None:
    hub = await make_hub(CSAT_YAML)
    ws = await hub.client.ws_connect("/chat/web/ws")
    await ws.send_json({"type": "hello", "name": "Vera"})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome"
    await ws.send_json({"type": "message", "client_id": "c1", "text": "help please"})

    async def frame_of(kind: str) -> dict[str, Any]:
        while True:
            frame = await ws.receive_json(timeout=5)
            if frame["type"] == kind:
                return dict(frame)

    ack = await frame_of("ack")
    event = await hub.store.get_event(ack["event_id"])
    assert event is not None and event.conversation_id
    await hub.agent_reply(event.conversation_id)
    await hub.set_status(event.conversation_id, ConversationStatus.RESOLVED)
    while True:
        frame = await frame_of("event")
        if "csat" in frame["event"]:
            break
    survey = frame["event"]["csat"]
    assert survey["scale"] == 5 and frame["event"]["text"] == QUESTION

    await ws.send_json({"type": "csat", "survey": "0" * 26, "score": 5})
    assert (await frame_of("error"))["code"] == "csat_closed"  # not this visitor's survey
    await ws.send_json({"type": "csat", "survey": survey["survey"], "score": 9})
    assert (await frame_of("error"))["code"] == "bad_frame"
    await ws.send_json(
        {"type": "csat", "survey": survey["survey"], "score": 2, "comment": "too slow"}
    )
    saved = await frame_of("csat_saved")
    assert saved == {"type": "csat_saved", "survey": survey["survey"], "score": 2}
    echoed = (await frame_of("event"))["event"]
    assert echoed["direction"] == "in" and echoed["text"] == "2/5 too slow"
    await ws.send_json({"type": "csat", "survey": survey["survey"], "score": 5})
    assert (await frame_of("error"))["code"] == "csat_closed"  # one answer per survey
    await ws.close()

    page = await hub.store.conversation_events(event.conversation_id, limit=50)
    [answer] = [e for e in page.items if "csat" in e.data]
    assert answer.data["csat"] == {
        "score": 2,
        "comment": "too slow",
        "survey": survey["survey"],
        "asked_at": answer.data["csat"]["asked_at"],
    }
    conv = await hub.store.get_conversation(event.conversation_id)
    assert conv is not None and conv.status is ConversationStatus.RESOLVED


async def test_csat_frame_without_csat_enabled_is_unsupported(make_hub: MakeHub) -> None:
    hub = await make_hub()
    ws = await hub.client.ws_connect("/chat/web/ws")
    await ws.send_json({"type": "hello"})
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"
    await ws.send_json({"type": "csat", "survey": "0" * 26, "score": 5})
    while (frame := await ws.receive_json(timeout=5))["type"] != "error":
        pass
    assert frame["code"] == "unsupported"
    await ws.close()


async def test_survey_schedule_survives_a_restart(make_hub: MakeHub) -> None:
    hub = await make_hub(CSAT_YAML.replace("delay_seconds: 0", "delay_seconds: 1h"))
    csat = hub.app[CSAT]
    recorded = await hub.chat("visitor-later", "hello")
    conv_id = recorded.event.conversation_id
    assert conv_id
    await hub.agent_reply(conv_id)
    await hub.set_status(conv_id, ConversationStatus.RESOLVED)

    async def scheduled() -> bool:
        return conv_id in (await hub.store.get_state("csat.schedule") or "")

    await eventually(scheduled)
    assert await csat.run_due() == 0  # not due yet
    await csat.stop()
    # A new service over the same store (as after a restart) asks once it is due.
    from hub.reports.csat import CsatService

    later = csat.clock() + timedelta(hours=2)
    again = CsatService(hub.config, hub.store, hub.bus, clock=lambda: later)
    assert await again.run_due() == 1
    assert await again.run_due() == 0
