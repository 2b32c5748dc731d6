"""Send `account.create` with plain aio-pika (no client library) and print the reply.

    python docs/examples/python_publisher.py amqp://guest:guest@localhost:5672/

Shows what every caller must do: consume the direct reply-to pseudo-queue in no-ack mode on
the publishing channel BEFORE publishing, publish persistent JSON with `reply_to` and a
`correlation_id`, set `user_id` to the broker user it connected as (the worker authorises
commands by it; RabbitMQ refuses any other), and carry an idempotency key (kept when retrying
the same operation).
"""

import asyncio
import json
import sys
import uuid
from urllib.parse import unquote, urlsplit

import aio_pika

REPLY_TO = "amq.rabbitmq.reply-to"


async def main(url: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
        await reply_queue.consume(replies.put, no_ack=True)

        body = {
            "idempotency_key": str(uuid.uuid4()),  # reuse it if you retry this very command
            "payload": {
                "email": "ada@example.com",
                "password": "correct horse battery",
                "display_name": "Ada",
            },
        }
        correlation_id = str(uuid.uuid4())
        exchange = await channel.get_exchange("identity.commands")
        await exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=REPLY_TO,
                correlation_id=correlation_id,
                message_id=str(uuid.uuid4()),
                user_id=unquote(urlsplit(url).username or "guest"),
            ),
            routing_key="account.create",
        )

        while True:
            reply = await asyncio.wait_for(replies.get(), timeout=10)
            if reply.correlation_id == correlation_id:
                print(json.dumps(json.loads(reply.body), indent=2))
                return


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"))
