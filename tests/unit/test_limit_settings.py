"""Settings of the limits (contract v2, section 5): the session cap per account."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings

DEV = {"IDENTITY_DEV_MODE": "true"}


def test_the_session_cap_defaults_to_one_hundred() -> None:
    assert load_settings(DEV).max_sessions_per_account == 100


def test_the_session_cap_is_read_from_its_variable() -> None:
    env = {**DEV, "IDENTITY_MAX_SESSIONS_PER_ACCOUNT": "5"}
    assert load_settings(env).max_sessions_per_account == 5


@pytest.mark.parametrize("value", ["0", "-3", "ten", "2.5"])
def test_a_session_cap_that_is_not_a_positive_integer_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match=r"IDENTITY_MAX_SESSIONS_PER_ACCOUNT"):
        load_settings({**DEV, "IDENTITY_MAX_SESSIONS_PER_ACCOUNT": value})
