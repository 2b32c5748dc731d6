"""Least privilege in PostgreSQL: the worker runs as a role that reads and writes rows and can
change nothing else; production refuses to run the worker as a role that could."""

from __future__ import annotations

import subprocess
import uuid

import asyncpg
import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_error, call_ok, key, new_password
from tests.support.workers import PRODUCTION, WORKER_BIN

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


async def test_the_migrate_job_moves_an_email_stored_lower_cased_to_its_folded_form(
    isolated: Isolated,
) -> None:
    """The pass that moves accounts to a changed canonical email runs with the migration: as
    the schema's owner, without any key, while the worker runs as the restricted role."""
    isolated.start()
    bus = await isolated.bus()
    tag = uuid.uuid4().hex[:8]
    person = Person(f"{tag}.ΝΙΚΟΣ@example.com", new_password(), "Nikos")
    created = await call_ok(bus, "account.create", person.create_payload(), key("fold"))
    # As the earlier rule stored it: lower-casing wrote the last capital sigma as a final one.
    conn = await asyncpg.connect(isolated.database_url)
    try:
        await conn.execute(
            "UPDATE accounts SET email_canonical = $2 WHERE id = $1",
            created["account"]["id"],
            f"{tag}.νικος@example.com",
        )
    finally:
        await conn.close()
    credentials = {"email": f"{tag}.νικος@example.com", "password": person.password}
    error = await call_error(bus, "session.start", credentials, key("fold"))
    assert error["code"] == "invalid_credentials"  # the new rule's form finds nobody yet

    job = {name: value for name, value in isolated.env.items() if name not in PRODUCTION}
    done = subprocess.run(
        [str(WORKER_BIN), "migrate"], env=job, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert "accounts moved to their new canonical email: 1" in done.stdout
    for typed in (f"{tag}.νικος@example.com", f"{tag}.ΝΙΚΟΣ@EXAMPLE.COM"):
        started = await call_ok(bus, "session.start", {**credentials, "email": typed}, key("fold"))
        assert started["account"]["id"] == created["account"]["id"]
