"""Hostile input on every parser the hub runs on outside data, called directly.

- the configuration: arbitrary text, arbitrary YAML, mutated real configurations: only
  ever ConfigError (which `hub check-config` prints), never another exception;
- MIME: arbitrary bytes and mutated real mails: parse_message never raises, and what it
  returns is bounded by the size of what it was given;
- identities, visitor tokens, email reply tokens, durations, SMS media and keywords,
  the visitor hello: only their own documented exception, or none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hub.channels.email_parse import ParsedMail, parse_message
from hub.channels.email_text import fold, html_to_text, tidy
from hub.channels.email_token import make_token, token_in_address, verify_token
from hub.channels.sms import keyword_of, parse_media
from hub.channels.twilio import describe_error
from hub.channels.visitor_tokens import InvalidToken, VisitorTokens
from hub.channels.webchat import FrameError, load_frame, parse_hello
from hub.config import ConfigError, load_config, parse_config, parse_duration
from hub.identities import InvalidIdentity, normalize, normalize_email, normalize_phone
from hub.model import IdentityKind
from tests.hostile.conftest import scaled

ROOT = Path(__file__).resolve().parent.parent.parent
EMAIL_FIXTURES = sorted((ROOT / "tests" / "fixtures" / "email").glob("*.eml"))
CONFIG_FIXTURES = sorted(
    [
        ROOT / "config" / "hub.example.yaml",
        *(ROOT / "tests" / "fixtures" / "config").rglob("*.yaml"),
    ]
)

# --- mutation of real inputs ------------------------------------------------------------

# Fragments that matter to a MIME parser: structure, encodings, charsets, nesting.
MIME_TOKENS = [
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"--",
    b"=?utf-8?b?",
    b"=?iso-8859-1?q?=E9?=",
    b"=?x-unknown?b?AAAA?=",
    b"?=",
    b"=\r\n",
    b"=FF=",
    b"Content-Type: multipart/mixed; boundary=x\r\n",
    b'Content-Type: multipart/alternative; boundary=""\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n",
    b"Content-Type: message/delivery-status\r\n",
    b'Content-Type: text/html; charset="utf-7"\r\n',
    b"Content-Type: text/plain; charset=unknown-8bit\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E9%00../../etc/passwd\r\n",
    b'From: "\\" <a@b\r\n',
    b"From: (((((comment)))) <a@example.com>\r\n",
    b"Message-ID: <<<>>>\r\n",
    b"References: " + b"<a@b> " * 50 + b"\r\n",
    b"Date: Thu, 31 Feb 99999 25:61:61 +9999\r\n",
    b"<html><script>alert(1)</script><img src=x onerror=alert(1)>",
    b"<<<<<<<<<<",
    b"\x00",
    b"\xff\xfe",
    b"\xc3\x28",
]


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes], tokens: list[bytes]) -> bytes:
    """One of `originals` with a few cuts, insertions (random or structural) and copies."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["cut", "insert", "token", "copy", "flip"]))
        if op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "token":
            data[at:at] = draw(st.sampled_from(tokens))
        elif op == "copy" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 400))]
        elif data:
            index = min(at, len(data) - 1)
            data[index] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


# --- the configuration -----------------------------------------------------------------


def parse_only_config_errors(text: str) -> None:
    try:
        parse_config(text, "fuzz.yaml", env={"PORT": "8080", "TOKEN": "x"}, base_dir=Path("/x"))
    except ConfigError as exc:
        assert exc.issues, "a ConfigError says what is wrong"
        assert all(isinstance(issue.message, str) and issue.message for issue in exc.issues)


@scaled(2.0)
@given(text=st.text(max_size=400))
def test_config_arbitrary_text(text: str) -> None:
    parse_only_config_errors(text)


SCHEMA_WORDS = [
    "hub",
    "storage",
    "channels",
    "routing",
    "agents",
    "business_hours",
    "public_url",
    "listen",
    "max_body_bytes",
    "backend",
    "path",
    "url",
    "name",
    "type",
    "sms",
    "voice",
    "email",
    "webchat",
    "twilio",
    "account_sid",
    "auth_token",
    "phone_number",
    "imap",
    "smtp",
    "host",
    "port",
    "queues",
    "skills",
    "match",
    "fallback",
    "timezone",
    "weekly",
    "mon",
    "holidays",
    "id",
    "role",
    "password_hash",
    "capacity",
    "ivr",
    "digit",
    "queue",
    "<<",
]
YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "${PORT}",
            "${MISSING}",
            "${MISSING:-9}",
            "$$",
            "${",
            "${}",
            "${:-}",
            "+14155550100",
            "09:00-17:00",
            "25:00-26:00",
            "Europe/Paris",
            "Not/AZone",
            "1h30m",
            "-5s",
            "redis://",
            "http://",
            "$argon2id$v=19$m=65536,t=3,p=4$bad$bad",
        ]
    ),
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(SCHEMA_WORDS), st.text(max_size=8)), inner, max_size=5
        ),
    ),
    max_leaves=25,
)


@scaled(2.0)
@given(
    document=st.dictionaries(st.sampled_from(SCHEMA_WORDS), YAML_VALUES, max_size=6),
)
def test_config_arbitrary_yaml_in_the_schema_words(document: dict[str, Any]) -> None:
    parse_only_config_errors(yaml.safe_dump(document, allow_unicode=True))


CONFIG_TOKENS = [
    b"\n",
    b"  ",
    b"- ",
    b": ",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!python/object:os.system ",
    b"!custom ",
    b"? ",
    b"|\n",
    b"'",
    b'"',
    b"\t",
    b"{",
    b"[",
    b"${",
    b"\x00",
    b"%YAML 1.1\n---\n",
    b"---\n",
    b"...\n",
]


@scaled(2.0)
@given(
    raw=mutated(
        [path.read_bytes() for path in CONFIG_FIXTURES if path.stat().st_size < 20_000],
        CONFIG_TOKENS,
    )
)
def test_config_mutated_real_files(raw: bytes) -> None:
    parse_only_config_errors(raw.decode("utf-8", errors="replace"))


@scaled(0.5)
@given(raw=st.binary(max_size=300))
def test_config_file_of_any_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "hub.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        load_config(path, env={})


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000,
        "{a: " * 5_000,
        "- " * 5_000 + "x",
        "a:\n" + "".join(" " * (depth + 1) + "a:\n" for depth in range(3_000)),
        # Aliases and merges that would explode if expanded: must stay cheap.
        "x0: &x0 {log_level: info}\n"
        + "".join(f"x{i + 1}: &x{i + 1} {{<<: [{', '.join([f'*x{i}'] * 8)}]}}\n" for i in range(9))
        + "hub: *x9\n",
        "l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
        + "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * 10)}]\n" for i in range(8))
        + "routing:\n  skills: *l8\n  queues: *l8\n",
    ],
    ids=[
        "deep-flow-seq",
        "deep-flow-map",
        "deep-block-seq",
        "deep-block-map",
        "merge-bomb",
        "alias-bomb",
    ],
)
def test_config_pathological_yaml(text: str) -> None:
    parse_only_config_errors(text)


@scaled(1.0)
@given(
    text=st.one_of(st.text(max_size=30), st.from_regex(r"(\d{1,30}[smhdx]){0,4}", fullmatch=True))
)
def test_durations(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert seconds >= 0


# --- MIME ------------------------------------------------------------------------------


def output_size(mail: ParsedMail) -> int:
    texts = [
        mail.external_id,
        mail.message_id or "",
        mail.from_address or "",
        mail.display_name or "",
        mail.subject,
        mail.text,
        mail.full_text,
        mail.quoted,
        mail.signature,
        mail.html or "",
        *mail.sender_candidates,
        *mail.to,
        *mail.cc,
        *mail.delivered_to,
        *mail.in_reply_to,
        *mail.references,
        *mail.defects,
    ]
    size = sum(len(t) for t in texts)
    size += sum(len(a.data) + len(a.filename) + len(a.content_type) for a in mail.attachments)
    if mail.bounce is not None:
        size += len(mail.bounce.diagnostic) + len(mail.bounce.recipient or "")
    return size


def parse_bounded(raw: bytes) -> ParsedMail:
    mail = parse_message(raw)
    assert isinstance(mail, ParsedMail)
    assert mail.external_id
    # Every output field comes from the input: decoding shrinks it, escaping HTML at most
    # quadruples a character ("<" -> "&lt;"), and a handful of fields repeat the text.
    assert output_size(mail) <= 12 * len(raw) + 4096, (output_size(mail), len(raw))
    # The sanitized HTML is still sanitized, however the input was mangled.
    assert "<script" not in (mail.html or "").lower()
    return mail


@scaled(2.0)
@given(raw=st.binary(max_size=2000))
def test_mime_arbitrary_bytes(raw: bytes) -> None:
    parse_bounded(raw)


@scaled(1.0)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "From",
                    "To",
                    "Cc",
                    "Reply-To",
                    "Sender",
                    "Return-Path",
                    "Subject",
                    "Date",
                    "Message-ID",
                    "In-Reply-To",
                    "References",
                    "Content-Type",
                    "Content-Transfer-Encoding",
                    "Content-Disposition",
                    "Auto-Submitted",
                    "Precedence",
                    "X-Hub-Event-Id",
                ]
            ),
            st.text(max_size=120),
        ),
        max_size=10,
    ),
    body=st.text(max_size=400),
)
def test_mime_arbitrary_headers(headers: list[tuple[str, str]], body: str) -> None:
    """Well-formed header lines with garbage values: the header parsers' hardest case."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    parse_bounded((head + "\r\n" + body).encode("utf-8", errors="surrogateescape"))


@scaled(3.0)
@given(raw=mutated([path.read_bytes() for path in EMAIL_FIXTURES], MIME_TOKENS))
def test_mime_mutated_real_mails(raw: bytes) -> None:
    parse_bounded(raw)


def _nested_multipart(depth: int) -> bytes:
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"From: a@example.com\r\n" + opening + b"Content-Type: text/plain\r\n\r\nhi" + closing


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"From: a@example.com\r\n\r\n" + b"=" * 50_000,
        _nested_multipart(50),
        _nested_multipart(3000),
        b"From: a@example.com\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"hi",
        b"From: x (" + b"(" * 5000 + b")" * 5000 + b") <a@example.com>\r\n\r\nhi",
        b'Content-Type: text/plain; name="' + b"\\" * 5000 + b'"\r\n\r\nhi',
        b"Subject: " + b"=?utf-8?b?" + b"QUFB" * 10_000 + b"?=\r\n\r\nhi",
        b"Content-Type: text/html\r\n\r\n" + b"<div>" * 20_000,
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\n\r\n" * 5_000,
    ],
    ids=[
        "empty",
        "blank",
        "equals",
        "nested-50",
        "nested-3000",
        "rfc822-3000",
        "comment-5000",
        "backslashes",
        "huge-encoded-word",
        "html-20000-divs",
        "5000-parts",
    ],
)
def test_mime_pathological_mails(raw: bytes) -> None:
    parse_bounded(raw)


@scaled(1.0)
@given(text=st.text(max_size=600))
def test_email_text_helpers(text: str) -> None:
    for out in (tidy(text), html_to_text(text)):
        assert len(out) <= 4 * len(text) + 16
    folded = fold(text)
    assert len(folded.text) + len(folded.quoted) + len(folded.signature) <= 2 * len(text) + 16


# --- identities and tokens -------------------------------------------------------------

REGIONS = st.one_of(st.sampled_from(["US", "GB", "FR", "DE", "IN", "ZZ", "", "us"]), st.none())
KINDS = st.one_of(st.sampled_from([k.value for k in IdentityKind]), st.text(max_size=8))
RAW_IDENTITIES = st.one_of(
    st.text(max_size=80),
    st.emails().map(str),
    st.from_regex(r"\+?[0-9 ()\-.]{0,25}(ext\.? ?\d{0,6})?", fullmatch=True),
    st.sampled_from(["+14155550123", "+1 (415) 555-0123", "tel:+14155550123", "+" + "9" * 50]),
)


@scaled(2.0)
@given(kind=KINDS, raw=RAW_IDENTITIES, region=REGIONS)
def test_identities_normalize(kind: str, raw: str, region: str | None) -> None:
    try:
        identity = normalize(kind, raw, default_region=region)
    except InvalidIdentity as exc:
        assert str(exc)
        return
    # Normal forms are fixed points: normalizing again changes nothing.
    assert normalize(identity.kind, identity.value, default_region=region) == identity


@scaled(1.0)
@given(raw=RAW_IDENTITIES, region=REGIONS)
def test_identity_helpers(raw: str, region: str | None) -> None:
    for call in (lambda: normalize_email(raw), lambda: normalize_phone(raw, region)):
        try:
            call()
        except InvalidIdentity:
            pass


VISITOR_TOKENS = VisitorTokens(b"k" * 32)
GOOD_TOKEN = VISITOR_TOKENS.mint("web", "visitor-0123456789")


@scaled(2.0)
@given(
    token=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=40),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=3), max_size=3),
        mutated([GOOD_TOKEN.encode()], [b".", b"=", b"-", b"_", b"\x00", b"\xff"]).map(
            lambda b: b.decode("latin-1")
        ),
    ),
    channel=st.sampled_from(["web", "other"]),
)
def test_visitor_tokens_verify(token: Any, channel: str) -> None:
    try:
        claims = VISITOR_TOKENS.verify(token, channel)
    except InvalidToken:
        return
    assert claims.channel == channel


def test_visitor_token_forged_payload_is_refused() -> None:
    """A real MAC over a payload that is not JSON, not an object, or not claims."""
    for payload in ("", "!!!!", "bnVsbA", "WzFd", "eyJjIjoid2ViIn0"):
        token = f"{GOOD_TOKEN.split('.')[0]}.{payload}.{VISITOR_TOKENS._mac(payload)}"
        with pytest.raises(InvalidToken):
            VISITOR_TOKENS.verify(token, "web")


EMAIL_SECRET = b"s" * 32


@scaled(1.0)
@given(
    token=st.one_of(
        st.text(max_size=100),
        mutated(
            [make_token(EMAIL_SECRET, "01HZZZZZZZZZZZZZZZZZZZZZZZ").encode()], [b".", b"\n"]
        ).map(lambda b: b.decode("latin-1")),
    ),
    address=st.one_of(st.text(max_size=100), st.emails().map(str)),
)
def test_email_reply_tokens(token: str, address: str) -> None:
    result = verify_token(EMAIL_SECRET, token)
    assert result is None or isinstance(result, str)
    found = token_in_address("support@example.com", address)
    assert found is None or isinstance(found, str)


# --- Twilio form helpers and the visitor hello -----------------------------------------


@scaled(1.0)
@given(
    form=st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    "NumMedia",
                    *(f"MediaUrl{i}" for i in range(12)),
                    *(f"MediaContentType{i}" for i in range(12)),
                ]
            ),
            st.text(max_size=10),
        ),
        st.one_of(st.text(max_size=60), st.sampled_from(["-1", "11", "1" * 40, "1e3", "2"])),
    ),
    body=st.text(max_size=40),
    opt_out=st.one_of(st.none(), st.text(max_size=10)),
    code=st.one_of(st.none(), st.integers(), st.text(max_size=10)),
)
def test_twilio_form_helpers(
    form: dict[str, str], body: str, opt_out: str | None, code: Any
) -> None:
    accepted, rejected = parse_media(form, "SM1")
    assert len(accepted) + len(rejected) <= 10  # Twilio's own maximum, whatever NumMedia says
    assert keyword_of(body, opt_out) in (None, "STOP", "START", "HELP")
    described = describe_error(code, form.get("ErrorMessage"))
    assert described is None or isinstance(described, str)


class _Msg:
    def __init__(self, kind: Any, data: Any) -> None:
        self.type = kind
        self.data = data


@scaled(1.0)
@given(
    data=st.one_of(
        st.text(max_size=200),
        st.dictionaries(
            st.sampled_from(
                ["type", "token", "last_event_id", "name", "email", "user_id", "user_hash"]
            ),
            st.one_of(
                st.none(), st.booleans(), st.integers(), st.text(max_size=300), st.just("hello")
            ),
        ).map(json.dumps),
    )
)
def test_visitor_hello_parser(data: str) -> None:
    from aiohttp import WSMsgType

    try:
        hello = parse_hello(_Msg(WSMsgType.TEXT, data))
    except FrameError as exc:
        assert exc.code in ("hello_required", "bad_frame")
        return
    assert all(isinstance(v, str) for v in hello.values())


@pytest.mark.parametrize(
    "text",
    ['"\\ud800"', '{"a": "\\udfff"}', "[" * 100_000, "1" * 5000, '{"a": 1e99999}'],
    ids=["lone-surrogate", "lone-low-surrogate", "deep", "huge-int", "huge-float"],
)
def test_frame_loader_refuses_what_cannot_be_kept(text: str) -> None:
    try:
        value = load_frame(text)
    except ValueError:
        return
    json.dumps(value, ensure_ascii=False).encode("utf-8")
