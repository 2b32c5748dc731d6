"""Identifiers: prefixed, lower-case, and (for accounts and events) sortable by creation time.

    acct_<26>  ULID: 48-bit Unix time in ms + 80 random bits, Crockford base32
    evt_<26>   same shape, so the outbox can be read back in creation order by id
    ses_<32>   160 random bits, Crockford base32; carries no time, nothing to guess from

Crockford base32 (no i, l, o, u) is unambiguous when read aloud and stays lower-case, so
ids compare equal however a log viewer folds case. Within one millisecond ids of this process
keep increasing (the ULID "monotonic" rule): events written in one transaction share a
timestamp and must still come back in the order they were made. That makes the next id
within the same millisecond guessable, which is harmless: these ids are names, not secrets
(a session is proven by its signed token, not by its id).
"""

from __future__ import annotations

import secrets
import threading
import time
from datetime import UTC, datetime

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80
_MAX_MS = (1 << 48) - 1
_ULID_CHARS = 26
_SESSION_BYTES = 20
_SESSION_CHARS = 32


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def _millis(now: datetime | None) -> int:
    if now is None:
        return time_ms()
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the time of an id must be timezone-aware")
    ms = int(now.timestamp() * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise ValueError("the time of an id must fit in 48 bits of milliseconds since 1970")
    return ms


def time_ms() -> int:
    """The wall clock in whole milliseconds."""
    return time.time_ns() // 1_000_000


class _MonotonicUlid:
    """Hands out ULID values that increase within a millisecond; safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self, ms: int) -> int:
        with self._lock:
            if ms == self._last_ms and self._last_random + 1 < (1 << _RANDOM_BITS):
                random_part = self._last_random + 1
            else:
                random_part = secrets.randbits(_RANDOM_BITS)
            self._last_ms, self._last_random = ms, random_part
        return (ms << _RANDOM_BITS) | random_part


_ULIDS = _MonotonicUlid()


def _ulid(prefix: str, now: datetime | None) -> str:
    return prefix + _encode(_ULIDS.next(_millis(now)), _ULID_CHARS)


def new_account_id(now: datetime | None = None) -> str:
    """A new `acct_` id stamped with `now` (default: the wall clock)."""
    return _ulid("acct_", now)


def new_event_id(now: datetime | None = None) -> str:
    """A new `evt_` id stamped with `now` (default: the wall clock)."""
    return _ulid("evt_", now)


def new_session_id() -> str:
    """A new `ses_` id: 160 bits from the operating system's CSPRNG."""
    value = int.from_bytes(secrets.token_bytes(_SESSION_BYTES), "big")
    return "ses_" + _encode(value, _SESSION_CHARS)


def id_time(identifier: str) -> datetime:
    """The creation time encoded in an `acct_` or `evt_` id (millisecond precision)."""
    _, _, body = identifier.partition("_")
    if len(body) != _ULID_CHARS or any(c not in _ALPHABET for c in body):
        raise ValueError("not a time-ordered id")
    value = 0
    for char in body:
        value = value * 32 + _ALPHABET.index(char)
    if value >> 128:
        raise ValueError("not a time-ordered id")
    return datetime.fromtimestamp((value >> _RANDOM_BITS) / 1000, UTC)


def new_message_id(now: datetime | None = None) -> str:
    """A new `msg_` id for a courier message, stamped with `now` (default: the wall clock)."""
    return _ulid("msg_", now)
