"""Settings for the hub's long-running processes (the server and its SQLite writer)."""

from __future__ import annotations

import gc

# Young-generation collections: one per this many allocations (CPython's default: 700).
GC_THRESHOLD = (10_000, 10, 10)


def quiet_collector() -> None:
    """Take the garbage collector off the request path of a long-running server.

    What start-up built (modules, config, routes, phone-number metadata) lives as long as
    the process: frozen, the collector stops walking it on every full collection. And a
    webhook allocates a few hundred objects, so the default threshold ran a collection
    every few requests; together they cost the event loop about a tenth of its time at
    5,000 webhooks/s. Reference counting still frees everything that is not a cycle at
    once; cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
