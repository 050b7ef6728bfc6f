"""The `store` fixture: every contract test runs once per backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.timeline.store import TimelineStore

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TimelineStore]:
    backend: str = request.param
    if backend == "sqlite":
        from hub.timeline.sqlite import SqliteStore

        instance: TimelineStore = SqliteStore(tmp_path / "hub.db")
    else:  # pragma: no cover - extended by the Redis backend
        raise AssertionError(f"unknown backend {backend}")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()
