"""Hostile input on every Twilio webhook: arbitrary and structured-but-wrong form bodies.

Signed bodies (X-Twilio-Signature computed with the auth token, as Twilio does) get past
the signature check and reach the handlers; unsigned and wrongly signed ones must be
refused before anything is stored. Whatever arrives, the answer is one of
200/204/400/403/404/413/422, never a 500; a 200 is well-formed TwiML; a refusal stores
nothing.

Last, raw bytes in the headers the hub reads, on every kind of route that reads them
(webhooks, the API, both WebSocket upgrades), sent over plain TCP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from hypothesis import given
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from tests.hostile.conftest import (
    ACCOUNT_SID,
    CHAT_CHANNEL,
    PUBLIC_URL,
    SHOP_CHANNEL,
    SMS_CHANNEL,
    SMS_ROUTES,
    VOICE_CHANNEL,
    VOICE_ROUTES,
    WEBHOOK_ROUTES,
    WEBHOOK_STATUSES,
    Hub,
    raw_http,
    scaled,
    sign,
    status_of,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "twilio"

# Every form field the SMS and voice handlers read, plus a few Twilio sends and we ignore.
TWILIO_KEYS = (
    "MessageSid",
    "SmsSid",
    "SmsMessageSid",
    "From",
    "To",
    "Body",
    "NumMedia",
    "OptOutType",
    "MessageStatus",
    "SmsStatus",
    "ErrorCode",
    "ErrorMessage",
    "CallSid",
    "CallStatus",
    "Direction",
    "Digits",
    "DialCallStatus",
    "DialCallDuration",
    "DialCallSid",
    "CallDuration",
    "RecordingUrl",
    "RecordingSid",
    "RecordingDuration",
    "TranscriptionStatus",
    "TranscriptionText",
    "TranscriptionSid",
    "QueuePosition",
    "AccountSid",
    *(f"MediaUrl{i}" for i in range(12)),
    *(f"MediaContentType{i}" for i in range(12)),
)

# Values of the right kind for some field, but likely wrong for the one they land in.
PLAUSIBLE = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1",
        "2",
        "11",
        "99999999999999999999999999",
        "1e9",
        "NaN",
        "+14155550123",
        "+1415555012",
        "+999",
        "4155550123",
        "client:alice",
        "anonymous",
        "SM3f0a4ec8e4f4d3c8a1e0b6f7d2c9a851",
        "CA3f0a4ec8e4f4d3c8a1e0b6f7d2c9a851",
        "RE3f0a4ec8e4f4d3c8a1e0b6f7d2c9a851",
        ACCOUNT_SID,
        "STOP",
        " start ",
        "HELP",
        "delivered",
        "failed",
        "undelivered",
        "read",
        "queued",
        "completed",
        "busy",
        "no-answer",
        "in-progress",
        "outbound-api",
        "outbound-dial",
        "inbound",
        "image/jpeg",
        "application/x-msdownload",
        "text/vcard; charset=utf-8",
        "https://api.twilio.com/2010-04-01/Accounts/x/Messages/y/Media/ME1",
        "https://",
        "javascript:alert(1)",
        "<Response><Hangup/></Response>",
        "]]><Say>owned</Say>",
        "\x00",
        "\u202e",
        "é" * 300,
        "x" * 5000,
    ]
)
TEXT = st.text(max_size=80)
VALUE = st.one_of(PLAUSIBLE, TEXT)

ROUTE = st.sampled_from(WEBHOOK_ROUTES)


def _fixtures() -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(route, params, query) of every recorded Twilio payload."""
    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        data: dict[str, Any] = json.loads(path.read_text())
        endpoint: str = data["endpoint"]
        channel = SMS_CHANNEL if endpoint.startswith("sms") else VOICE_CHANNEL
        out.append((f"/twilio/{channel}/{endpoint}", data["params"], data.get("query") or {}))
    return out


FIXTURE_CASES = _fixtures()


def check_answer(status: int, text: str) -> None:
    assert status in WEBHOOK_STATUSES, (status, text[:500])
    if status == 200:
        # Whatever Twilio gets back must be TwiML it can run: one <Response> document.
        root = ElementTree.fromstring(text.encode())
        assert root.tag == "Response", text[:500]


def check_refused_stores_nothing(hub: Hub, status: int, text: str, before: tuple[int, int]) -> None:
    if status >= 400:
        assert (hub.events(), hub.customers()) == before, (status, text[:300])


@st.composite
def structured_forms(draw: st.DrawFn) -> dict[str, str]:
    """Twilio's own field names with values that are right elsewhere, or garbage."""
    keys = draw(st.lists(st.sampled_from(TWILIO_KEYS), max_size=12, unique=True))
    form = {key: draw(VALUE) for key in keys}
    if draw(st.booleans()):
        form.update(draw(st.dictionaries(TEXT, TEXT, max_size=4)))
    return form


@st.composite
def mutated_fixtures(draw: st.DrawFn) -> tuple[str, dict[str, str], dict[str, str]]:
    """A real payload with some fields dropped, replaced, or added."""
    route, params, query = draw(st.sampled_from(FIXTURE_CASES))
    form = dict(params)
    for key in draw(st.lists(st.sampled_from(sorted(form)), max_size=4, unique=True)):
        if draw(st.booleans()):
            del form[key]
        else:
            form[key] = draw(VALUE)
    for key in draw(st.lists(st.sampled_from(TWILIO_KEYS), max_size=3, unique=True)):
        form[key] = draw(VALUE)
    if draw(st.booleans()):
        query = {k: draw(VALUE) for k in draw(st.lists(TEXT, max_size=3))} | {
            k: draw(VALUE) for k in ("agent", "queue", "kind", "to") if draw(st.booleans())
        }
    return route, form, query


@scaled(1.0)
@given(route=ROUTE, form=st.dictionaries(TEXT, TEXT, max_size=8))
async def test_signed_arbitrary_forms(hub: Hub, route: str, form: dict[str, str]) -> None:
    before = (hub.events(), hub.customers())
    status, text = await hub.post_form(route, form)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


@scaled(2.0)
@given(route=ROUTE, form=structured_forms())
async def test_signed_structured_but_wrong_forms(
    hub: Hub, route: str, form: dict[str, str]
) -> None:
    before = (hub.events(), hub.customers())
    status, text = await hub.post_form(route, form)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


@scaled(2.0)
@given(case=mutated_fixtures())
async def test_signed_mutated_real_payloads(
    hub: Hub, case: tuple[str, dict[str, str], dict[str, str]]
) -> None:
    route, form, query = case
    before = (hub.events(), hub.customers())
    status, text = await hub.post_form(route, form, query=query)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


@scaled(0.5)
@given(
    route=ROUTE,
    form=st.lists(st.tuples(st.sampled_from(TWILIO_KEYS), VALUE), max_size=10),
)
async def test_signed_repeated_fields(hub: Hub, route: str, form: list[tuple[str, str]]) -> None:
    """The same field twice (a form may repeat keys; Twilio signs every value)."""
    before = (hub.events(), hub.customers())
    status, text = await hub.post_form(route, form)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


# Ways a request can fail to be Twilio's: no signature, a made-up one, a real one for
# another URL or other parameters, one made with another account's token.
FORGERIES = st.sampled_from(["missing", "garbage", "other_url", "other_params", "other_token"])


def forged_signature(kind: str, route: str, form: dict[str, str]) -> str | None:
    if kind == "missing":
        return None
    if kind == "garbage":
        return "bm90IGEgc2lnbmF0dXJl"
    if kind == "other_url":
        return sign(f"https://evil.example{route}", form)
    if kind == "other_params":
        return sign(PUBLIC_URL + route, {**form, "Body": "forged"})
    return RequestValidator("0" * 32).compute_signature(PUBLIC_URL + route, form)


@scaled(1.0)
@given(
    case=st.one_of(st.tuples(ROUTE, structured_forms(), st.just({})), mutated_fixtures()),
    forgery=FORGERIES,
)
async def test_forged_or_unsigned_refused_and_nothing_stored(
    hub: Hub, case: tuple[str, dict[str, str], dict[str, str]], forgery: str
) -> None:
    route, form, query = case
    before = (hub.events(), hub.customers())
    signature = forged_signature(forgery, route, form)
    status, text = await hub.post_form(route, form, query=query, signature=signature, signed=False)
    assert status == 403, (status, text[:300])
    assert (hub.events(), hub.customers()) == before


CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=UTF-8",
        "application/x-www-form-urlencoded; charset=latin-1",
        "application/x-www-form-urlencoded; charset=utf-16",
        "application/x-www-form-urlencoded; charset=no-such-charset",
        "application/x-www-form-urlencoded; charset=",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/json",
        "text/xml",
        "text/plain; charset=utf-8",
        "",
        "garbage",
        ";;;",
    ]
)


@scaled(2.0)
@given(
    route=ROUTE,
    body=st.one_of(
        st.binary(max_size=400),
        st.text(max_size=200).map(lambda t: t.encode("utf-8")),
        st.sampled_from(
            [
                b"From=%ff%fe&Body=%c3%28",
                b"From=\xff\xfe&MessageSid=SM1",
                b"%",
                b"&&&===&",
                b"a=" + b"%" * 200,
                b'{"MessageSid": "SM1"}',
                b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n",
                b'--xyz\r\nContent-Disposition: form-data; name="MessageSid"\r\n\r\nSM1\r\n',
                b"\x00" * 64,
            ]
        ),
    ),
    content_type=CONTENT_TYPES,
    signature=st.sampled_from(["", "garbage", "signed-empty-form"]),
)
async def test_arbitrary_bytes(
    hub: Hub, route: str, body: bytes, content_type: str, signature: str
) -> None:
    """Bodies that are not forms at all, under every content type, signed or not."""
    headers = {"Content-Type": content_type}
    if signature == "garbage":
        headers["X-Twilio-Signature"] = "garbage"
    elif signature == "signed-empty-form":
        # Valid for an empty form: a body that parses to nothing would pass.
        headers["X-Twilio-Signature"] = sign(PUBLIC_URL + route, {})
    before = (hub.events(), hub.customers())
    status, text = await hub.post_raw(route, body, headers)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


@scaled(1.0)
@given(
    route=st.sampled_from([r for r in WEBHOOK_ROUTES if "/voice" in r]),
    form=structured_forms(),
    query=st.dictionaries(
        st.one_of(st.sampled_from(["agent", "queue", "kind", "to"]), TEXT), VALUE, max_size=4
    ),
)
async def test_signed_voice_callbacks_with_query(
    hub: Hub, route: str, form: dict[str, str], query: dict[str, str]
) -> None:
    """TwiML callbacks carry state in their query (agent, queue, kind, to): fuzz it too."""
    before = (hub.events(), hub.customers())
    status, text = await hub.post_form(route, form, query=query)
    check_answer(status, text)
    check_refused_stores_nothing(hub, status, text, before)


async def test_unknown_channel_and_route_are_404(hub: Hub) -> None:
    for path in (
        "/twilio/nope/sms",
        f"/twilio/{SMS_CHANNEL}/voice",
        f"/twilio/{VOICE_CHANNEL}/voice/nope",
        "/twilio/%00/sms",
    ):
        status, _ = await hub.post_form(path, {"MessageSid": "SM1"})
        assert status == 404, path


async def test_signed_real_payloads_reach_the_handlers(hub: Hub) -> None:
    """The fuzzing above means something only if its signatures pass: check one that must."""
    route, form, query = next(c for c in FIXTURE_CASES if c[0].endswith("/sms"))
    status, text = await hub.post_form(route, form, query=query)
    check_answer(status, text)
    assert status == 200
    assert hub.events() == 1
    for route, form, query in FIXTURE_CASES:
        status, text = await hub.post_form(route, form, query=query)
        check_answer(status, text)
        assert status == 200, (route, text[:300])


# --- raw header bytes ------------------------------------------------------------------
# Header values are bytes on the wire; aiohttp hands non-UTF-8 ones over as surrogate
# escapes, which break any code that encodes them again (HMAC keys, hashes, base64).
# No HTTP client library sends such bytes, so these requests go out over raw TCP. The
# headers the hub reads are fuzzed on every kind of route that reads them.

WS_UPGRADE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
RAW_TARGETS = st.sampled_from(
    [
        ("POST", SMS_ROUTES[0], "Content-Type: application/x-www-form-urlencoded\r\n"),
        ("POST", VOICE_ROUTES[0], "Content-Type: application/x-www-form-urlencoded\r\n"),
        ("POST", "/api/v1/auth/login", "Content-Type: application/json\r\n"),
        ("GET", "/api/v1/me", ""),
        ("GET", "/api/v1/ws?token=x", WS_UPGRADE),
        ("GET", f"/chat/{CHAT_CHANNEL}/ws", WS_UPGRADE),
        ("GET", f"/chat/{SHOP_CHANNEL}/ws", WS_UPGRADE),
        ("GET", "/inbox/", ""),
        ("GET", "/widget.js", ""),
        ("GET", "/healthz", ""),
    ]
)
RAW_HEADERS = st.sampled_from(
    [
        "X-Twilio-Signature",
        "Authorization",
        "Content-Type",
        "Origin",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Protocol",
        "Accept-Encoding",
        "If-Modified-Since",
        "Cookie",
        "Host",
    ]
)
# Anything but CR and LF, which would end the header line (a different test: framing).
RAW_BYTES = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"\xff\xfe", b"\x00", b"\x80", b"a" * 300, b"\xc3\x28", b"\xed\xa0\x80"]),
)
# What a well-formed value of each header starts with, so the bytes after it reach the
# code that reads the value, not only the code that checks its shape.
PREFIXES = {
    "Authorization": [b"Bearer ", b"bearer  "],
    "Content-Type": [b"application/x-www-form-urlencoded; charset=", b"application/json; "],
    "Origin": [b"https://", b"https://shop.example:"],
    "Cookie": [b"session="],
}


@st.composite
def raw_values(draw: st.DrawFn, header: str) -> bytes:
    prefix = draw(st.sampled_from([b"", *PREFIXES.get(header, [])]))
    return prefix + draw(RAW_BYTES)


@scaled(3.0)
@given(target=RAW_TARGETS, header=RAW_HEADERS, data=st.data())
async def test_raw_header_bytes(
    hub: Hub, target: tuple[str, str, str], header: str, data: st.DataObject
) -> None:
    value = data.draw(raw_values(header))
    method, path, extra = target
    body = b"MessageSid=SM1&From=%2B14155550123" if method == "POST" else b""
    # The fuzzed header replaces any the request would carry by that name.
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra.split("\r\n")]
    kept = [line for line in lines if line and not line.lower().startswith(header.lower() + ":")]
    head = ("\r\n".join(kept) + "\r\n").encode() + header.encode() + b": " + value + b"\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    server = hub.client.server
    before = (hub.events(), hub.customers())
    answer = await raw_http(server.host, server.port, head + body)
    status = status_of(answer)
    assert status in WEBHOOK_STATUSES | {101, 401, 405, 431}, answer[:300]
    if status >= 400:
        assert (hub.events(), hub.customers()) == before
