"""The service for tests, built the way the worker builds it (services.factory), with values
fit for tests: cheap argon2, an argon2 budget no test reaches unless it means to, a fixed
start time, and keys generated for this test session (no key is written in the repository)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from services.access_tokens import JwtKey
from services.clock import Clock, FakeClock
from services.factory import ServiceConfig, make_identity_service
from services.identity import IdentityService
from services.passwords import HashingPool
from services.tokens import SigningKey
from stores import HashBudget, ServiceStore

# Cheap argon2id parameters: these tests are about rules, not about hash strength.
UNLIMITED_BUDGET = HashBudget(rate_per_s=1e6, burst=1_000_000)
TEST_CONFIG = ServiceConfig(
    argon2_time_cost=1,
    argon2_memory_kib=8192,
    argon2_parallelism=1,
    hash_workers=2,
    budget=UNLIMITED_BUDGET,
)
# The signing key first, then one that still verifies; and the HMAC key.
TEST_KEYS = (SigningKey("k2", secrets.token_bytes(32)), SigningKey("k1", secrets.token_bytes(32)))
TEST_HMAC_KEY = secrets.token_bytes(32)
# Access-token keys: the signing one first, then one that is still published.
TEST_JWT_KEYS = (JwtKey("j2", secrets.token_bytes(32)), JwtKey("j1", secrets.token_bytes(32)))
TEST_START = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


@asynccontextmanager
async def running_service(
    store: ServiceStore,
    *,
    clock: Clock | None = None,
    keys: Sequence[SigningKey] = TEST_KEYS,
    hmac_key: bytes = TEST_HMAC_KEY,
    jwt_keys: Sequence[JwtKey] = TEST_JWT_KEYS,
    config: ServiceConfig = TEST_CONFIG,
    on_hash_timing: Callable[[str, float], None] | None = None,
) -> AsyncIterator[tuple[IdentityService, HashingPool]]:
    """The service on `store` and its hashing pool, started, and closed on exit. The clock
    is a `FakeClock` at `TEST_START` unless one is given."""
    service, passwords = make_identity_service(
        store,
        config,
        keys=keys,
        hmac_key=hmac_key,
        jwt_keys=jwt_keys,
        clock=clock or FakeClock(TEST_START),
        on_hash_timing=on_hash_timing,
    )
    await passwords.start()
    try:
        yield service, passwords
    finally:
        passwords.close()
