"""Command envelope and payloads, and the table that names every command of contract v1
(its one row per command is the only place a command's name is written)."""

from __future__ import annotations

from dataclasses import dataclass
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


_SPECS = (
    CommandSpec(
        name="account.create",
        payload=CreateAccount,
        result=AccountResult,
        changes_state=True,
        password_work=True,
        summary="Create an account.",
    ),
    CommandSpec(
        name="account.get",
        payload=GetAccount,
        result=AccountResult,
        changes_state=False,
        password_work=False,
        summary="Read an account by id.",
    ),
    CommandSpec(
        name="account.update",
        payload=UpdateAccount,
        result=AccountResult,
        changes_state=True,
        password_work=True,
        summary="Change email and/or display name (optimistic concurrency).",
    ),
    CommandSpec(
        name="account.change_password",
        payload=ChangePassword,
        result=ChangePasswordResult,
        changes_state=True,
        password_work=True,
        summary="Change the password; all the account's live sessions end.",
    ),
    CommandSpec(
        name="session.start",
        payload=StartSession,
        result=StartSessionResult,
        changes_state=True,
        password_work=True,
        summary="Sign in: returns the session and its token.",
    ),
    CommandSpec(
        name="session.verify",
        payload=VerifySession,
        result=VerifySessionResult,
        changes_state=False,
        password_work=False,
        summary="Verify a session token.",
    ),
    CommandSpec(
        name="session.end",
        payload=EndSession,
        result=EndSessionResult,
        changes_state=True,
        password_work=False,
        summary="Sign out one session; ending one that is over already is not an error.",
    ),
    CommandSpec(
        name="session.end_all",
        payload=EndAllSessions,
        result=EndAllSessionsResult,
        changes_state=True,
        password_work=False,
        summary="Sign out everywhere.",
    ),
    CommandSpec(
        name="account.disable",
        payload=DisableAccount,
        result=DisableAccountResult,
        changes_state=True,
        password_work=False,
        summary="Disable an account: every live session ends, sign-in is refused.",
    ),
    CommandSpec(
        name="account.enable",
        payload=EnableAccount,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        summary="Enable a disabled account: sign-in works again (old sessions stay ended).",
    ),
    CommandSpec(
        name="account.delete",
        payload=DeleteAccount,
        result=DeleteAccountResult,
        changes_state=True,
        password_work=False,
        summary="Erase an account: its personal data, sessions and stored replies.",
    ),
    CommandSpec(
        name="session.list",
        payload=ListSessions,
        result=ListSessionsResult,
        changes_state=False,
        password_work=False,
        summary="List an account's live sessions, oldest first, a page at a time.",
    ),
    CommandSpec(
        name="session.revoke",
        payload=RevokeSession,
        result=RevokeSessionResult,
        changes_state=True,
        password_work=False,
        summary="End one session by id; ending one that is over already is not an error.",
    ),
    # Contract v2, section 2: recovery and verification by one-time codes.
    CommandSpec(
        name="account.recovery.request",
        payload=RequestRecovery,
        result=AcceptedResult,
        changes_state=True,
        password_work=False,
        summary="Mail a recovery code if the email has an active account; always accepted.",
    ),
    CommandSpec(
        name="account.recovery.complete",
        payload=CompleteRecovery,
        result=RecoveryResult,
        changes_state=True,
        password_work=True,
        summary="Set a new password with a recovery code; every live session ends.",
    ),
    CommandSpec(
        name="account.verification.request",
        payload=RequestVerification,
        result=AcceptedResult,
        changes_state=True,
        password_work=False,
        summary="Mail a new verification code to the account's email address.",
    ),
    CommandSpec(
        name="account.verification.confirm",
        payload=ConfirmVerification,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        summary="Mark the email address verified with the code mailed to it.",
    ),
    CommandSpec(
        name="session.refresh",
        payload=RefreshSession,
        result=RefreshSessionResult,
        changes_state=True,
        password_work=False,
        summary="New access and refresh tokens for a refresh token, which is used up; a used "
        "one presented again ends the session.",
    ),
    CommandSpec(
        name="keys.jwks",
        payload=GetJwks,
        result=JwksResult,
        changes_state=False,
        password_work=False,
        summary="The JWKS (RFC 7517) of the keys that sign access tokens.",
    ),
    CommandSpec(
        name="account.grant_role",
        payload=GrantRole,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        summary="Give the account a role (granting a held role changes nothing).",
    ),
    CommandSpec(
        name="account.revoke_role",
        payload=RevokeRole,
        result=AccountResult,
        changes_state=True,
        password_work=False,
        summary="Take a role from the account (revoking a missing role changes nothing).",
    ),
)

# By name, for a delivery's routing key; by payload type, for code that holds a payload.
COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in _SPECS}
_BY_PAYLOAD: dict[type[Model], CommandSpec] = {spec.payload: spec for spec in _SPECS}
if not len(COMMANDS) == len(_BY_PAYLOAD) == len(_SPECS):
    raise RuntimeError("two commands share a name or a payload model")


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
