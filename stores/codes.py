"""One-time codes, their throttle and the courier outbox: the records the stores save, and the
ports that the code flows, the courier relay and housekeeping use.

A code is stored only as `mac`, a keyed hash the service computes with a key the database
never holds; the store compares macs and counts attempts, and never sees a code. A courier
row holds the code *sealed* (encrypted by the service) until the relay has handed it to the
broker, and then not at all.

Throttle counters are keyed by `tag`, a keyed hash of what is counted (an email, a source):
no address or client IP is stored for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from stores.records import AccountRecord, IdempotencyRecord, NewEvent

RECOVERY = "recovery"
VERIFICATION = "verification"
PURPOSES = (RECOVERY, VERIFICATION)


@dataclass(frozen=True, slots=True)
class NewCode:
    """The live code of (account, purpose); storing it replaces the one before."""

    account_id: str
    purpose: str
    mac: bytes
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewMail:
    """A courier outbox row, written in the transaction of the change it reports."""

    message_id: str
    kind: str
    recipient: str
    account_id: str
    display_name: str
    sealed_code: bytes | None
    expires_at: datetime | None
    created_at: datetime
    # W3C trace context of the command that wrote the row (validated at the edge), published
    # as the message's `traceparent` / `tracestate` headers whenever the row is relayed.
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class PendingMail:
    """A committed courier row not relayed yet."""

    seq: int
    message_id: str
    kind: str
    recipient: str
    account_id: str
    display_name: str
    sealed_code: bytes | None
    expires_at: datetime | None
    created_at: datetime
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `limit` hits on `tag` per throttle window."""

    tag: bytes
    limit: int


@dataclass(frozen=True, slots=True)
class CodeIssue:
    """Issue a code to the active account whose canonical email is `email_canonical`, unless
    a limit is exceeded (every limit is counted either way) or, with `unverified_only`, the
    address is verified already. Then the code is stored, a courier row written (recipient,
    account and display name taken from the account) and `event` appended to the outbox with
    its `data.account_id` set to the account's id. Whether or not anything is issued, the
    same work is done and `idempotency` is stored."""

    email_canonical: str
    purpose: str
    mac: bytes
    created_at: datetime
    expires_at: datetime
    limits: tuple[Limit, ...]
    window: timedelta
    unverified_only: bool
    message_id: str
    kind: str
    sealed_code: bytes
    event: NewEvent | None
    # The trace context of the courier row and of the event (the command's, for both).
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class CodePurgeCounts:
    codes: int
    mail: int
    throttle: int


class CodeUnit(Protocol):
    """What a unit of work offers the code flows (part of `stores.UnitOfWork`)."""

    async def put_code(self, code: NewCode) -> None:
        """Store `code` as the live one of its (account, purpose), replacing any other."""
        ...

    async def drop_codes(self, account_id: str) -> None:
        """Void every code of the account (its address changed)."""
        ...

    async def use_code(
        self, account_id: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> bool:
        """Use the code up if it is live (not used, not expired at `now`, fewer than
        `max_attempts` wrong attempts) and its mac is `mac`; whether it was. Of two units
        using one code, exactly one gets True."""
        ...

    async def add_mail(self, mails: Sequence[NewMail]) -> None:
        """Append courier rows, visible to the relay once the unit commits."""
        ...


class CodeReads(Protocol):
    """The code flows' statements outside a unit of work (part of `stores.CommandStore`)."""

    async def issue_code(self, issue: CodeIssue, idempotency: IdempotencyRecord | None) -> bool:
        """Everything `CodeIssue` says, as one atomic write of the same shape whatever the
        outcome; whether a code was issued. Raises DuplicateKeyError (and writes nothing) if
        the idempotency key was committed by someone else."""
        ...

    async def attempt_code(
        self, email_canonical: str, purpose: str, mac: bytes, now: datetime, max_attempts: int
    ) -> AccountRecord | None:
        """Check `mac` against the live code of the active account of `email_canonical`, and
        count a wrong one in the same statement (a code with `max_attempts` wrong ones is
        void). The account when the code matched, else None. Does not use the code up."""
        ...

    async def hit_limits(self, limits: Sequence[Limit], now: datetime, window: timedelta) -> float:
        """Count one hit on every tag (fixed windows of `window`); 0 when every count is
        within its limit, else the seconds until the window of the first exceeded one ends."""
        ...


class MailBatch(Protocol):
    """Courier rows claimed by one relay (others skip them) until the batch ends."""

    @property
    def mails(self) -> Sequence[PendingMail]: ...

    def mark_relayed(self, seqs: Sequence[int]) -> None:
        """Rows the broker confirmed (or that need no publish): when the batch ends they are
        marked relayed and their sealed code is wiped."""
        ...


class CourierStore(Protocol):
    """The courier relay's side of the courier outbox."""

    def claim_mail(self, limit: int) -> AbstractAsyncContextManager[MailBatch]: ...

    async def mail_backlog(self, now: datetime) -> tuple[int, float]:
        """(rows not relayed, age in seconds of the oldest one or 0)."""
        ...


class CodeHousekeeping(Protocol):
    async def purge_codes(
        self, *, codes_before: datetime, mail_before: datetime, throttle_before: datetime
    ) -> CodePurgeCounts:
        """Delete codes that expired before, relayed courier rows created before, and code
        throttle counters whose window started before the given times."""
        ...
