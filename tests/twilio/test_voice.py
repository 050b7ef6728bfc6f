"""Calls: TwiML answers checked as XML, call events on the timeline, call-backs."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit
from xml.etree.ElementTree import Element

import pytest

from hub.channels.base import PermanentSendError
from hub.channels.voice import CallContext
from hub.model import Agent, Direction, Event, EventKind, Presence
from tests.twilio.conftest import (
    ALICE_PHONE,
    BOB_PHONE,
    CUSTOMER,
    PASSWORD,
    VOICE_NUMBER,
    Hub,
    MakeHub,
    fixture,
    xml,
)

VOICE = "https://hub.example.com/twilio/phone/voice"


def verbs(root: Element) -> list[str]:
    return [child.tag for child in root]


def call_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind in (EventKind.CALL, EventKind.VOICEMAIL)]


async def only_call_event(hub: Hub, status: str) -> Event:
    [event] = [e for e in call_events(await hub.customer_events()) if e.data["status"] == status]
    return event


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# --- incoming call ----------------------------------------------------------------------


async def test_incoming_call_greets_offers_menu_and_dials_an_agent(hub: Hub) -> None:
    status, body = await hub.post_fixture("voice_incoming")
    assert status == 200
    root = xml(body)
    assert root.tag == "Response"
    assert verbs(root) == ["Say", "Gather", "Dial"]
    say, gather, dial = list(root)
    assert say.text == "Thank you for calling Acme."
    assert gather.attrib == {
        "action": f"{VOICE}/gather",
        "method": "POST",
        "numDigits": "1",
        "timeout": "5",
    }
    assert [s.text for s in gather] == ["For Sales, press 1.", "For Support, press 2."]
    assert dial.attrib["timeout"] == "25"
    assert dial.attrib["action"] == f"{VOICE}/dial-result?agent=alice"
    assert dial.attrib["method"] == "POST"
    [number] = list(dial)
    assert number.tag == "Number" and number.text == ALICE_PHONE

    [ringing] = call_events(await hub.customer_events())
    call_sid = fixture("voice_incoming")["params"]["CallSid"]
    assert ringing.external_id == f"{call_sid}:ringing"
    assert ringing.kind is EventKind.CALL and ringing.direction is Direction.IN
    assert ringing.data["status"] == "ringing" and ringing.data["call_sid"] == call_sid
    assert ringing.conversation_id is not None


async def test_call_joins_the_customers_sms_conversation(hub: Hub) -> None:
    await hub.post_fixture("sms_inbound")
    await hub.post_fixture("voice_incoming")
    events = await hub.customer_events()
    assert {e.conversation_id for e in events} == {events[0].conversation_id}
    assert {e.channel for e in events} == {"sms", "phone"}


async def test_redelivered_incoming_call_makes_one_event(hub: Hub) -> None:
    for _ in range(2):
        status, _ = await hub.post_fixture("voice_incoming")
        assert status == 200
    assert len(call_events(await hub.customer_events())) == 1


async def test_without_ivr_the_call_goes_straight_to_the_agent(make_hub: MakeHub) -> None:
    hub = await make_hub(ivr=False)
    _, body = await hub.post_fixture("voice_incoming")
    assert verbs(xml(body)) == ["Say", "Dial"]


async def test_no_agent_means_voicemail(make_hub: MakeHub) -> None:
    hub = await make_hub(agent_phones=False, ivr=False)
    _, body = await hub.post_fixture("voice_incoming")
    root = xml(body)
    assert verbs(root) == ["Say", "Say", "Record", "Say", "Hangup"]
    assert "leave a message" in (root[1].text or "")
    record = root[2]
    assert record.attrib == {
        "action": f"{VOICE}/recording",
        "method": "POST",
        "maxLength": "120",
        "playBeep": "true",
        "transcribeCallback": f"{VOICE}/transcription",
    }


async def test_no_agent_and_no_voicemail_means_the_queue(make_hub: MakeHub) -> None:
    hub = await make_hub(agent_phones=False, ivr=False, voicemail=False)
    _, body = await hub.post_fixture("voice_incoming")
    root = xml(body)
    assert verbs(root) == ["Say", "Say", "Enqueue"]
    enqueue = root[2]
    assert enqueue.text == "phone"
    assert enqueue.attrib == {"waitUrl": f"{VOICE}/wait", "waitUrlMethod": "POST"}
    # What the waiting caller hears: their position, then a pause before the next round.
    status, wait_body = await hub.post(
        "voice/wait",
        {**fixture("voice_incoming")["params"], "QueuePosition": "3", "CallStatus": "queued"},
    )
    assert status == 200
    wait = xml(wait_body)
    assert verbs(wait) == ["Say", "Say", "Pause"]
    assert wait[0].text == "You are number 3 in the queue."


async def test_withheld_number_still_gets_connected_but_nothing_is_filed(hub: Hub) -> None:
    status, body = await hub.post_fixture(
        "voice_incoming", {"From": "+266696687", "Caller": "+266696687"}
    )
    assert status == 200
    assert "Dial" in verbs(xml(body))
    assert await hub.customer_events("+266696687") == []
    assert call_events(await hub.customer_events()) == []


async def test_record_calls_asks_twilio_to_record_the_dial(make_hub: MakeHub) -> None:
    hub = await make_hub(record_calls=True, ivr=False)
    _, body = await hub.post_fixture("voice_incoming")
    dial = xml(body)[1]
    assert dial.attrib["record"] == "record-from-answer-dual"
    assert dial.attrib["recordingStatusCallback"] == f"{VOICE}/recording?kind=call"


# --- IVR --------------------------------------------------------------------------------


async def test_gather_routes_to_the_chosen_queue(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    status, body = await hub.post_fixture("voice_gather", {"Digits": "2"})
    assert status == 200
    root = xml(body)
    assert verbs(root) == ["Dial"]
    dial = root[0]
    # Support needs the billing skill: Bob has it, Alice not.
    assert dial[0].text == BOB_PHONE
    assert query_of(dial.attrib["action"]) == {"agent": ["bob"], "queue": ["support"]}
    ivr = await only_call_event(hub, "ivr")
    assert ivr.data["queue"] == "support" and ivr.text == "Caller chose Support (2)"


async def test_gather_with_an_unknown_digit_repeats_the_menu(hub: Hub) -> None:
    _, body = await hub.post_fixture("voice_gather", {"Digits": "9"})
    root = xml(body)
    assert verbs(root) == ["Say", "Gather", "Dial"]
    assert root[0].text == "Sorry, that is not an option."


# --- dial result, status, voicemail -----------------------------------------------------


async def test_answered_dial_records_the_agent(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    status, body = await hub.post_fixture("voice_dial_result_completed")
    assert status == 200
    assert verbs(xml(body)) == ["Hangup"]
    answered = await only_call_event(hub, "answered")
    assert answered.text == "Answered by Alice"
    assert answered.data["agent"] == "alice" and answered.data["duration"] == 184


async def test_unanswered_dial_is_a_missed_call_with_voicemail(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    status, body = await hub.post_fixture("voice_dial_result_no_answer")
    assert status == 200
    root = xml(body)
    assert verbs(root) == ["Say", "Record", "Say", "Hangup"]
    assert root[1].attrib["action"] == f"{VOICE}/recording"
    missed = await only_call_event(hub, "missed")
    assert missed.data["callback_requested"] is True
    assert missed.data["reason"] == "no-answer"
    assert missed.text == "Missed call (no-answer)"


async def test_unanswered_dial_without_voicemail_queues(make_hub: MakeHub) -> None:
    hub = await make_hub(voicemail=False)
    _, body = await hub.post_fixture(
        "voice_dial_result_no_answer", query={"agent": "bob", "queue": "support"}
    )
    root = xml(body)
    assert verbs(root) == ["Say", "Enqueue"]
    assert root[1].text == "support"


async def test_completed_call_records_its_duration(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    status, _ = await hub.post_fixture("voice_status_completed")
    assert status == 200
    ended = await only_call_event(hub, "completed")
    assert ended.data["duration"] == 203
    assert ended.text == "Call ended after 3m 23s"


async def test_voicemail_and_its_transcription(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    await hub.post_fixture("voice_dial_result_no_answer")
    for _ in range(2):  # each delivered twice: still one event each
        status, body = await hub.post_fixture("voice_recording")
        assert status == 200
        assert verbs(xml(body)) == ["Say", "Hangup"]
        status, body = await hub.post_fixture("voice_transcription")
        assert status == 200
        assert verbs(xml(body)) == []
    recording = fixture("voice_recording")["params"]
    voicemails = [e for e in await hub.customer_events() if e.kind is EventKind.VOICEMAIL]
    assert len(voicemails) == 2
    voicemail, transcription = voicemails
    assert voicemail.data["recording_url"] == recording["RecordingUrl"]
    assert voicemail.data["duration"] == 17
    [audio] = voicemail.attachments
    assert audio.url == recording["RecordingUrl"] and audio.content_type == "audio/wav"
    text = fixture("voice_transcription")["params"]["TranscriptionText"]
    assert transcription.text == f"Voicemail transcription: {text}"
    assert transcription.data["voicemail_event"] == voicemail.id
    assert transcription.data["recording_sid"] == recording["RecordingSid"]


async def test_whole_call_lands_on_one_conversation(hub: Hub) -> None:
    for name in ("voice_incoming", "voice_gather", "voice_dial_result_completed"):
        await hub.post_fixture(name)
    await hub.post_fixture("voice_status_completed")
    events = call_events(await hub.customer_events())
    assert [e.data["status"] for e in events] == ["ringing", "ivr", "answered", "completed"]
    assert len({e.conversation_id for e in events}) == 1


# --- choosing the agent -----------------------------------------------------------------


async def test_presence_decides_who_is_rung(make_hub: MakeHub) -> None:
    from hub.inbox.presence import PRESENCE_KEY

    hub = await make_hub(inbox=True, ivr=False)
    _, body = await hub.post_fixture("voice_incoming")
    assert "Record" in verbs(xml(body))  # nobody online: voicemail
    await hub.client.app[PRESENCE_KEY].set("bob", Presence.ONLINE)
    _, body = await hub.post_fixture("voice_incoming")
    assert xml(body)[1][0].text == BOB_PHONE


async def test_the_chooser_is_pluggable(hub: Hub) -> None:
    seen: list[CallContext] = []

    async def router(call: CallContext) -> Agent | None:
        seen.append(call)
        return hub.config.agent("bob")

    hub.voice.choose_agent = router  # type: ignore[method-assign]
    await hub.post_fixture("voice_gather", {"Digits": "1"})
    _, body = await hub.post_fixture("voice_incoming")
    assert xml(body)[2][0].text == BOB_PHONE
    assert seen[-1].queue is None and seen[-1].conversation_id is not None
    assert seen[0].queue == "sales"


# --- call-back --------------------------------------------------------------------------


async def test_agent_call_back(hub: Hub) -> None:
    await hub.post_fixture("sms_inbound")
    alice = hub.config.agent("alice")
    call_sid = await hub.voice.call_back("(415) 555-0123", alice)
    assert call_sid.startswith("CA")

    [request] = [r for r in hub.fake.received if r.path.endswith("/Calls.json")]
    assert request.value("To") == ALICE_PHONE
    assert request.value("From") == VOICE_NUMBER
    assert request.value("Url") == f"{VOICE}/connect?to=%2B14155550123"
    assert request.value("StatusCallback") == f"{VOICE}/status"

    # Alice answers: Twilio fetches the TwiML that rings the customer from our number.
    root = xml(await hub.fake.fetch_call_twiml(call_sid))
    assert verbs(root) == ["Say", "Dial"]
    dial = root[1]
    assert dial.attrib["callerId"] == VOICE_NUMBER
    assert [n.tag for n in dial] == ["Number"] and dial[0].text == CUSTOMER

    status, _ = await hub.fake.end_call(call_sid, duration=95)
    assert status == 200
    events = await hub.customer_events()
    callback, ended = call_events(events)
    assert callback.direction is Direction.OUT and callback.author == "agent:alice"
    assert callback.text == f"Call-back to {CUSTOMER} by Alice"
    assert ended.direction is Direction.OUT and ended.data["duration"] == 95
    assert {e.conversation_id for e in events} == {events[0].conversation_id}


async def test_call_back_refused_by_twilio(hub: Hub) -> None:
    hub.fake.fail_next(400, 21215, "Geo Permission configuration is not permitting call")
    with pytest.raises(PermanentSendError, match="21215: Geo Permission"):
        await hub.voice.call_back(CUSTOMER, hub.config.agent("alice"))


async def test_voice_channel_cannot_send_text(hub: Hub) -> None:
    from hub.model import ChannelType, Identity, IdentityKind, Outbound

    with pytest.raises(PermanentSendError):
        await hub.voice.send(
            Outbound(
                event_id="x",
                channel="phone",
                channel_type=ChannelType.VOICE,
                to=Identity(IdentityKind.PHONE, CUSTOMER),
                text="hi",
            )
        )
    assert hub.voice.status() == {"ok": True, "phone_number": VOICE_NUMBER}


async def test_typed_reply_after_a_call_leaves_by_sms_to_the_caller(make_hub: MakeHub) -> None:
    hub = await make_hub(inbox=True)
    status, _ = await hub.post_fixture("voice_incoming")
    assert status == 200
    caller = fixture("voice_incoming")["params"]["From"]
    [call] = [e for e in await hub.customer_events(caller) if e.kind is EventKind.CALL]
    login = await hub.client.post(
        "/api/v1/auth/login", json={"login": "alice", "password": PASSWORD}
    )
    token = (await login.json())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    response = await hub.client.post(
        f"/api/v1/conversations/{call.conversation_id}/replies",
        json={"text": "Sorry we missed you, call back any time."},
        headers=headers,
    )
    assert response.status == 202, await response.text()
    assert (await response.json())["event"]["channel"] == "sms"
    assert await hub.outbox.run_once() == 1
    [request] = hub.fake.sent_messages
    assert request.value("To") == caller
    # Asking for the voice line explicitly is refused with a reason, nothing queued.
    refused = await hub.client.post(
        f"/api/v1/conversations/{call.conversation_id}/replies",
        json={"text": "hello", "channel": "phone"},
        headers=headers,
    )
    assert refused.status == 422
    assert "voice line" in (await refused.json())["error"]


async def test_agent_calls_the_customer_back_from_the_inbox(make_hub: MakeHub) -> None:
    hub = await make_hub(inbox=True)
    await hub.post_fixture("sms_inbound")
    [message] = [e for e in await hub.customer_events() if e.kind is EventKind.MESSAGE]
    login = await hub.client.post(
        "/api/v1/auth/login", json={"login": "alice", "password": PASSWORD}
    )
    headers = {"Authorization": f"Bearer {(await login.json())['token']}"}
    response = await hub.client.post(
        f"/api/v1/conversations/{message.conversation_id}/call-back", json={}, headers=headers
    )
    assert response.status == 202, await response.text()
    call_sid = (await response.json())["call_sid"]
    # Twilio was asked to ring Alice first, then to connect her to this customer.
    assert hub.fake.calls[call_sid].to == ALICE_PHONE
    root = xml(await hub.fake.fetch_call_twiml(call_sid))
    assert root.find("Dial/Number") is not None
    assert root.find("Dial/Number").text == CUSTOMER  # type: ignore[union-attr]
    # The call-back is noted on the conversation the agent called from.
    callback = [e for e in await hub.customer_events() if e.kind is EventKind.CALL]
    assert callback and callback[0].conversation_id == message.conversation_id
    assert callback[0].author == "agent:alice"
    # Twilio refusing is a clear 422 with its reason, not a 500.
    hub.fake.fail_next(400, 21215, "Geo Permission configuration is not permitting call")
    refused = await hub.client.post(
        f"/api/v1/conversations/{message.conversation_id}/call-back", json={}, headers=headers
    )
    assert refused.status == 422
    assert "21215" in (await refused.json())["error"]
    # Twilio having a bad moment (5xx) is a 503 with its reason: try again later.
    hub.fake.fail_next(503, 20500, "Internal Server Error")
    down = await hub.client.post(
        f"/api/v1/conversations/{message.conversation_id}/call-back", json={}, headers=headers
    )
    assert down.status == 503, await down.text()
    assert "cannot be reached now" in (await down.json())["error"]
