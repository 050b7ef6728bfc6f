"""The `store` fixture: every contract test runs once per backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.timeline.store import TimelineStore

BACKENDS = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TimelineStore]:
    backend: str = request.param
    if backend == "sqlite":
        from hub.timeline.sqlite import SqliteStore

        instance: TimelineStore = SqliteStore(tmp_path / "hub.db")
    elif backend in ("redis", "redis-cluster"):
        from hub.timeline.redis import RedisStore

        cluster = backend == "redis-cluster"
        server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
        # A key prefix of its own isolates each test without flushing a shared server.
        prefix = f"t{uuid.uuid4().hex[:12]}"
        instance = RedisStore(server.url, cluster=cluster, key_prefix=prefix)
    else:  # pragma: no cover - extended by the Redis backend
        raise AssertionError(f"unknown backend {backend}")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()
