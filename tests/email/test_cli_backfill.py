"""`hub email backfill CHANNEL --since DATE` against a real Dovecot."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hub.cli import main
from tests.email.conftest import ADDRESS, CHANNEL, make_mail
from tests.servers.dovecot import DovecotServer


@pytest.fixture(autouse=True)
def keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command configures structlog for the process; in a test run that would leak
    # into every later test (loggers cache their configuration on first use).
    monkeypatch.setattr("hub.log.configure_logging", lambda *a, **k: None)


def test_backfill_twice_stores_each_mail_once(
    dovecot: DovecotServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dovecot._append_sync([make_mail(i) for i in range(3)], "INBOX", None)
    config = tmp_path / "hub.yaml"
    config.write_text(
        f"""
hub:
  data_dir: {tmp_path / "data"}
  log_level: error
channels:
  - name: {CHANNEL}
    type: email
    address: {ADDRESS}
    imap: {{host: 127.0.0.1, port: {dovecot.port}, username: {ADDRESS},
            password: {dovecot.password}, tls: none}}
    smtp: {{host: 127.0.0.1, port: 1, tls: none}}
"""
    )
    args = ["email", "backfill", CHANNEL, "--since", "2000-01-01", "--config", str(config)]
    assert main(args) == 0
    assert "3 mails since 2000-01-01: 3 stored, 0 already there" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 stored, 3 already there" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "data" / "hub.db") as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE direction = 'in'").fetchone()[0] == 3


def test_backfill_refuses_unknown_channel_and_bad_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"hub:\n  data_dir: {tmp_path / 'data'}\n")
    assert (
        main(["email", "backfill", "nope", "--since", "2024-01-01", "--config", str(config)]) == 2
    )
    assert "no email channel named 'nope'" in capsys.readouterr().err
    assert main(["email", "backfill", "nope", "--since", "yesterday", "--config", str(config)]) == 2
    assert "not a date" in capsys.readouterr().err
