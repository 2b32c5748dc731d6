"""Upgrading from v1's worker queues: what a v1 worker left in them is answered, and they go.

The v1 queues dead-lettered raw bodies into `identity.dead`; their arguments cannot change,
so v2 workers use new queues and retire the old ones (worker.upgrade).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from messages.commands import COMMANDS
from messages.topology import (
    COMMANDS_EXCHANGE,
    COMMANDS_EXCHANGE_ARGUMENTS,
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    UNROUTED_EXCHANGE,
)
from tests.integration.conftest import Isolated
from tests.support.eventually import eventually
from tests.support.vhosts import rabbitmqctl
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

pytestmark = pytest.mark.integration

V1_PASSWORD, V1_FAST = "identity.worker.password", "identity.worker.fast"
# What worker v1 declared its queues with.
V1_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 5,
    "x-dead-letter-exchange": DEAD_EXCHANGE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


async def _declare_v1_topology(amqp_url: str) -> None:
    """The exchanges and queues as a v1 worker declared and bound them."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        unrouted = await channel.declare_exchange(UNROUTED_EXCHANGE, "fanout", durable=True)
        commands = await channel.declare_exchange(
            COMMANDS_EXCHANGE,
            "direct",
            durable=True,
            arguments=dict(COMMANDS_EXCHANGE_ARGUMENTS),
        )
        await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        await channel.declare_exchange(DEAD_EXCHANGE, "fanout", durable=True)
        for name in (V1_PASSWORD, V1_FAST):
            queue = await channel.declare_queue(name, durable=True, arguments=V1_ARGUMENTS)
            for command, spec in COMMANDS.items():
                if spec.password_work == (name == V1_PASSWORD):
                    await queue.bind(commands, routing_key=command)
        fast = await channel.get_queue(V1_FAST)
        await fast.bind(unrouted, routing_key="")


def _queues(vhost: str) -> dict[str, int]:
    listing = rabbitmqctl("list_queues", "-p", vhost, "name", "messages", "--formatter", "json")
    return {row["name"]: int(row["messages"]) for row in json.loads(listing)}


def _bindings(vhost: str) -> set[tuple[str, str, str]]:
    listing = rabbitmqctl(
        "list_bindings",
        "-p",
        vhost,
        "source_name",
        "destination_name",
        "routing_key",
        "--formatter",
        "json",
    )
    return {
        (b["source_name"], b["destination_name"], b["routing_key"]) for b in json.loads(listing)
    }


async def test_commands_left_in_v1_queues_are_answered_and_the_v1_queues_deleted(
    isolated: Isolated,
) -> None:
    await _declare_v1_topology(isolated.amqp_url)
    bus = await isolated.bus()
    email = f"upgrade-{uuid.uuid4().hex[:8]}@example.com"
    created = await bus.command(
        "account.create",
        {"email": email, "password": "correct horse battery staple", "display_name": "Up"},
        key=uuid.uuid4().hex,
    )
    unknown = await bus.command("account.nothing", {}, key=uuid.uuid4().hex)
    await eventually(
        lambda: asyncio.to_thread(lambda: _queues(isolated.vhost).get(V1_PASSWORD) == 1),
        timeout=10,
        what="the command waiting in the v1 password queue",
    )

    worker = isolated.start()

    assert (await bus.reply(created))["ok"] is True
    assert (await bus.reply(unknown))["error"]["code"] == "unknown_command"

    def retired() -> bool:
        queues = _queues(isolated.vhost)
        return V1_PASSWORD not in queues and V1_FAST not in queues

    await eventually(
        lambda: asyncio.to_thread(retired),
        timeout=30,
        what=lambda: f"v1 gone:\n{worker.log_tail()}",
    )
    bindings = _bindings(isolated.vhost)
    assert not {b for b in bindings if b[1] in (V1_PASSWORD, V1_FAST)}
    assert (COMMANDS_EXCHANGE, PASSWORD_QUEUE, "account.create") in bindings
    assert (UNROUTED_EXCHANGE, FAST_QUEUE, "") in bindings
    # And what comes now reaches the v2 queues.
    reply = await bus.call("account.get", {"account_id": "acct_" + "0" * 26})
    assert reply["error"]["code"] == "not_found"
    deleted = worker.log_entries("v1 queue deleted")
    assert {entry["queue"] for entry in deleted} == {V1_PASSWORD, V1_FAST}


async def test_a_v1_queue_still_consumed_is_unbound_and_kept_until_its_consumer_goes(
    isolated: Isolated,
) -> None:
    await _declare_v1_topology(isolated.amqp_url)
    async with await aio_pika.connect(isolated.amqp_url) as v1_worker:
        channel = await v1_worker.channel()
        queue = await channel.get_queue(V1_FAST)

        async def v1_handler(message: AbstractIncomingMessage) -> None:
            await message.ack()

        tag = await queue.consume(v1_handler)
        worker = isolated.start()

        def unbound() -> bool:
            # The default exchange's implicit binding (source "") stays with every queue.
            return not {b for b in _bindings(isolated.vhost) if b[1] == V1_FAST and b[0]}

        await eventually(
            lambda: asyncio.to_thread(unbound),
            timeout=30,
            what=lambda: f"v1 fast unbound:\n{worker.log_tail()}",
        )
        assert V1_FAST in _queues(isolated.vhost)  # a consumer still uses it

        await queue.cancel(tag)

    await eventually(
        lambda: asyncio.to_thread(lambda: V1_FAST not in _queues(isolated.vhost)),
        timeout=30,
        what="v1 fast deleted once its consumer left",
    )
