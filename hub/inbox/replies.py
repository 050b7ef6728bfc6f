"""Where an agent's reply goes: which channel, and which of the customer's addresses.

By default a reply leaves on the channel of the customer's last inbound message, so the
customer is answered where they last spoke. An agent may pick another configured channel
instead, provided the customer has an address that channel can use (an email address
for email, a phone number for SMS and voice, a chat visitor id for web chat).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from hub.model import (
    ChannelType,
    Conversation,
    Customer,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    agent_author,
)

MAX_REPLY_CHARS = 10_000

ADDRESS_KIND: dict[ChannelType, IdentityKind] = {
    ChannelType.EMAIL: IdentityKind.EMAIL,
    ChannelType.SMS: IdentityKind.PHONE,
    ChannelType.VOICE: IdentityKind.PHONE,
    ChannelType.WEBCHAT: IdentityKind.CHAT,
}


# A call cannot carry a typed reply; after a call the text goes out by SMS to the caller.
TEXT_CHANNEL_TYPES = frozenset({ChannelType.EMAIL, ChannelType.SMS, ChannelType.WEBCHAT})


class ChannelLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type(self) -> Any: ...  # ChannelType or its string value


class ReplyRefused(Exception):
    """The reply cannot be sent as asked; the message tells the agent why."""


def channel_type(channel: ChannelLike) -> ChannelType:
    return ChannelType(channel.type)


def address_for(customer: Customer, kind: IdentityKind) -> Identity | None:
    """The customer's address of that kind: verified before unverified, newest first.

    Identities come in the order they were linked, so the last one is the address the
    customer gave most recently. An unverified one (typed into a chat form) is still
    where the customer asked to be reached, so it is used when nothing better exists.
    """
    matching = [i for i in customer.identities if i.kind is kind]
    verified = [i for i in matching if i.verified]
    pool = verified or matching
    return pool[-1] if pool else None


def reachable_channels(
    customer: Customer, channels: Sequence[ChannelLike], default: str | None = None
) -> list[ChannelLike]:
    """Configured channels the customer can be answered on, `default` first."""
    usable = [
        c
        for c in channels
        if channel_type(c) in TEXT_CHANNEL_TYPES
        and address_for(customer, ADDRESS_KIND[channel_type(c)])
    ]
    usable.sort(key=lambda c: c.name != default)
    return usable


def choose_route(
    conversation: Conversation,
    customer: Customer,
    channels: Sequence[ChannelLike],
    requested: str | None,
) -> tuple[ChannelLike, Identity]:
    by_name = {c.name: c for c in channels}
    name = requested if requested is not None else conversation.channel
    channel = by_name.get(name)
    if channel is None:
        if requested is not None:
            raise ReplyRefused(f"channel {requested!r} is not configured")
        raise ReplyRefused(
            f"this conversation's channel {conversation.channel!r} is not configured "
            "any more: pick another channel"
        )
    if channel_type(channel) not in TEXT_CHANNEL_TYPES:
        if requested is not None:
            raise ReplyRefused(
                f"channel {channel.name!r} is a voice line and cannot carry text: "
                "pick an SMS channel or call the customer back"
            )
        sms = [c for c in channels if channel_type(c) is ChannelType.SMS]
        if not sms:
            raise ReplyRefused(
                "the customer last called; no SMS channel is configured to answer in text"
            )
        channel = sms[0]
    kind = ADDRESS_KIND[channel_type(channel)]
    to = address_for(customer, kind)
    if to is None:
        raise ReplyRefused(
            f"the customer has no {kind.value} identity, so channel {channel.name!r} "
            f"({channel_type(channel).value}) cannot reach them: link one or pick another channel"
        )
    return channel, to


def reply_draft(agent_id: str, channel: ChannelLike, to: Identity, text: str) -> EventDraft:
    return EventDraft(
        kind=EventKind.MESSAGE,
        direction=Direction.OUT,
        author=agent_author(agent_id),
        channel=channel.name,
        channel_type=channel_type(channel),
        text=text,
        # QUEUED puts the reply in the durable outbox in the same write as the event.
        delivery_state=DeliveryState.QUEUED,
        data={"to": {"kind": to.kind.value, "value": to.value}},
    )


def note_draft(agent_id: str, text: str) -> EventDraft:
    # INTERNAL and no delivery state: nothing ever hands a note to a channel.
    return EventDraft(
        kind=EventKind.NOTE,
        direction=Direction.INTERNAL,
        author=agent_author(agent_id),
        text=text,
    )
