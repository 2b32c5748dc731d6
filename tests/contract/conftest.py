"""The `store` fixture: every contract test runs once on each IdentityStore implementation.

The contract suite gets a database of its own: its outbox tests publish whatever is pending,
which must not race the relay of a worker that another suite started on `pg_dsn`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stores import IdentityStore, MemoryIdentityStore
from tests.conftest import migrated_database


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
