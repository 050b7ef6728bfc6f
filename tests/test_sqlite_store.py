"""What only the SQLite backend promises: file format, durability settings, group commit.

Behaviour every backend shares lives in tests/contract/test_store.py; these tests may
look inside the SQLite file and the writer process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.model import (
    ChannelType,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    agent_author,
    utcnow,
)
from hub.timeline import sqlite_schema
from hub.timeline.sqlite import SqliteStore, _Writer
from hub.timeline.store import IdentityConflict, StoreUnavailable


def sms(n: int, external_id: str) -> Inbound:
    return Inbound(
        channel="sms",
        channel_type=ChannelType.SMS,
        external_id=external_id,
        identity=Identity(IdentityKind.PHONE, f"+1202555{n:04d}"),
        text=f"message {external_id}",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    instance = SqliteStore(tmp_path / "hub.db")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


def pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {row[0] for row in rows}
    finally:
        conn.close()


# --- schema and migrations --------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["no-file", "empty-file"])
async def test_fresh_file_gets_the_whole_schema(tmp_path: Path, existing: bool) -> None:
    path = tmp_path / "data" / "hub.db"  # a missing directory is made, too
    if existing:
        path.parent.mkdir()
        path.touch()
    store = SqliteStore(path)
    await store.start()
    await store.close()
    assert pragma(path, "user_version") == sqlite_schema.SCHEMA_VERSION
    assert {"customers", "identities", "conversations", "events", "outbox"} <= tables(path)


async def test_reopening_a_current_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    for _ in range(2):
        store = SqliteStore(path)
        await store.start()
        await store.close()
    assert pragma(path, "user_version") == sqlite_schema.SCHEMA_VERSION


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {sqlite_schema.SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(StoreUnavailable, match="newer"):
        await store.start()
    assert pragma(path, "user_version") == sqlite_schema.SCHEMA_VERSION + 1


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    path.write_bytes(b"this is not a database, just some text " * 200)
    with pytest.raises(StoreUnavailable, match=str(path)):
        await SqliteStore(path).start()


async def test_pending_migration_steps_are_applied_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.db"
    store = SqliteStore(path)
    await store.start()
    recorded = await store.record_inbound(sms(1, "SM-before-upgrade"))
    await store.close()

    step = ("CREATE TABLE upgrade_probe (x INTEGER)", "INSERT INTO upgrade_probe VALUES (7)")
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", (*sqlite_schema.MIGRATIONS, step))
    monkeypatch.setattr(sqlite_schema, "SCHEMA_VERSION", len(sqlite_schema.MIGRATIONS))
    upgraded = SqliteStore(path)
    await upgraded.start()
    try:
        assert await upgraded.get_event(recorded.event.id) == recorded.event
    finally:
        await upgraded.close()
    assert pragma(path, "user_version") == sqlite_schema.SCHEMA_VERSION
    assert "upgrade_probe" in tables(path)


async def test_a_failing_migration_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.db"
    store = SqliteStore(path)
    await store.start()
    await store.close()
    before = sqlite_schema.SCHEMA_VERSION

    broken = ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", (*sqlite_schema.MIGRATIONS, broken))
    monkeypatch.setattr(sqlite_schema, "SCHEMA_VERSION", len(sqlite_schema.MIGRATIONS))
    with pytest.raises(StoreUnavailable, match="schema"):
        await SqliteStore(path).start()
    assert pragma(path, "user_version") == before
    assert "half_done" not in tables(path)


# --- connection settings ----------------------------------------------------------------


def _settings(conn: sqlite3.Connection) -> dict[str, object]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}


def _writer_settings(writes: object, conn: sqlite3.Connection) -> dict[str, object]:
    return _settings(conn)  # runs in the writer process, on its connection


async def test_durability_settings_are_in_force(store: SqliteStore) -> None:
    writer = await store._write(_writer_settings)
    assert writer == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": sqlite_schema.BUSY_TIMEOUT_MS,
    }
    reader = await store._read(_settings)
    assert reader["journal_mode"] == "wal" and reader["busy_timeout"] > 0


async def test_an_acknowledged_write_is_committed(store: SqliteStore) -> None:
    recorded = await store.record_inbound(sms(2, "SM-ack"))
    # Another connection, as another process would have: it sees the row at once.
    conn = sqlite3.connect(store.path)
    try:
        row = conn.execute(
            "SELECT id FROM events WHERE channel = 'sms' AND external_id = 'SM-ack'"
        ).fetchone()
    finally:
        conn.close()
    assert row == (recorded.event.id,)


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    store = SqliteStore(path)
    await store.start()
    first = await store.record_inbound(sms(3, "SM-persist"))
    assert first.conversation is not None
    queued = await store.append(
        first.conversation.id,
        EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=agent_author("a1"),
            channel="sms",
            channel_type=ChannelType.SMS,
            text="reply",
            delivery_state=DeliveryState.QUEUED,
        ),
    )
    await store.set_state("imap:support:uid", "99")
    await store.close()

    reopened = SqliteStore(path)
    await reopened.start()
    try:
        assert await reopened.get_event(first.event.id) == first.event
        assert await reopened.get_customer(first.customer.id) == first.customer
        assert await reopened.get_state("imap:support:uid") == "99"
        again = await reopened.record_inbound(sms(3, "SM-persist"))
        assert not again.created and again.event == first.event
        [item] = await reopened.claim_outbound(
            utcnow() + timedelta(seconds=1), 10, timedelta(minutes=1)
        )
        assert item.event == queued.event
        later = await reopened.record_inbound(sms(3, "SM-after-reopen"))
        assert later.event.id > queued.event.id
        assert later.conversation == await reopened.get_conversation(first.conversation.id)
    finally:
        await reopened.close()


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hub.db")
    with pytest.raises(StoreUnavailable):
        await store.ping()  # not started yet
    await store.start()
    await store.ping()
    await store.close()
    await store.close()  # twice is harmless
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.record_inbound(sms(4, "SM-late"))
    with pytest.raises(StoreUnavailable):
        await store.get_state("x")


# --- the writer: group commit and isolation of failures --------------------------------


def _park(writes: object, conn: sqlite3.Connection, entered: str, release: str) -> None:
    # Runs in the writer process: files are the signals that cross to the test.
    Path(entered).touch()
    deadline = time.monotonic() + 10
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def _fails_after_writing(writes: object, conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO state (key, value) VALUES ('half', 'written')")
    raise ValueError("boom")


async def _hold_writer(store: SqliteStore, tmp_path: Path) -> tuple[Path, asyncio.Task[object]]:
    """Park the writer inside a batch so that the next writes queue up into one batch;
    touching the returned path lets it go on."""
    entered, release = tmp_path / "parked", tmp_path / "release"
    task = asyncio.create_task(store._write(_park, str(entered), str(release)))
    deadline = time.monotonic() + 10
    while not entered.exists():
        assert time.monotonic() < deadline, "the writer never started the parked write"
        await asyncio.sleep(0.005)
    return release, task


async def test_a_failing_write_rolls_back_alone_within_its_batch(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    release, parked = await _hold_writer(store, tmp_path)
    batch_sizes: list[int] = []
    encode = _Writer._encode

    def counting_encode(batch: list[Any]) -> bytes:
        batch_sizes.append(len(batch))
        return encode(batch)

    monkeypatch.setattr(_Writer, "_encode", staticmethod(counting_encode))

    before = asyncio.create_task(store.set_state("before", "1"))
    customer = asyncio.create_task(store.create_customer("Ok", ()))
    failing = asyncio.create_task(store._write(_fails_after_writing))
    number = Identity(IdentityKind.PHONE, "+12025550001")
    owner = asyncio.create_task(store.create_customer("Owner", (number,)))
    conflict = asyncio.create_task(store.create_customer("Dup", (number,)))
    after = asyncio.create_task(store.set_state("after", "1"))
    await asyncio.sleep(0.05)  # let every task enqueue behind the parked writer
    release.touch()
    await parked

    await before
    await after
    created = await customer
    with pytest.raises(ValueError, match="boom"):
        await failing
    owned = await owner
    with pytest.raises(IdentityConflict):
        await conflict  # the owner, earlier in the same batch, took the number

    assert await store.get_state("before") == "1"
    assert await store.get_state("after") == "1"
    assert await store.get_state("half") is None
    assert await store.get_customer(created.id) == created
    assert await store.find_customer(number) == owned
    assert batch_sizes == [6]  # all of them shared one transaction


async def test_the_event_loop_runs_while_the_writer_is_busy(
    store: SqliteStore, tmp_path: Path
) -> None:
    release, parked = await _hold_writer(store, tmp_path)
    try:
        # Timers fire and reads are served while a write batch is in progress.
        await asyncio.wait_for(asyncio.sleep(0.01), timeout=1)
        assert await asyncio.wait_for(store.get_state("nothing"), timeout=5) is None
    finally:
        release.touch()
        await parked


async def test_many_concurrent_ingests_all_complete_and_are_stored(store: SqliteStore) -> None:
    results = await asyncio.gather(
        *(store.record_inbound(sms(n % 40, f"SM-{n}")) for n in range(600))
    )
    assert all(r.created for r in results)
    assert len({r.event.id for r in results}) == 600
    customers = {r.customer.id for r in results}
    assert len(customers) == 40
    totals = [(await store.customer_timeline(cid, limit=1)).total for cid in customers]
    assert sum(t or 0 for t in totals) == 600
    for r in results[::50]:
        assert await store.get_event(r.event.id) == r.event
    # Every customer still has exactly one conversation: no race made a second one.
    convs = {r.conversation.id for r in results if r.conversation is not None}
    assert len(convs) == 40


async def test_ids_follow_commit_order(store: SqliteStore) -> None:
    results = await asyncio.gather(*(store.record_inbound(sms(7, f"SM-o{n}")) for n in range(100)))
    assert results[0].conversation is not None
    events = await store.events_after(results[0].conversation.id, None)
    # Read back oldest first, by id: the same order the writes were applied (queued) in.
    assert [e.external_id for e in events] == [f"SM-o{n}" for n in range(100)]


# --- the writer process: killed, restarted, stopped --------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_writes_survive_the_writer_process_being_killed(
    store: SqliteStore, tmp_path: Path
) -> None:
    before = await store.record_inbound(sms(1, "SM-before-kill"))
    pid = store.writer_pid
    assert pid is not None and pid != os.getpid()

    # Killed in the middle of a batch: that batch is refused, not acknowledged...
    _, parked = await _hold_writer(store, tmp_path)
    waiting = asyncio.create_task(store.record_inbound(sms(2, "SM-waiting")))
    await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(StoreUnavailable, match="died"):
        await parked
    # ...while the write queued behind it goes to a new writer.
    stored = await asyncio.wait_for(waiting, 30)
    assert stored.created
    new_pid = store.writer_pid
    assert new_pid is not None and new_pid != pid
    await store.ping()
    after = await store.record_inbound(sms(1, "SM-after-kill"))
    assert await store.get_event(before.event.id) == before.event
    assert await store.find_event("sms", "SM-waiting") == stored.event
    # Ids minted by the new writer still sort after the old writer's.
    assert before.event.id < stored.event.id < after.event.id
    assert after.conversation is not None and before.conversation is not None
    assert after.conversation.id == before.conversation.id


async def test_a_writer_that_cannot_start_is_retried_after_a_pause(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub.timeline import sqlite_writer

    pid = store.writer_pid
    assert pid is not None
    real_start = sqlite_writer.WriterProcess.start
    attempts: list[float] = []

    def failing_start(self: sqlite_writer.WriterProcess) -> None:
        attempts.append(time.monotonic())
        raise StoreUnavailable("cannot start the SQLite writer: no processes left")

    monkeypatch.setattr(sqlite_writer.WriterProcess, "start", failing_start)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while store.writer_pid == pid and await _still_up(store):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    # The write that finds no writer tries to start one; the failure is a 503 for it,
    # and the next writes are refused at once (no start per write) during the pause.
    with pytest.raises(StoreUnavailable):
        await store.set_state("k", "1")
    with pytest.raises(StoreUnavailable, match="restarting"):
        await store.set_state("k", "2")
    assert len(attempts) == 1
    monkeypatch.setattr(sqlite_writer.WriterProcess, "start", real_start)
    await asyncio.sleep(sqlite_writer.RESTART_BACKOFF + 0.1)
    await store.set_state("k", "3")
    assert await store.get_state("k") == "3"


async def _still_up(store: SqliteStore) -> bool:
    try:
        await store.ping()
    except StoreUnavailable:
        return False
    return True


async def test_close_waits_for_the_writer_to_finish_and_exit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hub.db")
    await store.start()
    pid = store.writer_pid
    assert pid is not None
    writes = [asyncio.create_task(store.record_inbound(sms(n, f"SM-c{n}"))) for n in range(50)]
    await asyncio.sleep(0)  # queued before close
    await store.close()
    assert all(task.done() for task in writes)
    stored = [task.result() for task in writes if not task.exception()]
    assert len(stored) == 50  # close flushed everything accepted before it
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the writer process outlived close()"
        await asyncio.sleep(0.02)
    reopened = SqliteStore(tmp_path / "hub.db")
    await reopened.start()
    try:
        for recorded in stored[::10]:
            assert await reopened.get_event(recorded.event.id) == recorded.event
    finally:
        await reopened.close()


async def test_the_wal_is_copied_back_while_the_writer_keeps_writing(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    store = SqliteStore(path)
    await store.start()
    try:
        empty = path.stat().st_size
        for start in range(0, 3000, 300):
            await asyncio.gather(
                *(store.record_inbound(sms(n % 200, f"SM-w{n}")) for n in range(start, start + 300))
            )
        # Far below the writer's own backstop (20,000 pages): only the background
        # checkpointer moves these pages into the database file, with the store open.
        deadline = time.monotonic() + 10
        while path.stat().st_size <= empty + 1_000_000:
            assert time.monotonic() < deadline, "nothing was checkpointed into the file"
            await asyncio.sleep(0.05)
        customer = await store.find_customer(sms(3, "x").identity)
        assert customer is not None
        assert (await store.customer_timeline(customer.id)).total == 15
    finally:
        await store.close()
