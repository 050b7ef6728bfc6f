// The REST client: bearer token from sessionStorage (per tab, gone when the tab
// closes, never sent automatically like a cookie, so no CSRF surface).

const TOKEN_KEY = "hub.inbox.token";
const AGENT_KEY = "hub.inbox.agent";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  get agent() {
    try {
      return JSON.parse(sessionStorage.getItem(AGENT_KEY) || "null");
    } catch {
      return null;
    }
  },
  save(token, agent) {
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(AGENT_KEY, JSON.stringify(agent));
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(AGENT_KEY);
  },
};

// Called on any 401 so the page can drop to the sign-in form.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "The hub cannot be reached. Check the connection and retry.");
  }
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message = (data && typeof data.error === "string" && data.error) || response.statusText;
    if (response.status === 401 && !path.startsWith("/auth/login")) onUnauthorized();
    throw new ApiError(response.status, message || `HTTP ${response.status}`);
  }
  return data;
}

/** Query string from an object, skipping empty values. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
