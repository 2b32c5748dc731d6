"""What the worker relies on from RabbitMQ, checked on the in-memory broker double and on
RabbitMQ alike (the `broker` fixture): where the double and the broker part ways, one of
these fails. Every test names its own exchanges and queues, so they share a vhost."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp import commands as spec

from messages.topology import DIRECT_REPLY_TO
from tests.support.bus import queue_depth
from tests.support.eventually import eventually
from tests.support.pipeline import Broker
from worker.topology import delivery_count


def _name(what: str) -> str:
    return f"test.{what}.{uuid.uuid4().hex[:8]}"


async def _next(queue: AbstractQueue, *, no_ack: bool = True) -> AbstractIncomingMessage:
    message = await eventually(
        lambda: queue.get(no_ack=no_ack, fail=False), what=f"a message on {queue.name}"
    )
    assert message is not None
    return message


async def _routed(queue: AbstractQueue, sentinel: bytes) -> list[str]:
    """The routing keys of what reached `queue` before `sentinel` (published last)."""
    keys = []
    while (message := await _next(queue)).body != sentinel:
        keys.append(message.routing_key or "")
    return keys


async def _publish(channel: AbstractChannel, queue: str, body: bytes = b"m", **kw: object) -> None:
    await channel.default_exchange.publish(aio_pika.Message(body, **kw), routing_key=queue)  # type: ignore[arg-type]


async def test_the_default_exchange_routes_to_the_queue_its_key_names(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)

    await _publish(channel, queue.name, b"hello", content_type="application/json")

    message = await _next(queue)
    assert (message.body, message.routing_key, message.exchange) == (b"hello", queue.name, "")
    assert message.content_type == "application/json"
    assert not message.redelivered


async def test_topic_bindings_match_one_word_with_star_and_any_words_with_hash(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    topic = await channel.declare_exchange(_name("topic"), "topic", auto_delete=True)
    queue = await channel.declare_queue(exclusive=True)
    for pattern in ("account.*", "session.#", "end"):
        await queue.bind(topic, pattern)

    for key in ("account.created", "account.a.b", "session", "session.x.y", "other.end", "end"):
        await topic.publish(aio_pika.Message(b"m"), routing_key=key)
    await topic.publish(aio_pika.Message(b"last"), routing_key="end")

    assert await _routed(queue, b"last") == ["account.created", "session", "session.x.y", "end"]


async def test_what_no_binding_routes_goes_to_the_alternate_exchange(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    unrouted = await channel.declare_exchange(_name("unrouted"), "fanout", auto_delete=True)
    direct = await channel.declare_exchange(
        _name("direct"), "direct", auto_delete=True, arguments={"alternate-exchange": unrouted.name}
    )
    bound, fallback = (
        await channel.declare_queue(exclusive=True),
        await channel.declare_queue(exclusive=True),
    )
    await bound.bind(direct, "known")
    await fallback.bind(unrouted, "")

    await direct.publish(aio_pika.Message(b"k"), routing_key="known")
    await direct.publish(aio_pika.Message(b"u"), routing_key="unknown")

    assert (await _next(bound)).body == b"k"
    stray = await _next(fallback)
    assert (stray.body, stray.routing_key) == (b"u", "unknown")


async def test_a_mandatory_publish_nobody_routes_is_returned_to_the_publisher(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel(on_return_raises=True)
    nowhere = await channel.declare_exchange(_name("nowhere"), "direct", auto_delete=True)

    with pytest.raises(aio_pika.exceptions.PublishError):
        await nowhere.publish(aio_pika.Message(b"m"), routing_key="k", mandatory=True)
    # Not mandatory: confirmed, and dropped.
    confirmed = await nowhere.publish(aio_pika.Message(b"m"), routing_key="k", mandatory=False)
    assert isinstance(confirmed, spec.Basic.Ack)


async def test_a_full_reject_publish_queue_nacks_the_publisher(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
    queue = await channel.declare_queue(exclusive=True, arguments=arguments)

    await _publish(channel, queue.name, b"first")
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await _publish(channel, queue.name, b"second")

    assert (await _next(queue)).body == b"first"


async def test_a_quorum_queue_counts_returns_and_dead_letters_past_its_delivery_limit(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    dead = await channel.declare_exchange(_name("dead"), "fanout", auto_delete=True)
    graveyard = await channel.declare_queue(exclusive=True)
    await graveyard.bind(dead, "")
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": 1,
        "x-dead-letter-exchange": dead.name,
    }
    queue = await channel.declare_queue(_name("quorum"), durable=True, arguments=arguments)
    try:
        await _publish(channel, queue.name, b"poison")

        seen = []
        for _ in range(2):  # delivered at most limit + 1 times
            message = await _next(queue, no_ack=False)
            seen.append((message.redelivered, delivery_count(message.headers, redelivered=True)))
            await message.nack(requeue=True)

        assert seen == [(False, 0), (True, 1)]
        buried = await _next(graveyard)
        assert buried.body == b"poison"
        assert buried.headers["x-first-death-reason"] == "delivery_limit"
        assert await queue_depth(connection, queue.name) == 0
    finally:
        await channel.queue_delete(queue.name)


async def test_closing_a_channel_hands_its_unacked_deliveries_back_redelivered(
    connection: AbstractRobustConnection,
) -> None:
    holder, other = await connection.channel(), await connection.channel()
    queue = await other.declare_queue(_name("held"), auto_delete=False)
    try:
        await _publish(other, queue.name, b"held")
        held = await _next(await holder.get_queue(queue.name), no_ack=False)
        assert not held.redelivered

        await holder.close()

        again = await _next(queue, no_ack=False)
        assert (again.body, again.redelivered) == (b"held", True)
        await again.ack()
    finally:
        await other.queue_delete(queue.name)


async def test_acking_a_tag_the_channel_does_not_hold_closes_it_and_returns_its_deliveries(
    connection: AbstractRobustConnection,
) -> None:
    careless, other = await connection.channel(), await connection.channel()
    queue = await other.declare_queue(_name("careless"), auto_delete=False)
    try:
        await _publish(other, queue.name, b"held")
        held = await _next(await careless.get_queue(queue.name), no_ack=False)
        assert held.delivery_tag is not None

        underlay = await careless.get_underlay_channel()
        await underlay.basic_ack(held.delivery_tag + 100)  # no reply: the broker closes it

        again = await _next(queue, no_ack=False)
        assert (again.body, again.redelivered) == (b"held", True)
        await again.ack()
    finally:
        await other.queue_delete(queue.name)


async def test_prefetch_bounds_the_unacked_deliveries_of_a_consumer(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2)
    queue = await channel.declare_queue(_name("prefetch"), auto_delete=False)
    received: list[AbstractIncomingMessage] = []

    async def hold(message: AbstractIncomingMessage) -> None:
        received.append(message)

    try:
        for n in range(5):
            await _publish(channel, queue.name, str(n).encode())
        await queue.consume(hold)

        async def two_held() -> bool:
            return len(received) == 2 and await queue_depth(connection, queue.name) == 3

        await eventually(two_held, what="two delivered and three ready")
        assert len(received) == 2
        await received[0].ack()
        await eventually(lambda: len(received) == 3, what="a third delivered after an ack")
        assert [m.body for m in received] == [b"0", b"1", b"2"]
    finally:
        await channel.queue_delete(queue.name)


async def test_redeclaring_a_queue_with_other_arguments_is_refused(
    connection: AbstractRobustConnection,
) -> None:
    channel = await connection.channel()
    name = _name("args")
    await channel.declare_queue(name, auto_delete=True, arguments={"x-max-length": 5})

    refused = await connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await refused.declare_queue(name, auto_delete=True, arguments={"x-max-length": 6})
    # The same declaration again is a no-op.
    await channel.declare_queue(name, auto_delete=True, arguments={"x-max-length": 5})


async def test_an_exclusive_queue_goes_with_its_connection(
    broker: Broker, connection: AbstractRobustConnection
) -> None:
    owner = await broker.connect()
    queue = await (await owner.channel()).declare_queue(exclusive=True)

    await owner.close()

    async def gone() -> bool:
        probe = await connection.channel()
        try:
            await probe.declare_queue(queue.name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return True  # and the broker closed the probe's channel
        await probe.close()
        return False

    await eventually(gone, what=f"{queue.name} deleted")


async def test_direct_reply_to_reaches_the_publishing_channel_s_consumer(
    connection: AbstractRobustConnection,
) -> None:
    caller, server = await connection.channel(), await connection.channel()
    requests = await server.declare_queue(exclusive=True)
    replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    reply_to = await caller.get_queue(DIRECT_REPLY_TO, ensure=False)
    await reply_to.consume(replies.put, no_ack=True)

    await _publish(caller, requests.name, b"ping", reply_to=DIRECT_REPLY_TO, correlation_id="c1")
    request = await _next(requests)
    assert request.reply_to is not None
    assert request.reply_to.startswith(DIRECT_REPLY_TO + ".")  # the broker names the caller
    await _publish(server, request.reply_to, b"pong", correlation_id=request.correlation_id)

    reply = await asyncio.wait_for(replies.get(), timeout=10)
    assert (reply.body, reply.correlation_id) == (b"pong", "c1")
