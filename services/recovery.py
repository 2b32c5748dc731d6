"""Account recovery and email verification by one-time codes (contract v2, section 2).

    account.recovery.request      {accepted: true}, always, in the same work and time
    account.recovery.complete     the code, then the new password; every session ends
    account.verification.request  a new code to the account's address
    account.verification.confirm  the code proves the address

How a request reveals nothing: the service makes a code, its mac, its sealed courier copy and
the event whoever the email belongs to, and hands them to one store statement of the same
shape in every case (`Codes.issue`, `CodeReads.issue_code`), which counts the limits, finds the
account, and only for an active account within its limits stores the code, the courier row
and the event. An unknown email, a disabled account and a cool-down differ in nothing the
caller sees, nor in the work done.

How a code is checked: first throttled per email and per source (counted by keyed tag for any
email, so `rate_limited` tells nothing either), then `attempt_code` checks the mac and counts a
wrong one in one statement (5 wrong ones void the code), and only then is any password work
done. The code is used up in the unit of work that makes the change, by a compare-and-set on
the row: of two completes with the right code, exactly one commits; the other answers
`invalid_code`. Wrong, expired, used, voided, or no such email: `invalid_code`, all alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from messages import (
    AcceptedResult,
    AccountResult,
    CompleteRecovery,
    ConfirmVerification,
    RecoveryResult,
    RequestRecovery,
    RequestVerification,
)
from messages.events import (
    AccountEmailVerified,
    AccountEmailVerifiedData,
    AccountPasswordReset,
    AccountPasswordResetData,
    AccountRecoveryRequested,
    AccountRecoveryRequestedData,
)
from services.accounts import context_words
from services.clock import Clock
from services.codes import Codes
from services.emails import canonical_email
from services.errors import InvalidCodeError, NotFoundError, VersionConflictError
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.passwords import HashingPool, PasswordPolicy
from services.shapes import announce_ended, idle_cutoff, to_account
from stores import (
    RECOVERY,
    VERIFICATION,
    AccountChanges,
    AccountRecord,
    ServiceStore,
    UnitOfWork,
)

# Stands in for the account's id in the event of a request until the store, which alone
# knows whose email it is, writes the real one (stores.codes.CodeIssue).
PLACEHOLDER_ACCOUNT_ID = "acct_" + "0" * 26

# Called once a recovery completed, with the email and the source it came from: sign-in
# throttling keeps "known-good" sources, and a source that proved it holds the mailbox is one.
OnRecovered = Callable[[str, str, datetime], Awaitable[None]]
# Takes argon2 work from a source's budget (source, hashes, now), or raises RateLimitedError.
Spend = Callable[[str, int, datetime], Awaitable[None]]


class AccountFlows:
    def __init__(
        self,
        store: ServiceStore,
        *,
        passwords: HashingPool,
        clock: Clock,
        policy: PasswordPolicy,
        codes: Codes,
        ops: OperationRunner,
        idle_timeout: timedelta,
        spend: Spend | None = None,
        on_recovered: OnRecovered | None = None,
    ) -> None:
        self._store = store
        self._idle_timeout = idle_timeout
        self._passwords = passwords
        self._clock = clock
        self._policy = policy
        self._codes = codes
        self._ops = ops
        self._spend = spend
        self._on_recovered = on_recovered

    # -- requests ---------------------------------------------------------------------------

    async def request_recovery(
        self, cmd: RequestRecovery, ctx: CommandContext = NO_CONTEXT
    ) -> AcceptedResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, AcceptedResult, lambda op: self._request_recovery(op, cmd)
        )

    async def _request_recovery(self, op: Operation, cmd: RequestRecovery) -> AcceptedResult:
        canonical = canonical_email(cmd.email, field="payload.email")
        now = self._clock.now()
        data = AccountRecoveryRequestedData(account_id=PLACEHOLDER_ACCOUNT_ID)
        op.emit(AccountRecoveryRequested, data, now)
        issue = self._codes.issue(
            RECOVERY,
            canonical,
            op.context.source,
            now,
            event=op.events[0],
            unverified_only=False,
            context=op.context,
        )
        result = AcceptedResult()
        await self._store.issue_code(issue, self._ops.record_of(op, result))
        return result

    async def request_verification(
        self, cmd: RequestVerification, ctx: CommandContext = NO_CONTEXT
    ) -> AcceptedResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, AcceptedResult, lambda op: self._request_verification(op, cmd)
        )

    async def _request_verification(
        self, op: Operation, cmd: RequestVerification
    ) -> AcceptedResult:
        account = await self._store.get_account(cmd.account_id)
        if account is None:
            raise NotFoundError()
        now = self._clock.now()
        # A verified address gets no code (nothing to prove), a disabled account none either.
        issue = self._codes.issue(
            VERIFICATION,
            account.email_canonical,
            op.context.source,
            now,
            event=None,
            unverified_only=True,
            context=op.context,
        )
        result = AcceptedResult()
        await self._store.issue_code(issue, self._ops.record_of(op, result))
        return result

    # -- codes ------------------------------------------------------------------------------

    async def _checked(
        self, purpose: str, email: str, code: str, source: str, now: datetime
    ) -> tuple[AccountRecord, bytes]:
        """The account whose live code of `purpose` this is, and the code's mac; or
        RateLimitedError, or InvalidCodeError for every other case."""
        canonical = canonical_email(email, field="payload.email")
        await self._codes.limit_attempts(self._store, canonical, source, now)
        mac = self._codes.keys.mac(purpose, canonical, code)
        policy = self._codes.policy
        account = await self._store.attempt_code(canonical, purpose, mac, now, policy.max_attempts)
        if account is None:
            raise InvalidCodeError()
        return account, mac

    async def _use(
        self, uow: UnitOfWork, purpose: str, checked: AccountRecord, mac: bytes, now: datetime
    ) -> AccountRecord:
        """Use the code up and lock the account; InvalidCodeError if someone used it first, or
        the account's address or status changed since the check."""
        used = await uow.use_code(checked.id, purpose, mac, now, self._codes.policy.max_attempts)
        locked = await uow.get_account(checked.id, for_update=True) if used else None
        if (
            locked is None
            or locked.email_canonical != checked.email_canonical
            or locked.status != "active"
        ):
            raise InvalidCodeError()
        return locked

    # -- recovery ---------------------------------------------------------------------------

    async def complete_recovery(
        self, cmd: CompleteRecovery, ctx: CommandContext = NO_CONTEXT
    ) -> RecoveryResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, RecoveryResult, lambda op: self._complete_recovery(op, cmd)
        )

    async def _complete_recovery(self, op: Operation, cmd: CompleteRecovery) -> RecoveryResult:
        now = self._clock.now()
        checked, mac = await self._checked(
            RECOVERY, cmd.email, cmd.code.get_secret_value(), op.context.source, now
        )
        new = cmd.new_password.get_secret_value()
        self._policy.check_new(
            new,
            field="payload.new_password",
            context=context_words(checked.email_canonical, checked.display_name),
        )
        # Password work only for someone who holds a live code, outside any transaction, and
        # out of the source's argon2 budget like every other hash.
        if self._spend is not None:
            await self._spend(op.context.source, 1, now)
        new_hash = await self._passwords.hash(new)
        async with self._store.unit_of_work() as uow:
            locked = await self._use(uow, RECOVERY, checked, mac, now)
            # A recovered address is a proven one.
            changes = AccountChanges(updated_at=now, password_hash=new_hash, email_verified=True)
            updated = await _apply(uow, locked, changes)
            ended = await uow.end_all_sessions(
                locked.id, now, "password_reset", idle_cutoff=idle_cutoff(now, self._idle_timeout)
            )
            notice = self._codes.notice(
                "password_changed_notice", updated.email, updated, now, op.context
            )
            await uow.add_mail([notice])
            announce_ended(op, ended, "password_reset", now)
            data = AccountPasswordResetData(account_id=locked.id, sessions_ended=len(ended))
            op.emit(AccountPasswordReset, data, now)
            result = RecoveryResult(account=to_account(updated), sessions_ended=len(ended))
            await self._ops.finish(uow, op, result)
        if self._on_recovered is not None:
            await self._on_recovered(locked.email_canonical, op.context.source, now)
        return result

    # -- verification -----------------------------------------------------------------------

    async def confirm_verification(
        self, cmd: ConfirmVerification, ctx: CommandContext = NO_CONTEXT
    ) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, AccountResult, lambda op: self._confirm_verification(op, cmd)
        )

    async def _confirm_verification(self, op: Operation, cmd: ConfirmVerification) -> AccountResult:
        now = self._clock.now()
        checked, mac = await self._checked(
            VERIFICATION, cmd.email, cmd.code.get_secret_value(), op.context.source, now
        )
        async with self._store.unit_of_work() as uow:
            locked = await self._use(uow, VERIFICATION, checked, mac, now)
            updated = await _apply(uow, locked, AccountChanges(updated_at=now, email_verified=True))
            op.emit(AccountEmailVerified, AccountEmailVerifiedData(account_id=locked.id), now)
            result = AccountResult(account=to_account(updated))
            await self._ops.finish(uow, op, result)
        return result


async def _apply(uow: UnitOfWork, locked: AccountRecord, changes: AccountChanges) -> AccountRecord:
    """`changes` on the locked account (its version cannot move under the lock)."""
    updated = await uow.update_account(locked.id, locked.version, changes)
    if updated is None:
        raise VersionConflictError()
    return updated
