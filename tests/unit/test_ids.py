"""Identifiers: the contract's shapes, uniqueness, and creation-time order."""

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from services.ids import id_time, new_account_id, new_event_id, new_session_id

ACCOUNT = re.compile(r"acct_[0-9a-z]{26}")
EVENT = re.compile(r"evt_[0-9a-z]{26}")
SESSION = re.compile(r"ses_[0-9a-z]{32}")
MOMENT = datetime(2026, 11, 22, 9, 30, 15, 123000, tzinfo=UTC)


def test_ids_match_the_contract_patterns() -> None:
    for _ in range(200):
        assert ACCOUNT.fullmatch(new_account_id())
        assert EVENT.fullmatch(new_event_id())
        assert SESSION.fullmatch(new_session_id())


def test_ids_use_crockford_letters_only() -> None:
    body = "".join(new_session_id()[4:] + new_account_id()[5:] for _ in range(500))
    assert not set(body) & set("ilou")


def test_ids_are_unique() -> None:
    count = 5000
    assert len({new_account_id() for _ in range(count)}) == count
    assert len({new_event_id(MOMENT) for _ in range(count)}) == count
    assert len({new_session_id() for _ in range(count)}) == count


def test_account_ids_sort_by_creation_time() -> None:
    moments = [MOMENT + timedelta(milliseconds=ms) for ms in (0, 1, 2, 999, 60_000, 10**9)]
    ids = [new_account_id(moment) for moment in reversed(moments)]
    assert sorted(ids) == [ids[i] for i in reversed(range(len(ids)))]


def test_event_ids_made_in_the_same_millisecond_keep_their_order() -> None:
    ids = [new_event_id(MOMENT) for _ in range(1000)]
    assert ids == sorted(ids)


def test_ids_made_with_the_wall_clock_never_go_backwards() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert ids == sorted(ids)


def test_ids_carry_their_creation_time_to_the_millisecond() -> None:
    assert id_time(new_account_id(MOMENT)) == MOMENT
    assert id_time(new_event_id(MOMENT)) == MOMENT
    assert id_time(new_account_id(datetime(1970, 1, 1, tzinfo=UTC))) == datetime(
        1970, 1, 1, tzinfo=UTC
    )


def test_default_time_is_now() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    stamped = id_time(new_account_id())
    assert before <= stamped <= datetime.now(UTC)


def test_naive_or_out_of_range_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        new_account_id(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="48 bits"):
        new_event_id(datetime(1960, 1, 1, tzinfo=UTC))


def test_id_time_refuses_ids_without_a_time() -> None:
    with pytest.raises(ValueError, match="time-ordered"):
        id_time(new_session_id())
    with pytest.raises(ValueError, match="time-ordered"):
        id_time("acct_" + "z" * 26)


def test_ids_are_unique_and_ordered_across_threads() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_event_id(MOMENT) for _ in range(500))

    threads = [threading.Thread(target=make, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in results for i in out]
    assert len(set(every)) == len(every)
    assert all(out == sorted(out) for out in results)
