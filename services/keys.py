"""The HMAC key: every keyed hash that must outlive signing-key rotation.

IDENTITY_HMAC_KEY is one base64url secret of at least 32 bytes. It is never used directly:
HMAC(key, purpose) derives one subkey per purpose, so a tag of one kind can never stand for
another (an audit tag is not a throttle tag, a throttle tag is not a fingerprint):

    idempotency fingerprints   h1:<hex>, over (command, payload) with its secrets
    throttle tags              the canonical email and the throttling source, as stored
    audit tags                 the canonical email in audit log lines

Why a key of its own, outside the database (production never reads one from it, see
worker.settings): a fingerprint is a hash of a payload that holds a password, and a tag is a
hash of an email. Unkeyed, or keyed with something stored next to them, a copy of the
database is enough to test password guesses against every fingerprint offline, or to reverse
every tag from a list of addresses. Keyed with a secret the database never holds, the rows are
useless without the worker's configuration too.

Why the fingerprint keeps the secrets: events carry the idempotency key of the command that
caused them (`causation_id`), so every subscriber knows the key of every sign-in. A
fingerprint without the password would let a subscriber send `session.start` with that key,
the victim's email and any password, match the stored record, and be handed the replayed
token. With the password inside, only the same password replays.

Keys published in this repository (compose's, the docs', the tests' of old) are listed here by
the SHA-256 of their secret bytes, and refused in production: a key anyone can read protects
nothing. tests/unit/test_published_keys.py scans the repository for key-shaped literals and
fails on one that is not listed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

MIN_KEY_BYTES = 32
FINGERPRINT_PREFIX = "h1:"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")

# One purpose, one subkey. Never reuse a purpose string for something else.
_FINGERPRINT = b"identity-worker/hmac/idempotency-fingerprint"
_THROTTLE_EMAIL = b"identity-worker/hmac/throttle-email"
_THROTTLE_SOURCE = b"identity-worker/hmac/throttle-source"
_AUDIT_EMAIL = b"identity-worker/hmac/audit-email"

# Bytes of a throttle tag: 128 bits, so two emails (or sources) never share a counter.
TAG_BYTES = 16
# Hex characters of an audit tag: enough to follow one address through the logs.
AUDIT_TAG_CHARS = 16

# SHA-256 of the secret bytes of every key ever published in this repository.
PUBLISHED_KEY_DIGESTS = frozenset(
    {
        # compose.yaml's signing key "dev-compose" (until contract v2)
        "66e96f2edbfe8a8a94f12440f8507368318311573228cf836715485db2884d79",
        # tests/support/workers.py's signing key "test-k1" (until contract v2)
        "ff0c74825ab3f74d0160232199080a87005dd308ab903f0524e32e1d7bce0eb2",
    }
)


def decode_base64url(text: str) -> bytes:
    """The bytes of base64url `text` (padding optional); ValueError when it is not."""
    text = text.strip()
    if not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    bare = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def parse_hmac_key(text: str) -> bytes:
    """IDENTITY_HMAC_KEY's secret. The messages never quote the value."""
    try:
        secret = decode_base64url(text)
    except ValueError:
        raise ValueError("must be base64url") from None
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"must be at least {MIN_KEY_BYTES} bytes (base64url)")
    return secret


def new_hmac_key() -> str:
    """A fresh 256-bit key, in the form IDENTITY_HMAC_KEY expects."""
    return base64.urlsafe_b64encode(secrets.token_bytes(MIN_KEY_BYTES)).rstrip(b"=").decode()


def key_digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def is_published(secret: bytes) -> bool:
    """Whether `secret` is a key this repository has ever shown to the world."""
    return key_digest(secret) in PUBLISHED_KEY_DIGESTS


class HmacKey:
    """The derived subkeys of IDENTITY_HMAC_KEY (the secret itself is not kept)."""

    __slots__ = ("_audit", "_email", "_fingerprint", "_source")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"the HMAC key must be at least {MIN_KEY_BYTES} bytes")

        def derive(purpose: bytes) -> bytes:
            return hmac.digest(secret, purpose, "sha256")

        self._fingerprint = derive(_FINGERPRINT)
        self._email = derive(_THROTTLE_EMAIL)
        self._source = derive(_THROTTLE_SOURCE)
        self._audit = derive(_AUDIT_EMAIL)

    def __repr__(self) -> str:
        return "HmacKey(<redacted>)"

    def fingerprint(self, material: bytes) -> str:
        """``h1:<hex>``: the keyed hash an idempotency record keeps instead of the payload."""
        return FINGERPRINT_PREFIX + hmac.digest(self._fingerprint, material, "sha256").hex()

    def email_tag(self, email_canonical: str) -> bytes:
        """How the throttle stores a canonical email."""
        return hmac.digest(self._email, email_canonical.encode(), "sha256")[:TAG_BYTES]

    def source_tag(self, source: str) -> bytes:
        """How the throttle stores a source (a client address or a caller)."""
        return hmac.digest(self._source, source.encode(), "sha256")[:TAG_BYTES]

    def audit_tag(self, email_canonical: str) -> str:
        """A short tag of an email for audit lines: stable, but not reversible from a list
        of addresses without the key (an unkeyed hash of an email is)."""
        digest = hmac.digest(self._audit, email_canonical.encode(), "sha256").hex()
        return digest[:AUDIT_TAG_CHARS]


class Fingerprints:
    """Writes ``h1:`` fingerprints; matches them, and the ``<kid>:<hex>`` ones written under a
    signing key before there was an HMAC key, while that signing key is still configured."""

    def __init__(self, key: HmacKey, legacy_matches: Callable[[bytes, str], bool]) -> None:
        self._key = key
        self._legacy_matches = legacy_matches

    def of(self, material: bytes) -> str:
        return self._key.fingerprint(material)

    def matches(self, material: bytes, stored: str) -> bool:
        if stored.startswith(FINGERPRINT_PREFIX):
            expected = self._key.fingerprint(material).encode("ascii")
            return hmac.compare_digest(expected, stored.encode("utf-8"))
        return self._legacy_matches(material, stored)
