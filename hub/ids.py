"""Sortable unique ids (ULID layout: 48-bit milliseconds + 80 random bits, Crockford base32).

Ids from one generator are strictly increasing, even within one millisecond, so a store
that mints ids at commit time gets ids whose order is the commit order; resume-after-id
relies on that.
"""

from __future__ import annotations

import base64
import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1


# base64's base32 walks the bits five at a time from the top, as a ULID does; only the
# alphabet differs, and translating it is far cheaper than a loop in Python.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _encode_ulid(value: int) -> str:
    """`_encode(value, 26)` for a value below 2**130 (a ULID's 128 bits), faster."""
    # 130 bits at the top of 17 bytes: the first 26 base32 characters are exactly them.
    raw = base64.b32encode((value << 6).to_bytes(17, "big"))
    return raw[:26].translate(_FROM_RFC4648).decode("ascii")


def _decode(value: str) -> int:
    n = 0
    for ch in value:
        n = n * 32 + _ALPHABET.index(ch)
    return n


class IdGenerator:
    """Monotonic ULID generator; thread-safe because the SQLite writer mints ids in a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def continue_after(self, last_id: str) -> None:
        """Mint only ids greater than `last_id` (one minted by an earlier generator)."""
        value = _decode(last_id)
        with self._lock:
            self._last_ms = max(self._last_ms, value >> _RANDOM_BITS)
            if self._last_ms == value >> _RANDOM_BITS:
                self._last_random = max(self._last_random, value & _RANDOM_MAX)

    def new(self, now_ms: int | None = None) -> str:
        with self._lock:
            ms = int(time.time() * 1000) if now_ms is None else now_ms
            if ms <= self._last_ms:
                # Same (or earlier: clock stepped back) millisecond: keep order by counting up.
                ms = self._last_ms
                rnd = self._last_random + 1
                if rnd > _RANDOM_MAX:
                    ms += 1
                    rnd = int.from_bytes(os.urandom(10), "big") >> 1
            else:
                # The top bit stays clear so a run within one ms has room to count up.
                rnd = int.from_bytes(os.urandom(10), "big") >> 1
            self._last_ms = ms
            self._last_random = rnd
            return _encode_ulid((ms << _RANDOM_BITS) | rnd)


_default = IdGenerator()


def new_id() -> str:
    """A new sortable id from the process-wide generator."""
    return _default.new()


def id_time_ms(value: str) -> int:
    """The millisecond timestamp inside an id."""
    return _decode(value[:10])


def is_id(value: str) -> bool:
    return len(value) == 26 and all(ch in _ALPHABET for ch in value)
