// The reports page. Data comes from /api/v1/reports/* with the inbox's bearer token
// (sessionStorage, this tab); charts are inline SVG drawn here. The inbox's rule holds:
// data becomes text nodes or attribute values, never markup.

import { api, ApiError, qs, session, setUnauthorizedHandler } from "/inbox/static/api.js";
import { $, clear, h } from "/inbox/static/dom.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const LIVE_EVERY_MS = 5000;
const COUNT_METRICS = new Set([
  "conversations", "abandoned_chats", "volume_in", "volume_out", "missed_calls",
]);
const DURATIONS = [
  ["first_response", "First response"],
  ["next_response", "Next response"],
  ["queue_wait", "Time in queue"],
  ["handle", "Handle time"],
  ["resolution", "Resolution"],
];

let liveTimer = null;
let hoursLoaded = false;

// --- formatting ---------------------------------------------------------------------------

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const count = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());
const browserZone = () => Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";

function isoDate(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

// --- SVG ----------------------------------------------------------------------------------

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return el;
}

const W = 720;
const H = 220;
const PAD = { left: 64, right: 12, top: 12, bottom: 28 };

function yAxis(svg, max, format) {
  const inner = H - PAD.top - PAD.bottom;
  for (const frac of [0, 0.5, 1]) {
    const y = PAD.top + inner * (1 - frac);
    svg.append(s("line", { class: frac ? "grid" : "axis", x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }));
    svg.append(s("text", { class: "label", x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, format(max * frac)));
  }
}

function emptyChart(container, message) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": 0 });
  svg.append(s("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, message));
  clear(container).append(svg);
}

/** A line chart of series.points[].value (null: no value that bucket, a gap). */
export function lineChart(container, series) {
  const points = series.points;
  const values = points.map((p) => p.value);
  const present = values.filter((v) => v !== null && v !== undefined);
  if (!points.length) return emptyChart(container, "No data in this period");
  const format = series.unit === "count" ? count : duration;
  const max = Math.max(1, ...present);
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`,
    "data-points": points.length,
    "data-metric": series.metric,
  });
  yAxis(svg, max, format);
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (points.length === 1 ? innerW / 2 : (innerW * i) / (points.length - 1));
  const y = (v) => PAD.top + innerH * (1 - v / max);
  let d = "";
  let pen = "M";
  values.forEach((v, i) => {
    if (v === null || v === undefined) {
      pen = "M";
      return;
    }
    d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
    pen = "L";
  });
  svg.append(s("path", { class: "series", d: d.trim() || "M0,0" }));
  const label = new Intl.DateTimeFormat(undefined, {
    timeZone: series.timezone,
    month: "short",
    day: "numeric",
    ...(series.interval === "hour" ? { hour: "2-digit" } : {}),
  });
  points.forEach((p, i) => {
    if (p.value === null || p.value === undefined) return;
    const when = label.format(new Date(p.start));
    svg.append(
      s("circle", { class: "point", cx: x(i).toFixed(1), cy: y(p.value).toFixed(1), r: 3, "data-value": p.value },
        s("title", {}, `${when}: ${format(p.value)}`)),
    );
  });
  for (const i of [...new Set([0, Math.floor((points.length - 1) / 2), points.length - 1])]) {
    const anchor = i === 0 ? "start" : i === points.length - 1 ? "end" : "middle";
    svg.append(
      s("text", { class: "label", x: x(i), y: H - 8, "text-anchor": anchor }, label.format(new Date(points[i].start))),
    );
  }
  clear(container).append(svg);
}

/** Grouped bars: rows of {label, in, out}. */
export function barChart(container, rows) {
  if (!rows.length) return emptyChart(container, "No data in this period");
  const max = Math.max(1, ...rows.flatMap((r) => [r.in, r.out]));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": rows.length });
  yAxis(svg, max, count);
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const slot = innerW / rows.length;
  const bar = Math.max(1, slot * 0.4);
  const every = Math.ceil(rows.length / 12);
  rows.forEach((r, i) => {
    const x0 = PAD.left + slot * i + slot * 0.1;
    for (const [kind, value, dx] of [["in", r.in, 0], ["out", r.out, bar]]) {
      const height = (innerH * value) / max;
      svg.append(
        s("rect", {
          class: `bar-${kind}`, x: (x0 + dx).toFixed(1), y: (PAD.top + innerH - height).toFixed(1),
          width: bar.toFixed(1), height: height.toFixed(1), "data-value": value,
        }, s("title", {}, `${r.label}: ${count(value)} ${kind}`)),
      );
    }
    if (i % every === 0) {
      svg.append(s("text", { class: "label", x: x0 + bar, y: H - 8, "text-anchor": "middle" }, r.label));
    }
  });
  clear(container).append(svg);
}

// --- rendering ----------------------------------------------------------------------------

function kpi(label, value, note) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, value, note ? h("small", {}, note) : null));
}

function renderKpis(summary) {
  const o = summary.overall;
  const business = o.business || null;
  const list = clear($("kpis"));
  list.append(kpi("Conversations", count(o.conversations), `${count(o.resolved)} resolved`));
  for (const [key, label] of DURATIONS) {
    const figure = business ? business[key] : o[key];
    const note = business ? "median, business hours" : `median · mean ${duration(figure.mean)}`;
    list.append(kpi(label, duration(figure.median), note));
  }
  list.append(kpi("Abandoned chats", count(o.abandoned_chats), `of ${count(o.webchats)} chats`));
  list.append(kpi("Missed calls", count(summary.calls.missed), `of ${count(summary.calls.calls)} calls`));
  list.append(kpi("Volume", `${count(summary.volumes.in)} in`, `${count(summary.volumes.out)} out`));
  const from = new Date(summary.from).toLocaleString(undefined, { timeZone: summary.timezone });
  const to = new Date(summary.to).toLocaleString(undefined, { timeZone: summary.timezone });
  $("period").textContent = `${from} – ${to} (${summary.timezone})`;
}

function table(el, head, rows) {
  clear(el).append(
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => (i ? h("td", {}, c) : h("th", { scope: "row" }, c)))))),
  );
}

function renderGroups(by, business) {
  const suffix = business ? " (median, business hours)" : " (median)";
  const dimension = by.dimension.charAt(0).toUpperCase() + by.dimension.slice(1);
  const head = [dimension, "Conversations", ...DURATIONS.map(([, l]) => l + suffix), "Abandoned"];
  const rows = by.groups.map((g) => [
    g.key === null ? "(none)" : g.key,
    count(g.conversations),
    ...DURATIONS.map(([key]) => duration((business && g.business ? g.business[key] : g[key]).median)),
    count(g.abandoned_chats),
  ]);
  table($("groups-table"), head, rows);
}

function renderVolumes(volumes) {
  barChart($("chart-hours"), volumes.by_hour.map((r) => ({ label: String(r.hour).padStart(2, "0"), in: r.in, out: r.out })));
  barChart($("chart-channels"), volumes.by_channel.map((r) => ({ label: r.channel, in: r.in, out: r.out })));
  table($("channel-table"), ["Channel", "In", "Out"], volumes.by_channel.map((r) => [r.channel, count(r.in), count(r.out)]));
}

/** Channels with data but no longer configured (history) still get a filter option. */
function addChannels(rows) {
  const select = $("f-channel");
  const known = new Set([...select.options].map((o) => o.value));
  for (const row of rows) {
    if (!known.has(row.channel)) select.append(h("option", { value: row.channel }, row.channel));
  }
}

function fillHours(names) {
  if (hoursLoaded) return;
  hoursLoaded = true;
  const select = $("f-hours");
  for (const name of names || []) select.append(h("option", { value: name }, name));
}

// --- loading ------------------------------------------------------------------------------

function filters() {
  const hours = $("f-hours").value;
  return {
    from: $("f-from").value,
    to: $("f-to").value,
    channel: $("f-channel").value,
    queue: $("f-queue").value,
    agent: $("f-agent").value,
    tag: $("f-tag").value.trim(),
    business_hours: hours,
    tz: hours ? "" : browserZone(),
  };
}

function showError(error) {
  if (error instanceof ApiError && error.status === 403) {
    $("content").hidden = true;
    $("denied").hidden = false;
    $("denied").textContent = "Reports need the supervisor or admin role.";
    stopLive();
    return;
  }
  $("report-error").textContent = error.message || String(error);
}

async function loadSeries() {
  const params = { ...filters(), metric: $("f-metric").value, interval: $("f-interval").value };
  try {
    const series = await api("GET", `/reports/timeseries${qs(params)}`);
    lineChart($("chart-series"), series);
  } catch (error) {
    showError(error);
  }
}

async function loadSummary() {
  try {
    const summary = await api("GET", `/reports/summary${qs({ ...filters(), by: $("f-by").value })}`);
    $("report-error").textContent = "";
    fillHours(summary.business_hours_options);
    addChannels(summary.volumes.by_channel);
    renderKpis(summary);
    renderVolumes(summary.volumes);
    renderGroups(summary.by, Boolean(summary.business_hours));
  } catch (error) {
    showError(error);
  }
}

async function refresh(event) {
  if (event) event.preventDefault();
  await Promise.all([loadSummary(), loadSeries()]);
}

async function exportCsv() {
  const button = $("export");
  button.disabled = true;
  const group = $("f-export").value === "group" ? $("f-by").value : "conversation";
  try {
    const response = await fetch(`/api/v1/reports/export.csv${qs({ ...filters(), group })}`, {
      headers: { Authorization: `Bearer ${session.token}` },
      cache: "no-store",
    });
    if (!response.ok) {
      let message = response.statusText;
      try {
        message = (await response.json()).error || message;
      } catch {
        // not JSON: keep the status text
      }
      throw new ApiError(response.status, message);
    }
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || "report.csv";
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

async function loadLive() {
  if (document.hidden) return;
  try {
    const live = await api("GET", "/reports/queues");
    table(
      $("queue-table"),
      ["Queue", "Waiting", "Longest wait"],
      live.queues.map((q) => [q.queue === null ? "(no queue)" : q.queue, count(q.waiting), duration(q.longest_wait_seconds)]),
    );
    const presence = clear($("presence"));
    presence.append(kpi("Online", count(live.agents.online)));
    presence.append(kpi("Away", count(live.agents.away)));
    presence.append(kpi("Offline", count(live.agents.offline)));
    $("live-updated").textContent = `updated ${new Date(live.as_of).toLocaleTimeString()}`;
  } catch (error) {
    showError(error);
  }
}

function startLive() {
  stopLive();
  loadLive();
  liveTimer = setInterval(loadLive, LIVE_EVERY_MS);
}

function stopLive() {
  if (liveTimer !== null) clearInterval(liveTimer);
  liveTimer = null;
}

async function loadOptions() {
  const fill = (id, items, value, label) => {
    const select = $(id);
    for (const item of items) select.append(h("option", { value: value(item) }, label(item)));
  };
  const [channels, queues, agents] = await Promise.all([
    api("GET", "/channels"), api("GET", "/queues"), api("GET", "/agents"),
  ]);
  fill("f-channel", channels.items, (c) => c.name, (c) => c.name);
  fill("f-queue", queues.items, (q) => q.name, (q) => q.name);
  fill("f-agent", agents.items, (a) => a.id, (a) => a.name);
}

// --- signing in ---------------------------------------------------------------------------

function showSignIn(message) {
  stopLive();
  session.clear();
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

async function signIn(event) {
  event.preventDefault();
  const login = $("login").value.trim();
  const password = $("password").value;
  if (!login || !password) {
    $("signin-error").textContent = "Enter your login and password.";
    return;
  }
  try {
    const data = await api("POST", "/auth/login", { login, password });
    session.save(data.token, data.agent || null);
    $("password").value = "";
    await enter();
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
}

async function enter() {
  $("signin").hidden = true;
  $("app").hidden = false;
  const agent = session.agent;
  $("me-name").textContent = agent ? agent.name : "";
  if (agent && agent.role === "agent") {
    showError(new ApiError(403, "forbidden"));
    return;
  }
  const today = new Date();
  const weekAgo = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 6);
  if (!$("f-from").value) $("f-from").value = isoDate(weekAgo);
  if (!$("f-to").value) $("f-to").value = isoDate(today);
  try {
    await loadOptions();
  } catch (error) {
    showError(error);
  }
  await refresh();
  startLive();
}

function start() {
  setUnauthorizedHandler(() => showSignIn("Your session has ended. Sign in again."));
  $("signin-form").addEventListener("submit", signIn);
  $("filters").addEventListener("submit", refresh);
  $("f-metric").addEventListener("change", loadSeries);
  $("f-interval").addEventListener("change", loadSeries);
  $("f-by").addEventListener("change", loadSummary);
  $("export").addEventListener("click", exportCsv);
  if (session.token) enter();
  else showSignIn("");
}

start();
