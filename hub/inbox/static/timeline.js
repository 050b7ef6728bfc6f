// Rendering of timeline events. Every piece of customer or agent data goes in as text
// (dom.h makes text nodes); the one exception is email HTML, which is sanitized by the
// hub and still only ever shown inside a sandboxed frame without scripts.

import { h, safeHref, timeEl } from "./dom.js";

const DIRECTION_LABEL = { in: "Received", out: "Sent", internal: "Internal" };
const KIND_LABEL = { call: "Call", voicemail: "Voicemail", note: "Private note" };
const SYSTEM_KINDS = new Set(["status", "assignment", "merge", "delivery"]);

/**
 * One <li> for an event. ctx: {authorName(author) -> string, conversationId}.
 */
export function renderEvent(ev, ctx) {
  const classes = ["event", `dir-${ev.direction}`, `kind-${ev.kind}`];
  if (ctx.conversationId && ev.conversation_id && ev.conversation_id !== ctx.conversationId) {
    classes.push("other-conv");
  }
  if (SYSTEM_KINDS.has(ev.kind)) {
    return h(
      "li",
      { class: [...classes, "system"].join(" "), dataset: { id: ev.id } },
      h("span", { class: "system-text" }, systemText(ev, ctx)),
      " ",
      timeEl(ev.created_at),
    );
  }
  return h(
    "li",
    { class: classes.join(" "), dataset: { id: ev.id } },
    h(
      "div",
      { class: "event-head" },
      channelBadge(ev),
      h("span", { class: "direction" }, DIRECTION_LABEL[ev.direction] || ev.direction),
      KIND_LABEL[ev.kind] ? h("span", { class: "kind-label" }, KIND_LABEL[ev.kind]) : null,
      h("span", { class: "author" }, ctx.authorName(ev.author)),
      timeEl(ev.created_at),
      ev.conversation_id !== ctx.conversationId && ev.conversation_id
        ? h("span", { class: "muted" }, "(other conversation)")
        : null,
    ),
    // An email's text part is the same message as its HTML: show one of them.
    ev.html ? emailView(ev.html) : ev.text ? h("p", { class: "text" }, ev.text) : null,
    callFacts(ev),
    attachmentsList(ev.attachments),
    ev.direction === "out" && ev.kind === "message" ? deliveryState(ev) : null,
  );
}

export function channelBadge(ev) {
  if (!ev.channel) return h("span", { class: "badge badge-internal" }, "internal");
  const type = ev.channel_type || "";
  const label = type && type !== ev.channel ? `${ev.channel} · ${type}` : ev.channel;
  return h("span", { class: `badge badge-${type || "other"}`, title: `Channel ${label}` }, label);
}

function systemText(ev, ctx) {
  const by = ev.author ? ` by ${ctx.authorName(ev.author)}` : "";
  const data = ev.data || {};
  switch (ev.kind) {
    case "status": {
      let text = `Status ${data.from || "?"} → ${data.to || "?"}`;
      if (data.until) text += ` until ${new Date(data.until).toLocaleString()}`;
      if (data.reason) text += ` (${data.reason})`;
      return text + by;
    }
    case "assignment": {
      const to = data.to ? `Assigned to ${ctx.agentName(data.to)}` : "Unassigned";
      return to + (data.queue ? ` (queue ${data.queue})` : "") + by;
    }
    case "merge":
      return (data.undo ? "Customer merge undone" : "Customer merged") + by;
    default:
      return `${ev.kind}${ev.text ? `: ${ev.text}` : ""}${by}`;
  }
}

function callFacts(ev) {
  if (ev.kind !== "call" && ev.kind !== "voicemail") return null;
  const data = ev.data || {};
  const parts = [];
  if (typeof data.duration === "number") parts.push(`${Math.round(data.duration)} s`);
  if (typeof data.status === "string") parts.push(data.status);
  return parts.length ? h("p", { class: "muted" }, parts.join(" · ")) : null;
}

function attachmentsList(attachments) {
  if (!attachments || !attachments.length) return null;
  return h(
    "ul",
    { class: "attachments", "aria-label": "Attachments" },
    attachments.map((att) => {
      const label = `${att.filename || "attachment"} (${formatSize(att.size)}, ${att.content_type || "?"})`;
      const href = safeHref(att.url);
      return h(
        "li",
        {},
        href ? h("a", { href, target: "_blank", rel: "noopener noreferrer" }, label) : label,
      );
    }),
  );
}

function formatSize(size) {
  if (typeof size !== "number") return "? B";
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

function deliveryState(ev) {
  const state = ev.delivery_state || "queued";
  let text = state;
  if (ev.delivery_error) {
    text = state === "queued" ? `queued, retrying: ${ev.delivery_error}` : `${state}: ${ev.delivery_error}`;
  }
  return h("p", { class: `delivery state-${state}` }, h("span", { class: "visually-hidden" }, "Delivery: "), text);
}

// --- email HTML ---------------------------------------------------------------------

// A cheap hint that the message references remote resources; a false positive only
// costs an unnecessary button.
const REMOTE_HINT = /(?:src|srcset|background|poster)\s*=\s*["']?\s*(?:https?:)?\/\/|url\(\s*["']?\s*(?:https?:)?\/\//i;

function srcdocFor(html) {
  // base target: links open in a new tab (sandboxed too) instead of inside the frame.
  return `<!doctype html><meta charset="utf-8"><base target="_blank">${html}`;
}

/**
 * The email in `<iframe sandbox srcdoc>`: no scripts, opaque origin, and the page's
 * CSP (inherited by srcdoc documents) blocks remote images.
 */
export function emailView(html) {
  const frame = h("iframe", {
    class: "email-frame",
    title: "Email message",
    sandbox: "allow-popups",
    referrerpolicy: "no-referrer",
  });
  frame.srcdoc = srcdocFor(html);
  const box = h("div", { class: "email" }, frame);
  if (REMOTE_HINT.test(html)) {
    const button = h(
      "button",
      { type: "button", class: "secondary small" },
      "Show remote images",
    );
    button.addEventListener("click", () => {
      frame.replaceWith(remoteImagesFrame(html));
      button.replaceWith(h("p", { class: "muted small" }, "Remote images shown for this message."));
    });
    box.append(h("p", { class: "remote-note" }, "Remote images are blocked. ", button));
  }
  return box;
}

/**
 * The same email in /inbox/mail-frame, whose own CSP allows remote images. A srcdoc
 * cannot be loosened from inside (CSP only ever tightens), hence a separate document.
 * It is sandboxed with scripts but no same-origin: its script cannot reach this page.
 */
function remoteImagesFrame(html) {
  const frame = h("iframe", {
    class: "email-frame",
    title: "Email message with remote images",
    sandbox: "allow-scripts allow-popups",
    referrerpolicy: "no-referrer",
    src: "/inbox/mail-frame",
  });
  let sent = false;
  frame.addEventListener("load", () => {
    // Once only: should the frame ever navigate away, the next document gets nothing.
    if (sent) return;
    sent = true;
    // "*": a sandboxed frame has an opaque origin that no origin string can name.
    frame.contentWindow.postMessage({ html }, "*");
  });
  return frame;
}
