"""`x-delivery-count` is believed only on a redelivery: a publisher can write the header."""

from __future__ import annotations

import pytest

from worker.topology import delivery_count


def test_a_first_delivery_has_no_earlier_failures_whatever_the_header_says() -> None:
    assert delivery_count({"x-delivery-count": 99}, redelivered=False) == 0


def test_a_redelivery_reads_the_brokers_count() -> None:
    assert delivery_count({"x-delivery-count": 3}, redelivered=True) == 3


@pytest.mark.parametrize("value", [None, True, -1, "4", 2.5])
def test_a_missing_or_odd_count_is_none(value: object) -> None:
    headers = {} if value is None else {"x-delivery-count": value}
    assert delivery_count(headers, redelivered=True) == 0
