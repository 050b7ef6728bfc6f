"""CI smoke run of the whole benchmark suite: `python benchmarks/run_all.py --quick`.

It asserts what the smoke profile is for: every benchmark ran to the end, printed its
figure beside a same-run baseline, and lost no message. The figures themselves are not
asserted (a shared CI machine makes timings noise; no timed unit tests): a benchmark
that misses its own performance target is reported, not failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every benchmark the suite must contain; scripts added later are found by run_all.
REQUIRED = {"ingest.py", "routing.py", "reports.py", "sms_webhooks.py", "webchat.py"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmark_suite_completes_beside_baselines_and_loses_nothing(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--json", str(results)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=840,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert results.exists(), f"run_all did not finish:\n{tail}"
    data = json.loads(results.read_text())
    benchmarks = {b["script"]: b for b in data["benchmarks"]}
    assert REQUIRED <= set(benchmarks), f"missing from the suite: {REQUIRED - set(benchmarks)}"

    for script, b in benchmarks.items():
        if script not in REQUIRED and b["skipped"]:
            continue  # a new script without a smoke profile: run_all says so
        assert not b["skipped"], f"{script} skipped: {b['skipped']}"
        assert b["crashed"] is None, f"{script} crashed: {b['crashed']}\n{tail}"
        assert not b["lost"], f"{script} lost messages: {b['lost']}"
        assert b["baseline"], f"{script} printed no baseline beside its figure:\n{b['table']}"
        assert len(b["table"]) >= 3, f"{script} printed no table: {b['table']}"
        # Its table made it into the one report printed at the end.
        assert f"## {script}: " in proc.stdout
        assert b["table"][0] in proc.stdout

    assert data["ok"] and proc.returncode == 0, tail
    assert proc.stdout.rstrip().splitlines()[-1].startswith("run_all: OK"), tail
