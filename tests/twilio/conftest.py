"""A hub with an SMS and a voice channel on a temporary SQLite file, its official twilio
client pointed at the loopback FakeTwilio, and helpers to post signed webhooks.

The hub's public URL is https://hub.example.com (as behind a reverse proxy): webhooks
are signed for that URL and delivered to the loopback test server, like a proxy would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from hub.app import ADAPTERS, OUTBOX, STORE, create_app
from hub.channels.sms import SmsAdapter
from hub.channels.voice import VoiceAdapter
from hub.config import Config, parse_config
from hub.model import Event, Identity, IdentityKind
from hub.outbox import OutboxWorker
from hub.passwords import hash_password
from hub.timeline.sqlite import SqliteStore
from hub.timeline.store import TimelineStore
from tests.twilio.fake_twilio import LOOPBACK_HOSTS, FakeTwilio

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "f3c2b1a0e9d8c7b6a5f4e3d2c1b0a987"
PUBLIC_URL = "https://hub.example.com"
SMS_NUMBER = "+14155550100"
VOICE_NUMBER = "+14155550111"
CUSTOMER = "+14155550123"
ALICE_PHONE = "+14155550177"
BOB_PHONE = "+14155550188"
PASSWORD = "correct horse battery staple"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "twilio"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def xml(text: str) -> ElementTree.Element:
    return ElementTree.fromstring(text.encode())


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every aiohttp client request in these tests must stay on this machine."""
    original = aiohttp.ClientSession._request

    async def guarded(self: aiohttp.ClientSession, method: str, url: Any, *a: Any, **kw: Any):
        host = URL(str(url)).host
        if host not in LOOPBACK_HOSTS:
            raise AssertionError(f"a test tried to reach {host} ({url}); loopback only")
        return await original(self, method, url, *a, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", guarded)


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture
async def fake_twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def hub_yaml(
    *,
    api_base_url: str,
    password_hash: str,
    public_url: str = PUBLIC_URL,
    voicemail: bool = True,
    ivr: bool = True,
    agent_phones: bool = True,
    record_calls: bool = False,
    max_body_bytes: int = 1_048_576,
) -> str:
    ivr_yaml = (
        """
    ivr:
      - {digit: "1", label: Sales, queue: sales}
      - {digit: "2", label: Support, queue: support}"""
        if ivr
        else ""
    )
    phones = (f'"{ALICE_PHONE}"', f'"{BOB_PHONE}"') if agent_phones else ("null", "null")
    return f"""
hub:
  public_url: {public_url}
  default_region: US
  max_body_bytes: {max_body_bytes}
channels:
  - name: sms
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: {api_base_url}
  - name: phone
    type: voice
    phone_number: "{VOICE_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: {api_base_url}
    greeting: Thank you for calling Acme.
    ring_timeout_seconds: 25
    voicemail: {str(voicemail).lower()}
    record_calls: {str(record_calls).lower()}{ivr_yaml}
routing:
  skills: [billing]
  queues:
    - name: sales
    - name: support
      skills: [billing]
agents:
  - id: alice
    name: Alice
    password_hash: "{password_hash}"
    phone: {phones[0]}
  - id: bob
    name: Bob
    password_hash: "{password_hash}"
    skills: [billing]
    phone: {phones[1]}
"""


@dataclass
class Hub:
    client: TestClient
    config: Config
    fake: FakeTwilio

    @property
    def store(self) -> TimelineStore:
        return self.client.app[STORE]

    @property
    def outbox(self) -> OutboxWorker:
        return self.client.app[OUTBOX]

    @property
    def sms(self) -> SmsAdapter:
        adapter = self.client.app[ADAPTERS]["sms"]
        assert isinstance(adapter, SmsAdapter)
        return adapter

    @property
    def voice(self) -> VoiceAdapter:
        adapter = self.client.app[ADAPTERS]["phone"]
        assert isinstance(adapter, VoiceAdapter)
        return adapter

    def url(self, channel: str, endpoint: str, query: Mapping[str, str] | None = None) -> str:
        url = f"{self.config.hub.public_url}/twilio/{channel}/{endpoint}"
        return f"{url}?{urlencode(query)}" if query else url

    async def post(
        self,
        endpoint: str,
        params: Mapping[str, str],
        *,
        channel: str | None = None,
        query: Mapping[str, str] | None = None,
        signature: str | None = None,
        signed_url: str | None = None,
    ) -> tuple[int, str]:
        """A webhook as Twilio sends it: signed for the public URL, delivered on loopback."""
        if channel is None:
            channel = "sms" if endpoint.startswith("sms") else "phone"
        url = self.url(channel, endpoint, query)
        return await self.fake.post_webhook(url, params, signature=signature, signed_url=signed_url)

    async def post_fixture(
        self, name: str, overrides: Mapping[str, str] | None = None, **kw: Any
    ) -> tuple[int, str]:
        data = fixture(name)
        params = {**data["params"], **(overrides or {})}
        query = kw.pop("query", data.get("query"))
        return await self.post(data["endpoint"], params, query=query, **kw)

    async def customer_events(self, phone: str = CUSTOMER) -> list[Event]:
        """The customer's whole timeline, oldest first ([] if no such customer)."""
        customer = await self.store.find_customer(Identity(IdentityKind.PHONE, phone))
        if customer is None:
            return []
        page = await self.store.customer_timeline(customer.id, limit=200)
        return list(reversed(page.items))


MakeHub = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def make_hub(
    aiohttp_client: Any, fake_twilio: FakeTwilio, tmp_path: Path, password_hash: str
) -> MakeHub:
    async def make(*, inbox: bool = False, **options: Any) -> Hub:
        text = hub_yaml(api_base_url=fake_twilio.url, password_hash=password_hash, **options)
        config = parse_config(text, "<twilio test>", env={}, base_dir=tmp_path)
        store = SqliteStore(tmp_path / "hub.db")
        # Without the inbox there is no presence registry: the voice adapter's default
        # chooser then rings the first agent with a phone.
        app = create_app(config, store=store, extensions=None if inbox else ())
        client: TestClient = await aiohttp_client(app)
        # Tests drive the outbox themselves (run_once), one deterministic step at a time.
        await app[OUTBOX].stop()
        fake_twilio.route(config.hub.public_url, str(client.make_url("")).rstrip("/"))
        return Hub(client=client, config=config, fake=fake_twilio)

    return make


@pytest.fixture
async def hub(make_hub: MakeHub) -> Hub:
    return await make_hub()
