"""What only the PostgreSQL store has: migrations, driver-error translation, latency hook."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from hashlib import sha256
from typing import Any

import asyncpg
import pytest

from stores import (
    HashBudget,
    PostgresIdentityStore,
    StoreError,
    ThrottleRules,
    TransientStoreError,
    migrate,
)
from stores.postgres.migrate import ensure_database, migration_files
from tests.contract.builders import T0, account, event, idempotency, unique


async def test_concurrent_migrators_create_the_database_and_apply_each_file_once(
    pg_scratch_dsn: str,
) -> None:
    names = [name for name, _ in migration_files()]
    results = await asyncio.gather(*(migrate(pg_scratch_dsn) for _ in range(4)))

    assert sorted(results, key=len) == [[], [], [], names]
    assert await migrate(pg_scratch_dsn) == []
    conn = await asyncpg.connect(pg_scratch_dsn)
    try:
        recorded = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
    finally:
        await conn.close()
    assert recorded == names


def test_migrations_ship_as_numbered_files_in_order() -> None:
    names = [name for name, _ in migration_files()]
    assert names[0] == "0001_initial.sql"
    assert names == sorted(names)


async def test_every_operation_reports_its_latency(pg_dsn: str) -> None:
    seen: list[tuple[str, float]] = []
    store = await PostgresIdentityStore.connect(
        pg_dsn, observe=lambda op, seconds: seen.append((op, seconds))
    )
    try:
        async with store.unit_of_work() as uow:
            await uow.insert_account(account())
        await store.ping()
    finally:
        await store.close()

    operations = [op for op, _ in seen]
    assert operations[0] == "connect"
    assert {"begin", "uow.insert_account", "commit", "ping", "close"} <= set(operations)
    assert all(seconds >= 0 for _, seconds in seen)


async def test_unreachable_server_is_a_transient_error() -> None:
    with pytest.raises(TransientStoreError) as caught:
        await PostgresIdentityStore.connect("postgresql://postgres@127.0.0.1:1/identity")
    assert isinstance(caught.value.__cause__, OSError)


async def test_connection_lost_inside_a_unit_is_transient_and_commits_nothing(
    pg_dsn: str, pg_store: PostgresIdentityStore
) -> None:
    record = account()
    admin = await asyncpg.connect(pg_dsn)

    async def doomed() -> None:
        async with pg_store.unit_of_work() as uow:
            await uow.insert_account(record)
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await uow.get_account(record.id)

    try:
        with pytest.raises(TransientStoreError):
            await doomed()
    finally:
        await admin.close()
    assert await pg_store.get_account(record.id) is None


async def test_a_key_that_fails_its_batch_fails_only_its_own_look_up(
    pg_store: PostgresIdentityStore,
) -> None:
    # Text cannot hold U+0000: PostgreSQL refuses the whole batch's query for that one key,
    # which is then asked for again alone, and the other keys of its batch are answered.
    records = [idempotency() for _ in range(3)]
    async with pg_store.unit_of_work() as uow:
        for record in records:
            await uow.record_outcome([], record)

    found = await asyncio.gather(
        pg_store.get_idempotency(records[0].key),
        pg_store.get_idempotency("bad\x00key"),
        *(pg_store.get_idempotency(r.key) for r in records[1:]),
        return_exceptions=True,
    )

    assert found[0] == records[0]
    assert isinstance(found[1], StoreError)
    assert not isinstance(found[1], TransientStoreError)
    assert found[2:] == records[1:]


async def test_batched_look_ups_are_timed_per_caller_and_per_query(pg_dsn: str) -> None:
    seen: list[str] = []
    store = await PostgresIdentityStore.connect(pg_dsn, observe=lambda op, _: seen.append(op))
    try:
        await asyncio.gather(*(store.get_account(account().id) for _ in range(5)))
    finally:
        await store.close()

    assert seen.count("get_account") == 5
    assert 1 <= seen.count("batch.get_account") < 5


async def test_close_cuts_off_a_connection_still_in_use_after_its_deadline(pg_dsn: str) -> None:
    store = await PostgresIdentityStore.connect(pg_dsn)
    held, release = asyncio.Event(), asyncio.Event()

    async def outlives_the_stop() -> None:
        async with store.unit_of_work():
            held.set()
            await release.wait()

    work = asyncio.create_task(outlives_the_stop())
    await held.wait()
    started = asyncio.get_running_loop().time()
    await store.close(force_after_s=0.3)
    assert asyncio.get_running_loop().time() - started < 3
    release.set()
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever a terminated pool raises
        await work


async def test_the_store_never_compiles_a_statement_to_machine_code(pg_store: Any) -> None:
    # A stale estimate would make a 1 ms claim take half a second compiling (store.py).
    async with pg_store.unit_of_work() as uow:
        assert await uow._conn.fetchval("SHOW jit") == "off"


@pytest.mark.parametrize(
    "applied_before",
    [
        pytest.param(lambda name: name < "0003", id="in-order"),
        # A development database that applied the later migrations first (they were numbered
        # on other branches): 0003 then comes last, and must need none of them nor break them.
        pytest.param(lambda name: not name.startswith("0003"), id="after-0004-to-0007"),
    ],
)
async def test_an_outbox_written_before_0003_is_published_after_it(
    pg_scratch_dsn: str, applied_before: Any
) -> None:
    # The schema as the previous version left it, with one row published and two not.
    await ensure_database(pg_scratch_dsn)
    earlier = [(name, text) for name, text in migration_files() if applied_before(name)]
    conn = await asyncpg.connect(pg_scratch_dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for name, text in earlier:
            await conn.execute(text)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        old = "INSERT INTO outbox (event_id, type, body, created_at, published_at) VALUES"
        body = "convert_to('{\"data\": {}}', 'UTF8')"  # what a later migration may read
        await conn.execute(
            f"{old} ('evt_a', 'x', {body}, now(), now()), ('evt_b', 'x', {body}, now(), NULL)"
        )
        await conn.execute(f"{old} ('evt_c', 'x', {body}, now(), NULL)")

        applied = await migrate(pg_scratch_dsn)
        assert "0003_outbox_commands.sql" in applied
        assert sorted(applied) == applied  # the pending ones, in file order
        # A worker of the previous version, still running during a rolling upgrade.
        await conn.execute(
            f"{old} ('evt_d', 'x', {body}, now(), NULL), ('evt_e', 'x', {body}, now(), NULL)"
        )
    finally:
        await conn.close()

    store = await PostgresIdentityStore.connect(pg_scratch_dsn)
    try:
        # And a command of this version, after them.
        async with store.unit_of_work() as uow:
            await uow.record_outcome([event(), event()], None)
        async with store.claim_events(10) as batch:
            claimed = [e.event_id for e in batch.events]
            batch.mark_published([e.seq for e in batch.events])
            commands = [e.command_seq for e in batch.events]
        async with store.claim_events(10) as batch:
            assert list(batch.events) == []
        assert await store.outbox_backlog(T0) == (0, 0.0)
    finally:
        await store.close()
    assert claimed[:4] == ["evt_b", "evt_c", "evt_d", "evt_e"]
    assert len(claimed) == 6
    # Each earlier row a command of its own, the new command's two rows one.
    assert len(set(commands[:4])) == 4
    assert commands[4] == commands[5] not in commands[:4]


async def test_the_plain_email_counters_of_schema_0001_move_to_keyed_tags(
    pg_store: PostgresIdentityStore, pg_dsn: str
) -> None:
    """Migration 0002 cannot re-key them (the key is not in the database): the worker does,
    keeping a lock in force and the larger count, and nothing names an email afterwards."""

    def tag(email: str) -> bytes:
        return sha256(b"test-key" + email.encode()).digest()[:16]

    locked, counted, merged = (unique("legacy") + "@example.com" for _ in range(3))
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.executemany(
            "INSERT INTO signin_throttle VALUES ($1, $2, $3, $4)",
            [
                (locked, 7, T0 + timedelta(seconds=120), T0),
                (counted, 3, None, T0),
                (merged, 2, None, T0),
            ],
        )
        await pg_store.reserve_password_attempt(tag(merged), b"source", T0, ThrottleRules())

        assert await pg_store.adopt_legacy_throttle(tag) >= 3

        left = await conn.fetchval(
            "SELECT count(*) FROM signin_throttle WHERE email_canonical = ANY($1)",
            [locked, counted, merged],
        )
        rows = {
            bytes(r["email_tag"]): (r["failures"], r["locked_until"])
            for r in await conn.fetch("SELECT * FROM throttle_emails")
        }
    finally:
        await conn.close()
    assert left == 0
    assert rows[tag(locked)] == (7, T0 + timedelta(seconds=120))
    assert rows[tag(counted)] == (3, None)
    assert rows[tag(merged)] == (2, None)  # the larger of 2 (legacy) and 1 (new)
    # The lock carried over refuses a new source (the email counter's lock), as it did.
    refused = await pg_store.reserve_password_attempt(tag(locked), b"new", T0, ThrottleRules())
    assert (refused.allowed, refused.locked) == (False, "email")
    assert await pg_store.adopt_legacy_throttle(tag) == 0


async def test_a_write_refused_as_read_only_is_transient_and_the_pool_reconnects(
    pg_dsn: str,
) -> None:
    # A connection left on a server that no longer takes writes (a primary demoted under
    # it), stood in for by a session whose transactions are read-only.
    store = await PostgresIdentityStore.connect(pg_dsn, min_size=1, max_size=1)
    try:
        pool = store._pool
        async with pool.acquire() as conn:
            await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            stale_pid = conn.get_server_pid()
        record = account()

        with pytest.raises(TransientStoreError) as caught:
            async with store.unit_of_work() as uow:
                await uow.insert_account(record)
        assert isinstance(caught.value.__cause__, asyncpg.ReadOnlySQLTransactionError)

        async with store.unit_of_work() as uow:  # the retry, on a fresh connection
            await uow.insert_account(record)
        assert await store.get_account(record.id) is not None
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != stale_pid
    finally:
        await store.close()


@pytest.mark.parametrize("operation", ["reserve_password_attempt", "spend_hash_budget"])
async def test_a_write_refused_as_read_only_outside_a_unit_of_work_reconnects_too(
    pg_dsn: str, operation: str
) -> None:
    """Every sign-in reserves an attempt before its unit of work, and the hash budget is one
    statement of its own: a read-only refusal there must move the pool just the same."""
    store = await PostgresIdentityStore.connect(pg_dsn, min_size=1, max_size=1)
    try:
        pool = store._pool
        async with pool.acquire() as conn:
            await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            stale_pid = conn.get_server_pid()

        async def write() -> object:
            if operation == "reserve_password_attempt":
                return await store.reserve_password_attempt(
                    b"email-tag", b"source-tag", T0, ThrottleRules()
                )
            return await store.spend_hash_budget(b"source-tag", 1, T0, HashBudget())

        with pytest.raises(TransientStoreError) as caught:
            await write()
        assert isinstance(caught.value.__cause__, asyncpg.ReadOnlySQLTransactionError)
        if store._expiring:  # the expiry runs as a task: the worker's retry waits its back-off
            await asyncio.wait(set(store._expiring), timeout=10)
        await write()  # the retry, on a fresh connection
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != stale_pid
    finally:
        await store.close()


async def test_the_purged_tables_are_vacuumed_at_two_percent_not_a_fifth(pg_dsn: str) -> None:
    """The purge deletes all day: each purged table carries its own autovacuum thresholds
    (0010), or its dead rows would pile up for hours between PostgreSQL's default runs."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT relname, reloptions FROM pg_class WHERE relkind = 'r' AND relname = ANY($1)",
            ["idempotency", "outbox", "sessions", "courier_outbox"],
        )
    finally:
        await conn.close()
    options = {row["relname"]: set(row["reloptions"] or ()) for row in rows}
    assert set(options) == {"idempotency", "outbox", "sessions", "courier_outbox"}
    for table, set_on in options.items():
        assert {
            "autovacuum_vacuum_scale_factor=0.02",
            "autovacuum_vacuum_insert_scale_factor=0.02",
            "autovacuum_analyze_scale_factor=0.02",
        } <= set_on, table
