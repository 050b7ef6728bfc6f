"""The commands a user types: `hub serve`, `hub check-config`, `hub hash-password`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from hub.passwords import verify_password
from tests.servers.common import free_port

ROOT = Path(__file__).resolve().parents[1]


def hub_command() -> str:
    path = shutil.which("hub")
    assert path, "the `hub` console script is not installed (pip install -e .)"
    return path


def run(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hub_command(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_check_config_accepts_the_documented_example() -> None:
    result = run("check-config", str(ROOT / "config/hub.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_config_exits_2_and_names_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hub:\n"
        "  listn: {port: 8080}\n"
        "storage:\n"
        "  backend: mongo\n"
    )
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: hub.listn: unknown key" in result.stderr
    assert f"{bad}:4: storage.backend: must be one of" in result.stderr


def test_check_config_on_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_start_with_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  - id: x\n    capacity: {chat: -1}\n")
    result = run("serve", "--config", str(bad), "--port", str(free_port()))
    assert result.returncode == 2
    assert "agents[0]" in result.stderr
    assert "not starting" in result.stderr


def test_hash_password_makes_a_verifiable_argon2_hash() -> None:
    result = run("hash-password", stdin="correct horse battery\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "correct horse battery")
    assert not verify_password(hashed, "wrong")


def test_hash_password_refuses_a_short_password() -> None:
    result = run("hash-password", stdin="short\n")
    assert result.returncode == 1
    assert "at least 8" in result.stderr


@pytest.mark.slow
def test_serve_demo_answers_readyz_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [hub_command(), "serve", "--demo", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status, body = 0, {}
        while time.monotonic() < deadline:
            try:
                status, body = get_json(f"http://127.0.0.1:{port}/readyz")
                break
            except OSError:
                time.sleep(0.2)
        assert status == 200, body
        assert body["store"]["ok"] is True
        assert get_json(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        password_file = tmp_path / "d" / "demo-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "d" / "hub.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    password = password_file.read_text().strip()
    assert f"password '{password}'" in out
