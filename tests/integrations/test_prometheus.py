"""GET /metrics: well-formed text exposition (parsed here by a small independent reader),
whose values move with what the hub does; public or token-protected as configured."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from hub.app import INGESTOR
from hub.model import (
    ChannelType,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    agent_author,
)
from hub.reports.prometheus import Registry
from tests.integrations.conftest import AGENTS, Hub, MakeHub, eventually

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


@dataclass
class Family:
    type: str = ""
    help: str = ""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _labels(text: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad labels: {text!r}"
        yield match.group(1), _unescape(match.group(2))
        pos = match.end()


def parse(text: str) -> dict[str, Family]:
    """Families by name; every sample must follow its family's TYPE line."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families.setdefault(name, Family()).help = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert families.setdefault(name, Family()).type == "", f"two TYPE lines: {line}"
            families[name].type = kind
            current = name
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            family = current or ""
            assert name == family or (
                families[family].type == "histogram"
                and name in (f"{family}_bucket", f"{family}_sum", f"{family}_count")
            ), f"{name} outside its family ({family})"
            key = (name, frozenset(_labels(labels or "")))
            assert key not in families[family].samples, f"duplicate series {line}"
            families[family].samples[key] = float(value)
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """One series' value (0 if absent), looked up by sample name and exact labels."""
    family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
    if family is None:
        return 0.0
    return family.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(hub: Hub, headers: dict[str, str] | None = None) -> dict[str, Family]:
    resp = await hub.client.get("/metrics", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(await resp.text())


def check_histograms(families: dict[str, Family]) -> None:
    for name, family in families.items():
        if family.type != "histogram":
            continue
        series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for (sample, labels), v in family.samples.items():
            if sample.endswith("_bucket"):
                rest = frozenset(kv for kv in labels if kv[0] != "le")
                le = dict(labels)["le"]
                series.setdefault(rest, []).append((float(le), v))
        for rest, buckets in series.items():
            counts = [n for _, n in sorted(buckets)]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            assert sorted(buckets)[-1][0] == float("inf")
            assert counts[-1] == family.samples[(f"{name}_count", rest)]


WEBHOOK_YAML = """
webhooks:
  - name: crm
    url: "{url}"
    events: [message.received]
    secret: metrics-test-secret-0123456789
"""


async def test_metrics_move_with_what_the_hub_does(make_hub: MakeHub) -> None:
    hits: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        hub = await make_hub(WEBHOOK_YAML.format(url=f"http://127.0.0.1:{port}/hook"))
        before = await scrape(hub)
        check_histograms(before)
        assert before["hub_ingested_total"].type == "counter"
        assert before["hub_queue_waiting"].type == "gauge"
        assert value(before, "hub_channel_up", channel="web", type="webchat") == 1
        assert value(before, "hub_store_up") == 1
        assert value(before, "process_resident_memory_bytes") > 0
        assert value(before, "process_cpu_seconds_total") > 0
        info = before["hub_info"].samples
        assert [dict(labels)["backend"] for _, labels in info] == ["sqlite"]
        ingested = value(before, "hub_ingested_total", channel="web", kind="message")

        first = await hub.chat("visitor-m1", "hello")
        await hub.chat("visitor-m2", "my invoice is wrong")
        await hub.app[INGESTOR].ingest(  # a redelivery of the first message
            Inbound(
                channel="web",
                channel_type=ChannelType.WEBCHAT,
                external_id=first.event.external_id or "",
                identity=Identity(IdentityKind.CHAT, "visitor-m1"),
                text="hello",
            )
        )
        assert (await hub.client.get("/healthz")).status == 200
        assert (await hub.client.get("/no/such/page")).status == 404
        conv_id = first.event.conversation_id or ""
        queued = await hub.store.append(
            conv_id,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.OUT,
                author=agent_author("alice"),
                channel="sms",  # its provider is unreachable: it stays queued
                channel_type=ChannelType.SMS,
                text="we will text you",
                delivery_state=DeliveryState.QUEUED,
                data={"to": {"kind": "phone", "value": "+14155550123"}},
            ),
        )
        await hub.bus.publish([queued.event])

        async def settled() -> dict[str, Any] | None:
            after = await scrape(hub)
            ready = (
                value(after, "hub_queue_waiting", queue="general") == 1
                and value(after, "hub_queue_waiting", queue="billing") == 1
                and value(after, "hub_outbox_backlog") >= 1
                and value(after, "hub_webhook_delivery_duration_seconds_count", webhook="crm") >= 2
            )
            return after if ready else None

        after = await eventually(settled)
        check_histograms(after)
        assert value(after, "hub_ingested_total", channel="web", kind="message") == ingested + 2
        assert value(after, "hub_ingest_duplicates_total", channel="web") == 1
        assert value(after, "hub_conversations_active", status="open") == 2
        healthz = value(
            after, "hub_http_request_duration_seconds_count", route="/healthz", method="GET"
        )
        assert healthz == 1
        unmatched = value(
            after, "hub_http_request_duration_seconds_count", route="unmatched", method="GET"
        )
        assert unmatched == 1
        assert value(after, "hub_webhook_deliveries_total", webhook="crm", outcome="ok") == 2
        assert value(after, "hub_webhook_queue_depth", webhook="crm") == 0
        assert len(hits) == 2
    finally:
        await runner.cleanup()


async def login(hub: Hub, name: str) -> dict[str, str]:
    resp = await hub.client.post(
        "/api/v1/auth/login", json={"login": name, "password": AGENTS[name][1]}
    )
    assert resp.status == 200, await resp.text()
    return {"Authorization": f"Bearer {(await resp.json())['token']}"}


async def test_metrics_can_require_a_supervisor(make_hub: MakeHub) -> None:
    hub = await make_hub(hub_settings="metrics_public: false")
    assert (await hub.client.get("/metrics")).status == 401
    agent = await hub.client.get("/metrics", headers=await login(hub, "alice"))
    assert agent.status == 403
    families = await scrape(hub, await login(hub, "sam"))
    assert "hub_ingested_total" in families


async def test_registry_escapes_labels_and_renders_histograms() -> None:
    registry = Registry()
    counter = registry.counter("demo_total", "A demo\ncounter with \\ in help.", ("path",))
    counter.inc(path='a "quoted"\nvalue\\')
    histogram = registry.histogram("demo_seconds", "Timing.", ("route",), buckets=(0.1, 1.0))
    histogram.observe(0.05, route="/x")
    histogram.observe(5, route="/x")
    with pytest.raises(ValueError):
        counter.inc(-1, path="x")
    with pytest.raises(ValueError):
        counter.inc(nope="x")
    text = await registry.render()
    assert "# HELP demo_total A demo\\ncounter with \\\\ in help.\n" in text
    families = parse(text)
    assert value(families, "demo_total", path='a "quoted"\nvalue\\') == 1
    assert value(families, "demo_seconds_bucket", route="/x", le="0.1") == 1
    assert value(families, "demo_seconds_bucket", route="/x", le="1") == 1
    assert value(families, "demo_seconds_bucket", route="/x", le="+Inf") == 2
    assert value(families, "demo_seconds_sum", route="/x") == 5.05
    check_histograms(families)
