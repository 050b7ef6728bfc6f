"""Reply-address tokens: reply+<conversation id>.<signature>@<the channel's domain>.

The hub's outbound mail carries such a Reply-To, so a customer's reply names its
conversation even when their client drops In-Reply-To/References. The signature (an
HMAC of the conversation id with a per-channel secret) means nobody can write to a
conversation by guessing an address: a token that doesn't verify is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_SIG_LEN = 16  # hex characters: 64 bits of HMAC, plenty against guessing
_TOKEN = re.compile(rf"^([0-9A-Za-z]{{1,64}})\.([0-9a-fA-F]{{{_SIG_LEN}}})$")


def _signature(secret: bytes, conversation_id: str) -> str:
    digest = hmac.new(secret, b"email-reply:" + conversation_id.encode(), hashlib.sha256)
    return digest.hexdigest()[:_SIG_LEN]


def make_token(secret: bytes, conversation_id: str) -> str:
    return f"{conversation_id}.{_signature(secret, conversation_id)}"


def verify_token(secret: bytes, token: str) -> str | None:
    """The conversation id inside a genuine token, else None."""
    match = _TOKEN.match(token)
    if not match:
        return None
    # Some mail systems fold the local part's case; ids are upper-case Crockford base32.
    conversation_id = match.group(1).upper()
    if hmac.compare_digest(_signature(secret, conversation_id), match.group(2).lower()):
        return conversation_id
    return None


def reply_address(channel_address: str, token: str) -> str:
    """support@example.com + token -> support+token@example.com (subaddressing)."""
    local, _, domain = channel_address.partition("@")
    base = local.split("+", 1)[0]
    return f"{base}+{token}@{domain}"


def token_in_address(channel_address: str, address: str) -> str | None:
    """The token of a reply address of this channel (same base local part and domain)."""
    local, _, domain = channel_address.casefold().partition("@")
    base = local.split("+", 1)[0]
    a_local, _, a_domain = address.strip().partition("@")
    if a_domain.casefold() != domain:
        return None
    a_base, plus, token = a_local.partition("+")
    if not plus or a_base.casefold() != base or not token:
        return None
    return token
