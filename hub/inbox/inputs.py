"""Reading and checking what API clients send, and the JSON errors they get back.

Every check happens before anything is written, so a bad request stores nothing; every
refusal is a 4xx with a message that says what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, NoReturn

import structlog
from aiohttp import web

from hub.ids import is_id
from hub.timeline.store import IdentityConflict, InvalidOperation, NotFound

log = structlog.get_logger(__name__)

_ERROR_CLASSES: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    422: web.HTTPUnprocessableEntity,
    429: web.HTTPTooManyRequests,
    503: web.HTTPServiceUnavailable,
}


def fail(status: int, message: str, **extra: Any) -> NoReturn:
    body = json.dumps({"error": message, **extra})
    if status == 413:
        # aiohttp's 413 wants sizes for its default text; ours says it all already.
        raise web.HTTPRequestEntityTooLarge(0, text=body, content_type="application/json")
    raise _ERROR_CLASSES[status](text=body, content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; the app's client_max_size already bounds its size."""
    raw = await request.read()
    if not raw.strip():
        fail(400, "send a JSON object as the request body")
    try:
        body = json.loads(raw)
        # Lone surrogates ("\\ud800") parse, but no UTF-8 store can keep them.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:  # also bad UTF-8, and integers past 4300 digits
        fail(400, f"malformed JSON: {str(exc)[:200]}")
    except RecursionError:
        fail(400, "malformed JSON: nested too deeply")
    if not isinstance(body, dict):
        fail(422, "the request body must be a JSON object")
    return body


def only_keys(body: dict[str, Any], allowed: Iterable[str]) -> None:
    """Unknown fields are refused: a typo must not be silently ignored."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        fail(422, f"unknown field(s): {', '.join(unknown)}")


def text_field(
    body: dict[str, Any], name: str, *, max_chars: int, required: bool = True
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            fail(422, f"{name}: required")
        return None
    if not isinstance(value, str):
        fail(422, f"{name}: must be a string")
    if required and not value.strip():
        fail(422, f"{name}: must not be empty")
    if len(value) > max_chars:
        fail(413, f"{name}: at most {max_chars} characters (got {len(value)})")
    return value


def name_field(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """A short identifier-like string (channel, queue, agent id)."""
    value = body.get(name)
    if value is None:
        if required:
            fail(422, f"{name}: required")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        fail(422, f"{name}: must be a non-empty string of at most 200 characters")
    return value


def string_list(body: dict[str, Any], name: str, *, max_items: int, max_chars: int) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list):
        fail(422, f"{name}: must be a list of strings")
    if len(value) > max_items:
        fail(422, f"{name}: at most {max_items} items")
    items: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            fail(422, f"{name}[{i}]: must be a non-empty string")
        if len(item) > max_chars:
            fail(422, f"{name}[{i}]: at most {max_chars} characters")
        items.append(item)
    return items


def aware_time(body: dict[str, Any], name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        fail(422, f"{name}: must be an ISO 8601 time such as 2030-01-31T09:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(422, f"{name}: not an ISO 8601 time: {value!r}")
    if parsed.tzinfo is None:
        fail(422, f"{name}: give a timezone (Z or +HH:MM), the server won't guess one")
    return parsed


def path_id(request: web.Request, what: str, name: str = "id") -> str:
    """An id from the URL; one that can't be an id is simply unknown (404)."""
    value = request.match_info[name]
    if not is_id(value):
        fail(404, f"no such {what}: {value[:40]!r}")
    return value


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        fail(400, f"{name}: must be an integer")
    if not lo <= value <= hi:
        fail(400, f"{name}: must be between {lo} and {hi}")
    return value


def cursor_query(request: web.Request, name: str = "before") -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > 200 or not raw.isprintable():
        fail(400, f"{name}: not a cursor this API returned")
    return raw


@web.middleware
async def store_errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Store refusals become the API's 404/409 with the store's own (user-fit) message."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except NotFound as exc:
        fail(404, str(exc))
    except IdentityConflict as exc:
        fail(409, str(exc), owner_id=exc.owner_id)
    except InvalidOperation as exc:
        fail(409, str(exc))
