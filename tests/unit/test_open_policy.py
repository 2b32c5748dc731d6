"""Without IDENTITY_CALLERS (development), the worker's pipeline on the in-memory broker:
anyone may send anything, and still no reply goes into the service's own queues."""

from __future__ import annotations

import uuid

import aio_pika
import orjson

from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.pipeline import Broker, running_worker


async def _publish(bus: Bus, command: str, body: bytes, reply_to: str) -> str:
    exchange = await bus.channel.get_exchange("identity.commands", ensure=False)
    correlation_id = uuid.uuid4().hex
    message = aio_pika.Message(
        body, content_type="application/json", correlation_id=correlation_id, reply_to=reply_to
    )
    await exchange.publish(message, routing_key=command)  # no user_id
    return correlation_id


async def test_the_open_policy_answers_anyone_but_never_into_the_services_queues() -> None:
    broker = Broker.in_memory()
    async with running_worker(broker, dev_mode=True, callers=None):
        bus = await Bus.attach(await broker.connect())
        try:
            answered = await _publish(
                bus,
                "account.get",
                orjson.dumps({"payload": {"account_id": "acct_" + "0" * 26}}),
                bus.reply_queue,
            )
            refused = await _publish(
                bus, "session.verify", b'{"payload": {"token": "v1.k.ses_x.y"}}', "identity.dead"
            )
            reply = await bus.reply(answered)
            dead = await eventually(
                lambda: [d for d in bus.dead if d["correlation_id"] == refused],
                what="the refused reply_to dead-lettered",
            )
        finally:
            await bus.close()

    assert reply["error"]["code"] == "not_found"
    assert dead[0]["reason"] == "reply_to_refused"
    assert dead[0]["reply_to"] == "identity.dead"
