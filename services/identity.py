"""IdentityService: the business rules of accounts and sessions.

One class, its store injected. Methods take the contract's payload models and a
`CommandContext`, and return the contract's result models or raise an `IdentityError`.
State-changing methods are idempotent by key (see services.operations); password work
happens before any transaction opens, in the bounded hashing pool.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import SecretStr

from messages import (
    AccountResult,
    ChangePassword,
    ChangePasswordResult,
    CreateAccount,
    EndAllSessions,
    EndAllSessionsResult,
    EndSession,
    EndSessionResult,
    GetAccount,
    Session,
    StartSession,
    StartSessionResult,
    UpdateAccount,
    VerifySession,
    VerifySessionResult,
)
from messages.events import (
    AccountCreated,
    AccountCreatedData,
    AccountPasswordChanged,
    AccountPasswordChangedData,
    AccountUpdated,
    AccountUpdatedData,
    SessionEnded,
    SessionEndedData,
    SessionEndReason,
    SessionStarted,
    SessionStartedData,
)
from services.accounts import context_words
from services.clock import Clock
from services.codes import CodeKeys, CodePolicy, Codes
from services.emails import canonical_email
from services.errors import (
    AccountDisabledError,
    EmailNotVerifiedError,
    EmailTakenError,
    InvalidInputError,
    NotFoundError,
    PasswordPolicyError,
    SessionExpiredError,
    VersionConflictError,
)
from services.ids import new_account_id, new_session_id
from services.keys import Fingerprints, HmacKey
from services.lifecycle import AccountLifecycle
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.passwords import HashingPool, PasswordPolicy, normalize_password
from services.recovery import AccountFlows
from services.refresh import SessionTokens, TokenIssue, TokenService
from services.roles import RoleService
from services.sessions_admin import SessionAdmin
from services.shapes import (
    announce_ended,
    idle_cutoff,
    session_is_live,
    to_account,
    to_session,
)
from services.signin import Authenticated, Authenticator
from services.tokens import TokenSigner
from stores import (
    VERIFICATION,
    AccountChanges,
    AccountRecord,
    DuplicateEmailError,
    HashBudget,
    ServiceStore,
    SessionRecord,
    ThrottleRules,
    TransientStoreError,
    UnitOfWork,
)

# Argon2 computations a command may make, taken from its source's budget before the first.
_ONE_HASH = 1
_VERIFY_AND_HASH = 2


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Absolute lifetime, idle timeout, how often `last_seen` may be written, and how many
    live sessions an account may hold (a sign-in beyond it ends the oldest)."""

    lifetime: timedelta = timedelta(hours=24)
    idle_timeout: timedelta = timedelta(minutes=30)
    touch_interval: timedelta = timedelta(minutes=1)
    max_per_account: int = 100

    def __post_init__(self) -> None:
        if self.max_per_account < 1:
            raise ValueError("an account must be allowed at least one live session")

    @classmethod
    def from_seconds(
        cls,
        lifetime: float,
        idle_timeout: float,
        touch_interval: float,
        max_per_account: int = 100,
    ) -> SessionPolicy:
        return cls(
            timedelta(seconds=lifetime),
            timedelta(seconds=idle_timeout),
            timedelta(seconds=touch_interval),
            max_per_account,
        )


_Checked = TypeVar("_Checked")
_Result = TypeVar("_Result")


async def _against_the_stored_hash(
    checked: _Checked,
    act: Callable[[_Checked], Awaitable[_Result | None]],
    check_again: Callable[[], Awaitable[_Checked]],
) -> _Result:
    """`act` on what a password check returned; `act` gives None, having written nothing, when
    the stored hash is no longer the one the password was checked against (checks run outside
    any transaction, and argon2 takes a while).

    The hash then changed meanwhile: the password was changed (and every session ended with
    it), or a sign-in or an email change stored a new hash of the same password. The password
    is checked again, against the stored hash, and `act` tried once more; a hash that changed
    again by then fails the command as transient, to be retried. Each check reserves its own
    attempt and settles it when the password verifies, so neither counts as a failure.
    """
    result = await act(checked)
    if result is None:
        result = await act(await check_again())
    if result is None:
        raise TransientStoreError("the password hash changed twice during the command")
    return result


class IdentityService:
    def __init__(
        self,
        store: ServiceStore,
        *,
        passwords: HashingPool,
        signer: TokenSigner,
        hmac_key: HmacKey,
        tokens: SessionTokens,
        clock: Clock,
        policy: PasswordPolicy | None = None,
        sessions: SessionPolicy | None = None,
        throttle: ThrottleRules | None = None,
        budget: HashBudget | None = None,
        on_replay: Callable[[str], None] | None = None,
        codes: Codes | None = None,
    ) -> None:
        self._store = store
        self._passwords = passwords
        self._signer = signer
        self._clock = clock
        self._policy = policy or PasswordPolicy()
        self._sessions = sessions or SessionPolicy()
        self._auth = Authenticator(
            store, passwords, throttle or ThrottleRules(), budget or HashBudget(), hmac_key
        )
        fingerprints = Fingerprints(hmac_key, signer.fingerprint_matches)
        self._ops = OperationRunner(store, fingerprints, clock, on_replay)
        # Without a key of its own (tests), codes are keyed by one that lives as long as it.
        self._codes = codes or Codes(CodeKeys(secrets.token_bytes(32)), CodePolicy())
        # Recovery and verification (services.recovery), on the same store, pool and runner.
        self.flows = AccountFlows(
            store,
            passwords=passwords,
            clock=clock,
            policy=self._policy,
            codes=self._codes,
            ops=self._ops,
            idle_timeout=self._sessions.idle_timeout,
            spend=self._auth.spend,
            on_recovered=self._recovered,
        )
        self._hmac_key = hmac_key
        # Disable, enable, erase; list and revoke sessions (services.lifecycle,
        # services.sessions_admin).
        self.lifecycle = AccountLifecycle(
            store,
            self._ops,
            clock,
            self._auth.throttle_key,
            idle_timeout=self._sessions.idle_timeout,
        )
        self.sessions_admin = SessionAdmin(store, self._ops, clock, self._sessions.idle_timeout)
        self._tokens = tokens
        # Contract v2's token and role commands (services.refresh, services.roles).
        self.tokens = TokenService(
            store, self._ops, clock, tokens, idle_timeout=self._sessions.idle_timeout
        )
        self.roles = RoleService(store, self._ops, clock)

    # -- accounts ---------------------------------------------------------------------------

    async def create_account(
        self, cmd: CreateAccount, ctx: CommandContext = NO_CONTEXT
    ) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, AccountResult, lambda op: self._create(op, cmd))

    async def _create(self, op: Operation, cmd: CreateAccount) -> AccountResult:
        canonical = canonical_email(cmd.email, field="payload.email")
        password = cmd.password.get_secret_value()
        self._policy.check_new(
            password, field="payload.password", context=context_words(canonical, cmd.display_name)
        )
        now = self._clock.now()
        await self._auth.spend(op.context.source, _ONE_HASH, now)
        password_hash = await self._passwords.hash(password)
        record = AccountRecord(
            id=new_account_id(now),
            email=cmd.email.strip(),
            email_canonical=canonical,
            display_name=cmd.display_name,
            password_hash=password_hash,
            created_at=now,
            updated_at=now,
            version=1,
        )
        async with self._store.unit_of_work() as uow:
            try:
                await uow.insert_account(record)
            except DuplicateEmailError as exc:
                raise EmailTakenError() from exc
            if self._codes.policy.send_verification_on_create:
                await self._codes.send_code(uow, record, VERIFICATION, now, op.context)
            result = AccountResult(account=to_account(record))
            op.emit(AccountCreated, AccountCreatedData(account=result.account), now)
            await self._ops.finish(uow, op, result)
        return result

    async def get_account(self, cmd: GetAccount, ctx: CommandContext = NO_CONTEXT) -> AccountResult:
        record = await self._store.get_account(cmd.account_id)
        if record is None:
            raise NotFoundError()
        return AccountResult(account=to_account(record))

    async def update_account(
        self, cmd: UpdateAccount, ctx: CommandContext = NO_CONTEXT
    ) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, AccountResult, lambda op: self._update(op, cmd))

    async def _update(self, op: Operation, cmd: UpdateAccount) -> AccountResult:
        record = await self._existing_account(cmd.account_id)
        if record.version != cmd.expected_version:
            raise VersionConflictError()
        now = self._clock.now()
        changed: list[str] = []
        email = canonical = None
        if cmd.email is not None and cmd.email.strip() != record.email:
            email, canonical = cmd.email.strip(), canonical_email(cmd.email, field="payload.email")
            changed.append("email")
        if cmd.display_name is not None and cmd.display_name != record.display_name:
            changed.append("display_name")
        if not changed:
            # Nothing differs: no new version, no event; the reply is the account as it is.
            result = AccountResult(account=to_account(record))
            async with self._store.unit_of_work() as uow:
                # An erasure that committed since the read leaves nothing to echo back.
                if await uow.get_account(record.id, for_update=True) is None:
                    raise NotFoundError()
                await self._ops.finish(uow, op, result)
            return result
        new_hash = None
        if "email" in changed:
            new_hash = await self._reauthenticate(op, record, cmd, now)
        changes = AccountChanges(
            updated_at=now,
            email=email,
            email_canonical=canonical,
            display_name=cmd.display_name if "display_name" in changed else None,
            password_hash=new_hash,
            # A new address is not proven yet.
            email_verified=False if "email" in changed else None,
        )
        async with self._store.unit_of_work() as uow:
            updated = await self._apply(uow, record.id, cmd.expected_version, changes)
            if "email" in changed:
                await self._email_changed(uow, record, updated, now, op.context)
            result = AccountResult(account=to_account(updated))
            op.emit(
                AccountUpdated, AccountUpdatedData(account=result.account, changed=changed), now
            )
            await self._ops.finish(uow, op, result)
        return result

    async def _email_changed(
        self,
        uow: UnitOfWork,
        before: AccountRecord,
        after: AccountRecord,
        now: datetime,
        context: CommandContext,
    ) -> None:
        """Codes sent to the old address are void; the new one gets a verification code, the
        old one a notice (someone who took over the account is seen by its owner)."""
        await uow.drop_codes(after.id)
        await self._codes.send_code(uow, after, VERIFICATION, now, context)
        notice = self._codes.notice("email_changed_notice", before.email, after, now, context)
        await uow.add_mail([notice])

    async def _reauthenticate(
        self, op: Operation, record: AccountRecord, cmd: UpdateAccount, now: datetime
    ) -> str | None:
        """An email change needs the current password (the email is the sign-in name)."""
        if cmd.current_password is None:
            raise InvalidInputError.for_field(
                "payload.current_password", "is required when the email changes"
            )
        await self._auth.spend(op.context.source, _ONE_HASH, now)
        checked = await self._auth.check(
            op,
            record.email_canonical,
            cmd.current_password.get_secret_value(),
            now,
            account=record,
            purpose="update_email",
        )
        return checked.new_hash

    async def change_password(
        self, cmd: ChangePassword, ctx: CommandContext = NO_CONTEXT
    ) -> ChangePasswordResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, ChangePasswordResult, lambda op: self._change_password(op, cmd)
        )

    async def _change_password(self, op: Operation, cmd: ChangePassword) -> ChangePasswordResult:
        record = await self._existing_account(cmd.account_id)
        current = cmd.current_password.get_secret_value()
        new = cmd.new_password.get_secret_value()
        now = self._clock.now()
        await self._auth.spend(op.context.source, _VERIFY_AND_HASH, now)
        await self._auth.check(
            op, record.email_canonical, current, now, account=record, purpose="change_password"
        )
        if normalize_password(new) == normalize_password(current):
            raise PasswordPolicyError("payload.new_password", "must differ from the current one")
        self._policy.check_new(
            new,
            field="payload.new_password",
            context=context_words(record.email_canonical, record.display_name),
        )
        new_hash = await self._passwords.hash(new)

        async def check_again() -> AccountRecord:
            fresh = await self._existing_account(cmd.account_id)
            await self._auth.check(
                op, fresh.email_canonical, current, now, account=fresh, purpose="change_password"
            )
            return fresh

        return await _against_the_stored_hash(
            record, lambda checked: self._replace_password(op, checked, new_hash, now), check_again
        )

    async def _replace_password(
        self, op: Operation, checked: AccountRecord, new_hash: str, now: datetime
    ) -> ChangePasswordResult | None:
        """Set `new_hash`, end every session and record the outcome; None, with nothing
        written, if the stored hash is no longer the one the current password was checked
        against."""
        async with self._store.unit_of_work() as uow:
            locked = await uow.get_account(checked.id, for_update=True)
            if locked is None or locked.password_hash != checked.password_hash:
                return None
            changes = AccountChanges(updated_at=now, password_hash=new_hash)
            updated = await self._apply(uow, checked.id, locked.version, changes)
            ended = await uow.end_all_sessions(
                checked.id, now, "password_changed", idle_cutoff=self._idle_cutoff(now)
            )
            notice = self._codes.notice(
                "password_changed_notice", updated.email, updated, now, op.context
            )
            await uow.add_mail([notice])
            self._emit_ended(op, ended, "password_changed", now)
            data = AccountPasswordChangedData(account_id=checked.id, sessions_ended=len(ended))
            op.emit(AccountPasswordChanged, data, now)
            result = ChangePasswordResult(account=to_account(updated), sessions_ended=len(ended))
            await self._ops.finish(uow, op, result)
        return result

    # -- sessions ---------------------------------------------------------------------------

    async def start_session(
        self, cmd: StartSession, ctx: CommandContext = NO_CONTEXT
    ) -> StartSessionResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, StartSessionResult, lambda op: self._start(op, cmd), restore=self._replayed_start
        )

    async def _start(self, op: Operation, cmd: StartSession) -> StartSessionResult:
        canonical = canonical_email(cmd.email, field="payload.email")
        password = cmd.password.get_secret_value()
        self._policy.check_verifiable(password, field="payload.password")
        now = self._clock.now()
        await self._auth.spend(op.context.source, _ONE_HASH, now)
        checked = await self._auth.check(op, canonical, password, now)
        # A disabled account is told so (below) whatever its address.
        unproven = checked.account.status == "active" and not checked.account.email_verified
        if self._codes.policy.require_verified_email and unproven:
            raise EmailNotVerifiedError()  # the right password was settled: no failed guess
        return await _against_the_stored_hash(
            checked,
            lambda checked: self._open_session(op, checked, now),
            lambda: self._auth.check(op, canonical, password, now),
        )

    async def _recovered(self, email_canonical: str, source: str, now: datetime) -> None:
        """A source that completed recovery proved it holds the mailbox: like a sign-in with
        the right password, it is known-good for the email from now on."""
        await self._store.settle_password_attempt(
            self._hmac_key.email_tag(email_canonical), self._hmac_key.source_tag(source), now
        )

    async def _open_session(
        self, op: Operation, checked: Authenticated, now: datetime
    ) -> StartSessionResult | None:
        """Insert the session and record the outcome; None, with nothing written, if the
        stored hash is no longer the one the password was checked against. The account's row
        stays locked until commit, so a password change either comes first (and is seen here)
        or waits, and then ends this session with the others; and two sign-ins at the session
        cap take turns, each counting the other's session once it committed."""
        account = checked.account
        client = op.context.metadata
        session = SessionRecord(
            id=new_session_id(),
            account_id=account.id,
            key_id=self._signer.current_kid,
            created_at=now,
            expires_at=now + self._sessions.lifetime,
            last_seen_at=now,
            client_ip=client.client_ip if client is not None else None,
            user_agent=client.user_agent if client is not None else None,
        )
        async with self._store.unit_of_work() as uow:
            locked = await uow.get_account(account.id, for_update=True)
            if locked is None or locked.password_hash != account.password_hash:
                return None
            # Only now, with the password found right: the status is no oracle for it.
            if locked.status != "active":
                raise AccountDisabledError()
            # Room for this one: the oldest beyond the cap end first, announced before it.
            over = await uow.end_oldest_sessions(
                account.id,
                self._sessions.max_per_account - 1,
                now,
                "session_limit",
                idle_cutoff=self._idle_cutoff(now),
            )
            announce_ended(op, over, "session_limit", now)
            await uow.insert_session(session)
            if checked.new_hash is not None:
                await uow.replace_password_hash(account.id, account.password_hash, checked.new_hash)
            issue = self._tokens.issue(session, locked.roles, now)
            result = self._started(session, locked, issue)
            op.emit(SessionStarted, SessionStartedData(session=result.session), now)
            await self._ops.finish(uow, op, result, derive=issue.to_json())
        return result

    def _started(
        self, session: SessionRecord, account: AccountRecord, issue: TokenIssue
    ) -> StartSessionResult:
        tokens = self._tokens.derive(account.id, session.id, issue)
        return StartSessionResult(
            session=to_session(session),
            token=SecretStr(self._signer.sign(session.id, session.key_id)),
            account=to_account(account),
            access_token=tokens.access_token,
            access_token_expires_at=tokens.access_token_expires_at,
            refresh_token=tokens.refresh_token,
        )

    async def _replayed_start(
        self, stored: Mapping[str, Any], derive: Mapping[str, Any] | None
    ) -> StartSessionResult:
        """A replayed sign-in returns the same tokens: the session token re-derived from the
        stored session id, with the key it was first signed with while that key is still
        configured; the access and refresh tokens from the facts kept with the reply."""
        session_id = StartSessionResult.stored_session_id(stored)
        found = await self._store.get_session_with_account(session_id)
        kid = found[0].key_id if found is not None else None
        account_id = str(stored["account"]["id"])
        if derive is not None:
            issue = TokenIssue.from_json(derive)
        else:  # a sign-in stored before access tokens existed: tokens as of its start
            issue = self._tokens.issue_at_start(stored)
        tokens = self._tokens.derive(account_id, session_id, issue)
        return StartSessionResult.from_stored(
            {**stored, "access_token_expires_at": tokens.access_token_expires_at},
            token=self._signer.sign(session_id, kid),
            access_token=tokens.access_token.get_secret_value(),
            refresh_token=tokens.refresh_token.get_secret_value(),
        )

    async def verify_session(
        self, cmd: VerifySession, ctx: CommandContext = NO_CONTEXT
    ) -> VerifySessionResult:
        session, account, now = await self._live_session(cmd.token)
        if now - session.last_seen_at >= self._sessions.touch_interval:
            await self._store.touch_session(session.id, now)
        return VerifySessionResult(session=to_session(session), account=to_account(account))

    async def acting_session(self, token: SecretStr) -> Session:
        """The live session that `token` proves, checked as `session.verify` checks it; for a
        caller acting on its own account (an `@self` grant). Not a sign of the user's
        activity: the session's `last_seen` is left alone. Raises InvalidTokenError or
        SessionExpiredError."""
        session, _, _ = await self._live_session(token)
        return to_session(session)

    async def session_account(self, session_id: str) -> str | None:
        """The id of the account session `session_id` belongs to, None if there is no such
        session: what an `@self` grant of `session.revoke` is checked against."""
        found = await self._store.get_session_with_account(session_id)
        return found[0].account_id if found is not None else None

    async def _live_session(
        self, token: SecretStr
    ) -> tuple[SessionRecord, AccountRecord, datetime]:
        session_id, _ = self._signer.verify(token.get_secret_value())
        found = await self._store.get_session_with_account(session_id)
        if found is None:
            raise SessionExpiredError()
        session, account = found
        now = self._clock.now()
        # A disabled account's sessions ended with the change; a token of one that somehow
        # did not is refused all the same.
        if not self._is_live(session, now) or account.status != "active":
            raise SessionExpiredError()
        return session, account, now

    def _is_live(self, session: SessionRecord, now: datetime) -> bool:
        return session_is_live(session, now, self._sessions.idle_timeout)

    def _idle_cutoff(self, now: datetime) -> datetime:
        return idle_cutoff(now, self._sessions.idle_timeout)

    async def end_session(
        self, cmd: EndSession, ctx: CommandContext = NO_CONTEXT
    ) -> EndSessionResult:
        # A forged token is refused before anything is looked up or remembered.
        session_id, _ = self._signer.verify(cmd.token.get_secret_value())
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, EndSessionResult, lambda op: self._end(op, session_id))

    async def _end(self, op: Operation, session_id: str) -> EndSessionResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            ended = await uow.end_session(
                session_id, now, "sign_out", idle_cutoff=self._idle_cutoff(now)
            )
            # Ending a session that is over (ended, expired, idled out, or long purged) is not
            # an error, and announces nothing.
            self._emit_ended(op, [ended] if ended else [], "sign_out", now)
            result = EndSessionResult(session_id=session_id)
            await self._ops.finish(uow, op, result)
        return result

    async def end_all_sessions(
        self, cmd: EndAllSessions, ctx: CommandContext = NO_CONTEXT
    ) -> EndAllSessionsResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, EndAllSessionsResult, lambda op: self._end_all(op, cmd.account_id)
        )

    async def _end_all(self, op: Operation, account_id: str) -> EndAllSessionsResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            if await uow.get_account(account_id) is None:
                raise NotFoundError()
            ended = await uow.end_all_sessions(
                account_id, now, "sign_out_everywhere", idle_cutoff=self._idle_cutoff(now)
            )
            self._emit_ended(op, ended, "sign_out_everywhere", now)
            result = EndAllSessionsResult(account_id=account_id, sessions_ended=len(ended))
            await self._ops.finish(uow, op, result)
        return result

    # -- helpers ----------------------------------------------------------------------------

    async def _existing_account(self, account_id: str) -> AccountRecord:
        record = await self._store.get_account(account_id)
        if record is None:
            raise NotFoundError()
        return record

    @staticmethod
    async def _apply(
        uow: UnitOfWork, account_id: str, expected_version: int, changes: AccountChanges
    ) -> AccountRecord:
        try:
            updated = await uow.update_account(account_id, expected_version, changes)
        except DuplicateEmailError as exc:
            raise EmailTakenError() from exc
        if updated is None:
            raise VersionConflictError()
        return updated

    @staticmethod
    def _emit_ended(
        op: Operation, sessions: list[SessionRecord], reason: SessionEndReason, now: datetime
    ) -> None:
        for session in sessions:
            data = SessionEndedData(
                session_id=session.id, account_id=session.account_id, reason=reason
            )
            op.emit(SessionEnded, data, now)
