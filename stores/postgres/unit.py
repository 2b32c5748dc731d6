"""The PostgreSQL unit of work: statements on one connection inside one
transaction, opened and closed by `PostgresIdentityStore`.

READ COMMITTED is enough for what the port promises, because every guarantee rests on a row
lock or a unique constraint rather than on a snapshot: `update_account` is a compare-and-set
on `version` in one UPDATE (a concurrent writer waits for the row lock, then re-checks the
version against the committed row); `end_session(s)` re-checks that the session is live
(`ended_at IS NULL`, not expired, not idle) the same way; duplicate emails and idempotency
keys are stopped by unique indexes, which wait for the other transaction and fail if it
commits; callers that read-modify-write take `get_account(for_update=True)`. Nothing needs
SERIALIZABLE's retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from operator import attrgetter
from typing import Any

from stores.postgres import codes_sql, sql
from stores.postgres.codes import PostgresCodeUnit
from stores.postgres.edge import Instrument
from stores.records import (
    AccountChanges,
    AccountRecord,
    ErasureCounts,
    IdempotencyRecord,
    NewEvent,
    SessionRecord,
)

# The idempotency parameters of RECORD_OUTCOME when there is no record to write.
_NO_RECORD = (None,) * len(fields(IdempotencyRecord))
# A written record's fields, in declaration order (the statements' parameter order), as a
# shallow tuple: dataclasses.astuple deep-copies every value, the stored reply included.
_VALUES = {
    cls: attrgetter(*(f.name for f in fields(cls)))
    for cls in (AccountRecord, SessionRecord, IdempotencyRecord)
}


def _values(record: AccountRecord | SessionRecord | IdempotencyRecord) -> tuple[Any, ...]:
    values: tuple[Any, ...] = _VALUES[type(record)](record)
    return values


def _count(status: str) -> int:
    """The row count of a command status such as `DELETE 3` or `UPDATE 0`."""
    return int(status.rsplit(" ", 1)[-1])


def account_from(row: Any) -> AccountRecord | None:
    return None if row is None else AccountRecord(*row)


def session_from(row: Any) -> SessionRecord | None:
    return None if row is None else SessionRecord(*row)


class PostgresUnitOfWork(PostgresCodeUnit):
    """`UnitOfWork` on a connection whose transaction the store opened."""

    __slots__ = ("_conn", "_timed")

    def __init__(self, conn: Any, timed: Instrument) -> None:
        self._conn = conn
        self._timed = timed

    async def get_account(
        self, account_id: str, *, for_update: bool = False
    ) -> AccountRecord | None:
        statement = sql.GET_ACCOUNT_FOR_UPDATE if for_update else sql.GET_ACCOUNT
        with self._timed("uow.get_account"):
            return account_from(await self._conn.fetchrow(statement, account_id))

    async def insert_account(self, account: AccountRecord) -> None:
        with self._timed("uow.insert_account"):
            await self._conn.execute(sql.INSERT_ACCOUNT, *_values(account))

    async def update_account(
        self, account_id: str, expected_version: int, changes: AccountChanges
    ) -> AccountRecord | None:
        with self._timed("uow.update_account"):
            row = await self._conn.fetchrow(
                sql.UPDATE_ACCOUNT,
                account_id,
                expected_version,
                changes.email,
                changes.email_canonical,
                changes.display_name,
                changes.password_hash,
                changes.updated_at,
                changes.email_verified,
                changes.status,
                None if changes.roles is None else list(changes.roles),
            )
        return account_from(row)

    async def replace_password_hash(
        self, account_id: str, expected_hash: str, new_hash: str
    ) -> bool:
        with self._timed("uow.replace_password_hash"):
            status = await self._conn.execute(
                sql.REPLACE_PASSWORD_HASH, account_id, expected_hash, new_hash
            )
        return bool(status == "UPDATE 1")

    async def insert_session(self, session: SessionRecord) -> None:
        with self._timed("uow.insert_session"):
            await self._conn.execute(sql.INSERT_SESSION, *_values(session))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        with self._timed("uow.get_session"):
            return session_from(await self._conn.fetchrow(sql.GET_SESSION, session_id))

    async def end_session(
        self, session_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> SessionRecord | None:
        with self._timed("uow.end_session"):
            row = await self._conn.fetchrow(
                sql.END_SESSION, session_id, ended_at, reason, idle_cutoff
            )
        return session_from(row)

    async def end_all_sessions(
        self, account_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> list[SessionRecord]:
        with self._timed("uow.end_all_sessions"):
            rows = await self._conn.fetch(
                sql.END_ALL_SESSIONS, account_id, ended_at, reason, idle_cutoff
            )
        return [SessionRecord(*row) for row in rows]

    async def end_oldest_sessions(
        self,
        account_id: str,
        keep: int,
        ended_at: datetime,
        reason: str,
        *,
        idle_cutoff: datetime,
    ) -> list[SessionRecord]:
        with self._timed("uow.end_oldest_sessions"):
            rows = await self._conn.fetch(
                sql.END_OLDEST_SESSIONS, account_id, ended_at, reason, idle_cutoff, keep
            )
        return [SessionRecord(*row) for row in rows]

    async def lock_session(self, session_id: str) -> SessionRecord | None:
        with self._timed("uow.lock_session"):
            return session_from(await self._conn.fetchrow(sql.LOCK_SESSION, session_id))

    async def rotate_refresh_token(
        self, session_id: str, expected_generation: int, now: datetime
    ) -> SessionRecord | None:
        with self._timed("uow.rotate_refresh_token"):
            row = await self._conn.fetchrow(
                sql.ROTATE_REFRESH_TOKEN, session_id, expected_generation, now
            )
        return session_from(row)

    async def erase_account(
        self,
        account_id: str,
        *,
        erased_at: datetime,
        email_canonical: str,
        email_tag: bytes,
        erased_reply: dict[str, Any],
    ) -> ErasureCounts:
        with self._timed("uow.erase_account"):
            sessions = _count(await self._conn.execute(sql.ERASE_SESSIONS, account_id))
            await self._conn.execute(sql.ERASE_ACCOUNT, account_id)
            await self._conn.execute(sql.INSERT_TOMBSTONE, account_id, erased_at)
            replies = _count(await self._conn.execute(sql.ERASE_REPLIES, account_id, erased_reply))
            await self._conn.execute(sql.LOCK_COMMANDS_OF_ACCOUNT, account_id)
            commands = await self._conn.fetch(sql.DROP_UNPUBLISHED_EVENTS, account_id)
            dropped = len(commands)
            if dropped:
                settle = sorted({row["command_seq"] for row in commands})
                await self._conn.execute(sql.SETTLE_COMMANDS, settle)
            scrubbed = _count(await self._conn.execute(sql.SCRUB_PUBLISHED_EVENTS, account_id))
            throttle = await self._conn.fetchval(sql.ERASE_THROTTLE, email_tag, email_canonical)
            await self._conn.execute(codes_sql.ERASE_MAIL, account_id)
        return ErasureCounts(
            sessions=sessions,
            replies=replies,
            events_dropped=dropped,
            events_scrubbed=scrubbed,
            throttle=throttle,
        )

    async def record_outcome(
        self, events: Sequence[NewEvent], idempotency: IdempotencyRecord | None
    ) -> None:
        if not events and idempotency is None:
            return
        record = _NO_RECORD if idempotency is None else _values(idempotency)
        with self._timed("uow.record_outcome"):
            await self._conn.execute(
                sql.RECORD_OUTCOME,
                [e.event_id for e in events],
                [e.type for e in events],
                [bytes(e.body) for e in events],
                [e.created_at for e in events],
                *record,
                [e.account_id for e in events],
                [e.traceparent for e in events],
                [e.tracestate for e in events],
            )
