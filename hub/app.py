"""The aiohttp application factory: wires config, store, bus, ingest, outbox and channels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import import_module
from typing import Any

import structlog
from aiohttp import web

from hub.bus import Bus, InProcessBus
from hub.channels.base import ChannelAdapter, HubServices
from hub.channels.registry import build_adapter
from hub.config import Config
from hub.ingest import Ingestor
from hub.outbox import OutboxWorker
from hub.timeline.store import StoreError, StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", TimelineStore)
BUS = web.AppKey("bus", Bus)
INGESTOR = web.AppKey("ingestor", Ingestor)
ADAPTERS = web.AppKey("adapters", dict[str, ChannelAdapter])
OUTBOX = web.AppKey("outbox", OutboxWorker)
SERVICES = web.AppKey("services", HubServices)

# Extra wiring hooks (inbox, router, reports) register here: each gets the app and
# returns a cleanup context, keeping app.py free of their internals.
Extension = Callable[[web.Application], Callable[[web.Application], AsyncIterator[None]] | None]


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a JSON body with a message; a declared body over the limit refused
    before anyone waits for it (one middleware, not two: each costs every request)."""
    # aiohttp applies client_max_size only while reading: a request that promises a
    # gigabyte and sends a few bytes would hold its handler waiting for the rest.
    length = request.content_length
    if length is not None:
        limit = request.app[CONFIG].hub.max_body_bytes
        if length > limit:
            return json_error(413, f"request body too large: at most {limit} bytes")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            # Keep every error a JSON body with a message a client can show.
            return json_error(exc.status, exc.reason if not exc.text else exc.text)
        raise
    except StoreUnavailable as exc:
        # The provider retries on 5xx; 503 says "not stored, try again".
        log.warning("http.store_unavailable", path=request.path, error=str(exc))
        return json_error(503, "storage unavailable, retry later")
    except StoreError as exc:
        return json_error(409, str(exc))
    except Exception:
        log.exception("http.unhandled", path=request.path, method=request.method)
        return json_error(500, "internal error")


def build_store(config: Config) -> TimelineStore:
    if config.storage.backend == "redis":
        from hub.timeline.redis import RedisStore

        assert config.storage.url is not None  # the schema requires it for redis
        return RedisStore(config.storage.url, cluster=config.storage.cluster)
    from hub.timeline.sqlite import SqliteStore

    config.storage.path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(config.storage.path)


def build_bus(config: Config) -> Bus:
    if config.storage.backend == "redis":
        from hub.redis_bus import RedisBus

        assert config.storage.url is not None
        return RedisBus(config.storage.url, cluster=config.storage.cluster)
    return InProcessBus()


async def _core_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = app.get(STORE) or build_store(config)
    app[STORE] = store
    await store.start()
    bus = build_bus(config)
    app[BUS] = bus
    await bus.start()
    ingestor = Ingestor(store, bus)
    app[INGESTOR] = ingestor
    services = HubServices(config=config, store=store, bus=bus, ingestor=ingestor)
    app[SERVICES] = services
    adapters = app[ADAPTERS]
    outbox = OutboxWorker(store, bus, adapters)
    app[OUTBOX] = outbox
    started: list[ChannelAdapter] = []
    try:
        for adapter in adapters.values():
            await adapter.start(services)
            started.append(adapter)
        await outbox.start()
        log.info("hub.started", channels=list(adapters), backend=config.storage.backend)
        yield
    finally:
        await outbox.stop()
        for adapter in reversed(started):
            await adapter.stop()
        await bus.close()
        await store.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    body: dict[str, Any] = {"store": {"ok": True, "backend": app[CONFIG].storage.backend}}
    ready = True
    try:
        await app[STORE].ping()
    except StoreError as exc:
        body["store"].update(ok=False, error=str(exc))
        ready = False
    channels: dict[str, Any] = {}
    for name, adapter in app[ADAPTERS].items():
        status = adapter.status()
        channels[name] = {"type": adapter.type.value, **status}
        ready = ready and bool(status.get("ok", False))
    body["channels"] = channels
    body["status"] = "ready" if ready else "unavailable"
    return web.json_response(body, status=200 if ready else 503)


async def _close_channel_connections(app: web.Application) -> None:
    # aiohttp waits for open WebSocket handlers before the cleanup contexts run, so
    # long-lived channel sockets (web chat) must be closed here or shutdown hangs.
    for adapter in app[ADAPTERS].values():
        close = getattr(adapter, "close_connections", None)
        if close is not None:
            await close()


def create_app(
    config: Config,
    *,
    store: TimelineStore | None = None,
    extensions: tuple[Extension, ...] | None = None,
) -> web.Application:
    """The whole hub as one aiohttp app. `store` lets tests inject an opened backend."""
    app = web.Application(
        client_max_size=config.hub.max_body_bytes,
        middlewares=[error_middleware],
    )
    app[CONFIG] = config
    if store is not None:
        app[STORE] = store
    adapters = {ch.name: build_adapter(ch, config) for ch in config.channels}
    app[ADAPTERS] = adapters
    app.cleanup_ctx.append(_core_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for adapter in adapters.values():
        app.router.add_routes(adapter.routes())
    app.on_shutdown.append(_close_channel_connections)
    if any(ch.type == "webchat" for ch in config.channels):
        # /widget.js and /demo serve every webchat channel: added once, not per channel.
        from hub.channels.webchat import shared_routes

        app.router.add_routes(shared_routes(config))
    for extension in default_extensions() if extensions is None else extensions:
        ctx = extension(app)
        if ctx is not None:
            app.cleanup_ctx.append(ctx)
    return app


# Modules with an `install(app)` that plug into the hub besides channels.
EXTENSION_MODULES: tuple[str, ...] = (
    "hub.inbox.api",
    "hub.inbox.page",
    "hub.routing.service",
    "hub.reports.integrations",
    "hub.reports.api",
)


def default_extensions() -> tuple[Extension, ...]:
    return tuple(import_module(name).install for name in EXTENSION_MODULES)
