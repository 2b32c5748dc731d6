"""The wire contract of the identity worker (contract v1) as frozen, strict pydantic models.

No I/O lives here: these models are shared by the worker, the service layer, the client
library, the tools and the AsyncAPI generator, so that there is one definition of every
message, the dead-letter record included.
"""

from messages.commands import (
    COMMANDS,
    ChangePassword,
    CommandEnvelope,
    CommandSpec,
    CreateAccount,
    EndAllSessions,
    EndSession,
    GetAccount,
    Metadata,
    StartSession,
    UpdateAccount,
    VerifySession,
    fingerprint_material,
    spec_of,
)
from messages.deadletters import DeadLetterRecord, parse_dead_letter
from messages.events import (
    EVENT_TYPES,
    AccountCreated,
    AccountPasswordChanged,
    AccountUpdated,
    Event,
    SessionEnded,
    SessionStarted,
    parse_event,
)
from messages.models import Account, Session
from messages.replies import (
    AccountResult,
    ChangePasswordResult,
    EndAllSessionsResult,
    EndSessionResult,
    ErrorBody,
    ErrorCode,
    FieldError,
    Reply,
    Result,
    StartSessionResult,
    StoredReply,
    VerifySessionResult,
)

__all__ = [
    "COMMANDS",
    "EVENT_TYPES",
    "Account",
    "AccountCreated",
    "AccountPasswordChanged",
    "AccountResult",
    "AccountUpdated",
    "ChangePassword",
    "ChangePasswordResult",
    "CommandEnvelope",
    "CommandSpec",
    "CreateAccount",
    "DeadLetterRecord",
    "EndAllSessions",
    "EndAllSessionsResult",
    "EndSession",
    "EndSessionResult",
    "ErrorBody",
    "ErrorCode",
    "Event",
    "FieldError",
    "GetAccount",
    "Metadata",
    "Reply",
    "Result",
    "Session",
    "SessionEnded",
    "SessionStarted",
    "StartSession",
    "StartSessionResult",
    "StoredReply",
    "UpdateAccount",
    "VerifySession",
    "VerifySessionResult",
    "fingerprint_material",
    "parse_dead_letter",
    "parse_event",
    "spec_of",
]
