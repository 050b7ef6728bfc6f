"""Signed web chat visitor tokens, and the website's vouching HMAC for its own users.

A visitor token is what a browser keeps in localStorage to come back as the same
visitor: `v1.<payload>.<mac>` where payload is base64url JSON {"c": channel,
"v": visitor id, "iat": issued-at seconds} and mac is base64url HMAC-SHA256 over the
payload text with the hub's secret. The secret lives in the store (state key
`webchat.secret`), so every hub process sharing a store accepts the others' tokens.

Nothing here touches the network or the store; `load_secret` is the one async helper.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from hub.identities import InvalidIdentity, normalize_visitor
from hub.shared_secret import shared_secret
from hub.timeline.store import TimelineStore

SECRET_STATE_KEY = "webchat.secret"
_VERSION = "v1"
# Tokens are short; anything longer is garbage and is refused before any decoding.
MAX_TOKEN_LENGTH = 512


class InvalidToken(Exception):
    """A token that is garbled, forged, or minted for another channel."""


@dataclass(frozen=True, slots=True)
class VisitorClaims:
    channel: str
    visitor_id: str
    issued_at: int


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidToken("token is not valid base64") from None


def new_visitor_id() -> str:
    """A random visitor id that `hub.identities.normalize_visitor` accepts (24 chars)."""
    return normalize_visitor(secrets.token_urlsafe(18))


class VisitorTokens:
    """Mints and verifies visitor tokens with one secret (bytes, at least 32 of them)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("visitor token secret must be at least 32 bytes")
        self._secret = secret

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest()
        return _b64encode(digest)

    def mint(self, channel: str, visitor_id: str, issued_at: int | None = None) -> str:
        claims = {
            "c": channel,
            "v": visitor_id,
            "iat": int(time.time()) if issued_at is None else issued_at,
        }
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
        return f"{_VERSION}.{payload}.{self._mac(payload)}"

    def verify(self, token: object, channel: str) -> VisitorClaims:
        """The claims of a genuine token for `channel`; InvalidToken with a reason if not."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token missing or malformed")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise InvalidToken("token malformed")
        _, payload, mac = parts
        if not payload.isascii() or not mac.isascii():
            raise InvalidToken("token malformed")
        # The MAC is checked before the payload is parsed: nothing forged is ever decoded.
        if not hmac.compare_digest(self._mac(payload), mac):
            raise InvalidToken("token signature does not match")
        try:
            claims = json.loads(_b64decode(payload))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidToken("token payload unreadable") from None
        if not isinstance(claims, dict):
            raise InvalidToken("token payload unreadable")
        token_channel, visitor_id, issued_at = claims.get("c"), claims.get("v"), claims.get("iat")
        if not isinstance(token_channel, str) or not isinstance(visitor_id, str):
            raise InvalidToken("token payload incomplete")
        if not isinstance(issued_at, int):
            raise InvalidToken("token payload incomplete")
        if token_channel != channel:
            raise InvalidToken("token belongs to another channel")
        try:
            normalize_visitor(visitor_id)
        except InvalidIdentity:
            raise InvalidToken("token carries an invalid visitor id") from None
        return VisitorClaims(channel=token_channel, visitor_id=visitor_id, issued_at=issued_at)


async def load_secret(store: TimelineStore) -> bytes:
    """The hub-wide token secret, created on first use and shared by every process."""
    return await shared_secret(store, SECRET_STATE_KEY)


def user_hash(identity_secret: str, value: str) -> str:
    """What a website computes server-side to vouch for its user: hex HMAC-SHA256."""
    return hmac.new(
        identity_secret.encode("utf-8"), value.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def vouched(identity_secret: str | None, value: str | None, claimed_hash: object) -> bool:
    """True when `claimed_hash` is the website's HMAC of `value` (constant-time compare)."""
    if not identity_secret or not value or not isinstance(claimed_hash, str):
        return False
    if len(claimed_hash) != 64:
        return False
    return hmac.compare_digest(user_hash(identity_secret, value), claimed_hash.lower())
