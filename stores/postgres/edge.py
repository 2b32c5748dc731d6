"""The edge of the PostgreSQL store: asyncpg's exceptions become store errors here, and each
operation is timed here, so nothing above the store sees a driver type. Inside a recorded
span (an SDK tracer provider is installed, see worker.tracing) each operation outside a
transaction is a database span too, named after the operation, and each transaction is one
span ("db transaction") listing its operations (`identity.db.operations`): never a
statement's parameters. One span per transaction rather than per statement: a recorded span
costs tens of µs of CPU, and a unit of work runs half a dozen statements.

    asyncpg.UniqueViolationError on accounts_email_canonical_key  -> DuplicateEmailError
    asyncpg.UniqueViolationError on idempotency_pkey              -> DuplicateKeyError
    connection lost or refused or left in a broken state, server
    shutting down, database not accepting connections, out of
    resources (disk, memory, connections), statement cancelled or
    timed out, serialization failure, deadlock, timeout,
    a write refused by a server that is read-only (a standby, a
    primary demoted under a connection: the store then expires
    the pool's connections, so the retry connects again and the
    URL's target_session_attrs finds the writable host)           -> TransientStoreError
    any other driver error (other constraints, bad input)         -> StoreError
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar, Token
from time import perf_counter
from types import TracebackType

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

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
    # SQLSTATE class 53: disk full, out of memory, too many connections, a configured limit.
    # The server is short of something an operator or time gives back.
    asyncpg.InsufficientResourcesError,
    # statement_timeout, or pg_cancel_backend: the statement did not fail, it was stopped.
    asyncpg.QueryCanceledError,
    asyncpg.IdleSessionTimeoutError,
    # SQLSTATE 55000 class: how the server refuses a new connection to a database that is
    # closed to connections for a while (ALTER DATABASE ... ALLOW_CONNECTIONS false during
    # maintenance); also a lock not available (55P03). An outage, not a bug: retry.
    asyncpg.ObjectNotInPrerequisiteStateError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InterfaceError,
    # Raised when the server hangs up mid-statement (MagicStack/asyncpg#1069); the pool
    # replaces the connection, so a retry runs on a fresh one.
    asyncpg.InternalClientError,
    asyncio.TimeoutError,
    OSError,
)


def store_error(exc: BaseException) -> StoreError | None:
    """The store error a driver exception stands for; None for anything else."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        if exc.constraint_name == EMAIL_CONSTRAINT:
            return DuplicateEmailError("the canonical email is taken")
        if exc.constraint_name == IDEMPOTENCY_CONSTRAINT:
            return DuplicateKeyError("the idempotency key was committed first")
        return StoreError(f"unique constraint {exc.constraint_name} violated")
    if isinstance(exc, asyncpg.InterfaceError):
        # asyncpg's client-side DataError (a value it cannot encode) is an InterfaceError
        # too, but retrying cannot fix it.
        if isinstance(exc, ValueError):
            return StoreError(f"invalid value: {exc}")
        return TransientStoreError(f"database interface error: {exc}")
    if isinstance(exc, _TRANSIENT):
        return TransientStoreError(f"database unavailable: {exc!r}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"database error {exc.sqlstate}: {exc}")
    return None


class Instrument:
    """Times and translates one store operation: `with instrument("get_account"): ...`.

    A plain class rather than a generator-based context manager: it wraps every query, and
    this form costs a fraction of the two nested `@contextmanager`s it replaces.
    """

    __slots__ = ("_observe", "_on_read_only")

    def __init__(
        self, observe: Observe | None, *, on_read_only: Callable[[], None] | None = None
    ) -> None:
        self._observe = observe
        # Told when the server refused a write as read-only: the pool reaches a server that
        # is no longer the primary (see PostgresIdentityStore).
        self._on_read_only = on_read_only

    def __call__(self, operation: str) -> _Timed:
        return _Timed(self._observe, operation, self._on_read_only)


_tracer = trace.get_tracer("identity.store")
_DB_ATTRIBUTES = {"db.system.name": "postgresql"}
_TRANSACTION_ATTRIBUTES = {**_DB_ATTRIBUTES, "db.operation.name": "transaction"}
# The operations of the recorded transaction span the current task is in, if any.
_OPERATIONS: ContextVar[list[str] | None] = ContextVar("identity_db_operations", default=None)


def _in_recorded_span() -> bool:
    # Without an SDK nothing is recorded: one isinstance, no span (see worker.tracing).
    return (
        not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        and trace.get_current_span().is_recording()
    )


class TransactionSpan:
    """One span for a transaction, within a recorded span: the operations inside it make
    none of their own, and are listed on it instead."""

    __slots__ = ("_operations", "_span", "_token")

    def __init__(self) -> None:
        self._span: Span | None = None
        self._operations: list[str] = []
        self._token: Token[list[str] | None] | None = None

    def __enter__(self) -> None:
        if _in_recorded_span() and _OPERATIONS.get() is None:
            self._span = _tracer.start_span(
                "db transaction", kind=SpanKind.CLIENT, attributes=_TRANSACTION_ATTRIBUTES
            )
            self._token = _OPERATIONS.set(self._operations)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        if self._token is not None:
            _OPERATIONS.reset(self._token)
        self._span.set_attribute("identity.db.operations", self._operations)
        if exc_type is not None:
            self._span.set_attribute("error.type", exc_type.__name__)
        self._span.end()


class _Timed:
    __slots__ = ("_observe", "_on_read_only", "_operation", "_span", "_started")

    def __init__(
        self,
        observe: Observe | None,
        operation: str,
        on_read_only: Callable[[], None] | None = None,
    ) -> None:
        self._observe = observe
        self._on_read_only = on_read_only
        self._operation = operation
        self._started = 0.0
        self._span: Span | None = None

    def __enter__(self) -> None:
        # A batched look-up's query ("batch.…") serves many commands at once: it is no one
        # command's child, and each command's own wait for it has its span already.
        if not self._operation.startswith("batch.") and _in_recorded_span():
            operations = _OPERATIONS.get()
            if operations is not None:  # inside a transaction: its span lists this one
                operations.append(self._operation)
            else:
                self._span = _tracer.start_span(
                    f"db {self._operation}",
                    kind=SpanKind.CLIENT,
                    attributes={**_DB_ATTRIBUTES, "db.operation.name": self._operation},
                )
        self._started = perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._observe is not None:
            self._observe(self._operation, perf_counter() - self._started)
        if self._span is not None:
            if exc is not None:
                self._span.set_attribute("error.type", type(exc).__name__)
            self._span.end()
        if exc is not None:
            if self._on_read_only is not None and isinstance(
                exc, asyncpg.ReadOnlySQLTransactionError
            ):
                self._on_read_only()
            error = store_error(exc)
            if error is not None:
                raise error from exc
