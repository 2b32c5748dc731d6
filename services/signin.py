"""Checking a password against an account: throttled by source, and the same work for every
outcome.

Every path that accepts a password (sign-in, changing the password, changing the email) goes
through `Authenticator.check`, so they share one throttle and one timing profile:

1. reserve an attempt for (canonical email, source) (atomic in the store; a locked pair, or a
   locked email for a source that is not known-good for it, is answered `rate_limited`
   without hashing anything and without reserving), whether or not the account exists;
2. look the account up;
3. verify against its hash, or against a real dummy hash when there is no account, so an
   unknown email costs what a wrong password costs;
4. on success, settle the reservation at once (a verified password never counts as a failed
   guess, whatever fails after it: a refused new password, a taken email, a version
   conflict) and compute a new hash if the parameters changed.

The reserved attempt counts as a failure until it is settled: parallel workers cannot race
past the limits, and a crash counts against the attacker, not for them. The reservation's
refund is registered with the operation only once the reservation exists, and a settled one
has nothing left to refund: a duplicate delivery gives back exactly what it took (issue 18).

Argon2 work is also bounded per source (`spend`): a token per hash or verify, taken before
any, from a bucket per source, so that one source cannot spray hashing over many emails.

Emails and sources reach the store only as keyed tags (services.keys), and the audit log
only as a keyed tag of the email.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime

from services.errors import InvalidCredentialsError, RateLimitedError
from services.keys import HmacKey
from services.operations import Operation
from services.passwords import HashingPool
from stores import AccountRecord, CommandStore, HashBudget, ThrottleRules

log = logging.getLogger("identity.audit")

BUDGET_MESSAGE = "Too many password operations from this source; try again later."


@dataclass(frozen=True, slots=True)
class Authenticated:
    account: AccountRecord
    new_hash: str | None  # set when the stored hash should be upgraded


class Reservation:
    """One counted attempt: settled when the password verifies, refunded when the operation
    turns out to be a duplicate delivery, and never both, nor either twice."""

    __slots__ = ("_email", "_open", "_source", "_store")

    def __init__(self, store: CommandStore, email_tag: bytes, source_tag: bytes) -> None:
        self._store = store
        self._email = email_tag
        self._source = source_tag
        self._open = True

    async def settle(self, now: datetime) -> None:
        if self._open:
            self._open = False
            await self._store.settle_password_attempt(self._email, self._source, now)

    async def refund(self) -> None:
        if self._open:
            self._open = False
            await self._store.refund_password_attempt(self._email, self._source)


class Authenticator:
    def __init__(
        self,
        store: CommandStore,
        passwords: HashingPool,
        rules: ThrottleRules,
        budget: HashBudget,
        key: HmacKey,
    ) -> None:
        self._store = store
        self._passwords = passwords
        self._rules = rules
        self._budget = budget
        self._key = key

    async def spend(self, source: str, hashes: int, now: datetime) -> None:
        """Take `hashes` from the source's argon2 budget, or raise RateLimitedError."""
        decision = await self._store.spend_hash_budget(
            self._key.source_tag(source), hashes, now, self._budget
        )
        if not decision.allowed:
            log.info("authn_budget_spent", extra={"event": "authn_budget_spent"})
            retry = max(1, math.ceil(decision.retry_after_s))
            raise RateLimitedError(retry, BUDGET_MESSAGE)

    async def check(
        self,
        op: Operation,
        email_canonical: str,
        password: str,
        now: datetime,
        account: AccountRecord | None = None,
        purpose: str = "sign_in",
    ) -> Authenticated:
        """The account if the password is right; InvalidCredentialsError or RateLimitedError
        otherwise. `account` may be passed when the caller already read it. The attempt is
        counted from `op`'s source, and its refund registered with `op`."""
        email_tag = self._key.email_tag(email_canonical)
        source_tag = self._key.source_tag(op.context.source)
        decision = await self._store.reserve_password_attempt(
            email_tag, source_tag, now, self._rules
        )
        if not decision.allowed:
            self._audit("authn_login_lock", email_canonical, purpose, None, decision.locked)
            raise RateLimitedError(max(1, math.ceil(decision.retry_after_s)))
        reservation = Reservation(self._store, email_tag, source_tag)
        op.compensations.append(reservation.refund)
        if account is None:
            account = await self._store.get_account_by_email(email_canonical)
        if account is None:
            await self._passwords.verify_dummy(password)
            self._audit("authn_login_fail", email_canonical, purpose, None, "unknown_email")
            raise InvalidCredentialsError()
        if not await self._passwords.verify(account.password_hash, password):
            self._audit("authn_login_fail", email_canonical, purpose, account.id, "bad_password")
            raise InvalidCredentialsError()
        await reservation.settle(now)
        new_hash = None
        if self._passwords.needs_rehash(account.password_hash):
            new_hash = await self._passwords.hash(password)
        return Authenticated(account, new_hash)

    def throttle_key(self, email_canonical: str) -> bytes:
        """The tag the throttle counts `email_canonical`'s attempts under (erasure deletes
        the rows of it)."""
        return self._key.email_tag(email_canonical)

    def _audit(
        self,
        event: str,
        email: str,
        purpose: str,
        account_id: str | None,
        reason: str | None = None,
    ) -> None:
        # The reason stays in the audit log; callers only ever see `invalid_credentials`.
        log.info(
            event,
            extra={
                "event": event,
                "purpose": purpose,
                "email_tag": self._key.audit_tag(email),
                "account_id": account_id,
                "reason": reason,
            },
        )
