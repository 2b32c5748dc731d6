"""The in-memory unit of work: reads see the committed tables plus this unit's own writes;
the writes reach the tables only in `commit()`, so a unit that raises leaves nothing behind.

Constraint checks mirror the PostgreSQL schema: a taken canonical email raises
DuplicateEmailError, a known idempotency key DuplicateKeyError, and a duplicate primary key,
duplicate event id or session of an unknown account a plain StoreError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError
from stores.memory.codes import CodeTables, MemoryCodeUnit, erase_codes
from stores.records import (
    AccountChanges,
    AccountRecord,
    ErasureCounts,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    SessionRecord,
    ThrottleCounter,
)


@dataclass
class OutboxRow:
    event: PendingEvent
    published_at: datetime | None = None
    account_id: str | None = None


@dataclass
class Tables:
    """The committed state of a `MemoryIdentityStore`."""

    accounts: dict[str, AccountRecord] = field(default_factory=dict)
    emails: dict[str, str] = field(default_factory=dict)  # email_canonical -> account id
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    idempotency: dict[str, IdempotencyRecord] = field(default_factory=dict)
    outbox: dict[int, OutboxRow] = field(default_factory=dict)
    event_ids: set[str] = field(default_factory=set)
    # Keyed tags, as in PostgreSQL: (email, source) counters, email counters, known-good
    # sources and their last sign-in, argon2 budgets as (tokens, updated_at).
    pairs: dict[tuple[bytes, bytes], ThrottleCounter] = field(default_factory=dict)
    email_counters: dict[bytes, ThrottleCounter] = field(default_factory=dict)
    known_sources: dict[tuple[bytes, bytes], datetime] = field(default_factory=dict)
    budgets: dict[bytes, tuple[float, datetime]] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    tombstones: dict[str, datetime] = field(default_factory=dict)  # erased account id -> when
    last_seq: int = 0
    last_command_seq: int = 0
    codes: CodeTables = field(default_factory=CodeTables)


def _live(session: SessionRecord, now: datetime, idle_cutoff: datetime) -> bool:
    """As END_SESSION's condition: not ended, not expired at `now`, seen after the cutoff."""
    return (
        session.ended_at is None and session.expires_at > now and session.last_seen_at > idle_cutoff
    )


def as_jsonb(reply: dict[str, Any]) -> dict[str, Any]:
    """The value a jsonb column gives back: what survives a round trip through JSON."""
    try:
        decoded: dict[str, Any] = orjson.loads(orjson.dumps(reply))
    except orjson.JSONEncodeError as exc:
        raise StoreError(f"invalid value: {exc}") from exc
    return decoded


class MemoryUnitOfWork(MemoryCodeUnit):
    """`UnitOfWork` over `Tables`; `MemoryIdentityStore` serialises units with one lock."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables
        self._code_tables = tables.codes
        self._accounts: dict[str, AccountRecord] = {}
        self._new_sessions: dict[str, SessionRecord] = {}
        # Committed sessions this unit changed (a refresh-token rotation), as they are now.
        self._changed_sessions: dict[str, SessionRecord] = {}
        self._session_ends: dict[str, tuple[datetime, str]] = {}
        self._idempotency: dict[str, IdempotencyRecord] = {}
        self._commands: list[list[NewEvent]] = []  # the events of each record_outcome
        # (account id, erased at, erased reply, email tag) of each erase_account, applied
        # first on commit.
        self._erasures: list[tuple[str, datetime, dict[str, Any], bytes]] = []

    async def get_account(
        self, account_id: str, *, for_update: bool = False
    ) -> AccountRecord | None:
        if self._erased(account_id):
            return None
        return self._accounts.get(account_id) or self._tables.accounts.get(account_id)

    def _erased(self, account_id: str) -> bool:
        return account_id in self._tables.tombstones or any(
            erased == account_id for erased, *_ in self._erasures
        )

    async def insert_account(self, account: AccountRecord) -> None:
        if await self.get_account(account.id) is not None or self._erased(account.id):
            raise StoreError("unique constraint accounts_pkey violated")
        self._check_email_free(account.email_canonical, account.id)
        self._accounts[account.id] = account

    async def update_account(
        self, account_id: str, expected_version: int, changes: AccountChanges
    ) -> AccountRecord | None:
        current = await self.get_account(account_id)
        if current is None or current.version != expected_version:
            return None
        given = {
            name: value
            for name in (
                "email",
                "email_canonical",
                "display_name",
                "password_hash",
                "email_verified",
                "status",
                "roles",
            )
            if (value := getattr(changes, name)) is not None
        }
        updated = replace(
            current, **given, updated_at=changes.updated_at, version=current.version + 1
        )
        self._check_email_free(updated.email_canonical, account_id)
        self._accounts[account_id] = updated
        return updated

    def _check_email_free(self, email_canonical: str, account_id: str) -> None:
        owner = next(
            (a.id for a in self._accounts.values() if a.email_canonical == email_canonical),
            None,
        )
        if owner is None:
            committed_owner = self._tables.emails.get(email_canonical)
            # An owner this unit has changed no longer has that email (it did not match above).
            if committed_owner not in self._accounts:
                owner = committed_owner
        if owner is not None and owner != account_id:
            raise DuplicateEmailError("the canonical email is taken")

    async def replace_password_hash(
        self, account_id: str, expected_hash: str, new_hash: str
    ) -> bool:
        current = await self.get_account(account_id)
        if current is None or current.password_hash != expected_hash:
            return False
        self._accounts[account_id] = replace(current, password_hash=new_hash)
        return True

    async def insert_session(self, session: SessionRecord) -> None:
        if session.id in self._new_sessions or session.id in self._tables.sessions:
            raise StoreError("unique constraint sessions_pkey violated")
        if await self.get_account(session.account_id) is None:
            raise StoreError("foreign key sessions_account_id_fkey violated")
        self._new_sessions[session.id] = session

    async def get_session(self, session_id: str) -> SessionRecord | None:
        session = (
            self._new_sessions.get(session_id)
            or self._changed_sessions.get(session_id)
            or self._tables.sessions.get(session_id)
        )
        if session is not None and self._erased(session.account_id):
            return None
        end = self._session_ends.get(session_id)
        if session is None or end is None:
            return session
        return replace(session, ended_at=end[0], end_reason=end[1])

    async def end_session(
        self, session_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> SessionRecord | None:
        session = await self.get_session(session_id)
        if session is None or not _live(session, ended_at, idle_cutoff):
            return None
        self._session_ends[session_id] = (ended_at, reason)
        return replace(session, ended_at=ended_at, end_reason=reason)

    async def end_all_sessions(
        self, account_id: str, ended_at: datetime, reason: str, *, idle_cutoff: datetime
    ) -> list[SessionRecord]:
        candidates = {**self._tables.sessions, **self._new_sessions}.values()
        ended: list[SessionRecord] = []
        for session in sorted(candidates, key=lambda s: (s.created_at, s.id)):
            if session.account_id == account_id:
                record = await self.end_session(
                    session.id, ended_at, reason, idle_cutoff=idle_cutoff
                )
                if record is not None:
                    ended.append(record)
        return ended

    async def end_oldest_sessions(
        self,
        account_id: str,
        keep: int,
        ended_at: datetime,
        reason: str,
        *,
        idle_cutoff: datetime,
    ) -> list[SessionRecord]:
        candidates = {**self._tables.sessions, **self._new_sessions}.values()
        live: list[SessionRecord] = []
        for session in sorted(candidates, key=lambda s: (s.created_at, s.id)):
            current = (
                await self.get_session(session.id) if session.account_id == account_id else None
            )
            if current is not None and _live(current, ended_at, idle_cutoff):
                live.append(current)
        ended: list[SessionRecord] = []
        for session in live[: max(0, len(live) - keep)]:
            record = await self.end_session(session.id, ended_at, reason, idle_cutoff=idle_cutoff)
            if record is not None:
                ended.append(record)
        return ended

    async def lock_session(self, session_id: str) -> SessionRecord | None:
        # Units run one at a time: holding the unit is holding every row.
        return await self.get_session(session_id)

    async def rotate_refresh_token(
        self, session_id: str, expected_generation: int, now: datetime
    ) -> SessionRecord | None:
        session = await self.get_session(session_id)
        if (
            session is None
            or session.ended_at is not None
            or session.refresh_generation != expected_generation
        ):
            return None
        rotated = replace(
            session,
            refresh_generation=expected_generation + 1,
            refreshed_at=now,
            last_seen_at=max(session.last_seen_at, now),
        )
        if session_id in self._new_sessions:
            self._new_sessions[session_id] = rotated
        else:
            self._changed_sessions[session_id] = rotated
        return rotated

    async def erase_account(
        self,
        account_id: str,
        *,
        erased_at: datetime,
        email_canonical: str,
        email_tag: bytes,
        erased_reply: dict[str, Any],
    ) -> ErasureCounts:
        tables = self._tables
        reply = as_jsonb(erased_reply)
        # This unit's own writes so far, erased now; the committed rows on commit.
        self._accounts.pop(account_id, None)
        kept = {sid: s for sid, s in self._new_sessions.items() if s.account_id != account_id}
        sessions_here = len(self._new_sessions) - len(kept)
        self._new_sessions = kept
        # A command of this unit keeps the events about other accounts; one left with none
        # writes no outbox row, and so holds no place among the commands.
        commands = [[e for e in c if e.account_id != account_id] for c in self._commands]
        dropped_here = sum(map(len, self._commands)) - sum(map(len, commands))
        self._commands = [events for events in commands if events]
        replied_here = 0
        for key, record in list(self._idempotency.items()):
            if record.account_id == account_id:
                self._idempotency[key] = replace(record, reply=reply)
                replied_here += 1
        self._erasures.append((account_id, erased_at, reply, email_tag))
        rows = [r for r in tables.outbox.values() if r.account_id == account_id]
        return ErasureCounts(
            sessions=sessions_here
            + sum(s.account_id == account_id for s in tables.sessions.values()),
            replies=replied_here
            + sum(
                r.account_id == account_id and r.key not in self._idempotency
                for r in tables.idempotency.values()
            ),
            events_dropped=dropped_here + sum(r.published_at is None for r in rows),
            events_scrubbed=sum(r.published_at is not None for r in rows),
            throttle=len(_throttle_rows(tables, email_tag)),
        )

    async def record_outcome(
        self, events: Sequence[NewEvent], idempotency: IdempotencyRecord | None
    ) -> None:
        # Checked in PostgreSQL's order (the main statement's INSERT, the record, completes
        # before the events' CTE), and all before anything is written: the one statement there
        # fails as a whole.
        stored = None if idempotency is None else self._checked_record(idempotency)
        new_events = self._checked_events(events)
        if new_events:
            self._commands.append(new_events)
        if stored is not None:
            self._idempotency[stored.key] = stored

    def _checked_record(self, record: IdempotencyRecord) -> IdempotencyRecord:
        """The record as the table would hold it; raises if it cannot be stored."""
        reply = as_jsonb(record.reply)
        if record.key in self._idempotency or record.key in self._tables.idempotency:
            raise DuplicateKeyError("the idempotency key was committed first")
        return replace(record, reply=reply)

    def _checked_events(self, events: Sequence[NewEvent]) -> list[NewEvent]:
        """The events as the outbox would hold them; raises if one cannot be stored."""
        known = self._tables.event_ids.union(e.event_id for c in self._commands for e in c)
        for event in events:
            if event.event_id in known:
                raise StoreError("unique constraint outbox_event_id_key violated")
            known.add(event.event_id)
        return [replace(e, body=bytes(e.body)) for e in events]

    def commit(self) -> None:
        """Apply every write at once (no await: nothing can interleave)."""
        tables = self._tables
        for account_id, erased_at, reply, email_tag in self._erasures:
            _erase(tables, account_id, erased_at, reply, email_tag)
        for account_id in self._accounts:
            if (previous := tables.accounts.get(account_id)) is not None:
                del tables.emails[previous.email_canonical]
        for account in self._accounts.values():
            tables.accounts[account.id] = account
            tables.emails[account.email_canonical] = account.id
        tables.sessions.update(self._new_sessions)
        for session_id, changed in self._changed_sessions.items():
            # Applied over the committed row (a purge may have removed it, or `touch_session`
            # moved `last_seen_at` on meanwhile: never backwards).
            if (current := tables.sessions.get(session_id)) is not None:
                seen = max(current.last_seen_at, changed.last_seen_at)
                tables.sessions[session_id] = replace(changed, last_seen_at=seen)
        for session_id, (ended_at, reason) in self._session_ends.items():
            # A purge may have removed the row meanwhile; the end then has nothing to apply to.
            if (session := tables.sessions.get(session_id)) is not None:
                ended = replace(session, ended_at=ended_at, end_reason=reason)
                tables.sessions[session_id] = ended
        tables.idempotency.update(self._idempotency)
        for events in self._commands:
            tables.last_command_seq += 1
            for event in events:
                tables.last_seq += 1
                pending = PendingEvent(
                    tables.last_seq,
                    event.event_id,
                    event.type,
                    event.body,
                    event.created_at,
                    tables.last_command_seq,
                    event.traceparent,
                    event.tracestate,
                )
                tables.outbox[tables.last_seq] = OutboxRow(pending, account_id=event.account_id)
                tables.event_ids.add(event.event_id)
        self._commit_codes()


def _throttle_rows(tables: Tables, email_tag: bytes) -> list[tuple[str, object]]:
    """(table, key) of every throttle row counting `email_tag`."""
    rows: list[tuple[str, object]] = [
        (name, key)
        for name, table in (("pairs", tables.pairs), ("known_sources", tables.known_sources))
        for key in table
        if key[0] == email_tag
    ]
    if email_tag in tables.email_counters:
        rows.append(("email_counters", email_tag))
    return rows


def _erase(
    tables: Tables, account_id: str, erased_at: datetime, reply: dict[str, Any], email_tag: bytes
) -> None:
    """`erase_account` on the committed tables, one table at a time as PostgreSQL does it. An
    outbox row of a command a relay holds claimed is dropped like any unpublished one (the
    relay already has its body, as in PostgreSQL, where erasure waits for the relay to finish
    with the command). What is left of a command to publish is its unpublished rows, here as
    there, where the erasure settles the command's `outbox_pending` row to match."""
    for session_id in [k for k, s in tables.sessions.items() if s.account_id == account_id]:
        del tables.sessions[session_id]
    erase_codes(tables.codes, account_id)
    if (account := tables.accounts.pop(account_id, None)) is not None:
        tables.emails.pop(account.email_canonical, None)
    tables.tombstones.setdefault(account_id, erased_at)
    for key, record in tables.idempotency.items():
        if record.account_id == account_id:
            tables.idempotency[key] = replace(record, reply=reply)
    for seq, row in list(tables.outbox.items()):
        if row.account_id != account_id:
            continue
        if row.published_at is None:
            del tables.outbox[seq]
            tables.event_ids.discard(row.event.event_id)
        else:
            event = row.event
            body = orjson.dumps({"event_id": event.event_id, "type": event.type, "erased": True})
            row.event = replace(event, body=body)
    for table, row_key in _throttle_rows(tables, email_tag):
        del getattr(tables, table)[row_key]
