"""Persistence: the store ports (stores.base) and their PostgreSQL and in-memory implementations.

This package never imports `services` or `worker`. Importing it opens no connection: a
PostgreSQL pool exists only once `PostgresIdentityStore.connect()` is awaited.
"""

from stores.base import (
    CommandStore,
    EventBatch,
    Housekeeping,
    IdentityStore,
    OutboxStore,
    Pingable,
    SecretStore,
    ServiceStore,
    SessionReads,
    UnitOfWork,
)
from stores.codes import (
    RECOVERY,
    VERIFICATION,
    CodeIssue,
    CodePurgeCounts,
    CourierStore,
    Limit,
    MailBatch,
    NewCode,
    NewMail,
    PendingMail,
)
from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError
from stores.memory import MemoryIdentityStore
from stores.postgres import PostgresIdentityStore, migrate
from stores.records import (
    AccountChanges,
    AccountRecord,
    ErasureCounts,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    PurgeCounts,
    SessionPosition,
    SessionRecord,
    ThrottleDecision,
    ThrottleSchedule,
)

__all__ = [
    "RECOVERY",
    "VERIFICATION",
    "AccountChanges",
    "AccountRecord",
    "CodeIssue",
    "CodePurgeCounts",
    "CommandStore",
    "CourierStore",
    "DuplicateEmailError",
    "DuplicateKeyError",
    "ErasureCounts",
    "EventBatch",
    "Housekeeping",
    "IdempotencyRecord",
    "IdentityStore",
    "Limit",
    "MailBatch",
    "MemoryIdentityStore",
    "NewCode",
    "NewEvent",
    "NewMail",
    "OutboxStore",
    "PendingEvent",
    "PendingMail",
    "Pingable",
    "PostgresIdentityStore",
    "PurgeCounts",
    "SecretStore",
    "ServiceStore",
    "SessionPosition",
    "SessionReads",
    "SessionRecord",
    "StoreError",
    "ThrottleDecision",
    "ThrottleSchedule",
    "TransientStoreError",
    "UnitOfWork",
    "migrate",
]
