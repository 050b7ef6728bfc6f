"""A loopback stand-in for Twilio that speaks its real wire format, both ways.

REST side (what the hub's official twilio client calls): Messages and Calls create at
/2010-04-01/Accounts/{AccountSid}/Messages.json and .../Calls.json, form-encoded, HTTP
basic auth (AccountSid:AuthToken) checked, answering 201 with the resource JSON as
Twilio shapes it, or Twilio's error JSON {code, message, more_info, status}. Failures
can be scripted (`fail_next`).

Webhook side (what Twilio posts to the hub): signed with Twilio's own algorithm, via the
official RequestValidator.compute_signature, over the URL Twilio was given (the hub's
public URL), then delivered to wherever the hub really listens on loopback, as a
reverse proxy would.

It never talks to anything but loopback addresses.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def twilio_sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _rfc2822(at: datetime) -> str:
    return format_datetime(at.astimezone(UTC))  # "Thu, 30 Jul 2015 20:12:31 +0000"


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


@dataclass
class ScriptedFailure:
    status: int
    code: int
    message: str
    times: int


@dataclass
class Received:
    """One REST request as the fake saw it."""

    method: str
    path: str
    form: dict[str, list[str]]
    auth: tuple[str, str] | None
    headers: Mapping[str, str]

    def value(self, key: str) -> str | None:
        values = self.form.get(key)
        return values[0] if values else None


@dataclass
class FakeMessage:
    sid: str
    to: str
    from_: str
    body: str
    status_callback: str | None
    media: list[str] = field(default_factory=list)


@dataclass
class FakeCall:
    sid: str
    to: str
    from_: str
    url: str | None
    status_callback: str | None


class FakeTwilio:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.validator = RequestValidator(auth_token)
        self.received: list[Received] = []
        self.messages: dict[str, FakeMessage] = {}
        self.calls: dict[str, FakeCall] = {}
        self._failures: list[ScriptedFailure] = []
        # public URL -> loopback URL: where a signed webhook is really delivered.
        self._routes: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""
        app = web.Application()
        base = f"/{API_VERSION}/Accounts/{{account}}"
        app.router.add_post(f"{base}/Messages.json", self._create_message)
        app.router.add_post(f"{base}/Calls.json", self._create_call)
        self._app = app

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{bound_port}"
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- scripting -------------------------------------------------------------------

    def fail_next(self, status: int, code: int, message: str, times: int = 1) -> None:
        """The next `times` REST creates answer this error instead of 201."""
        self._failures.append(ScriptedFailure(status, code, message, times))

    def route(self, public_url: str, loopback_url: str) -> None:
        """Deliver webhooks for URLs under `public_url` to `loopback_url` instead, as a
        reverse proxy does (stripping any path prefix of the public URL)."""
        self._routes[public_url.rstrip("/")] = loopback_url.rstrip("/")

    @property
    def sent_messages(self) -> list[Received]:
        return [r for r in self.received if r.path.endswith("/Messages.json")]

    # --- REST ------------------------------------------------------------------------

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return web.json_response(error_body(status, code, message), status=status)

    async def _common(self, request: web.Request) -> tuple[Received, web.Response | None]:
        form_data = await request.post()
        form: dict[str, list[str]] = {}
        for key, value in form_data.items():
            form.setdefault(key, []).append(str(value))
        auth = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            auth = (user, password)
        received = Received(request.method, request.path, form, auth, dict(request.headers))
        self.received.append(received)
        if auth != (self.account_sid, self.auth_token):
            return received, self._error(401, 20003, "Authenticate")
        if request.match_info["account"] != self.account_sid:
            message = f"The requested resource {request.path} was not found"
            return received, self._error(404, 20404, message)
        if self._failures:
            failure = self._failures[0]
            failure.times -= 1
            if failure.times <= 0:
                self._failures.pop(0)
            return received, self._error(failure.status, failure.code, failure.message)
        return received, None

    async def _create_message(self, request: web.Request) -> web.Response:
        received, refused = await self._common(request)
        if refused is not None:
            return refused
        to = received.value("To")
        from_ = received.value("From")
        body = received.value("Body") or ""
        media = received.form.get("MediaUrl", [])
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not from_ and not received.value("MessagingServiceSid"):
            return self._error(400, 21603, "A 'From' phone number is required.")
        if not body and not media:
            return self._error(400, 21602, "Message body is required.")
        if not _E164.match(to):
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        sid = twilio_sid("SM")
        self.messages[sid] = FakeMessage(
            sid, to, from_ or "", body, received.value("StatusCallback"), list(media)
        )
        now = _rfc2822(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        return web.json_response(
            {
                "account_sid": self.account_sid,
                "api_version": API_VERSION,
                "body": body,
                "date_created": now,
                "date_sent": None,
                "date_updated": now,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": from_,
                "messaging_service_sid": received.value("MessagingServiceSid"),
                "num_media": str(len(media)),
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "status": "queued",
                "subresource_uris": {"media": f"{uri}/Media.json"},
                "to": to,
                "uri": f"{uri}.json",
            },
            status=201,
        )

    async def _create_call(self, request: web.Request) -> web.Response:
        received, refused = await self._common(request)
        if refused is not None:
            return refused
        to = received.value("To")
        from_ = received.value("From")
        url = received.value("Url")
        if not to:
            return self._error(400, 21201, "No 'To' number is specified")
        if not from_:
            return self._error(400, 21213, "No 'From' number is specified")
        if not url and not received.value("Twiml") and not received.value("ApplicationSid"):
            return self._error(400, 21205, "Url parameter is required.")
        sid = twilio_sid("CA")
        self.calls[sid] = FakeCall(sid, to, from_, url, received.value("StatusCallback"))
        now = _rfc2822(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}"
        return web.json_response(
            {
                "account_sid": self.account_sid,
                "annotation": None,
                "answered_by": None,
                "api_version": API_VERSION,
                "caller_name": None,
                "date_created": now,
                "date_updated": now,
                "direction": "outbound-api",
                "duration": None,
                "end_time": None,
                "forwarded_from": None,
                "from": from_,
                "from_formatted": from_,
                "group_sid": None,
                "parent_call_sid": None,
                "phone_number_sid": twilio_sid("PN"),
                "price": None,
                "price_unit": "USD",
                "queue_time": "0",
                "sid": sid,
                "start_time": None,
                "status": "queued",
                "subresource_uris": {
                    "notifications": f"{uri}/Notifications.json",
                    "recordings": f"{uri}/Recordings.json",
                },
                "to": to,
                "to_formatted": to,
                "trunk_sid": None,
                "uri": f"{uri}.json",
            },
            status=201,
        )

    # --- webhooks --------------------------------------------------------------------

    def sign(self, url: str, params: Mapping[str, str]) -> str:
        return str(self.validator.compute_signature(url, dict(params)))

    def delivery_url(self, url: str) -> str:
        """Where a webhook for `url` really goes: the proxy strips the public prefix."""
        real = url
        for public, target in self._routes.items():
            if url == public or url.startswith((public + "/", public + "?")):
                real = target + url[len(public) :]
                break
        if urlsplit(real).hostname not in LOOPBACK_HOSTS:
            raise AssertionError(f"the fake delivers to loopback only, not {real}")
        return real

    async def post_webhook(
        self,
        url: str,
        params: Mapping[str, str],
        *,
        signature: str | None = None,
        signed_url: str | None = None,
    ) -> tuple[int, str]:
        """POST a form as Twilio does: signed for `signed_url` (default `url`)."""
        assert self._session is not None, "start() first"
        headers = {
            "X-Twilio-Signature": signature
            if signature is not None
            else self.sign(signed_url or url, params),
            "User-Agent": "TwilioProxy/1.1",
            "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
        }
        async with self._session.post(
            self.delivery_url(url), data=dict(params), headers=headers
        ) as response:
            return response.status, await response.text()

    async def send_status(
        self, message_sid: str, status: str, *, error_code: str | None = None
    ) -> tuple[int, str]:
        """The status callback Twilio posts for a message it was asked to send."""
        message = self.messages[message_sid]
        assert message.status_callback, "the message was sent without a StatusCallback"
        params = {
            "SmsSid": message_sid,
            "SmsStatus": status,
            "MessageStatus": status,
            "To": message.to,
            "MessageSid": message_sid,
            "AccountSid": self.account_sid,
            "From": message.from_,
            "ApiVersion": API_VERSION,
        }
        if status == "delivered":
            params["RawDlrDoneDate"] = datetime.now(UTC).strftime("%y%m%d%H%M")
        if error_code:
            params["ErrorCode"] = error_code
        return await self.post_webhook(message.status_callback, params)

    async def fetch_call_twiml(self, call_sid: str, call_status: str = "in-progress") -> str:
        """What Twilio does once the called party answers: request the call's Url."""
        call = self.calls[call_sid]
        assert call.url
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": call_status,
            "Called": call.to,
            "Caller": call.from_,
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
        }
        status, text = await self.post_webhook(call.url, params)
        assert status == 200, text
        return text

    async def end_call(self, call_sid: str, duration: int) -> tuple[int, str]:
        """The status callback of an outbound call that completed."""
        call = self.calls[call_sid]
        assert call.status_callback
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": "completed",
            "CallDuration": str(duration),
            "Duration": str((duration + 59) // 60),
            "Called": call.to,
            "Caller": call.from_,
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": "0",
            "Timestamp": _rfc2822(datetime.now(UTC)),
        }
        return await self.post_webhook(call.status_callback, params)
