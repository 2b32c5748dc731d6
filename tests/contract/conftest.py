"""The `store` fixture: every contract test runs once on each IdentityStore implementation.
`service` and `passwords` are the service on PostgreSQL, for the races a row lock decides.

The contract suite gets a database of its own: its outbox tests publish whatever is pending,
which must not race the relay of a worker that another suite started on `pg_dsn`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.identity import IdentityService
from services.passwords import HashingPool
from stores import IdentityStore, MemoryIdentityStore, PostgresIdentityStore
from tests.conftest import migrated_database
from tests.support.factory import running_service


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    async with migrated_database() as dsn:
        yield dsn


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> IdentityStore:
    if request.param == "memory":
        return MemoryIdentityStore()
    # Looked up only for this parameter, so the memory runs never need a database.
    pg_store: IdentityStore = request.getfixturevalue("pg_store")
    return pg_store


@pytest.fixture
async def pg_service(
    pg_store: PostgresIdentityStore,
) -> AsyncIterator[tuple[IdentityService, HashingPool]]:
    """The service on PostgreSQL, built as the worker builds it, with cheap argon2."""
    async with running_service(pg_store) as built:
        yield built


@pytest.fixture
def service(pg_service: tuple[IdentityService, HashingPool]) -> IdentityService:
    return pg_service[0]


@pytest.fixture
def passwords(pg_service: tuple[IdentityService, HashingPool]) -> HashingPool:
    return pg_service[1]
