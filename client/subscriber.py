"""`subscribe`: the identity worker's domain events as an async iterator.

Delivery is at least once. The worker may publish an event more than once (always with the
same `event_id`), and RabbitMQ redelivers whatever was not acked when a consumer or its
connection dies. `subscribe` drops repeats of an `event_id` it has seen in this process
(a bounded window), but a restarted subscriber can still see an event again: make the
handling idempotent, keyed by `event_id`.
"""

from __future__ import annotations

import logging
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from brokers import connect_any
from messages import Event, parse_event
from messages.topology import EVENTS_EXCHANGE
from tls import TlsFiles, amqp_connect_kwargs

log = logging.getLogger(__name__)


class _SeenIds:
    """The last `size` event ids, least recently seen evicted first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


async def subscribe(
    amqp_url_or_connection: str | AbstractConnection,
    *event_types: str,
    queue: str,
    dedupe_window: int = 10000,
    prefetch: int = 100,
    worker_user: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
) -> AsyncIterator[Event]:
    """Yield the events whose type matches `event_types` (topic patterns such as
    `session.*`; all events when none is given) from the durable queue `queue`.

    A URL may name the nodes of one cluster, separated by commas (brokers.connect_any).

    The queue is the subscriber's own: a durable quorum queue, declared and bound here, that
    keeps events while the subscriber is away. Give each consuming service its own name;
    instances of one service that share a name share the work. With the shipped broker
    permissions a subscriber may declare only queues named after its broker user
    (`<user>.…`); `identity.events` itself is only checked (a passive declare).

    `worker_user` is the identity worker's broker user. Give it: an event is then yielded
    only if RabbitMQ vouches that the worker published it (its `user_id`); any other is a
    neighbour's forgery, acked, logged and dropped. Without it, every event that parses is
    yielded.

    Given a URL, `amqps://` verifies the broker's certificate and host name against
    `ca_file` (PEM) or the system's trust store, or with `ssl_context` as built (see
    `IdentityClient.connect`).

    Each event is acked only when the loop asks for the next one, i.e. after the loop body
    has finished with it. If the body raises (or the loop is left with `break`), that event
    stays unacked and is delivered again later: at least once, never silently lost. An event
    that does not parse is rejected (dead-lettered if the queue has a policy for it).
    """
    if dedupe_window < 1 or prefetch < 1:
        raise ValueError("dedupe_window and prefetch must be >= 1")
    owned = isinstance(amqp_url_or_connection, str)
    connection: AbstractConnection
    if isinstance(amqp_url_or_connection, str):
        url = amqp_url_or_connection
        tls = amqp_connect_kwargs(url, TlsFiles(ca_file=ca_file), context=ssl_context)
        connection = await connect_any(url, **tls)
    elif ssl_context is not None or ca_file is not None:
        raise ValueError("ssl_context and ca_file apply to a URL; this connection is open already")
    else:
        connection = amqp_url_or_connection
    try:
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            bound = await _declare(channel, queue, event_types or ("#",))
            async for event in _consume(bound, _SeenIds(dedupe_window), worker_user):
                yield event
        finally:
            # Closing the channel hands every unacked event back to the broker.
            await channel.close()
    finally:
        if owned:
            await connection.close()


async def _declare(
    channel: aio_pika.abc.AbstractChannel, queue: str, routing_keys: tuple[str, ...]
) -> AbstractQueue:
    # Passive: the exchange is the worker's (or the deployment's definitions'); a
    # subscriber has no permission to declare it.
    exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
    declared = await channel.declare_queue(
        queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    for routing_key in routing_keys:
        await declared.bind(exchange, routing_key=routing_key)
    return declared


async def _consume(
    queue: AbstractQueue, seen: _SeenIds, worker_user: str | None = None
) -> AsyncIterator[Event]:
    async with queue.iterator() as messages:
        async for message in messages:
            if worker_user is not None and message.user_id != worker_user:
                log.warning(
                    "dropped an event the identity worker did not publish (user_id %r, type %r)",
                    message.user_id,
                    message.routing_key,
                )
                await _ack(message)
                continue
            event = await _decode(message)
            if event is None:
                continue
            if event.event_id in seen:
                await _ack(message)
                continue
            yield event
            # Reached only when the consumer asks for the next event: it is done with this
            # one. Remembered even if the ack fails, so the redelivery is dropped as a repeat.
            seen.add(event.event_id)
            await _ack(message)


async def _decode(message: AbstractIncomingMessage) -> Event | None:
    try:
        return parse_event(message.body)
    except ValidationError as exc:
        # Requeueing a body that can never parse would loop forever.
        problems = [(e["loc"], e["type"]) for e in exc.errors()[:3]]
        log.warning("rejecting an event that does not parse: %s", problems)
        try:
            await message.reject(requeue=False)
        except _CHANNEL_LOST as exc:  # redelivered, and rejected again then
            log.warning("could not reject event (it will be redelivered): %s", exc)
        return None


# What settling a delivery raises once its channel is gone: an AMQP error, or aiormq's
# ChannelInvalidStateError (a RuntimeError) when the channel is already closed.
_CHANNEL_LOST = (AMQPError, ChannelInvalidStateError)


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except _CHANNEL_LOST as exc:
        # The channel was lost: the broker redelivers the event, and the dedupe window
        # drops it when it comes back on this subscriber.
        log.warning("could not ack event (it will be redelivered): %s", exc)
