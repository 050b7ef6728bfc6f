// The agent WebSocket: reconnects with capped, jittered exponential backoff so that a
// hub restart is not met by every open inbox reconnecting in the same instant.

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 30000;

export class Live {
  /**
   * handlers: {message(msg), open(isReconnect), state(text), signedOut(), closed(failures)}.
   * tokenFn is asked at every (re)connect, so a new sign-in uses the new token.
   */
  constructor(tokenFn, handlers) {
    this.tokenFn = tokenFn;
    this.handlers = handlers;
    this.ws = null;
    this.failures = 0;
    this.timer = null;
    this.stopped = true;
    this.connectedOnce = false;
  }

  start() {
    this.stopped = false;
    this.failures = 0;
    this.connectedOnce = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "signed out");
    }
  }

  /** Send a JSON frame if connected; signals are best-effort by nature. */
  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  connect() {
    const token = this.tokenFn();
    if (this.stopped || !token) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/api/v1/ws?token=${encodeURIComponent(token)}`;
    const ws = new WebSocket(url);
    this.ws = ws;
    this.handlers.state(this.connectedOnce ? "Reconnecting…" : "Connecting…");
    ws.addEventListener("open", () => {
      if (this.ws !== ws) return;
      this.failures = 0;
      this.handlers.state("Live");
      this.handlers.open(this.connectedOnce);
      this.connectedOnce = true;
    });
    ws.addEventListener("message", (event) => {
      if (this.ws !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to interpret
      }
      if (message && typeof message === "object") this.handlers.message(message);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (event.code === 4401) {
        // Signed out (expired or revoked token): retrying with it cannot succeed.
        this.stopped = true;
        this.handlers.signedOut?.();
        return;
      }
      this.failures += 1;
      const ceiling = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** (this.failures - 1));
      const delay = ceiling / 2 + Math.random() * (ceiling / 2);
      this.handlers.state(`Offline, retrying in ${Math.ceil(delay / 1000)} s`);
      this.handlers.closed?.(this.failures);
      this.timer = setTimeout(() => this.connect(), delay);
    });
  }
}
