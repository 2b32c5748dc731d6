"""The broker side of the tests: publish commands as any caller would, collect replies by
correlation id, and capture every event and dead letter on queues of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from yarl import URL

from brokers import connect_any, split_urls
from messages.topology import COMMANDS_EXCHANGE, DEAD_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE


@dataclass
class Sent:
    """A published command, as the checker needs to know it."""

    command: str
    key: str | None
    payload: dict[str, Any]
    correlation_id: str
    # Set on a second publication of a command (same key, new correlation id).
    duplicate_of: str | None = None


@dataclass
class Bus:
    """One connection to the test vhost: a caller with its reply queue, plus captures."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    reply_queue: str
    # The connection's broker user: the namespace of its reply queue (`<user>.…`), where a
    # worker with a caller policy is willing to answer it.
    user: str = "guest"
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    # The AMQP headers of every reply (by correlation id) and event (by event id).
    reply_headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The AMQP user_id set on every publish: the worker authorises commands by it, and
    # RabbitMQ refuses a publish whose user_id is not the connection's user (the tests
    # connect as guest).
    user_id: str | None = "guest"
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @classmethod
    async def open(
        cls,
        amqp_url: str,
        *,
        capture_dead: bool = True,
        durable: str | None = None,
        quorum: bool = False,
    ) -> Bus:
        """With `durable` (a name prefix), the reply, event and dead-letter captures are
        durable named queues consumed with acks, so that they survive the broker closing the
        connection: nothing published while the bus reconnects is lost. With `quorum` too,
        they are quorum queues, which also outlive the loss of a node of a cluster.
        `amqp_url` may name several nodes of one cluster (brokers.connect_any)."""
        user = URL(split_urls(amqp_url)[0]).user or "guest"
        if durable is not None:
            return await cls._open_durable(amqp_url, durable, capture_dead, user, quorum)
        connection = await connect_any(amqp_url)
        return await cls.attach(connection, capture_dead=capture_dead, user=user)

    @classmethod
    async def attach(
        cls, connection: AbstractRobustConnection, *, capture_dead: bool = True, user: str = "guest"
    ) -> Bus:
        """A bus on a connection opened elsewhere (to RabbitMQ or to an in-memory broker);
        closing the bus closes the connection. Its reply queue is named in `user`'s namespace
        (`<user>.…`), where a worker with a caller policy is willing to answer."""
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=1000)
        replies = await channel.declare_queue(
            f"{user}.bus-replies.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        bus = cls(connection, channel, replies.name, user=user, user_id=user)
        await replies.consume(bus._on_reply, no_ack=True)
        events_x = await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        captured = await channel.declare_queue(exclusive=True, auto_delete=True)
        await captured.bind(events_x, "#")
        await captured.consume(bus._on_event, no_ack=True)
        if capture_dead:
            await bus._capture_dead()
        return bus

    @classmethod
    async def _open_durable(
        cls, amqp_url: str, prefix: str, capture_dead: bool, user: str, quorum: bool
    ) -> Bus:
        connection = await connect_any(amqp_url, client_properties={"connection_name": prefix})
        arguments = {"x-queue-type": "quorum"} if quorum else None
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=1000)
        replies = await channel.declare_queue(
            f"{user}.{prefix}.replies", durable=True, arguments=arguments
        )
        bus = cls(connection, channel, replies.name, user=user, user_id=user)
        await replies.consume(_acking(bus._on_reply))
        events_x = await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        captured = await channel.declare_queue(
            f"{prefix}.events", durable=True, arguments=arguments
        )
        await captured.bind(events_x, "#")
        await captured.consume(_acking(bus._on_event))
        if capture_dead:
            dead_x = await channel.declare_exchange(DEAD_EXCHANGE, "fanout", durable=True)
            copy = await channel.declare_queue(f"{prefix}.dead", durable=True, arguments=arguments)
            await copy.bind(dead_x)
            await copy.consume(_acking(bus._on_dead))
        return bus

    async def publish_confirmed(
        self,
        command: str,
        body: bytes | dict[str, Any],
        *,
        correlation_id: str,
        duplicate_of: str | None = None,
        deadline_s: float = 60.0,
        content_type: str | None = "application/json",
        queue: str | None = None,
    ) -> int:
        """Publish until the broker confirms it, re-sending the very same message (same key,
        correlation id and message id) after a refusal or a lost connection. A dict body is
        recorded in `sent` once; returns how many extra attempts it took. With `queue`, the
        message goes straight to that queue (default exchange) with `command` as its type,
        which is how a routing key no binding knows can still reach a worker."""
        if isinstance(body, dict):
            payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
            key = body.get("idempotency_key")
            self.sent.append(Sent(command, key, payload, correlation_id, duplicate_of))
        message = aio_pika.Message(
            body if isinstance(body, bytes) else orjson.dumps(body),
            content_type=content_type,
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            reply_to=self.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
        )
        deadline = asyncio.get_running_loop().time() + deadline_s
        retries = 0
        while True:
            try:
                if queue is not None:
                    exchange = self.channel.default_exchange
                else:
                    exchange = await self.channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
                await exchange.publish(message, routing_key=queue or command, timeout=5)
                return retries
            except Exception:  # closed channel, lost connection, nack, timeout: all retried
                if asyncio.get_running_loop().time() > deadline:
                    raise
                retries += 1
                await asyncio.sleep(0.25)

    async def _capture_dead(self) -> None:
        dead_x = await self.channel.declare_exchange(DEAD_EXCHANGE, "fanout", durable=True)
        copy = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await copy.bind(dead_x)
        await copy.consume(self._on_dead, no_ack=True)

    async def close(self) -> None:
        await self.connection.close()

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)
        self.reply_headers[message.correlation_id or ""] = dict(message.headers or {})
        self.replies.setdefault(message.correlation_id or "", []).append(body)
        await self._notify()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        event = orjson.loads(message.body)
        self.event_headers[str(event.get("event_id"))] = dict(message.headers or {})
        self.events.append(event)
        await self._notify()

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        self.dead.append(orjson.loads(message.body))
        await self._notify()

    async def publish(
        self,
        command: str,
        body: bytes | dict[str, Any],
        *,
        correlation_id: str | None = None,
        content_type: str | None = "application/json",
        reply: bool = True,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Publish to identity.commands exactly as a caller would; returns the correlation id."""
        correlation_id = correlation_id or uuid.uuid4().hex
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        if isinstance(body, dict):
            payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
            self.sent.append(Sent(command, body.get("idempotency_key"), payload, correlation_id))
        exchange = await self.channel.get_exchange(COMMANDS_EXCHANGE)
        message = aio_pika.Message(
            raw,
            content_type=content_type,
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            reply_to=self.reply_queue if reply else None,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
            headers=headers,
        )
        await exchange.publish(message, routing_key=command)
        return correlation_id

    async def command(
        self, command: str, payload: dict[str, Any], key: str | None = None, **kw: Any
    ) -> str:
        body: dict[str, Any] = {"payload": payload}
        if key is not None:
            body["idempotency_key"] = key
        return await self.publish(command, body, **kw)

    async def wait_for(self, ready: Callable[[], bool], timeout: float = 30.0) -> None:
        async def until() -> None:
            async with self._arrived:
                await self._arrived.wait_for(ready)

        await asyncio.wait_for(until(), timeout)

    async def reply(self, correlation_id: str, timeout: float = 30.0) -> dict[str, Any]:
        await self.wait_for(lambda: bool(self.replies.get(correlation_id)), timeout)
        return self.replies[correlation_id][0]

    async def call(
        self, command: str, payload: dict[str, Any], key: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Publish and await the reply (a fresh idempotency key unless one is given)."""
        key = key if key is not None else uuid.uuid4().hex
        return await self.reply(await self.command(command, payload, key), timeout)

    async def call_confirmed(
        self, command: str, payload: dict[str, Any], key: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """`call`, published through `publish_confirmed`: survives a connection cut."""
        body = {"idempotency_key": key or uuid.uuid4().hex, "payload": payload}
        correlation_id = uuid.uuid4().hex
        await self.publish_confirmed(command, body, correlation_id=correlation_id)
        return await self.reply(correlation_id, timeout)

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("type") == event_type]

    def events_caused_by(self, key: str) -> list[dict[str, Any]]:
        """Every captured event of the command with idempotency key `key` (repeats included)."""
        return [event for event in self.events if event.get("causation_id") == key]

    async def send_to_queue(
        self, queue: str, body: bytes, *, content_type: str = "application/json"
    ) -> str:
        """Publish straight to a queue through the default exchange, bypassing the commands
        exchange (so the routing key is the queue's name); returns the correlation id."""
        correlation_id = uuid.uuid4().hex
        message = aio_pika.Message(
            body,
            content_type=content_type,
            correlation_id=correlation_id,
            reply_to=self.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
        )
        await self.channel.default_exchange.publish(message, routing_key=queue)
        return correlation_id

    async def replies_to(
        self, correlation_id: str, count: int, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until `count` replies carry `correlation_id`, and return them all."""
        await self.wait_for(lambda: len(self.replies.get(correlation_id, [])) >= count, timeout)
        return self.replies[correlation_id]


def _acking(
    handler: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """Record first, then ack: a capture cut off in between gets the message again."""

    async def consume(message: AbstractIncomingMessage) -> None:
        await handler(message)
        with contextlib.suppress(Exception):
            await message.ack()

    return consume


async def queue_depth(connection: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in `queue`, asked of the broker now (a robust channel would answer a
    repeated passive declare from its cache, so this uses a channel of its own)."""
    fresh = await connection.channel()
    try:
        declared = await fresh.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await fresh.close()


async def dead_queue_depth(connection: AbstractRobustConnection) -> int:
    """Messages ready in identity.dead."""
    return await queue_depth(connection, DEAD_QUEUE)
