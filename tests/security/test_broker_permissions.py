"""What the shipped permissions refuse a neighbour holding a caller's, a subscriber's or the mail
sender's credentials (issue 13, findings 2, 3 and 8): every refusal is the broker's own."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from messages.topology import (
    COMMANDS_EXCHANGE,
    COMMANDS_EXCHANGE_ARGUMENTS,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    UNROUTED_EXCHANGE,
)
from tests.support.deployment import Deployment
from tests.support.security import Caller, Connector, Observer
from tests.support.vhosts import rabbitmqctl
from tests.support.workers import WorkerProcess
from worker.topology import BROKER_DEAD_EXCHANGE, BROKER_DEAD_QUEUE, FAST_QUEUE, PASSWORD_QUEUE

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("worker")]

REFUSED = aiormq.exceptions.ChannelAccessRefused
Attempt = Callable[[AbstractChannel], Awaitable[Any]]


async def _refused(connection: AbstractRobustConnection, attempt: Attempt) -> None:
    """`attempt` on a channel of its own (a refusal closes the channel) is refused (403)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        with pytest.raises(REFUSED):
            await attempt(channel)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def _publish(channel: AbstractChannel, exchange: str, routing_key: str = "x") -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(aio_pika.Message(b"{}", content_type="application/json"), routing_key)


@pytest.mark.parametrize("shipped", ["web-gateway", "admin-tool", "account-events"])
async def test_nobody_but_the_worker_can_bind_a_queue_to_identity_commands(
    connect: Connector, deployment: Deployment, shipped: str
) -> None:
    # Finding 2: a neighbour bound its own queue to identity.commands and read every command
    # (passwords of session.start, tokens of session.verify, reply_to and correlation ids).
    connection = await connect(shipped)
    spy = f"{deployment.user(shipped)}.spy"
    channel = await connection.channel()
    await channel.declare_queue(spy, exclusive=True)  # its own queue: allowed

    async def bind(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(spy, ensure=False)
        await queue.bind(COMMANDS_EXCHANGE, routing_key="session.start")

    async def bind_unrouted(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(spy, ensure=False)
        await queue.bind(UNROUTED_EXCHANGE, routing_key="")

    await _refused(connection, bind)
    await _refused(connection, bind_unrouted)


@pytest.mark.parametrize("queue", [PASSWORD_QUEUE, FAST_QUEUE, BROKER_DEAD_QUEUE, DEAD_QUEUE])
async def test_a_caller_cannot_read_or_purge_the_services_queues(
    connect: Connector, queue: str
) -> None:
    connection = await connect("web-gateway")

    async def consume(channel: AbstractChannel) -> None:
        declared = await channel.get_queue(queue, ensure=False)
        await declared.consume(_ack)

    async def get(channel: AbstractChannel) -> None:
        declared = await channel.get_queue(queue, ensure=False)
        await declared.get(fail=False)

    async def purge(channel: AbstractChannel) -> None:
        declared = await channel.get_queue(queue, ensure=False)
        await declared.purge()

    for attempt in (consume, get, purge):
        await _refused(connection, attempt)


@pytest.mark.parametrize(
    "exchange", [COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_EXCHANGE, UNROUTED_EXCHANGE]
)
async def test_a_caller_cannot_delete_or_declare_the_identity_exchanges(
    connect: Connector, worker: WorkerProcess, exchange: str
) -> None:
    # Finding 3: the client declared identity.commands, so callers held configure on it, and
    # with it one deleted identity.commands (restricted callers could not declare it again).
    connection = await connect("web-gateway")

    async def delete(channel: AbstractChannel) -> None:
        await channel.exchange_delete(exchange)

    async def declare(channel: AbstractChannel) -> None:
        arguments: dict[str, Any] = (
            dict(COMMANDS_EXCHANGE_ARGUMENTS) if exchange == COMMANDS_EXCHANGE else {}
        )
        kind = {COMMANDS_EXCHANGE: "direct", EVENTS_EXCHANGE: "topic"}.get(exchange, "fanout")
        await channel.declare_exchange(exchange, kind, durable=True, arguments=arguments)

    await _refused(connection, delete)
    await _refused(connection, declare)
    checking = await connection.channel()
    await checking.get_exchange(exchange, ensure=True)  # still there
    assert worker.readiness() == 200


async def test_a_caller_cannot_declare_anything_in_the_identity_namespace(
    connect: Connector,
) -> None:
    connection = await connect("web-gateway")

    async def queue(channel: AbstractChannel) -> None:
        await channel.declare_queue("identity.worker.v3.fast", durable=True)

    async def exchange(channel: AbstractChannel) -> None:
        await channel.declare_exchange("identity.courier", "direct", durable=True)

    await _refused(connection, queue)
    await _refused(connection, exchange)


@pytest.mark.parametrize("shipped", ["web-gateway", "admin-tool", "account-events"])
@pytest.mark.parametrize(
    "exchange", [EVENTS_EXCHANGE, DEAD_EXCHANGE, UNROUTED_EXCHANGE, BROKER_DEAD_EXCHANGE, ""]
)
async def test_nobody_but_the_worker_can_publish_events_dead_letters_or_by_queue_name(
    connect: Connector, shipped: str, exchange: str
) -> None:
    # Finding 8: a forged session.ended reached a subscriber. The default exchange ("") is
    # how one puts a message into any queue by name: a forged reply, say.
    connection = await connect(shipped)

    async def publish(channel: AbstractChannel) -> None:
        await _publish(channel, exchange, "session.ended")

    await _refused(connection, publish)


async def test_the_subscriber_cannot_send_commands(connect: Connector) -> None:
    connection = await connect("account-events")

    async def publish(channel: AbstractChannel) -> None:
        await _publish(channel, COMMANDS_EXCHANGE, "account.get")

    await _refused(connection, publish)


async def test_a_caller_cannot_read_another_callers_reply_queue(
    connect: Connector, deployment: Deployment
) -> None:
    web = await Caller.open(
        await connect("web-gateway"), deployment.user("web-gateway"), named=True
    )
    other = await connect("admin-tool")

    async def consume(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(web.reply_queue, ensure=False)
        await queue.consume(_ack)

    async def get(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(web.reply_queue, ensure=False)
        await queue.get(fail=False)

    await _refused(other, consume)
    await _refused(other, get)


async def test_the_mail_sender_cannot_copy_messages_into_a_queue_it_reads(
    connect: Connector, observer: Observer
) -> None:
    # With any write permission, the mail sender could bind identity.dead (a queue it may
    # write) to the courier exchange (it may read) and copy every code there.
    connection = await connect("mail-sender")

    async def bind(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(DEAD_QUEUE, ensure=False)
        await queue.bind(EVENTS_EXCHANGE, routing_key="#")

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue("mail-sender.copy")

    await _refused(connection, bind)
    await _refused(connection, declare)


async def test_no_user_may_publish_in_anothers_name(
    connect: Connector, deployment: Deployment
) -> None:
    # The worker trusts the user_id property because RabbitMQ checks it against the login.
    connection = await connect("web-gateway")
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
    message = aio_pika.Message(b"{}", user_id=deployment.user("admin-tool"))
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await exchange.publish(message, routing_key="account.get")


def test_no_user_of_the_deployment_has_a_tag(deployment: Deployment) -> None:
    # The impersonator tag would let a user publish any user_id (and so pass the policy as
    # anyone); administrator would let it grant itself permissions.
    listed = json.loads(rabbitmqctl("list_users", "--formatter", "json"))
    ours = {user["user"]: user["tags"] for user in listed if user["user"] in _names(deployment)}
    assert set(ours) == _names(deployment)
    assert all(tags == [] for tags in ours.values()), ours


def _names(deployment: Deployment) -> set[str]:
    return {name for name, _ in deployment.users.values()}
