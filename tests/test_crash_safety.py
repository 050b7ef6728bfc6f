"""A process SIGKILLed right after ingest returned has lost nothing it acknowledged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub.timeline.sqlite import SqliteStore

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from hub.bus import InProcessBus
    from hub.ingest import Ingestor
    from hub.log import configure_logging
    from hub.model import ChannelType, Identity, IdentityKind, Inbound
    from hub.timeline.sqlite import SqliteStore

    async def main(path):
        configure_logging("error", json=True)
        store = SqliteStore(path)
        await store.start()
        ingestor = Ingestor(store, InProcessBus())
        counter = iter(range(10**9))

        async def worker():
            while True:
                n = next(counter)
                recorded = await ingestor.ingest(Inbound(
                    channel="sms", channel_type=ChannelType.SMS, external_id=f"SM{n}",
                    identity=Identity(IdentityKind.PHONE, f"+1202555{n % 50:04d}"),
                    text=f"message {n}"))
                # The acknowledgement a provider would get: printed only after ingest returned.
                sys.stdout.write(f"{n} {recorded.event.id}\\n")
                sys.stdout.flush()

        await asyncio.gather(*(worker() for _ in range(16)))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 200, 1500])
def test_sigkill_after_acknowledged_ingests_loses_nothing(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "hub.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acknowledged: dict[str, str] = {}
    assert child.stdout is not None
    while len(acknowledged) < kill_after:
        line = child.stdout.readline()
        assert line, "the ingesting child died before the kill"
        n, event_id = line.split()
        acknowledged[f"SM{n}"] = event_id
    child.send_signal(signal.SIGKILL)
    # Whatever else it printed before dying was acknowledged too.
    for line in child.stdout:
        if line.endswith("\n") and len(line.split()) == 2:
            n, event_id = line.split()
            acknowledged[f"SM{n}"] = event_id
    child.wait()
    assert child.returncode == -signal.SIGKILL

    asyncio.run(assert_all_stored(path, acknowledged))


async def assert_all_stored(path: Path, acknowledged: dict[str, str]) -> None:
    store = SqliteStore(path)
    await store.start()
    try:
        for external_id, event_id in acknowledged.items():
            event = await store.find_event("sms", external_id)
            assert event is not None, f"acknowledged {external_id} was lost"
            assert event.id == event_id
    finally:
        await store.close()
