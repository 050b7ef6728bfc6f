"""Drill: the SMTP server down while agents' email replies are queued, then back.

The issue asks for SMTP down for a minute; this drill keeps it down for OUTAGE seconds
(6) and compresses the outbox's backoff to match (0.25 s doubling, capped at 2 s, instead
of 1 s doubling to 5 minutes), so the same story — every reply tried several times,
refused every time, the hub restarted in the middle of it — fits in a CI run. The
production schedule gives up after 12 attempts (about 20 minutes at the cap), which a
one-minute outage is far from.

The hub here is the email adapter, the SQLite store and the real OutboxWorker loop
(IMAP is not needed to send). An aiosmtpd server captures what arrives. At the end every
reply is SENT, none FAILED, and each Message-ID the hub stamped on a reply arrived
exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from hub import outbox
from hub.bus import InProcessBus
from hub.channels.base import HubServices
from hub.channels.email import EmailAdapter
from hub.config import Config
from hub.inbox.replies import reply_draft
from hub.ingest import Ingestor
from hub.model import DeliveryState, Event, Identity, IdentityKind
from hub.outbox import OutboxWorker
from hub.timeline.sqlite import SqliteStore
from tests.email.conftest import CHANNEL, make_config, make_mail
from tests.servers.dovecot import wait_until
from tests.servers.smtp import SmtpServer

REPLIES = 20
OUTAGE = 6.0


class EmailHub:
    """Store, bus, email adapter and outbox worker: what `hub serve` runs for email out."""

    def __init__(self, db: Path, config: Config) -> None:
        self.store = SqliteStore(db)
        self.bus = InProcessBus()
        self.adapter = EmailAdapter(config.channels[0], config)  # type: ignore[arg-type]
        self.adapter.smtp_timeout = 2
        self.services = HubServices(
            config=config, store=self.store, bus=self.bus, ingestor=Ingestor(self.store, self.bus)
        )
        self.worker = OutboxWorker(self.store, self.bus, {CHANNEL: self.adapter}, poll_seconds=0.2)

    async def start(self) -> EmailHub:
        await self.store.start()
        await self.bus.start()
        await self.adapter.prepare(self.services)  # sending needs no IMAP fetch loop
        await self.worker.start()
        return self

    async def stop(self) -> None:
        await self.worker.stop()
        await self.adapter.stop()
        await self.bus.close()
        await self.store.close()


async def replies_in(store: SqliteStore, ids: list[str]) -> list[Event]:
    events = [await store.get_event(event_id) for event_id in ids]
    assert all(e is not None for e in events)
    return [e for e in events if e is not None]


@pytest.mark.slow
async def test_smtp_down_then_back_sends_every_reply_once(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "retry_delay", lambda attempts: min(0.25 * 2 ** (attempts - 1), 2))
    # A claim interrupted by the restart below is retried after its lease, not in 60 s.
    monkeypatch.setattr(outbox, "LEASE", timedelta(seconds=3))
    config = make_config(tmp_path / "data", smtp_port=smtp_server.port)
    db = tmp_path / "hub.db"
    hub = await EmailHub(db, config).start()
    try:
        conversations = []
        for i in range(REPLIES):
            mail = make_mail(i, sender=f"customer{i}@client.example", subject=f"Order {i}")
            recorded = await hub.adapter.process_raw(mail)
            assert recorded is not None and recorded.conversation is not None
            conversations.append(recorded.conversation.id)

        smtp_server.stop()
        loop = asyncio.get_running_loop()
        down_at = loop.time()
        reply_ids = []
        for n, conversation_id in enumerate(conversations):
            to = Identity(IdentityKind.EMAIL, f"customer{n}@client.example")
            draft = reply_draft("alice", hub.adapter, to, f"Reply {n}: it ships today.")
            queued = await hub.store.append(conversation_id, draft)
            reply_ids.append(queued.event.id)
        hub.worker.nudge()

        async def every_reply_refused() -> bool:
            events = await replies_in(hub.store, reply_ids)
            return all(
                e.delivery_state is DeliveryState.QUEUED and e.delivery_error for e in events
            )

        await wait_until(every_reply_refused, within=OUTAGE)
        # The hub restarts in the middle of the outage: the queue is in the store.
        await asyncio.sleep(max(0.0, down_at + OUTAGE / 2 - loop.time()))
        await hub.stop()
        hub = await EmailHub(db, config).start()
        await asyncio.sleep(max(0.0, down_at + OUTAGE - loop.time()))
        for event in await replies_in(hub.store, reply_ids):
            assert event.delivery_state is DeliveryState.QUEUED, event
            assert "SMTP" in str(event.delivery_error) or "onnect" in str(event.delivery_error)
        assert not smtp_server.messages

        smtp_server.start()  # back, on the same port

        async def all_sent() -> bool:
            events = await replies_in(hub.store, reply_ids)
            return all(e.delivery_state is not DeliveryState.QUEUED for e in events)

        await wait_until(all_sent, within=20, interval=0.1)
        events = await replies_in(hub.store, reply_ids)
        assert {e.delivery_state for e in events} == {DeliveryState.SENT}
        arrived = Counter(str(m.message["Message-ID"]) for m in smtp_server.messages)
        expected = {f"<{e.id}@example.test>" for e in events}
        assert {e.external_id for e in events} == expected
        assert set(arrived) == expected
        assert set(arrived.values()) == {1}, "a reply arrived twice"
    finally:
        await hub.stop()
