"""`GET /metrics`: the Prometheus text exposition format (0.0.4), from a small exporter
written here rather than a client library (the hub needs counters, gauges and one kind
of histogram, and nothing of multi-process collection).

The route is public by default, as scrapers expect; with `hub.metrics_public: false`
it needs a supervisor's or admin's bearer token (the inbox API's tokens).

Metrics (per process; with several hub processes, scrape each):

- hub_ingested_total{channel,kind}: inbound contacts stored (CSAT answers too).
- hub_ingest_duplicates_total{channel}: redeliveries recognised and not stored again.
- hub_http_request_duration_seconds{route,method}: histogram of the time to answer HTTP
  requests (providers' webhooks, the API), by route pattern; WebSockets are not timed.
- hub_queue_waiting{queue}: open unassigned conversations in each routing queue.
- hub_conversations_active{status}: open, pending and snoozed conversations.
- hub_outbox_backlog: outbound messages queued and not yet accepted by a provider, as
  seen on the bus since this process started (older retries join at their next try).
- hub_store_up: 1 when the store answered a ping during this scrape.
- hub_channel_up{channel,type}: each channel's own health, as in /readyz.
- hub_mailbox_up / _connected / _stalled{channel}, hub_mailbox_last_fetch_timestamp_seconds:
  email channels' IMAP state.
- hub_webhook_delivery_duration_seconds{webhook}: histogram of outgoing webhook attempts;
  hub_webhook_deliveries_total{webhook,outcome} (ok, failed_attempt, dropped);
  hub_webhook_queue_depth{webhook}: deliveries waiting in the durable queue.
- hub_csat_surveys_total, hub_csat_responses_total{score}; hub_sla_warnings_total{sla},
  hub_sla_breaches_total{sla}: counted by this process (the leader does the work).
- process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
  process_start_time_seconds, hub_info{version,backend,python}.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from importlib import metadata
from itertools import accumulate
from typing import Any

import structlog
from aiohttp import web

from hub.model import ConversationQuery, ConversationStatus, DeliveryState, Event, Inbound, Recorded

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STARTED_AT = time.time()

LabelKey = tuple[str, ...]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        if not _NAME.fullmatch(name) or not all(_LABEL.fullmatch(n) for n in labels):
            raise ValueError(f"bad metric or label name in {name} {labels}")
        self.name = name
        self.help = help_text
        self.label_names = labels
        self._label_set = frozenset(labels)
        self._values: dict[LabelKey, float] = {}

    def _key(self, labels: Mapping[str, Any]) -> LabelKey:
        if labels.keys() != self._label_set:
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, key)} {format_value(v)}"
            for key, v in sorted(self._values.items())
        ]

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.lines())


class Counter(Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, total: float, **labels: Any) -> None:
        """Mirror a count kept elsewhere (it must only grow)."""
        self._values[self._key(labels)] = float(total)


class Gauge(Metric):
    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        self._values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self._values.clear()


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        if "le" in labels:
            raise ValueError("le is the histogram's own label")
        self.buckets = tuple(sorted(buckets))
        self._series: dict[LabelKey, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: Any) -> None:
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ([0] * len(self.buckets), [0.0, 0.0])
        counts, totals = series
        # One counter per observation (the first bucket it fits); the cumulative counts
        # Prometheus wants are summed when scraped, not on every request.
        index = bisect_left(self.buckets, value)
        if index < len(counts):
            counts[index] += 1
        totals[0] += value
        totals[1] += 1

    def count(self, **labels: Any) -> int:
        series = self._series.get(self._key(labels))
        return int(series[1][1]) if series else 0

    def lines(self) -> list[str]:
        out = []
        for key, (counts, (total, count)) in sorted(self._series.items()):
            for bound, n in zip(self.buckets, accumulate(counts), strict=True):
                le = f'le="{format_value(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {n}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {int(count)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {format_value(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {int(count)}")
        return out


Collector = Callable[[], Awaitable[None]]


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.collectors: list[Collector] = []

    def _add(self, metric: Metric) -> Any:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        result: Counter = self._add(Counter(name, help_text, labels))
        return result

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        result: Gauge = self._add(Gauge(name, help_text, labels))
        return result

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        result: Histogram = self._add(Histogram(name, help_text, labels, buckets))
        return result

    async def render(self) -> str:
        for collect in self.collectors:
            try:
                await collect()
            except Exception:
                # One broken source must not take the whole scrape down.
                name = getattr(collect, "__name__", "?")
                log.exception("metrics.collector_failed", collector=name)
        return "".join(metric.render() for metric in self.metrics.values())


# --- the hub's metrics ---------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("hub")
    except metadata.PackageNotFoundError:
        return "unknown"


class HubMetrics:
    """The hub's metrics and the sources they are read from at scrape time."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.ingested = r.counter(
            "hub_ingested_total",
            "Inbound contacts stored, by channel and kind.",
            ("channel", "kind"),
        )
        self.ingest_duplicates = r.counter(
            "hub_ingest_duplicates_total",
            "Redelivered inbound contacts recognised and not stored again.",
            ("channel",),
        )
        self.http = r.histogram(
            "hub_http_request_duration_seconds",
            "Time to answer HTTP requests (provider webhooks, API), by route; not WebSockets.",
            ("route", "method"),
        )
        self.queue_waiting = r.gauge(
            "hub_queue_waiting", "Open unassigned conversations waiting in a queue.", ("queue",)
        )
        self.conversations = r.gauge(
            "hub_conversations_active", "Active conversations by status.", ("status",)
        )
        self.outbox_backlog = r.gauge(
            "hub_outbox_backlog",
            "Outbound messages queued and not yet accepted by their provider.",
        )
        self.store_up = r.gauge("hub_store_up", "1 when the store answers.")
        self.channel_up = r.gauge(
            "hub_channel_up", "1 when the channel reports itself healthy.", ("channel", "type")
        )
        self.mailbox_up = r.gauge("hub_mailbox_up", "1 when the mailbox is healthy.", ("channel",))
        self.mailbox_connected = r.gauge(
            "hub_mailbox_connected", "1 while connected to IMAP.", ("channel",)
        )
        self.mailbox_stalled = r.gauge(
            "hub_mailbox_stalled", "1 when fetching has failed for a while.", ("channel",)
        )
        self.mailbox_last_fetch = r.gauge(
            "hub_mailbox_last_fetch_timestamp_seconds",
            "Unix time of the last successful mailbox read.",
            ("channel",),
        )
        self.webhook_latency = r.histogram(
            "hub_webhook_delivery_duration_seconds",
            "Outgoing webhook delivery attempts, by webhook.",
            ("webhook",),
        )
        self.webhook_deliveries = r.counter(
            "hub_webhook_deliveries_total",
            "Outgoing webhook attempts by outcome (ok, failed_attempt, dropped).",
            ("webhook", "outcome"),
        )
        self.webhook_queue = r.gauge(
            "hub_webhook_queue_depth", "Deliveries waiting in a webhook's queue.", ("webhook",)
        )
        self.csat_surveys = r.counter("hub_csat_surveys_total", "CSAT surveys sent.")
        self.csat_responses = r.counter(
            "hub_csat_responses_total", "CSAT answers recorded, by score.", ("score",)
        )
        self.sla_warnings = r.counter(
            "hub_sla_warnings_total", "SLA breach warnings published.", ("sla",)
        )
        self.sla_breaches = r.counter(
            "hub_sla_breaches_total", "SLA breaches recorded on the timeline.", ("sla",)
        )
        self.cpu = r.counter("process_cpu_seconds_total", "User and system CPU time spent.")
        self.memory = r.gauge("process_resident_memory_bytes", "Resident memory size.")
        self.fds = r.gauge("process_open_fds", "Open file descriptors.")
        self.started = r.gauge("process_start_time_seconds", "Unix time the process started.")
        self.info = r.gauge(
            "hub_info", "The hub's version and storage backend.", ("version", "backend", "python")
        )
        # Sources, attached by hub.reports.integrations once the hub has started.
        self.sources: dict[str, Any] = {}
        self._queued: set[str] = set()
        r.collectors += [self._collect_store, self._collect_channels, self._collect_process]
        r.collectors += [self._collect_integrations]

    # --- events as they happen --------------------------------------------------------

    def observe_ingest(self, inbound: Inbound, recorded: Recorded) -> None:
        if recorded.created:
            self.ingested.inc(channel=inbound.channel, kind=recorded.event.kind.value)
        else:
            self.ingest_duplicates.inc(channel=inbound.channel)

    def observe_event(self, event: Event) -> None:
        """Follow outbound messages in and out of the outbox (bus events)."""
        if event.delivery_state is DeliveryState.QUEUED:
            if len(self._queued) < 1_000_000:
                self._queued.add(event.id)
        elif event.delivery_state is not None:
            self._queued.discard(event.id)

    def observe_webhook(self, webhook: str, seconds: float) -> None:
        self.webhook_latency.observe(seconds, webhook=webhook)

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException:
            self._observe_http(request, started)
            raise
        if not isinstance(response, web.WebSocketResponse):
            self._observe_http(request, started)
        return response

    def _observe_http(self, request: web.Request, started: float) -> None:
        info = request.match_info
        resource = info.route.resource if info.http_exception is None else None
        # The route's pattern, never the raw path: one series per route, not per id.
        route = resource.canonical if resource is not None else "unmatched"
        self.http.observe(time.perf_counter() - started, route=route, method=request.method)

    # --- collectors (scrape time) ---------------------------------------------------------

    async def _collect_store(self) -> None:
        self.outbox_backlog.set(len(self._queued))
        store = self.sources.get("store")
        config = self.sources.get("config")
        if store is None or config is None:
            return
        try:
            await store.ping()
        except Exception:
            self.store_up.set(0)
            return
        self.store_up.set(1)
        self.queue_waiting.clear()
        for queue in config.routing.queues:
            page = await store.list_conversations(
                ConversationQuery(
                    statuses=(ConversationStatus.OPEN,), unassigned=True, queue=queue.name
                ),
                limit=1,
            )
            self.queue_waiting.set(page.total or 0, queue=queue.name)
        for status in (
            ConversationStatus.OPEN,
            ConversationStatus.PENDING,
            ConversationStatus.SNOOZED,
        ):
            page = await store.list_conversations(ConversationQuery(statuses=(status,)), limit=1)
            self.conversations.set(page.total or 0, status=status.value)

    async def _collect_channels(self) -> None:
        adapters = self.sources.get("adapters") or {}
        for gauge in (
            self.channel_up,
            self.mailbox_up,
            self.mailbox_connected,
            self.mailbox_stalled,
            self.mailbox_last_fetch,
        ):
            gauge.clear()
        for name, adapter in adapters.items():
            status = adapter.status()
            ok = 1 if status.get("ok") else 0
            self.channel_up.set(ok, channel=name, type=adapter.type.value)
            if adapter.type.value != "email":
                continue
            self.mailbox_up.set(ok, channel=name)
            self.mailbox_connected.set(1 if status.get("connected") else 0, channel=name)
            self.mailbox_stalled.set(1 if status.get("stalled") else 0, channel=name)
            fetched = status.get("last_fetch_at")
            if isinstance(fetched, str):
                stamp = datetime.fromisoformat(fetched).timestamp()
                self.mailbox_last_fetch.set(stamp, channel=name)

    async def _collect_process(self) -> None:
        self.cpu.set_total(time.process_time())
        self.started.set(_STARTED_AT)
        rss = _resident_memory()
        if rss is not None:
            self.memory.set(rss)
        try:
            self.fds.set(len(os.listdir("/proc/self/fd")))
        except OSError:
            pass
        config = self.sources.get("config")
        backend = config.storage.backend if config is not None else ""
        python = ".".join(str(p) for p in sys.version_info[:3])
        self.info.clear()
        self.info.set(1, version=_version(), backend=backend, python=python)

    async def _collect_integrations(self) -> None:
        dispatcher = self.sources.get("webhooks")
        if dispatcher is not None:
            for name, sender in dispatcher.senders.items():
                self.webhook_queue.set(len(sender.queue), webhook=name)
                for outcome in ("ok", "failed_attempt", "dropped"):
                    self.webhook_deliveries.set_total(
                        sender.outcomes[outcome], webhook=name, outcome=outcome
                    )
        csat = self.sources.get("csat")
        if csat is not None:
            self.csat_surveys.set_total(csat.asked)
            for score, n in csat.responses.items():
                self.csat_responses.set_total(n, score=score)
        sla = self.sources.get("sla")
        if sla is not None:
            for name, n in sla.warnings.items():
                self.sla_warnings.set_total(n, sla=name)
            for name, n in sla.breaches.items():
                self.sla_breaches.set_total(n, sla=name)

    async def render(self) -> str:
        return await self.registry.render()


def _resident_memory() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "HubMetrics",
    "Registry",
    "format_value",
]
