"""Persistence: the IdentityStore port and its PostgreSQL and in-memory implementations.

This package never imports `services` or `worker`. Importing it opens no connection: a
PostgreSQL pool exists only once `PostgresIdentityStore.connect()` is awaited.
"""

from stores.base import EventBatch, IdentityStore, UnitOfWork
from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError
from stores.memory import MemoryIdentityStore
from stores.postgres import PostgresIdentityStore, migrate
from stores.records import (
    AccountChanges,
    AccountRecord,
    IdempotencyRecord,
    NewEvent,
    PendingEvent,
    PurgeCounts,
    SessionRecord,
    ThrottleDecision,
    ThrottleSchedule,
)

__all__ = [
    "AccountChanges",
    "AccountRecord",
    "DuplicateEmailError",
    "DuplicateKeyError",
    "EventBatch",
    "IdempotencyRecord",
    "IdentityStore",
    "MemoryIdentityStore",
    "NewEvent",
    "PendingEvent",
    "PostgresIdentityStore",
    "PurgeCounts",
    "SessionRecord",
    "StoreError",
    "ThrottleDecision",
    "ThrottleSchedule",
    "TransientStoreError",
    "UnitOfWork",
    "migrate",
]
