"""Checking a password against an account: throttled, and the same work for every outcome.

Every path that accepts a password (sign-in, changing the password, changing the email) goes
through `Authenticator.check`, so they share one throttle and one timing profile:

1. reserve an attempt for the canonical email (atomic in the store; a locked email is
   answered `rate_limited` without hashing anything), whether or not the account exists;
2. look the account up;
3. verify against its hash, or against a real dummy hash when there is no account, so an
   unknown email costs what a wrong password costs;
4. on success, compute a new hash outside any transaction if the parameters changed.

The reserved attempt counts as a failure until the caller's transaction resets it on
success: parallel workers cannot race past the limit, and a crash counts against the
attacker, not for them.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import datetime

from services.errors import InvalidCredentialsError, RateLimitedError
from services.passwords import HashingPool
from stores import AccountRecord, CommandStore, ThrottleSchedule

log = logging.getLogger("identity.audit")


@dataclass(frozen=True, slots=True)
class Authenticated:
    account: AccountRecord
    new_hash: str | None  # set when the stored hash should be upgraded


def email_tag(email_canonical: str) -> str:
    """A short, non-reversible tag of an email for audit lines (no address in logs)."""
    return hashlib.sha256(email_canonical.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(
        self, store: CommandStore, passwords: HashingPool, schedule: ThrottleSchedule
    ) -> None:
        self._store = store
        self._passwords = passwords
        self._schedule = schedule

    async def check(
        self,
        email_canonical: str,
        password: str,
        now: datetime,
        account: AccountRecord | None = None,
        purpose: str = "sign_in",
    ) -> Authenticated:
        """The account if the password is right; InvalidCredentialsError or RateLimitedError
        otherwise. `account` may be passed when the caller already read it."""
        decision = await self._store.reserve_signin_attempt(email_canonical, now, self._schedule)
        if not decision.allowed:
            self._audit("authn_login_lock", email_canonical, purpose, None)
            raise RateLimitedError(max(1, math.ceil(decision.retry_after_s)))
        if account is None:
            account = await self._store.get_account_by_email(email_canonical)
        if account is None:
            await self._passwords.verify_dummy(password)
            self._audit("authn_login_fail", email_canonical, purpose, None, "unknown_email")
            raise InvalidCredentialsError()
        if not await self._passwords.verify(account.password_hash, password):
            self._audit("authn_login_fail", email_canonical, purpose, account.id, "bad_password")
            raise InvalidCredentialsError()
        new_hash = None
        if self._passwords.needs_rehash(account.password_hash):
            new_hash = await self._passwords.hash(password)
        return Authenticated(account, new_hash)

    async def refund(self, email_canonical: str) -> None:
        await self._store.refund_signin_attempt(email_canonical)

    def throttle_key(self, email_canonical: str) -> str:
        """The key the throttle counts `email_canonical`'s attempts under (erasure deletes
        the rows of it)."""
        return email_canonical

    @staticmethod
    def _audit(
        event: str, email: str, purpose: str, account_id: str | None, reason: str | None = None
    ) -> None:
        # The reason stays in the audit log; callers only ever see `invalid_credentials`.
        log.info(
            event,
            extra={
                "event": event,
                "purpose": purpose,
                "email_tag": email_tag(email),
                "account_id": account_id,
                "reason": reason,
            },
        )
