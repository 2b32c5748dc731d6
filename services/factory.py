"""The one way an `IdentityService` is put together: from a `ServiceConfig` (what settings, or
a test, decide) plus the store, the signing keys (session and refresh tokens), the HMAC
key, the JWT keys (access tokens) and the clock.

The worker's composition root (worker/bootstrap.py) fills the config from its settings; the
tests fill it with cheap argon2 (tests/support/factory.py). Both then call
`make_identity_service`, so a test runs the service as the worker wires it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.access_tokens import AccessTokenSigner, JwtKey
from services.clock import Clock
from services.codes import CodeKeys, CodePolicy, Codes
from services.identity import IdentityService, SessionPolicy
from services.keys import HmacKey
from services.passwords import HashingPool, PasswordPolicy, make_hasher
from services.refresh import RefreshTokenCodec, SessionTokens, TokenPolicy
from services.tokens import SigningKey, TokenSigner
from stores import HashBudget, ServiceStore, ThrottleRules


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """The service's knobs: argon2's cost and threads, and its password, session and
    password-attempt throttling rules, and the argon2 budget per source (each defaulting to
    its own class's defaults)."""

    argon2_time_cost: int
    argon2_memory_kib: int
    argon2_parallelism: int
    hash_workers: int
    passwords: PasswordPolicy = field(default_factory=PasswordPolicy)
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    throttle: ThrottleRules = field(default_factory=ThrottleRules)
    budget: HashBudget = field(default_factory=HashBudget)
    codes: CodePolicy = field(default_factory=CodePolicy)
    tokens: TokenPolicy = field(default_factory=TokenPolicy)


def make_identity_service(
    store: ServiceStore,
    config: ServiceConfig,
    *,
    keys: Sequence[SigningKey],
    hmac_key: bytes,
    jwt_keys: Sequence[JwtKey],
    clock: Clock,
    on_hash_timing: Callable[[str, float], None] | None = None,
    hashing_niceness: int = 0,
    on_replay: Callable[[str], None] | None = None,
) -> tuple[IdentityService, HashingPool]:
    """The service and its hashing pool. The pool is not started: the caller awaits
    `start()` before the first command and calls `close()` when done."""
    hasher = make_hasher(
        config.argon2_time_cost, config.argon2_memory_kib, config.argon2_parallelism
    )
    passwords = HashingPool(
        hasher,
        workers=config.hash_workers,
        on_timing=on_hash_timing,
        niceness=hashing_niceness,
    )
    service = IdentityService(
        store,
        passwords=passwords,
        signer=TokenSigner(keys),
        hmac_key=HmacKey(hmac_key),
        tokens=SessionTokens(
            AccessTokenSigner(jwt_keys, issuer=config.tokens.issuer),
            RefreshTokenCodec(keys),
            config.tokens,
        ),
        clock=clock,
        policy=config.passwords,
        sessions=config.sessions,
        throttle=config.throttle,
        budget=config.budget,
        on_replay=on_replay,
        # One-time codes are keyed (and sealed for the courier) by subkeys of the HMAC key.
        codes=Codes(CodeKeys(hmac_key), config.codes),
    )
    return service, passwords
