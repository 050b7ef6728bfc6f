"""SMS/MMS in, replies out through the outbox and the official client, status callbacks."""

from __future__ import annotations

import pytest

from hub import outbox as outbox_module
from hub.channels.sms import OPT_OUT_REFUSAL, OPT_OUT_TAG
from hub.model import (
    ChannelType,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    agent_author,
)
from tests.twilio.conftest import (
    CUSTOMER,
    PASSWORD,
    SMS_NUMBER,
    Hub,
    MakeHub,
    fixture,
    xml,
)


def assert_empty_twiml(text: str) -> None:
    root = xml(text)
    assert root.tag == "Response"
    assert list(root) == []


async def queue_reply(hub: Hub, event: Event, text: str = "We are on it!") -> Event:
    """An agent's reply queued in the outbox, as the inbox API writes it."""
    assert event.conversation_id is not None
    recorded = await hub.store.append(
        event.conversation_id,
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=agent_author("alice"),
            channel="sms",
            channel_type=ChannelType.SMS,
            text=text,
            delivery_state=DeliveryState.QUEUED,
            data={"to": {"kind": "phone", "value": CUSTOMER}},
        ),
    )
    return recorded.event


async def first_sms(hub: Hub) -> Event:
    status, _ = await hub.post_fixture("sms_inbound")
    assert status == 200
    events = await hub.customer_events()
    return next(e for e in events if e.kind is EventKind.MESSAGE)


async def sent_reply(hub: Hub) -> tuple[Event, str]:
    """A reply that went out; returns it (sent) and its Twilio SID."""
    reply = await queue_reply(hub, await first_sms(hub))
    assert await hub.outbox.run_once() == 1
    event = await hub.store.get_event(reply.id)
    assert event is not None and event.delivery_state is DeliveryState.SENT
    assert event.external_id and event.external_id.startswith("SM")
    return event, event.external_id


# --- inbound ----------------------------------------------------------------------------


async def test_inbound_sms_is_stored_and_answered_with_empty_twiml(hub: Hub) -> None:
    status, body = await hub.post_fixture("sms_inbound")
    assert status == 200
    assert_empty_twiml(body)
    events = await hub.customer_events()
    [message] = [e for e in events if e.kind is EventKind.MESSAGE]
    params = fixture("sms_inbound")["params"]
    assert message.text == params["Body"]
    assert message.external_id == params["MessageSid"]
    assert message.channel == "sms" and message.channel_type is ChannelType.SMS
    assert message.direction is Direction.IN
    assert message.data["from"] == CUSTOMER
    customer = await hub.store.get_customer(message.customer_id)
    assert customer is not None
    assert Identity(IdentityKind.PHONE, CUSTOMER) in customer.identities


async def test_twiml_answer_is_text_xml(hub: Hub) -> None:
    params = fixture("sms_inbound")["params"]
    url = hub.url("sms", "sms")
    response = await hub.client.post(
        "/twilio/sms/sms",
        data=params,
        headers={"X-Twilio-Signature": hub.fake.sign(url, params)},
    )
    assert response.status == 200
    assert response.content_type == "text/xml"
    assert_empty_twiml(await response.text())


async def test_redelivered_sms_makes_one_event(hub: Hub) -> None:
    for _ in range(3):
        status, body = await hub.post_fixture("sms_inbound")
        assert status == 200
        assert_empty_twiml(body)
    events = await hub.customer_events()
    assert len([e for e in events if e.kind is EventKind.MESSAGE]) == 1


async def test_national_number_is_normalized_to_e164(hub: Hub) -> None:
    status, _ = await hub.post_fixture("sms_inbound", {"From": "(415) 555-0123"})
    assert status == 200
    assert len(await hub.customer_events(CUSTOMER)) >= 1


async def test_malformed_sender_is_400_and_nothing_stored(hub: Hub) -> None:
    status, body = await hub.post_fixture("sms_inbound", {"From": "+1 555 CALL-NOW"})
    assert status == 400
    assert "not a" in body and "phone number" in body
    sid = fixture("sms_inbound")["params"]["MessageSid"]
    assert await hub.store.find_event("sms", sid) is None


async def test_mms_media_become_attachments(hub: Hub) -> None:
    status, body = await hub.post_fixture("mms_inbound_2_media")
    assert status == 200
    assert_empty_twiml(body)
    params = fixture("mms_inbound_2_media")["params"]
    event = await hub.store.find_event("sms", params["MessageSid"])
    assert event is not None
    assert [(a.content_type, a.url) for a in event.attachments] == [
        ("image/jpeg", params["MediaUrl0"]),
        ("application/pdf", params["MediaUrl1"]),
    ]
    assert event.attachments[0].filename.endswith(".jpg")
    assert "rejected_media" not in event.data


async def test_mms_media_of_refused_types_are_recorded_as_rejected(hub: Hub) -> None:
    params = fixture("mms_inbound_2_media")["params"]
    bad_url = params["MediaUrl1"].replace("ME1a", "ME9z")
    status, _ = await hub.post_fixture(
        "mms_inbound_2_media",
        {"NumMedia": "3", "MediaContentType2": "application/x-msdownload", "MediaUrl2": bad_url},
    )
    assert status == 200
    event = await hub.store.find_event("sms", params["MessageSid"])
    assert event is not None
    assert len(event.attachments) == 2
    [rejected] = event.data["rejected_media"]
    assert rejected["url"] == bad_url
    assert rejected["content_type"] == "application/x-msdownload"


# --- outbound ---------------------------------------------------------------------------


async def test_reply_goes_out_through_the_official_client(hub: Hub) -> None:
    event, _ = await sent_reply(hub)
    [request] = hub.fake.sent_messages
    assert request.value("To") == CUSTOMER
    assert request.value("From") == SMS_NUMBER
    assert request.value("Body") == "We are on it!"
    assert request.value("StatusCallback") == "https://hub.example.com/twilio/sms/sms/status"
    assert request.auth is not None and request.auth[0] == request.path.split("/")[3]
    assert request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert request.headers["User-Agent"].startswith("twilio-python/")
    assert event.delivery_error is None


async def test_status_callbacks_move_the_reply_to_delivered(hub: Hub) -> None:
    event, sid = await sent_reply(hub)
    for status in ("queued", "sent", "delivered"):
        code, body = await hub.fake.send_status(sid, status)
        assert code == 200
        assert_empty_twiml(body)
    updated = await hub.store.get_event(event.id)
    assert updated is not None and updated.delivery_state is DeliveryState.DELIVERED


async def test_out_of_order_callbacks_never_go_backwards(hub: Hub) -> None:
    event, sid = await sent_reply(hub)
    await hub.fake.send_status(sid, "delivered")
    await hub.fake.send_status(sid, "sent")
    await hub.fake.send_status(sid, "queued")
    updated = await hub.store.get_event(event.id)
    assert updated is not None and updated.delivery_state is DeliveryState.DELIVERED
    # A late "queued" never puts the message back in the outbox.
    assert await hub.outbox.run_once() == 0
    assert len(hub.fake.sent_messages) == 1


async def test_late_queued_after_sent_does_not_resend(hub: Hub) -> None:
    event, sid = await sent_reply(hub)
    await hub.fake.send_status(sid, "queued")
    updated = await hub.store.get_event(event.id)
    assert updated is not None and updated.delivery_state is DeliveryState.SENT
    assert await hub.outbox.run_once() == 0


@pytest.mark.parametrize(
    ("name", "state", "error"),
    [
        ("sms_status_undelivered_30005", DeliveryState.UNDELIVERED, "30005: Unknown destination"),
        ("sms_status_failed", DeliveryState.FAILED, "30008: Unknown error"),
        ("sms_status_delivered", DeliveryState.DELIVERED, None),
        ("sms_status_sent", DeliveryState.SENT, None),
    ],
)
async def test_recorded_status_callbacks(
    hub: Hub, name: str, state: DeliveryState, error: str | None
) -> None:
    event, sid = await sent_reply(hub)
    status, body = await hub.post_fixture(name, {"MessageSid": sid, "SmsSid": sid})
    assert status == 200
    assert_empty_twiml(body)
    updated = await hub.store.get_event(event.id)
    assert updated is not None
    assert updated.delivery_state is state
    if error is None:
        assert updated.delivery_error is None
    else:
        assert updated.delivery_error is not None and updated.delivery_error.startswith(error)


async def test_status_update_is_published_on_the_bus(hub: Hub) -> None:
    event, sid = await sent_reply(hub)
    subscription = hub.sms.services.bus.subscribe("test")
    await hub.fake.send_status(sid, "delivered")
    item = await subscription.get()
    assert isinstance(item, Event)
    assert item.id == event.id and item.delivery_state is DeliveryState.DELIVERED


async def test_status_callback_for_unknown_message_is_acknowledged(hub: Hub) -> None:
    status, _ = await hub.post_fixture("sms_status_delivered")
    assert status == 200


async def test_twilio_500_then_201_is_retried_until_sent(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retry at once instead of after the backoff.
    monkeypatch.setattr(outbox_module, "retry_delay", lambda attempts: 0.0)
    reply = await queue_reply(hub, await first_sms(hub))
    hub.fake.fail_next(500, 20500, "Internal Server Error")
    assert await hub.outbox.run_once() == 1
    waiting = await hub.store.get_event(reply.id)
    assert waiting is not None and waiting.delivery_state is DeliveryState.QUEUED
    assert waiting.delivery_error and "500" in waiting.delivery_error
    assert await hub.outbox.run_once() == 1
    sent = await hub.store.get_event(reply.id)
    assert sent is not None and sent.delivery_state is DeliveryState.SENT
    assert len(hub.fake.sent_messages) == 2
    assert sent.external_id is not None
    await hub.fake.send_status(sent.external_id, "delivered")
    delivered = await hub.store.get_event(reply.id)
    assert delivered is not None and delivered.delivery_state is DeliveryState.DELIVERED


async def test_twilio_429_is_retried(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "retry_delay", lambda attempts: 0.0)
    reply = await queue_reply(hub, await first_sms(hub))
    hub.fake.fail_next(429, 20429, "Too Many Requests", times=2)
    for _ in range(2):
        await hub.outbox.run_once()
        waiting = await hub.store.get_event(reply.id)
        assert waiting is not None and waiting.delivery_state is DeliveryState.QUEUED
    await hub.outbox.run_once()
    sent = await hub.store.get_event(reply.id)
    assert sent is not None and sent.delivery_state is DeliveryState.SENT


async def test_twilio_400_fails_with_twilios_message(hub: Hub) -> None:
    reply = await queue_reply(hub, await first_sms(hub))
    message = f"The 'To' number {CUSTOMER} is not a valid phone number."
    hub.fake.fail_next(400, 21211, message)
    await hub.outbox.run_once()
    failed = await hub.store.get_event(reply.id)
    assert failed is not None and failed.delivery_state is DeliveryState.FAILED
    assert failed.delivery_error == f"Twilio error 21211: {message}"
    # Failed for good: never retried.
    assert await hub.outbox.run_once() == 0


async def test_twilio_unreachable_is_retried(make_hub: MakeHub) -> None:
    hub = await make_hub()
    reply = await queue_reply(hub, await first_sms(hub))
    await hub.fake.close()  # nothing listens there any more
    await hub.outbox.run_once()
    waiting = await hub.store.get_event(reply.id)
    assert waiting is not None and waiting.delivery_state is DeliveryState.QUEUED
    assert waiting.delivery_error and "unreachable" in waiting.delivery_error


# --- STOP / START / HELP ----------------------------------------------------------------


async def test_stop_opts_out_and_replies_are_refused(hub: Hub) -> None:
    event = await first_sms(hub)
    status, body = await hub.post_fixture(
        "sms_inbound", {"Body": " stop ", "MessageSid": "SM" + "1" * 32, "SmsSid": "SM" + "1" * 32}
    )
    assert status == 200
    assert_empty_twiml(body)
    customer = await hub.store.get_customer(event.customer_id)
    assert customer is not None and OPT_OUT_TAG in customer.tags
    notes = [e for e in await hub.customer_events() if e.kind is EventKind.NOTE]
    assert len(notes) == 1 and "STOP" in notes[0].text
    assert notes[0].data["sms_opt_out"] is True

    reply = await queue_reply(hub, event)
    await hub.outbox.run_once()
    refused = await hub.store.get_event(reply.id)
    assert refused is not None and refused.delivery_state is DeliveryState.FAILED
    assert refused.delivery_error == OPT_OUT_REFUSAL
    assert hub.fake.sent_messages == []


async def test_start_opts_back_in(hub: Hub) -> None:
    event = await first_sms(hub)
    for n, word in enumerate(("UNSUBSCRIBE", "Start")):
        sid = f"SM{n:032d}"
        await hub.post_fixture("sms_inbound", {"Body": word, "MessageSid": sid, "SmsSid": sid})
    customer = await hub.store.get_customer(event.customer_id)
    assert customer is not None and OPT_OUT_TAG not in customer.tags
    await queue_reply(hub, event)
    await hub.outbox.run_once()
    assert len(hub.fake.sent_messages) == 1


async def test_replayed_stop_after_start_does_not_opt_out_again(hub: Hub) -> None:
    event = await first_sms(hub)
    stop = {"Body": "STOP", "MessageSid": "SM" + "a" * 32, "SmsSid": "SM" + "a" * 32}
    start = {"Body": "START", "MessageSid": "SM" + "b" * 32, "SmsSid": "SM" + "b" * 32}
    for params in (stop, start, stop):
        await hub.post_fixture("sms_inbound", params)
    customer = await hub.store.get_customer(event.customer_id)
    assert customer is not None and OPT_OUT_TAG not in customer.tags


async def test_twilio_21610_marks_the_customer_opted_out(hub: Hub) -> None:
    event = await first_sms(hub)
    reply = await queue_reply(hub, event)
    hub.fake.fail_next(400, 21610, "Attempt to send to unsubscribed recipient")
    await hub.outbox.run_once()
    failed = await hub.store.get_event(reply.id)
    assert failed is not None and failed.delivery_state is DeliveryState.FAILED
    assert failed.delivery_error == "Twilio error 21610: Attempt to send to unsubscribed recipient"
    customer = await hub.store.get_customer(event.customer_id)
    assert customer is not None and OPT_OUT_TAG in customer.tags


async def test_help_is_recorded_without_opting_out(hub: Hub) -> None:
    await hub.post_fixture("sms_inbound", {"Body": "HELP"})
    [message] = [e for e in await hub.customer_events() if e.kind is EventKind.MESSAGE]
    assert message.data["sms_keyword"] == "HELP"
    customer = await hub.store.get_customer(message.customer_id)
    assert customer is not None and OPT_OUT_TAG not in customer.tags


# --- end to end -------------------------------------------------------------------------


async def test_end_to_end_sms_in_reply_from_inbox_delivered(make_hub: MakeHub) -> None:
    hub = await make_hub(inbox=True)
    # 1. The customer texts; Twilio posts the signed webhook.
    status, _ = await hub.post_fixture("sms_inbound")
    assert status == 200
    [message] = [e for e in await hub.customer_events() if e.kind is EventKind.MESSAGE]
    assert message.conversation_id is not None
    # 2. The agent signs in to the inbox and replies.
    login = await hub.client.post(
        "/api/v1/auth/login", json={"login": "alice", "password": PASSWORD}
    )
    assert login.status == 200, await login.text()
    token = (await login.json())["token"]
    response = await hub.client.post(
        f"/api/v1/conversations/{message.conversation_id}/replies",
        json={"text": "Your parcel left the depot this morning."},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 202, await response.text()
    reply_id = (await response.json())["event"]["id"]
    # 3. The outbox hands it to the loopback Twilio, which sees the right message.
    assert await hub.outbox.run_once() == 1
    [request] = hub.fake.sent_messages
    assert request.value("To") == CUSTOMER
    assert request.value("From") == SMS_NUMBER
    assert request.value("Body") == "Your parcel left the depot this morning."
    sent = await hub.store.get_event(reply_id)
    assert sent is not None and sent.delivery_state is DeliveryState.SENT
    # 4. Twilio's signed status callbacks mark it delivered.
    assert sent.external_id is not None
    for twilio_status in ("sent", "delivered"):
        code, _ = await hub.fake.send_status(sent.external_id, twilio_status)
        assert code == 200
    delivered = await hub.store.get_event(reply_id)
    assert delivered is not None and delivered.delivery_state is DeliveryState.DELIVERED
    # The agent sees it through the API too.
    detail = await hub.client.get(
        f"/api/v1/conversations/{message.conversation_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    timeline = (await detail.json())["timeline"]["items"]
    [shown] = [e for e in timeline if e["id"] == reply_id]
    assert shown["delivery_state"] == "delivered"
