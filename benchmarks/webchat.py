"""Web chat at scale: widget sockets held by one hub process, and customer -> agent latency.

    python benchmarks/webchat.py            # full profile (a few minutes)
    python benchmarks/webchat.py --quick    # CI smoke profile (seconds)

(a) Connections. One server process (`hub serve` in a subprocess, its open-file limit
    raised) takes N visitor WebSockets on /chat/web/ws, each sending hello and waiting
    for its welcome. RSS (VmRSS from /proc) is read once the server has served one
    warm-up socket, and again with all N open; memory per connection is the difference
    over N. Target: 10,000 connections with the hub's RSS under 1 GiB.
    Baseline: a bare aiohttp WebSocket server in a subprocess that answers the hello and
    then echoes, holding the same number of connections.

(b) Latency. An agent signs in (POST /api/v1/auth/login) and holds the agents'
    WebSocket (/api/v1/ws); `--visitors` widget sockets send messages on a fixed
    schedule (open loop) at `--rate` messages per second in total for `--seconds`.
    Latency is from the send on the visitor socket to the event's arrival on the agent
    socket (matched by text), both clocks in this one process. Target: p99 < 25 ms at
    500 messages per second. Baseline: a bare aiohttp relay in a subprocess that forwards
    each visitor frame to the agent socket of the same process and acks the visitor.
    Each visitor first sends one unmeasured message (its customer and conversation are
    created then), so the figures are for visitors already in a conversation.
    The channel's per-visitor rate limit is raised in the benchmark's config: 200
    visitors at 500/s is 150 messages a minute each, above the default of 30.

Rounds alternate the order of hub and baseline; figures are medians over rounds. The
load generator speaks HTTP and WebSocket through benchmarks/common.py's lean clients, in
this process only. Exit status 1 if the hub loses a message (acked but never on the
agent socket, or acked but not in its SQLite file) or fails to hold the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    HOST,
    Server,
    WsClient,
    free_port,
    gather_limited,
    hub_server,
    machine_note,
    ms,
    open_loop,
    percentile,
    post_json,
    print_table,
    raise_nofile,
    script_server,
)

CHANNEL = "web"
VISITOR_PATH = f"/chat/{CHANNEL}/ws"
AGENT_LOGIN = "bench"
AGENT_PASSWORD = "benchmark-agent-password"
CONNECT_CONCURRENCY = 200
MIB = 1024

# --- the baseline server -----------------------------------------------------------------


def serve_baseline(port: int) -> None:
    """Bare aiohttp: visitor sockets answered hello then echoed or relayed to the agents."""
    from aiohttp import WSMsgType, web

    agents: set[web.WebSocketResponse] = set()
    counter = itertools.count()

    async def visitor(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        visitor_id = f"v{next(counter)}"
        greeted = False
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if not greeted:
                greeted = kind == "hello"
                await ws.send_str(json.dumps({"type": "welcome", "visitor_id": visitor_id}))
            elif kind == "message":
                event = {
                    "type": "event",
                    "event": {
                        "id": f"{visitor_id}:{frame['client_id']}",
                        "direction": "in",
                        "text": frame["text"],
                        "client_id": frame["client_id"],
                    },
                }
                text = json.dumps(event)
                for agent in tuple(agents):
                    await agent.send_str(text)
                await ws.send_str(json.dumps({"type": "ack", "client_id": frame["client_id"]}))
            else:
                await ws.send_str(msg.data)  # echo
        return ws

    async def agent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        agents.add(ws)
        try:
            await ws.send_str(json.dumps({"type": "hello", "agent_id": AGENT_LOGIN}))
            async for _ in ws:
                pass
        finally:
            agents.discard(ws)
        return ws

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get(VISITOR_PATH, visitor)
    app.router.add_get("/agent", agent)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


# --- the hub -----------------------------------------------------------------------------


def hub_yaml(data_dir: Path, port: int, password_hash: str) -> str:
    return f"""
hub:
  public_url: http://{HOST}:{port}
  data_dir: {data_dir}
  log_level: warning
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: {CHANNEL}
    type: webchat
    rate_limit_per_minute: 100000
agents:
  - id: bench
    name: Bench Agent
    login: {AGENT_LOGIN}
    role: agent
    password_hash: "{password_hash}"
"""


@dataclass
class Target:
    """A server under test and how to reach its agent socket."""

    name: str
    server: Server
    is_hub: bool
    db: Path | None = None

    async def agent_path(self) -> str:
        if not self.is_hub:
            return "/agent"
        status, body = await post_json(
            f"{self.server.url}/api/v1/auth/login",
            {"login": AGENT_LOGIN, "password": AGENT_PASSWORD},
        )
        if status != 200:
            raise RuntimeError(f"agent login failed: {status} {body}")
        return f"/api/v1/ws?token={body['token']}"


def start_target(name: str, data_dir: Path, password_hash: str, nofile: int) -> Target:
    port = free_port()
    if name == "hub":
        config = data_dir / "hub.yaml"
        config.write_text(hub_yaml(data_dir, port, password_hash))
        server = hub_server(config, port, nofile=nofile)
        return Target(name, server.start(), True, data_dir / "hub.db")
    server = script_server(Path(__file__), ["--serve-baseline", str(port)], port, nofile=nofile)
    return Target(name, server.start(), False)


# --- visitors ----------------------------------------------------------------------------


class Visitor:
    """One widget socket: hello, welcome, then messages and their acks."""

    def __init__(self, on_ack: Any = None) -> None:
        self.ws: WsClient | None = None
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.visitor_id = ""
        self.on_ack = on_ack
        self.errors: list[dict[str, Any]] = []

    def on_text(self, text: str, now: float) -> None:
        if not self.welcome.done():
            frame = json.loads(text)
            if frame.get("type") == "welcome":
                self.visitor_id = frame.get("visitor_id", "")
                self.welcome.set_result(frame)
            elif frame.get("type") == "error":
                self.welcome.set_exception(RuntimeError(f"refused: {frame}"))
            return
        if self.on_ack is None:
            return
        # Cheap filter first: most frames are the visitor's own events, echoed back.
        if '"ack"' in text or '"error"' in text:
            frame = json.loads(text)
            if frame.get("type") == "ack":
                self.on_ack(frame["client_id"])
            elif frame.get("type") == "error":
                self.errors.append(frame)

    async def open(self, port: int, within: float = 60.0) -> Visitor:
        self.ws = await WsClient.connect(HOST, port, VISITOR_PATH, self.on_text, within)
        self.ws.send_text('{"type":"hello"}')
        async with asyncio.timeout(within):
            await self.welcome
        return self


# --- (a) connections ---------------------------------------------------------------------


@dataclass
class HoldResult:
    name: str
    wanted: int
    held: int = 0
    seconds: float = 0.0
    rss_before: int = 0  # KiB
    rss_after: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def per_conn_kib(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.held)


async def hold_connections(target: Target, count: int) -> HoldResult:
    result = HoldResult(target.name, count)
    port = target.server.port
    warm = await Visitor().open(port)  # one socket served: code paths loaded, caches made
    assert warm.ws is not None
    warm.ws.close()
    await asyncio.sleep(1.0)
    result.rss_before = target.server.rss_kib()
    started = time.perf_counter()
    opening = [Visitor().open(port) for _ in range(count)]
    outcomes = await gather_limited(opening, CONNECT_CONCURRENCY)
    result.seconds = time.perf_counter() - started
    visitors = [v for v in outcomes if isinstance(v, Visitor)]
    errors = [e for e in outcomes if isinstance(e, BaseException)]
    result.failures = sorted({f"{type(e).__name__}: {e}" for e in errors})
    result.held = len(visitors)
    await asyncio.sleep(2.0)  # let the server settle (buffers freed, tasks parked)
    result.rss_after = target.server.rss_kib()
    still_open = sum(1 for v in visitors if v.ws is not None and not v.ws.closed.done())
    if still_open != result.held:
        result.failures.append(f"{result.held - still_open} sockets closed by the server")
        result.held = still_open
    if target.is_hub:
        # The hub's own count, from its readiness report.
        _, body = await asyncio.to_thread(_get_json, f"{target.server.url}/readyz")
        served = body.get("channels", {}).get(CHANNEL, {}).get("connections")
        if served != result.held:
            result.failures.append(f"hub reports {served} connections, {result.held} open here")
    for visitor in visitors:
        if visitor.ws is not None:
            visitor.ws.close()
    await asyncio.sleep(0.5)
    return result


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


# --- (b) latency -------------------------------------------------------------------------


@dataclass
class LatencyResult:
    name: str
    rate: int
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    send_lag: float = 0.0
    stored: int | None = None
    cpu_seconds: float = 0.0  # the server's CPU time while the messages flowed
    first_error: str = ""
    acked_ids: list[str] = field(default_factory=list)  # hub external ids: visitor:client

    @property
    def cpu_us(self) -> float:
        """Server CPU time per message, in microseconds."""
        return self.cpu_seconds / max(1, self.sent) * 1e6

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


async def measure_latency(
    target: Target, visitors_n: int, rate: int, seconds: float, settle: float = 10.0
) -> LatencyResult:
    result = LatencyResult(target.name, rate)
    port = target.server.port
    tag = os.urandom(3).hex()
    sent_at: dict[str, float] = {}
    arrived: dict[str, float] = {}
    all_arrived = asyncio.Event()
    expected = {"n": 0}
    acked: set[str] = set()

    def on_agent_text(text: str, now: float) -> None:
        if '"event"' not in text:
            return
        frame = json.loads(text)
        if frame.get("type") != "event":
            return
        event = frame["event"]
        body = event.get("text") or ""
        if event.get("direction") == "in" and body in sent_at and body not in arrived:
            arrived[body] = now
            if len(arrived) >= expected["n"]:
                all_arrived.set()

    agent_ws = await WsClient.connect(HOST, port, await target.agent_path(), on_agent_text)
    visitors = [Visitor(on_ack=acked.add) for _ in range(visitors_n)]
    outcomes = await gather_limited([v.open(port) for v in visitors], CONNECT_CONCURRENCY)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} visitor sockets failed to open: {failed[0]}")

    def send(visitor: Visitor, client_id: str, text: str) -> None:
        assert visitor.ws is not None
        frame = json.dumps({"type": "message", "client_id": client_id, "text": text})
        sent_at[text] = time.perf_counter()
        visitor.ws.send_text(frame)

    async def wait_all(count: int) -> None:
        expected["n"] = count
        if len(arrived) < count:
            all_arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settle):
                    await all_arrived.wait()

    # Warm-up: every visitor's first message makes its customer and conversation.
    await open_loop(
        min(rate, 200),
        visitors_n,
        lambda i, _: send(visitors[i], f"w{i}", f"warm {tag} {i}"),
    )
    await wait_all(visitors_n)
    warm_arrived = len(arrived)
    if warm_arrived < visitors_n:
        raise RuntimeError(f"warm-up: {visitors_n - warm_arrived} messages never reached the agent")
    await asyncio.sleep(0.5)

    count = max(1, round(rate * seconds))
    texts = [f"bench {tag} message {i}" for i in range(count)]

    def fire(i: int, scheduled: float) -> None:
        send(visitors[i % visitors_n], f"m{i}", texts[i])

    cpu_before = target.server.cpu_seconds()
    start = time.perf_counter() + 0.05
    last = await open_loop(rate, count, fire, start=start)
    result.send_lag = last - (start + (count - 1) / rate)
    await wait_all(visitors_n + count)
    await asyncio.sleep(0.2)  # acks trail the agent's copy by a hair
    result.cpu_seconds = target.server.cpu_seconds() - cpu_before

    result.sent = count
    result.delivered = sum(1 for t in texts if t in arrived)
    result.latencies = [arrived[t] - sent_at[t] for t in texts if t in arrived]
    by_visitor = {id(v): v for v in visitors}
    result.acked = sum(1 for i in range(count) if f"m{i}" in acked)
    for i in range(count):
        if f"m{i}" in acked:
            result.acked_ids.append(f"{visitors[i % visitors_n].visitor_id}:m{i}")
    errors = [e for v in by_visitor.values() for e in v.errors]
    result.errors = len(errors)
    result.first_error = json.dumps(errors[0]) if errors else ""
    for visitor in visitors:
        if visitor.ws is not None:
            visitor.ws.close()
    agent_ws.close()
    await asyncio.sleep(0.3)
    return result


async def count_stored(db: Path, external_ids: list[str]) -> int:
    from hub.timeline.sqlite import SqliteStore

    store = SqliteStore(db)
    await store.start()
    try:
        found = 0
        for start in range(0, len(external_ids), 500):
            chunk = external_ids[start : start + 500]
            events = await asyncio.gather(*(store.find_event(CHANNEL, x) for x in chunk))
            found += sum(1 for e in events if e is not None)
        return found
    finally:
        await store.close()


# --- the run -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke profile (seconds)")
    parser.add_argument("--connections", type=int, help="sockets to hold (10000; quick: 300)")
    parser.add_argument("--rate", type=int, help="messages per second (500)")
    parser.add_argument("--visitors", type=int, help="visitor sockets sending (200; quick: 50)")
    parser.add_argument("--seconds", type=float, help="length of the latency run (10; quick: 2)")
    parser.add_argument("--rounds", type=int, help="latency rounds per server (3; quick: 1)")
    parser.add_argument("--connection-rounds", type=int, help="connection rounds (3; quick: 1)")
    parser.add_argument("--skip", choices=("connections", "latency"), help="run only one part")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    quick = args.quick
    connections = args.connections or (300 if quick else 10_000)
    rate = args.rate or 500
    visitors_n = args.visitors or (50 if quick else 200)
    seconds = args.seconds or (2.0 if quick else 10.0)
    rounds = args.rounds or (1 if quick else 3)
    conn_rounds = args.connection_rounds or (1 if quick else 3)
    nofile = connections + 1024
    have = raise_nofile(nofile)
    if have < nofile:
        print(f"open-file limit {have} < {nofile}: hold fewer connections", file=sys.stderr)
        return 2

    from hub.passwords import hash_password

    password_hash = hash_password(AGENT_PASSWORD)
    print(f"machine: {machine_note()}")
    print(
        f"profile: {'quick' if quick else 'full'}; (a) {connections} connections x "
        f"{conn_rounds}; (b) {rate} msg/s over {visitors_n} visitors for {seconds:g} s x {rounds}"
    )
    ok = True
    holds: dict[str, list[HoldResult]] = {"baseline": [], "hub": []}
    lats: dict[str, list[LatencyResult]] = {"baseline": [], "hub": []}
    with tempfile.TemporaryDirectory(prefix="hub-bench-webchat-") as tmp:
        runs = 0
        for part, n_rounds in (("connections", conn_rounds), ("latency", rounds)):
            if args.skip == part:
                continue
            for round_no in range(n_rounds):
                order = ("baseline", "hub") if round_no % 2 == 0 else ("hub", "baseline")
                for name in order:
                    runs += 1
                    data_dir = Path(tmp) / f"run{runs}"
                    data_dir.mkdir()
                    target = start_target(name, data_dir, password_hash, nofile)
                    try:
                        if part == "connections":
                            hold = asyncio.run(hold_connections(target, connections))
                            holds[name].append(hold)
                            print(
                                f"  (a) {name:<8} held {hold.held}/{connections} in "
                                f"{hold.seconds:.1f} s, RSS {hold.rss_before / MIB:.0f} -> "
                                f"{hold.rss_after / MIB:.0f} MiB, "
                                f"{hold.per_conn_kib:.1f} KiB/connection"
                                + (f"; FAILURES: {hold.failures[:3]}" if hold.failures else ""),
                                flush=True,
                            )
                        else:
                            lat = asyncio.run(measure_latency(target, visitors_n, rate, seconds))
                            lats[name].append(lat)
                    finally:
                        code = target.server.stop()
                        if code not in (0, None, -15):
                            print(f"  {name} exited with {code}:\n{target.server.output()}")
                            ok = False
                    if part == "latency":
                        if target.db is not None:
                            lat.stored = asyncio.run(count_stored(target.db, lat.acked_ids))
                        print(
                            f"  (b) {name:<8} {lat.sent} sent, {lat.acked} acked, "
                            f"{lat.delivered} on the agent socket"
                            + (f", {lat.stored} stored" if lat.stored is not None else "")
                            + f"; p50 {ms(lat.p50)} ms, p99 {ms(lat.p99)} ms, "
                            f"server CPU {lat.cpu_us:.0f} us/message, "
                            f"late by {lat.send_lag * 1000:.0f} ms"
                            + (f"; errors {lat.errors}: {lat.first_error}" if lat.errors else ""),
                            flush=True,
                        )

    print()
    if holds["hub"] or holds["baseline"]:
        rows = []
        for name, label in (
            ("baseline", "bare aiohttp WebSocket server (baseline)"),
            ("hub", "hub, web chat visitor sockets"),
        ):
            runs_ = holds[name]
            if not runs_:
                continue
            rows.append(
                [
                    label,
                    f"{min(r.held for r in runs_):,} / {connections:,}",
                    f"{statistics.median(r.seconds for r in runs_):.1f}",
                    f"{statistics.median(r.rss_before for r in runs_) / MIB:.0f}",
                    f"{statistics.median(r.rss_after for r in runs_) / MIB:.0f}",
                    f"{statistics.median(r.per_conn_kib for r in runs_):.1f}",
                ]
            )
        print_table(
            ["(a) server", "held", "open s", "RSS before MiB", "RSS after MiB", "KiB / connection"],
            rows,
        )
        if holds["hub"] and holds["baseline"]:
            hub_kib = statistics.median(r.per_conn_kib for r in holds["hub"])
            base_kib = statistics.median(r.per_conn_kib for r in holds["baseline"])
            hub_rss = statistics.median(r.rss_after for r in holds["hub"])
            print(
                f"\nmemory per connection hub / baseline: {hub_kib / base_kib:.2f}; "
                f"hub RSS with {connections:,} sockets: {hub_rss / MIB:.0f} MiB "
                f"(target < 1024 MiB: {'met' if hub_rss < 1024 * MIB else 'MISSED'})"
            )
        for r in holds["hub"]:
            if r.held != connections or r.failures:
                ok = False
                print(f"FAIL: hub held {r.held}/{connections}: {r.failures[:5]}", file=sys.stderr)
        print()
    if lats["hub"] or lats["baseline"]:
        rows = []
        for name, label in (
            ("baseline", "bare aiohttp relay, visitor socket -> agent socket (baseline)"),
            ("hub", "hub: widget -> ingest (SQLite) -> bus -> agent WebSocket"),
        ):
            runs_ = lats[name]
            if not runs_:
                continue
            rows.append(
                [
                    label,
                    f"{rate}",
                    f"{sum(r.delivered for r in runs_):,} / {sum(r.sent for r in runs_):,}",
                    ms(statistics.median(r.p50 for r in runs_)),
                    ms(statistics.median(r.p99 for r in runs_)),
                    f"{statistics.median(r.cpu_us for r in runs_):.0f}",
                ]
            )
        print_table(
            [
                "(b) customer -> agent",
                "msg/s",
                "delivered",
                "p50 ms",
                "p99 ms",
                "server CPU us/msg",
            ],
            rows,
        )
        if lats["hub"]:
            hub_p99 = statistics.median(r.p99 for r in lats["hub"])
            verdict = "met" if hub_p99 < 0.025 else "MISSED"
            line = f"\nhub p99 {ms(hub_p99)} ms at {rate} msg/s (target < 25 ms: {verdict})"
            if lats["baseline"]:
                base_p99 = statistics.median(r.p99 for r in lats["baseline"])
                line += f"; p99 hub / baseline: {hub_p99 / base_p99:.1f}"
            print(line)
        for r in lats["hub"]:
            if r.lost or r.acked != r.sent or (r.stored is not None and r.stored != r.acked):
                ok = False
                print(
                    f"FAIL: hub lost messages: sent {r.sent}, acked {r.acked}, "
                    f"on the agent socket {r.delivered}, stored {r.stored}",
                    file=sys.stderr,
                )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
