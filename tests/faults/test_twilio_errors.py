"""Drill: Twilio's API answering 500 and then 429 for a while, then 201 again.

The whole hub app (create_app, its real OutboxWorker loop) on a SQLite file, its
official twilio client pointed at the loopback FakeTwilio. Twenty customers text in;
an agent's reply to each is queued; Twilio then answers 500 (Internal Server Error) to
the next 25 Messages requests and 429 (Too Many Requests) to the 25 after that. The
outbox's backoff is compressed (0.1 s doubling, capped at 1 s, instead of 1 s doubling
to 5 minutes) so the outage fits a CI run, and the hub is restarted in the middle of it.

At the end: every reply is SENT, none FAILED; Twilio accepted exactly one Messages
request per reply (counted by the fake, per reply text, which is unique per event) and
the SID it returned is the one stored on that event; every scripted failure was used
(the retries really happened).

A second drill restarts the hub (its clean shutdown, as on SIGTERM) while Twilio has
accepted replies but not yet answered: the outbox lets those sends finish before it
stops, so none is sent again by the next start. (A SIGKILL in that instant still sends
such a reply twice: at-least-once is what a provider without idempotency keys allows;
see docs/operations.md.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub import outbox
from hub.app import ADAPTERS, OUTBOX, STORE, create_app
from hub.config import Config, parse_config
from hub.inbox.replies import reply_draft
from hub.model import DeliveryState, Event, Identity, IdentityKind
from hub.timeline.store import TimelineStore
from tests.faults.conftest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    PUBLIC_URL,
    SMS_CHANNEL,
    SMS_NUMBER,
    sms_hub_yaml,
)
from tests.servers.dovecot import wait_until
from tests.twilio.fake_twilio import FakeTwilio

REPLIES = 20
FAILURES_500 = 25
FAILURES_429 = 25


class SlowAnswerTwilio(FakeTwilio):
    """Takes a message at once, and answers `answer_delay` seconds later."""

    answer_delay = 0.0

    async def _create_message(self, request: web.Request) -> web.Response:
        response = await super()._create_message(request)
        await asyncio.sleep(self.answer_delay)
        return response


@pytest.fixture
async def fake_twilio() -> AsyncIterator[SlowAnswerTwilio]:
    fake = SlowAnswerTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def phone(n: int) -> str:
    return f"+1415555{n:04d}"


async def start_hub(aiohttp_client: Any, config: Config, fake: FakeTwilio) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(config, extensions=()))
    fake.route(PUBLIC_URL, str(client.make_url("")).rstrip("/"))
    return client


async def replies_in(store: TimelineStore, ids: list[str]) -> list[Event]:
    events = [await store.get_event(event_id) for event_id in ids]
    return [e for e in events if e is not None]


async def queue_replies(client: TestClient, fake: FakeTwilio, count: int) -> list[str]:
    """`count` customers text in; an agent's reply to each is queued. Returns their ids."""
    store = client.app[STORE]
    channel = client.app[ADAPTERS][SMS_CHANNEL]
    reply_ids: list[str] = []
    for n in range(count):
        status, _ = await fake.post_webhook(
            f"{PUBLIC_URL}/twilio/{SMS_CHANNEL}/sms",
            {
                "MessageSid": f"SMin{n:030d}",
                "AccountSid": ACCOUNT_SID,
                "From": phone(n),
                "To": SMS_NUMBER,
                "Body": f"Where is order {n}?",
                "NumMedia": "0",
            },
        )
        assert status == 200
        event = await store.find_event(SMS_CHANNEL, f"SMin{n:030d}")
        assert event is not None and event.conversation_id is not None
        draft = reply_draft(
            "alice", channel, Identity(IdentityKind.PHONE, phone(n)), f"Reply {n}: on its way"
        )
        recorded = await store.append(event.conversation_id, draft)
        reply_ids.append(recorded.event.id)
    client.app[OUTBOX].nudge()
    return reply_ids


async def settle(store: TimelineStore, reply_ids: list[str]) -> list[Event]:
    """Wait until no reply is queued any more; every one must then be SENT."""

    async def settled() -> bool:
        events = await replies_in(store, reply_ids)
        return all(e.delivery_state is not DeliveryState.QUEUED for e in events)

    await wait_until(settled, within=30, interval=0.1)
    events = await replies_in(store, reply_ids)
    assert {e.delivery_state for e in events} == {DeliveryState.SENT}, [
        (e.delivery_state, e.delivery_error) for e in events
    ]
    return events


def assert_each_accepted_once(fake: FakeTwilio, events: list[Event]) -> None:
    accepted = Counter(m.body for m in fake.messages.values())
    assert accepted == Counter(e.text for e in events), "a reply was accepted twice or never"
    sid_of = {m.body: sid for sid, m in fake.messages.items()}
    assert all(e.external_id == sid_of[e.text] for e in events)


@pytest.mark.slow
async def test_twilio_500_and_429_then_201_sends_every_sms_reply_once(
    aiohttp_client: Any,
    fake_twilio: FakeTwilio,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox, "retry_delay", lambda attempts: min(0.1 * 2 ** (attempts - 1), 1))
    # A send cut short by the restart below is retried after its lease, not in 60 s.
    monkeypatch.setattr(outbox, "LEASE", timedelta(seconds=2))
    text = sms_hub_yaml(tmp_path / "data", tmp_path / "hub.db", api_base_url=fake_twilio.url)
    config = parse_config(text, "<faults>", env={}, base_dir=tmp_path)
    client = await start_hub(aiohttp_client, config, fake_twilio)

    fake_twilio.fail_next(500, 20500, "Internal Server Error", times=FAILURES_500)
    fake_twilio.fail_next(429, 20429, "Too Many Requests", times=FAILURES_429)
    reply_ids = await queue_replies(client, fake_twilio, REPLIES)

    # The hub restarts while Twilio is still failing: the queue is in the store.
    await wait_until(lambda: len(fake_twilio.sent_messages) >= FAILURES_500 + 5, within=15)
    assert len(fake_twilio.messages) == 0
    await client.close()
    client = await start_hub(aiohttp_client, config, fake_twilio)
    events = await settle(client.app[STORE], reply_ids)
    assert_each_accepted_once(fake_twilio, events)
    # Every scripted failure was met by a real request: the replies were retried.
    assert len(fake_twilio.sent_messages) == REPLIES + FAILURES_500 + FAILURES_429


@pytest.mark.slow
async def test_restart_while_twilio_is_answering_sends_nothing_twice(
    aiohttp_client: Any, fake_twilio: SlowAnswerTwilio, tmp_path: Path
) -> None:
    text = sms_hub_yaml(tmp_path / "data", tmp_path / "hub.db", api_base_url=fake_twilio.url)
    config = parse_config(text, "<faults>", env={}, base_dir=tmp_path)
    client = await start_hub(aiohttp_client, config, fake_twilio)
    fake_twilio.answer_delay = 1.0
    reply_ids = await queue_replies(client, fake_twilio, 5)
    # Twilio has taken all five and not answered yet when the hub is told to stop.
    await wait_until(lambda: len(fake_twilio.messages) == 5, within=10, interval=0.01)
    await client.close()
    client = await start_hub(aiohttp_client, config, fake_twilio)
    events = await settle(client.app[STORE], reply_ids)
    assert_each_accepted_once(fake_twilio, events)
    assert len(fake_twilio.sent_messages) == 5
