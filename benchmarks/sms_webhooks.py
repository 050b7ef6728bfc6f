"""Signed Twilio SMS webhooks over HTTP at increasing rates: the hub beside a bare aiohttp app.

    python benchmarks/sms_webhooks.py            # full profile (a few minutes)
    python benchmarks/sms_webhooks.py --quick    # CI smoke profile (seconds)

Open loop: each step sends webhooks on a fixed schedule (`rate` per second for
`--seconds`), whatever the server's answers; latency runs from each request's scheduled
send time to its answer. A step is sustained when p99 < 100 ms and no request failed
(non-200, connection error, or no answer within 10 s). Each server climbs the ladder of
rates until a step is not sustained twice in a row (`--retries 1`: on a shared machine
one stall of another tenant's process can push a single step's p99 over the line).

- hub: `hub serve` in a subprocess, SQLite in a temp dir, log level warning, one sms
  channel whose Twilio REST client points at a dead loopback port (nothing is sent).
  Every request carries a valid X-Twilio-Signature for the hub's public URL, a distinct
  MessageSid, and one of ~500 From numbers.
- baseline: a bare aiohttp app in a subprocess whose handler parses the same form
  (`await request.post()`) and answers the same empty TwiML. Both run on the standard
  asyncio event loop, with the garbage-collector settings `hub serve` uses
  (hub/process.py).
- generator: this process, one lean open-loop sender (keep-alive connections, requests
  built and signed before the step starts, no task per request): it shares the two cores
  with the server it measures, so its own CPU per request is printed beside the
  server's. The server's CPU counts its child processes too (the hub's SQLite writer).

Each round starts both servers fresh and runs both ramps (the order alternates); the
sustained rate is the median over rounds, the ratio is hub / baseline (target >= 0.5).
Afterwards the hub's SQLite file is opened and every MessageSid the hub answered 200 is
looked up: the script exits 1 if one is missing (a lost message).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    HOST,
    OpenLoopSender,
    Server,
    free_port,
    hub_server,
    machine_note,
    ms,
    percentile,
    print_table,
    script_server,
)

ACCOUNT_SID = "ACbe0c4a1d9f2e7b3c8a5d6e1f0b9c2a7d"
AUTH_TOKEN = "9d1c7e3a5b2f8e4c6a0d9b1e7f3c5a28"
SMS_NUMBER = "+14155550100"
SENDERS = 500
SUSTAINED_P99 = 0.100
REQUEST_TIMEOUT = 10.0
# Steps about 12 % apart where the two servers top out, and high enough that the bare
# handler's ceiling is found, not the ladder's.
FULL_RATES = (
    400, 800, 1600, 2500, 3200, 4000, 4500, 5000, 5600, 6300, 7100, 8000, 9000, 10000,
    11200, 12500, 14000, 16000, 18000, 20000,
)  # fmt: skip
QUICK_RATES = (100, 200, 400)

# --- the baseline server -----------------------------------------------------------------


def serve_baseline(port: int) -> None:
    """A bare aiohttp app: parse the webhook form, answer the empty TwiML the hub answers."""
    from aiohttp import web
    from twilio.twiml.messaging_response import MessagingResponse

    twiml = str(MessagingResponse())

    async def sms(request: web.Request) -> web.Response:
        form = await request.post()
        if "MessageSid" not in form:
            raise web.HTTPBadRequest(text="no MessageSid")
        return web.Response(text=twiml, content_type="text/xml")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def settle(app: web.Application) -> None:
        # The collector settings `hub serve` runs with, so they are not what differs.
        from hub.process import quiet_collector

        quiet_collector()

    app = web.Application()
    app.router.add_post("/twilio/sms/sms", sms)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(settle)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


# --- the hub -----------------------------------------------------------------------------


def hub_yaml(data_dir: Path, port: int) -> str:
    dead_port = free_port()  # nothing listens there: replies would fail, none are sent
    return f"""
hub:
  public_url: http://{HOST}:{port}
  data_dir: {data_dir}
  log_level: warning
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: sms
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: http://{HOST}:{dead_port}
"""


# --- requests ----------------------------------------------------------------------------


class Webhooks:
    """Signed inbound-SMS requests, each with a MessageSid never used before."""

    PATH = "/twilio/sms/sms"

    def __init__(self, port: int) -> None:
        from twilio.request_validator import RequestValidator

        self.port = port
        self.url = f"http://{HOST}:{port}{self.PATH}"
        self._validator = RequestValidator(AUTH_TOKEN)
        self._tag = os.urandom(4).hex()
        self._next = 0

    def build(self, count: int) -> tuple[list[bytes], list[str]]:
        requests, sids = [], []
        for _ in range(count):
            n = self._next
            self._next += 1
            sid = f"SM{self._tag}{n:024x}"
            sender = f"+1202555{1000 + n % SENDERS:04d}"
            params = {
                "ToCountry": "US",
                "ToState": "CA",
                "SmsMessageSid": sid,
                "NumMedia": "0",
                "ToCity": "SAN FRANCISCO",
                "FromZip": "20001",
                "SmsSid": sid,
                "FromState": "DC",
                "SmsStatus": "received",
                "FromCity": "WASHINGTON",
                "Body": f"Hello, this is message {n}: where is my order?",
                "FromCountry": "US",
                "To": SMS_NUMBER,
                "ToZip": "94103",
                "NumSegments": "1",
                "MessageSid": sid,
                "AccountSid": ACCOUNT_SID,
                "From": sender,
                "ApiVersion": "2010-04-01",
            }
            body = urlencode(params).encode()
            signature = self._validator.compute_signature(self.url, params)
            head = (
                f"POST {self.PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {signature}\r\nUser-Agent: TwilioProxy/1.1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            requests.append(head.encode() + body)
            sids.append(sid)
        return requests, sids


@dataclass
class Step:
    rate: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    send_lag: float = 0.0  # how late the generator fired its last request
    first_error: str = ""
    attempt: int = 1
    cpu_seconds: float = 0.0  # the server's CPU time during the step
    generator_cpu_seconds: float = 0.0  # this process's, sending and reading answers

    @property
    def cpu_us(self) -> float:
        """Server CPU time per answered request, in microseconds."""
        return self.cpu_seconds / max(1, self.ok) * 1e6

    @property
    def generator_us(self) -> float:
        return self.generator_cpu_seconds / max(1, self.sent) * 1e6

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def sustained(self) -> bool:
        return self.errors == 0 and self.ok == self.sent and self.p99 < SUSTAINED_P99


async def run_step(
    sender: OpenLoopSender, hooks: Webhooks, rate: int, seconds: float, acked: list[str]
) -> Step:
    count = max(1, round(rate * seconds))
    requests, sids = hooks.build(count)
    step = Step(rate=rate, sent=count)
    cpu_before = _own_cpu()
    outcome = await sender.run(requests, rate)
    step.generator_cpu_seconds = _own_cpu() - cpu_before
    step.latencies = outcome.latencies
    step.ok = len(outcome.latencies)
    step.errors = outcome.errors
    step.first_error = outcome.first_error
    step.send_lag = outcome.send_lag
    acked.extend(sid for sid, status in zip(sids, outcome.statuses, strict=True) if status == 200)
    return step


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def ramp(
    server: Server,
    rates: tuple[int, ...],
    seconds: float,
    acked: list[str],
    label: str,
    retries: int,
) -> list[Step]:
    """Climb the ladder until a step misses `retries + 1` times in a row."""
    sender = OpenLoopSender(HOST, server.port, max_conns=512, timeout=REQUEST_TIMEOUT)
    hooks = Webhooks(server.port)
    steps: list[Step] = []
    try:
        # Warm-up (not counted): connections opened, code paths and caches hot.
        await sender.open(64)
        await run_step(sender, hooks, 100, 1.0, acked)
        for rate in rates:
            for attempt in range(1, retries + 2):
                cpu_before = server.cpu_seconds()
                step = await run_step(sender, hooks, rate, seconds, acked)
                step.cpu_seconds = server.cpu_seconds() - cpu_before
                step.attempt = attempt
                verdict = "sustained" if step.sustained else "NOT sustained"
                extra = f" first error: {step.first_error}" if step.first_error else ""
                print(
                    f"  {label:<8} {rate:>6}/s  p50 {ms(step.p50):>7} ms  "
                    f"p99 {ms(step.p99):>7} ms  errors {step.errors:<5} "
                    f"late by {step.send_lag * 1000:.0f} ms  "
                    f"server CPU {step.cpu_us:.0f} us/request  "
                    f"generator {step.generator_us:.0f} us  {verdict}{extra}",
                    flush=True,
                )
                await asyncio.sleep(1.0)  # let the server drain before the next step
                if step.sustained:
                    break
            steps.append(step)
            if not step.sustained:
                break
    finally:
        sender.close()
    return steps


def sustained_rate(steps: list[Step]) -> int:
    best = 0
    for step in steps:
        if not step.sustained:
            break
        best = step.rate
    return best


async def check_stored(db: Path, sids: list[str]) -> int:
    from hub.timeline.sqlite import SqliteStore

    store = SqliteStore(db)
    await store.start()
    try:
        found = 0
        for start in range(0, len(sids), 500):
            chunk = sids[start : start + 500]
            events = await asyncio.gather(*(store.find_event("sms", sid) for sid in chunk))
            found += sum(1 for e in events if e is not None)
        return found
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke profile (seconds)")
    parser.add_argument("--rounds", type=int, help="ramps per server (3; quick: 1)")
    parser.add_argument("--seconds", type=float, help="length of each step (5; quick: 1)")
    parser.add_argument("--rates", help="comma-separated ladder of rates per second")
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="times a missed step is run again before it counts as not sustained (1): "
        "a shared machine's stalls should not end a ramp",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    retries = max(0, args.retries)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    rates = (
        tuple(int(r) for r in args.rates.split(","))
        if args.rates
        else (QUICK_RATES if args.quick else FULL_RATES)
    )
    print(f"machine: {machine_note()}")
    print(f"profile: {'quick' if args.quick else 'full'}, {rounds} round(s), {seconds:g} s a step")

    results: dict[str, list[list[Step]]] = {"baseline": [], "hub": []}
    acked_total = stored_total = 0
    for round_no in range(rounds):
        with tempfile.TemporaryDirectory(prefix="hub-bench-sms-") as tmp:
            data_dir = Path(tmp)
            order = ("baseline", "hub") if round_no % 2 == 0 else ("hub", "baseline")
            print(f"round {round_no + 1}/{rounds}", flush=True)
            for name in order:
                port = free_port()
                acked: list[str] = []
                if name == "hub":
                    config = data_dir / "hub.yaml"
                    config.write_text(hub_yaml(data_dir, port))
                    server = hub_server(config, port)
                else:
                    server = script_server(Path(__file__), ["--serve-baseline", str(port)], port)
                with server:
                    steps = asyncio.run(ramp(server, rates, seconds, acked, name, retries))
                    code = server.stop()
                    if code not in (0, None, -15):
                        print(f"  {name} exited with {code}:\n{server.output()}")
                results[name].append(steps)
                if name == "hub":
                    stored = asyncio.run(check_stored(data_dir / "hub.db", acked))
                    acked_total += len(acked)
                    stored_total += stored
                    print(f"  hub: acknowledged {len(acked)}, stored {stored}", flush=True)

    print()
    rows = []
    for rate in rates:
        row: list[str] = [f"{rate:,}"]
        for name in ("baseline", "hub"):
            steps = [s for run in results[name] for s in run if s.rate == rate]
            if not steps:
                row += ["-", "-", "-"]
                continue
            passed = sum(1 for s in steps if s.sustained)
            retried = sum(1 for s in steps if s.attempt > 1)
            row += [
                ms(statistics.median(s.p50 for s in steps)),
                ms(statistics.median(s.p99 for s in steps)),
                f"{passed}/{len(steps)}" + (f", {retried} on a re-run" if retried else ""),
            ]
        rows.append(row)
        if all(row[i] == "-" for i in (1, 4)):
            break
    print_table(
        [
            "rate/s",
            "baseline p50 ms",
            "baseline p99 ms",
            "baseline sustained",
            "hub p50 ms",
            "hub p99 ms",
            "hub sustained",
        ],
        rows,
    )
    base = statistics.median(sustained_rate(r) for r in results["baseline"])
    hub = statistics.median(sustained_rate(r) for r in results["hub"])
    ratio = hub / base if base else float("nan")

    def cpu_us(name: str) -> float:
        steps = [s for run in results[name] for s in run]
        return sum(s.cpu_seconds for s in steps) / max(1, sum(s.ok for s in steps)) * 1e6

    base_cpu, hub_cpu = cpu_us("baseline"), cpu_us("hub")
    print()
    print_table(
        ["what", "sustained rate/s, median of rounds", "server CPU us / webhook"],
        [
            [
                "bare aiohttp handler, same form, same TwiML (baseline)",
                f"{base:,.0f}",
                f"{base_cpu:.0f}",
            ],
            ["hub: verify, de-duplicate, store (SQLite), answer", f"{hub:,.0f}", f"{hub_cpu:.0f}"],
            [
                "**ratio hub / baseline** (target >= 0.5)",
                f"**{ratio:.2f}**",
                f"{base_cpu / hub_cpu:.2f} (baseline / hub)" if hub_cpu else "-",
            ],
        ],
    )
    print("sustained: p99 < 100 ms and no errors; CPU: utime + stime over all steps / answered")
    print(f"\nacknowledged {acked_total}, stored {stored_total}")
    if stored_total != acked_total:
        print("FAIL: the hub acknowledged messages it did not store", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
