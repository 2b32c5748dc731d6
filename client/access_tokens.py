"""Verifying access tokens locally: no broker round trip per request.

    verifier = AccessTokenVerifier.over_http("http://identity:8080/.well-known/jwks.json")
    claims = await verifier.verify_access_token(token)   # or raises InvalidAccessToken
    claims.account_id, claims.session_id, claims.roles

What is checked, every time: the signature, with a key of the worker's JWKS picked by the
token's `kid`; the algorithm, pinned to EdDSA whatever the header says (so `alg: none` and
an HS256 token "signed" with the public key are refused); the issuer; `exp` (with a small
clock-skew leeway: `AccessTokenExpired` past it, the cue to refresh); `iat` not in the
future beyond the leeway; and the claims the contract pins (`sub`, `sid`, `roles`).

The JWKS is fetched once (over the broker with `keys.jwks`, or over HTTP from the sidecar)
and fetched again when a token names a kid it does not hold: the worker started signing with
a new key. Those refetches are rate-limited (`refetch_interval_s`), so a flood of tokens with
made-up kids costs one fetch per interval, not one per token. Keys held for `max_age_s` (five
minutes, the sidecar's `max-age`) are fetched again before the next verification, so a key the
worker stopped publishing stops being trusted; if that fetch fails, the keys held go on
being used until the next try.

A token verified once is remembered (its claims, up to `cache_size` tokens): presented
again, as it is on every request for its lifetime, it costs a dictionary look-up and the time
checks, which are made on every call. Only the exact string that verified is remembered, and
only while the key that signed it is held: a key that leaves the JWKS takes its tokens out of
the cache with it.

Revocation: a verified access token proves the session was live when the token was issued,
at most its lifetime ago (`IDENTITY_ACCESS_TOKEN_TTL_S`, 10 minutes by default). A service
that must know at once (an admin action, a payment) asks `session.verify`, or subscribes to
`session.ended` and refuses the tokens of ended sessions itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from client.errors import AccessTokenExpired, InvalidAccessToken

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "identity-worker"
DEFAULT_LEEWAY_S = 30.0
DEFAULT_REFETCH_INTERVAL_S = 30.0
# Verified tokens remembered (their claims), so that a token presented again (on every request
# of its lifetime) costs a look-up and the time checks, not a signature verification.
DEFAULT_CACHE_SIZE = 10_000
# Keys held longer than this are fetched again before the next verification, so that a key
# the worker retired (a leaked one) stops being trusted: the sidecar's max-age.
DEFAULT_MAX_AGE_S = 300.0
_REQUIRED = ["iss", "sub", "sid", "roles", "iat", "exp"]
# Signature, alg and iss by PyJWT; the times by this module, on its own (injectable) clock.
_OPTIONS: Any = {
    "require": _REQUIRED,
    "verify_signature": True,
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
    "verify_aud": False,
}

FetchJwks = Callable[[], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token says."""

    account_id: str  # sub
    session_id: str  # sid
    roles: tuple[str, ...]
    issued_at: int  # iat, seconds since 1970
    expires_at: int  # exp
    issuer: str
    kid: str

    def has_role(self, role: str) -> bool:
        return role in self.roles


def _keys_of(jwks: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """The EdDSA signing keys of a JWKS by kid; anything else in it is ignored."""
    keys: dict[str, jwt.PyJWK] = {}
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, Mapping) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("kty") != "OKP" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        try:
            keys[jwk["kid"]] = jwt.PyJWK.from_dict(dict(jwk), algorithm=ALGORITHM)
        except jwt.PyJWTError:
            continue
    return keys


def _material(jwks: Mapping[str, Any], kid: str) -> str:
    """The public key (`x`) that `kid` names in `jwks`."""
    for jwk in jwks.get("keys", []):
        if isinstance(jwk, Mapping) and jwk.get("kid") == kid:
            return str(jwk.get("x"))
    return ""


class AccessTokenVerifier:
    """Verifies access tokens against the worker's published keys, kept in memory."""

    def __init__(
        self,
        fetch_jwks: FetchJwks,
        *,
        issuer: str = DEFAULT_ISSUER,
        leeway_s: float = DEFAULT_LEEWAY_S,
        refetch_interval_s: float = DEFAULT_REFETCH_INTERVAL_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if leeway_s < 0 or refetch_interval_s < 0 or max_age_s <= 0 or cache_size < 0:
            raise ValueError("leeway_s, refetch_interval_s, max_age_s, cache_size: not negative")
        self._fetch = fetch_jwks
        self._issuer = issuer
        self._leeway = leeway_s
        self._refetch_interval = refetch_interval_s
        self._max_age = max_age_s
        self._cache_size = cache_size
        self._verified: dict[str, AccessClaims] = {}
        self._material: dict[str, str] = {}  # kid -> the public key (x) it names
        # A token's first segment (its header) -> its kid, for headers already checked.
        self._kid_by_header: dict[str, str] = {}
        self._now = now
        self._monotonic = monotonic
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._fetching: asyncio.Future[None] | None = None

    @classmethod
    def over_broker(cls, identity: Any, **options: Any) -> AccessTokenVerifier:
        """Keys from `keys.jwks`, through an open `IdentityClient`."""

        async def fetch() -> Mapping[str, Any]:
            result = await identity.get_jwks()
            jwks: Mapping[str, Any] = result.model_dump(mode="json")
            return jwks

        return cls(fetch, **options)

    @classmethod
    def over_http(cls, url: str, *, timeout_s: float = 5.0, **options: Any) -> AccessTokenVerifier:
        """Keys from the sidecar's `GET /.well-known/jwks.json` (or any URL serving them)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError("the JWKS URL must be http:// or https://")

        def get() -> Mapping[str, Any]:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
                jwks: Mapping[str, Any] = orjson.loads(response.read())
            return jwks

        async def fetch() -> Mapping[str, Any]:
            return await asyncio.to_thread(get)

        return cls(fetch, **options)

    @property
    def kids(self) -> tuple[str, ...]:
        """The key ids held now."""
        return tuple(self._keys)

    async def load_keys(self, *, force: bool = False) -> None:
        """Fetch the JWKS now (concurrent callers share one fetch). Without `force`, not
        again within `refetch_interval_s` of the last fetch."""
        if self._fetching is not None:
            await asyncio.shield(self._fetching)
            return
        recent = self._fetched_at is not None and (
            self._monotonic() - self._fetched_at < self._refetch_interval
        )
        if recent and not force:
            return
        self._fetching = asyncio.get_running_loop().create_future()
        try:
            jwks = await self._fetch()
            keys = _keys_of(jwks)
            material = {kid: _material(jwks, kid) for kid in keys}
            # Tokens remembered under a key that is no longer published (or whose kid now
            # names other key material) are forgotten.
            self._verified = {
                token: claims
                for token, claims in self._verified.items()
                if claims.kid in keys and material[claims.kid] == self._material.get(claims.kid)
            }
            self._keys, self._material = keys, material
            self._fetching.set_result(None)
        except Exception as exc:
            self._fetching.set_exception(exc)
            # Nobody else may be waiting: mark the exception retrieved.
            self._fetching.exception()
            raise
        except BaseException:
            self._fetching.cancel()
            raise
        finally:
            self._fetched_at = self._monotonic()
            self._fetching = None

    async def verify_access_token(self, token: str) -> AccessClaims:
        """The claims of a good token; `InvalidAccessToken` (or `AccessTokenExpired`)
        otherwise. Fetches the keys the first time, and again (rate-limited) for a kid it
        does not hold."""
        kid = self._kid_of(token)
        stale = self._fetched_at is not None and (
            self._monotonic() - self._fetched_at >= self._max_age
        )
        if kid not in self._keys or stale:
            try:
                await self.load_keys(force=stale)
            except Exception as exc:
                if kid not in self._keys:
                    raise InvalidAccessToken("the signing keys could not be fetched") from exc
        return self.verify_with_held_keys(token)

    def verify_with_held_keys(self, token: str) -> AccessClaims:
        """`verify_access_token` without any fetch (an unknown kid is refused): for code
        that cannot await, once the keys are loaded."""
        known = self._verified.get(token) if isinstance(token, str) else None
        if known is not None and known.kid in self._keys:
            self._check_times(known.issued_at, known.expires_at)
            return known
        kid = self._kid_of(token)
        key = self._keys.get(kid)
        if key is None:
            raise InvalidAccessToken("the token is signed with a key that is not published")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM], issuer=self._issuer, options=_OPTIONS
            )
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(f"the token is not valid: {type(exc).__name__}") from None
        verified = self._checked(claims, kid)
        if self._cache_size:
            if len(self._verified) >= self._cache_size:
                # Forget the oldest (dicts keep insertion order): a bound, not an LRU.
                del self._verified[next(iter(self._verified))]
            self._verified[token] = verified
        return verified

    def _kid_of(self, token: str) -> str:
        if not isinstance(token, str) or len(token) > 8192:
            raise InvalidAccessToken("not a token")
        segment = token.partition(".")[0]
        kid = self._kid_by_header.get(segment)
        if kid is not None:
            return kid
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidAccessToken("not a token") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or header.get("alg") != ALGORITHM:
            raise InvalidAccessToken("the token is not an EdDSA token with a kid")
        if len(self._kid_by_header) < 64:  # a worker has a handful of keys
            self._kid_by_header[segment] = kid
        return kid

    def _check_times(self, issued_at: int, expires_at: int) -> None:
        now = self._now()
        if issued_at > now + self._leeway:
            raise InvalidAccessToken("the token was issued in the future")
        if now >= expires_at + self._leeway:
            raise AccessTokenExpired("the access token has expired")

    def _checked(self, claims: Mapping[str, Any], kid: str) -> AccessClaims:
        issued_at, expires_at = claims["iat"], claims["exp"]
        roles, sub, sid = claims["roles"], claims["sub"], claims["sid"]
        if not all(isinstance(value, int) for value in (issued_at, expires_at)):
            raise InvalidAccessToken("iat and exp must be whole seconds")
        if not (isinstance(sub, str) and isinstance(sid, str) and isinstance(roles, list)):
            raise InvalidAccessToken("sub, sid or roles is malformed")
        if not all(isinstance(role, str) for role in roles):
            raise InvalidAccessToken("roles is malformed")
        self._check_times(issued_at, expires_at)
        return AccessClaims(
            account_id=sub,
            session_id=sid,
            roles=tuple(roles),
            issued_at=issued_at,
            expires_at=expires_at,
            issuer=str(claims["iss"]),
            kid=kid,
        )
