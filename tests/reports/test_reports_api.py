"""The reports API over a real SQLite store filled through ingest/assign/append/set_status."""

from __future__ import annotations

import csv
import io
import sqlite3
from datetime import UTC, date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient

from hub.app import CONFIG, STORE
from hub.inbox.openapi import REPORT_DIMENSIONS, REPORT_METRICS
from hub.inbox.page import PAGE_CSP
from hub.model import ConversationStatus, Direction, EventKind, utcnow
from hub.reports import api as reports_api
from hub.reports import source as source_module
from hub.reports.api import SOURCE, Query, csv_report, summary_report, timeseries_report
from hub.reports.metrics import conversation_facts, summarize, to_us
from hub.reports.source import Period, SqliteReportSource, StoreReportSource
from tests.reports.conftest import Story, Teller, auth, tell, token

ROUTES = (
    "/api/v1/reports/summary",
    "/api/v1/reports/timeseries",
    "/api/v1/reports/export.csv",
    "/api/v1/reports/queues",
)


async def get(client: TestClient, path: str, who: str = "sam", **params: str) -> Any:
    resp = await client.get(path, params=params, headers=auth(await token(client.app, who)))
    assert resp.status == 200, await resp.text()
    if resp.content_type == "text/csv":
        return await resp.text()
    return await resp.json()


def seconds(later: Any, earlier: Any) -> float:
    return round((later.created_at - earlier.created_at).total_seconds(), 3)


@pytest.fixture
async def story(client: TestClient) -> Story:
    return await tell(client.app)


# --- who may ask ----------------------------------------------------------------------------


async def test_roles(client: TestClient) -> None:
    app = client.app
    callers = {
        "anonymous": (None, 401),
        "agent": (await token(app, "alice"), 403),
        "supervisor": (await token(app, "sam"), 200),
        "admin": (await token(app, "root"), 200),
    }
    for path in ROUTES:
        for who, (value, expected) in callers.items():
            resp = await client.get(path, headers=auth(value) if value else {})
            assert resp.status == expected, f"{path} as {who}: {resp.status}"
            if expected != 200:
                assert "error" in await resp.json()


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("summary", {"from": "2025-03-10", "to": "2025-03-01"}, "before"),
        ("summary", {"from": "2024-01-01", "to": "2025-06-01"}, "366 days"),
        ("summary", {"from": "yesterday"}, "from"),
        ("summary", {"to": "2025-03-01T10:00:00"}, "zone"),
        ("summary", {"tz": "Mars/Olympus"}, "tz"),
        ("summary", {"tz": "../../etc/passwd"}, "tz"),
        ("summary", {"tz": "posix/Europe/Paris"}, "tz"),
        ("summary", {"from": "0001-01-01T00:00:00+14:00"}, "from"),
        ("summary", {"to": "9999-12-31"}, "to"),
        ("summary", {"from": "2025-02-30"}, "from"),
        ("summary", {"business_hours": "weekends"}, "business_hours"),
        ("summary", {"by": "colour"}, "by"),
        ("summary", {"color": "red"}, "unknown query parameter"),
        ("summary", {"channel": "x" * 201}, "channel"),
        ("timeseries", {"metric": "happiness"}, "metric"),
        ("timeseries", {"interval": "week"}, "interval"),
        ("export.csv", {"group": "planet"}, "group"),
        ("queues", {"queue": "general"}, "unknown query parameter"),
    ],
)
async def test_bad_parameters_are_400(
    client: TestClient, path: str, params: dict[str, str], message: str
) -> None:
    resp = await client.get(
        f"/api/v1/reports/{path}", params=params, headers=auth(await token(client.app, "sam"))
    )
    assert resp.status == 400
    assert message in (await resp.json())["error"]


# --- the figures --------------------------------------------------------------------------


async def test_summary_figures(client: TestClient, story: Story) -> None:
    body = await get(client, "/api/v1/reports/summary")
    o = body["overall"]
    assert o["conversations"] == 5
    assert (o["resolved"], o["reopened"], o["unanswered"]) == (2, 0, 2)
    assert (o["webchats"], o["abandoned_chats"]) == (3, 1)
    # First responses, from the stored events' own times.
    chat_first = seconds(
        story.first("chat", EventKind.MESSAGE, Direction.OUT),
        story.first("chat", EventKind.MESSAGE, Direction.IN),
    )
    shop_first = seconds(
        story.first("shop", EventKind.MESSAGE, Direction.OUT),
        story.first("shop", EventKind.MESSAGE, Direction.IN),
    )
    call_first = seconds(
        story.first("answered", EventKind.CALL, Direction.IN, status="answered"),
        story.first("answered", EventKind.CALL, Direction.IN, status="ringing"),
    )
    firsts = sorted([chat_first, shop_first, call_first])
    assert o["first_response"]["count"] == 3
    assert o["first_response"]["median"] == pytest.approx(firsts[1], abs=0.002)
    assert o["first_response"]["p90"] == pytest.approx(firsts[2], abs=0.002)
    next_chat = seconds(
        story.last("chat", EventKind.MESSAGE, Direction.OUT),
        story.last("chat", EventKind.MESSAGE, Direction.IN),
    )
    assert o["next_response"]["count"] == 1
    assert o["next_response"]["mean"] == pytest.approx(next_chat, abs=0.002)
    # Queued (no agent) does not end the wait; the assignment to an agent does.
    waits = sorted(
        [
            seconds(
                story.first("chat", EventKind.ASSIGNMENT, Direction.INTERNAL, to="alice"),
                story.first("chat", EventKind.MESSAGE, Direction.IN),
            ),
            seconds(
                story.first("shop", EventKind.ASSIGNMENT, Direction.INTERNAL, to="root"),
                story.first("shop", EventKind.MESSAGE, Direction.IN),
            ),
            seconds(
                story.first("answered", EventKind.ASSIGNMENT, Direction.INTERNAL, to="alice"),
                story.first("answered", EventKind.CALL, Direction.IN, status="ringing"),
            ),
        ]
    )
    assert o["queue_wait"]["count"] == 3
    assert o["queue_wait"]["median"] == pytest.approx(waits[1], abs=0.002)
    assert o["queue_wait"]["mean"] == pytest.approx(sum(waits) / 3, abs=0.002)
    assert o["handle"]["count"] == 2 and o["resolution"]["count"] == 2
    # Volumes: contacts in (3 chat messages incl. the one an hour ago, 1 shop, 2 calls).
    volumes = body["volumes"]
    assert {c["channel"]: (c["in"], c["out"]) for c in volumes["by_channel"]} == {
        "web": (3, 2),
        "shop": (1, 1),
        "phone": (2, 0),
    }
    assert (volumes["in"], volumes["out"]) == (6, 3)
    assert sum(h["in"] for h in volumes["by_hour"]) == 6 and len(volumes["by_hour"]) == 24
    assert body["calls"] == {
        "calls": 2,
        "answered": 1,
        "missed": 1,
        "by_channel": [{"channel": "phone", "calls": 2, "answered": 1, "missed": 1}],
    }
    groups = {g["key"]: g for g in body["by"]["groups"]}
    assert body["by"]["dimension"] == "channel"
    assert {k: g["conversations"] for k, g in groups.items()} == {"web": 2, "phone": 2, "shop": 1}
    assert groups["shop"]["first_response"]["mean"] == pytest.approx(shop_first, abs=0.002)
    assert body["business_hours_options"] == ["always", "never"]
    assert body["timezone"] == "UTC" and body["business_hours"] is None


async def test_grouping_and_filters(client: TestClient, story: Story) -> None:
    by_queue = await get(client, "/api/v1/reports/summary", by="queue")
    assert {g["key"]: g["conversations"] for g in by_queue["by"]["groups"]} == {
        "general": 3,
        "billing": 2,
    }
    by_agent = await get(client, "/api/v1/reports/summary", by="agent")
    assert [(g["key"], g["conversations"]) for g in by_agent["by"]["groups"]] == [
        ("alice", 2),
        (None, 2),  # nobody has them: after the named ones of the same size
        ("root", 1),
    ]
    by_tag = await get(client, "/api/v1/reports/summary", by="tag")
    assert {g["key"]: g["conversations"] for g in by_tag["by"]["groups"]} == {
        "vip": 1,
        "refund": 1,
    }
    assert by_tag["overall"]["conversations"] == 5  # untagged ones still count overall
    only = await get(client, "/api/v1/reports/summary", channel="phone")
    assert only["overall"]["conversations"] == 2
    assert [c["channel"] for c in only["volumes"]["by_channel"]] == ["phone"]
    assert (await get(client, "/api/v1/reports/summary", queue="billing"))["overall"][
        "conversations"
    ] == 2
    assert (await get(client, "/api/v1/reports/summary", agent="alice"))["overall"][
        "conversations"
    ] == 2
    tagged = await get(client, "/api/v1/reports/summary", tag="vip")
    assert tagged["overall"]["conversations"] == 1 and tagged["overall"]["resolved"] == 1
    assert tagged["filters"]["tag"] == "vip"
    nobody = await get(client, "/api/v1/reports/summary", agent="ghost")
    assert nobody["overall"]["conversations"] == 0
    assert nobody["overall"]["first_response"] == {
        "count": 0,
        "mean": None,
        "median": None,
        "p90": None,
    }


async def test_the_period_decides_which_conversations_count(
    client: TestClient, story: Story
) -> None:
    now = utcnow()
    recent = (now - timedelta(minutes=30)).isoformat()
    body = await get(client, "/api/v1/reports/summary", **{"from": recent})
    assert body["overall"]["conversations"] == 4  # "left" arrived an hour ago
    earlier = (now - timedelta(days=2)).isoformat()
    before = await get(client, "/api/v1/reports/summary", **{"to": recent, "from": earlier})
    assert before["overall"]["conversations"] == 1
    assert before["overall"]["abandoned_chats"] == 1
    assert before["volumes"]["in"] == 1
    tomorrow = (now + timedelta(days=1)).date().isoformat()
    empty = await get(client, "/api/v1/reports/summary", **{"from": tomorrow, "to": tomorrow})
    assert empty["overall"]["conversations"] == 0 and empty["volumes"]["in"] == 0


async def test_business_hours(client: TestClient, story: Story) -> None:
    always = await get(client, "/api/v1/reports/summary", business_hours="always")
    assert always["timezone"] == "Europe/Paris"  # the hours' own zone by default
    o = always["overall"]
    for metric in ("first_response", "queue_wait", "handle", "resolution"):
        assert o["business"][metric] == o[metric]  # open around the clock
    never = await get(client, "/api/v1/reports/summary", business_hours="never", tz="UTC")
    assert never["timezone"] == "UTC"
    assert never["overall"]["business"]["first_response"]["mean"] == 0.0
    assert never["overall"]["first_response"]["mean"] > 0  # calendar time still there
    for group in never["by"]["groups"]:
        assert "business" in group


async def test_reports_follow_new_events(client: TestClient, story: Story) -> None:
    before = await get(client, "/api/v1/reports/summary")
    t = Teller(client.app, story)
    await t.inbound("late", "visitor-late")
    await t.reply("late")
    after = await get(client, "/api/v1/reports/summary")
    assert after["overall"]["conversations"] == before["overall"]["conversations"] + 1
    assert after["overall"]["first_response"]["count"] == 4
    assert after["volumes"]["in"] == before["volumes"]["in"] + 1


async def test_sqlite_source_matches_the_generic_source_and_the_definition(
    client: TestClient, story: Story
) -> None:
    app = client.app
    store = app[STORE]
    sqlite_source = app[SOURCE]
    assert isinstance(sqlite_source, SqliteReportSource)
    generic = StoreReportSource(store)
    now = utcnow()
    q = Query(
        period=Period(to_us(now - timedelta(days=2)), to_us(now + timedelta(minutes=1))),
        tz=ZoneInfo("Europe/Paris"),
        hours=app[CONFIG].hours("always"),
        as_of=to_us(now),
    )
    for fn in (
        lambda v: summary_report(v, q, "channel"),
        lambda v: summary_report(v, q, "tag"),
        lambda v: timeseries_report(v, q, "first_response", "hour"),
        lambda v: timeseries_report(v, q, "missed_calls", "day"),
        lambda v: csv_report(v, q, "conversation"),
    ):
        assert await sqlite_source.report(q.period, fn) == await generic.report(q.period, fn)
    # And both equal the definition applied to each conversation's events.
    facts = []
    for conversation_id in story.conversations.values():
        page = await store.conversation_events(conversation_id, 200)
        f = conversation_facts(page.items)
        assert f is not None
        facts.append(f)
        # Agent and queue come from the timeline, and agree with the store's record.
        conv = await store.get_conversation(conversation_id)
        assert conv is not None and (f.agent, f.queue) == (conv.assignee, conv.queue)
    expected = summarize(sorted(facts, key=lambda f: f.arrived), as_of=q.as_of)
    got = await generic.report(q.period, lambda v: summary_report(v, q, "channel"))
    assert {k: v for k, v in got["overall"].items() if k != "business"} == expected

    # The live view's waiting conversations, both ways.
    def by_id(items: list[Any]) -> list[Any]:
        return sorted(items, key=lambda w: w.conversation_id)

    assert by_id(await sqlite_source.waiting()) == by_id(await generic.waiting())
    assert {w.conversation_id for w in await generic.waiting()} == {
        story.conversations["left"],
        story.conversations["missed"],
    }


async def test_an_interrupted_fold_starts_again_rather_than_count_twice(
    client: TestClient, story: Story, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await get(client, "/api/v1/reports/summary")
    t = Teller(client.app, story)
    await t.inbound("more", "visitor-more")
    await t.reply("more")
    monkeypatch.setattr(source_module, "FETCH_ROWS", 1)
    calls = 0
    real_add = source_module.Digest.add

    def failing_add(self: source_module.Digest, rows: Any) -> None:
        nonlocal calls
        calls += 1
        real_add(self, rows)
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(source_module.Digest, "add", failing_add)
    resp = await client.get("/api/v1/reports/summary", headers=auth(await token(client.app, "sam")))
    assert resp.status == 503
    monkeypatch.setattr(source_module.Digest, "add", real_add)
    again = await get(client, "/api/v1/reports/summary")
    assert again["overall"]["conversations"] == first["overall"]["conversations"] + 1
    assert again["volumes"]["in"] == first["volumes"]["in"] + 1


async def test_timeseries(client: TestClient, story: Story) -> None:
    today = utcnow().date()
    week = {"from": (today - timedelta(days=6)).isoformat(), "to": today.isoformat(), "tz": "UTC"}
    series = await get(client, "/api/v1/reports/timeseries", metric="conversations", **week)
    assert series["unit"] == "count" and series["interval"] == "day"
    assert [p["start"][:10] for p in series["points"]] == [
        (today - timedelta(days=6 - i)).isoformat() for i in range(7)
    ]
    assert sum(p["value"] for p in series["points"]) == 5
    assert series["points"][-1]["value"] >= 4
    hourly = await get(
        client,
        "/api/v1/reports/timeseries",
        metric="volume_in",
        interval="hour",
        **{"from": today.isoformat(), "to": today.isoformat(), "tz": "UTC"},
    )
    assert len(hourly["points"]) == 24
    first = await get(client, "/api/v1/reports/timeseries", metric="first_response", **week)
    assert first["unit"] == "seconds"
    last = first["points"][-1]
    assert last["count"] >= 2 and last["value"] == last["median"]
    empty_days = [p for p in first["points"][:-2] if p["count"] == 0]
    assert all(p["value"] is None for p in empty_days)
    missed = await get(client, "/api/v1/reports/timeseries", metric="missed_calls", **week)
    assert sum(p["value"] for p in missed["points"]) == 1


async def test_csv_export(client: TestClient, story: Story) -> None:
    resp = await client.get(
        "/api/v1/reports/export.csv",
        params={"business_hours": "always"},
        headers=auth(await token(client.app, "root")),
    )
    assert resp.status == 200
    assert resp.content_type == "text/csv"
    assert 'attachment; filename="hub-conversations-' in resp.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 5
    by_id = {r["conversation_id"]: r for r in rows}
    chat = by_id[story.conversations["chat"]]
    assert chat["channel"] == "web" and chat["queue"] == "general" and chat["agent"] == "alice"
    assert chat["tags"] == "vip;refund"
    assert chat["next_responses"] == "1" and chat["abandoned"] == "0"
    assert float(chat["first_response_seconds"]) == float(chat["business_first_response_seconds"])
    assert by_id[story.conversations["left"]]["abandoned"] == "1"
    assert by_id[story.conversations["missed"]]["abandoned"] == ""  # not a chat
    grouped = await get(client, "/api/v1/reports/export.csv", group="queue")
    lines = list(csv.reader(io.StringIO(grouped)))
    assert lines[0][:2] == ["queue", "conversations"]
    assert [(line[0], line[1]) for line in lines[1:]] == [
        ("(all)", "5"),
        ("general", "3"),
        ("billing", "2"),
    ]


async def test_csv_cells_cannot_become_formulas(client: TestClient, story: Story) -> None:
    await client.app[STORE].set_conversation_tags(story.conversations["shop"], ("=HYPERLINK(1)",))
    text = await get(client, "/api/v1/reports/export.csv")
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["channel"] == "shop")
    assert row["tags"] == "'=HYPERLINK(1)"


async def test_live_queues(client: TestClient, story: Story) -> None:
    body = await get(client, "/api/v1/reports/queues")
    queues = {q["queue"]: q for q in body["queues"]}
    assert queues["general"]["waiting"] == 1
    assert queues["general"]["oldest_conversation_id"] == story.conversations["left"]
    assert queues["billing"]["waiting"] == 1
    assert queues["billing"]["oldest_conversation_id"] == story.conversations["missed"]
    assert 0 <= queues["general"]["longest_wait_seconds"] < 60
    assert body["agents"] == {"online": 0, "away": 0, "offline": 3}
    # An agent switching online shows at once; a resolved conversation stops waiting.
    resp = await client.put(
        "/api/v1/me/presence",
        json={"presence": "online"},
        headers=auth(await token(client.app, "alice")),
    )
    assert resp.status == 200
    await client.app[STORE].set_status(
        story.conversations["left"], ConversationStatus.RESOLVED, "agent:sam"
    )
    body = await get(client, "/api/v1/reports/queues", who="root")
    queues = {q["queue"]: q for q in body["queues"]}
    assert queues["general"]["waiting"] == 0 and queues["general"]["longest_wait_seconds"] is None
    assert body["agents"]["online"] == 1
    assert {a["id"]: a["presence"] for a in body["agent_list"]}["alice"] == "online"


# --- the page -------------------------------------------------------------------------------


async def test_the_page_and_its_files(client: TestClient) -> None:
    page = await client.get("/inbox/reports")
    assert page.status == 200
    assert page.headers["Content-Security-Policy"] == PAGE_CSP
    assert page.headers["X-Frame-Options"] == "DENY"
    assert 'src="/inbox/reports/static/reports.js"' in await page.text()
    for name, kind in (("reports.js", "text/javascript"), ("reports.css", "text/css")):
        resp = await client.get(f"/inbox/reports/static/{name}")
        assert resp.status == 200 and resp.content_type == kind
        assert resp.headers["Content-Security-Policy"] == PAGE_CSP
    for name in ("reports.html", "..%2Fapi.py", "api.py", "x.js"):
        assert (await client.get(f"/inbox/reports/static/{name}")).status == 404


def test_the_openapi_document_lists_what_the_api_accepts() -> None:
    assert REPORT_METRICS == reports_api.TIMESERIES
    assert REPORT_DIMENSIONS == reports_api.DIMENSIONS


def test_dates_are_whole_local_days() -> None:
    tz = ZoneInfo("America/New_York")
    start = reports_api._instant("from", "2025-03-09", tz, end=False)
    end = reports_api._instant("to", "2025-03-09", tz, end=True)
    assert (start.hour, end.hour) == (5, 4)  # midnight EST, then midnight EDT (in UTC)
    assert end - start == timedelta(hours=23)
    assert start.tzinfo is UTC and date(2025, 3, 9) == start.date()
