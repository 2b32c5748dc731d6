"""The service layer's errors: one tree, each with the contract error code it maps to.

    IdentityError                      code
    ├── InvalidInputError              validation_failed (with per-field details)
    │   └── PasswordPolicyError        validation_failed (field: the password field)
    ├── IdempotencyKeyReusedError      idempotency_key_reused
    ├── EmailTakenError                email_taken
    ├── InvalidCredentialsError        invalid_credentials (unknown email or wrong password)
    ├── RateLimitedError               rate_limited (with retry_after_s)
    ├── InvalidTokenError              invalid_token (unparseable, forged, unknown key)
    ├── SessionExpiredError            session_expired (ended, idle or past its lifetime)
    ├── NotFoundError                  not_found
    ├── VersionConflictError           version_conflict
    ├── ForbiddenError                 forbidden (the caller may not send this command)
    ├── InvalidCodeError               invalid_code (wrong, expired, used or voided code)
    ├── EmailNotVerifiedError          email_not_verified
    └── AccountDisabledError           account_disabled

Messages are written for the caller: they never name internals, and never echo a secret.
Store errors are translated before they reach here; anything else is a bug or a transient
fault and is the worker's to retry or dead-letter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from messages import ErrorBody, ErrorCode, FieldError


class IdentityError(Exception):
    """Base of the business errors; each maps to one contract error code."""

    code: ClassVar[ErrorCode]
    default_message: ClassVar[str]

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def to_error_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message)


class InvalidInputError(IdentityError):
    code = ErrorCode.VALIDATION_FAILED
    default_message = "The command is not valid."

    def __init__(self, fields: Sequence[FieldError], message: str | None = None) -> None:
        super().__init__(message)
        self.fields = list(fields)

    @classmethod
    def for_field(cls, field: str, problem: str) -> InvalidInputError:
        return cls([FieldError(field=field, message=problem)])

    def to_error_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, fields=self.fields)


class PasswordPolicyError(InvalidInputError):
    """A new password breaks the policy (too short, too long, too common...)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(
            [FieldError(field=field, message=problem)], "The password is not accepted."
        )
        self.field = field
        self.problem = problem


class IdempotencyKeyReusedError(IdentityError):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED
    default_message = "This idempotency key was already used for a different command or payload."


class EmailTakenError(IdentityError):
    code = ErrorCode.EMAIL_TAKEN
    default_message = "An account with this email already exists."


class InvalidCredentialsError(IdentityError):
    code = ErrorCode.INVALID_CREDENTIALS
    default_message = "The email or password is not correct."


class RateLimitedError(IdentityError):
    code = ErrorCode.RATE_LIMITED
    default_message = "Too many failed attempts; try again later."

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_error_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, retry_after_s=self.retry_after_s)


class InvalidTokenError(IdentityError):
    code = ErrorCode.INVALID_TOKEN
    default_message = "The session token is not valid."


class SessionExpiredError(IdentityError):
    code = ErrorCode.SESSION_EXPIRED
    default_message = "The session has ended or expired; sign in again."


class NotFoundError(IdentityError):
    code = ErrorCode.NOT_FOUND
    default_message = "No such account."


class VersionConflictError(IdentityError):
    code = ErrorCode.VERSION_CONFLICT
    default_message = "The account was changed by someone else; read it again and retry."


class ForbiddenError(IdentityError):
    code = ErrorCode.FORBIDDEN
    default_message = "This caller may not send this command."


class InvalidCodeError(IdentityError):
    code = ErrorCode.INVALID_CODE
    default_message = "The code is not valid; ask for a new one."


class EmailNotVerifiedError(IdentityError):
    code = ErrorCode.EMAIL_NOT_VERIFIED
    default_message = "The email address has not been verified yet."


class AccountDisabledError(IdentityError):
    code = ErrorCode.ACCOUNT_DISABLED
    default_message = "The account is disabled."


_BY_CODE: dict[ErrorCode, type[IdentityError]] = {
    cls.code: cls
    for cls in (
        IdempotencyKeyReusedError,
        EmailTakenError,
        InvalidCredentialsError,
        InvalidTokenError,
        SessionExpiredError,
        NotFoundError,
        VersionConflictError,
        ForbiddenError,
        InvalidCodeError,
        EmailNotVerifiedError,
        AccountDisabledError,
    )
}


def error_from_body(body: ErrorBody) -> IdentityError:
    """Rebuild the error of a stored reply, so a replay raises what the original raised."""
    if body.code is ErrorCode.RATE_LIMITED:
        return RateLimitedError(body.retry_after_s or 0, body.message)
    if body.code is ErrorCode.VALIDATION_FAILED:
        return InvalidInputError(body.fields, body.message)
    cls = _BY_CODE.get(body.code)
    if cls is None:
        raise ValueError(f"no business error has code {body.code}")
    return cls(body.message)
