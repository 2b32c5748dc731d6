"""`PostgresIdentityStore`: the IdentityStore port on an asyncpg pool.

A unit of work is one pooled connection and one transaction (see `stores.postgres.unit` for
why READ COMMITTED suffices). Driver exceptions are translated in `stores.postgres.edge`;
every operation reports its latency to the optional `observe(operation, seconds)` hook.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from stores.claims import ClaimedBatch
from stores.errors import StoreError
from stores.postgres import sql
from stores.postgres.batching import KeyedBatcher
from stores.postgres.codes import PostgresCodeStore
from stores.postgres.edge import Instrument, Observe, TransactionSpan
from stores.postgres.unit import PostgresUnitOfWork, account_from
from stores.records import (
    AccountRecord,
    BudgetDecision,
    HashBudget,
    IdempotencyRecord,
    PendingEvent,
    PurgeCounts,
    SessionPosition,
    SessionRecord,
    ThrottleCounter,
    ThrottleDecision,
    ThrottleRules,
    count_attempt,
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RolePowers:
    """What the store's database role may do beyond rows."""

    superuser: bool
    owns_tables: bool  # owns (or is a member of the owner of) the schema's tables: DDL on them
    creates: bool  # may create objects in the schema


_ROLE_POWERS = """
SELECT r.rolsuper,
       EXISTS (
           SELECT 1 FROM pg_class c
           WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
             AND pg_has_role(current_user, c.relowner, 'MEMBER')
       ),
       has_schema_privilege(current_user, current_schema(), 'CREATE')
FROM pg_roles r WHERE r.rolname = current_user
"""

# Legacy throttle rows re-keyed per transaction.
_ADOPT_BATCH = 1000


# Every statement of the store is a short look-up or write by key. PostgreSQL compiles a plan
# whose estimated cost passes `jit_above_cost` to machine code first, which costs hundreds of
# milliseconds: an estimate made on stale statistics (an outbox that grew since the last
# ANALYZE, or a generic plan of the outbox claim) would make a 1 ms statement take 0.5 s.
SERVER_SETTINGS = {"jit": "off"}


async def keep_session(conn: Any) -> None:
    """The pool's `reset`: skip asyncpg's reset query on release.

    By default every release costs a round trip (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`). The store leaves no session state behind: no LISTEN, no cursors
    outside a transaction, no SET, no advisory locks (the migrator's lock is on a connection
    of its own). asyncpg still rolls back a transaction left open before calling this."""


async def configure_connection(conn: Any) -> None:
    """Per-connection setup (pass as the pool's `init`): jsonb as dicts, through orjson."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
    )


def _caused_by_a_key(exc: Exception) -> bool:
    """Whether a failed batch is worth asking again key by key: only when a value was refused
    (SQLSTATE class 22 from the server, or a value asyncpg could not encode). A lost
    database, a cancelled query or a bug is not the fault of any one key."""
    cause = exc.__cause__
    return isinstance(cause, asyncpg.DataError) or (
        isinstance(cause, asyncpg.InterfaceError) and isinstance(cause, ValueError)
    )


class PostgresIdentityStore(PostgresCodeStore):
    """The store on `pool`, which must run `configure_connection` on every connection
    (`connect()` builds such a pool)."""

    def __init__(self, pool: Any, *, observe: Observe | None = None) -> None:
        self._pool = pool
        self._timed = Instrument(observe, on_read_only=self._expire_connections_soon)
        self._expiring: set[asyncio.Task[None]] = set()
        # The read-only look-ups that cheap commands make by the hundred a second go in
        # batches; everything inside a unit of work stays one statement at a time. Each
        # look-up is timed as its caller waits for it ("get_account"), each batch's query
        # on its own ("batch.get_account").
        self._accounts = KeyedBatcher(self._fetch_accounts, isolate=_caused_by_a_key)
        self._sessions = KeyedBatcher(self._fetch_sessions, isolate=_caused_by_a_key)
        self._idempotency = KeyedBatcher(self._fetch_idempotency, isolate=_caused_by_a_key)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 10,
        observe: Observe | None = None,
    ) -> PostgresIdentityStore:
        with Instrument(observe)("connect"):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                init=configure_connection,
                reset=keep_session,
                server_settings=SERVER_SETTINGS,
            )
        return cls(pool, observe=observe)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """A connection in a transaction: committed when the block exits normally, rolled
        back when it raises (the block's own exception is what propagates). One database span
        for the whole of it, when spans are recorded."""
        with TransactionSpan():
            with self._timed("acquire"):
                conn = await self._pool.acquire()
            try:
                transaction = conn.transaction()
                with self._timed("begin"):
                    await transaction.start()
                try:
                    yield conn
                except BaseException as exc:
                    await self._roll_back(conn, transaction)
                    await self._after_failover(exc)
                    raise
                with self._timed("commit"):
                    await transaction.commit()
            finally:
                await self._release(conn)

    async def _after_failover(self, exc: BaseException) -> None:
        """A write refused as read-only means the pool's connections reach a server that is
        no longer the primary (after a failover with the old primary still up, or a primary
        demoted in place): every connection is replaced on its next acquire, so the retry
        connects afresh and the URL (`target_session_attrs=read-write` with several hosts,
        or a name that now points at the new primary) finds the writable server. A
        connection lost to a primary that died is replaced by the pool already."""
        read_only = asyncpg.ReadOnlySQLTransactionError
        if isinstance(exc, read_only) or isinstance(exc.__cause__, read_only):
            _log.warning("the database refused a write as read-only: reconnecting the pool")
            await self._pool.expire_connections()

    def _expire_connections_soon(self) -> None:
        """The same for a statement outside a unit of work (a sign-in's attempt counter, a
        session's touch, a purge): the pool is expired from a task of its own, since the
        statement's error is raised where nothing can be awaited."""
        _log.warning("the database refused a write as read-only: reconnecting the pool")
        task = asyncio.get_running_loop().create_task(self._pool.expire_connections())
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _roll_back(self, conn: Any, transaction: Any) -> None:
        try:
            with self._timed("rollback"):
                await transaction.rollback()
        except StoreError:
            # The connection is broken (lost, or its protocol state corrupted by a server
            # that hung up mid-statement): it must never be handed out again. A closed one
            # has been detached from the pool already, and refuses `terminate()`.
            with suppress(asyncpg.InterfaceError):
                conn.terminate()

    async def _release(self, conn: Any) -> None:
        # The unit's outcome is already decided; a connection that cannot be reset is
        # terminated by the pool, which is all that is left to do.
        try:
            await self._pool.release(conn)
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
        ):
            _log.warning("discarded a database connection that failed to reset", exc_info=True)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[PostgresUnitOfWork]:
        async with self._transaction() as conn:
            yield PostgresUnitOfWork(conn, self._timed)

    async def get_account(self, account_id: str) -> AccountRecord | None:
        with self._timed("get_account"):
            return await self._accounts.get(account_id)

    async def _fetch_accounts(self, ids: list[str]) -> dict[str, AccountRecord]:
        with self._timed("batch.get_account"):
            rows = await self._pool.fetch(sql.GET_ACCOUNTS, ids)
        return {row[0]: AccountRecord(*row) for row in rows}

    async def get_account_by_email(self, email_canonical: str) -> AccountRecord | None:
        with self._timed("get_account_by_email"):
            row = await self._pool.fetchrow(sql.GET_ACCOUNT_BY_EMAIL, email_canonical)
        return account_from(row)

    async def get_session_with_account(
        self, session_id: str
    ) -> tuple[SessionRecord, AccountRecord] | None:
        with self._timed("get_session_with_account"):
            return await self._sessions.get(session_id)

    async def _fetch_sessions(
        self, ids: list[str]
    ) -> dict[str, tuple[SessionRecord, AccountRecord]]:
        with self._timed("batch.get_session_with_account"):
            rows = await self._pool.fetch(sql.GET_SESSIONS_WITH_ACCOUNTS, ids)
        split = sql.SESSION_FIELD_COUNT
        found = {}
        for row in rows:
            values = tuple(row)
            found[values[0]] = (SessionRecord(*values[:split]), AccountRecord(*values[split:]))
        return found

    async def touch_session(self, session_id: str, seen_at: datetime) -> None:
        with self._timed("touch_session"):
            await self._pool.execute(sql.TOUCH_SESSION, session_id, seen_at)

    async def list_live_sessions(
        self,
        account_id: str,
        *,
        now: datetime,
        idle_since: datetime,
        after: SessionPosition | None,
        limit: int,
    ) -> list[SessionRecord]:
        after_created, after_id = after if after is not None else (None, None)
        with self._timed("list_live_sessions"):
            rows = await self._pool.fetch(
                sql.LIST_LIVE_SESSIONS, account_id, now, idle_since, after_created, after_id, limit
            )
        return [SessionRecord(*row) for row in rows]

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        with self._timed("get_idempotency"):
            return await self._idempotency.get(key)

    async def _fetch_idempotency(self, keys: list[str]) -> dict[str, IdempotencyRecord]:
        with self._timed("batch.get_idempotency"):
            rows = await self._pool.fetch(sql.GET_IDEMPOTENCY_RECORDS, keys)
        return {row[0]: IdempotencyRecord(*row) for row in rows}

    async def reserve_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime, rules: ThrottleRules
    ) -> ThrottleDecision:
        known_since = now - timedelta(seconds=rules.known_source_s)
        with self._timed("reserve_password_attempt"):
            async with self._transaction() as conn:
                locked = await conn.fetchrow(sql.LOCK_THROTTLE, email_tag, now)
                email = ThrottleCounter(locked[0], locked[1], locked[2])
                row = await conn.fetchrow(
                    sql.READ_SOURCE_THROTTLE, email_tag, source_tag, known_since
                )
                pair = None if row[0] is None else ThrottleCounter(row[0], row[1], row[2])
                decision, new_email, new_pair = count_attempt(email, pair, row[3], now, rules)
                if new_email is not None and new_pair is not None:
                    await conn.execute(
                        sql.COUNT_ATTEMPT,
                        email_tag,
                        source_tag,
                        new_pair.failures,
                        new_pair.locked_until,
                        now,
                        new_email.failures,
                        new_email.locked_until,
                    )
        return decision

    async def refund_password_attempt(self, email_tag: bytes, source_tag: bytes) -> None:
        with self._timed("refund_password_attempt"):
            async with self._transaction() as conn:
                await conn.execute(sql.UNCOUNT_EMAIL, email_tag)
                await conn.execute(sql.UNCOUNT_PAIR, email_tag, source_tag)

    async def settle_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime
    ) -> None:
        with self._timed("settle_password_attempt"):
            async with self._transaction() as conn:
                await conn.execute(sql.UNCOUNT_EMAIL, email_tag)  # the email's lock first
                await conn.execute(sql.SETTLE_PAIR, email_tag, source_tag, now)

    async def spend_hash_budget(
        self, source_tag: bytes, cost: int, now: datetime, budget: HashBudget
    ) -> BudgetDecision:
        with self._timed("spend_hash_budget"):
            left = await self._pool.fetchval(
                sql.SPEND_BUDGET,
                source_tag,
                float(cost),
                now,
                float(budget.burst),
                budget.rate_per_s,
            )
            if left is not None:
                return BudgetDecision(True)
            row = await self._pool.fetchrow(sql.GET_BUDGET, source_tag)
        # Refused: how long until `cost` tokens are back (the row exists, or it would have
        # been inserted with a full bucket).
        available = 0.0 if row is None else budget.available(row[0], row[1], now)
        return BudgetDecision(False, max(cost - available, 0.0) / budget.rate_per_s)

    async def adopt_legacy_throttle(self, email_tag: Callable[[str], bytes]) -> int:
        moved = 0
        with self._timed("adopt_legacy_throttle"):
            while True:
                async with self._transaction() as conn:
                    rows = await conn.fetch(sql.TAKE_LEGACY_THROTTLE, _ADOPT_BATCH)
                    if not rows:
                        return moved
                    await conn.execute(
                        sql.MERGE_EMAIL_COUNTERS,
                        [email_tag(row[0]) for row in rows],
                        [row[1] for row in rows],
                        [row[2] for row in rows],
                        [row[3] for row in rows],
                    )
                moved += len(rows)

    @asynccontextmanager
    async def claim_events(
        self, limit: int, per_command: int | None = None
    ) -> AsyncIterator[ClaimedBatch]:
        fetch = None if per_command is None else per_command + 1  # one more: is any left?
        async with self._transaction() as conn:
            with self._timed("claim_events"):
                rows = await conn.fetch(sql.CLAIM_EVENTS, limit, fetch)
            commands: dict[int, list[PendingEvent]] = {}
            for command, seq, event_id, type_, body, created_at, parent, state in rows:
                claimed = commands.setdefault(command, [])
                if seq is not None:  # None: a held command with nothing left to publish
                    claimed.append(
                        PendingEvent(seq, event_id, type_, body, created_at, command, parent, state)
                    )
            unfinished = [c for c, events in commands.items() if fetch and len(events) == fetch]
            batch = ClaimedBatch(
                {c: events[:per_command] for c, events in commands.items()}, unfinished
            )
            yield batch
            outcome = batch.outcome()
            if outcome.published or outcome.finished or outcome.moved:
                with self._timed("finish_claim"):
                    await conn.execute(
                        sql.FINISH_CLAIM,
                        outcome.published,
                        outcome.finished,
                        [command for command, _ in outcome.moved],
                        [next_seq for _, next_seq in outcome.moved],
                    )

    async def outbox_backlog(self, now: datetime) -> tuple[int, float]:
        with self._timed("outbox_backlog"):
            row = await self._pool.fetchrow(sql.OUTBOX_BACKLOG)
        count, oldest = row[0], row[1]
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        return int(count), age

    async def purge(
        self,
        *,
        idempotency_before: datetime,
        outbox_before: datetime,
        throttle_before: datetime,
        sessions_before: datetime,
        known_sources_before: datetime | None = None,
        budgets_before: datetime | None = None,
    ) -> PurgeCounts:
        with self._timed("purge"):
            row = await self._pool.fetchrow(
                sql.PURGE,
                idempotency_before,
                outbox_before,
                throttle_before,
                sessions_before,
                known_sources_before,
                budgets_before,
            )
        return PurgeCounts(
            idempotency=row[0],
            outbox=row[1],
            throttle=row[2],
            sessions=row[3],
            known_sources=row[4],
            budgets=row[5],
        )

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        # Two statements, not one: a statement's snapshot predates a row that a concurrent
        # INSERT ... ON CONFLICT DO NOTHING waited for, so only a fresh SELECT can see it.
        with self._timed("shared_secret"):
            stored = await self._pool.fetchval(sql.INSERT_SECRET, name, bytes(candidate))
            if stored is None:
                stored = await self._pool.fetchval(sql.GET_SECRET, name)
        return bytes(stored)

    async def role_powers(self) -> RolePowers:
        """What this store's role may do to the schema (start-up checks least privilege)."""
        with self._timed("role_powers"):
            row = await self._pool.fetchrow(_ROLE_POWERS)
        return RolePowers(superuser=row[0], owns_tables=row[1], creates=row[2])

    async def ping(self) -> None:
        with self._timed("ping"):
            await self._pool.fetchval("SELECT 1")

    async def close(self, force_after_s: float | None = None) -> None:
        with self._timed("close"):
            try:
                # Pool.close waits for every connection to come back.
                await asyncio.wait_for(self._pool.close(), force_after_s)
            except TimeoutError:
                self._pool.terminate()  # held by work that outlived the stop: cut off
