"""Secrets made once and shared by every hub process through the store.

The store has no compare-and-set, so creation happens under the store's lease: two
processes starting at once on an empty store cannot each keep a secret of their own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket

from hub.timeline.store import StoreUnavailable, TimelineStore

LEASE_SECONDS = 10.0
WAIT_SECONDS = 15.0


async def shared_secret(store: TimelineStore, key: str) -> bytes:
    """The secret stored under `key`, created (32 random bytes) by whoever comes first."""
    stored = await store.get_state(key)
    if stored:
        return bytes.fromhex(stored)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    lease = store.lease(f"secret:{key}", owner, LEASE_SECONDS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not await lease.acquire():
        if loop.time() > deadline:
            raise StoreUnavailable(f"could not create the shared secret {key!r} in time")
        await asyncio.sleep(0.05)
    try:
        # Whoever held the lease before us may have created it meanwhile.
        stored = await store.get_state(key)
        if not stored:
            stored = secrets.token_hex(32)
            await store.set_state(key, stored)
        return bytes.fromhex(stored)
    finally:
        await lease.release()
