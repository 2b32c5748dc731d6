"""The broker ceiling: the least a consumer can do with one command, in its own process.

It reads a persistent command from a quorum queue declared exactly like the worker's, publishes
a persistent reply of a similar size with publisher confirms, then acks: the worker's broker
work and nothing else (no decoding, no validation, no database). Same library (aio-pika), same
loop (uvloop), same prefetch as the worker's fast consumer.

    python bench/ceiling.py AMQP_URL ROUTING_KEY [PREFETCH]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from messages.topology import COMMANDS_EXCHANGE_ARGUMENTS
from worker.topology import worker_queue_arguments

QUEUE = "bench.ceiling"
REPLY = (
    b'{"ok":true,"command":"session.verify","idempotency_key":null,"result":{"session":'
    b'{"id":"ses_0000000000000000000000000000000","account_id":"acct_00000000000000000000000000",'
    b'"created_at":"2025-01-01T00:00:00+00:00","expires_at":"2025-01-02T00:00:00+00:00"},'
    b'"account":{"id":"acct_00000000000000000000000000","email":"someone@bench.example.com",'
    b'"display_name":"Bench User","created_at":"2025-01-01T00:00:00+00:00",'
    b'"updated_at":"2025-01-01T00:00:00+00:00","version":1}}}'
)


async def main(url: str, routing_key: str, prefetch: int) -> None:
    connection = await aio_pika.connect(url)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    publish = await connection.channel(publisher_confirms=True)
    exchange = await consume.declare_exchange(
        "identity.commands",
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments=dict(COMMANDS_EXCHANGE_ARGUMENTS),
    )
    dead = await consume.declare_exchange(
        "identity.dead", aio_pika.ExchangeType.FANOUT, durable=True
    )
    del dead  # only needed to exist: the queue names it as its dead-letter exchange
    queue = await consume.declare_queue(
        QUEUE, durable=True, arguments=worker_queue_arguments(delivery_limit=5)
    )
    await queue.bind(exchange, routing_key=routing_key)

    async def on_message(message: AbstractIncomingMessage) -> None:
        assert message.reply_to is not None
        reply = aio_pika.Message(
            REPLY,
            content_type="application/json",
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await publish.default_exchange.publish(reply, routing_key=message.reply_to, timeout=10)
        await message.ack()

    await queue.consume(on_message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await queue.unbind(exchange, routing_key=routing_key)
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()


if __name__ == "__main__":
    prefetch = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    uvloop.run(main(sys.argv[1], sys.argv[2], prefetch))
