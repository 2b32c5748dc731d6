"""Command envelope and payloads, and the table that names every command of contract v1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from messages.models import (
    AccountId,
    DisplayName,
    EmailField,
    Model,
    PasswordField,
    TokenField,
    wire_form,
)
from messages.replies import (
    AccountResult,
    ChangePasswordResult,
    EndAllSessionsResult,
    EndSessionResult,
    Result,
    StartSessionResult,
    VerifySessionResult,
)


class Metadata(Model):
    """Filled by a trusted caller (a gateway); used for audit and throttling only."""

    client_ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)


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
    """Change the password; every session of the account ends."""

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


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the worker needs to know about a command name."""

    name: str
    payload: type[Model]
    result: type[Result]
    # Queries may omit the idempotency key; every state change must carry one.
    changes_state: bool
    # Commands that hash or verify a password go to their own queue, so that a backlog of
    # them never delays the cheap ones.
    password_work: bool
    summary: str


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "account.create", CreateAccount, AccountResult, True, True, "Create an account."
        ),
        CommandSpec(
            "account.get", GetAccount, AccountResult, False, False, "Read an account by id."
        ),
        CommandSpec(
            "account.update",
            UpdateAccount,
            AccountResult,
            True,
            True,
            "Change email and/or display name (optimistic concurrency).",
        ),
        CommandSpec(
            "account.change_password",
            ChangePassword,
            ChangePasswordResult,
            True,
            True,
            "Change the password; all the account's sessions end.",
        ),
        CommandSpec(
            "session.start",
            StartSession,
            StartSessionResult,
            True,
            True,
            "Sign in: returns the session and its token.",
        ),
        CommandSpec(
            "session.verify",
            VerifySession,
            VerifySessionResult,
            False,
            False,
            "Verify a session token.",
        ),
        CommandSpec(
            "session.end",
            EndSession,
            EndSessionResult,
            True,
            False,
            "Sign out one session; ending an ended session is not an error.",
        ),
        CommandSpec(
            "session.end_all",
            EndAllSessions,
            EndAllSessionsResult,
            True,
            False,
            "Sign out everywhere.",
        ),
    )
}


def fingerprint_material(command: str, payload: Model) -> bytes:
    """Canonical bytes of (command, payload) with secrets revealed.

    Only ever fed to a keyed hash (HMAC): a retry that changes the password must not match
    the original operation, yet the fingerprint must not be an unkeyed hash of a password.
    """
    body = wire_form(payload, exclude_none=True)
    return orjson.dumps({"command": command, "payload": body}, option=orjson.OPT_SORT_KEYS)
