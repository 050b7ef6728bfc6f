"""Scale-out on Redis: inbound SMS webhooks per second with one and with two hub processes.

    python benchmarks/scale_out.py            # full profile (a few minutes)
    python benchmarks/scale_out.py --quick    # CI smoke profile (seconds)

One run, one machine, one fresh redis-server started here (appendonly no, no snapshots:
the throughput figure, not the durable one), on a free loopback port:

1. `redis-benchmark -t set,incr -n N -q`, without and with `-P 16`: what this Redis on
   this machine does on its own, the ceiling of everything above it.
2. Closed loop: `--concurrency` clients (64) each send a signed Twilio inbound-SMS
   webhook, wait for the answer, send the next, for `--seconds` after a warm-up, to ONE
   `hub serve` process, then the same clients split evenly over TWO processes (as a
   load balancer would) on the same Redis. Closed loop because the question is the most
   a configuration answers, found in one measurement per round rather than a ramp of
   open-loop rates per configuration. Every request is signed for the public URL the
   processes share (https://hub.example.com), carries a new MessageSid and one of ~500
   From numbers. Rounds alternate the order; figures are medians over rounds.

Reported: webhooks answered 200 per second, latency p50/p99 (closed loop: it includes
waiting behind the other clients), CPU per webhook of the hubs, of Redis and of this
load generator, and the machine's CPU use, so a ratio below the target can be explained
rather than guessed at. Afterwards every MessageSid answered 200 is looked up in Redis
(`RedisStore.find_event`): exit 1 if one is missing.

Redis is flushed and the hubs started fresh before every measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    HOST,
    REPO,
    HttpPool,
    Server,
    cpu_seconds,
    free_port,
    machine_note,
    ms,
    percentile,
    print_table,
)

ACCOUNT_SID = "AC7d2e9f4a1b6c3d8e5f0a7b2c9d4e1f6a"
AUTH_TOKEN = "3b8e1d6a9c4f7b2e5d0a8c3f6b1e9d4a"
PUBLIC_URL = "https://hub.example.com"
SMS_NUMBER = "+14155550100"
SMS_PATH = "/twilio/sms/sms"
SENDERS = 500
REQUEST_TIMEOUT = 10.0
TARGET_RATIO = 1.6

# --- redis ---------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server of this run's own on a free loopback port (never the shared 6379)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisProcess:
        # The same server the tests start: loopback, no persistence at all.
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if self.cli("ping").strip() == "PONG":
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} never answered PONG")

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def redis_benchmark(redis: RedisProcess, requests: int, pipeline: int) -> dict[str, float]:
    """redis-benchmark's requests per second for SET and INCR (50 clients, its default)."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(redis.port), "-t", "set,incr"]
    argv += ["-n", str(requests), "-q"]
    if pipeline > 1:
        argv += ["-P", str(pipeline)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    figures: dict[str, float] = {}
    # -q prints e.g. "SET: 98231.83 requests per second, p50=0.263 msec" (after \r updates)
    for name, rate in re.findall(r"([A-Z]+): ([\d.]+) requests per second", out):
        figures[name] = float(rate)
    if set(figures) != {"SET", "INCR"}:
        raise RuntimeError(f"cannot read redis-benchmark's output:\n{out}")
    return figures


# --- hubs ----------------------------------------------------------------------------------


def hub_yaml(data_dir: Path, redis_url: str) -> str:
    dead_port = free_port()  # nothing listens there: replies would fail, none are sent
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  log_level: warning
storage:
  backend: redis
  url: {redis_url}
  durability: none
channels:
  - name: sms
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: http://{HOST}:{dead_port}
"""


def start_hubs(config: Path, count: int) -> list[Server]:
    hubs = []
    try:
        for i in range(count):
            port = free_port()
            argv = [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)]
            server = Server(f"hub{i + 1}", [*argv, "--port", str(port)], port, ready_path="/readyz")
            hubs.append(server.start())
    except BaseException:
        for hub in hubs:
            hub.stop()
        raise
    return hubs


# --- requests ------------------------------------------------------------------------------


class Webhooks:
    """Signed inbound-SMS requests for the shared public URL, each with a new MessageSid."""

    def __init__(self) -> None:
        from twilio.request_validator import RequestValidator

        self._validator = RequestValidator(AUTH_TOKEN)
        self._signed_url = PUBLIC_URL + SMS_PATH
        self._tag = os.urandom(4).hex()
        self._next = 0

    def build(self, count: int) -> list[tuple[bytes, str]]:
        """(request bytes without the Host header line's port, sid) pairs."""
        out = []
        for _ in range(count):
            n = self._next
            self._next += 1
            sid = f"SM{self._tag}{n:024x}"
            params = {
                "ToCountry": "US",
                "SmsMessageSid": sid,
                "NumMedia": "0",
                "SmsSid": sid,
                "SmsStatus": "received",
                "Body": f"Hello, this is message {n}: where is my order?",
                "FromCountry": "US",
                "To": SMS_NUMBER,
                "NumSegments": "1",
                "MessageSid": sid,
                "AccountSid": ACCOUNT_SID,
                "From": f"+1202555{1000 + n % SENDERS:04d}",
                "ApiVersion": "2010-04-01",
            }
            body = urlencode(params).encode()
            signature = self._validator.compute_signature(self._signed_url, params)
            head = (
                f"POST {SMS_PATH} HTTP/1.1\r\nHost: hub.example.com\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {signature}\r\nUser-Agent: TwilioProxy/1.1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            out.append((head.encode() + body, sid))
        return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds of all cores since boot, from /proc/stat (every tenant's)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (total - idle) / ticks, total / ticks


# --- one measurement -----------------------------------------------------------------------


@dataclass
class Run:
    processes: int
    seconds: float = 0.0
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    ran_out: bool = False
    latencies: list[float] = field(default_factory=list)
    hub_cpu: float = 0.0  # seconds, all hub processes, measured window
    redis_cpu: float = 0.0
    generator_cpu: float = 0.0
    all_busy: float = 0.0  # the machine's busy share, every process on it
    acked: list[str] = field(default_factory=list)
    stored: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def per_webhook_us(self, cpu: float) -> float:
        return cpu / max(1, self.ok) * 1e6

    @property
    def machine_busy(self) -> float:
        """Share of the machine's cores the hubs, Redis and the generator used."""
        used = self.hub_cpu + self.redis_cpu + self.generator_cpu
        return used / (self.seconds * (os.cpu_count() or 1)) if self.seconds else 0.0


async def load(
    hubs: list[Server],
    redis_pid: int,
    requests: list[tuple[bytes, str]],
    concurrency: int,
    warmup: float,
    seconds: float,
) -> Run:
    """Closed loop: `concurrency` clients, spread evenly over the hubs, back to back."""
    run = Run(processes=len(hubs))
    pools = [HttpPool(HOST, hub.port, max_conns=concurrency) for hub in hubs]
    feed = iter(requests)
    measuring = False
    stop = False

    async def client(pool: HttpPool) -> None:
        nonlocal stop
        while not stop:
            item = next(feed, None)
            if item is None:
                run.ran_out = stop = True
                return
            data, sid = item
            sent = time.perf_counter()
            try:
                status, body = await pool.request(data, REQUEST_TIMEOUT)
            except Exception as exc:  # refused, reset, timed out: all count
                status, body = 0, f"{type(exc).__name__}: {exc}".encode()
            if status == 200:
                run.acked.append(sid)  # warm-up ones too: all must be stored
                if measuring:
                    run.ok += 1
                    run.latencies.append(time.perf_counter() - sent)
            elif measuring:
                run.errors += 1
                run.first_error = run.first_error or f"HTTP {status}: {body[:200]!r}"

    clients = [asyncio.create_task(client(pools[i % len(pools)])) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        cpu_before = [hub.cpu_seconds() for hub in hubs]
        redis_before = cpu_seconds(redis_pid)
        gen_before = time.process_time()
        machine_before = machine_cpu()
        started = time.perf_counter()
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        run.seconds = time.perf_counter() - started
        run.generator_cpu = time.process_time() - gen_before
        machine_after = machine_cpu()
        busy = machine_after[0] - machine_before[0]
        run.all_busy = busy / max(1e-9, machine_after[1] - machine_before[1])
        run.redis_cpu = cpu_seconds(redis_pid) - redis_before
        run.hub_cpu = sum(hub.cpu_seconds() - b for hub, b in zip(hubs, cpu_before, strict=True))
        stop = True
        await asyncio.gather(*clients)
    finally:
        stop = True
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for pool in pools:
            pool.close()
    return run


async def count_stored(redis_url: str, sids: list[str]) -> int:
    from hub.timeline.redis import RedisStore

    store = RedisStore(redis_url)
    await store.start()
    try:
        found = 0
        for start in range(0, len(sids), 1000):
            chunk = sids[start : start + 1000]
            events = await asyncio.gather(*(store.find_event("sms", sid) for sid in chunk))
            found += sum(1 for e in events if e is not None)
        return found
    finally:
        await store.close()


def measure(
    redis: RedisProcess,
    config: Path,
    processes: int,
    hooks: Webhooks,
    args: argparse.Namespace,
) -> Run:
    redis.cli("flushall")
    requests = hooks.build(int(args.max_rate * (args.warmup + args.seconds)))
    hubs = start_hubs(config, processes)
    try:
        run = asyncio.run(
            load(hubs, redis.pid, requests, args.concurrency, args.warmup, args.seconds)
        )
    finally:
        codes = [hub.stop() for hub in hubs]
    for hub, code in zip(hubs, codes, strict=True):
        if code not in (0, None, -15):
            print(f"  {hub.name} exited with {code}:\n{hub.output()}")
    run.stored = asyncio.run(count_stored(redis.url, run.acked))
    extra = f"  first error: {run.first_error}" if run.first_error else ""
    if run.ran_out:
        extra += "  RAN OUT of prepared requests: raise --max-rate"
    print(
        f"  {processes} hub process{'es' if processes > 1 else ''}: {run.rate:8,.0f}/s  "
        f"p50 {ms(percentile(run.latencies, 50)):>6} ms  "
        f"p99 {ms(percentile(run.latencies, 99)):>6} ms  errors {run.errors}  "
        f"CPU us/webhook: hubs {run.per_webhook_us(run.hub_cpu):.0f}, "
        f"redis {run.per_webhook_us(run.redis_cpu):.0f}, "
        f"generator {run.per_webhook_us(run.generator_cpu):.0f}  "
        f"cores busy: ours {run.machine_busy:.0%}, all {run.all_busy:.0%}  "
        f"stored {run.stored}/{len(run.acked)}{extra}",
        flush=True,
    )
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke profile (seconds)")
    parser.add_argument("--rounds", type=int, help="measurements per configuration (3; quick 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds each (10; quick 2)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (2; quick 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients in all (64)")
    parser.add_argument(
        "--max-rate",
        type=float,
        default=5000,
        help="requests prepared per second of a run (5000): more than any run answers",
    )
    parser.add_argument(
        "--redis-requests", type=int, help="redis-benchmark -n (100000; quick 20000)"
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    redis_requests = args.redis_requests or (20_000 if args.quick else 100_000)
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark is not installed (it comes with redis-server)", file=sys.stderr)
        return 2

    print(f"machine: {machine_note()}")
    print(
        f"profile: {'quick' if args.quick else 'full'}, {rounds} round(s), "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s measured, "
        f"{args.concurrency} clients (closed loop)"
    )
    results: dict[int, list[Run]] = {1: [], 2: []}
    bench: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hub-scale-out-") as tmp:
        directory = Path(tmp)
        redis = RedisProcess(directory).start()
        try:
            version = redis.cli("info", "server")
            found = re.search(r"redis_version:(\S+)", version)
            print(f"redis-server {found.group(1) if found else '?'} on {HOST}:{redis.port}")
            for pipeline in (1, 16):
                figures = redis_benchmark(redis, redis_requests, pipeline)
                flag = "" if pipeline == 1 else f" -P {pipeline}"
                for name, rate in figures.items():
                    bench.append((f"`-t set,incr -n {redis_requests:,} -q{flag}`: {name}", rate))
                print(f"  redis-benchmark -P {pipeline}: {figures}", flush=True)
            config = directory / "hub.yaml"
            config.write_text(hub_yaml(directory / "data", redis.url))
            hooks = Webhooks()
            for i in range(rounds):
                print(f"round {i + 1}/{rounds}", flush=True)
                order = (1, 2) if i % 2 == 0 else (2, 1)
                for processes in order:
                    results[processes].append(measure(redis, config, processes, hooks, args))
        finally:
            redis.stop()

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    print()
    print_table(
        ["redis-benchmark (50 clients, same Redis, same machine)", "requests/s"],
        [[label, f"{rate:,.0f}"] for label, rate in bench],
    )
    print()
    rows = []
    for processes in (1, 2):
        runs = results[processes]
        rows.append(
            [
                f"{processes} hub process{'es' if processes > 1 else ''}",
                f"{median([r.rate for r in runs]):,.0f}",
                " / ".join(f"{r.rate:,.0f}" for r in runs),
                ms(median([percentile(r.latencies, 50) for r in runs])),
                ms(median([percentile(r.latencies, 99) for r in runs])),
                f"{median([r.per_webhook_us(r.hub_cpu) for r in runs]):.0f}",
                f"{median([r.per_webhook_us(r.redis_cpu) for r in runs]):.0f}",
                f"{median([r.per_webhook_us(r.generator_cpu) for r in runs]):.0f}",
                f"{median([r.machine_busy for r in runs]):.0%}",
                f"{median([r.all_busy for r in runs]):.0%}",
            ]
        )
    one = median([r.rate for r in results[1]])
    two = median([r.rate for r in results[2]])
    ratio = two / one if one else float("nan")
    print_table(
        [
            "signed SMS webhooks, closed loop",
            "answered 200/s (median)",
            "rounds",
            "p50 ms",
            "p99 ms",
            "hubs CPU us/webhook",
            "Redis CPU us/webhook",
            "generator CPU us/webhook",
            "cores busy: ours",
            "cores busy: all tenants",
        ],
        rows,
    )
    verdict = "met" if ratio >= TARGET_RATIO else "missed"
    print(f"\n**ratio two / one: {ratio:.2f}** (target >= {TARGET_RATIO}: {verdict})")
    cpu_one = median([r.per_webhook_us(r.hub_cpu) for r in results[1]])
    cpu_two = median([r.per_webhook_us(r.hub_cpu) for r in results[2]])
    print(
        f"projection, not a measurement: with a core per hub process (and Redis and the "
        f"load elsewhere) two would answer 2 x {cpu_one:.0f} / {cpu_two:.0f} = "
        f"{2 * cpu_one / cpu_two:.2f} x one (hub CPU per webhook, one / two: what the "
        f"second process adds per webhook, e.g. reading the other's bus items)"
    )
    cores = os.cpu_count() or 1
    print(
        f"{cores} cores shared by Redis, the hubs and this generator ('ours': their CPU time "
        "over the measured seconds x cores) and by whatever else runs on the machine "
        "('all tenants', from /proc/stat)."
    )
    acked = sum(len(r.acked) for runs in results.values() for r in runs)
    stored = sum(r.stored for runs in results.values() for r in runs)
    errors = sum(r.errors for runs in results.values() for r in runs)
    print(f"acknowledged {acked}, stored {stored}, errors {errors}")
    if stored != acked:
        print("FAIL: the hub acknowledged messages it did not store", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
