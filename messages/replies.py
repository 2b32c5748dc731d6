"""Reply envelope, the closed set of error codes, the typed result of each command, and the
form a reply is kept in to answer a retry.

Which result fields are secret is known here and only here: a field typed `Secret` goes to
the caller (`Result.to_wire`), never into an idempotency record (`Result.to_stored`), and a
replay has to derive it again and give it back (`Result.from_stored`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self, get_args

from pydantic import Field, SecretStr, model_validator

from messages.models import (
    Account,
    AccountId,
    Model,
    Secret,
    Session,
    SessionId,
    SessionInfo,
    UtcDatetime,
    wire_form,
)


class ErrorCode(StrEnum):
    MALFORMED_MESSAGE = "malformed_message"
    UNKNOWN_COMMAND = "unknown_command"
    VALIDATION_FAILED = "validation_failed"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    EMAIL_TAKEN = "email_taken"
    INVALID_CREDENTIALS = "invalid_credentials"
    RATE_LIMITED = "rate_limited"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 (an error code, not a secret)
    SESSION_EXPIRED = "session_expired"
    NOT_FOUND = "not_found"
    VERSION_CONFLICT = "version_conflict"
    INTERNAL_ERROR = "internal_error"
    # Contract v2.
    FORBIDDEN = "forbidden"
    INVALID_CODE = "invalid_code"
    EMAIL_NOT_VERIFIED = "email_not_verified"
    ACCOUNT_DISABLED = "account_disabled"


class FieldError(Model):
    """Which field (a dotted path from the body, e.g. `payload.email`) and what is wrong."""

    field: str
    message: str


class ErrorBody(Model):
    code: ErrorCode
    message: str
    fields: list[FieldError] = Field(default_factory=list)
    retry_after_s: int | None = Field(default=None, ge=0)


class Reply(Model):
    """Exactly one per delivery that has a `reply_to`."""

    ok: bool
    command: str
    idempotency_key: str | None = None
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of the contract: `result` on success, `error` on failure."""
        body: dict[str, Any] = {
            "ok": self.ok,
            "command": self.command,
            "idempotency_key": self.idempotency_key,
        }
        if self.ok:
            body["result"] = self.result if self.result is not None else {}
        elif self.error is not None:
            body["error"] = self.error.model_dump(mode="json", exclude_none=True)
        return body


def _is_secret(annotation: Any) -> bool:
    """Whether a field typed `annotation` holds a secret (`Secret`, `Secret | None`...)."""
    return annotation is SecretStr or any(_is_secret(arg) for arg in get_args(annotation))


class Result(Model):
    """The typed result of a command. `secret_fields` (worked out from its own fields typed
    `Secret`; a result nests no secrets) are revealed to the caller and never stored."""

    secret_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.secret_fields = frozenset(
            name for name, field in cls.model_fields.items() if _is_secret(field.annotation)
        )

    def to_wire(self) -> dict[str, Any]:
        """The `result` object of the reply: every field, secrets revealed."""
        return wire_form(self)

    def to_stored(self) -> dict[str, Any]:
        """The result as an idempotency record keeps it: without its secret fields."""
        return self.model_dump(mode="json", exclude=set(self.secret_fields))

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any], **secrets: str) -> Self:
        """The result that `to_stored` gave `stored`, with its secret fields given back (each
        one is required, and nothing else may be given)."""
        if secrets.keys() != cls.secret_fields:
            raise ValueError(
                f"{cls.__name__} needs exactly its secret fields back: {sorted(cls.secret_fields)}"
            )
        # Not strict: times and enums come back as JSON text.
        return cls.model_validate({**stored, **secrets}, strict=False)


class StoredReply(Model):
    """What an idempotency record keeps, to answer a retry of its command with: the result
    without its secrets, or the error; and, for a result whose secrets are derived from facts
    that change later (a session's refresh generation, an account's roles), those facts as
    they were (`derive`: never a secret itself)."""

    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None
    derive: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _error_if_and_only_if_failed(self) -> StoredReply:
        if self.ok == (self.error is not None):
            raise ValueError("a stored reply has an error exactly when it is not ok")
        return self

    @classmethod
    def of_result(cls, result: Result, derive: Mapping[str, Any] | None = None) -> StoredReply:
        return cls(
            ok=True, result=result.to_stored(), derive=None if derive is None else dict(derive)
        )

    @classmethod
    def of_error(cls, error: ErrorBody) -> StoredReply:
        return cls(ok=False, error=error)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredReply:
        """Read back what `to_json` wrote (and the store gave back)."""
        return cls.model_validate(data, strict=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON object the store keeps: `result` on success, `error` on failure."""
        if self.error is None:
            body: dict[str, Any] = {"ok": True, "result": self.result or {}}
            if self.derive is not None:
                body["derive"] = self.derive
            return body
        return {"ok": False, "error": self.error.model_dump(mode="json", exclude_none=True)}


class AccountResult(Result):
    """Result of `account.create`, `account.get` and `account.update`."""

    account: Account


class ChangePasswordResult(Result):
    account: Account
    sessions_ended: int = Field(ge=0)


class StartSessionResult(Result):
    """A sign-in's reply: the session token, and (contract v2) an access token and a refresh
    token. No token is ever stored or logged: a replay derives them again."""

    session: Session
    token: Secret
    account: Account
    access_token: Secret
    access_token_expires_at: UtcDatetime
    refresh_token: Secret

    @staticmethod
    def stored_session_id(stored: Mapping[str, Any]) -> str:
        """The id of the session a stored sign-in opened: a replay signs it again to give
        the token back."""
        return str(stored["session"]["id"])


class RefreshSessionResult(Result):
    """`session.refresh`: a new access token and the refresh token that replaces the one
    presented."""

    session: Session
    access_token: Secret
    access_token_expires_at: UtcDatetime
    refresh_token: Secret

    @staticmethod
    def stored_session_id(stored: Mapping[str, Any]) -> str:
        return str(stored["session"]["id"])


class Jwk(Model):
    """One public key of the JWKS (RFC 7517; an Ed25519 key, RFC 8037)."""

    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str
    kid: str
    use: Literal["sig"]
    alg: Literal["EdDSA"]


class JwksResult(Result):
    """The keys access tokens are signed with, the signing one first (all of them verify)."""

    keys: list[Jwk]


class VerifySessionResult(Result):
    session: Session
    account: Account


class EndSessionResult(Result):
    session_id: SessionId


class EndAllSessionsResult(Result):
    account_id: AccountId
    sessions_ended: int = Field(ge=0)


class AcceptedResult(Result):
    """Result of `account.recovery.request` and `account.verification.request`: the same
    whether or not anything was sent."""

    accepted: Literal[True] = True


class RecoveryResult(Result):
    """Result of `account.recovery.complete`."""

    account: Account
    sessions_ended: int = Field(ge=0)


class DisableAccountResult(Result):
    """Result of `account.disable`: the account, and how many live sessions ended with it."""

    account: Account
    sessions_ended: int = Field(ge=0)


class DeleteAccountResult(Result):
    """Result of `account.delete`: only the id, since what it named is gone."""

    account_id: AccountId
    sessions_ended: int = Field(ge=0)


class ListSessionsResult(Result):
    """One page of an account's live sessions, oldest first; `next_cursor` asks for the next
    page, and is null on the last one."""

    sessions: list[SessionInfo]
    next_cursor: str | None


class RevokeSessionResult(Result):
    session_id: SessionId
    account_id: AccountId
