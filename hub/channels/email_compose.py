"""An agent's reply (`Outbound`) -> an RFC 5322 message the customer's client threads.

Pure: the adapter gathers what it needs (ids, subject, attachment bytes) beforehand.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from hub.channels.email_parse import HUB_EVENT_HEADER, sanitize_html, strip_reply_prefix

# RFC 5322 suggests trimming References in long threads; keep the first (the thread's
# root) and the newest ones so the header stays under any server's line limits.
MAX_REFERENCES = 20


@dataclass(frozen=True, slots=True)
class OutgoingAttachment:
    filename: str
    content_type: str
    data: bytes


def message_id_for(event_id: str, domain: str) -> str:
    """Stable across retries: a resend after a timeout is the same message to clients
    and to de-duplicating servers, and the customer's reply can be matched to it."""
    return f"<{event_id}@{domain}>"


def event_id_from_message_id(message_id: str, domain: str) -> str | None:
    local, _, dom = message_id.strip("<> ").partition("@")
    return local if dom.casefold() == domain.casefold() and local else None


def reply_subject(subject: str | None) -> str:
    base = strip_reply_prefix(subject or "")
    return f"Re: {base}" if base else "Re: your message"


def text_to_html(text: str) -> str:
    """A simple HTML rendering of plain text: escaped, paragraphs and line breaks kept."""
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    body = "\n".join(
        "<p>" + "<br>\n".join(html.escape(line) for line in p.split("\n")) + "</p>"
        for p in paragraphs
    )
    head = '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n'
    return f"{head}{body}\n</body></html>\n"


def _trim(refs: Sequence[str]) -> list[str]:
    unique = list(dict.fromkeys(r for r in refs if r.startswith("<") and r.endswith(">")))
    if len(unique) <= MAX_REFERENCES:
        return unique
    return [unique[0], *unique[-(MAX_REFERENCES - 1) :]]


def compose(
    *,
    event_id: str,
    from_address: str,
    from_name: str | None,
    to_address: str,
    text: str,
    html_body: str | None,
    subject: str,
    message_id: str,
    references: Sequence[str],
    in_reply_to: str | None,
    reply_to: str | None,
    date: datetime,
    attachments: Sequence[OutgoingAttachment] = (),
    auto_submitted: bool = False,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = Address(display_name=from_name or "", addr_spec=from_address)
    msg["To"] = to_address
    if reply_to:
        msg["Reply-To"] = Address(display_name=from_name or "", addr_spec=reply_to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id
    refs = _trim(references)
    if refs:
        msg["References"] = " ".join(refs)
    parent = in_reply_to or (refs[-1] if refs else None)
    if parent:
        msg["In-Reply-To"] = parent
    msg[HUB_EVENT_HEADER] = event_id
    if auto_submitted:
        msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text or "", subtype="plain", charset="utf-8", cte="quoted-printable")
    rendered = sanitize_html(html_body) if html_body else text_to_html(text or "")
    msg.add_alternative(rendered, subtype="html", charset="utf-8", cte="quoted-printable")
    for att in attachments:
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(
            att.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=att.filename,
        )
    return msg
