"""The code flows and the courier outbox in memory: mixins of `MemoryUnitOfWork` and
`MemoryIdentityStore`, held to the same contract as PostgreSQL (tests/contract).

A unit's code writes are kept in order and applied on commit; the store's own operations
are each one synchronous step, so each is atomic on the event loop as a statement is in
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from stores.codes import (
    PURPOSES,
    CodeIssue,
    CodePurgeCounts,
    Limit,
    NewCode,
    NewMail,
    PendingMail,
)
from stores.errors import StoreError
from stores.records import AccountRecord, IdempotencyRecord, NewEvent


@dataclass(frozen=True, slots=True)
class CodeRow:
    mac: bytes
    created_at: datetime
    expires_at: datetime
    attempts: int = 0
    used_at: datetime | None = None

    def live(self, now: datetime, max_attempts: int) -> bool:
        return self.used_at is None and self.expires_at > now and self.attempts < max_attempts


@dataclass
class MailRow:
    mail: PendingMail
    relayed_at: datetime | None = None


@dataclass
class CodeTables:
    """The committed code, courier and code-throttle rows of a `MemoryIdentityStore`."""

    codes: dict[tuple[str, str], CodeRow] = field(default_factory=dict)
    mail: dict[int, MailRow] = field(default_factory=dict)
    message_ids: set[str] = field(default_factory=set)
    throttle: dict[bytes, tuple[datetime, int]] = field(default_factory=dict)
    last_seq: int = 0

    def append_mail(self, mails: Sequence[NewMail]) -> None:
        for mail in mails:
            if mail.message_id in self.message_ids:
                raise StoreError("unique constraint courier_outbox_message_id_key violated")
        for mail in mails:
            self.last_seq += 1
            self.mail[self.last_seq] = MailRow(PendingMail(self.last_seq, *_mail_values(mail)))
            self.message_ids.add(mail.message_id)


def erase_codes(tables: CodeTables, account_id: str) -> None:
    """Erasure: the account's codes and courier rows (relayed or not) go."""
    for purpose in PURPOSES:
        tables.codes.pop((account_id, purpose), None)
    for seq, row in list(tables.mail.items()):
        if row.mail.account_id == account_id:
            del tables.mail[seq]
            tables.message_ids.discard(row.mail.message_id)


def _mail_values(mail: NewMail) -> tuple[Any, ...]:
    return (
        mail.message_id,
        mail.kind,
        mail.recipient,
        mail.account_id,
        mail.display_name,
        mail.sealed_code,
        mail.expires_at,
        mail.created_at,
        mail.traceparent,
        mail.tracestate,
    )


def _put(codes: dict[tuple[str, str], CodeRow], code: NewCode) -> None:
    codes[code.account_id, code.purpose] = CodeRow(code.mac, code.created_at, code.expires_at)


class MemoryCodeUnit:
    """`stores.codes.CodeUnit` for `MemoryUnitOfWork`: writes kept in order until commit."""

    _code_tables: CodeTables

    def _code_ops(self) -> list[tuple[str, Any]]:
        ops: list[tuple[str, Any]] | None = getattr(self, "_pending_code_ops", None)
        if ops is None:
            ops = []
            self._pending_code_ops = ops
        return ops

    def _code_view(self, key: tuple[str, str]) -> CodeRow | None:
        """The code of `key` as this unit sees it: committed, plus its own writes."""
        codes = {key: row} if (row := self._code_tables.codes.get(key)) else {}
        _apply(codes, self._code_ops(), mail=None)
        return codes.get(key)

    async def put_code(self, code: NewCode) -> None:
        self._code_ops().append(("put", code))

    async def drop_codes(self, account_id: str) -> None:
        self._code_ops().append(("drop", account_id))

    async def use_code(
        self, account_id: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> bool:
        row = self._code_view((account_id, purpose))
        if row is None or row.mac != mac or not row.live(now, max_attempts):
            return False
        self._code_ops().append(("use", ((account_id, purpose), now)))
        return True

    async def add_mail(self, mails: Sequence[NewMail]) -> None:
        self._code_ops().append(("mail", tuple(mails)))

    def _commit_codes(self) -> None:
        tables = self._code_tables
        _apply(tables.codes, self._code_ops(), mail=tables)


def _apply(
    codes: dict[tuple[str, str], CodeRow], ops: list[tuple[str, Any]], mail: CodeTables | None
) -> None:
    for op, arg in ops:
        if op == "put":
            _put(codes, arg)
        elif op == "drop":
            for purpose in PURPOSES:
                codes.pop((arg, purpose), None)
        elif op == "use":
            key, now = arg
            if (row := codes.get(key)) is not None:
                codes[key] = replace(row, used_at=now)
        elif op == "mail" and mail is not None:
            mail.append_mail(arg)


class MemoryMailBatch:
    def __init__(self, mails: Sequence[PendingMail]) -> None:
        self._mails = tuple(mails)
        self.marked: set[int] = set()

    @property
    def mails(self) -> Sequence[PendingMail]:
        return self._mails

    def mark_relayed(self, seqs: Sequence[int]) -> None:
        self.marked.update(seqs)


class MemoryCodeStore:
    """`CodeReads`, `CourierStore` and `CodeHousekeeping` for `MemoryIdentityStore`."""

    _code_tables: CodeTables
    _mail_claimed: set[int]

    def unit_of_work(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError  # MemoryIdentityStore's

    def _account_by_email(self, email_canonical: str) -> AccountRecord | None:
        raise NotImplementedError  # MemoryIdentityStore's

    def _hit(self, limits: Sequence[Limit], now: datetime, window: timedelta) -> float:
        throttle = self._code_tables.throttle
        waits = [0.0]
        for limit in limits:
            started, hits = throttle.get(limit.tag, (now, 0))
            if started <= now - window:
                started, hits = now, 0
            throttle[limit.tag] = (started, hits + 1)
            if hits + 1 > limit.limit:
                waits.append((started + window - now).total_seconds())
        return max(waits)

    async def hit_limits(self, limits: Sequence[Limit], now: datetime, window: timedelta) -> float:
        return self._hit(limits, now, window)

    async def issue_code(self, issue: CodeIssue, idempotency: IdempotencyRecord | None) -> bool:
        async with self.unit_of_work() as uow:
            tables = self._code_tables
            counted_before = dict(tables.throttle)
            within = self._hit(issue.limits, issue.created_at, issue.window) == 0
            account = self._account_by_email(issue.email_canonical) if within else None
            if account is not None and (
                account.status != "active" or (issue.unverified_only and account.email_verified)
            ):
                account = None
            events = []
            if account is not None and issue.event is not None:
                events.append(_with_account(issue.event, account.id, issue))
            try:
                await uow.record_outcome(events, idempotency)
            except StoreError:
                tables.throttle = counted_before  # the one statement fails as a whole
                raise
            if account is None:
                return False
            code = NewCode(account.id, issue.purpose, issue.mac, issue.created_at, issue.expires_at)
            await uow.put_code(code)
            await uow.add_mail([_mail_of(issue, account)])
            return True

    async def attempt_code(
        self, email_canonical: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> AccountRecord | None:
        account = self._account_by_email(email_canonical)
        if account is None or account.status != "active":
            return None
        key = (account.id, purpose)
        row = self._code_tables.codes.get(key)
        if row is None or not row.live(now, max_attempts):
            return None
        if row.mac == mac:
            return account
        self._code_tables.codes[key] = replace(row, attempts=row.attempts + 1)
        return None

    @asynccontextmanager
    async def claim_mail(self, limit: int) -> AsyncIterator[MemoryMailBatch]:
        if limit < 0:
            raise StoreError("LIMIT must not be negative")
        tables = self._code_tables
        seqs = sorted(
            seq
            for seq, row in tables.mail.items()
            if row.relayed_at is None and seq not in self._mail_claimed
        )[:limit]
        self._mail_claimed.update(seqs)
        try:
            batch = MemoryMailBatch([tables.mail[seq].mail for seq in seqs])
            yield batch
            relayed_at = datetime.now(UTC)
            for seq in batch.marked.intersection(seqs):
                row = tables.mail[seq]
                if row.relayed_at is None:
                    row.relayed_at = relayed_at
                    row.mail = replace(row.mail, sealed_code=None)
        finally:
            self._mail_claimed.difference_update(seqs)

    async def mail_backlog(self, now: datetime) -> tuple[int, float]:
        pending = [r.mail for r in self._code_tables.mail.values() if r.relayed_at is None]
        if not pending:
            return 0, 0.0
        oldest = min(mail.created_at for mail in pending)
        return len(pending), max(0.0, (now - oldest).total_seconds())

    async def purge_codes(
        self, *, codes_before: datetime, mail_before: datetime, throttle_before: datetime
    ) -> CodePurgeCounts:
        tables = self._code_tables
        codes = [
            key
            for key, row in tables.codes.items()
            if row.expires_at < codes_before
            or (row.used_at is not None and row.used_at < codes_before)
        ]
        for key in codes:
            del tables.codes[key]
        mail = [
            seq
            for seq, row in tables.mail.items()
            if row.relayed_at is not None and row.mail.created_at < mail_before
        ]
        for seq in mail:
            tables.message_ids.discard(tables.mail.pop(seq).mail.message_id)
        throttle = [
            tag for tag, (started, _) in tables.throttle.items() if started < throttle_before
        ]
        for tag in throttle:
            del tables.throttle[tag]
        return CodePurgeCounts(codes=len(codes), mail=len(mail), throttle=len(throttle))


def _with_account(event: NewEvent, account_id: str, issue: CodeIssue) -> NewEvent:
    body = orjson.loads(event.body)
    body["data"]["account_id"] = account_id
    return replace(
        event,
        body=orjson.dumps(body),
        account_id=account_id,
        traceparent=issue.traceparent,
        tracestate=issue.tracestate,
    )


def _mail_of(issue: CodeIssue, account: AccountRecord) -> NewMail:
    return NewMail(
        message_id=issue.message_id,
        kind=issue.kind,
        recipient=account.email,
        account_id=account.id,
        display_name=account.display_name,
        sealed_code=issue.sealed_code,
        expires_at=issue.expires_at,
        created_at=issue.created_at,
        traceparent=issue.traceparent,
        tracestate=issue.tracestate,
    )
