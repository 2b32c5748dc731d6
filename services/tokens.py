"""Signed session tokens, signing keys and keyed fingerprints.

A session token names a session and proves the worker issued it:

    v1.<kid>.<session_id>.<base64url(HMAC-SHA256(token_key(kid), "v1.<kid>.<session_id>"))>

- The token carries no personal data and nothing but the session id, which is itself 160
  random bits; the MAC makes a forged or altered token fail before any database read.
- It is a pure function of (session id, key), so the store keeps the session id and the kid,
  never the token, and a replayed `session.start` can hand back the very same token.
- Validity (ended, idle, expired) is still decided by the stored session; the token only
  proves origin, so a revoked session stays revoked whatever its signature.

Keys come from IDENTITY_SIGNING_KEYS as ``kid:base64url-secret,kid:secret,...``. The first
key signs; every listed key verifies. Rotation: put a new key first and keep the old one
second until its tokens have expired, then drop it (its tokens stop verifying at once).

Each secret is never used directly: HMAC(secret, purpose) derives one subkey per purpose, so
a session-token MAC can never be replayed as an idempotency fingerprint or the reverse.
Fingerprints are written with the HMAC key now (services.keys), so that they outlive
signing-key rotation; those written under a signing key before (`<kid>:<hex>`) still match
while that key is configured.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from services.errors import InvalidTokenError

MAX_TOKEN_LENGTH = 512
MIN_SECRET_BYTES = 32
_VERSION = "v1"
_KID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_SESSION_ID = re.compile(r"ses_[0-9a-z]{32}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_TOKEN_PURPOSE = b"identity-worker/session-token"
_FINGERPRINT_PURPOSE = b"identity-worker/idempotency-fingerprint"


@dataclass(frozen=True)
class SigningKey:
    """A named HMAC secret. Its repr names the kid only."""

    kid: str
    secret: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not _KID.fullmatch(self.kid):
            raise ValueError(
                "a key id must be 1 to 32 characters of a-z, 0-9 and '-', not starting with '-'"
            )
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret of key {self.kid!r} must be at least 32 bytes")

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, secret=<redacted>)"


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    padded = text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)
    try:
        return base64.urlsafe_b64decode(padded)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _parse_entry(position: int, entry: str) -> SigningKey:
    # Messages name the entry by position and the kid only once it is known to be a kid:
    # a misplaced separator must not put the secret into a start-up error.
    kid, sep, encoded = entry.strip().partition(":")
    if not sep:
        raise ValueError(f"signing key {position}: expected 'kid:base64url-secret'")
    if not _KID.fullmatch(kid):
        raise ValueError(f"signing key {position}: the key id is not valid")
    try:
        secret = _b64url_decode(encoded.strip())
    except ValueError:
        raise ValueError(f"signing key {kid!r}: the secret is not base64url") from None
    return SigningKey(kid, secret)


def parse_signing_keys(spec: str) -> list[SigningKey]:
    """Parse ``kid:secret[,kid:secret...]``; the first key signs, all of them verify."""
    entries = spec.split(",")
    if not spec.strip():
        raise ValueError("no signing key given")
    keys = [_parse_entry(n, entry) for n, entry in enumerate(entries, start=1)]
    seen: set[str] = set()
    for key in keys:
        if key.kid in seen:
            raise ValueError(f"signing key {key.kid!r} is listed twice")
        seen.add(key.kid)
    return keys


def new_signing_key(now: datetime | None = None) -> SigningKey:
    """A fresh key with a dated kid such as ``k20261122-ab12`` and a 256-bit secret."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    kid = f"k{moment:%Y%m%d}-{secrets.token_hex(2)}"
    return SigningKey(kid, secrets.token_bytes(MIN_SECRET_BYTES))


def format_signing_key(key: SigningKey) -> str:
    """The ``kid:secret`` form that IDENTITY_SIGNING_KEYS expects."""
    return f"{key.kid}:{_b64url_encode(key.secret)}"


@dataclass(frozen=True, repr=False)
class _Subkeys:
    token: bytes
    fingerprint: bytes


def _derive(secret: bytes) -> _Subkeys:
    return _Subkeys(
        token=hmac.new(secret, _TOKEN_PURPOSE, hashlib.sha256).digest(),
        fingerprint=hmac.new(secret, _FINGERPRINT_PURPOSE, hashlib.sha256).digest(),
    )


class TokenSigner:
    """Signs and verifies session tokens, and computes keyed fingerprints."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self._subkeys: dict[str, _Subkeys] = {}
        for key in keys:
            if key.kid in self._subkeys:
                raise ValueError(f"signing key {key.kid!r} is listed twice")
            # Only the derived subkeys are kept: the raw secrets are not needed after this.
            self._subkeys[key.kid] = _derive(key.secret)
        self._current = keys[0].kid

    @property
    def current_kid(self) -> str:
        return self._current

    @property
    def kids(self) -> tuple[str, ...]:
        """Every configured key id, the signing one first."""
        return tuple(self._subkeys)

    def __repr__(self) -> str:
        return f"TokenSigner(kids={list(self._subkeys)!r})"

    def _mac(self, kid: str, session_id: str) -> str:
        message = f"{_VERSION}.{kid}.{session_id}".encode("ascii")
        # hmac.digest: the one-shot C path, a third of the cost of building an HMAC object.
        return _b64url_encode(hmac.digest(self._subkeys[kid].token, message, "sha256"))

    def sign(self, session_id: str, kid: str | None = None) -> str:
        """The token of `session_id`, under `kid` if it is still configured, else the current key.

        Passing the kid stored with the session reproduces the token issued at sign-in, which
        is what an idempotent replay of `session.start` must return.
        """
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError("not a session id")
        use = kid if kid is not None and kid in self._subkeys else self._current
        return f"{_VERSION}.{use}.{session_id}.{self._mac(use, session_id)}"

    def verify(self, token: str) -> tuple[str, str]:
        """``(session_id, kid)`` of a genuine token; `InvalidTokenError` for anything else."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidTokenError()
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            raise InvalidTokenError()
        _, kid, session_id, mac = parts
        if kid not in self._subkeys or not _SESSION_ID.fullmatch(session_id):
            raise InvalidTokenError()
        expected = self._mac(kid, session_id).encode("ascii")
        if not hmac.compare_digest(expected, mac.encode("utf-8")):
            raise InvalidTokenError()
        return session_id, kid

    def _fingerprint_hex(self, kid: str, material: bytes) -> str:
        return hmac.digest(self._subkeys[kid].fingerprint, material, "sha256").hex()

    def fingerprint_matches(self, material: bytes, stored: str) -> bool:
        """Whether `stored` is a ``<kid>:<hex>`` fingerprint of `material` under the signing
        key it names (the form written before fingerprints had a key of their own)."""
        kid, sep, digest = stored.partition(":")
        if not sep or kid not in self._subkeys:
            return False
        expected = self._fingerprint_hex(kid, material).encode("ascii")
        return hmac.compare_digest(expected, digest.encode("utf-8"))
