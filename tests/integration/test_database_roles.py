"""Least privilege in PostgreSQL: the worker runs as a role that reads and writes rows and can
change nothing else; production refuses to run the worker as a role that could."""

from __future__ import annotations

import subprocess

import asyncpg
import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key
from tests.support.workers import WORKER_BIN

pytestmark = pytest.mark.integration

DDL = [
    "CREATE TABLE intruder (id int)",
    "DROP TABLE accounts",
    "ALTER TABLE accounts ADD COLUMN is_admin boolean",
    "TRUNCATE outbox",
    "CREATE INDEX intruder_idx ON accounts (display_name)",
]


async def test_the_worker_role_can_use_rows_and_nothing_else(isolated: Isolated) -> None:
    worker = isolated.start()
    bus = await isolated.bus()
    person = Person.new("roles")
    await call_ok(bus, "account.create", person.create_payload(), key("roles"))
    conn = await asyncpg.connect(isolated.env["IDENTITY_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 1
        for statement in DDL:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        # Production's worker role cannot even read where dev mode keeps keys.
        for table in ("shared_secrets", "schema_migrations"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM {table}")
    finally:
        await conn.close()
    assert worker.alive()


def test_production_refuses_to_run_the_worker_as_a_superuser(isolated: Isolated) -> None:
    env = {**isolated.env, "IDENTITY_DATABASE_URL": isolated.database_url}  # the superuser's
    done = subprocess.run(
        [str(WORKER_BIN), "run"], env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 2
    assert "IDENTITY_DATABASE_URL" in done.stderr
    assert "superuser" in done.stderr


async def test_dev_mode_runs_as_a_superuser_with_a_warning(isolated: Isolated) -> None:
    worker = isolated.start(IDENTITY_DATABASE_URL=isolated.database_url, IDENTITY_DEV_MODE="true")
    bus = await isolated.bus()
    person = Person.new("devsuper")
    await call_ok(bus, "account.create", person.create_payload(), key("devsuper"))

    assert "the worker's role is a superuser" in worker.log_text()
