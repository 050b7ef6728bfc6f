"""Ingest throughput on the SQLite store, beside raw SQLite measured in the same run.

    python benchmarks/ingest.py [--messages 5000] [--concurrency 64] [--rounds 3]

Baseline: one INSERT and one COMMIT per row into a table shaped like the events table,
in WAL mode with synchronous=FULL (the hub's durability setting), from one thread.
Hub: the full ingest path (idempotency, identity resolution, threading, append, bus
publish) with `concurrency` webhooks in flight, as a provider's deliveries would arrive.
Each figure is the median of `rounds` runs on fresh files; the ratio is hub / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.bus import InProcessBus
from hub.ids import new_id
from hub.ingest import Ingestor
from hub.log import configure_logging
from hub.model import ChannelType, Identity, IdentityKind, Inbound
from hub.timeline.sqlite import SqliteStore


def raw_sqlite_rate(path: Path, messages: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (id TEXT PRIMARY KEY, customer_id TEXT, conversation_id TEXT,"
        " channel TEXT, channel_type TEXT, direction TEXT, kind TEXT, author TEXT,"
        " created_at INTEGER, text TEXT, html TEXT, attachments TEXT, external_id TEXT,"
        " delivery_state TEXT, delivery_error TEXT, data TEXT)"
    )
    conn.execute("CREATE UNIQUE INDEX events_ext ON events(channel, external_id)")
    started = time.perf_counter()
    for n in range(messages):
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (new_id(), "c", "v", "sms", "sms", "in", "message", "customer",
             time.time_ns() // 1000, f"message {n}", None, "[]", f"SM{n}", None, None, "{}"),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return messages / elapsed


def make_inbounds(messages: int, customers: int) -> list[Inbound]:
    return [
        Inbound(
            channel="sms",
            channel_type=ChannelType.SMS,
            external_id=f"SM{n:032d}",
            identity=Identity(IdentityKind.PHONE, f"+1202555{n % customers:04d}"),
            text=f"message {n}",
        )
        for n in range(messages)
    ]


async def hub_rate(path: Path, messages: int, concurrency: int, customers: int) -> float:
    store = SqliteStore(path)
    await store.start()
    bus = InProcessBus()
    sink = bus.subscribe("benchmark", maxsize=messages * 3)  # a live consumer, as in prod
    ingestor = Ingestor(store, bus)
    inbounds = make_inbounds(messages, customers)
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    for inbound in inbounds:
        queue.put_nowait(inbound)

    async def worker() -> None:
        while not queue.empty():
            await ingestor.ingest(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    page = await store.customer_timeline(
        (await store.find_customer(inbounds[0].identity)).id, limit=1  # type: ignore[union-attr]
    )
    assert page.total is not None and page.total >= messages // customers
    sink.close()
    await store.close()
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    # Production logs one JSON line per ingest at info; keep that cost in the figure.
    devnull = open(os.devnull, "w")
    configure_logging("info", json=True, stream=devnull)

    raw, hub = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            raw.append(raw_sqlite_rate(Path(tmp) / "raw.db", args.messages))
        with tempfile.TemporaryDirectory() as tmp:
            hub.append(
                asyncio.run(
                    hub_rate(Path(tmp) / "hub.db", args.messages, args.concurrency, args.customers)
                )
            )
    raw_median, hub_median = statistics.median(raw), statistics.median(hub)
    result = {
        "benchmark": "ingest-sqlite",
        "messages": args.messages,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "raw_insert_commit_per_s": round(raw_median),
        "hub_ingest_per_s": round(hub_median),
        "ratio": round(hub_median / raw_median, 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'what':<44}{'median/s':>12}")
    print(f"{'raw SQLite: INSERT + COMMIT per row (baseline)':<44}{raw_median:>12.0f}")
    print(f"{'hub ingest, full path, concurrency ' + str(args.concurrency):<44}{hub_median:>12.0f}")
    print(f"{'ratio hub / baseline (target >= 0.5)':<44}{hub_median / raw_median:>12.2f}")


if __name__ == "__main__":
    main()
