"""Why the broker dead-lettered a message: its own latest `x-death` entry, nothing forgeable."""

from __future__ import annotations

from typing import Any

import pytest

from worker.forwarder import UNKNOWN_REASON, broker_reason


def _death(reason: str) -> dict[str, Any]:
    return {"count": 1, "reason": reason, "queue": "identity.worker.v2.password"}


@pytest.mark.parametrize("reason", ["delivery_limit", "expired", "rejected", "maxlen"])
def test_the_reason_is_the_first_x_death_entry(reason: str) -> None:
    assert broker_reason({"x-death": [_death(reason), _death("expired")]}) == reason


def test_a_forged_first_death_header_is_not_read() -> None:
    # The broker sets x-first-death-* only when no x-death was there: a publisher's stays.
    headers = {"x-death": [_death("rejected")], "x-first-death-reason": "expired"}
    assert broker_reason(headers) == "rejected"


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"x-death": "fake"}, {"x-death": []}, {"x-death": [{"reason": "made-up"}]}],
)
def test_anything_else_is_reported_as_dead_lettered(headers: dict[str, Any] | None) -> None:
    assert broker_reason(headers) == UNKNOWN_REASON
