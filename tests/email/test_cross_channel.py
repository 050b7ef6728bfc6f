"""One person, two channels, one timeline: through the whole hub and real servers.

A customer mails (real Dovecot), the agent answers from the inbox API (real SMTP), the
customer's reply to that answer joins the same conversation; then the same person texts
(a signed Twilio webhook). Once the agent merges the texting customer into the mailing
one, the inbox shows both channels in one timeline, newest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient
from twilio.request_validator import RequestValidator

from hub.app import STORE, create_app
from hub.config import parse_config
from hub.passwords import hash_password
from hub.timeline.store import TimelineStore
from tests.email.conftest import ADDRESS, CHANNEL, make_mail
from tests.servers.common import free_port
from tests.servers.dovecot import DovecotServer, wait_until
from tests.servers.smtp import SmtpServer

PUBLIC_URL = "https://hub.example.test"
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
PASSWORD = "cross-channel-password"
CUSTOMER_EMAIL = "casey@client.example"
CUSTOMER_PHONE = "+14155550142"


def config_text(data_dir: Path, imap_port: int, smtp_port: int, password_hash: str) -> str:
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  default_region: US
channels:
  - name: {CHANNEL}
    type: email
    address: {ADDRESS}
    imap: {{host: 127.0.0.1, port: {imap_port}, username: {ADDRESS},
            password: imap-test-password, tls: none}}
    smtp: {{host: 127.0.0.1, port: {smtp_port}, tls: none}}
  - name: sms
    type: sms
    phone_number: "+14155550100"
    twilio:
      account_sid: AC0123456789abcdef0123456789abcdef
      auth_token: {AUTH_TOKEN}
      api_base_url: http://127.0.0.1:{free_port()}
agents:
  - id: alice
    name: Alice
    password_hash: "{password_hash}"
"""


async def api(client: TestClient, method: str, path: str, token: str, **kw: Any) -> Any:
    response = await client.request(
        method, path, headers={"Authorization": f"Bearer {token}"}, **kw
    )
    assert response.status < 300, (path, response.status, await response.text())
    return await response.json()


async def text_from_phone(client: TestClient, sid: str, body: str) -> None:
    params = {
        "MessageSid": sid,
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "From": CUSTOMER_PHONE,
        "To": "+14155550100",
        "Body": body,
        "NumMedia": "0",
    }
    url = f"{PUBLIC_URL}/twilio/sms/sms"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
    response = await client.post(
        "/twilio/sms/sms",
        data=urlencode(params),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert response.status == 200, await response.text()


@pytest.mark.slow
async def test_mail_reply_then_text_meet_in_one_timeline(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path, aiohttp_client: Any
) -> None:
    config = parse_config(
        config_text(tmp_path / "data", dovecot.port, smtp_server.port, hash_password(PASSWORD)),
        "<cross-channel test>",
    )
    client: TestClient = await aiohttp_client(create_app(config))
    store: TimelineStore = client.server.app[STORE]
    token = (
        await (
            await client.post("/api/v1/auth/login", json={"login": "alice", "password": PASSWORD})
        ).json()
    )["token"]

    # 1. The customer mails.
    await dovecot.append(
        [make_mail(1, sender=CUSTOMER_EMAIL, subject="Where is my parcel?")]
    )

    async def mailed() -> Any:
        return await store.find_event(CHANNEL, "<mail-1@client.example>")

    await wait_until(mailed)
    first = await mailed()
    conversation_id = first.conversation_id

    # 2. The agent answers from the inbox; it leaves by email through the real SMTP server.
    await api(
        client,
        "POST",
        f"/api/v1/conversations/{conversation_id}/replies",
        token,
        json={"text": "It is on its way."},
    )
    await wait_until(lambda: len(smtp_server.messages) == 1)
    answer = smtp_server.messages[0].message
    assert answer["To"].addresses[0].addr_spec == CUSTOMER_EMAIL

    # 3. The customer's reply to that answer joins the same conversation.
    await dovecot.append(
        [
            make_mail(
                2,
                sender=CUSTOMER_EMAIL,
                subject="Re: Where is my parcel?",
                in_reply_to=answer["Message-ID"],
                references=f"<mail-1@client.example> {answer['Message-ID']}",
            )
        ]
    )

    async def replied() -> Any:
        return await store.find_event(CHANNEL, "<mail-2@client.example>")

    await wait_until(replied)
    assert (await replied()).conversation_id == conversation_id

    # 4. The same person texts: a phone number nobody knew yet is a new customer.
    await text_from_phone(client, "SM00000000000000000000000000000001", "Any news? - Casey")
    texted = await store.find_event("sms", "SM00000000000000000000000000000001")
    assert texted is not None and texted.customer_id != first.customer_id
    # Linking the phone to the mailing customer is refused: it is someone's already...
    linked = await client.post(
        f"/api/v1/customers/{first.customer_id}/identities",
        json={"kind": "phone", "value": CUSTOMER_PHONE},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert linked.status == 409
    # ...so the agent merges the texting customer into the mailing one.
    await api(
        client,
        "POST",
        f"/api/v1/customers/{texted.customer_id}/merge",
        token,
        json={"into": first.customer_id},
    )

    # 5. The inbox shows both channels in one timeline, newest first.
    view = await api(client, "GET", f"/api/v1/conversations/{conversation_id}", token)
    timeline = view["timeline"]["items"]
    messages = [e for e in timeline if e["kind"] == "message"]
    assert [(m["channel"], m["direction"]) for m in messages] == [
        ("sms", "in"),
        (CHANNEL, "in"),
        (CHANNEL, "out"),
        (CHANNEL, "in"),
    ]
    assert messages[0]["text"] == "Any news? - Casey"
    identities = {(i["kind"], i["value"]) for i in view["customer"]["identities"]}
    assert {("email", CUSTOMER_EMAIL), ("phone", CUSTOMER_PHONE)} <= identities
    # The next text lands on the merged customer directly.
    await text_from_phone(client, "SM00000000000000000000000000000002", "Thanks!")
    again = await store.find_event("sms", "SM00000000000000000000000000000002")
    assert again is not None and again.customer_id == first.customer_id
