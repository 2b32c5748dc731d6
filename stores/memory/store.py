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
from datetime import UTC, datetime
from typing import TypeVar

from stores.claims import ClaimedBatch
from stores.errors import StoreError, TransientStoreError
from stores.memory.codes import MemoryCodeStore
from stores.memory.unit import MemoryUnitOfWork, Tables, as_jsonb
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

K = TypeVar("K")
V = TypeVar("V")


def _one_less(row: ThrottleCounter) -> ThrottleCounter:
    return replace(row, failures=max(row.failures - 1, 0))


def _delete(table: dict[K, V], doomed: Callable[[V], bool]) -> list[V]:
    """Remove the rows `doomed` picks; the removed rows."""
    keys = [key for key, row in table.items() if doomed(row)]
    return [table.pop(key) for key in keys]


class MemoryIdentityStore(MemoryCodeStore):
    def __init__(self) -> None:
        self._tables = Tables()
        self._code_tables = self._tables.codes
        self._mail_claimed: set[int] = set()
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
        return self._account_by_email(email_canonical)

    def _account_by_email(self, email_canonical: str) -> AccountRecord | None:
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

    async def list_live_sessions(
        self,
        account_id: str,
        *,
        now: datetime,
        idle_since: datetime,
        after: SessionPosition | None,
        limit: int,
    ) -> list[SessionRecord]:
        live = sorted(
            (
                s
                for s in self._tables.sessions.values()
                if s.account_id == account_id
                and s.ended_at is None
                and s.expires_at > now
                and s.last_seen_at > idle_since
                and (after is None or (s.created_at, s.id) > after)
            ),
            key=lambda s: (s.created_at, s.id),
        )
        return live[:limit]

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        record = self._tables.idempotency.get(key)
        # A fresh dict per read, as decoding a jsonb column gives.
        return None if record is None else replace(record, reply=as_jsonb(record.reply))

    async def reserve_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime, rules: ThrottleRules
    ) -> ThrottleDecision:
        tables = self._tables
        seen = tables.known_sources.get((email_tag, source_tag))
        known = seen is not None and (now - seen).total_seconds() <= rules.known_source_s
        decision, email, pair = count_attempt(
            tables.email_counters.get(email_tag),
            tables.pairs.get((email_tag, source_tag)),
            known,
            now,
            rules,
        )
        if email is not None and pair is not None:
            tables.email_counters[email_tag] = email
            tables.pairs[email_tag, source_tag] = pair
        return decision

    async def refund_password_attempt(self, email_tag: bytes, source_tag: bytes) -> None:
        tables = self._tables
        if (email := tables.email_counters.get(email_tag)) is not None:
            tables.email_counters[email_tag] = _one_less(email)
        if (pair := tables.pairs.get((email_tag, source_tag))) is not None:
            tables.pairs[email_tag, source_tag] = _one_less(pair)

    async def settle_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime
    ) -> None:
        tables = self._tables
        if (email := tables.email_counters.get(email_tag)) is not None:
            tables.email_counters[email_tag] = _one_less(email)
        tables.pairs.pop((email_tag, source_tag), None)
        seen = tables.known_sources.get((email_tag, source_tag))
        tables.known_sources[email_tag, source_tag] = now if seen is None else max(seen, now)

    async def spend_hash_budget(
        self, source_tag: bytes, cost: int, now: datetime, budget: HashBudget
    ) -> BudgetDecision:
        row = self._tables.budgets.get(source_tag)
        tokens, updated_at = (float(budget.burst), now) if row is None else row
        available = budget.available(tokens, updated_at, now)
        if available < cost:
            return BudgetDecision(False, (cost - available) / budget.rate_per_s)
        self._tables.budgets[source_tag] = (available - cost, max(updated_at, now))
        return BudgetDecision(True)

    async def adopt_legacy_throttle(self, email_tag: Callable[[str], bytes]) -> int:
        return 0  # this store never had the plain-email counters of schema 0001

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
                # An erasure may have dropped the row meanwhile: nothing left to mark.
                if (row := outbox.get(seq)) is not None:
                    row.published_at = published_at
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
        known_sources_before: datetime | None = None,
        budgets_before: datetime | None = None,
    ) -> PurgeCounts:
        tables = self._tables
        idempotency = _delete(tables.idempotency, lambda r: r.created_at < idempotency_before)
        outbox = _delete(
            tables.outbox,
            lambda r: r.published_at is not None and r.event.created_at < outbox_before,
        )
        tables.event_ids.difference_update(row.event.event_id for row in outbox)
        throttle = _delete(tables.pairs, lambda r: r.updated_at < throttle_before)
        throttle += _delete(tables.email_counters, lambda r: r.updated_at < throttle_before)
        known = []
        if known_sources_before is not None:
            known = _delete(tables.known_sources, lambda seen: seen < known_sources_before)
        budgets = []
        if budgets_before is not None:
            budgets = _delete(tables.budgets, lambda row: row[1] < budgets_before)
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
            known_sources=len(known),
            budgets=len(budgets),
        )

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        return self._tables.secrets.setdefault(name, bytes(candidate))

    async def ping(self) -> None:
        if self._closed:
            raise TransientStoreError("the store is closed")

    async def close(self, force_after_s: float | None = None) -> None:
        self._closed = True
