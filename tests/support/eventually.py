"""Waiting in tests for a condition to hold, never for a duration.

A sleep that was long enough on a quiet machine is too short on a busy one, and too long
everywhere else. A test instead names what it waits for (a reply arrived, a backend waits on a
lock, a worker reports ready) and checks it until it holds; the timeout only bounds a failure.

    account = await eventually(lambda: find(bus.events, key), what="the account.created event")
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryError,
    Retrying,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

T = TypeVar("T")

TIMEOUT_S = 30.0
EVERY_S = 0.05

Described = str | Callable[[], str]


def _not_yet(result: object) -> bool:
    return not result


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = TIMEOUT_S,
    every: float = EVERY_S,
    what: Described = "the condition",
) -> T:
    """Call `check` (plain or async) until it returns something truthy, and return that.

    An exception from `check` ends the wait at once: it is a failure, not a "not yet". After
    `timeout` seconds the wait fails with an AssertionError naming `what` (a string, or a
    function called then, e.g. for a log tail) and the last result.
    """

    async def attempt() -> T:
        result = check()
        if inspect.isawaitable(result):
            return await result
        return result

    retrying = AsyncRetrying(
        stop=stop_after_delay(timeout), wait=wait_fixed(every), retry=retry_if_result(_not_yet)
    )
    try:
        return await retrying(attempt)
    except RetryError as error:
        raise AssertionError(_never(what, timeout, error)) from None


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout: float = TIMEOUT_S,
    every: float = EVERY_S,
    what: Described = "the condition",
) -> T:
    """`eventually` for code that is not async (it blocks the calling thread meanwhile)."""
    retrying = Retrying(
        stop=stop_after_delay(timeout), wait=wait_fixed(every), retry=retry_if_result(_not_yet)
    )
    try:
        return retrying(check)
    except RetryError as error:
        raise AssertionError(_never(what, timeout, error)) from None


def _never(what: Described, timeout: float, error: RetryError) -> str:
    described = what() if callable(what) else what
    last = error.last_attempt.result()
    return f"{described} did not hold within {timeout:g}s (last seen: {last!r})"
