"""Fixtures shared by every test suite.

PostgreSQL: the local server on 127.0.0.1:5432 (user from PGUSER, default `postgres`). Each
test session gets a fresh, migrated database of its own, dropped at the end. A test that asks
for PostgreSQL fails when the server is unreachable: a missing database is a broken
environment, never a reason to skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stores import PostgresIdentityStore, migrate
from tests.support.tracing import recorded_spans

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


def with_user(dsn: str, user: str) -> str:
    """`dsn` with another user (trust authentication: no password needed)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port}"))


@asynccontextmanager
async def worker_role(owner_dsn: str) -> AsyncIterator[str]:
    """A login role of its own with the worker's privileges only (rows, no DDL) on the
    database of `owner_dsn`, granted by the migration as in production; its DSN. The role is
    dropped afterwards (roles are the server's, not the database's)."""
    role = f"identity_test_worker_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    finally:
        await admin.close()
    try:
        await migrate(owner_dsn, worker_role=role)
        yield with_user(owner_dsn, role)
    finally:
        admin = await _admin_connection()
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
        finally:
            await admin.close()
        owner = await asyncpg.connect(owner_dsn)
        try:
            await owner.execute(f'DROP OWNED BY "{role}"')
        finally:
            await owner.close()
        admin = await _admin_connection()
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
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


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The OpenTelemetry SDK installed for the test, spans kept in memory (see
    tests.support.tracing); without it the test runs as production does without an SDK."""
    with recorded_spans() as exporter:
        yield exporter
