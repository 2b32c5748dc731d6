"""A command's W3C trace context reaches its reply, its events and its courier messages, and
every event says who caused it (`actor`): the worker's pipeline in this process, on the
in-memory broker double and on RabbitMQ alike (the `broker` fixture), without an SDK."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from messages.courier import COURIER_KINDS
from messages.topology import COURIER_EXCHANGE
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.pipeline import Broker

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def _account() -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    return {
        "email": f"trace-{tag}@example.com",
        "password": f"Lantern-{uuid.uuid4().hex[:12]}-harbour",
        "display_name": "Ada",
    }


@pytest.fixture
async def courier_messages(broker: Broker) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Every courier message published while the test runs (a queue of the test's own,
    bound for every kind)."""
    received: list[AbstractIncomingMessage] = []
    connection = await broker.connect()
    channel = await connection.channel()
    exchange = await channel.get_exchange(COURIER_EXCHANGE)
    queue = await channel.declare_queue(f"test.courier.{uuid.uuid4().hex}", exclusive=True)
    for kind in COURIER_KINDS:
        await queue.bind(exchange, routing_key=kind)

    async def keep(message: AbstractIncomingMessage) -> None:
        received.append(message)

    await queue.consume(keep, no_ack=True)
    try:
        yield received
    finally:
        await connection.close()


async def test_the_trace_context_reaches_the_reply_the_events_and_the_courier(
    bus: Bus, courier_messages: list[AbstractIncomingMessage]
) -> None:
    key = uuid.uuid4().hex
    sent = {"traceparent": PARENT, "tracestate": STATE}
    correlation_id = await bus.publish(
        "account.create", {"idempotency_key": key, "payload": _account()}, headers=sent
    )
    reply = await bus.reply(correlation_id)
    assert reply["ok"] is True, reply
    account_id = reply["result"]["account"]["id"]

    assert bus.reply_headers[correlation_id] == sent
    (created,) = await eventually(lambda: bus.events_caused_by(key), what="account.created")
    assert bus.event_headers[created["event_id"]] == sent
    (code,) = await eventually(
        lambda: [m for m in courier_messages if orjson.loads(m.body)["account_id"] == account_id],
        what="the verification code's courier message",
    )
    assert code.headers == sent


async def test_a_malformed_traceparent_is_ignored_and_the_command_runs(bus: Bus) -> None:
    key = uuid.uuid4().hex
    correlation_id = await bus.publish(
        "account.create",
        {"idempotency_key": key, "payload": _account()},
        headers={"traceparent": "00-not-a-trace-01", "tracestate": STATE},
    )
    reply = await bus.reply(correlation_id)
    assert reply["ok"] is True, reply
    assert "traceparent" not in bus.reply_headers[correlation_id]
    (created,) = await eventually(lambda: bus.events_caused_by(key), what="account.created")
    assert "traceparent" not in bus.event_headers[created["event_id"]]
    assert "tracestate" not in bus.event_headers[created["event_id"]]


async def test_a_command_without_trace_context_sends_none(bus: Bus) -> None:
    key = uuid.uuid4().hex
    reply = await bus.call("account.create", _account(), key=key)
    assert reply["ok"] is True, reply
    (created,) = await eventually(lambda: bus.events_caused_by(key), what="account.created")
    assert bus.event_headers[created["event_id"]] == {}


async def test_every_event_names_the_caller_that_caused_it(bus: Bus) -> None:
    key = uuid.uuid4().hex
    reply = await bus.call("account.create", _account(), key=key)
    assert reply["ok"] is True, reply
    (created,) = await eventually(lambda: bus.events_caused_by(key), what="account.created")
    assert created["actor"] == {"caller": bus.user_id, "session_id": None}


async def test_headers_of_another_kind_leave_the_reply_without_trace(bus: Bus) -> None:
    correlation_id = await bus.publish(
        "account.get",
        {"payload": {"account_id": "acct_" + "0" * 26}},
        headers={"traceparent": 42, "x-other": "kept out"},
    )
    reply = await bus.reply(correlation_id)
    assert reply["ok"] is False
    assert bus.reply_headers[correlation_id] == {}
