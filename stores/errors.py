"""Errors raised by every store. Drivers' exceptions never cross this edge.

StoreError
├── DuplicateEmailError    another account already has this canonical email
├── DuplicateKeyError      an idempotency record with this key was committed first
└── TransientStoreError    the database could not answer now (connection lost,
                           serialization failure, deadlock, too many clients...);
                           the whole command may be retried
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every store error."""


class DuplicateEmailError(StoreError):
    """The canonical email is taken (unique constraint)."""


class DuplicateKeyError(StoreError):
    """Another transaction committed the same idempotency key first (unique constraint)."""


class TransientStoreError(StoreError):
    """A fault that may go away: retry with back-off."""
