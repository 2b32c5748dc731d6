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
from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError
from stores.memory import MemoryIdentityStore
from stores.postgres import PostgresIdentityStore, migrate
from stores.records import (
    AccountChanges,
    AccountRecord,
    BudgetDecision,
    ErasureCounts,
    HashBudget,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    PurgeCounts,
    SessionPosition,
    SessionRecord,
    ThrottleCounter,
    ThrottleDecision,
    ThrottleRules,
    ThrottleSchedule,
)

__all__ = [
    "AccountChanges",
    "AccountRecord",
    "BudgetDecision",
    "CommandStore",
    "DuplicateEmailError",
    "DuplicateKeyError",
    "ErasureCounts",
    "EventBatch",
    "HashBudget",
    "Housekeeping",
    "IdempotencyRecord",
    "IdentityStore",
    "MemoryIdentityStore",
    "NewEvent",
    "OutboxStore",
    "PendingEvent",
    "Pingable",
    "PostgresIdentityStore",
    "PurgeCounts",
    "SecretStore",
    "ServiceStore",
    "SessionPosition",
    "SessionReads",
    "SessionRecord",
    "StoreError",
    "ThrottleCounter",
    "ThrottleDecision",
    "ThrottleRules",
    "ThrottleSchedule",
    "TransientStoreError",
    "UnitOfWork",
    "migrate",
]
