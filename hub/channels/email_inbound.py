"""A parsed mail -> an `Inbound`: identity, threading keys, stored attachments, flags.

Threading needs the store only to *read*: the store itself threads by the keys we hand
it (scoped to the sender, reopening resolved conversations). What we add here is the
translation of the hub's own traces, the reply+TOKEN address and the Message-IDs the
hub put on its replies, into keys the store has registered for that conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from hub.channels.blobs import BlobStore, BlobTooLarge
from hub.channels.email_compose import event_id_from_message_id
from hub.channels.email_parse import ParsedMail
from hub.channels.email_token import token_in_address, verify_token
from hub.identities import InvalidIdentity, normalize
from hub.model import (
    Attachment,
    ChannelType,
    Direction,
    Event,
    Identity,
    IdentityKind,
)
from hub.timeline.store import TimelineStore

log = structlog.get_logger(__name__)

# Bounds on what one mail may put on an event, beyond the HTTP-independent store limits.
MAX_TEXT_CHARS = 200_000
MAX_EXTRA_CHARS = 50_000  # quoted history, signature
MAX_HTML_CHARS = 500_000
# How many keys of a conversation we hand the store for one reply; a few suffice.
MAX_CONVERSATION_KEYS = 20
# How far back in a conversation we look for its keys and subject.
LOOKBACK_EVENTS = 200


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    name: str
    address: str  # the channel's own address, case-folded
    domain: str
    secret: bytes  # reply-token HMAC key


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n[…truncated]"


async def recent_events(store: TimelineStore, conversation_id: str) -> list[Event]:
    """The conversation's newest events (newest first), up to LOOKBACK_EVENTS."""
    events: list[Event] = []
    before: str | None = None
    while len(events) < LOOKBACK_EVENTS:
        page = await store.conversation_events(conversation_id, limit=100, before=before)
        events.extend(page.items)
        if page.next_cursor is None:
            break
        before = page.next_cursor
    return events


def is_message_id(value: str | None) -> bool:
    return bool(value) and value.startswith("<") and value.endswith(">") and "@" in value  # type: ignore[union-attr]


def email_keys(events: list[Event]) -> list[str]:
    """Message-IDs of a conversation's email messages (in and out), oldest first."""
    keys: list[str] = []
    for event in reversed(events):
        if event.channel_type is not ChannelType.EMAIL:
            continue
        thread_key = event.data.get("thread_key") if event.data else None
        for candidate in (event.external_id, thread_key):
            if isinstance(candidate, str) and is_message_id(candidate):
                keys.append(candidate)
    return list(dict.fromkeys(keys))


async def conversation_keys(store: TimelineStore, conversation_id: str) -> list[str]:
    keys = email_keys(await recent_events(store, conversation_id))
    return keys[-MAX_CONVERSATION_KEYS:]


async def own_event(store: TimelineStore, channel: ChannelInfo, message_id: str) -> Event | None:
    """The outbound event behind a Message-ID the hub put on a mail it sent."""
    event_id = event_id_from_message_id(message_id, channel.domain)
    event = await store.get_event(event_id) if event_id else None
    if event is None:
        event = await store.find_event(channel.name, message_id)
    if event is None or event.direction is not Direction.OUT:
        return None
    return event


async def thread_refs(
    store: TimelineStore,
    channel: ChannelInfo,
    parsed: ParsedMail,
    extra_conversations: tuple[str, ...] = (),
) -> tuple[str, ...]:
    refs = list(parsed.thread_refs)
    conversations: list[str] = list(extra_conversations)
    for address in (*parsed.to, *parsed.cc, *parsed.delivered_to):
        token = token_in_address(channel.address, address)
        if token is not None:
            conversation_id = verify_token(channel.secret, token)
            if conversation_id is not None:
                conversations.append(conversation_id)
            else:
                log.warning("email.bad_reply_token", channel=channel.name, address=address)
    for ref in parsed.thread_refs[:MAX_CONVERSATION_KEYS]:
        if event_id_from_message_id(ref, channel.domain) is None:
            continue
        event = await own_event(store, channel, ref)
        if event is not None and event.conversation_id:
            conversations.append(event.conversation_id)
    for conversation_id in dict.fromkeys(conversations):
        refs.extend(await conversation_keys(store, conversation_id))
    return tuple(dict.fromkeys(refs))


async def store_attachments(
    blobs: BlobStore, parsed: ParsedMail
) -> tuple[tuple[Attachment, ...], list[dict[str, Any]], dict[str, str]]:
    """(stored attachments, skipped ones' metadata, content-id -> blob url)."""
    stored: list[Attachment] = []
    skipped: list[dict[str, Any]] = []
    inline: dict[str, str] = {}
    for att in parsed.attachments:
        try:
            url = await asyncio.to_thread(blobs.put, att.data)
        except BlobTooLarge as exc:
            skipped.append(
                {
                    "filename": att.filename,
                    "content_type": att.content_type,
                    "size": len(att.data),
                    "reason": f"too large: {exc}",
                }
            )
            continue
        stored.append(Attachment(att.filename, att.content_type, len(att.data), url))
        if att.content_id:
            inline[att.content_id] = url
    return tuple(stored), skipped, inline


def sender_identity(
    parsed: ParsedMail,
    override: Mapping[str, Any] | None = None,
    exclude: Callable[[str], bool] = lambda address: False,
) -> Identity | None:
    """The customer's identity: From, else Reply-To, Sender, Return-Path (skipping the
    channel's own addresses: a web form may send From: us, Reply-To: the customer); None
    if none of them is a usable address."""
    candidates = list(parsed.sender_candidates)
    if override and override.get("kind") == IdentityKind.EMAIL.value and override.get("value"):
        candidates.insert(0, str(override["value"]))
    for candidate in candidates:
        try:
            identity = normalize(IdentityKind.EMAIL, candidate)
        except InvalidIdentity:
            continue
        if not exclude(identity.value):
            return identity
    return None


def mail_data(parsed: ParsedMail) -> dict[str, Any]:
    data: dict[str, Any] = {
        "subject": parsed.subject,
        "from": parsed.from_address,
        "to": list(parsed.to),
        "cc": list(parsed.cc),
        "message_id": parsed.message_id,
    }
    if parsed.in_reply_to:
        data["in_reply_to"] = list(parsed.in_reply_to)
    if parsed.references:
        data["references"] = list(parsed.references[-MAX_CONVERSATION_KEYS:])
    if parsed.date is not None:
        data["date"] = parsed.date.isoformat()
    if parsed.quoted:
        data["quoted"] = _cap(parsed.quoted, MAX_EXTRA_CHARS)
    if parsed.signature:
        data["signature"] = _cap(parsed.signature, MAX_EXTRA_CHARS)
    if parsed.forwarded:
        data["forwarded"] = True
    if parsed.auto_reason:
        data["auto"] = parsed.auto_reason
        # Events don't carry Inbound.routable; keep it where the router and inbox see it.
        data["routable"] = False
    if parsed.bounce is not None:
        b = parsed.bounce
        data["bounce"] = {
            "original_message_id": b.original_message_id,
            "recipient": b.recipient,
            "action": b.action,
            "status": b.status,
            "diagnostic": b.diagnostic,
        }
    if parsed.defects:
        data["defects"] = list(parsed.defects)
    return data
