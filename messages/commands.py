"""Command envelope and payloads, and the table that names every command of contract v1
(its one row per command is the only place a command's name is written)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from messages.models import (
    AccountId,
    CodeField,
    DisableReason,
    DisplayName,
    EmailField,
    Model,
    PasswordField,
    RoleName,
    SessionId,
    TokenField,
    wire_form,
)
from messages.replies import (
    AcceptedResult,
    AccountResult,
    ChangePasswordResult,
    DeleteAccountResult,
    DisableAccountResult,
    EndAllSessionsResult,
    EndSessionResult,
    JwksResult,
    ListSessionsResult,
    RecoveryResult,
    RefreshSessionResult,
    Result,
    RevokeSessionResult,
    StartSessionResult,
    VerifySessionResult,
)


class Metadata(Model):
    """Filled by a trusted caller (a gateway); used for audit and throttling only."""

    client_ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    # A session token proving who acts, for commands granted `@self` (contract v2): a secret,
    # never logged, stored or echoed.
    actor_token: TokenField | None = None


# The key is stored and looked up as text, which cannot hold U+0000.
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
IDEMPOTENCY_KEY_RULE = "1 to 200 characters, without U+0000"
_KEY = TypeAdapter(IdempotencyKey, config=ConfigDict(strict=True))


def usable_idempotency_key(value: object) -> str | None:
    """`value` if the envelope would accept it as its idempotency key, else None."""
    try:
        return _KEY.validate_python(value)
    except ValidationError:
        return None


class CommandEnvelope(Model):
    """The JSON body of every command. The payload is checked against its command's model
    after the envelope, so that errors name the command's own fields."""

    idempotency_key: IdempotencyKey | None = None
    payload: dict[str, Any]
    metadata: Metadata | None = None


class CreateAccount(Model):
    """Create an account (`account.create`)."""

    email: EmailField
    password: PasswordField
    display_name: DisplayName


class GetAccount(Model):
    """Read an account (`account.get`)."""

    account_id: AccountId


class UpdateAccount(Model):
    """Change the email and/or display name, if the account is still at `expected_version`."""

    account_id: AccountId
    expected_version: int = Field(ge=1)
    email: EmailField | None = None
    display_name: DisplayName | None = None
    current_password: PasswordField | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> UpdateAccount:
        if self.email is None and self.display_name is None:
            raise ValueError("give at least one of email, display_name")
        return self


class ChangePassword(Model):
    """Change the password; every live session of the account ends."""

    account_id: AccountId
    current_password: PasswordField
    new_password: PasswordField


class StartSession(Model):
    """Sign in with email and password (`session.start`)."""

    email: EmailField
    password: PasswordField


class VerifySession(Model):
    """Check a session token (`session.verify`)."""

    token: TokenField


class EndSession(Model):
    """Sign out one session (`session.end`)."""

    token: TokenField


class EndAllSessions(Model):
    """Sign out everywhere (`session.end_all`)."""

    account_id: AccountId


class DisableAccount(Model):
    """Stop an account at once (`account.disable`): its live sessions end, sign-in is refused."""

    account_id: AccountId
    reason: DisableReason


class EnableAccount(Model):
    """Let a disabled account sign in again (`account.enable`)."""

    account_id: AccountId


class DeleteAccount(Model):
    """Erase an account and the personal data kept about it (`account.delete`)."""

    account_id: AccountId


# Opaque to callers: handed out as `next_cursor`, given back as it was.
PageCursor = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")]
SESSIONS_PAGE_DEFAULT = 50
SESSIONS_PAGE_MAX = 200


class ListSessions(Model):
    """An account's live sessions, a page at a time (`session.list`)."""

    account_id: AccountId
    limit: int = Field(default=SESSIONS_PAGE_DEFAULT, ge=1, le=SESSIONS_PAGE_MAX)
    cursor: PageCursor | None = None


class RevokeSession(Model):
    """End one session by its id (`session.revoke`); it acts on the session's account."""

    session_id: SessionId


class RequestRecovery(Model):
    """Ask for a recovery code by email (`account.recovery.request`); always accepted."""

    email: EmailField


class CompleteRecovery(Model):
    """Set a new password with a recovery code (`account.recovery.complete`)."""

    email: EmailField
    code: CodeField
    new_password: PasswordField


class RequestVerification(Model):
    """Send a new verification code to the account's address (`account.verification.request`)."""

    account_id: AccountId


class ConfirmVerification(Model):
    """Prove the address with the code sent to it (`account.verification.confirm`)."""

    email: EmailField
    code: CodeField


class RefreshSession(Model):
    """Trade a refresh token for a new access token and a new refresh token
    (`session.refresh`); the presented refresh token is used up."""

    refresh_token: TokenField


class GetJwks(Model):
    """The public keys access tokens are signed with (`keys.jwks`); no fields."""


class GrantRole(Model):
    """Give the account a role (`account.grant_role`); a role it holds already is fine."""

    account_id: AccountId
    role: RoleName


class RevokeRole(Model):
    """Take a role from the account (`account.revoke_role`); one it lacks is fine."""

    account_id: AccountId
    role: RoleName


class ActsOn(StrEnum):
    """Which account a command acts on: what an `@self` grant (contract v2) is checked
    against."""

    # Creates an account, or is about a session its token already proves.
    NO_ACCOUNT = "no_account"
    # The account named by `payload.account_id`.
    PAYLOAD_ACCOUNT = "payload.account_id"
    # The account of the session named by `payload.session_id` (a look-up).
    SESSION_ACCOUNT = "payload.session_id"


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandSpec:
    """What the worker, the client and the AsyncAPI document need to know about a command.
    `name` (the routing key) is written here and nowhere else; code that holds a payload
    finds its spec by the payload's type (`spec_of`)."""

    name: str
    payload: type[Model]
    result: type[Result]
    # Queries may omit the idempotency key; every state change must carry one.
    changes_state: bool
    # Commands that hash or verify a password go to their own queue, so that a backlog of
    # them never delays the cheap ones.
    password_work: bool
    summary: str
    # The account the command acts on; an `@self` grant of a command that acts on none is a
    # settings error at start.
    acts_on: ActsOn
    # False for commands nobody may be granted on their own account only, though they act on
    # one (granting oneself a role).
    self_grantable: bool = True

    @property
    def allows_self_grant(self) -> bool:
        """Whether a caller policy may grant this command `@self`."""
        return self.self_grantable and self.acts_on is not ActsOn.NO_ACCOUNT

    def target_account(self, payload: Model) -> str | None:
        """The id of the account `payload` (this command's payload) names, if it names one
        (SESSION_ACCOUNT commands name a session instead: `target_session`)."""
        if self.acts_on is ActsOn.PAYLOAD_ACCOUNT:
            account_id: str = getattr(payload, "account_id")  # noqa: B009 - checked at import
            return account_id
        return None

    def target_session(self, payload: Model) -> str | None:
        """The id of the session whose account `payload` acts on, for SESSION_ACCOUNT."""
        if self.acts_on is ActsOn.SESSION_ACCOUNT:
            session_id: str = getattr(payload, "session_id")  # noqa: B009 - checked at import
            return session_id
        return None


_SPECS = (
    CommandSpec(
        name="account.create",
        payload=CreateAccount,
        result=AccountResult,
        changes_state=True,
        password_work=True,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Create an account.",
    ),
    CommandSpec(
        name="account.get",
        payload=GetAccount,
        result=AccountResult,
        changes_state=False,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Read an account by id.",
    ),
    CommandSpec(
        name="account.update",
        payload=UpdateAccount,
        result=AccountResult,
        changes_state=True,
        password_work=True,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Change email and/or display name (optimistic concurrency).",
    ),
    CommandSpec(
        name="account.change_password",
        payload=ChangePassword,
        result=ChangePasswordResult,
        changes_state=True,
        password_work=True,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Change the password; all the account's live sessions end.",
    ),
    CommandSpec(
        name="session.start",
        payload=StartSession,
        result=StartSessionResult,
        changes_state=True,
        password_work=True,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Sign in: returns the session and its token.",
    ),
    CommandSpec(
        name="session.verify",
        payload=VerifySession,
        result=VerifySessionResult,
        changes_state=False,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Verify a session token.",
    ),
    CommandSpec(
        name="session.end",
        payload=EndSession,
        result=EndSessionResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Sign out one session; ending one that is over already is not an error.",
    ),
    CommandSpec(
        name="session.end_all",
        payload=EndAllSessions,
        result=EndAllSessionsResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Sign out everywhere.",
    ),
    CommandSpec(
        name="account.disable",
        payload=DisableAccount,
        result=DisableAccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Disable an account: every live session ends, sign-in is refused.",
    ),
    CommandSpec(
        name="account.enable",
        payload=EnableAccount,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Enable a disabled account: sign-in works again (old sessions stay ended).",
    ),
    CommandSpec(
        name="account.delete",
        payload=DeleteAccount,
        result=DeleteAccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Erase an account: its personal data, sessions and stored replies.",
    ),
    CommandSpec(
        name="session.list",
        payload=ListSessions,
        result=ListSessionsResult,
        changes_state=False,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="List an account's live sessions, oldest first, a page at a time.",
    ),
    CommandSpec(
        name="session.revoke",
        payload=RevokeSession,
        result=RevokeSessionResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.SESSION_ACCOUNT,
        summary="End one session by id; ending one that is over already is not an error.",
    ),
    # Contract v2, section 2: recovery and verification by one-time codes.
    CommandSpec(
        name="account.recovery.request",
        payload=RequestRecovery,
        result=AcceptedResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Mail a recovery code if the email has an active account; always accepted.",
    ),
    CommandSpec(
        name="account.recovery.complete",
        payload=CompleteRecovery,
        result=RecoveryResult,
        changes_state=True,
        password_work=True,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Set a new password with a recovery code; every live session ends.",
    ),
    CommandSpec(
        name="account.verification.request",
        payload=RequestVerification,
        result=AcceptedResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        summary="Mail a new verification code to the account's email address.",
    ),
    CommandSpec(
        name="account.verification.confirm",
        payload=ConfirmVerification,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="Mark the email address verified with the code mailed to it.",
    ),
    CommandSpec(
        name="session.refresh",
        payload=RefreshSession,
        result=RefreshSessionResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="New access and refresh tokens for a refresh token, which is used up; a used "
        "one presented again ends the session.",
    ),
    CommandSpec(
        name="keys.jwks",
        payload=GetJwks,
        result=JwksResult,
        changes_state=False,
        password_work=False,
        acts_on=ActsOn.NO_ACCOUNT,
        summary="The JWKS (RFC 7517) of the keys that sign access tokens.",
    ),
    CommandSpec(
        name="account.grant_role",
        payload=GrantRole,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        # Nobody grants themselves a role: `@self` on it is a settings error.
        self_grantable=False,
        summary="Give the account a role (granting a held role changes nothing).",
    ),
    CommandSpec(
        name="account.revoke_role",
        payload=RevokeRole,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        acts_on=ActsOn.PAYLOAD_ACCOUNT,
        # Nobody grants themselves a role: `@self` on it is a settings error.
        self_grantable=False,
        summary="Take a role from the account (revoking a missing role changes nothing).",
    ),
)

# By name, for a delivery's routing key; by payload type, for code that holds a payload.
COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in _SPECS}
_BY_PAYLOAD: dict[type[Model], CommandSpec] = {spec.payload: spec for spec in _SPECS}
if not len(COMMANDS) == len(_BY_PAYLOAD) == len(_SPECS):
    raise RuntimeError("two commands share a name or a payload model")
_TARGET_FIELDS = {ActsOn.PAYLOAD_ACCOUNT: "account_id", ActsOn.SESSION_ACCOUNT: "session_id"}
for _spec in _SPECS:
    _field = _TARGET_FIELDS.get(_spec.acts_on)
    if _field is not None and _field not in _spec.payload.model_fields:
        raise RuntimeError(f"{_spec.name} acts on payload.{_field} but has no such field")


def spec_of(payload: type[Model]) -> CommandSpec:
    """The spec of the command whose payload model is `payload` (KeyError for any other)."""
    return _BY_PAYLOAD[payload]


def fingerprint_material(payload: Model) -> bytes:
    """Canonical bytes of (command, payload) with secrets revealed.

    Only ever fed to a keyed hash (HMAC): a retry that changes the password must not match
    the original operation, yet the fingerprint must not be an unkeyed hash of a password.
    """
    body = wire_form(payload, exclude_none=True)
    command = spec_of(type(payload)).name
    return orjson.dumps({"command": command, "payload": body}, option=orjson.OPT_SORT_KEYS)
