"""The restore drill of docs/runbook.md ("Backup and restore"), on a database of its own.

A worker runs on a fresh database owned by a role of its own (as scripts/ensure-roles.sh makes
`identity_owner`), accounts and sessions are made through the broker, and the database is
dumped online with `pg_dump --format=custom` as the owner. Then the disaster: the worker is
killed and the database dropped. It is created again and `pg_restore`d as the owner, a worker
started with the same keys, and everything made before the backup must still work: every
account signs in, every session verifies, a refresh token refreshes, a replayed idempotency
key gets its stored reply, the outbox holds nothing unpublished, and every table holds exactly
the rows it held at the backup.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from stores import migrate
from tests.conftest import _admin_connection, _pg_url, with_user
from tests.integration.scenarios import Person, call_ok, key, sign_up
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.vhosts import BROKER, fresh_vhost
from tests.support.workers import WorkerProcess, worker_env

ACCOUNTS = 30


@dataclass
class Place:
    database: str
    owner: str
    owner_dsn: str
    worker_dsn: str
    amqp_url: str


@asynccontextmanager
async def owned_database() -> AsyncIterator[Place]:
    """A fresh vhost, and a database owned by a login role of its own and migrated by it,
    which grants a worker role of its own its rows; the database, then the roles (whose
    grants went with it) are dropped afterwards."""
    name = f"identity_test_{secrets.token_hex(6)}"
    owner = f"identity_test_owner_{secrets.token_hex(6)}"
    worker = f"identity_test_worker_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE ROLE "{owner}" LOGIN')
        await admin.execute(f'CREATE ROLE "{worker}" LOGIN')
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    finally:
        await admin.close()
    owner_dsn = with_user(_pg_url(name), owner)
    try:
        await _lock_down_schema(name, owner)
        await migrate(owner_dsn, worker_role=worker)
        with fresh_vhost() as vhost:
            yield Place(name, owner, owner_dsn, with_user(owner_dsn, worker), f"{BROKER}/{vhost}")
    finally:
        admin = await _admin_connection()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'DROP ROLE IF EXISTS "{worker}"')
            await admin.execute(f'DROP ROLE IF EXISTS "{owner}"')
        finally:
            await admin.close()


async def _lock_down_schema(database: str, owner: str) -> None:
    """What scripts/ensure-roles.sh does inside the database: the owner owns the schema, and
    nobody else may create in it."""
    connection = await asyncpg.connect(_pg_url(database))
    try:
        await connection.execute(f'ALTER SCHEMA public OWNER TO "{owner}"')
        await connection.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    finally:
        await connection.close()


async def contents(dsn: str) -> dict[str, tuple[int, str]]:
    """Every table's row count and a digest of its rows, and every sequence's position."""
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        found: dict[str, tuple[int, str]] = {}
        for row in tables:
            table = row["tablename"]
            count, digest = await connection.fetchrow(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
                f' FROM "{table}" t'
            )
            found[table] = (int(count), str(digest))
        for row in await connection.fetch(
            "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'"
        ):
            found[f"sequence {row['sequencename']}"] = (int(row["last_value"] or 0), "")
        return found
    finally:
        await connection.close()


async def unpublished(dsn: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        return {
            "outbox": await connection.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            ),
            "outbox_pending": await connection.fetchval("SELECT count(*) FROM outbox_pending"),
            "courier_outbox": await connection.fetchval(
                "SELECT count(*) FROM courier_outbox WHERE relayed_at IS NULL"
            ),
        }
    finally:
        await connection.close()


async def run(*command: str) -> float:
    """Run a client tool to completion, failing with its output; its wall time in seconds."""
    started = time.perf_counter()
    done = await asyncio.to_thread(
        subprocess.run, list(command), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{command[0]} failed ({done.returncode}): {done.stderr}"
    assert "error" not in done.stderr.lower(), done.stderr
    return time.perf_counter() - started


async def test_the_restore_drill_brings_back_every_account_session_and_stored_reply(
    tmp_path: Path,
) -> None:
    async with owned_database() as place:
        env = worker_env(place.amqp_url, place.worker_dsn, place.owner_dsn)
        before = WorkerProcess(env, tmp_path / "before.log").start()
        bus = await Bus.open(place.amqp_url)
        try:
            people = [Person.new(f"drill{i}") for i in range(ACCOUNTS)]
            accounts = await asyncio.gather(*(sign_up(bus, person) for person in people))
            start_keys = [key("drill-start") for _ in people]
            sessions = await asyncio.gather(
                *(
                    call_ok(bus, "session.start", person.credentials(), start_key)
                    for person, start_key in zip(people, start_keys, strict=True)
                )
            )
            # Everything the commands caused has left the outbox: the backup is of a quiet
            # database, so that what it holds can be compared row for row.
            await eventually(
                lambda: _all_zero(unpublished(place.owner_dsn)),
                timeout=60,
                what="the outbox published",
            )
            at_backup = await contents(place.owner_dsn)
            assert at_backup["accounts"][0] == ACCOUNTS
            assert at_backup["sessions"][0] == ACCOUNTS

            # Online: the worker keeps running while pg_dump reads one snapshot.
            dump = tmp_path / "identity.dump"
            dump_s = await run(
                "pg_dump", "--format=custom", f"--file={dump}", f"--dbname={place.owner_dsn}"
            )
            dump_bytes = dump.stat().st_size
            listing = subprocess.run(
                ["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True
            ).stdout
            assert "TABLE DATA public accounts" in listing
            assert "TABLE DATA public schema_migrations" in listing
        finally:
            await bus.close()

        # The disaster: the worker dies and the database is gone.
        before.kill()
        admin = await _admin_connection()
        try:
            await admin.execute(f'DROP DATABASE "{place.database}" WITH (FORCE)')
            gone = await admin.fetchval(
                "SELECT count(*) FROM pg_database WHERE datname = $1", place.database
            )
            assert gone == 0
            # Restore, step 1 (the roles exist: they belong to the server, and a server lost
            # with its database gets them back from `pg_dumpall --roles-only` first).
            started = time.perf_counter()
            await admin.execute(
                f'CREATE DATABASE "{place.database}" OWNER "{place.owner}" TEMPLATE template0'
            )
        finally:
            await admin.close()
        # Step 2: the data, as the owner, in one transaction, stopping at the first error.
        await run(
            "pg_restore",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={place.owner_dsn}",
            str(dump),
        )
        restore_s = time.perf_counter() - started
        assert await contents(place.owner_dsn) == at_backup, "rows differ after the restore"

        # Step 3: a worker with the same keys (its migration on start finds nothing to do).
        ready_started = time.perf_counter()
        after = WorkerProcess(env, tmp_path / "after.log").start()
        ready_s = time.perf_counter() - ready_started
        bus = await Bus.open(place.amqp_url)
        try:
            for session, account in zip(sessions, accounts, strict=True):
                verified = await call_ok(bus, "session.verify", {"token": session["token"]})
                assert verified["session"]["id"] == session["session"]["id"]
                assert verified["account"]["id"] == account["id"]
            for person, account in zip(people, accounts, strict=True):
                signed_in = await call_ok(bus, "session.start", person.credentials())
                assert signed_in["account"]["id"] == account["id"]
            # A pre-backup key replays its stored reply: the same session and token.
            replay = await call_ok(bus, "session.start", people[0].credentials(), start_keys[0])
            assert replay == sessions[0]
            # A refresh token from before the backup still refreshes (once: it is used up).
            refreshed = await call_ok(
                bus, "session.refresh", {"refresh_token": sessions[1]["refresh_token"]}
            )
            assert refreshed["session"]["id"] == sessions[1]["session"]["id"]
            # Nothing left behind in the outbox: what was published before is not again.
            await eventually(
                lambda: _all_zero(unpublished(place.owner_dsn)),
                timeout=60,
                what="the outbox published after the restore",
            )
            repeated = {
                event["event_id"] for event in bus.events if event["type"] == "account.created"
            }
            assert not repeated, "events published before the backup were published again"
        finally:
            await bus.close()
            after.terminate()
        # The restore brought the whole schema: the migration on start applied nothing.
        after_run = await contents(place.owner_dsn)
        assert after_run["schema_migrations"] == at_backup["schema_migrations"]

        print(
            f"\nrestore drill: {ACCOUNTS} accounts, {ACCOUNTS} sessions; dump {dump_bytes} bytes"
            f" in {dump_s:.2f} s; create + restore {restore_s:.2f} s; worker ready in"
            f" {ready_s:.2f} s"
        )


async def _all_zero(counts: Any) -> bool:
    return not any((await counts).values())
