"""Persistence: the IdentityStore port and its PostgreSQL and in-memory implementations.

This package never imports `services` or `worker`.
"""

from stores.base import EventBatch, IdentityStore, UnitOfWork
from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError
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
    "NewEvent",
    "PendingEvent",
    "PurgeCounts",
    "SessionRecord",
    "StoreError",
    "ThrottleDecision",
    "ThrottleSchedule",
    "TransientStoreError",
    "UnitOfWork",
]
