"""Client library for the identity worker: typed commands and event subscription.

It depends on `messages` (the contract models) and aio-pika only, so other services can use
it without the worker's own code.
"""

from client.client import IdentityClient
from client.errors import (
    AccountDisabled,
    EmailNotVerified,
    EmailTaken,
    ErrorReply,
    Forbidden,
    IdempotencyKeyReused,
    IdentityClientError,
    InternalError,
    InvalidCode,
    InvalidCredentials,
    InvalidRequest,
    InvalidToken,
    MalformedMessage,
    NotDeployed,
    NotFound,
    RateLimited,
    ReplyTimeout,
    SessionExpired,
    TransportError,
    UnknownCommand,
    Unroutable,
    ValidationFailed,
    VersionConflict,
    error_for,
)
from client.subscriber import subscribe

__all__ = [
    "AccountDisabled",
    "EmailNotVerified",
    "EmailTaken",
    "ErrorReply",
    "Forbidden",
    "IdempotencyKeyReused",
    "IdentityClient",
    "IdentityClientError",
    "InternalError",
    "InvalidCode",
    "InvalidCredentials",
    "InvalidRequest",
    "InvalidToken",
    "MalformedMessage",
    "NotDeployed",
    "NotFound",
    "RateLimited",
    "ReplyTimeout",
    "SessionExpired",
    "TransportError",
    "UnknownCommand",
    "Unroutable",
    "ValidationFailed",
    "VersionConflict",
    "error_for",
    "subscribe",
]
