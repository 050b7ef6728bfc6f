"""Drill: the disk under the SQLite file fills up, then space returns.

Two ways to fill a disk, both against `hub serve` in a subprocess taking signed SMS
webhooks:

- a real small filesystem: a 16 MiB tmpfs mounted for the test (needs root and
  mount permission; skipped otherwise), filled with a ballast file until ENOSPC, then
  freed by deleting the ballast while the hub keeps running: ingestion must resume in
  the same process, with no restart;
- a file-size limit: the hub started under RLIMIT_FSIZE (a tiny launcher sets it and
  ignores SIGXFSZ), so writes past the limit fail with EFBIG as they would with ENOSPC;
  space "returns" by restarting the hub without the limit.

In both: while the disk is full every webhook is answered 200 (stored) or 503 (not
stored: Twilio retries), never 500 and never a 200 for something not on disk; the log
says why (`http.store_unavailable` with SQLite's reason); the process stays up; the
file passes `PRAGMA integrity_check`; and once space is back the refused webhooks,
delivered again, are stored, every acknowledged MessageSid exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import subprocess
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
from tests.servers.common import under_ci

CONCURRENCY = 16


class Ledger:
    """Every MessageSid sent, and what the hub answered for it the last time."""

    def __init__(self, hooks: SmsWebhooks) -> None:
        self.hooks = hooks
        self.numbers: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self._counter = itertools.count()

    def new(self, count: int) -> list[str]:
        sids = [self.hooks.new_sid() for _ in range(count)]
        for sid in sids:
            self.numbers[sid] = next(self._counter)
        return sids

    async def post(self, sids: list[str]) -> dict[str, int]:
        """Deliver these webhooks, CONCURRENCY at a time; returns sid -> status."""
        limit = asyncio.Semaphore(CONCURRENCY)
        answers: dict[str, int] = {}

        async def one(session: aiohttp.ClientSession, sid: str) -> None:
            async with limit:
                status, _ = await self.hooks.post(session, sid, self.numbers[sid])
            answers[sid] = self.status[sid] = status

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(one(session, sid) for sid in sids))
        return answers

    @property
    def acked(self) -> set[str]:
        return {sid for sid, status in self.status.items() if status == 200}

    @property
    def refused(self) -> list[str]:
        return [sid for sid, status in self.status.items() if status != 200]


def assert_full_disk_answers(hub: HubProcess, answers: dict[str, int]) -> None:
    statuses = set(answers.values())
    assert statuses <= {200, 503}, f"answers while the disk was full: {statuses}"
    assert 503 in statuses, "the disk never looked full to the hub"
    assert hub.running, f"the hub died on a full disk:\n{hub.tail()}"
    assert not hub.events("http.unhandled"), hub.tail()
    reasons = [str(e.get("error", "")) for e in hub.events("http.store_unavailable")]
    assert reasons, "503s without a log line saying why"
    # SQLite's own words: "database or disk is full" (ENOSPC) or "disk I/O error" (EFBIG).
    assert all("disk" in reason for reason in reasons), reasons[:3]


def assert_acked_stored(db: Path, ledger: Ledger) -> None:
    counts = stored_counts(db, SMS_CHANNEL)
    assert_exactly_once(counts, ledger.acked, "MessageSids")
    assert set(counts) <= set(ledger.numbers), "events stored that nobody sent"


# --- a real full filesystem (tmpfs) -----------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str):  # type: ignore[no-untyped-def]
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs here ({result.stderr.strip()})"
        if under_ci():
            pytest.fail(message)  # CI runs as root on a machine where mounting works
        # By hand, unprivileged: the RLIMIT_FSIZE drill in this file still runs.
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(path: Path) -> int:
    """Write a ballast file until the filesystem says ENOSPC; returns its size."""
    chunk = b"\0" * 65536
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]  # fill the last bytes too
    finally:
        os.close(fd)


@pytest.mark.slow
async def test_full_filesystem_gives_503_then_recovers_without_restart(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        db = disk / "hub.db"
        config = tmp_path / "hub.yaml"
        config.write_text(sms_hub_yaml(tmp_path / "data", db))
        hub = HubProcess(config)
        ledger = Ledger(SmsWebhooks(hub.url))
        try:
            await asyncio.to_thread(hub.start)
            warm = await ledger.post(ledger.new(50))
            assert set(warm.values()) == {200}

            ballast = disk / "ballast"
            await asyncio.to_thread(fill, ballast)
            during = await ledger.post(ledger.new(200))
            assert_full_disk_answers(hub, during)
            assert_acked_stored(db, ledger)
            # Reads still work on a full disk: the timeline stays readable.
            async with aiohttp.ClientSession() as session:
                async with session.get(hub.url + "/healthz") as response:
                    assert response.status == 200

            # Space returns; the same process takes webhooks again, and the refused ones
            # come back as Twilio's retries.
            ballast.unlink()
            refused = ledger.refused
            after = await ledger.post(refused + ledger.new(50))
            assert set(after.values()) == {200}, hub.tail()
            assert_acked_stored(db, ledger)
            assert hub.terminate() == 0
        finally:
            if hub.running:
                hub.kill()
        assert integrity_check(db) == ["ok"]
        counts = stored_counts(db, SMS_CHANNEL)
        assert_exactly_once(counts, ledger.numbers, "MessageSids")
        assert set(counts) == set(ledger.numbers)


# --- a file-size limit (RLIMIT_FSIZE) ---------------------------------------------------


@pytest.mark.slow
async def test_file_size_limit_gives_503_then_recovers_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    config = tmp_path / "hub.yaml"
    config.write_text(sms_hub_yaml(tmp_path / "data", db))
    hub = HubProcess(config)
    ledger = Ledger(SmsWebhooks(hub.url))
    try:
        await asyncio.to_thread(hub.start)
        warm = await ledger.post(ledger.new(50))
        assert set(warm.values()) == {200}
        assert hub.terminate() == 0  # checkpointed: the WAL starts empty below

        # Room for a few commits in the WAL (the database file itself only grows at a
        # checkpoint, which needs more room than that), then every write fails.
        limit = db.stat().st_size + 96 * 1024
        await asyncio.to_thread(lambda: hub.start(fsize_limit=limit))
        during = await ledger.post(ledger.new(300))
        assert_full_disk_answers(hub, during)
        assert_acked_stored(db, ledger)
        # The limit stays and the hub stays sane: more webhooks, still only 200 (stored:
        # a background checkpoint may have freed WAL space for a few) or 503.
        again = await ledger.post(ledger.refused[:50])
        assert set(again.values()) <= {200, 503}
        assert_acked_stored(db, ledger)
        assert hub.running, hub.tail()
        assert hub.terminate() == 0
        assert integrity_check(db) == ["ok"]

        # Space returns: started without the limit, the refused webhooks are delivered
        # again (Twilio's retries) and new ones arrive.
        await asyncio.to_thread(hub.start)
        after = await ledger.post(ledger.refused + ledger.new(50))
        assert set(after.values()) == {200}, hub.tail()
        assert hub.terminate() == 0
    finally:
        if hub.running:
            hub.kill()
    assert integrity_check(db) == ["ok"]
    counts = stored_counts(db, SMS_CHANNEL)
    assert_exactly_once(counts, ledger.numbers, "MessageSids")
    assert set(counts) == set(ledger.numbers)
