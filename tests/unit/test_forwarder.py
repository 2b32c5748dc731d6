"""Why the broker dead-lettered a message: its own latest `x-death` entry, nothing forgeable."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from services.clock import FakeClock
from worker.broker import DeadLetters
from worker.forwarder import UNKNOWN_REASON, DeadLetterForwarder, broker_reason
from worker.logs import REDACTED
from worker.metrics import create_metrics

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


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


class _Recording:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def get_underlay_channel(self) -> _Recording:
        return self

    async def basic_publish(self, body: bytes, **_: Any) -> None:
        self.published.append(body)


class _Acks:
    def __init__(self) -> None:
        self.acked: list[Any] = []

    async def ack(self, message: Any) -> None:
        self.acked.append(message)


async def test_a_rejected_courier_message_reaches_identity_dead_without_its_code() -> None:
    body = {
        "message_id": "cmsg_1",
        "kind": "recovery_code",
        "to": "ada@example.com",
        "account_id": "acct_" + "0" * 26,
        "display_name": "Ada",
        "code": "K7PQ2M9X",
    }
    message = SimpleNamespace(
        routing_key="recovery_code",
        message_id="cmsg_1",
        correlation_id=None,
        reply_to=None,
        content_type="application/json",
        headers={"x-death": [{**_death("rejected"), "queue": "identity.courier"}]},
        body=orjson.dumps(body),
        redelivered=False,
        user_id="identity-worker",
    )
    channel, acks = _Recording(), _Acks()
    dead = DeadLetters(channel, "identity.dead", create_metrics(), FakeClock(NOW))  # type: ignore[arg-type]
    forwarder = DeadLetterForwarder(
        dead,
        acks,  # type: ignore[arg-type]
        max_message_bytes=65536,
        worker_delivery_limit=4,
    )

    await forwarder.handle(message)  # type: ignore[arg-type]

    [record] = [orjson.loads(b) for b in channel.published]
    assert record["reason"] == "rejected"
    assert record["body"]["code"] == REDACTED
    assert record["redacted"] is True
    assert b"K7PQ2M9X" not in channel.published[0]
    assert acks.acked == [message]
