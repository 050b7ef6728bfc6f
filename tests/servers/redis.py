"""Real redis-server processes for tests, on free loopback ports (never the shared 6379).

Fixtures: `redis_server` (one server for the session), `redis_cluster` (three nodes made
a cluster with `redis-cli --cluster create`), and `redis_factory` (servers of a test's
own, e.g. to kill or to configure persistence).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.servers.common import free_port, require_binary, wait_for_port


class RedisServer:
    """One redis-server subprocess; `kill()` and `restart()` are for fault tests."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.binary = require_binary("redis-server", "/usr/bin/redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = tuple(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
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
            *self.extra,  # later options override the defaults above
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, timeout=10)
            self._wait_ready()
        except BaseException as exc:
            self.kill()
            log = self.directory / "redis.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"redis-server {' '.join(args[1:])} did not start:\n{tail}") from exc
        return self

    def _wait_ready(self) -> None:
        # The port opens before an append-only file is loaded; PING says LOADING until then.
        cli = require_binary("redis-cli", "/usr/bin/redis-cli")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(
                [cli, "-p", str(self.port), "ping"], capture_output=True, text=True, check=False
            )
            if out.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.port} never answered PONG")

    def kill(self) -> None:
        """Die like a crash: SIGKILL, no shutdown save."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, crash: bool = True) -> None:
        """Kill (or stop) and start again on the same port and directory."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        cli = require_binary("redis-cli", "/usr/bin/redis-cli")
        out = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, check=True
        )
        return out.stdout


class RedisCluster:
    """Three cluster-enabled nodes with every slot assigned, no replicas."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        # The cluster bus port defaults to port + 10000, past 65535 for a high free
        # port: give each node a free one explicitly.
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(free_port()),
            )
            for i in range(size)
        ]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url.removesuffix("/0")

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = require_binary("redis-cli", "/usr/bin/redis-cli")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        self._wait_ok()
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in node.cli("cluster", "info") for node in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis cluster never reached cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class RedisFactory:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._servers: list[RedisServer] = []

    def __call__(self, *extra: str) -> RedisServer:
        server = RedisServer(self._directory / f"server{len(self._servers)}", *extra)
        self._servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self._servers:
            server.kill()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """Start servers of this test's own: `redis_factory("--appendonly", "yes")`."""
    factory = RedisFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


__all__: Sequence[str] = ["RedisCluster", "RedisFactory", "RedisServer"]
