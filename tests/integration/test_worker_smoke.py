"""The worker end to end through the broker: a command in, its reply and its event out."""

from __future__ import annotations

import uuid

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from messages.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from tests.integration.scenarios import Person, key
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.workers import WorkerProcess


async def test_create_account_replies_and_announces_the_account(bus: Bus) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    payload = {"email": email, "password": "correct horse battery staple", "display_name": "Ada"}
    reply = await bus.call("account.create", payload, key="smoke-" + email)
    assert reply["ok"] is True
    account = reply["result"]["account"]
    assert account["email"] == email
    await bus.wait_for(
        lambda: any(
            e["data"]["account"]["id"] == account["id"] for e in bus.events_of("account.created")
        )
    )


async def test_replies_and_events_carry_the_contracts_amqp_properties(
    amqp_url: str, worker: WorkerProcess
) -> None:
    """Replies echo the request's correlation id (its message id when it has none) and are
    JSON; events are persistent, routed and identified by their type and event id."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # A reply queue in the caller's own namespace: the worker answers nowhere else.
        replies = await channel.declare_queue(f"guest.smoke-{uuid.uuid4().hex}", exclusive=True)
        events = await channel.declare_queue(exclusive=True)
        await events.bind(EVENTS_EXCHANGE, routing_key="account.created")
        commands = await channel.get_exchange(COMMANDS_EXCHANGE)
        person = Person.new("props")
        message_id = f"msg-{uuid.uuid4().hex}"
        body = {"idempotency_key": key("props"), "payload": person.create_payload()}
        await commands.publish(
            aio_pika.Message(
                orjson.dumps(body),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,  # and no correlation_id
                reply_to=replies.name,
                user_id="guest",  # the caller policy authorises by it
            ),
            routing_key="account.create",
        )

        reply = await _next(replies)
        assert reply.correlation_id == message_id
        assert reply.content_type == "application/json"
        assert reply.delivery_mode == aio_pika.DeliveryMode.PERSISTENT  # a named reply queue
        assert reply.user_id == "guest"  # the worker's broker user, vouched for by RabbitMQ
        account_id = orjson.loads(reply.body)["result"]["account"]["id"]

        while True:
            event = await _next(events)
            data = orjson.loads(event.body)
            if data["data"]["account"]["id"] == account_id:
                break
        assert event.routing_key == "account.created"
        assert event.type == "account.created"
        assert event.message_id == data["event_id"]
        assert event.content_type == "application/json"
        assert event.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert event.timestamp is not None
        assert event.user_id == "guest"


async def _next(queue: AbstractQueue) -> AbstractIncomingMessage:
    message = await eventually(
        lambda: queue.get(fail=False, no_ack=True), what=f"a message on {queue.name}"
    )
    assert message is not None
    return message
