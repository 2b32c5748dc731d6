"""The `store` fixture: every contract test runs once on each IdentityStore implementation."""

from __future__ import annotations

import pytest

from stores import IdentityStore, MemoryIdentityStore


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> IdentityStore:
    if request.param == "memory":
        return MemoryIdentityStore()
    # Looked up only for this parameter, so the memory runs never need a database.
    pg_store: IdentityStore = request.getfixturevalue("pg_store")
    return pg_store
