"""Nothing raw reaches identity.dead (issue 13, findings 4 and 5), and a publisher cannot make
the worker dead-letter a healthy command by writing `x-delivery-count` itself (finding 11)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import pytest

from tests.support.bus import Bus
from tests.support.deployment import Deployment
from tests.support.pipeline import Broker, running_worker
from tests.support.security import Caller, Connector, Observer, WorkerControl
from worker.topology import BROKER_DEAD_QUEUE, PASSWORD_QUEUE

pytestmark = pytest.mark.security

# The queues' x-delivery-limit (IDENTITY_DELIVERY_LIMIT's default).
QUEUE_DELIVERY_LIMIT = 5


def _sign_in(secret: str) -> dict[str, Any]:
    return {"email": f"dead-{uuid.uuid4().hex[:8]}@example.com", "password": secret}


async def _wait_depth(observer: Observer, queue: str, at_least: int) -> None:
    async with asyncio.timeout(30):
        while (await observer.depth(queue))[0] < at_least:
            await asyncio.sleep(0.1)


def _assert_redacted(observer: Observer, letter: dict[str, Any], secret: str) -> None:
    assert letter["body"]["payload"]["password"] == "[redacted]"
    assert letter["redacted"] is True
    assert all(secret.encode() not in raw for raw in observer.raw_dead)


async def test_an_expired_command_reaches_identity_dead_redacted(
    worker_control: WorkerControl,
    connect: Connector,
    deployment: Deployment,
    observer: Observer,
) -> None:
    # Finding 5: a command whose AMQP expiration passed in the worker's queue landed in
    # identity.dead raw, password in clear.
    worker_control.stop()
    web = await Caller.open(await connect("web-gateway"), deployment.user("web-gateway"))
    secret = f"expired-{uuid.uuid4().hex}"
    try:
        sent = await web.command("session.start", _sign_in(secret), expiration=0.05)
        await _wait_depth(observer, BROKER_DEAD_QUEUE, 1)  # the broker dead-lettered it
    finally:
        worker_control.start()

    letter = await observer.wait_dead(lambda letter: letter["correlation_id"] == sent)

    assert letter["reason"] == "expired"
    assert letter["command"] == "session.start"
    assert letter["user_id"] == deployment.user("identity-worker")
    _assert_redacted(observer, letter, secret)
    assert web.replies.get(sent) is None  # nobody is answered for an expired command


async def test_a_command_past_the_queues_delivery_limit_reaches_identity_dead_redacted(
    worker_control: WorkerControl,
    connect: Connector,
    deployment: Deployment,
    observer: Observer,
) -> None:
    # Finding 4: the queue's delivery limit dead-lettered the original body, password in
    # clear, into identity.dead. Here a consumer (with the worker's credentials, as a worker
    # that crashes on each try would) hands the command back until the queue gives up on it.
    worker_control.stop()
    web = await Caller.open(await connect("web-gateway"), deployment.user("web-gateway"))
    secret = f"limit-{uuid.uuid4().hex}"
    crashing = await connect("identity-worker")
    try:
        channel = await crashing.channel()
        queue = await channel.get_queue(PASSWORD_QUEUE, ensure=False)
        sent = await web.command("session.start", _sign_in(secret))
        returns = 0
        async with asyncio.timeout(60):
            while returns <= QUEUE_DELIVERY_LIMIT:
                message = await queue.get(fail=False)
                if message is None or message.correlation_id != sent:
                    if message is not None:
                        await message.ack()  # another test's leftover
                    await asyncio.sleep(0.05)
                    continue
                await message.nack(requeue=True)
                returns += 1
        await _wait_depth(observer, BROKER_DEAD_QUEUE, 1)
    finally:
        worker_control.start()

    letter = await observer.wait_dead(lambda letter: letter["correlation_id"] == sent)

    assert letter["reason"] == "delivery_limit"
    assert letter["command"] == "session.start"
    assert letter["delivery_count"] == 0  # the publisher's header on a dead letter is not read
    _assert_redacted(observer, letter, secret)


async def test_a_forged_delivery_count_on_rabbitmq_does_not_dead_letter_a_command(
    connect: Connector, deployment: Deployment, observer: Observer
) -> None:
    web = await Caller.open(await connect("web-gateway"), deployment.user("web-gateway"))

    reply = await web.call(
        "session.verify",
        {"token": "v1.k1.ses_" + "0" * 32 + ".x"},
        headers={"x-delivery-count": 99},
    )

    assert reply["error"]["code"] == "invalid_token"  # run, not dead-lettered
    assert not [letter for letter in observer.dead if letter["reason"] == "delivery_limit"]


async def test_a_forged_delivery_count_on_a_first_delivery_is_not_believed() -> None:
    # Finding 11: a publisher set x-delivery-count itself and made the worker dead-letter a
    # healthy command (and fire the crash-loop alert). RabbitMQ 3.10 overwrites the header on
    # delivery from a quorum queue, later versions stop adding it to first deliveries and
    # pass the publisher's through: the in-memory broker does the latter, so the worker's own
    # check is what this proves.
    broker = Broker.in_memory()
    async with running_worker(broker):
        bus = await Bus.attach(await broker.connect())
        try:
            exchange = await bus.channel.get_exchange("identity.commands", ensure=False)
            correlation_id = uuid.uuid4().hex
            await exchange.publish(
                aio_pika.Message(
                    b'{"payload": {"account_id": "acct_' + b"0" * 26 + b'"}}',
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=bus.reply_queue,
                    user_id=bus.user,
                    headers={"x-delivery-count": 99},
                ),
                routing_key="account.get",
            )
            reply = await bus.reply(correlation_id)
        finally:
            await bus.close()

    assert reply["error"]["code"] == "not_found"  # run, not refused as a crash loop
    assert bus.dead == []
