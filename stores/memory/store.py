"""`MemoryIdentityStore`: the IdentityStore port in dicts, for fast tests without a database.

It passes the same contract suite as `PostgresIdentityStore` (tests/contract). Units of work
run one at a time under one asyncio.Lock and apply their writes on commit only; the other
operations are single synchronous steps, so each is atomic on the event loop just as each is
one statement in PostgreSQL. A claimed command is skipped by other claims until its batch
ends, as PostgreSQL's claim skips a command whose `outbox_pending` row is locked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from stores.claims import ClaimedBatch
from stores.errors import StoreError, TransientStoreError
from stores.memory.unit import MemoryUnitOfWork, Tables, Throttle, as_jsonb
from stores.records import (
    AccountRecord,
    IdempotencyRecord,
    PendingEvent,
    PurgeCounts,
    SessionRecord,
    ThrottleDecision,
    ThrottleSchedule,
)

K = TypeVar("K")
V = TypeVar("V")


def _delete(table: dict[K, V], doomed: Callable[[V], bool]) -> list[V]:
    """Remove the rows `doomed` picks; the removed rows."""
    keys = [key for key, row in table.items() if doomed(row)]
    return [table.pop(key) for key in keys]


class MemoryIdentityStore:
    def __init__(self) -> None:
        self._tables = Tables()
        self._units = asyncio.Lock()
        self._claimed: set[int] = set()  # command_seq of the commands batches hold
        self._closed = False

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[MemoryUnitOfWork]:
        async with self._units:
            unit = MemoryUnitOfWork(self._tables)
            yield unit
            unit.commit()

    async def get_account(self, account_id: str) -> AccountRecord | None:
        return self._tables.accounts.get(account_id)

    async def get_account_by_email(self, email_canonical: str) -> AccountRecord | None:
        account_id = self._tables.emails.get(email_canonical)
        return None if account_id is None else self._tables.accounts[account_id]

    async def get_session_with_account(
        self, session_id: str
    ) -> tuple[SessionRecord, AccountRecord] | None:
        session = self._tables.sessions.get(session_id)
        if session is None:
            return None
        return session, self._tables.accounts[session.account_id]

    async def touch_session(self, session_id: str, seen_at: datetime) -> None:
        session = self._tables.sessions.get(session_id)
        if session is not None and session.last_seen_at < seen_at:
            self._tables.sessions[session_id] = replace(session, last_seen_at=seen_at)

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        record = self._tables.idempotency.get(key)
        # A fresh dict per read, as decoding a jsonb column gives.
        return None if record is None else replace(record, reply=as_jsonb(record.reply))

    async def reserve_signin_attempt(
        self, email_canonical: str, now: datetime, schedule: ThrottleSchedule
    ) -> ThrottleDecision:
        row = self._tables.throttle.get(email_canonical)
        if row is not None and row.locked_until is not None and row.locked_until > now:
            retry_after = (row.locked_until - now).total_seconds()
            return ThrottleDecision(allowed=False, failures=row.failures, retry_after_s=retry_after)
        stale_before = now - timedelta(seconds=schedule.reset_after_s)
        failures = 1 if row is None or row.updated_at < stale_before else row.failures + 1
        locked_until = None
        if failures > schedule.free_failures:
            locked_until = now + timedelta(seconds=schedule.lock_seconds(failures))
        self._tables.throttle[email_canonical] = Throttle(failures, locked_until, now)
        return ThrottleDecision(allowed=True, failures=failures)

    async def refund_signin_attempt(self, email_canonical: str) -> None:
        row = self._tables.throttle.get(email_canonical)
        if row is not None:
            row.failures = max(row.failures - 1, 0)

    @asynccontextmanager
    async def claim_events(
        self, limit: int, per_command: int | None = None
    ) -> AsyncIterator[ClaimedBatch]:
        if limit < 0:
            raise StoreError("LIMIT must not be negative")
        outbox = self._tables.outbox
        pending: dict[int, list[PendingEvent]] = {}
        for seq in sorted(seq for seq, row in outbox.items() if row.published_at is None):
            event = outbox[seq].event
            pending.setdefault(event.command_seq, []).append(event)
        held = sorted(command for command in pending if command not in self._claimed)[:limit]
        self._claimed.update(held)
        try:
            batch = ClaimedBatch(
                {command: pending[command][:per_command] for command in held},
                [c for c in held if per_command is not None and len(pending[c]) > per_command],
            )
            yield batch
            published_at = datetime.now(UTC)
            for seq in batch.outcome().published:
                outbox[seq].published_at = published_at
        finally:
            self._claimed.difference_update(held)

    async def outbox_backlog(self, now: datetime) -> tuple[int, float]:
        pending = [r.event for r in self._tables.outbox.values() if r.published_at is None]
        if not pending:
            return 0, 0.0
        oldest = min(event.created_at for event in pending)
        return len(pending), max(0.0, (now - oldest).total_seconds())

    async def purge(
        self,
        *,
        idempotency_before: datetime,
        outbox_before: datetime,
        throttle_before: datetime,
        sessions_before: datetime,
    ) -> PurgeCounts:
        tables = self._tables
        idempotency = _delete(tables.idempotency, lambda r: r.created_at < idempotency_before)
        outbox = _delete(
            tables.outbox,
            lambda r: r.published_at is not None and r.event.created_at < outbox_before,
        )
        tables.event_ids.difference_update(row.event.event_id for row in outbox)
        throttle = _delete(tables.throttle, lambda r: r.updated_at < throttle_before)
        sessions = _delete(
            tables.sessions,
            lambda s: (
                s.expires_at < sessions_before
                or (s.ended_at is not None and s.ended_at < sessions_before)
            ),
        )
        return PurgeCounts(
            idempotency=len(idempotency),
            outbox=len(outbox),
            throttle=len(throttle),
            sessions=len(sessions),
        )

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        return self._tables.secrets.setdefault(name, bytes(candidate))

    async def ping(self) -> None:
        if self._closed:
            raise TransientStoreError("the store is closed")

    async def close(self, force_after_s: float | None = None) -> None:
        self._closed = True
