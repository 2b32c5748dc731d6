"""The declared topology on a real RabbitMQ: queue types, limits, bindings, dead-lettering."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from messages.commands import COMMANDS
from messages.topology import DEAD_QUEUE
from tests.support.eventually import eventually
from tests.support.vhosts import rabbitmqctl
from worker.topology import (
    BROKER_DEAD_EXCHANGE,
    BROKER_DEAD_QUEUE,
    FAST_QUEUE,
    PASSWORD_QUEUE,
    Topology,
    declare_topology,
    delivery_count,
    queue_for,
)

pytestmark = pytest.mark.integration

LIMIT = 3


@pytest.fixture
async def channel(private_amqp_url: str) -> AsyncIterator[AbstractChannel]:
    # A vhost of its own: the session's worker consumes from (and declares with its own
    # delivery limit) the queues of the session vhost.
    connection = await aio_pika.connect(private_amqp_url)
    async with connection:
        # Raising on a returned message makes every mandatory publish below an assertion that
        # the message was routed somewhere.
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)


@pytest.fixture
async def topology(channel: AbstractChannel) -> Topology:
    declared = await declare_topology(channel, delivery_limit=LIMIT)
    for queue in (
        declared.password_queue,
        declared.fast_queue,
        declared.dead_queue,
        declared.broker_dead_queue,
    ):
        await queue.purge()
    return declared


async def _get(queue: AbstractQueue) -> AbstractIncomingMessage:
    # A quorum queue can take a moment to make a confirmed message visible to basic.get.
    message = await eventually(
        lambda: queue.get(fail=False), timeout=10, what=f"a message on {queue.name}"
    )
    assert message is not None
    return message


def _queues_listed(vhost: str) -> dict[str, dict[str, Any]]:
    listing = rabbitmqctl(
        "list_queues", "-p", vhost, "name", "type", "durable", "arguments", "--formatter", "json"
    )
    queues = {}
    for row in json.loads(listing):
        # rabbitmqctl lists arguments as [name, amqp type, value] triples.
        row["arguments"] = {name: value for name, _type, value in row["arguments"]}
        queues[row["name"]] = row
    return queues


async def test_worker_queues_are_durable_quorum_queues_with_the_delivery_limit(
    topology: Topology, private_amqp_vhost: str
) -> None:
    queues = _queues_listed(private_amqp_vhost)

    for name in (PASSWORD_QUEUE, FAST_QUEUE):
        assert queues[name]["type"] == "quorum"
        assert queues[name]["durable"] is True
        arguments = queues[name]["arguments"]
        assert arguments["x-delivery-limit"] == LIMIT
        # Raw bodies go where only the worker reads, never to identity.dead.
        assert arguments["x-dead-letter-exchange"] == BROKER_DEAD_EXCHANGE
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
        assert arguments["x-overflow"] == "reject-publish"
    assert queues[DEAD_QUEUE]["durable"] is True
    assert "x-delivery-limit" not in queues[DEAD_QUEUE]["arguments"]
    assert queues[BROKER_DEAD_QUEUE]["type"] == "quorum"
    assert "x-dead-letter-exchange" not in queues[BROKER_DEAD_QUEUE]["arguments"]


async def test_nobody_may_publish_to_the_internal_dead_letter_exchange(
    channel: AbstractChannel, topology: Topology
) -> None:
    # Only the broker's own dead-lettering feeds it, so x-death[0] there is the broker's.
    exchange = await channel.get_exchange(BROKER_DEAD_EXCHANGE, ensure=False)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="")


async def test_declaring_twice_is_harmless(topology: Topology, channel: AbstractChannel) -> None:
    again = await declare_topology(channel, delivery_limit=LIMIT)

    assert again.fast_queue.name == topology.fast_queue.name


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_each_command_reaches_its_own_queue_only(topology: Topology, command: str) -> None:
    queues = {PASSWORD_QUEUE: topology.password_queue, FAST_QUEUE: topology.fast_queue}

    await topology.commands_exchange.publish(
        aio_pika.Message(b"{}", message_id=command), routing_key=command, mandatory=True
    )

    received = await _get(queues[queue_for(command)])
    await received.ack()
    assert received.message_id == command
    other = next(queue for name, queue in queues.items() if name != queue_for(command))
    assert await other.get(fail=False) is None


async def test_password_work_goes_to_the_password_queue() -> None:
    assert queue_for("session.start") == PASSWORD_QUEUE
    assert queue_for("account.create") == PASSWORD_QUEUE
    assert queue_for("session.verify") == FAST_QUEUE
    assert queue_for("account.get") == FAST_QUEUE


async def test_an_unknown_command_name_goes_to_the_fast_queue(topology: Topology) -> None:
    # Through the alternate exchange: the worker answers it `unknown_command`.
    await topology.commands_exchange.publish(
        aio_pika.Message(b"{}", message_id="unknown"), routing_key="account.erase", mandatory=True
    )
    message = await _get(topology.fast_queue)
    assert message.routing_key == "account.erase"
    assert message.message_id == "unknown"
    await message.ack()


async def test_the_queue_counts_returns_and_dead_letters_past_its_limit(
    topology: Topology,
) -> None:
    await topology.commands_exchange.publish(
        aio_pika.Message(b'{"n": 1}'), routing_key="session.verify", mandatory=True
    )

    counts = []
    for _ in range(LIMIT + 1):
        message = await _get(topology.fast_queue)
        counts.append(delivery_count(message.headers, redelivered=True))
        await message.nack(requeue=True)

    assert counts == list(range(LIMIT + 1))
    dead = await _get(topology.broker_dead_queue)
    await dead.ack()
    assert dead.body == b'{"n": 1}'
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
    assert await topology.fast_queue.get(fail=False) is None
    assert await topology.dead_queue.get(fail=False) is None  # nothing raw reaches it


async def test_an_expired_command_is_dead_lettered_where_only_the_worker_reads(
    topology: Topology,
) -> None:
    await topology.commands_exchange.publish(
        aio_pika.Message(b'{"password": "x"}', expiration=0.05),
        routing_key="session.start",
        mandatory=True,
    )

    dead = await _get(topology.broker_dead_queue)
    await dead.ack()
    assert dead.headers["x-death"][0]["reason"] == "expired"
    assert await topology.dead_queue.get(fail=False) is None


async def test_anything_published_to_the_dead_exchange_lands_in_the_dead_queue(
    topology: Topology,
) -> None:
    await topology.dead_exchange.publish(
        aio_pika.Message(b'{"reason": "test"}'), routing_key="whatever", mandatory=True
    )

    dead = await _get(topology.dead_queue)
    await dead.ack()
    assert dead.body == b'{"reason": "test"}'
