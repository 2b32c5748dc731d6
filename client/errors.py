"""Errors raised by the client, in two families: the worker said no, or the broker failed.

    IdentityClientError             .message
    ├── ErrorReply                  an `ok: false` reply: .code .fields .retry_after_s
    │   ├── MalformedMessage        malformed_message
    │   ├── UnknownCommand          unknown_command
    │   ├── ValidationFailed        validation_failed (see .fields)
    │   ├── IdempotencyKeyReused    idempotency_key_reused
    │   ├── EmailTaken              email_taken
    │   ├── InvalidCredentials      invalid_credentials
    │   ├── RateLimited             rate_limited (see .retry_after_s)
    │   ├── InvalidToken            invalid_token
    │   ├── SessionExpired          session_expired
    │   ├── NotFound                not_found
    │   ├── VersionConflict         version_conflict
    │   ├── InternalError           internal_error
    │   ├── Forbidden               forbidden
    │   ├── InvalidCode             invalid_code
    │   ├── EmailNotVerified        email_not_verified
    │   └── AccountDisabled         account_disabled
    ├── TransportError              no reply to read: .command
    │   ├── ReplyTimeout            no reply within the timeout, after every retry
    │   ├── Unroutable              the broker has no queue for the command (worker not up)
    │   └── NotDeployed             the vhost has no identity.commands exchange
    └── InvalidAccessToken          an access token verified locally is not good (no round trip)
        └── AccessTokenExpired      ... only because it expired: refresh it

    InvalidRequest (a ValueError)   refused locally, nothing sent: .fields

`except ErrorReply` catches the worker's answers, `except TransportError` what the broker did
(or did not) carry, as httpx tells `HTTPStatusError` from `RequestError`. After a
`ReplyTimeout` the command may still have taken effect: send it again with the same
idempotency key. A payload that the message models reject never reaches the broker: it raises
`InvalidRequest` locally, not `ValidationFailed`. Its text names each field and what is wrong
with it, never the value (pydantic's own error quotes the input: a password, a token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from messages import ErrorBody, ErrorCode, FieldError


class IdentityClientError(Exception):
    """Anything the client raises about a command it sent: an `ErrorReply` or a
    `TransportError`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ErrorReply(IdentityClientError):
    """The worker answered `ok: false`; the subclass (and `.code`) says why."""

    code: ClassVar[ErrorCode]

    def __init__(
        self,
        message: str,
        *,
        fields: Sequence[FieldError] = (),
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.fields = list(fields)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        details = "; ".join(f"{f.field}: {f.message}" for f in self.fields)
        return f"{self.code.value}: {self.message}" + (f" ({details})" if details else "")


class TransportError(IdentityClientError):
    """The command or its reply did not make it through the broker: there is no answer."""

    def __init__(self, message: str, *, command: str) -> None:
        super().__init__(message)
        self.command = command


class MalformedMessage(ErrorReply):
    code = ErrorCode.MALFORMED_MESSAGE


class UnknownCommand(ErrorReply):
    code = ErrorCode.UNKNOWN_COMMAND


class ValidationFailed(ErrorReply):
    code = ErrorCode.VALIDATION_FAILED


class IdempotencyKeyReused(ErrorReply):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class EmailTaken(ErrorReply):
    code = ErrorCode.EMAIL_TAKEN


class InvalidCredentials(ErrorReply):
    code = ErrorCode.INVALID_CREDENTIALS


class RateLimited(ErrorReply):
    code = ErrorCode.RATE_LIMITED


class InvalidToken(ErrorReply):
    code = ErrorCode.INVALID_TOKEN


class SessionExpired(ErrorReply):
    code = ErrorCode.SESSION_EXPIRED


class NotFound(ErrorReply):
    code = ErrorCode.NOT_FOUND


class VersionConflict(ErrorReply):
    code = ErrorCode.VERSION_CONFLICT


class InternalError(ErrorReply):
    code = ErrorCode.INTERNAL_ERROR


class Forbidden(ErrorReply):
    code = ErrorCode.FORBIDDEN


class InvalidCode(ErrorReply):
    code = ErrorCode.INVALID_CODE


class EmailNotVerified(ErrorReply):
    code = ErrorCode.EMAIL_NOT_VERIFIED


class AccountDisabled(ErrorReply):
    code = ErrorCode.ACCOUNT_DISABLED


class ReplyTimeout(TransportError):
    """No reply arrived in time, after every retry. The command may still have taken effect:
    sending it again with the same idempotency key is safe and returns its reply."""

    def __init__(self, command: str, idempotency_key: str | None, attempts: int) -> None:
        super().__init__(f"no reply to {command} after {attempts} attempt(s)", command=command)
        self.idempotency_key = idempotency_key
        self.attempts = attempts


class NotDeployed(TransportError):
    """The vhost has no `identity.commands` exchange: no worker ever started on it, and the
    deployment's broker definitions were not loaded. Nothing was sent."""

    def __init__(self, exchange: str) -> None:
        super().__init__(
            f"the broker has no exchange {exchange}: is the identity service deployed on this "
            "vhost?",
            command="",
        )


class InvalidRequest(ValueError):
    """A command the contract refuses, caught before it was sent. `fields` says which field
    and what is wrong; neither they nor the text hold the value given (it may be a secret)."""

    def __init__(self, fields: Sequence[FieldError]) -> None:
        self.fields = list(fields)
        details = "; ".join(f"{f.field}: {f.message}" for f in self.fields)
        super().__init__(f"invalid request: {details}")


class Unroutable(TransportError):
    """The broker returned the command: no queue is bound for it on `identity.commands`,
    usually because the worker has not started yet. Nothing was processed."""

    def __init__(self, command: str) -> None:
        super().__init__(
            f"no queue is bound for {command}: is the worker running?", command=command
        )


class InvalidAccessToken(IdentityClientError):
    """An access token that `AccessTokenVerifier` refused: not signed by a published key,
    not EdDSA, another issuer, a claim missing or malformed. Treat the request as
    unauthenticated."""


class AccessTokenExpired(InvalidAccessToken):
    """A genuine access token past its `exp` (beyond the clock-skew leeway): get a new one
    with the refresh token."""


_BY_CODE: dict[ErrorCode, type[ErrorReply]] = {
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
        Forbidden,
        InvalidCode,
        EmailNotVerified,
        AccountDisabled,
    )
}


def error_for(body: ErrorBody) -> ErrorReply:
    """The typed error of an `ok: false` reply."""
    cls = _BY_CODE[body.code]
    return cls(body.message, fields=body.fields, retry_after_s=body.retry_after_s)
