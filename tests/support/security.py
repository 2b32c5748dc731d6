"""What the security suite plays with: the worker it can stop and start, the operator's view
of dead letters, and a caller that publishes exactly the AMQP properties a test chooses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from messages.topology import COMMANDS_EXCHANGE, DEAD_EXCHANGE, DIRECT_REPLY_TO
from tests.support.workers import WorkerProcess

Connector = Callable[[str], Awaitable[AbstractRobustConnection]]
# Publish without a user_id (a plain AMQP client that sets none).
NO_USER_ID = ""
# `connect(OPERATOR)`: guest, with every permission on the vhost and named by no policy.
OPERATOR = "guest"


class WorkerControl:
    """One worker process at a time on the deployment, started on demand."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self._started = 0
        self.process: WorkerProcess | None = None

    def running(self) -> WorkerProcess:
        if self.process is None or not self.process.alive():
            self.start()
        assert self.process is not None
        return self.process

    def start(self) -> WorkerProcess:
        self._started += 1
        log = self._log_dir / f"worker-{self._started}.log"
        self.process = WorkerProcess(self._env, log).start()
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.alive():
            self.process.terminate()


@dataclass
class Observer:
    """The operator (guest): a copy of every dead letter published from now on."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    dead: list[dict[str, Any]] = field(default_factory=list)
    raw_dead: list[bytes] = field(default_factory=list)

    @classmethod
    async def open(cls, url: str) -> Observer:
        connection = await aio_pika.connect_robust(url)
        channel = await connection.channel()
        observer = cls(connection, channel)
        exchange = await channel.get_exchange(DEAD_EXCHANGE, ensure=True)
        copy = await channel.declare_queue(exclusive=True, auto_delete=True)
        await copy.bind(exchange)
        await copy.consume(observer._on_dead, no_ack=True)
        return observer

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        self.raw_dead.append(message.body)
        self.dead.append({**orjson.loads(message.body), "user_id": message.user_id})

    async def wait_dead(
        self, matches: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for letter in self.dead:
                    if matches(letter):
                        return letter
                await asyncio.sleep(0.05)

    async def depth(self, queue: str) -> tuple[int, int]:
        """(messages, consumers) of `queue`, asked of the broker now."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        finally:
            await channel.close()

    async def close(self) -> None:
        await self.connection.close()


@dataclass
class Reply:
    body: dict[str, Any]
    size: int
    user_id: str | None


@dataclass
class Caller:
    """A caller with one channel (publisher confirms) and one reply queue: RabbitMQ's direct
    reply-to, or a named queue of its own (`<user>.…`)."""

    user: str
    channel: AbstractChannel
    reply_queue: str
    replies: dict[str, list[Reply]] = field(default_factory=dict)

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, user: str, *, named: bool = False
    ) -> Caller:
        channel = await connection.channel(publisher_confirms=True)
        queue: AbstractQueue
        if named:
            queue = await channel.declare_queue(
                f"{user}.replies.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
            )
        else:
            queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        caller = cls(user, channel, DIRECT_REPLY_TO if not named else queue.name)
        await queue.consume(caller._on_reply, no_ack=True)
        return caller

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = Reply(orjson.loads(message.body), len(message.body), message.user_id)
        self.replies.setdefault(message.correlation_id or "", []).append(reply)

    async def send(
        self,
        command: str,
        body: dict[str, Any] | bytes,
        *,
        user_id: str | None = None,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration: float | None = None,
    ) -> str:
        """Publish `body` as `command`; user_id is the caller's own unless given
        (NO_USER_ID: none), reply_to its reply queue unless given. Returns the correlation id."""
        correlation_id = uuid.uuid4().hex
        message = aio_pika.Message(
            body if isinstance(body, bytes) else orjson.dumps(body),
            content_type="application/json",
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            reply_to=self.reply_queue if reply_to is None else reply_to,
            user_id=self.user if user_id is None else (user_id or None),
            headers=headers,
            expiration=expiration,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        exchange = await self.channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        await exchange.publish(message, routing_key=command)
        return correlation_id

    async def command(
        self,
        command: str,
        payload: dict[str, Any],
        *,
        key: str | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        body: dict[str, Any] = {"payload": payload, "idempotency_key": key or uuid.uuid4().hex}
        if metadata is not None:
            body["metadata"] = metadata
        return await self.send(command, body, **options)

    async def reply(self, correlation_id: str, timeout: float = 30.0) -> Reply:
        async with asyncio.timeout(timeout):
            while not self.replies.get(correlation_id):
                await asyncio.sleep(0.02)
        return self.replies[correlation_id][0]

    async def call(
        self, command: str, payload: dict[str, Any], *, timeout: float = 30.0, **options: Any
    ) -> dict[str, Any]:
        return (await self.reply(await self.command(command, payload, **options), timeout)).body
