"""Fixtures for the service layer on the in-memory store: a fake clock, fast argon2, and the
service built as the worker builds it (tests/support/factory.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.clock import FakeClock
from services.identity import IdentityService
from services.passwords import HashingPool
from services.tokens import SigningKey, TokenSigner
from stores.memory import MemoryIdentityStore
from tests.support.factory import TEST_KEYS, TEST_START, running_service


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(TEST_START)


@pytest.fixture
def store() -> MemoryIdentityStore:
    return MemoryIdentityStore()


@pytest.fixture
def keys() -> list[SigningKey]:
    return list(TEST_KEYS)


@pytest.fixture
def signer(keys: list[SigningKey]) -> TokenSigner:
    return TokenSigner(keys)


@pytest.fixture
async def assembled(
    store: MemoryIdentityStore, keys: list[SigningKey], clock: FakeClock
) -> AsyncIterator[tuple[IdentityService, HashingPool]]:
    timings: list[str] = []
    async with running_service(
        store, clock=clock, keys=keys, on_hash_timing=lambda op, _: timings.append(op)
    ) as (service, passwords):
        passwords.timings = timings  # type: ignore[attr-defined]
        yield service, passwords


@pytest.fixture
def passwords(assembled: tuple[IdentityService, HashingPool]) -> HashingPool:
    return assembled[1]


@pytest.fixture
def service(assembled: tuple[IdentityService, HashingPool]) -> IdentityService:
    return assembled[0]
