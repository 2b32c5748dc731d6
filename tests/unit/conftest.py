"""Fixtures for the service layer on the in-memory store: a fake clock, fast argon2."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from services.clock import FakeClock
from services.identity import IdentityService, SessionPolicy
from services.passwords import HashingPool, PasswordPolicy, make_hasher
from services.tokens import SigningKey, TokenSigner
from stores import ThrottleSchedule
from stores.memory import MemoryIdentityStore

# Cheap argon2id parameters: these tests are about rules, not about hash strength.
FAST_HASHER = dict(time_cost=1, memory_kib=8192, parallelism=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 22, 9, 0, tzinfo=UTC))


@pytest.fixture
def store() -> MemoryIdentityStore:
    return MemoryIdentityStore()


@pytest.fixture
def keys() -> list[SigningKey]:
    return [SigningKey("k2", b"n" * 32), SigningKey("k1", b"o" * 32)]


@pytest.fixture
def signer(keys: list[SigningKey]) -> TokenSigner:
    return TokenSigner(keys)


@pytest.fixture
async def passwords() -> AsyncIterator[HashingPool]:
    timings: list[str] = []
    pool = HashingPool(
        make_hasher(**FAST_HASHER), workers=2, on_timing=lambda op, _: timings.append(op)
    )
    pool.timings = timings  # type: ignore[attr-defined]
    await pool.start()
    yield pool
    pool.close()


@pytest.fixture
def service(
    store: MemoryIdentityStore, passwords: HashingPool, signer: TokenSigner, clock: FakeClock
) -> IdentityService:
    return IdentityService(
        store,
        passwords=passwords,
        signer=signer,
        clock=clock,
        policy=PasswordPolicy(),
        sessions=SessionPolicy(),
        throttle=ThrottleSchedule(free_failures=5, base_delay_s=1, max_delay_s=900),
    )
