"""Wires the analytical half's live parts into the hub: /metrics, SLA tracking, CSAT
surveys, outgoing webhooks and customer segments (`install(app)`, listed in
hub.app.EXTENSION_MODULES).

What runs where:
- every process: /metrics (with its HTTP timing middleware and ingest counters), CSAT
  answers (an inbound SMS/email answering a survey, a widget's rating), segments;
- one process only (the leader): the SLA sweeper, CSAT survey sending, and the webhook
  dispatcher and senders. With SQLite there is one process, which leads; with Redis a
  lease (`hub:{lease:reports}`) picks the leader and hands over when it dies.

CSAT answers are taken before the normal ingest path by an ingest interceptor, so that
a "5" sent after a survey is recorded on the surveyed conversation instead of opening
a new one for an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import structlog
from aiohttp import web

from hub.app import ADAPTERS, BUS, CONFIG, INGESTOR, OUTBOX, STORE
from hub.bus import Subscription
from hub.inbox.auth import TOKENS, bearer_token, role_allows
from hub.ingest import Interceptor
from hub.lease import Lease, run_while_leader
from hub.model import Event, Inbound, Recorded, Role
from hub.reports.csat import CsatService
from hub.reports.prometheus import CONTENT_TYPE, HubMetrics
from hub.reports.segments import Segments
from hub.reports.sla import SlaSweeper
from hub.reports.webhooks import WebhookDispatcher
from hub.timeline.store import StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

METRICS = web.AppKey("reports_metrics", HubMetrics)
SLA = web.AppKey("reports_sla", SlaSweeper)
CSAT = web.AppKey("reports_csat", CsatService)
WEBHOOKS = web.AppKey("reports_webhooks", WebhookDispatcher)
SEGMENTS = web.AppKey("reports_segments", Segments)

LEASE_TTL_SECONDS = 15.0


class _Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# --- /metrics ----------------------------------------------------------------------------


async def metrics_endpoint(request: web.Request) -> web.Response:
    app = request.app
    if not app[CONFIG].hub.metrics_public:
        refusal = await _refuse_unless_supervisor(request)
        if refusal is not None:
            return refusal
    text = await app[METRICS].render()
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def _refuse_unless_supervisor(request: web.Request) -> web.Response | None:
    tokens = request.app.get(TOKENS)
    token = bearer_token(request, allow_query=False)
    session = await tokens.authenticate(token) if tokens is not None and token else None
    if session is None:
        return web.json_response(
            {"error": "metrics need a supervisor's token (hub.metrics_public is false)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="hub"'},
        )
    if not role_allows(session.role, Role.SUPERVISOR):
        return web.json_response({"error": "this needs the supervisor role"}, status=403)
    return None


# --- wiring ----------------------------------------------------------------------------------


def install(app: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    metrics = HubMetrics()
    app[METRICS] = metrics
    # Outermost, so that the time and status include every other middleware's work.
    app.middlewares.insert(0, metrics.middleware)
    app.router.add_get("/metrics", metrics_endpoint)
    return _integrations_ctx


def _csat_interceptor(csat: CsatService) -> Interceptor:
    async def intercept(inbound: Inbound) -> Recorded | None:
        try:
            return await csat.intercept(inbound)
        except StoreUnavailable:
            raise  # the webhook answers 503 and the provider retries
        except Exception:
            # A survey bug must never cost a customer's message: store it as usual.
            log.exception("csat.intercept_failed", channel=inbound.channel)
            return None

    return intercept


async def _follow_bus(subscription: Subscription, metrics: HubMetrics) -> None:
    async for item in subscription:
        if isinstance(item, Event):
            metrics.observe_event(item)


FIRST_ACQUIRE_WAIT = 2.0


class _Leadership:
    """Runs the leader-only components in one hub process at a time, under the store's
    lease (with SQLite there is one process, which always wins it)."""

    def __init__(self, store: TimelineStore, components: Sequence[_Component]) -> None:
        self.store = store
        self.components = components
        self._task: asyncio.Task[None] | None = None
        self._lease: Lease | None = None
        self._leading = asyncio.Event()

    async def start(self) -> None:
        if not self.components:
            return
        owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self._lease = self.store.lease("reports", owner, LEASE_TTL_SECONDS)
        self._task = asyncio.create_task(
            run_while_leader(self._lease, self._lead, renew_every=LEASE_TTL_SECONDS / 3),
            name="reports-leader",
        )
        # A free lease (always, with one SQLite process) is taken at once: let the hub
        # finish starting with its leader-only parts running, not a moment later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._leading.wait()), FIRST_ACQUIRE_WAIT)

    async def _start_all(self) -> None:
        for component in self.components:
            await component.start()

    async def _stop_all(self) -> None:
        for component in reversed(self.components):
            with contextlib.suppress(Exception):
                await component.stop()

    async def _lead(self) -> None:
        try:
            await self._start_all()
            self._leading.set()
            await asyncio.Event().wait()  # until the lease is lost or the hub stops
        finally:
            self._leading.clear()
            await self._stop_all()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        # Let another process take over now rather than after the lease's TTL.
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.release()


async def _integrations_ctx(app: web.Application) -> AsyncIterator[None]:
    config, store, bus = app[CONFIG], app[STORE], app[BUS]
    metrics = app[METRICS]
    metrics.sources.update(config=config, store=store, adapters=app[ADAPTERS])
    outbox = app.get(OUTBOX)

    csat: CsatService | None = None
    if config.csat.enabled:
        csat = CsatService(config, store, bus, nudge_outbox=outbox.nudge if outbox else None)
        app[CSAT] = csat
        metrics.sources["csat"] = csat
        for adapter in app[ADAPTERS].values():
            if hasattr(adapter, "record_csat"):
                adapter.record_csat = csat.record_widget_answer
    ingestor = app[INGESTOR]
    unregister = [ingestor.add_observer(metrics.observe_ingest)]
    if csat is not None:
        unregister.append(ingestor.add_interceptor(_csat_interceptor(csat)))
    app[SEGMENTS] = Segments(config, store)

    leader_only: list[_Component] = []
    if csat is not None:
        leader_only.append(csat)
    if config.sla.policies:
        sla = SlaSweeper(config, store, bus)
        app[SLA] = sla
        metrics.sources["sla"] = sla
        leader_only.append(sla)
    if config.webhooks:
        webhooks = WebhookDispatcher(config.webhooks, store, bus, observe=metrics.observe_webhook)
        app[WEBHOOKS] = webhooks
        metrics.sources["webhooks"] = webhooks
        leader_only.append(webhooks)

    subscription = bus.subscribe("metrics", maxsize=10_000)
    follower = asyncio.create_task(_follow_bus(subscription, metrics), name="metrics-bus")
    leadership = _Leadership(store, leader_only)
    await leadership.start()
    log.info(
        "reports.integrations_started",
        csat=csat is not None,
        sla_policies=len(config.sla.policies),
        webhooks=[w.name for w in config.webhooks],
        segments=len(config.segments),
    )
    try:
        yield
    finally:
        await leadership.stop()
        subscription.close()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        for undo in unregister:
            undo()


__all__ = ["CSAT", "METRICS", "SEGMENTS", "SLA", "WEBHOOKS", "install", "metrics_endpoint"]
