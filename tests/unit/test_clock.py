"""The clocks: the real one is UTC-aware, the fake one moves only when told."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.clock import Clock, FakeClock, SystemClock

START = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


def test_system_clock_returns_aware_utc_close_to_now() -> None:
    clock: Clock = SystemClock()
    before = datetime.now(UTC)
    moment = clock.now()
    assert moment.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= moment <= datetime.now(UTC)


def test_fake_clock_stands_still_until_advanced() -> None:
    clock = FakeClock(START)
    assert clock.now() == START
    assert clock.now() == START


def test_fake_clock_advances_by_seconds_and_timedelta_arguments() -> None:
    clock = FakeClock(START)
    clock.advance(30)
    clock.advance(minutes=2, hours=1)
    assert clock.now() == START + timedelta(hours=1, minutes=2, seconds=30)


def test_fake_clock_advance_with_no_arguments_keeps_the_time() -> None:
    clock = FakeClock(START)
    clock.advance()
    assert clock.now() == START


def test_fake_clock_refuses_to_run_backwards_but_can_be_set_back() -> None:
    clock = FakeClock(START)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    clock.set(START - timedelta(days=1))
    assert clock.now() == START - timedelta(days=1)


def test_fake_clock_converts_other_offsets_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    clock = FakeClock(datetime(2026, 11, 22, 10, 30, tzinfo=paris))
    assert clock.now() == START
    assert clock.now().tzinfo is UTC


def test_fake_clock_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2026, 11, 22))
    clock = FakeClock(START)
    with pytest.raises(ValueError, match="timezone-aware"):
        clock.set(datetime(2026, 11, 22))


def test_fake_clock_defaults_to_the_current_utc_time() -> None:
    moment = FakeClock().now()
    assert moment.tzinfo is UTC
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=5)
