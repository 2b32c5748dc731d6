"""Errors raised by the client: one class per contract error code, plus a local timeout.

    IdentityClientError             .code .message .fields .retry_after_s
    ├── MalformedMessage            malformed_message
    ├── UnknownCommand              unknown_command
    ├── ValidationFailed            validation_failed (see .fields)
    ├── IdempotencyKeyReused        idempotency_key_reused
    ├── EmailTaken                  email_taken
    ├── InvalidCredentials          invalid_credentials
    ├── RateLimited                 rate_limited (see .retry_after_s)
    ├── InvalidToken                invalid_token
    ├── SessionExpired              session_expired
    ├── NotFound                    not_found
    ├── VersionConflict             version_conflict
    ├── InternalError               internal_error
    ├── ReplyTimeout                no reply within the timeout, after every retry
    └── Unroutable                  the broker has no queue for the command (worker not up)

A payload that the message models reject never reaches the broker: it raises pydantic's
`ValidationError` locally, not `ValidationFailed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from messages import ErrorBody, ErrorCode, FieldError


class IdentityClientError(Exception):
    """An `ok: false` reply, or no reply at all (`ReplyTimeout`)."""

    code: ClassVar[ErrorCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        fields: Sequence[FieldError] = (),
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fields = list(fields)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        prefix = f"{self.code.value}: " if self.code is not None else ""
        details = "; ".join(f"{f.field}: {f.message}" for f in self.fields)
        return prefix + self.message + (f" ({details})" if details else "")


class MalformedMessage(IdentityClientError):
    code = ErrorCode.MALFORMED_MESSAGE


class UnknownCommand(IdentityClientError):
    code = ErrorCode.UNKNOWN_COMMAND


class ValidationFailed(IdentityClientError):
    code = ErrorCode.VALIDATION_FAILED


class IdempotencyKeyReused(IdentityClientError):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class EmailTaken(IdentityClientError):
    code = ErrorCode.EMAIL_TAKEN


class InvalidCredentials(IdentityClientError):
    code = ErrorCode.INVALID_CREDENTIALS


class RateLimited(IdentityClientError):
    code = ErrorCode.RATE_LIMITED


class InvalidToken(IdentityClientError):
    code = ErrorCode.INVALID_TOKEN


class SessionExpired(IdentityClientError):
    code = ErrorCode.SESSION_EXPIRED


class NotFound(IdentityClientError):
    code = ErrorCode.NOT_FOUND


class VersionConflict(IdentityClientError):
    code = ErrorCode.VERSION_CONFLICT


class InternalError(IdentityClientError):
    code = ErrorCode.INTERNAL_ERROR


class ReplyTimeout(IdentityClientError):
    """No reply arrived in time, after every retry. The command may still have taken effect:
    sending it again with the same idempotency key is safe and returns its reply."""

    def __init__(self, command: str, idempotency_key: str | None, attempts: int) -> None:
        super().__init__(f"no reply to {command} after {attempts} attempt(s)")
        self.command = command
        self.idempotency_key = idempotency_key
        self.attempts = attempts


class Unroutable(IdentityClientError):
    """The broker returned the command: no queue is bound for it on `identity.commands`,
    usually because the worker has not started yet. Nothing was processed."""

    def __init__(self, command: str) -> None:
        super().__init__(f"no queue is bound for {command}: is the worker running?")
        self.command = command


_BY_CODE: dict[ErrorCode, type[IdentityClientError]] = {
    cls.code: cls
    for cls in (
        MalformedMessage,
        UnknownCommand,
        ValidationFailed,
        IdempotencyKeyReused,
        EmailTaken,
        InvalidCredentials,
        RateLimited,
        InvalidToken,
        SessionExpired,
        NotFound,
        VersionConflict,
        InternalError,
    )
    if cls.code is not None
}


def error_for(body: ErrorBody) -> IdentityClientError:
    """The typed error of an `ok: false` reply."""
    cls = _BY_CODE[body.code]
    return cls(body.message, fields=body.fields, retry_after_s=body.retry_after_s)
