"""The code flows and the courier outbox on PostgreSQL: mixins of `PostgresUnitOfWork` and
`PostgresIdentityStore` (statements in stores.postgres.codes_sql)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from stores.codes import CodeIssue, CodePurgeCounts, Limit, NewCode, NewMail, PendingMail
from stores.postgres import codes_sql as sql
from stores.postgres.edge import Instrument
from stores.records import AccountRecord, IdempotencyRecord

_NO_EVENT = (None, None, None)
_NO_RECORD = (None, None, None, None, None, None)


class PostgresCodeUnit:
    """`stores.codes.CodeUnit` on the unit's connection and transaction."""

    __slots__ = ()
    _conn: Any
    _timed: Instrument

    async def put_code(self, code: NewCode) -> None:
        with self._timed("uow.put_code"):
            await self._conn.execute(
                sql.PUT_CODE,
                code.account_id,
                code.purpose,
                code.mac,
                code.created_at,
                code.expires_at,
            )

    async def drop_codes(self, account_id: str) -> None:
        with self._timed("uow.drop_codes"):
            await self._conn.execute(sql.DROP_CODES, account_id)

    async def use_code(
        self, account_id: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> bool:
        with self._timed("uow.use_code"):
            status = await self._conn.execute(
                sql.USE_CODE, account_id, purpose, mac, now, max_attempts
            )
        return bool(status == "UPDATE 1")

    async def add_mail(self, mails: Sequence[NewMail]) -> None:
        if not mails:
            return
        with self._timed("uow.add_mail"):
            await self._conn.execute(
                sql.ADD_MAIL,
                [m.message_id for m in mails],
                [m.kind for m in mails],
                [m.recipient for m in mails],
                [m.account_id for m in mails],
                [m.display_name for m in mails],
                [m.sealed_code for m in mails],
                [m.expires_at for m in mails],
                [m.created_at for m in mails],
                [m.traceparent for m in mails],
                [m.tracestate for m in mails],
            )


class PostgresMailBatch:
    """`MailBatch` over rows locked by the claiming transaction."""

    __slots__ = ("_mails", "_marked")

    def __init__(self, mails: Sequence[PendingMail]) -> None:
        self._mails = tuple(mails)
        self._marked: set[int] = set()

    @property
    def mails(self) -> Sequence[PendingMail]:
        return self._mails

    def mark_relayed(self, seqs: Sequence[int]) -> None:
        self._marked.update(seqs)

    @property
    def marked(self) -> list[int]:
        return sorted(self._marked.intersection(m.seq for m in self._mails))


class PostgresCodeStore:
    """`CodeReads`, `CourierStore` and `CodeHousekeeping` on the store's pool."""

    __slots__ = ()
    _pool: Any
    _timed: Instrument

    def _transaction(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError  # PostgresIdentityStore's

    async def issue_code(self, issue: CodeIssue, idempotency: IdempotencyRecord | None) -> bool:
        event = issue.event
        event_values = (
            _NO_EVENT if event is None else (event.event_id, event.type, bytes(event.body))
        )
        record = (
            _NO_RECORD
            if idempotency is None
            else (
                idempotency.key,
                idempotency.command,
                idempotency.fingerprint,
                idempotency.reply,
                idempotency.created_at,
                idempotency.account_id,
            )
        )
        with self._timed("issue_code"):
            issued = await self._pool.fetchval(
                sql.ISSUE_CODE,
                issue.email_canonical,
                issue.purpose,
                issue.mac,
                issue.created_at,
                issue.expires_at,
                [limit.tag for limit in issue.limits],
                [limit.limit for limit in issue.limits],
                issue.created_at - issue.window,
                issue.unverified_only,
                issue.message_id,
                issue.kind,
                issue.sealed_code,
                *event_values,
                *record,
                issue.traceparent,
                issue.tracestate,
            )
        return bool(issued)

    async def attempt_code(
        self, email_canonical: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> AccountRecord | None:
        with self._timed("attempt_code"):
            row = await self._pool.fetchrow(
                sql.ATTEMPT_CODE, email_canonical, purpose, mac, now, max_attempts
            )
        if row is None or not row[0]:
            return None
        return AccountRecord(*tuple(row)[1 : 1 + sql.ACCOUNT_FIELD_COUNT])

    async def hit_limits(self, limits: Sequence[Limit], now: datetime, window: timedelta) -> float:
        if not limits:
            return 0.0
        with self._timed("hit_limits"):
            rows = await self._pool.fetch(
                sql.HIT_LIMITS, [limit.tag for limit in limits], now, now - window
            )
        counted = {bytes(row["tag"]): (row["hits"], row["window_start"]) for row in rows}
        waits = [
            (started + window - now).total_seconds()
            for limit in limits
            for hits, started in [counted[limit.tag]]
            if hits > limit.limit
        ]
        return float(max([0.0, *waits]))

    @asynccontextmanager
    async def claim_mail(self, limit: int) -> AsyncIterator[PostgresMailBatch]:
        async with self._transaction() as conn:
            with self._timed("claim_mail"):
                rows = await conn.fetch(sql.CLAIM_MAIL, limit)
            batch = PostgresMailBatch([PendingMail(*row) for row in rows])
            yield batch
            if batch.marked:
                with self._timed("mark_relayed"):
                    await conn.execute(sql.MARK_RELAYED, batch.marked)

    async def mail_backlog(self, now: datetime) -> tuple[int, float]:
        with self._timed("mail_backlog"):
            row = await self._pool.fetchrow(sql.MAIL_BACKLOG)
        count, oldest = row[0], row[1]
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        return int(count), age

    async def purge_codes(
        self, *, codes_before: datetime, mail_before: datetime, throttle_before: datetime
    ) -> CodePurgeCounts:
        with self._timed("purge_codes"):
            row = await self._pool.fetchrow(
                sql.PURGE_CODES, codes_before, mail_before, throttle_before
            )
        return CodePurgeCounts(codes=row[0], mail=row[1], throttle=row[2])
