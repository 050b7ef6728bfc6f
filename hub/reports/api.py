"""The reports API (/api/v1/reports/...) and the reports page (/inbox/reports).

Supervisors and admins only. Every report is recomputed from the timeline digest (see
hub/reports/source.py) for the period asked, so nothing here is stored.

Query parameters shared by the reports (all optional; any other name is a 400):
- from, to: a date (YYYY-MM-DD, a whole local day; `to` included) or an ISO 8601 time
  with a zone (`to` excluded). Default: the 7 days up to now. At most 366 days.
- tz: an IANA zone for dates, days and hours (default: the business hours' zone, or UTC).
- channel, queue, agent, tag: only conversations that arrived on that channel / are in
  that queue / are assigned to that agent / carry that tag. Volumes and missed calls
  are counts of events, not conversations: only `channel` applies to them.
- business_hours: the name of a `business_hours` entry of the configuration; durations
  are then also given in business hours.
docs/reports.md defines every figure.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import structlog
from aiohttp import web

from hub.app import CONFIG, STORE
from hub.config import BusinessHours, Config
from hub.inbox.auth import requires
from hub.inbox.inputs import fail
from hub.inbox.page import CACHE_STATIC, COMMON_HEADERS, CONTENT_TYPES, PAGE_CSP
from hub.inbox.presence import PRESENCE_KEY
from hub.model import Presence, Role, iso, utcnow
from hub.reports.metrics import (
    ABANDON_AFTER_US,
    DURATIONS,
    HOUR_US,
    US,
    WEBCHAT,
    CallFacts,
    ConversationFacts,
    Durations,
    arrival_slices,
    bucket_starts,
    count_between,
    from_us,
    local_hour,
    stats,
    summarize_groups,
    to_us,
    values_of,
)
from hub.reports.source import Period, PeriodView, ReportSource, source_for

log = structlog.get_logger(__name__)

SOURCE = web.AppKey("reports_source", ReportSource)
STATIC_DIR = Path(__file__).parent / "static"

MAX_DAYS = 366
DEFAULT_DAYS = 7
# Far enough either way for any real period; keeps date arithmetic off the edges.
MIN_YEAR, MAX_YEAR = 1970, 9000
DIMENSIONS = ("channel", "queue", "agent", "tag")
INTERVALS = ("hour", "day")
COUNTS = ("conversations", "abandoned_chats", "volume_in", "volume_out", "missed_calls")
TIMESERIES = (*COUNTS, *DURATIONS)
CSV_GROUPS = ("conversation", *DIMENSIONS)
COMMON_PARAMS = frozenset(
    {"from", "to", "tz", "channel", "queue", "agent", "tag", "business_hours"}
)

routes = web.RouteTableDef()


# --- what the client asked ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    period: Period
    tz: ZoneInfo
    channel: str | None = None
    queue: str | None = None
    agent: str | None = None
    tag: str | None = None
    hours: BusinessHours | None = None
    as_of: int = 0  # "now" for abandonment, in us

    def echo(self) -> dict[str, Any]:
        return {
            "from": iso(from_us(self.period.start)),
            "to": iso(from_us(self.period.end)),
            "timezone": self.tz.key,
            "business_hours": self.hours.name if self.hours else None,
            "filters": {
                "channel": self.channel,
                "queue": self.queue,
                "agent": self.agent,
                "tag": self.tag,
            },
            "as_of": iso(from_us(self.as_of)),
        }


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    # The names the configuration accepts too (not "posix/..." or "right/..." copies).
    return frozenset(available_timezones())


def _zone(raw: str) -> ZoneInfo:
    if len(raw) > 64 or raw not in _zones():
        fail(400, f"tz: unknown time zone {raw[:64]!r} (an IANA name such as Europe/Paris)")
    return ZoneInfo(raw)


def _instant(name: str, raw: str, tz: ZoneInfo, *, end: bool) -> datetime:
    """A date is a whole local day (`to` includes it); a time must carry its zone."""
    if len(raw) > 64:
        fail(400, f"{name}: too long")
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw) + timedelta(days=1 if end else 0)
            value = datetime(day.year, day.month, day.day, tzinfo=tz)
        else:
            value = datetime.fromisoformat(raw)
            if value.tzinfo is None:
                fail(400, f"{name}: give a zone (Z or +HH:MM), or a plain date")
        instant = value.astimezone(UTC)
    except (ValueError, OverflowError):
        fail(400, f"{name}: not a date (YYYY-MM-DD) or an ISO 8601 time: {raw!r}")
    if not MIN_YEAR <= instant.year <= MAX_YEAR:
        fail(400, f"{name}: a year between {MIN_YEAR} and {MAX_YEAR}")
    return instant


def _name(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > 200 or not value.isprintable():
        fail(400, f"{name}: at most 200 printable characters")
    return value


def _choice(request: web.Request, name: str, choices: Sequence[str], default: str) -> str:
    value = request.query.get(name) or default
    if value not in choices:
        fail(400, f"{name}: one of {', '.join(choices)}")
    return value


def parse_query(request: web.Request, extra: frozenset[str] = frozenset()) -> Query:
    unknown = sorted(set(request.query) - COMMON_PARAMS - extra)
    if unknown:
        fail(400, f"unknown query parameter(s): {', '.join(unknown)[:200]}")
    config: Config = request.app[CONFIG]
    hours = None
    if (hours_name := _name(request, "business_hours")) is not None:
        try:
            hours = config.hours(hours_name)
        except KeyError:
            known = ", ".join(h.name for h in config.business_hours) or "none are configured"
            fail(400, f"business_hours: unknown {hours_name!r} ({known})")
    tz_name = _name(request, "tz")
    if tz_name is not None:
        tz = _zone(tz_name)
    else:
        tz = ZoneInfo(hours.timezone) if hours is not None else ZoneInfo("UTC")
    now = utcnow()
    raw_to, raw_from = _name(request, "to"), _name(request, "from")
    end = _instant("to", raw_to, tz, end=True) if raw_to else now
    default_start = end - timedelta(days=DEFAULT_DAYS)
    start = _instant("from", raw_from, tz, end=False) if raw_from else default_start
    if start >= end:
        fail(400, "from: must be before to")
    if end - start > timedelta(days=MAX_DAYS):
        fail(400, f"the period is longer than {MAX_DAYS} days")
    return Query(
        period=Period(to_us(start), to_us(end)),
        tz=tz,
        channel=_name(request, "channel"),
        queue=_name(request, "queue"),
        agent=_name(request, "agent"),
        tag=_name(request, "tag"),
        hours=hours,
        as_of=to_us(now),
    )


# --- the reports (run on the source's thread, over a PeriodView) ---------------------------


def selected(view: PeriodView, q: Query) -> list[ConversationFacts]:
    """The period's conversations that pass the filters, oldest arrival first."""
    facts = view.facts()
    if q.channel is not None:
        facts = [f for f in facts if f.channel == q.channel]
    if q.queue is not None:
        facts = [f for f in facts if f.queue == q.queue]
    if q.agent is not None:
        facts = [f for f in facts if f.agent == q.agent]
    if q.tag is not None:
        tags = view.tags
        facts = [f for f in facts if q.tag in tags.get(f.conversation_id, ())]
    return facts


def _business(view: PeriodView, q: Query, facts: list[ConversationFacts]) -> list[Durations] | None:
    return None if q.hours is None else view.digest.business(facts, q.hours)


def _keys(view: PeriodView, by: str) -> Callable[[ConversationFacts], Sequence[str | None]]:
    if by == "channel":
        return lambda f: (f.channel,)
    if by == "queue":
        return lambda f: (f.queue,)
    if by == "agent":
        return lambda f: (f.agent,)
    tags = view.tags
    return lambda f: tags.get(f.conversation_id, ())


def _channel_times(view: PeriodView, q: Query) -> list[tuple[str, Sequence[int], Sequence[int]]]:
    return [
        (channel, times_in, times_out)
        for channel, (times_in, times_out) in sorted(view.digest.times().items())
        if q.channel is None or channel == q.channel
    ]


def volumes(view: PeriodView, q: Query) -> dict[str, Any]:
    """Contacts in and messages out per channel, and per local hour of the day."""
    lo, hi = q.period.start, q.period.end
    columns = _channel_times(view, q)
    by_channel = [
        {"channel": ch, "in": count_between(t_in, lo, hi), "out": count_between(t_out, lo, hi)}
        for ch, t_in, t_out in columns
    ]
    by_hour = [{"hour": h, "in": 0, "out": 0} for h in range(24)]
    starts = bucket_starts(q.tz, lo, hi, "hour")
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else hi
        slot = by_hour[local_hour(q.tz, start)]
        for _, t_in, t_out in columns:
            slot["in"] += count_between(t_in, start, end)
            slot["out"] += count_between(t_out, start, end)
    return {
        "in": sum(c["in"] for c in by_channel),
        "out": sum(c["out"] for c in by_channel),
        "by_channel": by_channel,
        "by_hour": by_hour,
    }


def missed_calls_in(view: PeriodView, q: Query) -> list[CallFacts]:
    """The period's inbound calls (by their first event), oldest first."""
    return [c for c in view.digest.calls(q.period) if q.channel is None or c.channel == q.channel]


def missed_calls(view: PeriodView, q: Query) -> dict[str, Any]:
    calls = missed_calls_in(view, q)
    by_channel: dict[str, list[int]] = {}
    for call in calls:
        tally = by_channel.setdefault(call.channel, [0, 0, 0])
        tally[0] += 1
        tally[1] += call.answered
        tally[2] += call.missed
    return {
        "calls": len(calls),
        "answered": sum(t[1] for t in by_channel.values()),
        "missed": sum(t[2] for t in by_channel.values()),
        "by_channel": [
            {"channel": ch, "calls": t[0], "answered": t[1], "missed": t[2]}
            for ch, t in sorted(by_channel.items())
        ],
    }


def summary_report(view: PeriodView, q: Query, by: str) -> dict[str, Any]:
    facts = selected(view, q)
    business = _business(view, q, facts)
    overall, groups = summarize_groups(
        facts, _keys(view, by), as_of=q.as_of, business=business, partition=by != "tag"
    )
    return {
        **q.echo(),
        "overall": overall,
        "by": {"dimension": by, "groups": groups},
        "volumes": volumes(view, q),
        "calls": missed_calls(view, q),
    }


def timeseries_report(view: PeriodView, q: Query, metric: str, interval: str) -> dict[str, Any]:
    lo, hi = q.period.start, q.period.end
    starts = bucket_starts(q.tz, lo, hi, interval)
    ends = [*starts[1:], hi]
    points: list[dict[str, Any]] = []
    if metric in ("volume_in", "volume_out"):
        column = 1 if metric == "volume_in" else 2
        times = [c[column] for c in _channel_times(view, q)]
        for start, end in zip(starts, ends, strict=True):
            points.append({"value": sum(count_between(t, start, end) for t in times)})
    elif metric == "missed_calls":
        calls = missed_calls_in(view, q)
        call_starts = [c.started for c in calls]
        for start, end in zip(starts, ends, strict=True):
            members = calls[bisect_left(call_starts, start) : bisect_left(call_starts, end)]
            points.append({"value": sum(1 for c in members if c.missed)})
    else:
        facts = selected(view, q)
        business = _business(view, q, facts)
        for part in arrival_slices(facts, starts, hi):
            sub = facts[part]
            if metric == "conversations":
                points.append({"value": len(sub)})
            elif metric == "abandoned_chats":
                points.append({"value": sum(1 for f in sub if f.abandoned(q.as_of))})
            else:
                durations = business[part] if business is not None else [f.calendar for f in sub]
                s = stats(values_of(durations, metric)).to_dict()
                points.append({"value": s["median"], **s})
    for point, start in zip(points, starts, strict=True):
        point["start"] = iso(from_us(start))
    return {
        **q.echo(),
        "metric": metric,
        "interval": interval,
        "unit": "count" if metric in COUNTS else "seconds",
        "business": q.hours is not None and metric in DURATIONS,
        "points": points,
    }


def _cell(value: Any) -> Any:
    """Spreadsheets run a cell starting with = + - @ as a formula: quote such text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _measures(d: Durations) -> str:
    """CSV fields: first response, queue wait, handle, resolution, mean next response.
    One f-string: this runs for every row of an export of 100,000s of rows."""
    fr, nexts, qw, hd, rs = d
    mn = sum(nexts) / len(nexts) if nexts else None
    return (
        f"{'' if fr is None else f'{fr:.3f}'},{'' if qw is None else f'{qw:.3f}'},"
        f"{'' if hd is None else f'{hd:.3f}'},{'' if rs is None else f'{rs:.3f}'},"
        f"{'' if mn is None else f'{mn:.3f}'}"
    )


_MEASURES = ("first_response", "queue_wait", "handle", "resolution", "next_response_mean")


class _IsoTimes:
    """ISO 8601 UTC text of microsecond times, fast for rows sorted by time: the date
    and hour part is formatted once per hour, the rest by arithmetic."""

    def __init__(self) -> None:
        self._hour = -1
        self._prefix = ""

    def __call__(self, at: int) -> str:
        hour, rest = divmod(at, HOUR_US)
        if hour != self._hour:
            d = from_us(hour * HOUR_US)
            self._hour = hour
            self._prefix = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:"
        minutes, rest = divmod(rest, 60 * US)
        seconds, micros = divmod(rest, US)
        return f"{self._prefix}{minutes:02d}:{seconds:02d}.{micros:06d}Z"


class _Fields(dict[str, str]):
    """A text as one CSV field (quoted when it must be, defused against formulas),
    computed once per distinct text: rows repeat the same few channels, queues, agents."""

    def __call__(self, value: str) -> str:
        found = self.get(value)
        if found is None:
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow([_cell(value)])
            found = self[value] = out.getvalue()
        return found


def conversations_csv(view: PeriodView, q: Query) -> str:
    """One row per conversation of the period, with its own measurements.

    Rows are joined by hand rather than through csv.writer: every field is either a
    number, an id, a time, or a text escaped once by _Fields. At 100,000 rows this is
    the difference between well under a second and over it.
    """
    facts = selected(view, q)
    business = _business(view, q, facts)
    tags = view.tags
    head = ["conversation_id", "arrived_at", "channel", "queue", "agent", "tags"]
    head += [f"{m}_seconds" for m in _MEASURES]
    head += ["next_responses", "reopened", "abandoned"]
    if business is not None:
        head += [f"business_{m}_seconds" for m in _MEASURES]
    lines = [",".join(head)]
    iso_time, field = _IsoTimes(), _Fields()
    known = field.get  # a dict lookup first: most texts were escaped rows ago
    as_of, no_tags, abandon_after = q.as_of, (), ABANDON_AFTER_US
    for i, f in enumerate(facts):
        cid, calendar, channel = f.conversation_id, f.calendar, f.channel
        queue, agent = f.queue or "", f.agent or ""
        text_tags = ";".join(tags.get(cid, no_tags))
        if f.channel_type != WEBCHAT:
            abandoned = ""  # f.abandoned(as_of), inlined: one call less per row
        else:
            answered = f.turns[0][1] if f.turns else as_of
            abandoned = "1" if answered - f.last_contact >= abandon_after else "0"
        # An escaped text is never empty, so `or` falls through only for unseen texts.
        line = (
            f"{cid},{iso_time(f.arrived)},{known(channel) or field(channel)},"
            f"{(known(queue) or field(queue)) if queue else ''},"
            f"{(known(agent) or field(agent)) if agent else ''},"
            f"{(known(text_tags) or field(text_tags)) if text_tags else ''},"
            f"{_measures(calendar)},{len(calendar.next_responses)},{f.reopened},{abandoned}"
        )
        if business is not None:
            line += "," + _measures(business[i])
        lines.append(line)
    lines.append("")
    return "\r\n".join(lines)


def groups_csv(view: PeriodView, q: Query, by: str) -> str:
    """One row for everything, then one per group: the summary's figures."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    report = summary_report(view, q, by)
    head = [by, "conversations", "resolved", "reopened", "unanswered", "abandoned_chats"]
    for metric in DURATIONS:
        head += [f"{metric}_{s}" for s in ("count", "mean_s", "median_s", "p90_s")]
    writer.writerow(head)
    for g in [{**report["overall"], "key": "(all)"}, *report["by"]["groups"]]:
        row = [_cell("" if g["key"] is None else g["key"]), g["conversations"], g["resolved"]]
        row += [g["reopened"], g["unanswered"], g["abandoned_chats"]]
        for metric in DURATIONS:
            s = g[metric]
            row += [s["count"], _seconds(s["mean"]), _seconds(s["median"]), _seconds(s["p90"])]
        writer.writerow(row)
    return out.getvalue()


def csv_report(view: PeriodView, q: Query, group: str) -> str:
    return conversations_csv(view, q) if group == "conversation" else groups_csv(view, q, group)


# --- handlers -------------------------------------------------------------------------------


def _source(request: web.Request) -> ReportSource:
    return request.app[SOURCE]


@routes.get("/api/v1/reports/summary")
@requires(Role.SUPERVISOR)
async def summary(request: web.Request) -> web.Response:
    q = parse_query(request, frozenset({"by"}))
    by = _choice(request, "by", DIMENSIONS, "channel")
    body = await _source(request).report(q.period, lambda view: summary_report(view, q, by))
    # For the page's business hours picker.
    body["business_hours_options"] = [h.name for h in request.app[CONFIG].business_hours]
    return web.json_response(body)


@routes.get("/api/v1/reports/timeseries")
@requires(Role.SUPERVISOR)
async def timeseries(request: web.Request) -> web.Response:
    q = parse_query(request, frozenset({"metric", "interval"}))
    metric = _choice(request, "metric", TIMESERIES, "conversations")
    interval = _choice(request, "interval", INTERVALS, "day")
    body = await _source(request).report(
        q.period, lambda view: timeseries_report(view, q, metric, interval)
    )
    return web.json_response(body)


@routes.get("/api/v1/reports/export.csv")
@requires(Role.SUPERVISOR)
async def export_csv(request: web.Request) -> web.Response:
    q = parse_query(request, frozenset({"group"}))
    group = _choice(request, "group", CSV_GROUPS, "conversation")
    text = await _source(request).report(q.period, lambda view: csv_report(view, q, group))
    first = from_us(q.period.start).astimezone(q.tz).date().isoformat()
    last = from_us(q.period.end - 1).astimezone(q.tz).date().isoformat()
    return web.Response(
        text=text,
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="hub-{group}s-{first}-to-{last}.csv"',
            "Cache-Control": "no-store",
        },
    )


@routes.get("/api/v1/reports/queues")
@requires(Role.SUPERVISOR)
async def live_queues(request: web.Request) -> web.Response:
    """Now: conversations waiting per queue (open and unassigned), the longest wait,
    and agents per presence state."""
    if request.query:
        fail(400, f"unknown query parameter(s): {', '.join(sorted(request.query))[:200]}")
    config: Config = request.app[CONFIG]
    now = to_us(utcnow())
    waiting = await _source(request).waiting()
    queues: dict[str | None, list[Any]] = {q.name: [] for q in config.routing.queues}
    for w in waiting:
        queues.setdefault(w.queue, []).append(w)
    rows = []
    for name, items in queues.items():
        oldest = min(items, key=lambda w: w.since, default=None)
        rows.append(
            {
                "queue": name,
                "waiting": len(items),
                "longest_wait_seconds": None
                if oldest is None
                else round(max(now - oldest.since, 0) / US, 3),
                "oldest_conversation_id": oldest.conversation_id if oldest else None,
            }
        )
    rows.sort(key=lambda r: (-r["waiting"], r["queue"] is None, r["queue"] or ""))
    registry = request.app.get(PRESENCE_KEY)
    agents = []
    for agent in config.agents:
        presence = await registry.get(agent.id) if registry is not None else Presence.OFFLINE
        agents.append({"id": agent.id, "name": agent.name, "presence": presence.value})
    counts = {p.value: sum(1 for a in agents if a["presence"] == p.value) for p in Presence}
    return web.json_response(
        {"as_of": iso(from_us(now)), "queues": rows, "agents": counts, "agent_list": agents}
    )


# --- the page -------------------------------------------------------------------------------

_STATIC_NAME = re.compile(r"reports\.(?:js|css)")


def _file(path: Path) -> web.FileResponse:
    # The inbox's headers and policy: no inline script, nothing from other origins.
    headers = {
        **COMMON_HEADERS,
        "Content-Security-Policy": PAGE_CSP,
        "Cache-Control": CACHE_STATIC,
        "Content-Type": CONTENT_TYPES[path.suffix],
        "X-Frame-Options": "DENY",
    }
    return web.FileResponse(path, headers=headers)


async def reports_page(request: web.Request) -> web.StreamResponse:
    return _file(STATIC_DIR / "reports.html")


async def reports_static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if not _STATIC_NAME.fullmatch(name):
        raise web.HTTPNotFound(text="no such file")
    return _file(STATIC_DIR / name)


# --- wiring ---------------------------------------------------------------------------------


def install(app: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    app.router.add_routes(routes)
    app.router.add_get("/inbox/reports", reports_page)
    app.router.add_get("/inbox/reports/static/{name}", reports_static)
    return _reports_ctx


async def _reports_ctx(app: web.Application) -> AsyncIterator[None]:
    source = app.get(SOURCE) or source_for(app[STORE])
    app[SOURCE] = source
    await source.start()

    async def warm() -> None:
        # The first fold of a big timeline takes seconds, and so does counting open time
        # for every conversation: do both now, not in someone's first request.
        try:
            await source.warm(app[CONFIG].business_hours)
        except Exception:
            log.exception("reports.warm_failed")

    task = asyncio.create_task(warm(), name="reports-warm")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
