"""Drill: the IMAP connection cut in the middle of a FETCH, again and again.

tests/email/test_fetch.py already covers the hub's side going away mid-fetch (the fetch
task cancelled, the adapter restarted) and Dovecot restarted between fetches. This
drill covers the network's side: a TCP proxy written here sits between the hub and a
real Dovecot and cuts each of the first connections after a byte budget of the server's
answers, so the cut lands inside a UID FETCH response, half-way through a message
literal; half the cuts close with FIN, half with RST. 200 mails wait in the mailbox;
the adapter fetches them in batches of 20 and must reconnect, resume from its stored
position and, once the proxy lets a connection live, store every mail exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

import pytest

from hub.bus import InProcessBus
from hub.channels.base import HubServices
from hub.channels.email import EmailAdapter
from hub.ingest import Ingestor
from hub.timeline.sqlite import SqliteStore
from tests.email.conftest import CHANNEL, make_config, make_mail
from tests.faults.conftest import assert_exactly_once, stored_counts
from tests.servers.dovecot import DovecotServer, wait_until

MAILS = 200
# Bytes of server output each new connection may carry before it is cut. A batch of 20
# mails is ~30 KB; small budgets cut the first FETCH, larger ones let a batch or two
# through and cut a later one. Connections after these are left alone.
BUDGETS = [5_000, 34_000, 70_000, 9_000, 52_000, 110_000, 16_000, 41_000]
PADDING = "All work and no play makes a long mail. " * 25  # ~1 KB of body


class CuttingProxy:
    """A loopback TCP proxy that cuts connections after a budget of downstream bytes."""

    def __init__(self, target_port: int, budgets: list[int]) -> None:
        self.target_port = target_port
        self.budgets = list(budgets)
        self.port = 0
        self.connections = 0
        self.cuts: list[bytes] = []  # the client's last command before each cut
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        budget = self.budgets.pop(0) if self.budgets else None
        rst = len(self.cuts) % 2 == 1
        last_command = [b""]
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return

        async def upstream() -> None:
            while data := await client_r.read(65536):
                for line in data.split(b"\r\n"):
                    if line[:1].isalnum() and b" " in line:
                        last_command[0] = line[:80]
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            passed = 0
            while data := await server_r.read(65536):
                if budget is not None and passed + len(data) > budget:
                    client_w.write(data[: budget - passed])
                    with contextlib.suppress(ConnectionError):
                        await client_w.drain()
                    self.cuts.append(last_command[0])
                    cut(client_w, rst)
                    cut(server_w, rst)
                    return
                passed += len(data)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if budget is not None and self.cuts:
                for pump in pumps:
                    pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)


def cut(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:
        # SO_LINGER 0: close() sends RST at once, as a crashing middlebox would.
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


@pytest.mark.slow
async def test_imap_cut_mid_fetch_stores_every_mail_once(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    await dovecot.append(
        make_mail(i, sender=f"customer{i % 13}@client.example", body=f"Mail {i}. {PADDING}")
        for i in range(MAILS)
    )
    proxy = CuttingProxy(dovecot.port, BUDGETS)
    await proxy.start()
    db = tmp_path / "hub.db"
    store = SqliteStore(db)
    await store.start()
    bus = InProcessBus()
    await bus.start()
    config = make_config(tmp_path / "data", imap_port=proxy.port)
    services = HubServices(config=config, store=store, bus=bus, ingestor=Ingestor(store, bus))
    adapter = EmailAdapter(config.channels[0], config)  # type: ignore[arg-type]
    adapter.batch_size = 20
    adapter.backoff_base = 0.05
    adapter.backoff_max = 0.3
    adapter.imap_timeout = 10
    try:
        await adapter.start(services)
        await wait_until(lambda: adapter.status()["last_uid"] == MAILS, within=60, interval=0.05)
        await asyncio.sleep(0.3)  # anything still on its way would show up now

        counts = stored_counts(db, CHANNEL)
        expected = [f"<mail-{i}@client.example>" for i in range(MAILS)]
        assert_exactly_once(counts, expected, "mails")
        assert len(counts) == MAILS
        # Every budget was spent: each of those connections really was cut, and the cuts
        # landed in FETCH responses (the client's last command was the UID FETCH).
        assert len(proxy.cuts) == len(BUDGETS), proxy.cuts
        during_fetch = [c for c in proxy.cuts if b"FETCH" in c.upper()]
        assert len(during_fetch) >= len(BUDGETS) - 2, proxy.cuts
        assert proxy.connections > len(BUDGETS)
        status = adapter.status()
        assert status["ok"] and status["connected"] and not status["stalled"]
    finally:
        await adapter.stop()
        await proxy.close()
        await bus.close()
        await store.close()
