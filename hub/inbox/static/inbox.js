// The shared inbox: sign-in, conversation list, one conversation's cross-channel
// timeline, reply/note/assign/status/tags, presence, live updates.
//
// Data is rendered as text only (see dom.js); email HTML only in sandboxed frames
// (see timeline.js). State lives in one object; rendering functions read it.

import { $, age, clear, h } from "./dom.js";
import { api, ApiError, qs, session, setUnauthorizedHandler } from "./api.js";
import { Live } from "./live.js";
import { channelBadge, renderEvent } from "./timeline.js";

const PAGE_SIZE = 50;
const TYPING_TTL_MS = 6000;
const VIEWING_TTL_MS = 45000;
const VIEWING_EVERY_MS = 20000;
const TYPING_EVERY_MS = 2500;

const state = {
  me: null,
  agents: new Map(), // id -> agent (with presence)
  customers: new Map(), // id -> customer
  convs: new Map(), // id -> conversation
  listCursor: null,
  filters: { view: "all", status: "open,pending,snoozed", channel: "" },
  channels: new Set(),
  open: null, // {conversation, customer, events: Map, items: Map, cursor}
  openSeq: 0,
  unread: new Map(), // conversation id -> unread count
  counted: new Set(), // event ids already counted as unread (updates reuse the id)
  channelTypes: new Map(), // channel name -> type
  signals: new Map(), // conversation id -> Map(agent id -> {kind, until})
  offers: new Map(), // conversation id -> {queue, expiresAt (ms)}
  lastTypingSent: 0,
};

const live = new Live(() => session.token, {
  message: onLiveMessage,
  open: onLiveOpen,
  // The hub closed the socket because the token is no longer valid.
  signedOut: () => signOut("Your session has ended. Sign in again."),
  // A refused handshake looks like any network error; asking /me tells them apart
  // (a 401 there signs out through the API client's handler).
  closed: (failures) => {
    if (failures >= 2) api("GET", "/me").catch(() => {});
  },
  state: (text) => {
    $("live-state").textContent = text;
    $("live-state").classList.toggle("is-live", text === "Live");
  },
});

// --- sign in / out -------------------------------------------------------------------

function showSignin(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("password").value = "";
  $("login").focus();
}

async function signIn(event) {
  event.preventDefault();
  const login = $("login").value.trim();
  const password = $("password").value;
  if (!login || !password) {
    $("signin-error").textContent = "Enter your login and password.";
    return;
  }
  const button = event.submitter || $("signin-form").querySelector("button");
  button.disabled = true;
  try {
    const data = await api("POST", "/auth/login", { login, password });
    session.save(data.token, data.agent || null);
    $("password").value = "";
    await enterApp();
  } catch (err) {
    $("signin-error").textContent =
      err instanceof ApiError && err.status === 401 ? "Wrong login or password." : err.message;
  } finally {
    button.disabled = false;
  }
}

async function signOut(message = "") {
  live.stop();
  if (session.token && !message) {
    // Revoke server-side; the page signs out locally whatever the answer.
    api("POST", "/auth/logout", {}).catch(() => {});
  }
  session.clear();
  resetState();
  showSignin(message);
}

function resetState() {
  state.me = null;
  state.agents.clear();
  state.customers.clear();
  state.convs.clear();
  state.listCursor = null;
  state.channels.clear();
  state.open = null;
  state.unread.clear();
  state.counted.clear();
  state.signals.clear();
  state.offers.clear();
  renderOffers();
  clear($("conv-list"));
  clear($("timeline"));
  $("conv").hidden = true;
  $("conv-placeholder").hidden = false;
  document.body.classList.remove("show-conv");
}

async function enterApp() {
  $("signin").hidden = true;
  $("app").hidden = false;
  state.me = session.agent;
  try {
    const me = await api("GET", "/me");
    state.me = me.agent || me;
  } catch (err) {
    if (err.status === 401) return; // handler already dropped to sign-in
  }
  if (!state.me) {
    await signOut("Could not load your profile; sign in again.");
    return;
  }
  $("me-name").textContent = state.me.name || state.me.login || "";
  $("presence").value = state.me.presence || "online";
  restoreFilters();
  await Promise.all([loadAgents(), loadChannels()]);
  live.start();
  await loadList(true);
  const fromHash = /^#c=([\w-]+)$/.exec(location.hash);
  if (fromHash) openConversation(fromHash[1]);
}

// --- agents and presence -------------------------------------------------------------

async function loadAgents() {
  try {
    const data = await api("GET", "/agents");
    const items = Array.isArray(data) ? data : data.items || data.agents || [];
    state.agents.clear();
    for (const agent of items) state.agents.set(agent.id, agent);
  } catch {
    // Only names and the assign list suffer; ids are shown instead.
  }
  if (state.me) state.agents.set(state.me.id, { ...state.agents.get(state.me.id), ...state.me });
  renderAssignees();
}

async function loadChannels() {
  try {
    const data = await api("GET", "/channels");
    for (const channel of data.items || []) {
      state.channelTypes.set(channel.name, channel.type);
      state.channels.add(channel.name);
    }
  } catch {
    // Badges then show names without types, and the filter fills in from the list.
  }
  renderChannelFilter();
}

function agentName(id) {
  if (!id) return "nobody";
  if (state.me && id === state.me.id) return "me";
  const agent = state.agents.get(id);
  return (agent && (agent.name || agent.login)) || id;
}

function authorName(author) {
  if (author === "customer") return state.open?.customer?.display_name || "Customer";
  if (author === "system") return "System";
  if (typeof author === "string" && author.startsWith("agent:")) return agentName(author.slice(6));
  return author || "";
}

async function changePresence() {
  const select = $("presence");
  const previous = state.me.presence || "online";
  try {
    await api("PUT", "/me/presence", { presence: select.value });
    state.me.presence = select.value;
  } catch (err) {
    select.value = previous;
    $("live-state").textContent = `Presence not changed: ${err.message}`;
  }
}

// --- unread counts --------------------------------------------------------------------
// The hub keeps each agent's read marker per conversation and sends `unread` (inbound
// events after it) with every list item; live events add to it here, and opening a
// conversation moves the marker. So counts agree across tabs and devices.

function unreadCount(convId) {
  return state.unread.get(convId) || 0;
}

const readTimers = new Map();
/** Mark read up to the newest event shown; debounced, as events can come in bursts. */
function markRead(convId) {
  state.unread.set(convId, 0);
  clearTimeout(readTimers.get(convId));
  readTimers.set(
    convId,
    setTimeout(() => {
      readTimers.delete(convId);
      const eventId = state.open?.conversation.id === convId ? newestEventId(convId) : null;
      api("POST", `/conversations/${encodeURIComponent(convId)}/read`, eventId ? { event_id: eventId } : undefined)
        .catch(() => {}); // a lost marker only means a stale count on the next load
    }, 500),
  );
}

// --- conversation list ---------------------------------------------------------------

function restoreFilters() {
  try {
    Object.assign(state.filters, JSON.parse(sessionStorage.getItem("hub.inbox.filters") || "{}"));
  } catch {
    // keep defaults
  }
  $("f-view").value = state.filters.view;
  $("f-status").value = state.filters.status;
  renderChannelFilter();
}

async function changeFilters() {
  state.filters = {
    view: $("f-view").value,
    status: $("f-status").value,
    channel: $("f-channel").value,
  };
  sessionStorage.setItem("hub.inbox.filters", JSON.stringify(state.filters));
  await loadList(true);
}

function matchesFilters(conv) {
  const { view, status, channel } = state.filters;
  if (view === "mine" && conv.assignee !== state.me.id) return false;
  if (view === "unassigned" && conv.assignee) return false;
  if (status && !status.split(",").includes(conv.status)) return false;
  if (channel && conv.channel !== channel) return false;
  return true;
}

let listSeq = 0;
async function loadList(reset) {
  const { view, status, channel } = state.filters;
  const before = reset ? null : state.listCursor;
  const seq = ++listSeq;
  let data;
  try {
    data = await api(
      "GET",
      `/conversations${qs({ view, status, channel, limit: PAGE_SIZE, before })}`,
    );
  } catch (err) {
    $("list-empty").hidden = false;
    $("list-empty").textContent = `Could not load conversations: ${err.message}`;
    return;
  }
  if (seq !== listSeq) return; // filters changed meanwhile: a newer load owns the list
  if (reset) state.convs.clear();
  for (const item of data.items || []) {
    rememberConversation(item.conversation, item.customer);
    if (typeof item.unread === "number" && state.open?.conversation.id !== item.conversation.id) {
      state.unread.set(item.conversation.id, item.unread);
    }
  }
  state.listCursor = data.next_cursor || null;
  $("list-empty").textContent = "No conversations here.";
  renderList();
}

function rememberConversation(conv, customer) {
  const known = state.convs.get(conv.id);
  // A live update can be newer than a list page fetched before it.
  if (!known || !known.last_activity_at || !conv.last_activity_at ||
      conv.last_activity_at >= known.last_activity_at) {
    state.convs.set(conv.id, conv);
  }
  if (customer) state.customers.set(customer.id, customer);
  if (conv.channel) state.channels.add(conv.channel);
}

// Coalesce bursts of live updates into one render. A timer, not requestAnimationFrame:
// background tabs get no frames, and the unread count in the title matters most there.
let listTimer = 0;
function renderListSoon() {
  if (!listTimer) listTimer = setTimeout(() => {
    listTimer = 0;
    renderList();
  }, 50);
}

function renderList() {
  const list = $("conv-list");
  const focusedId = document.activeElement?.closest?.(".conv-item")?.dataset.id;
  const convs = [...state.convs.values()]
    .filter(matchesFilters)
    .sort((a, b) => String(b.last_activity_at).localeCompare(String(a.last_activity_at)));
  clear(list);
  let totalUnread = 0;
  for (const conv of convs) {
    const customer = state.customers.get(conv.customer_id);
    const unread = unreadCount(conv.id);
    totalUnread += unread;
    const isOpen = state.open?.conversation.id === conv.id;
    list.append(
      h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            class: `conv-item${unread ? " unread" : ""}`,
            dataset: { id: conv.id },
            "aria-current": isOpen ? "true" : null,
            onclick: () => openConversation(conv.id),
          },
          h("span", { class: "conv-name" }, customer?.display_name || "Unknown customer"),
          unread
            ? h("span", { class: "count", "aria-label": `${unread} unread` }, unread >= 100 ? "99+" : String(unread))
            : null,
          h(
            "span",
            { class: "conv-line" },
            channelBadge({ channel: conv.channel, channel_type: state.channelTypes.get(conv.channel) }),
            h("span", { class: `status status-${conv.status}` }, conv.status),
            h("span", {}, conv.assignee ? agentName(conv.assignee) : "unassigned"),
            h("span", { class: "age", title: conv.last_activity_at || "" }, age(conv.last_activity_at)),
          ),
        ),
      ),
    );
  }
  $("list-empty").hidden = convs.length > 0;
  $("load-more").hidden = !state.listCursor;
  document.title = totalUnread ? `(${totalUnread}) Inbox · hub` : "Inbox · hub";
  if (focusedId) list.querySelector(`.conv-item[data-id="${CSS.escape(focusedId)}"]`)?.focus();
  renderChannelFilter();
  if (state.offers.size) renderOffers(); // names of offered customers arrive with the list
}

function renderChannelFilter() {
  const select = $("f-channel");
  const known = new Set([...select.options].map((o) => o.value));
  for (const name of [...state.channels, state.filters.channel].filter(Boolean).sort()) {
    if (!known.has(name)) select.append(h("option", { value: name }, name));
  }
  select.value = state.filters.channel;
}

// Fetch a conversation the list has not seen yet (a new contact), once at a time.
const fetching = new Set();
async function fetchConversation(id) {
  if (fetching.has(id)) return;
  fetching.add(id);
  try {
    const data = await api("GET", `/conversations/${encodeURIComponent(id)}${qs({ limit: 1 })}`);
    rememberConversation(data.conversation, data.customer);
    renderListSoon();
  } catch {
    // It may be gone or not ours to see; the next list load settles it.
  } finally {
    fetching.delete(id);
  }
}

async function customerFor(conv) {
  if (state.customers.has(conv.customer_id)) return;
  try {
    const data = await api("GET", `/customers/${encodeURIComponent(conv.customer_id)}`);
    const customer = data.customer || data;
    state.customers.set(customer.id, customer);
  } catch {
    // The list shows "Unknown customer" until the next load.
  }
}

// --- one conversation ----------------------------------------------------------------

async function openConversation(id) {
  const seq = ++state.openSeq;
  let data;
  try {
    data = await api("GET", `/conversations/${encodeURIComponent(id)}${qs({ limit: PAGE_SIZE })}`);
  } catch (err) {
    if (seq === state.openSeq) {
      $("conv-placeholder").hidden = false;
      $("conv-placeholder").textContent = `Could not open the conversation: ${err.message}`;
    }
    return;
  }
  if (seq !== state.openSeq) return; // the agent clicked another one meanwhile
  rememberConversation(data.conversation, data.customer);
  const previous = state.open?.conversation.id;
  if (previous && previous !== id) {
    // Let other agents' "X is viewing" notice go now rather than when it times out.
    live.send({ type: "viewing", conversation_id: previous, active: false });
  }
  state.open = {
    conversation: data.conversation,
    customer: data.customer,
    events: new Map(),
    items: new Map(),
    cursor: data.timeline?.next_cursor || null,
    replyChannels: data.reply_channels || null,
  };
  $("reply-note").checked = false;
  delete $("reply-channel").dataset.picked;
  history.replaceState(null, "", `#c=${encodeURIComponent(id)}`);
  $("conv-placeholder").hidden = true;
  $("conv").hidden = false;
  clear($("timeline"));
  for (const ev of data.timeline?.items || []) upsertEvent(ev, false);
  $("load-older").hidden = !state.open.cursor;
  renderConversationHead();
  renderReplyChannels();
  $("reply-error").textContent = "";
  $("action-error").textContent = "";
  document.body.classList.add("show-conv");
  scrollTimelineToEnd();
  markRead(id);
  renderList();
  renderCollision();
  live.send({ type: "viewing", conversation_id: id });
  // Whatever was stored between our GET and now arrives by resume (duplicates dropped).
  resumeOpen();
  $("conv-title").focus();
}

function resumeOpen() {
  if (!state.open) return;
  live.send({
    type: "resume",
    conversation_id: state.open.conversation.id,
    after: newestEventId(state.open.conversation.id),
  });
}

function newestEventId(conversationId) {
  let newest = null;
  for (const ev of state.open.events.values()) {
    if (ev.conversation_id === conversationId && (!newest || ev.id > newest)) newest = ev.id;
  }
  return newest;
}

function closeConversationOnPhone() {
  document.body.classList.remove("show-conv");
  const id = state.open?.conversation.id;
  if (id) $("conv-list").querySelector(`.conv-item[data-id="${CSS.escape(id)}"]`)?.focus();
}

function renderConversationHead() {
  const { conversation: conv, customer } = state.open;
  $("conv-title").textContent = customer?.display_name || "Unknown customer";
  clear($("identities"));
  for (const identity of customer?.identities || []) {
    $("identities").append(
      h(
        "li",
        {},
        h("span", { class: "muted" }, `${identity.kind}: `),
        identity.value,
        identity.verified === false ? h("span", { class: "muted" }, " (unverified)") : null,
      ),
    );
  }
  const meta = clear($("conv-meta"));
  let status = conv.status;
  if (conv.status === "snoozed" && conv.snoozed_until) {
    status += ` until ${new Date(conv.snoozed_until).toLocaleString()}`;
  }
  meta.append(
    h("span", { class: `status status-${conv.status}` }, status),
    " · ",
    conv.assignee ? `assigned to ${agentName(conv.assignee)}` : "unassigned",
    conv.queue ? ` · queue ${conv.queue}` : "",
    " · last contact via ",
    channelBadge({ channel: conv.channel, channel_type: state.channelTypes.get(conv.channel) }),
  );
  for (const tag of conv.tags || []) meta.append(" ", h("span", { class: "tag" }, tag));
  for (const button of document.querySelectorAll(".status-btn")) {
    button.setAttribute("aria-pressed", String(button.dataset.status === conv.status));
  }
  if (document.activeElement !== $("tags")) $("tags").value = (conv.tags || []).join(", ");
  renderAssignees();
}

function renderAssignees() {
  const select = $("assignee");
  const current = state.open?.conversation.assignee || "";
  clear(select).append(h("option", { value: "" }, "Unassigned"));
  const agents = [...state.agents.values()].sort((a, b) =>
    String(a.name).localeCompare(String(b.name)),
  );
  for (const agent of agents) {
    const label = `${agent.name || agent.login || agent.id}${agent.id === state.me?.id ? " (me)" : ""}` +
      (agent.presence ? ` · ${agent.presence}` : "");
    select.append(h("option", { value: agent.id }, label));
  }
  if (current && !state.agents.has(current)) select.append(h("option", { value: current }, current));
  select.value = current;
}

/** Channels the customer can be reached on (the hub says which); default first. */
function renderReplyChannels() {
  const { conversation: conv } = state.open;
  const channels = new Map();
  if (conv.channel) channels.set(conv.channel, state.channelTypes.get(conv.channel) || null);
  if (state.open.replyChannels) {
    for (const channel of state.open.replyChannels) channels.set(channel.name, channel.type);
  } else {
    // An older hub without reply_channels: the channels the customer wrote from.
    for (const ev of state.open.events.values()) {
      if (ev.direction === "in" && ev.channel) channels.set(ev.channel, ev.channel_type);
    }
  }
  const select = $("reply-channel");
  const chosen = select.value;
  clear(select);
  for (const [name, type] of channels) {
    const label = (type && type !== name ? `${name} (${type})` : name) +
      (name === conv.channel ? " · default" : "");
    select.append(h("option", { value: name }, label));
  }
  // Follow the conversation's channel (the customer's latest) unless the agent picked one.
  select.value = select.dataset.picked && channels.has(chosen) ? chosen : conv.channel;
  syncNoteMode();
}

function syncNoteMode() {
  const note = $("reply-note").checked;
  $("reply-form").classList.toggle("is-note", note);
  $("reply-channel").disabled = note;
  $("reply-label").textContent = note ? "Note, only agents see it" : "Reply";
  $("reply-send").textContent = note ? "Add note" : "Send";
}

const DELIVERY_RANK = { queued: 1, sent: 2, delivered: 3, undelivered: 3, failed: 3 };

function upsertEvent(ev, isLive = true) {
  const open = state.open;
  if (!open || ev.customer_id !== open.customer.id) return;
  const known = open.events.get(ev.id);
  if (known && (DELIVERY_RANK[known.delivery_state] || 0) > (DELIVERY_RANK[ev.delivery_state] || 0)) {
    // An HTTP answer can arrive after the live update it predates ("sent" before "queued").
    return;
  }
  const timeline = $("timeline");
  const stick = isLive && isNearEnd(timeline);
  const element = renderEvent(ev, {
    authorName,
    agentName,
    conversationId: open.conversation.id,
  });
  const existing = open.items.get(ev.id);
  open.events.set(ev.id, ev);
  open.items.set(ev.id, element);
  if (existing) {
    existing.replaceWith(element); // a delivery update of a message already shown
  } else {
    // Ids sort in commit order: insert before the first newer one.
    let next = null;
    for (const li of timeline.children) {
      if (li.dataset.id > ev.id) {
        next = li;
        break;
      }
    }
    timeline.insertBefore(element, next);
  }
  if (stick) scrollTimelineToEnd();
  if (isLive && ev.direction === "in" && ev.channel && ev.conversation_id === open.conversation.id) {
    // The customer wrote from another channel: it is a way to reach them now.
    const known = open.replyChannels;
    if (known && !known.some((c) => c.name === ev.channel)) {
      known.push({ name: ev.channel, type: ev.channel_type });
    }
    renderReplyChannels();
  }
}

function isNearEnd(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function scrollTimelineToEnd() {
  const timeline = $("timeline");
  timeline.scrollTop = timeline.scrollHeight;
}

async function loadOlder() {
  const open = state.open;
  if (!open?.cursor) return;
  const button = $("load-older");
  button.disabled = true;
  try {
    const data = await api(
      "GET",
      `/customers/${encodeURIComponent(open.customer.id)}/timeline${qs({ limit: PAGE_SIZE, before: open.cursor })}`,
    );
    if (state.open !== open) return;
    const timeline = $("timeline");
    const fromEnd = timeline.scrollHeight - timeline.scrollTop;
    for (const ev of data.items || []) upsertEvent(ev, false);
    timeline.scrollTop = timeline.scrollHeight - fromEnd; // keep what the agent was reading
    open.cursor = data.next_cursor || null;
    button.hidden = !open.cursor;
  } catch (err) {
    $("action-error").textContent = `Could not load older events: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

// --- actions -------------------------------------------------------------------------

/** Run a conversation action, show its error, apply a returned conversation. */
async function act(errorId, fn) {
  $(errorId).textContent = "";
  try {
    const data = await fn();
    if (data && data.conversation) applyConversation(data.conversation);
    if (data && data.event) {
      upsertEvent(data.event);
      scrollTimelineToEnd();
    }
    return true;
  } catch (err) {
    $(errorId).textContent = err.message;
    return false;
  }
}

function convPath(suffix) {
  return `/conversations/${encodeURIComponent(state.open.conversation.id)}/${suffix}`;
}

async function sendReply(event) {
  event.preventDefault();
  if (!state.open) return;
  const textarea = $("reply-text");
  const text = textarea.value;
  if (!text.trim()) {
    $("reply-error").textContent = "Write something first.";
    textarea.focus();
    return;
  }
  const note = $("reply-note").checked;
  const channel = $("reply-channel").value;
  const body = { text };
  if (!note && channel && channel !== state.open.conversation.channel) body.channel = channel;
  $("reply-send").disabled = true;
  const ok = await act("reply-error", () =>
    api("POST", convPath(note ? "notes" : "replies"), body),
  );
  $("reply-send").disabled = false;
  if (ok) {
    textarea.value = "";
    // The customer's widget would otherwise show "typing" until it times out.
    live.send({ type: "typing", conversation_id: state.open.conversation.id, active: false });
    state.lastTypingSent = 0;
  }
  textarea.focus();
}

function onReplyKey(event) {
  // Ctrl/Cmd+Enter sends; plain Enter is a new line (replies are often multi-line).
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    $("reply-form").requestSubmit();
  }
}

function onReplyInput() {
  // A private note is not "replying": the customer's widget may show agent typing.
  if (!state.open || $("reply-note").checked) return;
  const now = Date.now();
  if (now - state.lastTypingSent < TYPING_EVERY_MS) return;
  state.lastTypingSent = now;
  live.send({ type: "typing", conversation_id: state.open.conversation.id });
}

function assign(agentId) {
  if (!state.open) return;
  act("action-error", () => api("POST", convPath("assign"), { agent_id: agentId || null }));
}

function setStatus(status) {
  if (!state.open) return;
  const body = { status };
  if (status === "snoozed") {
    const value = $("snooze-until").value;
    const until = value ? new Date(value) : null;
    if (!until || Number.isNaN(until.getTime()) || until <= new Date()) {
      $("action-error").textContent = "Pick a time in the future to snooze until.";
      $("snooze-until").focus();
      return;
    }
    body.until = until.toISOString();
  }
  act("action-error", () => api("POST", convPath("status"), body));
}

function saveTags(event) {
  event.preventDefault();
  if (!state.open) return;
  const tags = [...new Set($("tags").value.split(",").map((t) => t.trim()).filter(Boolean))];
  act("action-error", () => api("PUT", convPath("tags"), { tags }));
}

// --- live updates --------------------------------------------------------------------

function onLiveOpen(isReconnect) {
  if (state.open) {
    live.send({ type: "viewing", conversation_id: state.open.conversation.id });
    resumeOpen();
  }
  if (isReconnect) {
    // The list may have changed while we were away; events of the open conversation
    // come back through resume.
    loadList(true);
    loadAgents();
  }
}

function onLiveMessage(message) {
  switch (message.type) {
    case "event":
      if (message.event) onEvent(message.event);
      break;
    case "conversation":
      if (message.conversation) applyConversation(message.conversation);
      break;
    case "signal":
      onSignal(message);
      break;
    case "customer":
      if (message.customer) applyCustomer(message.customer);
      break;
    case "resync":
      // The hub dropped live items for us (we were slow): re-read from the store.
      if (!message.conversation_id) loadList(true);
      if (state.open && (!message.conversation_id || message.conversation_id === state.open.conversation.id)) {
        if (message.conversation_id) openConversation(state.open.conversation.id);
        else resumeOpen();
      }
      break;
    default:
      break; // newer servers may send more; ignore what we do not know
  }
}

function onEvent(ev) {
  const convId = ev.conversation_id;
  const isOpen = state.open && convId === state.open.conversation.id;
  upsertEvent(ev);
  if (!convId) return;
  const conv = state.convs.get(convId);
  if (conv) {
    if (ev.created_at && (!conv.last_activity_at || ev.created_at > conv.last_activity_at)) {
      state.convs.set(convId, { ...conv, last_activity_at: ev.created_at });
    }
  } else {
    fetchConversation(convId);
  }
  // Counted like the hub counts: what customers sent (messages, calls, voicemails).
  if (ev.direction === "in" && !state.counted.has(ev.id)) {
    state.counted.add(ev.id);
    if (state.counted.size > 5000) state.counted.clear(); // bounded; old ids never recur
    if (isOpen && document.visibilityState === "visible") markRead(convId);
    else state.unread.set(convId, unreadCount(convId) + 1);
  }
  renderListSoon();
}

async function applyConversation(conv) {
  if (!state.customers.has(conv.customer_id)) await customerFor(conv);
  rememberConversation(conv);
  state.convs.set(conv.id, conv); // the server's word is newest here
  if (state.open && state.open.conversation.id === conv.id) {
    state.open.conversation = conv;
    renderConversationHead();
    renderReplyChannels();
  }
  renderListSoon();
}

function applyCustomer(customer) {
  state.customers.set(customer.id, customer);
  if (state.open && state.open.customer.id === customer.id) {
    state.open.customer = customer;
    renderConversationHead();
  }
  renderListSoon();
}

function onSignal(message) {
  const agentId = message.agent_id;
  if (message.kind === "offer" || message.kind === "offer_ended") {
    if (state.me && agentId === state.me.id && message.conversation_id) onOffer(message);
    return;
  }
  if (message.kind === "presence") {
    const presence = message.presence || message.data?.presence;
    if (agentId && presence) {
      const agent = state.agents.get(agentId) || { id: agentId, name: message.name || agentId };
      state.agents.set(agentId, { ...agent, presence });
      if (state.me && agentId === state.me.id) {
        state.me.presence = presence;
        $("presence").value = presence;
      }
      if (state.open) renderAssignees();
    }
    return;
  }
  if (message.kind === "typing" && message.from === "customer" && message.conversation_id) {
    noteSignal(message.conversation_id, "customer", "customer-typing", TYPING_TTL_MS);
    return;
  }
  if (!agentId || (state.me && agentId === state.me.id) || !message.conversation_id) return;
  if (message.kind !== "viewing" && message.kind !== "typing") return;
  if (message.agent_name && !state.agents.has(agentId)) {
    state.agents.set(agentId, { id: agentId, name: message.agent_name });
  }
  if (message.active === false) {
    // Stopped typing: still viewing. Left: gone.
    const perConv = state.signals.get(message.conversation_id);
    if (message.kind === "viewing") perConv?.delete(agentId);
    else if (perConv?.get(agentId)?.kind === "typing") {
      perConv.set(agentId, { kind: "viewing", until: Date.now() + VIEWING_TTL_MS });
    }
    renderCollision();
    return;
  }
  const ttl = message.kind === "typing" ? TYPING_TTL_MS : VIEWING_TTL_MS;
  noteSignal(message.conversation_id, agentId, message.kind, ttl);
}

function noteSignal(conversationId, who, kind, ttl) {
  let perConv = state.signals.get(conversationId);
  if (!perConv) state.signals.set(conversationId, (perConv = new Map()));
  perConv.set(who, { kind, until: Date.now() + ttl });
  renderCollision();
  setTimeout(renderCollision, ttl + 50);
}

function renderCollision() {
  const notice = $("collision");
  const perConv = state.open && state.signals.get(state.open.conversation.id);
  const now = Date.now();
  const parts = [];
  for (const [agentId, signal] of perConv || []) {
    if (signal.until <= now) {
      perConv.delete(agentId);
      continue;
    }
    if (signal.kind === "customer-typing") {
      parts.push(`${state.open.customer?.display_name || "The customer"} is typing…`);
    } else {
      parts.push(`${agentName(agentId)} is ${signal.kind === "typing" ? "replying" : "viewing"}`);
    }
  }
  const text = parts.join(" · ");
  if (notice.textContent !== text) notice.textContent = text;
  notice.hidden = !text;
}

// --- offers (queues where the agent must accept) -----------------------------------------

function onOffer(message) {
  const id = message.conversation_id;
  if (message.kind === "offer_ended") {
    state.offers.delete(id);
  } else {
    const expiresAt = message.expires_at ? new Date(message.expires_at).getTime() : Date.now() + 30000;
    state.offers.set(id, { queue: message.queue || null, expiresAt });
    if (!state.convs.has(id)) fetchConversation(id);
    setTimeout(renderOffers, Math.max(0, expiresAt - Date.now()) + 100);
  }
  renderOffers();
}

let offersShown = "";
function renderOffers() {
  const now = Date.now();
  const shown = [];
  for (const [id, offer] of state.offers) {
    if (offer.expiresAt <= now) {
      state.offers.delete(id); // lapsed: the router has moved on
      continue;
    }
    const conv = state.convs.get(id);
    const name = (conv && state.customers.get(conv.customer_id)?.display_name) || "A customer";
    shown.push({ id, offer, name });
  }
  // Rebuild only on change, so that a focused Accept button keeps its focus.
  const key = JSON.stringify(shown.map(({ id, offer, name }) => [id, name, offer.queue, offer.expiresAt]));
  if (key === offersShown) return;
  offersShown = key;
  const list = clear($("offer-list"));
  for (const { id, offer, name } of shown) {
    const until = new Date(offer.expiresAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    list.append(
      h(
        "li",
        { class: "offer", dataset: { id } },
        h("span", {}, `${name} is waiting`, offer.queue ? ` (queue ${offer.queue})` : "", ` · answer by ${until}`),
        h("button", { type: "button", onclick: () => answerOffer(id, true) }, "Accept"),
        h("button", { type: "button", class: "secondary", onclick: () => answerOffer(id, false) }, "Decline"),
      ),
    );
  }
  $("offers").hidden = state.offers.size === 0;
}

async function answerOffer(id, accept) {
  state.offers.delete(id);
  renderOffers();
  try {
    const data = await api("POST", `/conversations/${encodeURIComponent(id)}/${accept ? "accept" : "decline"}`);
    if (accept) {
      if (data && data.conversation) await applyConversation(data.conversation);
      openConversation(id);
    }
  } catch (err) {
    $("live-state").textContent = `Offer: ${err.message}`;
  }
}

// --- wiring --------------------------------------------------------------------------

function wire() {
  setUnauthorizedHandler(() => signOut("Your session has ended. Sign in again."));
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut());
  $("presence").addEventListener("change", changePresence);
  $("filters").addEventListener("change", changeFilters);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("load-more").addEventListener("click", () => loadList(false));
  $("load-older").addEventListener("click", loadOlder);
  $("back").addEventListener("click", closeConversationOnPhone);
  $("reply-form").addEventListener("submit", sendReply);
  $("reply-text").addEventListener("keydown", onReplyKey);
  $("reply-text").addEventListener("input", onReplyInput);
  $("reply-note").addEventListener("change", syncNoteMode);
  $("reply-channel").addEventListener("change", (e) => (e.target.dataset.picked = "1"));
  $("assign").addEventListener("click", () => assign($("assignee").value));
  $("assign-me").addEventListener("click", () => assign(state.me?.id));
  for (const button of document.querySelectorAll(".status-btn")) {
    button.addEventListener("click", () => setStatus(button.dataset.status));
  }
  $("tags-form").addEventListener("submit", saveTags);
  // On a phone the timeline needs the room; the actions stay one tap away.
  if (matchMedia("(max-width: 720px)").matches) document.querySelector(".actions").open = false;
  setInterval(() => {
    if (state.open && document.visibilityState === "visible") {
      live.send({ type: "viewing", conversation_id: state.open.conversation.id });
    }
  }, VIEWING_EVERY_MS);
  setInterval(renderListSoon, 60000); // keep the "5 min" ages honest
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.open) {
      markRead(state.open.conversation.id);
      renderListSoon();
    }
  });
}

wire();
if (session.token) enterApp();
else showSignin();
