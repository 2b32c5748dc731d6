"""The edge of the PostgreSQL store: asyncpg's exceptions become store errors here, and each
operation is timed here, so nothing above the store sees a driver type.

    asyncpg.UniqueViolationError on accounts_email_canonical_key  -> DuplicateEmailError
    asyncpg.UniqueViolationError on idempotency_pkey              -> DuplicateKeyError
    connection lost or refused or left in a broken state, server
    shutting down, too many clients, database not accepting
    connections, serialization failure, deadlock, timeout         -> TransientStoreError
    any other driver error (other constraints, bad input)         -> StoreError
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter

import asyncpg

from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError

Observe = Callable[[str, float], None]
"""Called with (operation name, seconds) after every store operation, failed ones included."""

EMAIL_CONSTRAINT = "accounts_email_canonical_key"
IDEMPOTENCY_CONSTRAINT = "idempotency_pkey"

_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # SQLSTATE 55000 class: how the server refuses a new connection to a database that is
    # closed to connections for a while (ALTER DATABASE ... ALLOW_CONNECTIONS false during
    # maintenance); also a lock not available (55P03). An outage, not a bug: retry.
    asyncpg.ObjectNotInPrerequisiteStateError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.InterfaceError,
    # Raised when the server hangs up mid-statement (MagicStack/asyncpg#1069); the pool
    # replaces the connection, so a retry runs on a fresh one.
    asyncpg.InternalClientError,
    asyncio.TimeoutError,
    OSError,
)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise driver exceptions from the block as store errors (`from` the original)."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == EMAIL_CONSTRAINT:
            raise DuplicateEmailError("the canonical email is taken") from exc
        if exc.constraint_name == IDEMPOTENCY_CONSTRAINT:
            raise DuplicateKeyError("the idempotency key was committed first") from exc
        raise StoreError(f"unique constraint {exc.constraint_name} violated") from exc
    except asyncpg.InterfaceError as exc:
        # asyncpg's client-side DataError (a value it cannot encode) is an InterfaceError
        # too, but retrying cannot fix it.
        if isinstance(exc, ValueError):
            raise StoreError(f"invalid value: {exc}") from exc
        raise TransientStoreError(f"database interface error: {exc}") from exc
    except _TRANSIENT as exc:
        raise TransientStoreError(f"database unavailable: {exc!r}") from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"database error {exc.sqlstate}: {exc}") from exc


class Instrument:
    """Times and translates one store operation: `with instrument("get_account"): ...`."""

    __slots__ = ("_observe",)

    def __init__(self, observe: Observe | None) -> None:
        self._observe = observe

    @contextmanager
    def __call__(self, operation: str) -> Iterator[None]:
        started = perf_counter()
        try:
            with translated():
                yield
        finally:
            if self._observe is not None:
                self._observe(operation, perf_counter() - started)
