"""The ports, as small Protocols, one per kind of caller; each asks for no more than it uses.

    CommandStore   the service's commands: units of work, the idempotency look-up, account
                   reads and the sign-in throttle (also what OperationRunner and
                   Authenticator take)
    SessionReads   session.verify's read, and its `last_seen` write outside a unit
    ServiceStore   both of the above: what IdentityService takes
    OutboxStore    the outbox relay: claim unpublished rows, measure the backlog
    Housekeeping   deleting what has expired
    Pingable       readiness: does the database answer
    SecretStore    start-up: a secret every worker process agrees on
    IdentityStore  all of them, and `close`: what the two implementations are and what the
                   composition root owns

Two implementations ship and pass one contract suite (tests/contract): `PostgresIdentityStore`
(asyncpg, stores.postgres) and `MemoryIdentityStore` (for fast unit tests, stores.memory).

A unit of work is one database transaction: the state change, the idempotency record of the
command and the outbox rows of its events commit together or not at all. It commits when the
`async with` block exits normally and rolls back when it raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from stores.records import (
    AccountChanges,
    AccountRecord,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    PurgeCounts,
    SessionRecord,
    ThrottleDecision,
    ThrottleSchedule,
)


class UnitOfWork(Protocol):
    """Reads and writes inside one transaction."""

    async def get_account(
        self, account_id: str, *, for_update: bool = False
    ) -> AccountRecord | None:
        """The account, locked against concurrent writers when `for_update`."""
        ...

    async def insert_account(self, account: AccountRecord) -> None:
        """Raises DuplicateEmailError if the canonical email is taken."""
        ...

    async def update_account(
        self, account_id: str, expected_version: int, changes: AccountChanges
    ) -> AccountRecord | None:
        """Apply `changes` and bump `version` if the account is at `expected_version`;
        None (and nothing changed) otherwise. Raises DuplicateEmailError."""
        ...

    async def replace_password_hash(
        self, account_id: str, expected_hash: str, new_hash: str
    ) -> bool:
        """Swap in a stronger hash of the same password if the account still has
        `expected_hash`; whether it did. Not a change the account holder sees: `version` and
        `updated_at` stay as they are."""
        ...

    async def insert_session(self, session: SessionRecord) -> None: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def end_session(
        self, session_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> SessionRecord | None:
        """End the session if it is live at `ended_at`: not ended, not expired (`expires_at`
        after `ended_at`), and not idled out (seen after `idle_cutoff`). The ended record, or
        None when it was over already (ended, expired or idle: left as it is) or does not
        exist."""
        ...

    async def end_all_sessions(
        self, account_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> list[SessionRecord]:
        """End every session of the account that is live at `ended_at` (as `end_session`
        decides); the records ended now, oldest first."""
        ...

    async def reset_signin_failures(self, email_canonical: str) -> None:
        """A successful sign-in forgets earlier failures."""
        ...

    async def record_outcome(
        self, events: Sequence[NewEvent], idempotency: IdempotencyRecord | None
    ) -> None:
        """Append the outbox rows in the order given (visible to the relay once this unit
        commits) and store the idempotency record (none when None), as one write. Raises
        DuplicateKeyError if the key was committed by someone else; the unit must then roll
        back, which takes the events with it."""
        ...


class EventBatch(Protocol):
    """The outbox rows of whole commands, claimed by one relay (others skip those commands)
    until the batch ends."""

    @property
    def events(self) -> Sequence[PendingEvent]:
        """Command by command, oldest command first; each command's rows in order."""
        ...

    def mark_published(self, seqs: Sequence[int]) -> None:
        """Record which rows were confirmed by the broker; applied when the batch ends. Of
        each command, only the rows before its first unmarked one count: a command's events
        are published in the order they happened, or not at all."""
        ...


class CommandStore(Protocol):
    """What a command needs: a unit of work for its change, and the reads made before one
    opens (the idempotency look-up, the account, the sign-in throttle)."""

    def unit_of_work(self) -> AbstractAsyncContextManager[UnitOfWork]: ...

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None: ...

    async def get_account(self, account_id: str) -> AccountRecord | None: ...

    async def get_account_by_email(self, email_canonical: str) -> AccountRecord | None: ...

    async def reserve_signin_attempt(
        self, email_canonical: str, now: datetime, schedule: ThrottleSchedule
    ) -> ThrottleDecision:
        """Atomically: refuse if the email is locked at `now`; otherwise count this attempt
        as a failure up front (a success resets it) and lock per `schedule`, so that parallel
        workers cannot race past the limit."""
        ...

    async def refund_signin_attempt(self, email_canonical: str) -> None:
        """Un-count a reserved attempt that turned out to be a duplicate delivery."""
        ...


class SessionReads(Protocol):
    """`session.verify`: one read, and a `last_seen` write that needs no unit of work."""

    async def get_session_with_account(
        self, session_id: str
    ) -> tuple[SessionRecord, AccountRecord] | None:
        """One round trip for `session.verify`."""
        ...

    async def touch_session(self, session_id: str, seen_at: datetime) -> None:
        """Move `last_seen_at` forward (never backward)."""
        ...


class ServiceStore(CommandStore, SessionReads, Protocol):
    """Everything `IdentityService` uses."""


class OutboxStore(Protocol):
    """The outbox relay's side of the outbox."""

    def claim_events(
        self, limit: int, per_command: int | None = None
    ) -> AbstractAsyncContextManager[EventBatch]:
        """Claim the unpublished outbox rows of up to `limit` commands (the rows one
        `record_outcome` wrote), oldest command first, skipping commands another relay holds:
        a command is held by one batch at a time, whole. Of each command, its unpublished
        rows in order: all of them, or the first `per_command`; the rest then goes to a later
        claim, which cannot take the command before this batch ends. Rows marked published
        are updated when the block exits normally."""
        ...

    async def outbox_backlog(self, now: datetime) -> tuple[int, float]:
        """(number of unpublished rows, age in seconds of the oldest one or 0)."""
        ...


class Housekeeping(Protocol):
    async def purge(
        self,
        *,
        idempotency_before: datetime,
        outbox_before: datetime,
        throttle_before: datetime,
        sessions_before: datetime,
    ) -> PurgeCounts:
        """Delete idempotency records created before, published outbox rows older than,
        throttle rows untouched since, and sessions that ended or expired before the
        given times."""
        ...


class Pingable(Protocol):
    async def ping(self) -> None:
        """Raise TransientStoreError unless the database answers."""
        ...


class SecretStore(Protocol):
    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        """The secret stored under `name`, storing `candidate` first if there is none: lets
        every worker process agree on a development signing key."""
        ...


class IdentityStore(ServiceStore, OutboxStore, Housekeeping, Pingable, SecretStore, Protocol):
    """The whole store: what each implementation is, and what its owner closes."""

    async def close(self, force_after_s: float | None = None) -> None:
        """Release the store's resources; after `force_after_s` seconds, by force (whatever
        still uses them fails)."""
        ...
