"""What the stores save and return: plain frozen records, no behaviour beyond arithmetic.

Times are always given by the caller (the service's injected clock); a store never reads the
wall clock, so expiry and throttling are testable without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class AccountRecord:
    id: str
    email: str  # as given by the account holder
    email_canonical: str  # unique; the form every lookup uses
    display_name: str
    password_hash: str  # argon2id PHC string; never leaves the service layer
    created_at: datetime
    updated_at: datetime
    version: int


@dataclass(frozen=True, slots=True)
class AccountChanges:
    """Fields to set on an account; `None` means unchanged. `version` and `updated_at` move
    on every successful update."""

    updated_at: datetime
    email: str | None = None
    email_canonical: str | None = None
    display_name: str | None = None
    password_hash: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    account_id: str
    key_id: str  # the signing key the token was issued with, to re-derive it on replay
    created_at: datetime
    expires_at: datetime  # absolute lifetime
    last_seen_at: datetime  # for the idle timeout
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    key: str
    command: str
    fingerprint: str  # keyed hash of (command, payload); see services
    reply: dict[str, Any]  # the reply body to replay, never with a secret in it
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An outbox row to write in the same transaction as the change it describes."""

    event_id: str
    type: str
    body: bytes  # the serialised event, published verbatim (so a republish is identical)
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A committed, not yet published outbox row."""

    seq: int
    event_id: str
    type: str
    body: bytes
    created_at: datetime
    command_seq: int  # shared by the rows one command wrote (one `record_outcome`)


@dataclass(frozen=True, slots=True)
class ThrottleSchedule:
    """Sign-in throttling: `free_failures` free attempts, then a lock that doubles from
    `base_delay_s` up to `max_delay_s`. Counters older than `reset_after_s` start again."""

    free_failures: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 900.0
    reset_after_s: float = 12 * 3600.0

    def lock_seconds(self, failures: int) -> float:
        """How long to lock after `failures` counted attempts (0: no lock)."""
        if failures <= self.free_failures:
            return 0.0
        exponent = min(failures - self.free_failures - 1, 62)
        return float(min(self.base_delay_s * (2**exponent), self.max_delay_s))


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """Result of reserving a sign-in attempt: allowed, or locked for `retry_after_s`."""

    allowed: bool
    failures: int
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    idempotency: int
    outbox: int
    throttle: int
    sessions: int
