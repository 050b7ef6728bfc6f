"""What the benchmarks share: servers in subprocesses, lean load-generating clients, figures.

- `Server` runs a hub (`hub serve --config FILE --port P`) or a baseline in its own
  process, on a free loopback port, with a raised open-file limit, and reads its RSS from
  /proc. The load generator never shares an event loop (or a core) with the server.
- `HttpPool` and `WsClient` are small HTTP/1.1 and WebSocket clients written straight on
  asyncio protocols. aiohttp's client costs several times what its server does per
  request; on a 2-core machine that would make the generator, not the server, the limit.
  Both are deliberately minimal: keep-alive, Content-Length bodies, unfragmented frames.
- `open_loop` fires callbacks on a fixed schedule (open loop: a slow server does not slow
  the arrivals), `percentile` and `print_table` make the figures.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"

# --- figures ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (paste-able into RESULTS.md), columns padded for the terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def machine_note() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, target_hard))
    except (ValueError, OSError):
        # Not privileged to raise the hard limit: go as far as it allows.
        new_soft = hard if hard != resource.RLIM_INFINITY else wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_soft), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS, in KiB)."""
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live descendants have used so far (from
    /proc/PID/stat): the hub's SQLite writer is a child process, and its work counts.

    Less sensitive to other tenants of a shared machine than latency or throughput: a
    server's CPU time per request is what it costs, however long it waited for a core.
    """
    total = 0.0
    for one in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children...)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                found.append(int(child))
                stack.append(int(child))
    return found


class Server:
    """One server process on a loopback port: started, waited for, measured, stopped."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        ready_path: str = "/healthz",
        nofile: int = 4096,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.ready_path = ready_path
        self.nofile = nofile
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def start(self, timeout: float = 30.0) -> Server:
        nofile = self.nofile
        env = dict(os.environ, PYTHONPATH=str(REPO), **(self.env or {}))
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: raise_nofile(nofile),  # no threads yet in the child
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the hub closes its store cleanly), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


def hub_server(config_path: Path, port: int, *, nofile: int = 4096) -> Server:
    """`hub serve --config FILE --port P`, run from this working tree."""
    argv = [sys.executable, "-m", "hub.cli", "serve", "--config", str(config_path)]
    return Server("hub", [*argv, "--port", str(port)], port, nofile=nofile)


def script_server(script: Path, args: Sequence[str], port: int, *, nofile: int = 4096) -> Server:
    """A baseline server living in a benchmark script (`python SCRIPT ARGS...`)."""
    return Server("baseline", [sys.executable, str(script), *args], port, nofile=nofile)


# --- open-loop schedule ----------------------------------------------------------------


async def open_loop(
    rate: float, count: int, fire: Callable[[int, float], None], *, start: float | None = None
) -> float:
    """Call fire(i, scheduled_time) for i in range(count) at `rate` per second.

    Times are time.perf_counter() values; calls due while the loop was busy fire at once
    (late, but with their scheduled time, so latency measured from it stays honest).
    Returns the time the last call was actually made.
    """
    loop_start = time.perf_counter() + 0.05 if start is None else start
    interval = 1.0 / rate
    i = 0
    now = time.perf_counter()
    while i < count:
        due = loop_start + i * interval
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.perf_counter()
        while i < count and loop_start + i * interval <= now:
            fire(i, loop_start + i * interval)
            i += 1
    return now


# --- a lean HTTP/1.1 client --------------------------------------------------------------


class HttpError(Exception):
    pass


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection, one request at a time, Content-Length bodies only."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by peer'}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for header in head[1:]:
            name, _, value = header.partition(":")
            lname = name.strip().lower()
            if lname == "content-length":
                length = int(value)
            elif lname == "connection" and value.strip().lower() == "close":
                self.close_after = True
            elif lname == "transfer-encoding":
                self._fail(HttpError("chunked responses are not supported by this client"))
                return
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        status = int(head[0].split(" ", 2)[1])
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))
        if self.close_after and self.transport is not None:
            self.transport.close()
            self.closed = True

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class HttpPool:
    """Keep-alive connections to one server, opened on demand up to `max_conns`."""

    def __init__(self, host: str, port: int, max_conns: int = 256) -> None:
        self.host = host
        self.port = port
        self.max_conns = max_conns
        self._idle: list[_HttpConn] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _acquire(self) -> _HttpConn:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._open -= 1
            if self._open < self.max_conns:
                self._open += 1
                try:
                    _, proto = await asyncio.get_running_loop().create_connection(
                        _HttpConn, self.host, self.port
                    )
                except BaseException:
                    self._open -= 1
                    raise
                return proto
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _release(self, conn: _HttpConn) -> None:
        if conn.closed:
            self._open -= 1
            if conn.transport is not None:
                conn.transport.close()
        else:
            self._idle.append(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def request(self, data: bytes, within: float = 10.0) -> tuple[int, bytes]:
        """Send one pre-built request; its answer (status, body) within `within` seconds."""
        conn = await self._acquire()
        try:
            async with asyncio.timeout(within):
                return await conn.request(data)
        except BaseException:
            conn.closed = True
            raise
        finally:
            conn.waiter = None
            self._release(conn)

    @property
    def open_connections(self) -> int:
        return self._open

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


class _SenderConn(asyncio.Protocol):
    """One keep-alive connection of an OpenLoopSender: one request in flight at a time."""

    def __init__(self, sender: OpenLoopSender) -> None:
        self.sender = sender
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.index = -1  # the request in flight, or -1
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.index >= 0:
            index, self.index = self.index, -1
            self.sender._failed(index, f"connection lost: {exc or 'closed by peer'}")
        self.sender._lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buf
            return
        head = buf[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.buffer = b""
            self._abort("a response without Content-Length")
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else len(head)])
        total = end + 4 + length
        if len(buf) < total:
            self.buffer = buf
            return
        self.buffer = buf[total:]
        status = int(buf[9:12])
        index, self.index = self.index, -1
        if b"\r\nconnection: close" in head:
            self._abort("")
        if index >= 0:
            self.sender._answered(self, index, status, buf[end + 4 : total])

    def _abort(self, reason: str) -> None:
        if self.index >= 0 and reason:
            index, self.index = self.index, -1
            self.sender._failed(index, reason)
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class SendOutcome:
    """What one open-loop run saw: latencies of answered requests (from their scheduled
    time), the statuses, and how late the schedule itself ran."""

    latencies: list[float]
    statuses: list[int]  # per request; 0 = no answer (error)
    errors: int
    first_error: str
    send_lag: float


class OpenLoopSender:
    """Sends pre-built HTTP/1.1 requests on a fixed schedule over keep-alive connections.

    Lean on purpose (no task or future per request): the generator shares the machine
    with the server it measures, so every microsecond it spends is one the server under
    test does not get. Requests due while every connection is busy wait in a queue; their
    latency still counts from the scheduled time.
    """

    def __init__(self, host: str, port: int, *, max_conns: int = 512, timeout: float = 10.0):
        self.host = host
        self.port = port
        self.max_conns = max_conns
        self.timeout = timeout
        self._idle: list[_SenderConn] = []
        self._all: set[_SenderConn] = set()
        self._opening = 0
        self._queue: collections.deque[int] = collections.deque()
        self._requests: list[bytes] = []
        self._scheduled: list[float] = []
        self._sent_at: dict[int, float] = {}
        self._outcome = SendOutcome([], [], 0, "", 0.0)
        self._remaining = 0
        self._finished: asyncio.Future[None] | None = None

    async def open(self, count: int) -> None:
        """Open `count` connections ahead of time (opening them costs the server too)."""
        loop = asyncio.get_running_loop()
        for _ in range(min(count, self.max_conns) - len(self._all)):
            _, conn = await loop.create_connection(lambda: _SenderConn(self), self.host, self.port)
            self._all.add(conn)
            self._idle.append(conn)

    async def run(self, requests: list[bytes], rate: float) -> SendOutcome:
        loop = asyncio.get_running_loop()
        count = len(requests)
        self._requests = requests
        self._scheduled = [0.0] * count
        self._sent_at = {}
        self._outcome = SendOutcome([], [0] * count, 0, "", 0.0)
        self._remaining = count
        self._finished = loop.create_future()
        watchdog = loop.create_task(self._expire())
        interval = 1.0 / rate
        start = time.perf_counter() + 0.05
        i = 0
        now = start
        while i < count:
            due = start + i * interval
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.perf_counter()
            while i < count and start + i * interval <= now:
                self._scheduled[i] = start + i * interval
                self._send(i)
                i += 1
        self._outcome.send_lag = now - (start + (count - 1) * interval)
        try:
            if self._remaining:
                await self._finished
        finally:
            watchdog.cancel()
        return self._outcome

    def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()

    # --- internals ---

    def _send(self, index: int) -> None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None:
                conn.index = index
                self._sent_at[index] = time.perf_counter()
                conn.transport.write(self._requests[index])
                return
        self._queue.append(index)
        if len(self._all) + self._opening < self.max_conns and self._opening < len(self._queue):
            self._opening += 1
            asyncio.get_running_loop().create_task(self._open_one())

    async def _open_one(self) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _SenderConn(self), self.host, self.port
            )
        except OSError as exc:
            self._opening -= 1
            if self._queue:
                self._failed(self._queue.popleft(), f"connect: {exc}")
            return
        self._opening -= 1
        self._all.add(conn)
        self._ready(conn)

    def _ready(self, conn: _SenderConn) -> None:
        if conn.closed:
            return
        if self._queue:
            index = self._queue.popleft()
            conn.index = index
            self._sent_at[index] = time.perf_counter()
            assert conn.transport is not None
            conn.transport.write(self._requests[index])
        else:
            self._idle.append(conn)

    def _answered(self, conn: _SenderConn, index: int, status: int, body: bytes) -> None:
        outcome = self._outcome
        self._sent_at.pop(index, None)
        if status == 200:
            outcome.latencies.append(time.perf_counter() - self._scheduled[index])
            outcome.statuses[index] = 200
        else:
            outcome.statuses[index] = status
            outcome.errors += 1
            outcome.first_error = outcome.first_error or f"HTTP {status}: {body[:200]!r}"
        self._ready(conn)
        self._one_done()

    def _failed(self, index: int, reason: str) -> None:
        self._sent_at.pop(index, None)
        self._outcome.errors += 1
        self._outcome.first_error = self._outcome.first_error or reason
        self._one_done()

    def _lost(self, conn: _SenderConn) -> None:
        self._all.discard(conn)
        if self._queue and len(self._all) + self._opening < self.max_conns:
            self._opening += 1
            asyncio.get_running_loop().create_task(self._open_one())

    def _one_done(self) -> None:
        self._remaining -= 1
        if self._remaining == 0 and self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            limit = time.perf_counter() - self.timeout
            late = [
                conn
                for conn in self._all
                if conn.index >= 0 and self._sent_at.get(conn.index, limit + 1) < limit
            ]
            for conn in late:
                conn._abort(f"no answer within {self.timeout:g} s")


def http_post_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def post_json(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One JSON POST with the standard library, off the event loop (set-up only)."""

    def call() -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    return await asyncio.to_thread(call)


# --- a lean WebSocket client -------------------------------------------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsClosed(Exception):
    pass


class WsClient(asyncio.Protocol):
    """A client WebSocket: text frames out (masked, as RFC 6455 requires), frames in.

    Incoming text frames go to `on_text(text, perf_counter_at_arrival)`; pings are
    answered; a close frame is echoed. Frames are sent with an all-zero mask key, which
    the RFC allows a non-browser client and which spares the generator the XOR (the
    server still runs its unmasking as usual).
    """

    def __init__(self, on_text: Callable[[str, float], None] | None = None) -> None:
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._key = ""
        self._fragments: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        on_text: Callable[[str, float], None] | None = None,
        within: float = 30.0,
    ) -> WsClient:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            _, proto = await loop.create_connection(lambda: cls(on_text), host, port)
            proto._key = base64.b64encode(os.urandom(16)).decode()
            assert proto.transport is not None
            proto.transport.write(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {proto._key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            await proto.upgraded
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(WsClosed(f"closed during the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_text(self, text: str) -> None:
        if self.transport is None or self.transport.is_closing():
            raise WsClosed("socket closed")
        self.transport.write(self._frame(0x1, text.encode()))

    @staticmethod
    def _frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return head + b"\x00\x00\x00\x00" + payload

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._frame(0x8, struct.pack("!H", 1000)))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            digest = hashlib.sha1(self._key.encode() + _WS_GUID).digest()
            accept = base64.b64encode(digest).decode()
            if not head.startswith("HTTP/1.1 101") or accept not in head:
                self.upgraded.set_exception(WsClosed(f"upgrade refused: {head.splitlines()[0]}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        now = time.perf_counter()
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            header = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                header = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                header = 10
            if len(buf) - pos < header + n:
                break
            payload = bytes(buf[pos + header : pos + header + n])
            pos += header + n
            self._on_frame(b0 & 0x80, b0 & 0x0F, payload, now)
        if pos:
            del buf[:pos]

    def _on_frame(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        assert self.transport is not None
        if opcode == 0x9:  # ping
            self.transport.write(self._frame(0xA, payload))
        elif opcode == 0x8:  # close
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            if not self.transport.is_closing():
                self.transport.write(self._frame(0x8, payload[:2]))
                self.transport.close()
            if not self.closed.done():
                self.closed.set_result(code)
        elif opcode in (0x1, 0x0):
            self._fragments.append(payload)
            if fin:
                text = b"".join(self._fragments).decode()
                self._fragments.clear()
                if self.on_text is not None:
                    self.on_text(text, now)


async def gather_limited(coros: Sequence[Awaitable[Any]], limit: int) -> list[Any]:
    """Await coroutines at most `limit` at a time; results (or exceptions) in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
