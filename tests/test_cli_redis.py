"""`hub serve` and `hub check-config` with Redis storage (issue 3).

- Nothing listening at the Redis URL: `hub serve` exits non-zero with one clear line
  naming the URL, no traceback.
- `hub check-config` connects to the Redis and warns (exit 0) when its persistence
  cannot give the configured `storage.durability`; silent when it can.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.common import free_port
from tests.servers.redis import RedisFactory

pytestmark = [pytest.mark.slow, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[1]


def hub(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`hub ARGS` (the console script's entry point) from this working tree."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def redis_config(directory: Path, url: str, durability: str = "always") -> Path:
    path = directory / "hub.yaml"
    path.write_text(
        f"""
hub:
  data_dir: {directory / "data"}
storage:
  backend: redis
  url: {url}
  durability: {durability}
channels:
  - name: web
    type: webchat
"""
    )
    return path


def test_serve_without_redis_exits_with_one_clear_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # a free port: nothing listens there
    config = redis_config(tmp_path, url)
    result = hub("serve", "--config", str(config), "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hub: cannot start: "), lines
    assert url in lines[0], lines
    assert "serving on" not in result.stdout


def test_serve_error_does_not_print_the_redis_password(tmp_path: Path) -> None:
    port = free_port()
    config = redis_config(tmp_path, f"redis://hub:s3cret-pw@127.0.0.1:{port}/0")
    result = hub("serve", "--config", str(config), "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode != 0
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert f"127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(
    ("redis_args", "durability", "warned"),
    [
        ((), "always", "appendonly no"),  # the RedisServer default: no append-only file
        (("--appendonly", "yes", "--appendfsync", "everysec"), "always", "appendfsync everysec"),
        (("--appendonly", "yes", "--appendfsync", "always"), "always", None),
        (("--appendonly", "yes", "--appendfsync", "everysec"), "everysec", None),
        ((), "none", None),
    ],
)
def test_check_config_warns_when_redis_cannot_give_the_durability(
    tmp_path: Path,
    redis_factory: RedisFactory,
    redis_args: tuple[str, ...],
    durability: str,
    warned: str | None,
) -> None:
    redis = redis_factory(*redis_args)
    config = redis_config(tmp_path, redis.url, durability)
    result = hub("check-config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "Traceback" not in result.stderr
    if warned is None:
        assert "warning" not in result.stderr, result.stderr
    else:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("warning: storage.durability: "), lines
        assert warned in lines[0]
        assert str(redis.port) in lines[0]
