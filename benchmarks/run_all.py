"""Every benchmark, one after another, in one command, and one report at the end.

    python benchmarks/run_all.py --quick           # CI smoke profile: about 2-3 minutes
    python benchmarks/run_all.py                   # full profile, by hand (~30 minutes)
    python benchmarks/run_all.py --write           # full profile, then rewrite RESULTS.md
    python benchmarks/run_all.py --only sms_webhooks,webchat [--quick]
    python benchmarks/run_all.py --list            # what would run, with which arguments

Each script runs in its own process (which starts its own servers), its output shown
as it comes. From each, the report keeps its printed table(s): everything from its first
Markdown table row to its end (the whole output when it prints no Markdown table). The
report then lists, per benchmark, its time, exit status, whether it printed a baseline,
and its verdict. `--json FILE` also writes the results as JSON (the CI smoke test reads
it).

Exit status 0 when every benchmark completed, printed its figures beside a baseline (a
line naming the baseline, or the ratio to it) and lost nothing; 1 when one crashed (a
traceback, a signal, a timeout, or an exit status other than 0 and 1), reported a lost
message (a line starting with FAIL, or "acknowledged N, stored M" with M != N), or
printed no baseline. A benchmark that exits 1 without a FAIL line missed its own
performance target (reports.py: a report slower than 1 s): that is a figure, shown as
"target missed", and does not fail the run. The quick profile's figures are a smoke
test, not worth quoting; `--write` refuses them.

`--write` rewrites benchmarks/RESULTS.md: the machine line at the top (CPU model from
/proc/cpuinfo, cores, RAM, Python and SQLite versions; only when every benchmark ran),
and per benchmark the block between `<!-- run_all:SCRIPT begin/end -->` markers. Text
outside the markers (hand-written notes) is kept. A section written by hand before these
markers existed (found by its `benchmarks/SCRIPT` command) gets the block under its
heading, and its old text is kept below it as notes from an earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"


@dataclass(frozen=True)
class Benchmark:
    script: str
    title: str
    quick: tuple[str, ...] | None  # None: no smoke profile, skipped by --quick
    full: tuple[str, ...] = ()  # the script's defaults are its full profile

    @property
    def name(self) -> str:
        return self.script.removesuffix(".py")


# In the order they run: cheap ones first, so a broken tree fails fast.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "ingest.py",
        "Ingest on SQLite",
        quick=("--messages", "500", "--rounds", "1"),
    ),
    Benchmark(
        "routing.py",
        "Routing decisions at call-centre scale",
        quick=tuple("--agents 1000 --waiting 10000 --decisions 2000 --store-ops 200".split()),
    ),
    Benchmark(
        "reports.py",
        "Reports over a 1,000,000-event timeline",
        quick=("--events", "20000", "--rounds", "1", "--catch-up", "1000"),
    ),
    Benchmark("sms_webhooks.py", "SMS webhooks over HTTP", quick=("--quick",)),
    Benchmark(
        "webchat.py",
        "Web chat: connections held and customer -> agent latency",
        quick=("--quick",),
    ),
    Benchmark("scale_out.py", "Scale-out on Redis: one and two hub processes", quick=("--quick",)),
    # Its own --quick imports 500 mails through the peer (django-helpdesk, ~7 mails/s
    # here, after ~25 s making its virtualenv): 150 keep the whole suite near 2 minutes.
    Benchmark(
        "email_import.py",
        "Email import from a Dovecot mailbox",
        quick=("--quick", "--mails", "150"),
    ),
)
NOT_BENCHMARKS = frozenset({"common.py", "run_all.py", "__init__.py"})

QUICK_TIMEOUT = 240.0
FULL_TIMEOUT = 3 * 3600.0

_FAIL = re.compile(r"^\s*FAIL\b")
_ACKED = re.compile(r"acknowledged (\d+(?:,\d{3})*), stored (\d+(?:,\d{3})*)")
_TRACEBACK = "Traceback (most recent call last)"
MAX_TABLE_LINES = 120


def discover() -> list[Benchmark]:
    """The known benchmarks, then any other script in benchmarks/ (so a new one is
    never silently left out): run with --quick if it mentions that flag, else skipped
    by the quick profile."""
    known = {b.script for b in BENCHMARKS}
    found = [b for b in BENCHMARKS if (HERE / b.script).exists()]
    for path in sorted(HERE.glob("*.py")):
        if path.name in known or path.name in NOT_BENCHMARKS:
            continue
        source = path.read_text(errors="replace")
        match = re.search(r'"""(.+)', source)
        title = match.group(1).strip() if match else path.stem
        quick = ("--quick",) if "--quick" in source else None
        found.append(Benchmark(path.name, title, quick=quick))
    return found


# --- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def redis_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\S+)", out.stdout)
    return match.group(1) if match else None


def machine_line() -> str:
    ram = ram_gib()
    redis = redis_version()
    parts = [
        cpu_model(),
        f"{os.cpu_count()} cores",
        f"{ram:.1f} GiB RAM" if ram is not None else "RAM unknown",
        f"Python {platform.python_version()}",
        f"SQLite {sqlite3.sqlite_version}",
        *([f"Redis {redis}"] if redis else []),
        f"{platform.system()} {platform.release()}",
    ]
    return "Machine: " + ", ".join(parts) + "."


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# --- one run ------------------------------------------------------------------------------


@dataclass
class Result:
    script: str
    title: str
    args: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    skipped: str | None = None
    output: list[str] = field(default_factory=list)
    table: list[str] = field(default_factory=list)
    crashed: str | None = None
    lost: list[str] = field(default_factory=list)
    baseline: bool = False
    target_missed: bool = False

    @property
    def command(self) -> str:
        return " ".join(["python", f"benchmarks/{self.script}", *self.args])

    @property
    def failed(self) -> bool:
        return self.skipped is None and (
            self.crashed is not None or bool(self.lost) or not self.baseline
        )

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return f"skipped ({self.skipped})"
        if self.crashed is not None:
            return f"CRASHED ({self.crashed})"
        if self.lost:
            return "LOST MESSAGES"
        if not self.baseline:
            return "NO BASELINE PRINTED"
        return "target missed" if self.target_missed else "ok"


def table_of(lines: Sequence[str]) -> list[str]:
    """What the script printed as its result: from its first Markdown table row to its
    end; all of it if it prints no Markdown table. Trailing blank lines dropped."""
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), 0)
    body = list(lines[start:])
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    if len(body) > MAX_TABLE_LINES:
        body = [*body[: MAX_TABLE_LINES - 1], f"... ({len(body) - MAX_TABLE_LINES + 1} more lines)"]
    return body


def judge(result: Result) -> None:
    """Fill in table, crash, loss, baseline and target verdicts from the output."""
    out = result.output
    result.table = table_of(out)
    text = "\n".join(out)
    code = result.returncode
    if result.timed_out:
        result.crashed = f"timed out after {result.seconds:.0f} s"
    elif code is not None and code < 0:
        result.crashed = f"killed by signal {-code}"
    elif _TRACEBACK in text:
        result.crashed = f"traceback, exit {code}"
    elif code not in (0, 1):
        result.crashed = f"exit {code}"
    result.lost = [line.strip() for line in out if _FAIL.match(line)]
    for acked, stored in _ACKED.findall(text):
        if acked != stored:
            result.lost.append(f"acknowledged {acked}, stored {stored}")
    # Beside its baseline: a row or a line naming the baseline, or the ratio to it.
    result.baseline = any(
        "baseline" in line.lower() or "ratio" in line.lower() for line in result.table
    )
    result.target_missed = code == 1 and result.crashed is None and not result.lost


def run_one(bench: Benchmark, args: Sequence[str], timeout: float) -> Result:
    result = Result(bench.script, bench.title, list(args))
    argv = [sys.executable, str(HERE / bench.script), *args]
    print(f"\n=== {result.command}", flush=True)
    started = time.monotonic()
    # Its own process group: a timeout ends the script and the servers it started.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def expire() -> None:
        # SIGINT first: the script's finally blocks stop the servers it started (some,
        # like Dovecot, run in a session of their own); SIGKILL if it does not end.
        result.timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            result.output.append(line)
            print(f"  {line}", flush=True)
        result.returncode = proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        timer.cancel()
    result.seconds = time.monotonic() - started
    judge(result)
    print(f"=== {bench.script}: {result.seconds:.1f} s, exit {result.returncode}, "
          f"{result.verdict}", flush=True)  # fmt: skip
    return result


# --- the report ---------------------------------------------------------------------------


def markdown_safe(lines: Sequence[str]) -> list[str]:
    """Output as Markdown: a blank line after every table (else the next line would join
    it as a row), and output without any Markdown table kept verbatim in a text block."""
    if not any(line.startswith("|") for line in lines):
        return ["```text", *lines, "```"]
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("|") and following.strip() and not following.startswith("|"):
            out.append("")
    return out


def summary_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append(
            [
                r.script,
                " ".join(r.args) or "(defaults)",
                f"{r.seconds:.0f}" if r.skipped is None else "-",
                str(r.returncode) if r.returncode is not None else "-",
                "yes" if r.baseline else ("-" if r.skipped else "NO"),
                str(len(r.lost)) if r.skipped is None else "-",
                r.verdict,
            ]
        )
    return rows


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in cells[1:]
    ]


def report(
    results: Sequence[Result], profile: str, machine: str, loads: tuple[str, str]
) -> list[str]:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Benchmarks: {profile} profile, {when}",
        "",
        machine,
        f"Load average (1, 5, 15 min) at the start: {loads[0]}; at the end: {loads[1]}.",
    ]
    for r in results:
        lines += ["", f"## {r.script}: {r.title}", ""]
        if r.skipped is not None:
            lines.append(f"skipped: {r.skipped}")
            continue
        lines.append(f"`{r.command}`: {r.seconds:.1f} s, exit {r.returncode}, {r.verdict}")
        lines.append("")
        lines += markdown_safe(r.table) if r.table else ["(no output)"]
        for loss in r.lost:
            lines.append(f"LOST: {loss}")
    lines += ["", "## Summary", ""]
    lines += md_table(
        ["benchmark", "arguments", "seconds", "exit", "baseline", "lost", "verdict"],
        summary_rows(results),
    )
    return lines


def verdict_line(results: Sequence[Result]) -> str:
    ran = [r for r in results if r.skipped is None]
    crashed = [r.script for r in ran if r.crashed is not None]
    lost = [r.script for r in ran if r.lost]
    unbased = [r.script for r in ran if not r.baseline and r.crashed is None]
    missed = [r.script for r in ran if r.target_missed]
    skipped = [r.script for r in results if r.skipped is not None]
    parts = [f"{len(ran)} benchmark{'' if len(ran) == 1 else 's'} ran"]
    if skipped:
        parts.append(f"skipped: {', '.join(skipped)}")
    if crashed:
        parts.append(f"CRASHED: {', '.join(crashed)}")
    if lost:
        parts.append(f"LOST MESSAGES: {', '.join(lost)}")
    if unbased:
        parts.append(f"NO BASELINE: {', '.join(unbased)}")
    if missed:
        parts.append(f"target missed (a figure, not a failure): {', '.join(missed)}")
    failed = bool(crashed or lost or unbased)
    if not failed:
        parts.append("all completed, each beside its baseline, nothing lost")
    return f"run_all: {'FAILED' if failed else 'OK'}: " + "; ".join(parts)


# --- RESULTS.md ---------------------------------------------------------------------------


def _markers(script: str) -> tuple[str, str]:
    return f"<!-- run_all:{script} begin -->", f"<!-- run_all:{script} end -->"


def results_block(r: Result, machine: str, when: str, load: str) -> str:
    begin, end = _markers(r.script)
    lines = [
        begin,
        f"`{r.command}` (full profile), run by `python benchmarks/run_all.py --write` on "
        f"{when}: {r.seconds:.0f} s, {r.verdict}.",
        f"{machine} Load average at the start of the run: {load}.",
        "",
        *markdown_safe(r.table),
        "",
        end,
    ]
    return "\n".join(lines)


def set_machine_line(text: str, machine: str) -> str:
    head, sep, rest = text.partition("\n## ")
    lines = head.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("Machine:"):
            lines[i] = machine
            break
    else:
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        lines[at:at] = ["", machine]
    return "\n".join(lines) + sep + rest


def put_block(text: str, r: Result, block: str) -> str:
    begin, end = _markers(r.script)
    if begin in text and end in text:
        before, _, tail = text.partition(begin)
        _, _, after = tail.partition(end)
        return before + block + after
    lines = text.split("\n")
    headings = [i for i, line in enumerate(lines) if line.startswith("## ")] + [len(lines)]
    for start, stop in itertools.pairwise(headings):
        body = "\n".join(lines[start + 1 : stop])
        if f"benchmarks/{r.script}" in body:
            old = body.strip("\n")
            section = [lines[start], "", block, ""]
            if old:
                section += [
                    "Notes from an earlier run, written by hand (its figures predate the "
                    "block above):",
                    "",
                    old,
                    "",
                ]
            return "\n".join([*lines[:start], *section, *lines[stop:]])
    heading = f"## {r.title} (`benchmarks/{r.script}`)"
    return text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"


def write_results(
    path: Path, results: Sequence[Result], machine: str, load: str, *, complete: bool
) -> list[str]:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    written = []
    if complete:
        text = set_machine_line(text, machine)
    for r in results:
        if r.skipped is not None or r.crashed is not None or not r.table:
            continue
        text = put_block(text, r, results_block(r, machine, when, load))
        written.append(r.script)
    path.write_text(text.rstrip("\n") + "\n")
    return written


# --- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's CI smoke profile")
    parser.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md")
    parser.add_argument("--only", help="comma-separated scripts (e.g. ingest,webchat)")
    parser.add_argument("--list", action="store_true", help="show what would run, and exit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark before it is ended")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("--write records the full profile; the quick figures are not worth it")

    benches = discover()
    if args.only:
        wanted = {name.strip().removesuffix(".py") for name in args.only.split(",") if name}
        unknown = wanted - {b.name for b in benches}
        if unknown:
            parser.error(f"--only: no such benchmark: {', '.join(sorted(unknown))}")
        benches = [b for b in benches if b.name in wanted]
    profile = "quick" if args.quick else "full"
    timeout = args.timeout or (QUICK_TIMEOUT if args.quick else FULL_TIMEOUT)
    if args.list:
        for b in benches:
            run_args = b.quick if args.quick else b.full
            shown = "skipped (no quick profile)" if run_args is None else " ".join(run_args)
            print(f"{b.script:<18} {shown or '(defaults)'}")
        return 0

    machine = machine_line()
    load_start = load_average()
    print(f"run_all: {profile} profile, {len(benches)} benchmarks; {machine}", flush=True)
    results: list[Result] = []
    started = time.monotonic()
    for bench in benches:
        run_args = bench.quick if args.quick else bench.full
        if run_args is None:
            results.append(
                Result(bench.script, bench.title, [], skipped="no quick profile: add it to "
                       "benchmarks/run_all.py BENCHMARKS")
            )  # fmt: skip
            continue
        results.append(run_one(bench, run_args, timeout))
    elapsed = time.monotonic() - started

    print("\n" + "\n".join(report(results, profile, machine, (load_start, load_average()))))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "profile": profile,
                    "machine": machine,
                    "seconds": round(elapsed, 1),
                    "ok": not any(r.failed for r in results),
                    "benchmarks": [
                        {
                            **{k: v for k, v in asdict(r).items() if k != "output"},
                            "verdict": r.verdict,
                            "failed": r.failed,
                        }
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    if args.write:
        complete = not args.only
        written = write_results(args.results, results, machine, load_start, complete=complete)
        print(f"\nrun_all: rewrote {args.results}: {', '.join(written) or 'nothing'}")
    print(f"\n{verdict_line(results)} (in {elapsed:.0f} s)")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
