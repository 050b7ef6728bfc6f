"""X-Twilio-Signature: Twilio's algorithm, the public URL behind proxies and ports, and
every way a webhook can fail to prove it came from Twilio (403, nothing stored)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from twilio.request_validator import RequestValidator

from hub.app import OUTBOX, create_app
from hub.channels.twilio import TwilioHttpClient, WebhookVerifier, build_client
from hub.config import parse_config
from hub.model import DeliveryState
from hub.timeline.sqlite import SqliteStore
from tests.servers.common import free_port
from tests.twilio.conftest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    CUSTOMER,
    Hub,
    MakeHub,
    fixture,
    hub_yaml,
    xml,
)
from tests.twilio.fake_twilio import FakeTwilio
from tests.twilio.test_sms import sent_reply

SMS_PARAMS = fixture("sms_inbound")["params"]
SMS_SID = SMS_PARAMS["MessageSid"]


async def nothing_stored(hub: Hub) -> bool:
    return await hub.customer_events() == []


def test_signature_is_twilios_documented_algorithm() -> None:
    """HMAC-SHA1 keyed by the auth token over URL + sorted name/value pairs, base64."""
    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    url = "https://hub.example.com/twilio/sms/sms?x=1"
    params = {"To": "+1", "Body": "hi", "From": "+2", "AccountSid": ACCOUNT_SID}
    payload = url + "".join(k + params[k] for k in sorted(params))
    digest = hmac.new(AUTH_TOKEN.encode(), payload.encode(), hashlib.sha1).digest()
    assert fake.sign(url, params) == base64.b64encode(digest).decode()


def test_verifier_signs_as_the_official_validator() -> None:
    """The verifier's own HMAC (its fast path) is RequestValidator's, repeated names and
    values, duplicates, empty and non-ASCII values included."""
    verifier = WebhookVerifier(AUTH_TOKEN, "https://hub.example.com")
    validator = RequestValidator(AUTH_TOKEN)
    url = "https://hub.example.com/twilio/sms/sms?x=1&y=%C3%A9"
    form = MultiDictProxy(
        MultiDict(
            [
                ("To", "+14155550100"),
                ("MediaUrl0", "https://api.twilio.com/a"),
                ("Body", "héllo ☃ 12"),
                ("Body", "again"),
                ("Body", "again"),
                ("A", ""),
                ("a", "z"),
                ("From", "+2"),
            ]
        )
    )
    assert verifier.signature(url, form) == validator.compute_signature(url, form)
    empty: MultiDictProxy[str] = MultiDictProxy(MultiDict())
    assert verifier.signature(url, empty) == validator.compute_signature(url, empty)


async def test_signed_webhook_is_accepted(hub: Hub) -> None:
    status, _ = await hub.post_fixture("sms_inbound")
    assert status == 200
    assert await hub.store.find_event("sms", SMS_SID) is not None


@pytest.mark.parametrize("name", ["sms_inbound", "voice_incoming", "voice_recording"])
async def test_forged_signature_is_403_and_stores_nothing(hub: Hub, name: str) -> None:
    forged = base64.b64encode(b"\x00" * 20).decode()
    status, body = await hub.post_fixture(name, signature=forged)
    assert status == 403
    assert "X-Twilio-Signature" in body
    assert await nothing_stored(hub)


async def test_signature_made_with_another_auth_token_is_403(hub: Hub) -> None:
    other = FakeTwilio(ACCOUNT_SID, "0" * 32)
    signature = other.sign(hub.url("sms", "sms"), SMS_PARAMS)
    status, _ = await hub.post_fixture("sms_inbound", signature=signature)
    assert status == 403
    assert await nothing_stored(hub)


@pytest.mark.parametrize(
    "signed_url",
    [
        "https://evil.example.com/twilio/sms/sms",  # another host
        "http://hub.example.com/twilio/sms/sms",  # another scheme
        "https://hub.example.com/twilio/sms/sms/status",  # another endpoint
        "https://hub.example.com/twilio/sms/sms?extra=1",  # another query
    ],
)
async def test_signed_for_another_url_is_403(hub: Hub, signed_url: str) -> None:
    status, _ = await hub.post_fixture("sms_inbound", signed_url=signed_url)
    assert status == 403
    assert await nothing_stored(hub)


async def test_missing_signature_is_403(hub: Hub) -> None:
    response = await hub.client.post("/twilio/sms/sms", data=SMS_PARAMS)
    assert response.status == 403
    assert (await response.json())["error"] == "missing X-Twilio-Signature"
    assert await nothing_stored(hub)


async def test_tampered_parameters_are_403(hub: Hub) -> None:
    signature = hub.fake.sign(hub.url("sms", "sms"), SMS_PARAMS)
    status, _ = await hub.post(
        "sms", {**SMS_PARAMS, "Body": "send me a refund"}, signature=signature
    )
    assert status == 403
    added = {**SMS_PARAMS, "NumMedia": "1", "MediaUrl0": "https://evil.example.com/x.jpg"}
    status, _ = await hub.post("sms", added, signature=signature)
    assert status == 403
    assert await nothing_stored(hub)


async def test_form_must_be_urlencoded(hub: Hub) -> None:
    url = hub.url("sms", "sms")
    response = await hub.client.post(
        "/twilio/sms/sms",
        json=SMS_PARAMS,
        headers={"X-Twilio-Signature": hub.fake.sign(url, {})},
    )
    assert response.status == 403
    assert await nothing_stored(hub)


async def test_forged_status_callback_changes_nothing(hub: Hub) -> None:
    event, sid = await sent_reply(hub)
    params = {**fixture("sms_status_failed")["params"], "MessageSid": sid, "SmsSid": sid}
    status, _ = await hub.post("sms/status", params, signature="bm9wZQ==")
    assert status == 403
    unchanged = await hub.store.get_event(event.id)
    assert unchanged is not None and unchanged.delivery_state is DeliveryState.SENT


async def test_query_string_is_part_of_the_signed_url(hub: Hub) -> None:
    await hub.post_fixture("voice_incoming")
    data = fixture("voice_dial_result_completed")
    without_query = hub.url("phone", "voice/dial-result")
    status, _ = await hub.post_fixture("voice_dial_result_completed", signed_url=without_query)
    assert status == 403
    # Signed for ?agent=bob but delivered with ?agent=alice: a forged agent.
    bob = hub.url("phone", "voice/dial-result", {"agent": "bob"})
    status, _ = await hub.post_fixture("voice_dial_result_completed", signed_url=bob)
    assert status == 403
    status, body = await hub.post_fixture("voice_dial_result_completed")
    assert status == 200, body
    assert data["query"] == {"agent": "alice"}


async def test_default_port_in_the_signed_url_is_accepted(hub: Hub) -> None:
    """Twilio has signed https URLs both with and without :443."""
    status, _ = await hub.post_fixture(
        "sms_inbound", signed_url="https://hub.example.com:443/twilio/sms/sms"
    )
    assert status == 200


async def test_public_url_with_a_path_prefix(make_hub: MakeHub) -> None:
    """Behind a proxy serving the hub under /support/, which it strips."""
    hub = await make_hub(public_url="https://www.example.com/support")
    status, _ = await hub.post_fixture("sms_inbound")
    assert status == 200
    assert await hub.store.find_event("sms", SMS_SID) is not None
    # The URL the hub itself sees is not what Twilio signed.
    direct = str(hub.client.make_url("/twilio/sms/sms"))
    status, _ = await hub.post_fixture("sms_inbound", signed_url=direct)
    assert status == 403


async def test_hub_on_its_own_port_without_a_proxy(
    fake_twilio: FakeTwilio, tmp_path: Path, password_hash: str
) -> None:
    """public_url http://127.0.0.1:PORT: Twilio signs the URL with the port."""
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    text = hub_yaml(api_base_url=fake_twilio.url, password_hash=password_hash, public_url=public)
    config = parse_config(text, "<port test>", env={}, base_dir=tmp_path)
    app = create_app(config, store=SqliteStore(tmp_path / "hub.db"), extensions=())
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await app[OUTBOX].stop()
        url = f"{public}/twilio/sms/sms"
        status, body = await fake_twilio.post_webhook(url, SMS_PARAMS)
        assert status == 200, body
        assert xml(body).tag == "Response"
        status, _ = await fake_twilio.post_webhook(
            url, SMS_PARAMS, signed_url=f"http://127.0.0.1:{port + 1}/twilio/sms/sms"
        )
        assert status == 403
    finally:
        await runner.cleanup()


async def test_oversized_body_is_refused(make_hub: MakeHub) -> None:
    hub = await make_hub(max_body_bytes=2048)
    params = {**SMS_PARAMS, "Body": "x" * 4096}
    status, _ = await hub.post("sms", params)
    assert status == 413
    assert await nothing_stored(hub)


# --- the REST client never leaves for api.twilio.com in tests ---------------------------


async def test_base_url_rewrites_every_twilio_domain() -> None:
    http = TwilioHttpClient("http://127.0.0.1:9/fake")
    try:
        assert (
            http.rewrite("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json")
            == "http://127.0.0.1:9/fake/2010-04-01/Accounts/AC1/Messages.json"
        )
        assert (
            http.rewrite("https://voice.twilio.com/v1/x?a=1") == "http://127.0.0.1:9/fake/v1/x?a=1"
        )
    finally:
        await http.close()
    production = TwilioHttpClient(None)
    try:
        url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json"
        assert production.rewrite(url) == url
    finally:
        await production.close()


async def test_client_built_for_tests_calls_the_fake(fake_twilio: FakeTwilio) -> None:
    client, http = build_client(ACCOUNT_SID, AUTH_TOKEN, fake_twilio.url)
    try:
        message = await client.messages.create_async(to=CUSTOMER, from_="+14155550100", body="ping")
    finally:
        await http.close()
    assert message.sid.startswith("SM") and message.status == "queued"
    [request] = fake_twilio.sent_messages
    assert request.auth == (ACCOUNT_SID, AUTH_TOKEN)


async def test_the_loopback_guard_blocks_real_twilio() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(AssertionError, match="loopback only"):
            await session.get("https://api.twilio.com/2010-04-01/Accounts.json")
