"""Drill: the hub SIGKILLed under a load of signed SMS webhooks, then restarted.

`hub serve` (SQLite) runs in a subprocess; 48 concurrent clients post signed inbound-SMS
webhooks, each with a new MessageSid, as fast as the hub answers. Once 800 are
acknowledged the process gets SIGKILL (no shutdown code runs) with requests in flight.
It is restarted and killed twice more the same way (after 250 more, then right after
the next one), restarted again, and then the requests
that never got an answer are delivered again, as Twilio retries them, together with a
sample of acknowledged ones (a redelivery after a lost answer).

At the end, read from the SQLite file itself: every MessageSid that got a 200 is stored
exactly once, every retried one too, and nothing else is there.
(tests/test_crash_safety.py kills an ingesting process in-process; this is the whole
HTTP path of the real server.)
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.faults.conftest import (
    SMS_CHANNEL,
    HubProcess,
    SmsWebhooks,
    assert_exactly_once,
    integrity_check,
    sms_hub_yaml,
    stored_counts,
)

CLIENTS = 48


@dataclass
class Load:
    sent: dict[str, int] = field(default_factory=dict)  # MessageSid -> message number
    acked: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)  # connection dropped or refused
    refused: dict[str, int] = field(default_factory=dict)  # answered, but not 200


async def load_then_kill(
    hub: HubProcess, hooks: SmsWebhooks, load: Load, counter: itertools.count, kill_after: int
) -> int:
    """Post webhooks from CLIENTS concurrent clients; SIGKILL the hub once `kill_after`
    more were acknowledged. Returns how many requests were in flight at the kill."""
    start_acked = len(load.acked)
    stop = asyncio.Event()
    enough = asyncio.Event()
    in_flight = 0
    at_kill = 0
    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(limit=CLIENTS)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal in_flight
        while not stop.is_set():
            n = next(counter)
            sid = hooks.new_sid()
            load.sent[sid] = n
            in_flight += 1
            try:
                status, _ = await hooks.post(session, sid, n)
            except (aiohttp.ClientError, TimeoutError):
                load.unanswered.add(sid)
                if not hub.running:
                    return
                continue
            finally:
                in_flight -= 1
            if status == 200:
                load.acked.add(sid)
                if len(load.acked) - start_acked >= kill_after:
                    enough.set()
            else:
                load.refused[sid] = status

    async def killer() -> None:
        nonlocal at_kill
        await enough.wait()
        at_kill = in_flight
        assert hub.kill() == -signal.SIGKILL
        stop.set()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(killer(), *(client(session) for _ in range(CLIENTS)))
    return at_kill


@pytest.mark.slow
async def test_sigkill_under_sms_webhook_load_loses_and_repeats_nothing(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    config = tmp_path / "hub.yaml"
    config.write_text(sms_hub_yaml(tmp_path / "data", db))
    hub = HubProcess(config)
    hooks = SmsWebhooks(hub.url)
    load = Load()
    counter = itertools.count()
    try:
        for kill_after in (800, 250, 1):
            await asyncio.to_thread(hub.start)
            in_flight = await load_then_kill(hub, hooks, load, counter, kill_after)
            # Killed under load: requests were on the wire when it died.
            assert in_flight > 0
            assert not load.refused, f"non-200 answers under load: {load.refused}"
            # Before anyone restarts anything: what got a 200 is on disk, once.
            counts = stored_counts(db, SMS_CHANNEL)
            assert_exactly_once(counts, load.acked, "MessageSids")
            assert max(counts.values()) == 1

        await asyncio.to_thread(hub.start)
        unanswered = sorted(load.unanswered - load.acked)
        assert unanswered, "the kills interrupted no request"
        # Some of them may have been committed before the kill, their answer lost.
        before_retry = stored_counts(db, SMS_CHANNEL)
        committed_unanswered = sum(1 for sid in unanswered if sid in before_retry)
        # Twilio's retries: every unanswered webhook again, and some acknowledged ones
        # delivered twice (an answer lost on the way back looks the same to Twilio).
        retries = unanswered + random.Random(9).sample(sorted(load.acked), 100)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            answers = await asyncio.gather(
                *(hooks.post(session, sid, load.sent[sid]) for sid in retries)
            )
        assert [status for status, _ in answers] == [200] * len(retries)

        counts = stored_counts(db, SMS_CHANNEL)
        assert_exactly_once(counts, load.sent, "MessageSids")
        assert set(counts) == set(load.sent), "events stored that nobody sent"
        duplicates = hub.events("ingest.duplicate")
        assert len(duplicates) == 100 + committed_unanswered
        assert not hub.events("http.unhandled"), hub.tail()
    finally:
        if hub.running:
            hub.terminate()
    assert integrity_check(db) == ["ok"]
