"""Retiring the command queues of worker v1 (`identity.worker.password`, `identity.worker.fast`).

The v1 queues dead-lettered straight into `identity.dead`, raw bodies included, and queue
arguments cannot change once declared: v2 workers use new queues (worker.topology). During a
rolling upgrade, every v2 worker, for as long as it runs:

1. unbinds each v1 queue that exists from `identity.commands` (and `identity.unrouted`), so
   new commands go to the v2 queues only (a v1 worker that restarts declares and binds its
   queue again: it is unbound again at the next check);
2. consumes it with the same processor as the v2 queues, so nothing left in it is lost;
3. once it is empty and none of its deliveries is still being worked on, stops consuming it
   and deletes it if it is still empty and nobody else consumes it (a v1 worker still
   running keeps it alive until it stops; the deletion is tried again at the next check).

Quorum queues refuse `queue.delete` with `if-empty` or `if-unused` (RabbitMQ closes the whole
connection with NOT_IMPLEMENTED), so "empty and unused" is the counts of a passive declare
read just before the delete. Only the worker's own user may publish to a queue by name, and
the queue is unbound by then, so nothing can arrive in between but a v1 worker's requeue,
which needs a v1 consumer, which the counts rule out.

Every step is idempotent, so several v2 workers may do it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from messages.commands import COMMANDS
from messages.topology import COMMANDS_EXCHANGE, UNROUTED_EXCHANGE
from worker.topology import V1_QUEUES

log = logging.getLogger("identity.worker")

# Handles one delivery of a v1 queue as a delivery of the v2 queue named first.
Handle = Callable[[str, AbstractIncomingMessage], Awaitable[None]]

RETRY_S = 5.0
IDLE_S = 60.0
# The bounds of a stop's two steps here (worker.app counts them in its STOP_STEPS_S).
CANCEL_S = 5.0
CLOSE_S = 2.0
# What a step may meet: the broker refusing (the channel closes), or the connection down.
_STEP_FAULTS = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
    asyncio.TimeoutError,
)


class V1Retirement:
    """Unbinds, drains and deletes the v1 queues (see the module docstring)."""

    def __init__(
        self,
        connection: AbstractConnection,
        handle: Handle,
        *,
        prefetch: int,
        retry_s: float = RETRY_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self._connection = connection
        self._handle = handle
        self._prefetch = prefetch
        self._retry_s = retry_s
        self._idle_s = idle_s
        self._consuming: dict[str, tuple[AbstractChannel, AbstractQueue, str]] = {}
        self._stopped = False
        self._in_flight: dict[str, int] = dict.fromkeys(V1_QUEUES, 0)

    async def run(self) -> None:
        """Check every `retry_s` while a v1 queue exists, every `idle_s` once none does
        (a v1 worker started later declares its queue again)."""
        while True:
            left = False
            for name in V1_QUEUES:
                try:
                    left |= not await self._retire(name)
                except _STEP_FAULTS as exc:
                    left = True
                    log.warning(
                        "v1 queue not retired yet", extra={"queue": name, "error": repr(exc)}
                    )
            await asyncio.sleep(self._retry_s if left else self._idle_s)

    async def cancel(self) -> None:
        """Stop consuming the v1 queues (for a stop: deliveries under way may still be
        acked), and start no new consumer."""
        self._stopped = True
        await asyncio.gather(
            *(
                asyncio.wait_for(queue.cancel(tag), CANCEL_S)
                for _, queue, tag in self._consuming.values()
            ),
            return_exceptions=True,
        )

    async def close(self) -> None:
        """Close the consuming channels (what is unacked goes back to the v1 queues)."""
        consuming, self._consuming = self._consuming, {}
        await asyncio.gather(
            *(asyncio.wait_for(channel.close(), CLOSE_S) for channel, _, _ in consuming.values()),
            return_exceptions=True,
        )

    async def _retire(self, name: str) -> bool:
        """One step of retiring `name`; True once it no longer exists."""
        counts = await self._counts(name)
        if counts is None:
            return True
        await self._unbind(name)
        if self._stopped:
            return False
        if name not in self._consuming:
            await self._consume(name)
            log.info("draining v1 queue", extra={"queue": name, "messages": counts[0]})
            return False
        if counts[0] or self._in_flight[name]:
            return False
        # Closing the channel cancels our consumer; nothing of ours is unacked on it.
        channel, _, _ = self._consuming.pop(name)
        await channel.close()
        counts = await self._counts(name)
        if counts is None:
            return True  # another v2 worker deleted it
        if counts != (0, 0):
            return False  # a message came back, or a v1 worker consumes it: later
        async with self._channel() as channel:
            await channel.queue_delete(name)
        log.info("v1 queue deleted", extra={"queue": name})
        return True

    async def _counts(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of `name`, or None if it does not exist. A passive
        declare of a missing queue closes its channel: a channel of its own (this also keeps
        a robust channel from answering from its cache)."""
        async with self._channel() as channel:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return None
            result = queue.declaration_result
            if result is None:
                return 0, 0
            return int(result.message_count or 0), int(result.consumer_count or 0)

    async def _unbind(self, name: str) -> None:
        async with self._channel() as channel:
            queue = await channel.get_queue(name, ensure=False)
            # Unbinding what is not bound is no error; any command name may have been bound.
            for command in COMMANDS:
                await queue.unbind(COMMANDS_EXCHANGE, routing_key=command)
            await queue.unbind(UNROUTED_EXCHANGE, routing_key="")

    async def _consume(self, name: str) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        target = V1_QUEUES[name]

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._in_flight[name] += 1
            try:
                await self._handle(target, message)
            finally:
                self._in_flight[name] -= 1

        queue = await channel.get_queue(name, ensure=False)
        tag = await queue.consume(on_message)
        self._consuming[name] = (channel, queue, tag)

    @contextlib.asynccontextmanager
    async def _channel(self) -> AsyncIterator[AbstractChannel]:
        channel = await self._connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
