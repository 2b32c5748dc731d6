"""Print every account and session event, using the client library's `subscribe`.

    python docs/examples/python_subscriber.py amqp://guest:guest@localhost:5672/ [WORKER_USER]

`subscribe` declares the durable queue `guest.identity-events` (a subscriber's queues are
named after its broker user), binds it to the event types asked for, drops repeats by
`event_id` and events the worker's broker user did not publish, and acks each event only when
the loop moves on to the next one: if handling raises, the event stays unacked and is
delivered again.
"""

import asyncio
import sys

from client import subscribe


async def main(url: str, worker_user: str) -> None:
    events = subscribe(
        url, "account.*", "session.*", queue="guest.identity-events", worker_user=worker_user
    )
    async for event in events:
        # Handle idempotently, keyed by event.event_id: delivery is at least once.
        print(event.type, event.event_id, event.data.model_dump(mode="json"))


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
    asyncio.run(main(url, sys.argv[2] if len(sys.argv) > 2 else "guest"))
