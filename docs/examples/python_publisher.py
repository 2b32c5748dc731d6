"""Send `account.create` with plain aio-pika (no client library) and print the reply.

    python docs/examples/python_publisher.py amqp://guest:guest@localhost:5672/ [WORKER_USER]

Shows what every caller must do: consume the direct reply-to pseudo-queue in no-ack mode on
the publishing channel BEFORE publishing, publish persistent JSON with `reply_to`, a
`correlation_id` and `user_id` = your own broker user (the worker authorises by it), carry an
idempotency key (kept when retrying the same operation), declare nothing, and take a reply
only if its `user_id` is the worker's broker user.
"""

import asyncio
import json
import sys
import uuid

import aio_pika
from yarl import URL

REPLY_TO = "amq.rabbitmq.reply-to"


async def main(url: str, worker_user: str) -> None:
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
        # A passive declare: it only checks the worker's exchange exists.
        exchange = await channel.get_exchange("identity.commands", ensure=True)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=REPLY_TO,
                correlation_id=correlation_id,
                message_id=str(uuid.uuid4()),
                user_id=URL(url).user or "guest",  # RabbitMQ refuses any other value
            ),
            routing_key="account.create",
        )

        while True:
            reply = await asyncio.wait_for(replies.get(), timeout=10)
            # Anyone else's "reply" is a forgery: RabbitMQ vouches for user_id.
            if reply.correlation_id == correlation_id and reply.user_id == worker_user:
                print(json.dumps(json.loads(reply.body), indent=2))
                return


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
    asyncio.run(main(url, sys.argv[2] if len(sys.argv) > 2 else "guest"))
