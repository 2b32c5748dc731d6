"""Access tokens: what the worker signs, and what the client's verifier accepts and refuses.

The attacks are the classic ones on JWT verifiers: a changed payload, `alg: none`, `alg`
switched to HS256 with the public key as the HMAC secret, a kid nobody published, a token
without `exp`. Time comes from an injected clock, never from sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import AccessTokenExpired, AccessTokenVerifier, InvalidAccessToken
from services.access_tokens import (
    AccessClaims,
    AccessTokenSigner,
    JwtKey,
    format_jwt_key,
    new_jwt_key,
    parse_jwt_keys,
)

NOW = 1_800_000_000
OLD = JwtKey("j1", b"o" * 32)
NEW = JwtKey("j2", b"n" * 32)
CLAIMS = AccessClaims(
    account_id="acct_" + "a" * 26,
    session_id="ses_" + "b" * 32,
    roles=("admin", "billing:read"),
    issued_at=NOW,
    expires_at=NOW + 600,
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    head = b64(json.dumps(dict(header)).encode())
    body = b64(json.dumps(dict(claims)).encode())
    return f"{head}.{body}.{b64(signature)}"


class Keys:
    """A JWKS source that counts its fetches and can be changed under the verifier."""

    def __init__(self, signer: AccessTokenSigner) -> None:
        self.signer = signer
        self.fetches = 0

    async def __call__(self) -> Mapping[str, Any]:
        self.fetches += 1
        return self.signer.jwks()


def verifier(
    source: Keys, at: float = NOW + 1, issuer: str = "identity-worker", **options: Any
) -> tuple[AccessTokenVerifier, list[float]]:
    clock = [float(at)]
    monotonic = [0.0]
    made = AccessTokenVerifier(
        source, issuer=issuer, now=lambda: clock[0], monotonic=lambda: monotonic[0], **options
    )
    made.monotonic = monotonic  # type: ignore[attr-defined]
    return made, clock


def test_a_token_carries_exactly_the_pinned_claims_and_the_kid_of_the_first_key() -> None:
    signer = AccessTokenSigner([NEW, OLD])
    token = signer.sign(CLAIMS)

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": "j2", "typ": "JWT"}
    public = Ed25519PrivateKey.from_private_bytes(NEW.seed).public_key()
    times_off: Any = {"verify_exp": False, "verify_iat": False}
    claims = jwt.decode(token, public, algorithms=["EdDSA"], options=times_off)
    assert claims == {
        "iss": "identity-worker",
        "sub": CLAIMS.account_id,
        "sid": CLAIMS.session_id,
        "roles": ["admin", "billing:read"],
        "iat": NOW,
        "exp": NOW + 600,
    }


def test_signing_is_deterministic_and_keeps_a_still_configured_kid() -> None:
    signer = AccessTokenSigner([NEW, OLD])
    assert signer.sign(CLAIMS) == AccessTokenSigner([NEW, OLD]).sign(CLAIMS)
    assert jwt.get_unverified_header(signer.sign(CLAIMS, "j1"))["kid"] == "j1"
    # A kid no longer configured: the current key signs instead.
    assert jwt.get_unverified_header(signer.sign(CLAIMS, "gone"))["kid"] == "j2"


def test_the_jwks_publishes_every_public_key_and_no_private_part() -> None:
    jwks = AccessTokenSigner([NEW, OLD]).jwks()
    assert [key["kid"] for key in jwks["keys"]] == ["j2", "j1"]
    for key, seed in zip(jwks["keys"], (NEW.seed, OLD.seed), strict=True):
        assert set(key) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (key["kty"], key["crv"], key["use"], key["alg"]) == (
            "OKP",
            "Ed25519",
            "sig",
            "EdDSA",
        )
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        assert unb64(key["x"]) == public
    assert b64(NEW.seed) not in json.dumps(jwks)


def test_keys_round_trip_through_the_setting_form_and_hide_their_seed() -> None:
    key = new_jwt_key()
    assert parse_jwt_keys(format_jwt_key(key)) == [key]
    assert b64(key.seed) not in repr(key)
    assert b64(key.seed) not in repr(AccessTokenSigner([key]))


async def test_a_genuine_token_verifies_locally_with_its_claims() -> None:
    source = Keys(AccessTokenSigner([NEW, OLD]))
    check, _ = verifier(source)
    claims = await check.verify_access_token(source.signer.sign(CLAIMS))
    assert (claims.account_id, claims.session_id) == (CLAIMS.account_id, CLAIMS.session_id)
    assert claims.roles == ("admin", "billing:read")
    assert claims.has_role("admin")
    assert (claims.issued_at, claims.expires_at, claims.kid) == (NOW, NOW + 600, "j2")
    assert source.fetches == 1
    await check.verify_access_token(source.signer.sign(CLAIMS))
    assert source.fetches == 1  # fetched once, not per token


async def test_expiry_follows_the_injected_clock_with_a_small_leeway() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    token = source.signer.sign(CLAIMS)
    check, clock = verifier(source, leeway_s=30)
    clock[0] = NOW + 600 + 29  # past exp, within the leeway
    await check.verify_access_token(token)
    clock[0] = NOW + 600 + 30
    with pytest.raises(AccessTokenExpired):
        await check.verify_access_token(token)
    clock[0] = NOW - 31  # issued in the future beyond the leeway: a clock gone wrong
    with pytest.raises(InvalidAccessToken) as future:
        await check.verify_access_token(token)
    assert not isinstance(future.value, AccessTokenExpired)


async def test_a_changed_payload_is_refused() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    head, body, signature = source.signer.sign(CLAIMS).split(".")
    claims = json.loads(unb64(body))
    claims["roles"] = ["admin", "superuser"]
    tampered = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
    check, _ = verifier(source)
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(tampered)


async def test_alg_none_is_refused() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    claims = jwt.decode(source.signer.sign(CLAIMS), options={"verify_signature": False})
    check, _ = verifier(source)
    for header in ({"alg": "none", "kid": "j2"}, {"alg": "None", "kid": "j2", "typ": "JWT"}):
        with pytest.raises(InvalidAccessToken):
            await check.verify_access_token(forge(header, claims))


async def test_hs256_signed_with_the_public_key_as_secret_is_refused() -> None:
    """The algorithm-confusion attack: the public key is public, so a verifier that let the
    header pick HMAC would accept anything 'signed' with it."""
    source = Keys(AccessTokenSigner([NEW]))
    claims = jwt.decode(source.signer.sign(CLAIMS), options={"verify_signature": False})
    claims["roles"] = ["superuser"]
    check, _ = verifier(source)
    x = source.signer.jwks()["keys"][0]["x"]
    for secret in (x.encode(), unb64(x), json.dumps(source.signer.jwks()["keys"][0]).encode()):
        header = {"alg": "HS256", "kid": "j2", "typ": "JWT"}
        head = b64(json.dumps(header).encode())
        body = b64(json.dumps(claims).encode())
        mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        with pytest.raises(InvalidAccessToken):
            await check.verify_access_token(f"{head}.{body}.{b64(mac)}")


async def test_an_unknown_kid_is_refused_after_one_rate_limited_refetch() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    stranger = AccessTokenSigner([JwtKey("j9", b"x" * 32)]).sign(CLAIMS)
    check, _ = verifier(source, refetch_interval_s=30)
    await check.verify_access_token(source.signer.sign(CLAIMS))
    assert source.fetches == 1
    check.monotonic[0] = 31.0  # type: ignore[attr-defined]
    for _ in range(5):
        with pytest.raises(InvalidAccessToken, match="not published"):
            await check.verify_access_token(stranger)
    assert source.fetches == 2  # one refetch for the unknown kid, then none within 30 s


async def test_a_token_with_a_kid_of_another_key_is_refused() -> None:
    """A kid that is published, on a token signed with some other key."""
    source = Keys(AccessTokenSigner([NEW, OLD]))
    impostor = AccessTokenSigner([JwtKey("j1", b"x" * 32)]).sign(CLAIMS)
    check, _ = verifier(source)
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(impostor)


async def test_another_issuer_and_missing_claims_are_refused() -> None:
    private = Ed25519PrivateKey.from_private_bytes(NEW.seed)
    source = Keys(AccessTokenSigner([NEW]))
    check, _ = verifier(source)
    good = jwt.decode(source.signer.sign(CLAIMS), options={"verify_signature": False})
    other = AccessTokenSigner([NEW], issuer="someone-else").sign(CLAIMS)
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(other)
    for missing in ("exp", "iat", "sid", "roles", "sub", "iss"):
        claims = {k: v for k, v in good.items() if k != missing}
        token = jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": "j2"})
        with pytest.raises(InvalidAccessToken):
            await check.verify_access_token(token)


async def test_rotation_signs_with_the_new_key_while_old_tokens_still_verify() -> None:
    """Nobody is signed out by a rotation: the old key stays published (second) until the
    tokens it signed have expired."""
    before = AccessTokenSigner([OLD])
    old_token = before.sign(CLAIMS)
    source = Keys(before)
    check, _ = verifier(source)
    await check.verify_access_token(old_token)

    source.signer = AccessTokenSigner([NEW, OLD])  # the rotation: new key first
    new_token = source.signer.sign(CLAIMS)
    assert jwt.get_unverified_header(new_token)["kid"] == "j2"
    check.monotonic[0] = 60.0  # type: ignore[attr-defined]
    assert (await check.verify_access_token(new_token)).kid == "j2"  # unknown kid: refetched
    assert (await check.verify_access_token(old_token)).kid == "j1"

    source.signer = AccessTokenSigner([NEW])  # the old key retired
    check.monotonic[0] = 120.0  # type: ignore[attr-defined]
    await check.load_keys()
    assert check.kids == ("j2",)
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(old_token)


async def test_keys_that_cannot_be_fetched_refuse_the_token_without_raising_anything_else() -> None:
    async def broken() -> Mapping[str, Any]:
        raise OSError("connection refused")

    check = AccessTokenVerifier(broken)
    with pytest.raises(InvalidAccessToken, match="could not be fetched"):
        await check.verify_access_token(AccessTokenSigner([NEW]).sign(CLAIMS))
    for garbage in ("", "a.b.c", "not a token", "x" * 9000):
        with pytest.raises(InvalidAccessToken):
            await check.verify_access_token(garbage)


async def test_keys_held_past_their_max_age_are_fetched_again_and_a_retired_key_is_dropped() -> (
    None
):
    source = Keys(AccessTokenSigner([NEW, OLD]))
    old_token = AccessTokenSigner([OLD]).sign(CLAIMS)
    check, _ = verifier(source, max_age_s=300)
    await check.verify_access_token(old_token)
    source.signer = AccessTokenSigner([NEW])  # the worker retired j1 (leaked)
    check.monotonic[0] = 299.0  # type: ignore[attr-defined]
    await check.verify_access_token(old_token)  # still within the cache's age
    check.monotonic[0] = 300.0  # type: ignore[attr-defined]
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(old_token)
    assert source.fetches == 2
    assert check.kids == ("j2",)


async def test_a_failed_refetch_of_stale_keys_keeps_verifying_with_the_keys_held() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    check, _ = verifier(source, max_age_s=300)
    token = source.signer.sign(CLAIMS)
    await check.verify_access_token(token)

    async def down() -> Mapping[str, Any]:
        raise OSError("the worker is restarting")

    check._fetch = down  # type: ignore[method-assign]
    check.monotonic[0] = 400.0  # type: ignore[attr-defined]
    assert (await check.verify_access_token(token)).kid == "j2"


async def test_a_remembered_token_is_still_checked_for_expiry_and_for_its_key() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    token = source.signer.sign(CLAIMS)
    check, clock = verifier(source)
    first = await check.verify_access_token(token)
    assert await check.verify_access_token(token) is first  # remembered, not verified again
    clock[0] = NOW + 600 + 30
    with pytest.raises(AccessTokenExpired):
        await check.verify_access_token(token)
    clock[0] = NOW + 1
    # The same kid now names another key: what the old key signed is verified again, and fails.
    source.signer = AccessTokenSigner([JwtKey("j2", b"z" * 32)])
    await check.load_keys(force=True)
    with pytest.raises(InvalidAccessToken):
        await check.verify_access_token(token)


async def test_the_memory_of_verified_tokens_is_bounded() -> None:
    source = Keys(AccessTokenSigner([NEW]))
    check, _ = verifier(source, cache_size=3)
    tokens = [source.signer.sign(replace(CLAIMS, expires_at=NOW + 600 + n)) for n in range(5)]
    for token in tokens:
        await check.verify_access_token(token)
    assert list(check._verified) == tokens[2:]
