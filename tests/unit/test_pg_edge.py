"""The PostgreSQL edge: which driver exception becomes which store error, and the timer that
wraps every store operation."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from stores.errors import DuplicateEmailError, DuplicateKeyError, StoreError, TransientStoreError
from stores.postgres.edge import EMAIL_CONSTRAINT, IDEMPOTENCY_CONSTRAINT, Instrument, store_error
from stores.postgres.store import _caused_by_a_key


def _unique(constraint: str) -> asyncpg.UniqueViolationError:
    exc = asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
    exc.constraint_name = constraint
    return exc


@pytest.mark.parametrize(
    ("driver_error", "expected"),
    [
        (_unique(EMAIL_CONSTRAINT), DuplicateEmailError),
        (_unique(IDEMPOTENCY_CONSTRAINT), DuplicateKeyError),
        (_unique("sessions_pkey"), StoreError),
        (asyncpg.ConnectionDoesNotExistError("gone"), TransientStoreError),
        (asyncpg.CannotConnectNowError("starting up"), TransientStoreError),
        (asyncpg.SerializationError("retry"), TransientStoreError),
        (asyncpg.TooManyConnectionsError("too many clients"), TransientStoreError),
        (asyncpg.DiskFullError("no space left on device"), TransientStoreError),
        (asyncpg.OutOfMemoryError("out of memory"), TransientStoreError),
        (asyncpg.QueryCanceledError("statement timeout"), TransientStoreError),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), TransientStoreError),
        (asyncpg.InterfaceError("connection is closed"), TransientStoreError),
        (asyncpg.DataError("cannot encode"), StoreError),  # client-side: retrying cannot help
        (TimeoutError(), TransientStoreError),
        (ConnectionRefusedError(), TransientStoreError),
        (asyncpg.UndefinedTableError("no such table"), StoreError),
    ],
)
def test_driver_errors_map_to_store_errors(
    driver_error: BaseException, expected: type[StoreError]
) -> None:
    error = store_error(driver_error)
    assert type(error) is expected


@pytest.mark.parametrize("other", [ValueError("a bug"), KeyError("x"), asyncio.CancelledError()])
def test_anything_else_is_left_alone(other: BaseException) -> None:
    assert store_error(other) is None


def test_the_instrument_times_and_translates_failures_keeping_the_cause() -> None:
    seen: list[tuple[str, float]] = []
    timed = Instrument(lambda operation, seconds: seen.append((operation, seconds)))
    driver_error = _unique(IDEMPOTENCY_CONSTRAINT)

    with pytest.raises(DuplicateKeyError) as raised, timed("uow.record_outcome"):
        raise driver_error

    assert raised.value.__cause__ is driver_error
    with timed("get_account"):
        pass
    assert [operation for operation, _ in seen] == ["uow.record_outcome", "get_account"]
    assert all(seconds >= 0 for _, seconds in seen)


def test_the_instrument_lets_other_exceptions_through_unchanged() -> None:
    timed = Instrument(None)
    with pytest.raises(KeyError), timed("get_account"):
        raise KeyError("not a driver error")


def _translated(driver_error: Exception) -> Exception:
    error = store_error(driver_error)
    assert error is not None
    error.__cause__ = driver_error
    return error


@pytest.mark.parametrize(
    ("driver_error", "a_key_is_at_fault"),
    [
        (asyncpg.CharacterNotInRepertoireError("invalid byte sequence"), True),
        (asyncpg.InvalidTextRepresentationError("invalid input syntax"), True),
        (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), True),
        (asyncpg.ConnectionDoesNotExistError("gone"), False),
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.UndefinedTableError("relation does not exist"), False),
    ],
)
def test_only_a_refused_value_sends_a_batch_back_key_by_key(
    driver_error: Exception, a_key_is_at_fault: bool
) -> None:
    assert _caused_by_a_key(_translated(driver_error)) is a_key_is_at_fault
    assert _caused_by_a_key(ZeroDivisionError()) is False
