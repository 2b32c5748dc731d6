"""Client library for the identity worker: typed commands and event subscription.

It depends on `messages` (the contract models), aio-pika and PyJWT only, so other services
can use it without the worker's own code.
"""

from client.access_tokens import AccessClaims, AccessTokenVerifier
from client.client import IdentityClient, TracedReply
from client.errors import (
    AccessTokenExpired,
    AccountDisabled,
    EmailNotVerified,
    EmailTaken,
    ErrorReply,
    Forbidden,
    IdempotencyKeyReused,
    IdentityClientError,
    InternalError,
    InvalidAccessToken,
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
    "AccessClaims",
    "AccessTokenExpired",
    "AccessTokenVerifier",
    "AccountDisabled",
    "EmailNotVerified",
    "EmailTaken",
    "ErrorReply",
    "Forbidden",
    "IdempotencyKeyReused",
    "IdentityClient",
    "IdentityClientError",
    "InternalError",
    "InvalidAccessToken",
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
    "TracedReply",
    "TransportError",
    "UnknownCommand",
    "Unroutable",
    "ValidationFailed",
    "VersionConflict",
    "error_for",
    "subscribe",
]
