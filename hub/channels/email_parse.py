"""Raw RFC 5322 bytes -> the pieces of an `Inbound` (stdlib modern email API).

Nothing here does I/O or knows the hub's channels: the adapter decides what to store
(attachment blobs, threading lookups). Parsing never raises on bad input: a broken
charset decodes with replacement characters, a broken header falls back to its raw
text, and a part that cannot be decoded is skipped (and counted in `defects`).
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import mimetypes
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import getaddresses, parseaddr, parsedate_to_datetime

import nh3

from hub.channels.email_text import Folded, fold, html_to_text, tidy

# Set on every mail the hub sends (email_compose), read back from bounces.
HUB_EVENT_HEADER = "X-Hub-Event-Id"

_MSGID = re.compile(r"<[^<>\s]+>")
_FORWARD_SUBJECT = re.compile(r"^\s*(fwd?|fw|tr|wg|rv)\s*:", re.IGNORECASE)
_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|antw|réf|ref|fwd?|fw|tr|wg|rv)\s*:\s*)+", re.I)

# Precedence values that mark machine-sent mail (RFC 3834 section 3.1.8 and practice).
_AUTO_PRECEDENCE = {"bulk", "junk", "auto_reply"}
_AUTO_FLAG_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Auto-Reply")

# Sanitizing: nh3's safe defaults plus "cid:" image links, which point at the mail's own
# inline parts; the inbox maps them to stored attachments.
_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid"}
# Dropped with their content, not just their tags: nobody should read a <title> or CSS.
_DROP_WITH_CONTENT = {"script", "style", "title", "head", "noscript", "template"}


@dataclass(frozen=True, slots=True)
class ParsedAttachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Bounce:
    """What a delivery status notification (RFC 3464) says about a failed message."""

    original_message_id: str | None
    # The X-Hub-Event-Id header the hub puts on what it sends: survives relays that
    # rewrite Message-IDs.
    original_event_id: str | None
    recipient: str | None
    action: str | None
    status: str | None
    diagnostic: str


@dataclass(frozen=True, slots=True)
class ParsedMail:
    external_id: str  # the Message-ID, or "sha256:<hex>" of the raw bytes without one
    message_id: str | None
    from_address: str | None
    display_name: str | None
    sender_candidates: tuple[str, ...]  # From, then Reply-To, Sender, Return-Path
    to: tuple[str, ...]
    cc: tuple[str, ...]
    delivered_to: tuple[str, ...]  # Delivered-To, X-Original-To, Envelope-To
    subject: str
    date: datetime | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    text: str  # the new words: quotes and signature folded away
    full_text: str
    quoted: str
    signature: str
    html: str | None  # sanitized
    attachments: tuple[ParsedAttachment, ...]
    auto_reason: str | None  # why this is machine mail (auto-reply, bulk, bounce)
    bounce: Bounce | None
    forwarded: bool
    defects: tuple[str, ...] = field(default=())

    @property
    def thread_refs(self) -> tuple[str, ...]:
        """Message-IDs this mail answers, nearest first, without repeats."""
        seen: dict[str, None] = {}
        for ref in (*self.in_reply_to, *reversed(self.references)):
            seen.setdefault(ref, None)
        return tuple(seen)


# --- headers -------------------------------------------------------------------------


def _raw_header(msg: Message, name: str) -> list[str]:
    lowered = name.lower()
    return [str(value) for key, value in msg.raw_items() if key.lower() == lowered]


def header_text(msg: Message, name: str) -> str:
    """A header's decoded text, or "" when absent; never raises on malformed input."""
    try:
        value = msg.get(name)
        if value is None:
            return ""
        return str(value).strip()
    except Exception:  # defective header the modern parser chokes on
        raw = _raw_header(msg, name)
        if not raw:
            return ""
        try:
            return str(make_header(decode_header(raw[0]))).strip()
        except Exception:
            return raw[0].strip()


def header_addresses(msg: Message, name: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address header, every occurrence."""
    pairs: list[tuple[str, str]] = []
    try:
        for value in msg.get_all(name) or ():
            for addr in getattr(value, "addresses", ()):
                if addr.addr_spec and "@" in addr.addr_spec:
                    pairs.append((addr.display_name or "", addr.addr_spec))
    except Exception:
        pairs = []
    if not pairs:
        raw = _raw_header(msg, name)
        decoded = []
        for value in raw:
            try:
                decoded.append(str(make_header(decode_header(value))))
            except Exception:
                decoded.append(value)
        pairs = [(n, a) for n, a in getaddresses(decoded) if "@" in a]
    return [(name_.strip().strip('"'), addr.strip().strip("<>")) for name_, addr in pairs]


def message_ids(value: str) -> tuple[str, ...]:
    """The <id> tokens of a Message-ID / In-Reply-To / References header, in order."""
    found = _MSGID.findall(value)
    if not found and value.strip() and " " not in value.strip():
        # A bare id without brackets (seen from broken clients): normalize it.
        found = [f"<{value.strip()}>"]
    return tuple(dict.fromkeys(found))


def strip_reply_prefix(subject: str) -> str:
    return _REPLY_PREFIX.sub("", subject).strip()


# --- bodies --------------------------------------------------------------------------

_LATIN1_ALIASES = {"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "us-ascii", "ascii"}


def decode_text(payload: bytes, charset: str | None) -> str:
    """Bytes of a text part -> str, for every charset a mail client may claim.

    ASCII and Latin-1 labels are read as Windows-1252, like browsers do (Outlook's curly
    quotes are 0x91-0x94 under an ISO-8859-1 label). An unknown or absent charset tries
    UTF-8, then Windows-1252; a wrong one still decodes, with U+FFFD for bad bytes.
    """
    label = (charset or "").strip().strip('"').lower()
    if label in _LATIN1_ALIASES or not label:
        try:
            return payload.decode("utf-8") if not label else payload.decode("ascii")
        except UnicodeDecodeError:
            if not label or label in ("us-ascii", "ascii"):
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return payload.decode("cp1252", errors="replace")
    try:
        return payload.decode(label, errors="replace")
    except (LookupError, ValueError):
        # Unknown codec, or a label no codec name can be ("utf-8\x00": ValueError).
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.decode("cp1252", errors="replace")


def part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", errors="replace")
    return decode_text(payload, part.get_content_charset())


def sanitize_html(html: str) -> str:
    return nh3.clean(html, url_schemes=_URL_SCHEMES, clean_content_tags=_DROP_WITH_CONTENT)


def _leaves(part: Message) -> list[Message]:
    """Leaf parts in document order; attached messages (message/*) count as leaves."""
    if part.get_content_maintype() == "multipart":
        out: list[Message] = []
        payload = part.get_payload()
        if isinstance(payload, list):
            for child in payload:
                out.extend(_leaves(child))
        return out
    return [part]


def _is_attachment(part: Message) -> bool:
    disposition = (part.get_content_disposition() or "").lower()
    return disposition == "attachment" or bool(part.get_filename())


def _attachment_of(part: Message, index: int) -> ParsedAttachment | None:
    content_type = part.get_content_type()
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        inner_msg = inner[0] if isinstance(inner, list) and inner else None
        if inner_msg is None:
            return None
        try:
            data = inner_msg.as_bytes(policy=email.policy.SMTP)
        except Exception:
            data = str(inner_msg).encode("utf-8", errors="replace")
        subject = header_text(inner_msg, "Subject")
        name = part.get_filename() or (_safe_name(subject) or "message") + ".eml"
        return ParsedAttachment(name, content_type, data)
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return None
    filename = part.get_filename()
    content_id = header_text(part, "Content-ID").strip("<> ") or None
    if not filename:
        ext = mimetypes.guess_extension(content_type) or ".bin"
        filename = f"{content_id or f'attachment-{index}'}{ext}"
    disposition = (part.get_content_disposition() or "").lower()
    inline = disposition == "inline" or (content_id is not None and disposition != "attachment")
    return ParsedAttachment(
        _safe_name(filename) or "attachment", content_type, data, content_id, inline
    )


def _safe_name(name: str) -> str:
    """A file name fit to show and to offer as a download: no paths, no control chars."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().strip(".")
    return name[:200]


# --- machine mail --------------------------------------------------------------------


def _auto_reason(msg: Message, bounce: Bounce | None) -> str | None:
    if bounce is not None:
        return "bounce"
    auto = header_text(msg, "Auto-Submitted").lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"auto-submitted: {auto.split(';')[0].strip()}"
    precedence = header_text(msg, "Precedence").lower()
    if precedence in _AUTO_PRECEDENCE:
        return f"precedence: {precedence}"
    for name in _AUTO_FLAG_HEADERS:
        value = header_text(msg, name)
        if value and value.lower() not in ("no", "false", "0"):
            return f"{name.lower()}: {value.lower()[:40]}"
    return_path = header_text(msg, "Return-Path")
    if return_path.strip() == "<>":
        return "null return path"
    return None


def _delivery_status_fields(part: Message) -> list[Message]:
    """The field groups of a message/delivery-status part (per message, per recipient)."""
    payload = part.get_payload()
    if isinstance(payload, list) and all(isinstance(p, Message) for p in payload):
        return list(payload)
    text = payload if isinstance(payload, str) else ""
    groups = [g for g in re.split(r"\r?\n\r?\n", text) if g.strip()]
    return [email.message_from_string(g + "\n", policy=email.policy.compat32) for g in groups]


def _bounce_of(msg: Message) -> Bounce | None:
    if msg.get_content_type() != "multipart/report":
        return None
    report_type = (msg.get_param("report-type") or "").lower()
    if report_type and report_type != "delivery-status":
        return None  # e.g. a disposition (read receipt) report
    leaves = _leaves(msg)
    recipient = action = status = None
    diagnostic = ""
    original_id: str | None = None
    original_event: str | None = None
    human = ""
    for part in leaves:
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            for group in _delivery_status_fields(part):
                if group.get("Final-Recipient") or group.get("Original-Recipient"):
                    if action is not None and (action or "").lower() == "failed":
                        continue  # report the first failed recipient
                    rcpt = str(group.get("Final-Recipient") or group.get("Original-Recipient"))
                    recipient = rcpt.split(";", 1)[-1].strip()
                    action = str(group.get("Action") or "").strip() or None
                    status = str(group.get("Status") or "").strip() or None
                    diag = str(group.get("Diagnostic-Code") or "")
                    diagnostic = re.sub(r"\s+", " ", diag.split(";", 1)[-1]).strip()
        elif ctype == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                ids = message_ids(header_text(inner[0], "Message-ID"))
                original_id = original_id or (ids[0] if ids else None)
                original_event = original_event or header_text(inner[0], HUB_EVENT_HEADER)
        elif ctype == "text/rfc822-headers":
            headers = email.message_from_string(part_text(part), policy=email.policy.default)
            ids = message_ids(header_text(headers, "Message-ID"))
            original_id = original_id or (ids[0] if ids else None)
            original_event = original_event or header_text(headers, HUB_EVENT_HEADER)
        elif ctype == "text/plain" and not human:
            human = part_text(part)
    if not diagnostic:
        first = next((line.strip() for line in human.splitlines() if line.strip()), "")
        diagnostic = status or first or "delivery failed"
    # Action "delayed", "delivered", "relayed", "expanded" is informational: the adapter
    # fails the outbound message only for "failed".
    return Bounce(
        original_message_id=original_id,
        original_event_id=original_event or None,
        recipient=recipient,
        action=(action or "failed").lower(),
        status=status,
        diagnostic=diagnostic,
    )


# --- the whole mail ------------------------------------------------------------------


def parse_message(raw: bytes) -> ParsedMail:
    try:
        return _parse_message(raw)
    except RecursionError:
        # MIME parts or address comments nested thousands deep exhaust the stack of the
        # stdlib's recursive parsers. Raising would fail the whole fetched batch again and
        # again; such a mail is kept as unreadable instead (no sender: nobody to file it
        # under), which the adapter logs and skips.
        return _unparsable(raw)


def _unparsable(raw: bytes) -> ParsedMail:
    return ParsedMail(
        external_id="sha256:" + hashlib.sha256(raw).hexdigest(),
        message_id=None,
        from_address=None,
        display_name=None,
        sender_candidates=(),
        to=(),
        cc=(),
        delivered_to=(),
        subject="",
        date=None,
        in_reply_to=(),
        references=(),
        text="",
        full_text="",
        quoted="",
        signature="",
        html=None,
        attachments=(),
        auto_reason=None,
        bounce=None,
        forwarded=False,
        defects=("NestedTooDeeply",),
    )


def _parse_message(raw: bytes) -> ParsedMail:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    defects = [type(d).__name__ for d in msg.defects]

    ids = message_ids(header_text(msg, "Message-ID"))
    message_id = ids[0] if ids else None
    external_id = message_id or "sha256:" + hashlib.sha256(raw).hexdigest()

    from_pairs = header_addresses(msg, "From")
    display_name = from_pairs[0][0] if from_pairs and from_pairs[0][0] else None
    candidates: list[str] = [a for _, a in from_pairs]
    for name in ("Reply-To", "Sender"):
        candidates.extend(a for _, a in header_addresses(msg, name))
    return_path = parseaddr(header_text(msg, "Return-Path"))[1]
    if return_path:
        candidates.append(return_path)

    date: datetime | None = None
    try:
        date_value = msg.get("Date")
        date = getattr(date_value, "datetime", None) if date_value is not None else None
    except Exception:
        try:
            date = parsedate_to_datetime(header_text(msg, "Date"))
        except Exception:
            date = None

    subject = header_text(msg, "Subject")
    bounce = _bounce_of(msg)

    text_part: Message | None = None
    html_part: Message | None = None
    try:
        if isinstance(msg, EmailMessage):
            text_part = msg.get_body(preferencelist=("plain",))
            html_part = msg.get_body(preferencelist=("html",))
    except Exception:
        defects.append("BodyLookupFailed")

    leaves = _leaves(msg)
    if text_part is None and html_part is None:
        # get_body found nothing (odd structures): take the first inline text leaf.
        for part in leaves:
            if part.get_content_maintype() == "text" and not _is_attachment(part):
                if part.get_content_subtype() == "html":
                    html_part = part
                else:
                    text_part = part
                break

    html: str | None = None
    if html_part is not None:
        try:
            html = sanitize_html(part_text(html_part))
        except Exception:
            defects.append("HtmlDecodeFailed")
    texts: list[str] = []
    if text_part is not None:
        try:
            texts.append(part_text(text_part))
        except Exception:
            defects.append("TextDecodeFailed")

    attachments: list[ParsedAttachment] = []
    report_parts = bounce is not None
    for index, part in enumerate(leaves, start=1):
        if part is text_part or part is html_part:
            continue
        ctype = part.get_content_type()
        if report_parts and ctype in (
            "message/delivery-status",
            "message/rfc822",
            "text/rfc822-headers",
            "message/global-delivery-status",
            "message/global-headers",
        ):
            continue  # a bounce's machinery: read into `bounce`, not kept as files
        if ctype == "text/plain" and not _is_attachment(part):
            # Apple Mail splits the text around inline attachments into several parts.
            if text_part is not None or html_part is None:
                try:
                    texts.append(part_text(part))
                except Exception:
                    defects.append("TextDecodeFailed")
            continue
        if ctype == "text/html" and not _is_attachment(part):
            continue  # further HTML alternatives add nothing for the agent
        try:
            attachment = _attachment_of(part, index)
        except Exception:
            defects.append("AttachmentDecodeFailed")
            continue
        if attachment is not None:
            attachments.append(attachment)

    full_text = tidy("\n\n".join(t for t in texts if t.strip()))
    if not full_text and html is not None:
        full_text = html_to_text(html)

    forwarded = bool(_FORWARD_SUBJECT.match(subject))
    folded: Folded = fold(full_text, keep_quotes=forwarded)

    return ParsedMail(
        external_id=external_id,
        message_id=message_id,
        from_address=from_pairs[0][1] if from_pairs else None,
        display_name=display_name,
        sender_candidates=tuple(dict.fromkeys(candidates)),
        to=tuple(a for _, a in header_addresses(msg, "To")),
        cc=tuple(a for _, a in header_addresses(msg, "Cc")),
        delivered_to=tuple(
            a
            for name in ("Delivered-To", "X-Original-To", "Envelope-To")
            for _, a in header_addresses(msg, name)
        ),
        subject=subject,
        date=date,
        in_reply_to=message_ids(header_text(msg, "In-Reply-To")),
        references=message_ids(header_text(msg, "References")),
        text=folded.text,
        full_text=full_text,
        quoted=folded.quoted,
        signature=folded.signature,
        html=html,
        attachments=tuple(attachments),
        auto_reason=_auto_reason(msg, bounce),
        bounce=bounce,
        forwarded=forwarded,
        defects=tuple(dict.fromkeys(defects)),
    )
