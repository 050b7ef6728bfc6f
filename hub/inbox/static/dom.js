// Tiny DOM helpers. The one rule of this page: data becomes text nodes or attribute
// values, never markup. There is deliberately no helper that parses HTML.

/**
 * h("li", {class: "x", dataset: {id}}, "text", child) -> element.
 * Strings become text nodes (so "<b>" shows as "<b>"); null/false children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (id) => document.getElementById(id);

export function clear(el) {
  el.replaceChildren();
  return el;
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
});

/** A <time> element for an ISO string, readable and machine-readable. */
export function timeEl(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  return h("time", { datetime: iso, title: date.toLocaleString() }, timeFormat.format(date));
}

/** "3 min ago" style age for the conversation list. */
export function age(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return "now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

/** Only plain web links may become an href; anything else (javascript:, data:) stays text. */
export function safeHref(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}
