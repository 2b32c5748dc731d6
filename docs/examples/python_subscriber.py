"""Print every account and session event, using the client library's `subscribe`.

    python docs/examples/python_subscriber.py amqp://guest:guest@localhost:5672/

`subscribe` declares the durable queue `example.identity-events`, binds it to the event types
asked for, drops repeats by `event_id`, and acks each event only when the loop moves on to the
next one: if handling raises, the event stays unacked and is delivered again.
"""

import asyncio
import sys

from client import subscribe


async def main(url: str) -> None:
    async for event in subscribe(url, "account.*", "session.*", queue="example.identity-events"):
        # Handle idempotently, keyed by event.event_id: delivery is at least once.
        print(event.type, event.event_id, event.data.model_dump(mode="json"))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"))
