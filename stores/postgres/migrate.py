"""Schema migrations: numbered .sql files shipped in `stores/postgres/migrations`, applied in
order.

Several worker processes start at once and all call `migrate()`; they serialise on a
PostgreSQL advisory lock, so exactly one applies each file and the others find it recorded in
`schema_migrations`. Each file runs in its own transaction together with its record, so a
failed file leaves neither half a schema nor a record behind.

Least privilege: migrations run as the schema's owner; the worker runs as a role of its own
that may only read and write rows. `migrate(..., worker_role=name)` grants that role what it
needs after every run (so tables added by later migrations are covered): DML on every table
but the migration ledger, the sequences, and `shared_secrets` only where dev mode keeps keys
there (production's worker role cannot even read it). It can create, alter or drop nothing.
"""

from __future__ import annotations

import re
from importlib.resources import files
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

# Any constant works as long as nothing else in the database uses it; advisory locks are
# scoped to the database, so test databases on one server do not block each other.
MIGRATION_LOCK_ID = 0x1D3A_7000_0001

_MIGRATION_NAME = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every shipped migration, in the order they apply."""
    folder = files("stores.postgres").joinpath("migrations")
    names = sorted(entry.name for entry in folder.iterdir() if _MIGRATION_NAME.match(entry.name))
    return [(name, folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


async def migrate(dsn: str, *, worker_role: str | None = None, dev_mode: bool = False) -> list[str]:
    """Create the database named in `dsn` if needed, apply pending migrations, then grant
    `worker_role` (if any) the worker's privileges; the names of the migrations applied."""
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            applied = await _apply_pending(conn)
            if worker_role is not None:
                await grant_worker(conn, worker_role, dev_mode=dev_mode)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(_CREATE_LEDGER)
    applied = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
    done: list[str] = []
    for name, sql in migration_files():
        if name in applied:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        done.append(name)
    return done


async def grant_worker(conn: asyncpg.Connection, role: str, *, dev_mode: bool) -> None:
    """Row access for the worker's role, nothing more (see the module's docstring)."""
    who = quote_identifier(role)
    async with conn.transaction():
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {who}")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {who}"
        )
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {who}")
        await conn.execute(f"REVOKE ALL ON schema_migrations FROM {who}")
        if not dev_mode:
            await conn.execute(f"REVOKE ALL ON shared_secrets FROM {who}")


def dsn_user(dsn: str) -> str | None:
    """The user a URL-style DSN names, or None."""
    user = urlsplit(dsn).username
    return None if user is None else unquote(user)


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn`, through the `postgres` maintenance database on the
    same server, unless it exists. Safe when several processes race to create it."""
    name = database_name(dsn)
    if name is None:
        return
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    admin = await asyncpg.connect(maintenance_dsn(dsn))
    try:
        await admin.execute(f"CREATE DATABASE {quote_identifier(name)}")
    # Losing the race shows up as either error, depending on when the other CREATE commits.
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass
    finally:
        await admin.close()


def database_name(dsn: str) -> str | None:
    """The database a URL-style DSN names, or None when it names none."""
    path = unquote(urlsplit(dsn).path).lstrip("/")
    return path or None


def maintenance_dsn(dsn: str) -> str:
    """The same server, user and options, on the `postgres` database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/postgres"))


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
