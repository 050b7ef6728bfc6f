"""What the fault drills share: a `hub serve` subprocess, signed SMS webhooks, and reads of
the SQLite file that count what was stored.

Every fault test ends the same way: each message a client saw acknowledged is in the
database exactly once. `stored_counts` reads that straight from the file (read-only,
beside the running hub, as WAL allows), so a test never trusts the hub's own word.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator
from yarl import URL

from tests.servers.common import free_port
from tests.servers.dovecot import dovecot as dovecot  # fixture
from tests.servers.smtp import smtp_server as smtp_server  # fixture

REPO = Path(__file__).resolve().parents[2]
ACCOUNT_SID = "AC5e1f0a2b3c4d5e6f708192a3b4c5d6e7"
AUTH_TOKEN = "4f2a9c1e7b3d5a8f0c6e2b9d1a7f3c5e"
# As behind a reverse proxy: Twilio signs for this URL, the hub listens on loopback.
PUBLIC_URL = "https://hub.faults.example"
SMS_NUMBER = "+14155550100"
SMS_CHANNEL = "sms"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Run as `python -c LAUNCHER FSIZE_LIMIT hub-args...`: the hub with an optional file-size
# limit (RLIMIT_FSIZE) standing in for a full disk. SIGXFSZ is ignored (CPython does so
# already; said here so the drill does not depend on it), so a write past the limit fails
# with EFBIG instead of killing the process, as a write to a full disk fails with ENOSPC.
LAUNCHER = """
import resource, signal, sys
limit = int(sys.argv[1])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
from hub.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every aiohttp client request in these tests must stay on this machine."""
    original = aiohttp.ClientSession._request

    async def guarded(self: aiohttp.ClientSession, method: str, url: Any, *a: Any, **kw: Any):
        host = URL(str(url)).host
        if host not in LOOPBACK_HOSTS:
            raise AssertionError(f"a test tried to reach {host} ({url}); loopback only")
        return await original(self, method, url, *a, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", guarded)


def sms_hub_yaml(data_dir: Path, db: Path, *, api_base_url: str | None = None) -> str:
    """One SMS channel on SQLite. Without `api_base_url` the Twilio client points at a
    loopback port nobody listens on: nothing can leave the machine."""
    api = api_base_url or f"http://127.0.0.1:{free_port()}"
    return f"""
hub:
  public_url: {PUBLIC_URL}
  data_dir: {data_dir}
  log_level: info
storage:
  backend: sqlite
  path: {db}
channels:
  - name: {SMS_CHANNEL}
    type: sms
    phone_number: "{SMS_NUMBER}"
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: {api}
"""


class HubProcess:
    """`hub serve --config FILE --port P` in a subprocess of its own, its log kept.

    stdout and stderr go to a pipe drained by a thread (not to a file: under a file-size
    limit the log itself would hit the limit). `fsize_limit` starts it under
    RLIMIT_FSIZE; the same object can be started again after a kill, with or without.
    """

    def __init__(self, config: Path, port: int | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, fsize_limit: int = 0, timeout: float = 30.0) -> HubProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [sys.executable, "-c", LAUNCHER, str(fsize_limit)]
        argv += ["serve", "--config", str(self.config), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"hub not up within {timeout} s:\n{self.tail()}")

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with self._lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)

    def kill(self) -> int:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait()
        self._join_reader()
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: the hub's clean shutdown (store closed)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"hub ignored SIGTERM for {timeout} s:\n{self.tail()}"
                ) from None
        self._join_reader()
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        with self._lock:
            return "\n".join(self.lines[-n:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (all, or those whose event is `name`)."""
        with self._lock:
            lines = list(self.lines)
        out = []
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if name is None or entry.get("event") == name:
                out.append(entry)
        return out

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("level") in ("error", "critical")]


class SmsWebhooks:
    """Inbound-SMS webhooks as Twilio sends them: form-encoded, X-Twilio-Signature over
    the public URL, each MessageSid new (or repeated, for a redelivery)."""

    def __init__(self, hub_url: str, channel: str = SMS_CHANNEL) -> None:
        self.path = f"/twilio/{channel}/sms"
        self.hub_url = hub_url
        self._validator = RequestValidator(AUTH_TOKEN)

    @staticmethod
    def new_sid() -> str:
        return "SM" + uuid.uuid4().hex

    def params(self, sid: str, n: int) -> dict[str, str]:
        return {
            "ToCountry": "US",
            "SmsMessageSid": sid,
            "NumMedia": "0",
            "SmsSid": sid,
            "SmsStatus": "received",
            "Body": f"fault drill message {n}",
            "To": SMS_NUMBER,
            "NumSegments": "1",
            "MessageSid": sid,
            "AccountSid": ACCOUNT_SID,
            # ~200 customers: concurrent webhooks of one customer meet in the store.
            "From": f"+1415555{n % 200:04d}",
            "ApiVersion": "2010-04-01",
        }

    async def post(self, session: aiohttp.ClientSession, sid: str, n: int) -> tuple[int, str]:
        params = self.params(sid, n)
        signature = self._validator.compute_signature(PUBLIC_URL + self.path, params)
        async with session.post(
            self.hub_url + self.path,
            data=params,
            headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
        ) as response:
            # Acknowledged means the whole answer arrived, as Twilio would see it.
            return response.status, await response.text()


def stored_counts(db: Path, channel: str, direction: str = "in") -> dict[str, int]:
    """external id -> number of events stored with it, read from the file itself."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT external_id, count(*) FROM events WHERE channel = ? AND direction = ? "
            "GROUP BY external_id",
            (channel, direction),
        ).fetchall()
    finally:
        conn.close()
    return {str(k): int(n) for k, n in rows}


def integrity_check(db: Path) -> list[str]:
    """`PRAGMA integrity_check` on a file nobody has open; ["ok"] when sound."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def assert_exactly_once(counts: Mapping[str, int], expected: Iterable[str], what: str) -> None:
    expected = set(expected)
    missing = sorted(x for x in expected if counts.get(x, 0) == 0)
    repeated = sorted(x for x in expected if counts.get(x, 0) > 1)
    assert not missing, f"{len(missing)} {what} acknowledged but not stored: {missing[:5]}"
    assert not repeated, f"{len(repeated)} {what} stored more than once: {repeated[:5]}"
