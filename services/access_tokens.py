"""Access tokens: short-lived JWTs (RFC 7519) signed with Ed25519 (EdDSA), that callers verify
alone against the published keys (a JWKS, RFC 7517) instead of asking `session.verify`.

    header  {"alg": "EdDSA", "kid": "<kid>", "typ": "JWT"}
    claims  {"iss", "sub": account id, "sid": session id, "roles": [...], "iat", "exp"}

- Keys come from IDENTITY_JWT_KEYS as ``kid:base64url-seed,...`` (a 32-byte Ed25519 seed
  each). The first key signs; every listed key is published, so a token signed by a key that
  is being retired still verifies until it expires (see the runbook's rotation steps).
- A token is a pure function of its claims and its key: Ed25519 signatures are deterministic
  (RFC 8032) and PyJWT serialises header and claims in a fixed order. The service keeps the
  facts (issue time, roles, key id) and never the token, and a replayed command derives the
  very same token again.
- Signing and JOSE are PyJWT's and cryptography's; nothing here parses or builds a JWS by
  hand.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

ALGORITHM = "EdDSA"
SEED_BYTES = 32
# The contract's bounds of IDENTITY_ACCESS_TOKEN_TTL_S.
DEFAULT_TTL_S = 600
MAX_TTL_S = 3600
DEFAULT_ISSUER = "identity-worker"
_KID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


@dataclass(frozen=True)
class JwtKey:
    """A named Ed25519 seed. Its repr names the kid only."""

    kid: str
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not _KID.fullmatch(self.kid):
            raise ValueError(
                "a key id must be 1 to 32 characters of a-z, 0-9 and '-', not starting with '-'"
            )
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            raise ValueError(f"the seed of key {self.kid!r} must be exactly 32 bytes")

    def __repr__(self) -> str:
        return f"JwtKey(kid={self.kid!r}, seed=<redacted>)"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    bare = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _parse_entry(position: int, entry: str) -> JwtKey:
    # Messages name the entry by position, and the kid once it is known to be one: a
    # misplaced separator must not put a seed into a start-up error.
    kid, sep, encoded = entry.strip().partition(":")
    if not sep:
        raise ValueError(f"JWT key {position}: expected 'kid:base64url-seed'")
    if not _KID.fullmatch(kid):
        raise ValueError(f"JWT key {position}: the key id is not valid")
    try:
        seed = _unb64url(encoded.strip())
    except ValueError:
        raise ValueError(f"JWT key {kid!r}: the seed is not base64url") from None
    if len(seed) != SEED_BYTES:
        raise ValueError(f"JWT key {kid!r}: the seed must be 32 bytes (an Ed25519 seed)")
    return JwtKey(kid, seed)


def parse_jwt_keys(spec: str) -> list[JwtKey]:
    """Parse ``kid:seed[,kid:seed...]``; the first key signs, all of them are published."""
    if not spec.strip():
        raise ValueError("no JWT key given")
    keys = [_parse_entry(n, entry) for n, entry in enumerate(spec.split(","), start=1)]
    seen: set[str] = set()
    for key in keys:
        if key.kid in seen:
            raise ValueError(f"JWT key {key.kid!r} is listed twice")
        seen.add(key.kid)
    return keys


def new_jwt_key(now: datetime | None = None) -> JwtKey:
    """A fresh key with a dated kid such as ``j20261204-ab12``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return JwtKey(f"j{moment:%Y%m%d}-{secrets.token_hex(2)}", secrets.token_bytes(SEED_BYTES))


def format_jwt_key(key: JwtKey) -> str:
    """The ``kid:seed`` form that IDENTITY_JWT_KEYS expects."""
    return f"{key.kid}:{_b64url(key.seed)}"


def numeric_date(moment: datetime) -> int:
    """RFC 7519's NumericDate: whole seconds since 1970 (fractions dropped)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the moment must be timezone-aware")
    return int(moment.timestamp())


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What an access token says, before it is signed."""

    account_id: str
    session_id: str
    roles: tuple[str, ...]
    issued_at: int  # NumericDate
    expires_at: int  # NumericDate


class AccessTokenSigner:
    """Signs access tokens with the first key and publishes every key's public half."""

    def __init__(self, keys: Sequence[JwtKey], *, issuer: str = DEFAULT_ISSUER) -> None:
        if not keys:
            raise ValueError("at least one JWT key is needed")
        if not issuer:
            raise ValueError("the issuer must not be empty")
        self._private: dict[str, Ed25519PrivateKey] = {}
        for key in keys:
            if key.kid in self._private:
                raise ValueError(f"JWT key {key.kid!r} is listed twice")
            self._private[key.kid] = Ed25519PrivateKey.from_private_bytes(key.seed)
        self._current = keys[0].kid
        self._issuer = issuer
        self._jwks = {"keys": [self._public_jwk(kid) for kid in self._private]}

    def __repr__(self) -> str:
        return f"AccessTokenSigner(kids={list(self._private)!r}, issuer={self._issuer!r})"

    @property
    def current_kid(self) -> str:
        return self._current

    @property
    def issuer(self) -> str:
        return self._issuer

    def _public_jwk(self, kid: str) -> dict[str, str]:
        jwk: dict[str, str] = OKPAlgorithm.to_jwk(self._private[kid].public_key(), as_dict=True)
        return {
            "kty": jwk["kty"],
            "crv": jwk["crv"],
            "x": jwk["x"],
            "kid": kid,
            "use": "sig",
            "alg": ALGORITHM,
        }

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS of every configured key (public halves only), the signing one first."""
        return {"keys": [dict(jwk) for jwk in self._jwks["keys"]]}

    def sign(self, claims: AccessClaims, kid: str | None = None) -> str:
        """The token of `claims`, under `kid` while it is configured, else the current key.

        Passing the kid a token was first signed with gives that very token back."""
        use = kid if kid is not None and kid in self._private else self._current
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "sub": claims.account_id,
            "sid": claims.session_id,
            "roles": list(claims.roles),
            "iat": claims.issued_at,
            "exp": claims.expires_at,
        }
        return jwt.encode(
            payload, self._private[use], algorithm=ALGORITHM, headers={"kid": use, "typ": "JWT"}
        )

    def kid_for(self, kid: str | None) -> str:
        """The kid `sign(..., kid)` would use."""
        return kid if kid is not None and kid in self._private else self._current
