"""What the stores save and return: plain frozen records, no behaviour beyond arithmetic.

Times are always given by the caller (the service's injected clock); a store never reads the
wall clock, so expiry and throttling are testable without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
    # Contract v2. Defaulted so a v1-shaped record still builds.
    email_verified: bool = False
    status: str = "active"  # "active" | "disabled"
    roles: tuple[str, ...] = ()  # sorted, unique

    def __post_init__(self) -> None:
        # A text[] column comes back as a list; keep the record immutable all the way down.
        if not isinstance(self.roles, tuple):
            object.__setattr__(self, "roles", tuple(self.roles))


@dataclass(frozen=True, slots=True)
class AccountChanges:
    """Fields to set on an account; `None` means unchanged. `version` and `updated_at` move
    on every successful update."""

    updated_at: datetime
    email: str | None = None
    email_canonical: str | None = None
    display_name: str | None = None
    password_hash: str | None = None
    email_verified: bool | None = None
    status: str | None = None
    roles: tuple[str, ...] | None = None


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
    # Contract v2: what the caller of `session.start` reported about the client (personal
    # data: erased with the account, purged with the session).
    client_ip: str | None = None
    user_agent: str | None = None
    # Contract v2, refresh tokens: the generation whose refresh token is the live one (a
    # token is derived from it, never stored), and when it last moved.
    refresh_generation: int = 0
    refreshed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    key: str
    command: str
    fingerprint: str  # keyed hash of (command, payload); see services
    reply: dict[str, Any]  # the reply body to replay, never with a secret in it
    created_at: datetime
    # The account the reply is about, if any: how erasure finds the replies to blank out.
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An outbox row to write in the same transaction as the change it describes."""

    event_id: str
    type: str
    body: bytes  # the serialised event, published verbatim (so a republish is identical)
    created_at: datetime
    # The account the event is about, if any: how erasure finds the rows to drop or scrub.
    account_id: str | None = None
    # W3C trace context of the command that wrote the row (validated at the edge), published
    # as the message's `traceparent` / `tracestate` headers whenever the row is relayed.
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A committed, not yet published outbox row."""

    seq: int
    event_id: str
    type: str
    body: bytes
    created_at: datetime
    command_seq: int  # shared by the rows one command wrote (one `record_outcome`)
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class ThrottleSchedule:
    """One counter's rules: `free_failures` free attempts, then a lock that doubles from
    `base_delay_s` up to `max_delay_s`. Counters untouched for `reset_after_s` start again."""

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
class ThrottleRules:
    """Password attempts are counted per (email, source) and per email across sources.

    - `pair`: a source's own counter for an email; its lock refuses that source only.
    - `email`: every source together; its lock refuses only the sources that are not
      known-good for the email (signed in to it within `known_source_s`), so that guessing
      from many sources stays bounded while the account holder's own source still gets in.
    """

    pair: ThrottleSchedule = field(default_factory=ThrottleSchedule)
    email: ThrottleSchedule = field(default_factory=lambda: ThrottleSchedule(free_failures=20))
    known_source_s: float = 90 * 86400.0


@dataclass(frozen=True, slots=True)
class ThrottleCounter:
    """A throttle row: counted failures, the lock in force, the last time it counted."""

    failures: int
    locked_until: datetime | None
    updated_at: datetime

    def locked_for(self, now: datetime) -> float:
        """Seconds the lock still runs at `now` (0: not locked)."""
        if self.locked_until is None or self.locked_until <= now:
            return 0.0
        return (self.locked_until - now).total_seconds()

    @staticmethod
    def after_failure(
        row: ThrottleCounter | None, now: datetime, schedule: ThrottleSchedule
    ) -> ThrottleCounter:
        """The counter once one more failure is counted at `now`."""
        stale = row is None or row.updated_at < now - timedelta(seconds=schedule.reset_after_s)
        failures = 1 if row is None or stale else row.failures + 1
        lock = schedule.lock_seconds(failures)
        return ThrottleCounter(failures, now + timedelta(seconds=lock) if lock else None, now)


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """Result of reserving a password attempt: allowed (and counted), or refused for
    `retry_after_s` by the `locked` counter ("source": this source's own, "email": the
    email's, which spares known-good sources)."""

    allowed: bool
    failures: int  # the (email, source) counter
    retry_after_s: float = 0.0
    email_failures: int = 0
    locked: str | None = None


def count_attempt(
    email: ThrottleCounter | None,
    pair: ThrottleCounter | None,
    known: bool,
    now: datetime,
    rules: ThrottleRules,
) -> tuple[ThrottleDecision, ThrottleCounter | None, ThrottleCounter | None]:
    """What a reservation decides, from the rows as they are (read under the email's lock):
    the decision and the email and pair rows to write (both None when refused: a refused
    attempt changes nothing). Both stores decide with this one function."""
    if pair is not None and (wait := pair.locked_for(now)) > 0:
        return ThrottleDecision(False, pair.failures, wait, locked="source"), None, None
    if not known and email is not None and (wait := email.locked_for(now)) > 0:
        failures = pair.failures if pair is not None else 0
        decision = ThrottleDecision(False, failures, wait, email.failures, locked="email")
        return decision, None, None
    new_email = ThrottleCounter.after_failure(email, now, rules.email)
    new_pair = ThrottleCounter.after_failure(pair, now, rules.pair)
    decision = ThrottleDecision(True, new_pair.failures, email_failures=new_email.failures)
    return decision, new_email, new_pair


@dataclass(frozen=True, slots=True)
class HashBudget:
    """Argon2 work per source: a token bucket of `burst` tokens refilled at `rate_per_s`;
    one token per hash or verify."""

    rate_per_s: float = 0.5
    burst: int = 30

    @property
    def refill_s(self) -> float:
        """After this long untouched, a bucket is full: the same as no row at all."""
        return self.burst / self.rate_per_s

    def available(self, tokens: float, updated_at: datetime, now: datetime) -> float:
        elapsed = max(0.0, (now - updated_at).total_seconds())
        return min(float(self.burst), tokens + elapsed * self.rate_per_s)


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    allowed: bool
    retry_after_s: float = 0.0


# Where a page of `list_live_sessions` starts: after the session with this (created_at, id).
SessionPosition = tuple[datetime, str]


@dataclass(frozen=True, slots=True)
class ErasureCounts:
    """What `erase_account` removed or blanked, for the operator's log line."""

    sessions: int  # session rows deleted (ended ones included)
    replies: int  # stored replies replaced by the erased reply
    events_dropped: int  # unpublished outbox rows deleted
    events_scrubbed: int  # published outbox rows whose body was cut down to id and type
    throttle: int  # sign-in throttle rows deleted


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    idempotency: int
    outbox: int
    throttle: int
    sessions: int
    known_sources: int = 0
    budgets: int = 0
