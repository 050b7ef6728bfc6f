"""Secrets that every hub process must agree on (chat tokens, email reply tokens)."""

from __future__ import annotations

import asyncio

from hub.shared_secret import shared_secret
from hub.timeline.store import TimelineStore


async def test_processes_racing_on_an_empty_store_agree_on_one_secret(
    store: TimelineStore,
) -> None:
    secrets = await asyncio.gather(*(shared_secret(store, "race.secret") for _ in range(20)))
    assert len(set(secrets)) == 1
    assert len(secrets[0]) == 32
    # Later callers read the same one; another key gets its own.
    assert await shared_secret(store, "race.secret") == secrets[0]
    assert await shared_secret(store, "other.secret") != secrets[0]
