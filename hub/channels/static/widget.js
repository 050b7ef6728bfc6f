/* hub web chat widget. One tag on any page:
 *   <script src="https://hub.example/widget.js" data-channel="NAME" async></script>
 * Optional: data-prechat="true" (ask name and email first), and for a signed-in user
 * data-name, data-email, data-user-id, data-user-hash (the site's HMAC, see docs/webchat.md).
 * Plain ES2017, no build step. Message data is only ever written with textContent. */
(function () {
  "use strict";

  var script = document.currentScript || document.querySelector("script[data-channel][src*='widget.js']");
  if (!script || !script.getAttribute("data-channel")) return;
  var channel = script.getAttribute("data-channel");
  var hubOrigin = new URL(script.src, location.href).origin;
  var instanceKey = "hubChat:" + hubOrigin + "/" + channel;
  window.__hubChat = window.__hubChat || {};
  if (window.__hubChat[instanceKey]) return; // the same widget twice on one page
  var wsUrl = hubOrigin.replace(/^http/, "ws") + "/chat/" + encodeURIComponent(channel) + "/ws";
  var attr = function (name) { return (script.getAttribute("data-" + name) || "").trim() || undefined; };
  var site = { name: attr("name"), email: attr("email"), user_id: attr("user-id"), user_hash: attr("user-hash") };
  var MAX_CACHED = 200;

  // --- durable state: localStorage, or memory where storage is refused -------------
  var storage = (function () {
    try { var k = "__hubChatProbe"; localStorage.setItem(k, "1"); localStorage.removeItem(k); return localStorage; }
    catch (e) { var mem = {}; return { getItem: function (k) { return k in mem ? mem[k] : null; }, setItem: function (k, v) { mem[k] = String(v); } }; }
  })();
  var state = (function () {
    var empty = { token: null, last_event_id: null, messages: [], pending: [], profile: null };
    try {
      var s = JSON.parse(storage.getItem(instanceKey) || "null");
      if (!s || typeof s !== "object") return empty;
      return {
        token: typeof s.token === "string" ? s.token : null,
        last_event_id: typeof s.last_event_id === "string" ? s.last_event_id : null,
        messages: Array.isArray(s.messages) ? s.messages : [],
        pending: Array.isArray(s.pending) ? s.pending : [],
        profile: s.profile && typeof s.profile === "object" ? s.profile : null
      };
    } catch (e) { return empty; }
  })();
  function save() {
    state.messages = state.messages.slice(-MAX_CACHED);
    try { storage.setItem(instanceKey, JSON.stringify(state)); } catch (e) { /* quota: keep going in memory */ }
  }

  // --- DOM helpers ---------------------------------------------------------------
  var uid = 0;
  function el(tag, props, children) {
    var node = document.createElement(tag);
    Object.keys(props || {}).forEach(function (key) {
      var value = props[key];
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, "");
      else if (value !== false && value != null) node.setAttribute(key, value);
    });
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }
  function id(name) { uid += 1; return "hub-chat-" + name + "-" + uid; }
  function newClientId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = new Uint8Array(16); crypto.getRandomValues(b);
    return Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
  }

  var CSS = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}",
    ".launcher{position:fixed;right:16px;bottom:16px;z-index:2147483000;min-width:56px;min-height:56px;padding:0 18px;border:0;border-radius:28px;background:#1f4fd1;color:#fff;font-size:16px;font-weight:600;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25)}",
    ".launcher:focus-visible,button:focus-visible,textarea:focus-visible,input:focus-visible{outline:3px solid #ffbf47;outline-offset:2px}",
    ".badge{display:inline-block;margin-left:8px;min-width:22px;padding:1px 6px;border-radius:11px;background:#fff;color:#1f4fd1;font-size:13px}",
    ".panel{position:fixed;right:16px;bottom:84px;z-index:2147483001;display:flex;flex-direction:column;width:370px;max-width:calc(100vw - 32px);height:540px;max-height:calc(100vh - 104px);background:#fff;color:#1b1b1b;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.3);overflow:hidden;font-size:15px}",
    ".panel[hidden],form[hidden],p[hidden]{display:none}",
    "header{display:flex;align-items:center;justify-content:space-between;padding:12px 14px;background:#1f4fd1;color:#fff}",
    "h2{margin:0;font-size:17px}",
    ".close{min-width:44px;min-height:44px;border:0;background:transparent;color:#fff;font-size:26px;cursor:pointer}",
    ".notice{margin:0;padding:8px 14px;background:#fff4d6;font-size:14px}",
    ".log{flex:1;overflow-y:auto;padding:12px 14px;display:flex;flex-direction:column;gap:8px}",
    ".msg{max-width:85%;padding:8px 11px;border-radius:12px;white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.35}",
    ".msg.in{align-self:flex-end;background:#1f4fd1;color:#fff}.msg.out{align-self:flex-start;background:#eef0f4}",
    ".msg .who{display:block;font-size:12px;font-weight:600;margin-bottom:2px}.msg.in .who{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}",
    ".meta{display:block;margin-top:3px;font-size:11px;opacity:.8}.msg.failed{background:#b3261e}",
    ".typing{margin:0;padding:0 14px 4px;min-height:18px;font-size:13px;color:#555}",
    "form{display:flex;gap:8px;padding:10px 14px;border-top:1px solid #e3e5ea}",
    "form.stack{flex-direction:column}",
    "textarea,input{flex:1;min-height:44px;padding:10px;border:1px solid #8a8f98;border-radius:8px;font-size:16px;resize:none;color:#1b1b1b;background:#fff}",
    "button.primary{min-height:44px;padding:0 16px;border:0;border-radius:8px;background:#1f4fd1;color:#fff;font-size:15px;font-weight:600;cursor:pointer}",
    "button.link{border:0;background:none;color:#1f4fd1;text-decoration:underline;cursor:pointer;min-height:44px}",
    ".csat{display:flex;gap:6px;margin-top:6px}.csat button{min-width:36px;min-height:36px;border:1px solid #1f4fd1;border-radius:8px;background:#fff;color:#1f4fd1;font-size:15px;cursor:pointer}",
    "label{font-size:14px}.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}",
    "@media (max-width:480px){.panel{right:0;bottom:0;width:100%;max-width:none;height:100%;max-height:none;border-radius:0}}",
    "@media (prefers-reduced-motion:no-preference){.panel{transition:opacity .15s}}"
  ].join("\n");

  // --- the widget's elements -----------------------------------------------------
  var host = el("div", { "data-hub-chat": channel });
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
  if (root.adoptedStyleSheets !== undefined && window.CSSStyleSheet && CSSStyleSheet.prototype.replaceSync) {
    var sheet = new CSSStyleSheet(); sheet.replaceSync(CSS); root.adoptedStyleSheets = [sheet];
  } else {
    root.appendChild(el("style", { text: CSS }));
  }
  var title = attr("title") || "Chat with us";
  var panelId = id("panel"), titleId = id("title"), inputId = id("input");
  var badge = el("span", { class: "badge", "aria-hidden": "true", hidden: true });
  var launcherText = el("span", { text: "Chat" });
  var launcher = el("button", { type: "button", class: "launcher", "aria-haspopup": "dialog", "aria-expanded": "false", "aria-controls": panelId, "aria-label": "Open chat: " + title }, [launcherText, badge]);
  var heading = el("h2", { id: titleId, text: title });
  var closeBtn = el("button", { type: "button", class: "close", "aria-label": "Close chat", text: "\u00d7" });
  var notice = el("p", { class: "notice", role: "status", hidden: true });
  var log = el("div", { class: "log", role: "log", "aria-live": "polite", "aria-relevant": "additions", "aria-label": "Messages", tabindex: "0" });
  var typing = el("p", { class: "typing", "aria-live": "polite" });
  var input = el("textarea", { id: inputId, rows: "1", placeholder: "Write a message\u2026", autocomplete: "off" });
  var composer = el("form", { class: "composer", "aria-label": "Send a message" }, [
    el("label", { for: inputId, class: "sr", text: "Message" }), input,
    el("button", { type: "submit", class: "primary", text: "Send" })
  ]);
  var offlineEmail = el("input", { type: "email", id: id("offline-email"), autocomplete: "email", required: true });
  var offlineForm = el("form", { class: "stack offline", hidden: true, "aria-label": "Continue by email" }, [
    el("label", { for: offlineEmail.id, text: "Your email, to continue by email" }), offlineEmail,
    el("button", { type: "submit", class: "primary", text: "Continue by email" })
  ]);
  var preName = el("input", { type: "text", id: id("pre-name"), autocomplete: "name", maxlength: "120" });
  var preEmail = el("input", { type: "email", id: id("pre-email"), autocomplete: "email", maxlength: "254" });
  var preForm = el("form", { class: "stack prechat", hidden: true, "aria-label": "Before we start" }, [
    el("label", { for: preName.id, text: "Your name" }), preName,
    el("label", { for: preEmail.id, text: "Your email (optional)" }), preEmail,
    el("button", { type: "submit", class: "primary", text: "Start chat" }),
    el("button", { type: "button", class: "link", text: "Skip", onclick: function () { finishPrechat({}); } })
  ]);
  var panel = el("div", { id: panelId, class: "panel", role: "dialog", "aria-modal": "false", "aria-labelledby": titleId, hidden: true }, [
    el("header", {}, [heading, closeBtn]), notice, preForm, log, typing, offlineForm, composer
  ]);
  root.appendChild(launcher);
  root.appendChild(panel);

  // --- rendering -----------------------------------------------------------------
  var seen = {};
  var unread = 0;
  function timeText(iso) {
    var d = iso ? new Date(iso) : new Date();
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  function messageNode(m) {
    var node = el("div", { class: "msg " + (m.direction === "in" ? "in" : "out") }, [
      el("span", { class: "who", text: m.direction === "in" ? "You" : (m.author_name || "Support") }),
      el("span", { class: "text", text: m.text }),
      el("span", { class: "meta" })
    ]);
    if (m.id) node.setAttribute("data-id", m.id);
    if (m.client_id) node.setAttribute("data-client-id", m.client_id);
    if (m.csat && typeof m.csat.survey === "string") node.appendChild(csatButtons(m.csat.survey));
    setMeta(node, m.id ? timeText(m.created_at) : "Sending\u2026");
    return node;
  }
  // A satisfaction survey: 1-5 buttons under the question, sent as a "csat" frame.
  function csatButtons(survey) {
    var row = el("div", { class: "csat", role: "group", "aria-label": "Rate this conversation from 1 to 5", "data-survey": survey });
    for (var n = 1; n <= 5; n++) {
      row.appendChild(el("button", { type: "button", text: String(n), "aria-label": n + " out of 5",
        onclick: (function (score) { return function () { send({ type: "csat", survey: survey, score: score }); }; })(n) }));
    }
    return row;
  }
  function csatDone(survey, text) {
    var rows = log.querySelectorAll(".csat");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-survey") === survey) rows[i].parentNode.replaceChild(el("span", { class: "meta", text: text }), rows[i]);
    }
  }
  function setMeta(node, text) { node.querySelector(".meta").textContent = text; }
  function place(node, eventId) {
    // Keep id order (ids sort by commit time); unacknowledged messages stay last.
    var children = log.children;
    for (var i = 0; i < children.length; i++) {
      var other = children[i].getAttribute("data-id");
      if (!other || other > eventId) { log.insertBefore(node, children[i]); return; }
    }
    log.appendChild(node);
  }
  function scrollDown() { log.scrollTop = log.scrollHeight; }
  function pendingNode(clientId) {
    var nodes = log.querySelectorAll(".msg[data-client-id]");
    for (var i = 0; i < nodes.length; i++) if (nodes[i].getAttribute("data-client-id") === clientId) return nodes[i];
    return null;
  }
  function confirmPending(clientId, ev) {
    var node = pendingNode(clientId);
    state.pending = state.pending.filter(function (p) { return p.client_id !== clientId; });
    if (!node || node.getAttribute("data-id")) return !!node;
    node.setAttribute("data-id", ev.id);
    node.classList.remove("failed");
    setMeta(node, timeText(ev.created_at) + " \u00b7 Sent");
    log.removeChild(node); place(node, ev.id);
    return true;
  }
  function remember(ev, resumePoint) {
    if (seen[ev.id]) return false;
    seen[ev.id] = true;
    // Only events the server streamed move the resume point: an ack may overtake an
    // earlier agent reply still on its way, which must not be skipped on reconnect.
    if (resumePoint && (!state.last_event_id || ev.id > state.last_event_id)) state.last_event_id = ev.id;
    state.messages.push({ id: ev.id, direction: ev.direction, text: ev.text, created_at: ev.created_at, author_name: ev.author_name });
    return true;
  }
  function showEvent(ev, live) {
    if (!ev || typeof ev.id !== "string" || typeof ev.text !== "string") return;
    if (!remember(ev, true)) {
      if (ev.id > (state.last_event_id || "")) { state.last_event_id = ev.id; save(); }
      return;
    }
    if (!(ev.client_id && confirmPending(ev.client_id, ev))) place(messageNode(ev), ev.id);
    if (live && ev.direction === "out") {
      typing.textContent = "";
      if (panel.hidden) { unread += 1; updateBadge(); }
    }
    save(); scrollDown();
  }
  function updateBadge() {
    badge.hidden = unread === 0;
    badge.textContent = String(unread);
    launcher.setAttribute("aria-label", "Open chat: " + title + (unread ? " (" + unread + " unread)" : ""));
  }
  function showNotice(text) { notice.textContent = text || ""; notice.hidden = !text; }

  // --- the connection ------------------------------------------------------------
  var ws = null, ready = false, attempt = 0, retryTimer = null, welcomed = false, agentsOnline = null, offlineOffer = false;
  var lastTyping = 0, typingTimer = null;

  function connect() {
    if (ws || needsPrechat()) return;
    clearTimeout(retryTimer);
    var socket;
    try { socket = new WebSocket(wsUrl); } catch (e) { scheduleReconnect(); return; }
    ws = socket;
    socket.onopen = function () {
      var profile = state.profile || {};
      var hello = { type: "hello", token: state.token || undefined, last_event_id: state.last_event_id || undefined,
        name: site.name || profile.name || undefined, email: site.email || profile.email || undefined,
        user_id: site.user_id, user_hash: site.user_hash };
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = function (e) {
      var frame;
      try { frame = JSON.parse(e.data); } catch (err) { return; }
      if (frame && typeof frame.type === "string") handle(frame, socket);
    };
    socket.onclose = function (e) {
      if (ws !== socket) return;
      ws = null; ready = false;
      if (e.code === 4401) {
        // Our token is no good here any more: start over as a new visitor.
        state.token = null; state.last_event_id = null; state.messages = []; save();
        attempt = 0;
      }
      if (welcomed) showNotice("Reconnecting\u2026");
      scheduleReconnect();
    };
  }
  function scheduleReconnect() {
    clearTimeout(retryTimer);
    var delay = Math.min(30000, 500 * Math.pow(2, attempt)) * (0.5 + Math.random());
    attempt = Math.min(attempt + 1, 10);
    retryTimer = setTimeout(connect, delay);
  }
  function send(frame) {
    if (!ws || !ready) return false;
    try { ws.send(JSON.stringify(frame)); return true; } catch (e) { return false; }
  }
  function handle(frame, socket) {
    if (frame.type === "welcome") {
      state.token = frame.token; save();
      ready = true; welcomed = true; attempt = 0;
      if (typeof frame.title === "string" && !attr("title")) { title = frame.title; heading.textContent = title; updateBadge(); }
      if (frame.max_message_chars) input.setAttribute("maxlength", String(frame.max_message_chars));
      offlineOffer = !!frame.offline_email;
      setAgents(frame.agents_online);
      // Whatever was not acknowledged goes again, with the same client id: stored once.
      state.pending.forEach(function (p) { send({ type: "message", client_id: p.client_id, text: p.text }); });
    } else if (frame.type === "event") {
      showEvent(frame.event, true);
    } else if (frame.type === "ack") {
      var known = confirmPending(frame.client_id, { id: frame.event_id });
      if (known && !seen[frame.event_id]) {
        var p = pendingText[frame.client_id];
        remember({ id: frame.event_id, direction: "in", text: p || "", created_at: new Date().toISOString() }, false);
      }
      save();
    } else if (frame.type === "typing") {
      typing.textContent = "Support is typing\u2026";
      clearTimeout(typingTimer);
      typingTimer = setTimeout(function () { typing.textContent = ""; }, 5000);
    } else if (frame.type === "agents") {
      setAgents(frame.online);
    } else if (frame.type === "queue") {
      var wait = frame.estimated_wait_seconds > 0 ? " (about " + Math.max(1, Math.round(frame.estimated_wait_seconds / 60)) + " min)" : "";
      showNotice(frame.position > 0 ? "You are number " + frame.position + " in line" + wait + "." : "");
    } else if (frame.type === "contact_saved") {
      offlineForm.hidden = true;
      showNotice("Thanks \u2014 we will reply to " + frame.email + ".");
    } else if (frame.type === "csat_saved") {
      csatDone(frame.survey, "Thank you for your rating.");
    } else if (frame.type === "error") {
      onError(frame);
    }
  }
  var pendingText = {};
  function onError(frame) {
    if (!frame.client_id) {
      if (frame.code === "invalid_email") showNotice("That email address does not look right.");
      if (frame.code === "csat_closed") showNotice("This survey is closed.");
      return;
    }
    var node = pendingNode(frame.client_id);
    if (frame.code === "rate_limited" || frame.code === "unavailable") {
      // Still ours to send: try again in a while with the same client id.
      setTimeout(function () {
        var p = state.pending.filter(function (x) { return x.client_id === frame.client_id; })[0];
        if (p) send({ type: "message", client_id: p.client_id, text: p.text });
      }, frame.code === "rate_limited" ? 10000 : 3000);
      if (node) setMeta(node, frame.code === "rate_limited" ? "Waiting to send\u2026" : "Retrying\u2026");
      return;
    }
    state.pending = state.pending.filter(function (p) { return p.client_id !== frame.client_id; });
    save();
    if (node) { node.classList.add("failed"); setMeta(node, "Not sent: " + (frame.message || frame.code)); }
  }
  function setAgents(online) {
    agentsOnline = online;
    if (online === false) {
      showNotice(offlineOffer ? "No one is online right now \u2014 leave a message or continue by email"
        : "No one is online right now \u2014 leave a message and we will get back to you here");
      offlineForm.hidden = !offlineOffer;
    } else {
      showNotice("");
      offlineForm.hidden = true;
    }
  }

  // --- sending -------------------------------------------------------------------
  function submitMessage() {
    var text = input.value.trim();
    if (!text) return;
    var clientId = newClientId();
    var pending = { client_id: clientId, text: text };
    state.pending.push(pending); pendingText[clientId] = text; save();
    log.appendChild(messageNode({ direction: "in", text: text, client_id: clientId }));
    scrollDown();
    input.value = "";
    if (!send({ type: "message", client_id: clientId, text: text })) connect();
  }
  composer.addEventListener("submit", function (e) { e.preventDefault(); submitMessage(); });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submitMessage(); }
  });
  input.addEventListener("input", function () {
    var now = Date.now();
    if (now - lastTyping > 2000 && input.value) { lastTyping = now; send({ type: "typing" }); }
  });
  offlineForm.addEventListener("submit", function (e) {
    e.preventDefault();
    var email = offlineEmail.value.trim();
    if (email) send({ type: "contact", email: email });
  });

  // --- pre-chat form -------------------------------------------------------------
  function needsPrechat() {
    return attr("prechat") === "true" && !state.token && !state.profile && !site.email && !site.user_id;
  }
  function finishPrechat(profile) {
    state.profile = profile; save();
    preForm.hidden = true; composer.hidden = false;
    connect();
    input.focus();
  }
  preForm.addEventListener("submit", function (e) {
    e.preventDefault();
    finishPrechat({ name: preName.value.trim() || undefined, email: preEmail.value.trim() || undefined });
  });

  // --- opening and closing -------------------------------------------------------
  function open() {
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    unread = 0; updateBadge();
    var pre = needsPrechat();
    preForm.hidden = !pre; composer.hidden = pre;
    if (pre) preName.focus(); else { connect(); input.focus(); }
    scrollDown();
  }
  function close() {
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    launcher.focus();
  }
  launcher.addEventListener("click", function () { if (panel.hidden) open(); else close(); });
  closeBtn.addEventListener("click", close);
  panel.addEventListener("keydown", function (e) { if (e.key === "Escape") { e.preventDefault(); close(); } });
  window.addEventListener("online", function () { if (!ws) { attempt = 0; connect(); } });

  // --- start -----------------------------------------------------------------------
  state.messages.forEach(function (m) { if (m && typeof m.id === "string" && !seen[m.id]) { seen[m.id] = true; place(messageNode(m), m.id); } });
  state.pending.forEach(function (p) { pendingText[p.client_id] = p.text; log.appendChild(messageNode({ direction: "in", text: p.text, client_id: p.client_id })); });
  if (!state.messages.length) state.last_event_id = null; // nothing cached: ask for all of it
  window.__hubChat[instanceKey] = { open: open, close: close };
  function mount() { document.body.appendChild(host); if (state.token || state.pending.length) connect(); }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();
