"""Reply envelope, the closed set of error codes, and the typed result of each command."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from messages.models import Account, AccountId, Model, Secret, Session, SessionId


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


class AccountResult(Model):
    """Result of `account.create`, `account.get` and `account.update`."""

    account: Account


class ChangePasswordResult(Model):
    account: Account
    sessions_ended: int = Field(ge=0)


class StartSessionResult(Model):
    """The only reply that carries a token; the token is never stored or logged."""

    session: Session
    token: Secret
    account: Account


class VerifySessionResult(Model):
    session: Session
    account: Account


class EndSessionResult(Model):
    session_id: SessionId


class EndAllSessionsResult(Model):
    account_id: AccountId
    sessions_ended: int = Field(ge=0)
