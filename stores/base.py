"""The ports, as small Protocols, one per kind of caller; each asks for no more than it uses.

    CommandStore   the service's commands: units of work, the idempotency look-up, account
                   reads and the sign-in throttle (also what OperationRunner and
                   Authenticator take)
    SessionReads   session.verify's read, and its `last_seen` write outside a unit;
                   session.list's page of live sessions
    ServiceStore   both of the above: what IdentityService takes
    OutboxStore    the outbox relay: claim unpublished rows, measure the backlog
    CourierStore   the courier relay: the same for courier rows (stores.codes)
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

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from stores.codes import CodeHousekeeping, CodeReads, CodeUnit, CourierStore
from stores.records import (
    AccountChanges,
    AccountRecord,
    BudgetDecision,
    ErasureCounts,
    HashBudget,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    PurgeCounts,
    SessionPosition,
    SessionRecord,
    ThrottleDecision,
    ThrottleRules,
)


class UnitOfWork(CodeUnit, Protocol):
    """Reads and writes inside one transaction (the code flows' part: stores.codes)."""

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

    async def end_oldest_sessions(
        self,
        account_id: str,
        keep: int,
        ended_at: datetime,
        reason: str,
        *,
        idle_cutoff: datetime,
    ) -> list[SessionRecord]:
        """End the account's sessions that are live at `ended_at` (as `end_session` decides)
        beyond its `keep` newest live ones, in (created_at, id) order; the records ended now,
        oldest first. The caller holds the account's row locked, so two sign-ins cannot both
        count the same sessions and leave more than `keep` + their own."""
        ...

    async def lock_session(self, session_id: str) -> SessionRecord | None:
        """The session, locked against concurrent writers until the unit ends."""
        ...

    async def rotate_refresh_token(
        self, session_id: str, expected_generation: int, now: datetime
    ) -> SessionRecord | None:
        """If the session has not ended and is at `expected_generation`: move it to the next
        generation, set `refreshed_at` to `now` and `last_seen_at` forward to `now`; the
        updated record. None (and nothing changed) otherwise: a compare-and-set, so of two
        rotations from one generation only one succeeds."""
        ...

    async def erase_account(
        self,
        account_id: str,
        *,
        erased_at: datetime,
        email_canonical: str,
        email_tag: bytes,
        erased_reply: dict[str, Any],
    ) -> ErasureCounts:
        """Erase the account and what is kept about it, leaving a tombstone of its id (an
        erased id is never inserted again: `insert_account` raises StoreError):

        - its sessions (ended ones too) and its row are deleted;
        - stored replies about it (`IdempotencyRecord.account_id`) get `erased_reply`
          instead, keeping key and fingerprint, so a replay answers that;
        - its unpublished outbox rows are deleted (nobody has seen them; what they held is
          what must go), its published ones keep event id and type only; a command whose
          rows went keeps what is left of it to publish, in order, and is finished when
          nothing is (a command a relay holds is waited for first);
        - the throttle's rows of its email are deleted: those under `email_tag` (the keyed
          tag the throttle counts the email under) and any legacy row of `email_canonical`.

        Writes this unit made before the call are erased with the rest; records and events
        written after it (the erasure's own) are kept. Every table that holds an account's
        data takes part here."""
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


class CommandStore(CodeReads, Protocol):
    """What a command needs: a unit of work for its change, and the reads made before one
    opens (the idempotency look-up, the account, the sign-in throttle, the code checks)."""

    def unit_of_work(self) -> AbstractAsyncContextManager[UnitOfWork]: ...

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None: ...

    async def get_account(self, account_id: str) -> AccountRecord | None: ...

    async def get_account_by_email(self, email_canonical: str) -> AccountRecord | None: ...

    async def reserve_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime, rules: ThrottleRules
    ) -> ThrottleDecision:
        """Atomically (serialised per email): refuse if the (email, source) counter is locked
        at `now`, or the email's counter is and the source is not known-good for the email;
        otherwise count this attempt as a failure up front on both counters and lock each per
        `rules` (`stores.records.count_attempt`), so that parallel workers cannot race past
        the limits. A refused attempt changes nothing. Emails and sources arrive as keyed
        tags: the store never sees either."""
        ...

    async def refund_password_attempt(self, email_tag: bytes, source_tag: bytes) -> None:
        """Un-count one reserved attempt on both counters (a duplicate delivery's)."""
        ...

    async def settle_password_attempt(
        self, email_tag: bytes, source_tag: bytes, now: datetime
    ) -> None:
        """The password verified: forget the (email, source) counter, un-count the reserved
        attempt on the email's, and remember the source as known-good for the email from
        `now` on."""
        ...

    async def spend_hash_budget(
        self, source_tag: bytes, cost: int, now: datetime, budget: HashBudget
    ) -> BudgetDecision:
        """Atomically take `cost` tokens (hashes) from the source's bucket, refilled per
        `budget` up to `now`; refused, taking nothing, when fewer are left."""
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

    async def list_live_sessions(
        self,
        account_id: str,
        *,
        now: datetime,
        idle_since: datetime,
        after: SessionPosition | None,
        limit: int,
    ) -> list[SessionRecord]:
        """Up to `limit` sessions of the account that are live at `now` (not ended, not
        expired, seen after `idle_since`), ordered by (created_at, id), starting after
        `after`."""
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
        known_sources_before: datetime | None = None,
        budgets_before: datetime | None = None,
    ) -> PurgeCounts:
        """Delete idempotency records created before, published outbox rows older than,
        throttle rows untouched since, sessions that ended or expired before, known-good
        sources last seen before, and source budgets untouched since (a full bucket) the
        given times (None: keep them all)."""
        ...

    async def adopt_legacy_throttle(self, email_tag: Callable[[str], bytes]) -> int:
        """Move the per-email counters of schema 0001 (keyed by the plain email) into the
        email counters keyed by `email_tag`, deleting them; how many moved."""
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


class IdentityStore(
    ServiceStore,
    OutboxStore,
    CourierStore,
    Housekeeping,
    CodeHousekeeping,
    Pingable,
    SecretStore,
    Protocol,
):
    """The whole store: what each implementation is, and what its owner closes."""

    async def close(self, force_after_s: float | None = None) -> None:
        """Release the store's resources; after `force_after_s` seconds, by force (whatever
        still uses them fails)."""
        ...
