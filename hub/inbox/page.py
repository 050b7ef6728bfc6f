"""Serves the agents' shared-inbox page: /inbox/, its static files and the mail frame.

The page is plain HTML + ES modules (no build step). All data reaches it through
/api/v1 and the agent WebSocket; nothing here touches the store.

Security headers carry most of the weight:
- the page's CSP forbids inline script and remote images, so even a rendering bug that
  let customer text become markup could neither run code nor load a tracking pixel;
  email HTML shown in an `<iframe sandbox srcdoc>` inherits that same policy;
- "show remote images" cannot be done by loosening the srcdoc (a CSP can only ever be
  tightened by an inner document), so that one message is shown in /inbox/mail-frame
  instead: a sandboxed, opaque-origin frame served with its own policy that allows
  remote images and nothing else. See static/mailframe.js.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"

PAGE_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self' ws: wss:",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        # The sign-in form is submitted by script; without it nothing may be posted.
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

# The remote-images frame: its script only hands the message to a nested,
# script-less sandboxed srcdoc, which inherits this policy (remote images allowed).
MAIL_FRAME_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' http: https: data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'self'",
    )
)

COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

# No content hashes in file names (no build step), so browsers must revalidate every
# time; ETag/Last-Modified from FileResponse keep that to a 304.
CACHE_STATIC = "no-cache"

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Plain names only: no dots-dot, no slashes, no hidden files.
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:js|css|svg)")


def _file(path: Path, csp: str, frame_options: str | None = "DENY") -> web.FileResponse:
    headers = {
        **COMMON_HEADERS,
        "Content-Security-Policy": csp,
        "Cache-Control": CACHE_STATIC,
        "Content-Type": CONTENT_TYPES[path.suffix],
    }
    if frame_options:
        headers["X-Frame-Options"] = frame_options
    return web.FileResponse(path, headers=headers)


async def inbox_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/inbox/")


async def inbox_index(request: web.Request) -> web.StreamResponse:
    return _file(STATIC_DIR / "index.html", PAGE_CSP)


async def mail_frame(request: web.Request) -> web.StreamResponse:
    return _file(STATIC_DIR / "mailframe.html", MAIL_FRAME_CSP, frame_options="SAMEORIGIN")


async def inbox_static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not _STATIC_NAME.fullmatch(name) or not path.is_file():
        raise web.HTTPNotFound(text="no such file")
    return _file(path, PAGE_CSP)


def install(app: web.Application) -> None:
    """Add the inbox page routes; no background work, so no cleanup context."""
    app.router.add_get("/inbox", inbox_redirect)
    app.router.add_get("/inbox/", inbox_index)
    app.router.add_get("/inbox/mail-frame", mail_frame)
    app.router.add_get("/inbox/static/{name}", inbox_static)
    return None
