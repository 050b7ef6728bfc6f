"""What the SMS and voice adapters share about Twilio: webhook signatures and the REST client.

Signatures: Twilio signs each webhook with HMAC-SHA1 (auth token as key) over the URL it
requested (with its query string) followed by every POST parameter, sorted by name, as
name+value. Behind a proxy or on another port the URL this process sees is not the one
Twilio requested, so the URL is rebuilt from the configured public URL (the one pasted
into Twilio's console) plus the path and query this request carries.

REST: the official client with its asyncio HTTP client. Its API domains are hard-wired to
https://*.twilio.com; `api_base_url` rewrites every request's origin so tests (and
anyone running a Twilio-compatible gateway) point it somewhere else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from hub.channels.base import HubServices, PermanentSendError, TemporarySendError

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
TWIML_CONTENT_TYPE = "text/xml"
FORM_CONTENT_TYPES = ("application/x-www-form-urlencoded", "")
# Long enough for Twilio on a bad day, short enough that a dead link frees the outbox lease.
DEFAULT_TIMEOUT_SECONDS = 15.0

# Messages Twilio sends without an ErrorMessage; the agent sees "code: text".
ERROR_TEXTS: Mapping[str, str] = {
    "21211": "Invalid 'To' phone number",
    "21408": "Permission to send an SMS has not been enabled for the region",
    "21610": "Attempt to send to unsubscribed recipient",
    "21612": "The 'To' phone number is not currently reachable via SMS",
    "21614": "'To' number is not a valid mobile number",
    "30001": "Queue overflow",
    "30002": "Account suspended",
    "30003": "Unreachable destination handset",
    "30004": "Message blocked",
    "30005": "Unknown destination handset",
    "30006": "Landline or unreachable carrier",
    "30007": "Message filtered by the carrier",
    "30008": "Unknown error",
    "30010": "Message price exceeds max price",
}


def describe_error(code: str | int | None, message: str | None = None) -> str | None:
    """`"30005: Unknown destination handset"`, or None when there is no error."""
    if code in (None, "", 0, "0"):
        return message or None
    text = message or ERROR_TEXTS.get(str(code), "see https://www.twilio.com/docs/errors")
    return f"{code}: {text}"


class WebhookVerifier:
    """Checks X-Twilio-Signature against the URL Twilio was told to call."""

    def __init__(self, auth_token: str, public_url: str) -> None:
        self._validator = RequestValidator(auth_token)
        # Keyed once; each request copies it (the key's pads are not recomputed).
        self._mac = hmac.new(auth_token.encode("utf-8"), digestmod=hashlib.sha1)
        parts = urlsplit(public_url)
        # Keep scheme, host, port and any path prefix the proxy strips before us.
        self._origin = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def url_for(self, request: web.Request) -> str:
        """The URL Twilio signed: public origin + this request's raw path and query."""
        return self._origin + request.raw_path

    def public(self, path: str) -> str:
        """An absolute public URL for one of our routes (callbacks, TwiML actions)."""
        return self._origin + path

    def signature(self, url: str, form: MultiDictProxy[str]) -> str:
        """Twilio's HMAC-SHA1 signature of `url` and `form`, as `RequestValidator`
        computes it (each distinct name, sorted, followed by each of its distinct values,
        sorted), in half its time."""
        items = form.items()
        # A repeated (name, value) pair counts once; Twilio's forms rarely have one.
        pairs = sorted(items) if len(form) == len(set(form)) else sorted(set(items))
        mac = self._mac.copy()
        mac.update((url + "".join([name + value for name, value in pairs])).encode("utf-8"))
        return base64.b64encode(mac.digest()).decode()

    async def verified_form(self, request: web.Request) -> MultiDictProxy[str]:
        """The POSTed form if the signature is right; 403 (before anything is stored) if not.

        Form parsing stays under the app's client_max_size, so a huge body is a 413.
        """
        signature = request.headers.get(SIGNATURE_HEADER, "")
        if not signature:
            log.warning("twilio.signature_missing", path=request.path)
            raise web.HTTPForbidden(text="missing X-Twilio-Signature")
        if not signature.isascii():
            # Signatures are base64; raw header bytes arrive as surrogates, which the
            # HMAC comparison below can't encode.
            raise web.HTTPForbidden(text="invalid X-Twilio-Signature")
        if request.method == "POST":
            if request.content_type not in FORM_CONTENT_TYPES:
                # Twilio only ever posts forms; anything else could not have been signed so.
                raise web.HTTPForbidden(text="invalid X-Twilio-Signature")
            try:
                form: MultiDictProxy[str] = await request.post()  # type: ignore[assignment]
            except (ValueError, LookupError):
                # Bytes that are not text in the declared charset, or a charset Python
                # doesn't know (UnicodeDecodeError is a ValueError): not a form at all.
                raise web.HTTPBadRequest(text="body is not a form in its charset") from None
        else:
            form = MultiDictProxy(MultiDict())
        url = self.url_for(request)
        # One HMAC over the exact URL answers nearly every request; the validator's slower
        # check (URL with and without the default port, as Twilio's own signing has
        # varied on that) runs only when that one misses.
        exact = self.signature(url, form)
        if not hmac.compare_digest(exact.encode(), signature.encode()) and not (
            self._validator.validate(url, form, signature)
        ):
            log.warning("twilio.signature_invalid", path=request.path)
            raise web.HTTPForbidden(text="invalid X-Twilio-Signature")
        return form


class TwilioHttpClient(AsyncTwilioHttpClient):
    """The library's aiohttp client with a default timeout and an optional base URL.

    The library passes timeout=None per request, which aiohttp reads as "no timeout at
    all"; a stuck connection would then hold an outbox lease forever.
    """

    def __init__(self, base_url: str | None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        super().__init__(timeout=timeout)
        self._base = urlsplit(base_url.rstrip("/")) if base_url else None
        self._default_timeout = timeout

    def rewrite(self, url: str) -> str:
        if self._base is None:
            return url
        parts = urlsplit(url)
        return urlunsplit(
            (self._base.scheme, self._base.netloc, self._base.path + parts.path, parts.query, "")
        )

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the library's signature
        allow_redirects: bool = False,
    ) -> Response:
        if auth is not None:
            # As a header: aiohttp deprecates the `auth=` argument the library would use.
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            headers = {**(headers or {}), "Authorization": f"Basic {token}"}
        return await super().request(
            method,
            self.rewrite(url),
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout if timeout is not None else self._default_timeout,
            allow_redirects=allow_redirects,
        )


def build_client(
    account_sid: str, auth_token: str, base_url: str | None
) -> tuple[Client, TwilioHttpClient]:
    """The official client on our HTTP client; close the second one on shutdown.

    Must run inside the event loop (the HTTP client opens its aiohttp session at once).
    The explicit environment keeps TWILIO_EDGE/TWILIO_REGION of the process from sending
    requests to another host than the configured one.
    """
    http = TwilioHttpClient(base_url)
    no_env = {"TWILIO_EDGE": "", "TWILIO_REGION": ""}
    client = Client(account_sid, auth_token, http_client=http, environment=no_env)
    return client, http


def _rest_message(exc: TwilioRestException) -> str:
    # The library prefixes Twilio's own message with its operation ("Unable to create
    # record: "); the agent wants Twilio's words.
    msg = str(exc.msg or "")
    _, sep, rest = msg.partition(": ")
    return rest if sep and msg.startswith("Unable to ") else msg


def send_error(exc: Exception, what: str) -> Exception:
    """Map a failed REST call to the outbox's retry decision, with a readable reason."""
    status: int
    code: Any
    message: str
    if isinstance(exc, TwilioRestException):
        status, code, message = exc.status, exc.code, _rest_message(exc)
    elif isinstance(exc, TwilioServiceException):
        status, code = exc.status, exc.code
        message = exc.detail or exc.title
    else:
        return TemporarySendError(f"{what}: Twilio unreachable ({type(exc).__name__}: {exc})")
    reason = f"Twilio error {code}: {message}" if code and code != status else message
    if status == 429 or status >= 500:
        return TemporarySendError(f"{what}: HTTP {status}, {reason}")
    return PermanentSendError(reason or f"{what}: HTTP {status}")


class TwilioChannel:
    """What the SMS and voice adapters share: the signature verifier, the REST client's
    lifecycle and the started-services handle. Subclasses set `type` and their routes."""

    def __init__(self, channel: Any, config: Any) -> None:
        self.name: str = channel.name
        self.channel = channel
        self._region: str = config.hub.default_region
        self.verifier = WebhookVerifier(channel.twilio.auth_token, config.hub.public_url)
        self._services: HubServices | None = None
        self._client: Client | None = None
        self._http: TwilioHttpClient | None = None
        self._log = log.bind(channel=self.name)

    async def start(self, services: HubServices) -> None:
        self._services = services
        twilio = self.channel.twilio
        self._client, self._http = build_client(
            twilio.account_sid, twilio.auth_token, twilio.api_base_url
        )

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
            self._client = None

    def status(self) -> dict[str, Any]:
        return {"ok": True, "phone_number": self.channel.phone_number}

    @property
    def services(self) -> HubServices:
        if self._services is None:
            raise web.HTTPServiceUnavailable(text="channel not started")
        return self._services
