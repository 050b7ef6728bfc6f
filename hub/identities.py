"""Normalization of the ways customers reach us, so one person is one key on every channel."""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

from hub.model import Identity, IdentityKind


class InvalidIdentity(ValueError):
    """An address or number that cannot identify anyone; the message says why."""


# Deliberately loose: providers already validated deliverability; this catches garbage.
_EMAIL = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[^@\s<>()\[\],;:\"]+$")
_VISITOR = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_EMAIL_LENGTH = 254


def normalize_email(raw: str) -> str:
    value = raw.strip().casefold()
    if len(value) > MAX_EMAIL_LENGTH or not _EMAIL.match(value):
        raise InvalidIdentity(f"not an email address: {raw[:80]!r}")
    return value


@lru_cache(maxsize=16384)
def normalize_phone(raw: str, default_region: str | None) -> str:
    """E.164, reading national numbers in `default_region` (ISO 3166 alpha-2).

    Cached: parsing is costly and every webhook of one texting customer repeats the same
    number (an invalid one raises each time; exceptions are not cached).
    """
    text = raw.strip()
    if not text or len(text) > 40:
        raise InvalidIdentity(f"not a phone number: {raw[:80]!r}")
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidIdentity(f"not a phone number: {raw[:80]!r} ({exc})") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidIdentity(f"not a valid phone number: {raw[:80]!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_visitor(raw: str) -> str:
    if not _VISITOR.match(raw):
        raise InvalidIdentity("visitor id must be 8-64 characters of A-Z a-z 0-9 _ -")
    return raw


def normalize(
    kind: IdentityKind | str,
    raw: str,
    *,
    default_region: str | None = None,
    verified: bool = True,
) -> Identity:
    """The canonical identity for `raw`; raises InvalidIdentity with a readable reason."""
    if kind.__class__ is not IdentityKind:
        try:
            kind = IdentityKind(kind)
        except ValueError:
            raise InvalidIdentity(f"unknown identity kind: {kind!r}") from None
    if kind is IdentityKind.EMAIL:
        value = normalize_email(raw)
    elif kind is IdentityKind.PHONE:
        value = normalize_phone(raw, default_region)
    else:
        value = normalize_visitor(raw)
    return Identity(kind=kind, value=value, verified=verified)
