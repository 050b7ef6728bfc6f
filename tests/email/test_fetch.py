"""IMAP fetching against a real Dovecot: every mail stored exactly once, whatever happens."""

from __future__ import annotations

import asyncio
import json
from datetime import date

import pytest

from hub.identities import normalize
from hub.model import IdentityKind
from hub.timeline.store import StoreUnavailable
from tests.email.conftest import CHANNEL, make_mail
from tests.servers.dovecot import DovecotServer, wait_until


async def test_appended_mail_is_ingested_once_and_position_is_stored(
    dovecot: DovecotServer, hub
) -> None:
    h = await hub(dovecot)
    await dovecot.append(make_mail(i) for i in range(3))
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 3)
    # New mail while the hub runs arrives through IDLE.
    await wait_until(lambda: adapter.status()["idle"])
    await dovecot.append([make_mail(3)])
    await wait_until(lambda: h.count_inbound() == 4)

    # The position follows once the batch is committed.
    await wait_until(lambda: adapter.status()["last_uid"] == 4)
    status = adapter.status()
    assert status["ok"] and status["connected"] and status["last_error"] is None
    assert status["uidvalidity"]
    stored = json.loads(await h.store.get_state(f"email.{CHANNEL}.position"))
    assert stored == {"uidvalidity": status["uidvalidity"], "last_uid": 4}

    event = await h.store.find_event(CHANNEL, "<mail-3@client.example>")
    assert event is not None and event.text == "Hello, this is message number 3."
    customer = await h.store.find_customer(normalize(IdentityKind.EMAIL, "customer@client.example"))
    assert customer is not None and customer.display_name == "Casey Customer"
    # Fetching read with BODY.PEEK: nothing was marked \Seen.
    async with dovecot.client() as imap:
        response = await imap.search("UNSEEN", charset=None)
        assert response.lines[0].split() == [b"1", b"2", b"3", b"4"]


async def test_killed_mid_fetch_then_restarted_stores_every_mail_once(
    dovecot: DovecotServer, hub
) -> None:
    h = await hub(dovecot)
    await dovecot.append(make_mail(i, sender=f"c{i % 7}@client.example") for i in range(250))
    adapter = h.adapter()
    adapter.batch_size = 40
    await adapter.start(h.services)
    # Kill it (cancel the fetch task) somewhere in the middle of the mailbox.
    await wait_until(lambda: h.count_inbound() >= 60, within=20, interval=0.005)
    await adapter.stop()
    partial = h.count_inbound()
    assert 0 < partial < 250

    second = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() >= 250, within=30)
    await asyncio.sleep(0.2)
    ids = h.inbound_external_ids()
    assert len(ids) == 250 and len(set(ids)) == 250
    assert second.status()["last_uid"] == 250


async def test_dovecot_restart_reconnects_and_continues(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    await dovecot.append([make_mail(0)])
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 1)

    await asyncio.to_thread(dovecot.stop)
    await wait_until(lambda: not adapter.status()["connected"])
    assert adapter.status()["last_error"]
    await asyncio.to_thread(dovecot.start)
    await dovecot.append([make_mail(1), make_mail(2)])
    await wait_until(lambda: h.count_inbound() == 3, within=15)
    await wait_until(lambda: adapter.status()["connected"])
    assert adapter.status()["ok"]


async def test_uidvalidity_change_rereads_without_duplicates(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    h.imap_options = {"mailbox": "Support"}
    await dovecot.create_mailbox("Support")
    await dovecot.append((make_mail(i) for i in range(5)), mailbox="Support")
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 5)
    old = adapter.status()["uidvalidity"]
    await adapter.stop()

    # The server renumbers: same mails (and two new ones) under a new UIDVALIDITY.
    await dovecot.delete_mailbox("Support")
    await dovecot.create_mailbox("Support")
    await dovecot.append((make_mail(i) for i in range(7)), mailbox="Support")
    adapter = await h.start_adapter()
    await wait_until(lambda: adapter.status()["uidvalidity"] not in (None, old))
    await wait_until(lambda: h.count_inbound() == 7)
    await wait_until(lambda: adapter.status()["last_uid"] == 7)
    assert sorted(h.inbound_external_ids()) == sorted(
        f"<mail-{i}@client.example>" for i in range(7)
    )


@pytest.mark.slow
async def test_thousand_mails_while_down_are_all_ingested_once(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    await dovecot.append([make_mail(0)])
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 1)
    await adapter.stop()  # the hub is down...

    senders = [f"sender{i}@client.example" for i in range(50)]
    await dovecot.append(make_mail(i, sender=senders[i % 50]) for i in range(1, 1001))
    await h.start_adapter()  # ...and back
    await wait_until(lambda: h.count_inbound() >= 1001, within=45, interval=0.1)
    ids = h.inbound_external_ids()
    assert len(ids) == 1001 and len(set(ids)) == 1001


async def test_seen_flag_set_by_someone_else_hides_nothing(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    await dovecot.append([make_mail(0)], flags=r"\Seen")
    await dovecot.append([make_mail(1)])
    await dovecot.set_flag(r"\Seen")
    await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 2)


async def test_polling_mode_and_mark_seen_after_processing(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    h.imap_options = {"idle": "false", "poll_seconds": 1, "after_processing": "seen"}
    adapter = await h.start_adapter()
    await wait_until(lambda: adapter.status()["connected"])
    assert not adapter.status()["idle"]
    await dovecot.append([make_mail(0), make_mail(1)])
    await wait_until(lambda: h.count_inbound() == 2, within=5)

    async def all_seen() -> bool:
        async with dovecot.client() as imap:
            response = await imap.search("UNSEEN", charset=None)
            return response.lines[0].strip() == b""

    await wait_until(all_seen, within=5)


async def test_move_after_processing(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    await dovecot.create_mailbox("Processed")
    h.imap_options = {"after_processing": "move", "move_to": "Processed"}
    await dovecot.append(make_mail(i) for i in range(3))
    await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 3)

    async def moved() -> bool:
        return await dovecot.count("INBOX") == 0 and await dovecot.count("Processed") == 3

    await wait_until(moved, within=5)


async def test_unreachable_server_reports_not_ok_and_stall(hub, caplog) -> None:
    h = await hub(None)  # IMAP port 1: nothing listens there
    adapter = h.adapter()
    adapter.stall_after_seconds = 0.3
    await adapter.start(h.services)
    await wait_until(lambda: adapter.status()["stalled"], within=5)
    status = adapter.status()
    assert not status["ok"] and not status["connected"]
    assert "Connection" in status["last_error"] or "refused" in status["last_error"].lower()


async def test_backfill_rereads_a_date_range_idempotently(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    await dovecot.append(make_mail(i) for i in range(4))
    adapter = await h.start_adapter()
    await wait_until(lambda: h.count_inbound() == 4)
    await adapter.stop()

    tool = await h.prepared_adapter()
    counts = await tool.backfill(date(2000, 1, 1))
    assert counts == {"found": 4, "stored": 0, "duplicates": 4, "skipped": 0}
    assert h.count_inbound() == 4


async def test_one_watcher_per_mailbox_and_handover(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    first, second = h.adapter(), h.adapter()
    for adapter in (first, second):
        adapter.lease_seconds = 0.6
        await adapter.start(h.services)
    await dovecot.append([make_mail(0)])
    await wait_until(lambda: h.count_inbound() == 1)
    statuses = [first.status(), second.status()]
    assert sorted(s["standby"] for s in statuses) == [False, True]
    assert all(s["ok"] for s in statuses)

    leader, standby = (first, second) if not statuses[0]["standby"] else (second, first)
    await leader.stop()
    await dovecot.append([make_mail(1)])
    await wait_until(lambda: h.count_inbound() == 2)
    assert not standby.status()["standby"]


class FlakyIngestor:
    """The store is down for a while: ingest fails, then works again."""

    def __init__(self, real) -> None:  # type: ignore[no-untyped-def]
        self.real = real
        self.down = True

    async def ingest(self, inbound):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailable("database is locked")
        return await self.real.ingest(inbound)


async def test_store_outage_stalls_then_resumes_without_loss(dovecot: DovecotServer, hub) -> None:
    h = await hub(dovecot)
    flaky = FlakyIngestor(h.ingestor)
    h.ingestor = flaky
    await dovecot.append(make_mail(i) for i in range(3))
    adapter = h.adapter()
    adapter.stall_after_seconds = 0.3
    await adapter.start(h.services)
    await wait_until(lambda: adapter.status()["stalled"], within=10)
    status = adapter.status()
    assert not status["ok"] and "database is locked" in status["last_error"]
    assert h.count_inbound() == 0 and status["last_uid"] == 0

    flaky.down = False
    await wait_until(lambda: h.count_inbound() == 3, within=10)
    await wait_until(lambda: adapter.status()["last_uid"] == 3)
    assert not adapter.status()["stalled"] and adapter.status()["ok"]
