"""Time as a dependency: the service asks a `Clock` instead of calling `datetime.now()`.

Session lifetimes, idle timeouts and idempotency retention are all decisions about time;
passing the clock in lets tests move it forward instead of sleeping. `FakeClock` ships in the
package (not under tests/) so the composition root and every test build the service the same
way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


class Clock(Protocol):
    """A source of the current time, always timezone-aware UTC."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    # A naive datetime has no meaning we could trust; refuse it rather than guess local time.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the moment must be timezone-aware")
    return moment.astimezone(UTC)


class FakeClock:
    """A clock that stands still until told to move; for tests and simulations."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = _as_utc(start) if start is not None else datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float = 0, **timedelta_kwargs: Any) -> datetime:
        """Move forward by `seconds` plus any `timedelta` arguments; returns the new time."""
        step = timedelta(seconds=seconds, **timedelta_kwargs)
        if step < timedelta(0):
            raise ValueError("a clock only moves forward; use set() to go back")
        self._now += step
        return self._now

    def set(self, moment: datetime) -> None:
        """Jump to `moment` (forwards or backwards, e.g. to test clock skew)."""
        self._now = _as_utc(moment)

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"
