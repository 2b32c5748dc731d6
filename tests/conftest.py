"""Fixtures shared by every test suite.

PostgreSQL: the local server on 127.0.0.1:5432 (user from PGUSER, default `postgres`). Each
test session gets a fresh, migrated database of its own, dropped at the end. A test that asks
for PostgreSQL fails when the server is unreachable: a missing database is a broken
environment, never a reason to skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from stores import PostgresIdentityStore, migrate

PG_HOST = "127.0.0.1"
PG_PORT = 5432


def _pg_url(database: str) -> str:
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{database}"


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(_pg_url("postgres"), timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {_pg_url('postgres')}: {exc!r}", pytrace=False)


@asynccontextmanager
async def _scratch_database() -> AsyncIterator[str]:
    """The DSN of a database that does not exist yet; dropped afterwards if it was created."""
    name = f"identity_test_{secrets.token_hex(6)}"
    await (await _admin_connection()).close()
    try:
        yield _pg_url(name)
    finally:
        admin = await _admin_connection()
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()


@asynccontextmanager
async def migrated_database() -> AsyncIterator[str]:
    """A fresh, migrated database, dropped afterwards: for a suite that must not share
    `pg_dsn` (override `pg_dsn` in its conftest with this)."""
    async with _scratch_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh, migrated database for this test session."""
    async with migrated_database() as dsn:
        yield dsn


@pytest.fixture
async def pg_scratch_dsn() -> AsyncIterator[str]:
    """A DSN naming a database that does not exist yet (for tests of creating it)."""
    async with _scratch_database() as dsn:
        yield dsn


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PostgresIdentityStore]:
    store = await PostgresIdentityStore.connect(pg_dsn, max_size=25)
    try:
        yield store
    finally:
        await store.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A skipped test is not a pass: unless skips are explicitly allowed, they fail the run."""
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped and not os.environ.get("IDENTITY_TESTS_ALLOW_SKIPS"):
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped: failing the run (set IDENTITY_TESTS_ALLOW_SKIPS=1 "
            "to allow skips locally)",
            red=True,
        )
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED
