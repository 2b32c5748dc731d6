"""A channel as aiormq shows it: delivery tags, the unacknowledged ledger, publisher confirms
and returns, and the `basic_*` calls the worker makes."""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aio_pika
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import (
    AMQPChannelError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from pamqp import commands as spec
from pamqp.header import ContentHeader

from messages.topology import DIRECT_REPLY_TO
from tests.support.memory_broker.model import (
    NO_ROUTE,
    PRECONDITION_FAILED,
    Callback,
    ChannelError,
    Consumer,
    Queue,
    Stored,
    Unacked,
)

if TYPE_CHECKING:
    from tests.support.memory_broker.broker import MemoryBroker
    from tests.support.memory_broker.client import MemoryConnection

log = logging.getLogger("tests.memory_broker")


class WireChannel:
    """A channel as aiormq shows it: delivery tags, the unacked ledger, `basic_*` calls.

    `message.channel` of a delivery is this object, and the worker's acks and publishes go to
    it; the aio-pika side (.client) declares and consumes through it.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        connection: MemoryConnection,
        number: int,
        *,
        publisher_confirms: bool,
        on_return_raises: bool,
    ) -> None:
        self.broker = broker
        self.connection = connection
        self.number = number
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self.on_return_callbacks: set[Callable[[DeliveredMessage], Any]] = set()
        self.on_close: Callable[[BaseException | None], None] | None = None
        self.prefetch_count = 0
        self.reply_token: str | None = None
        self.closed_by: BaseException | None = None
        self.is_closed = False
        self._last_tag = 0
        self._confirm_tag = 0
        self._unacked: dict[int, Unacked] = {}
        self._consumers: dict[str, Consumer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # What aiormq's channel offers (and the worker calls)

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: spec.Basic.Properties | None = None,
        mandatory: bool = False,
        immediate: bool = False,
        timeout: float | None = None,
    ) -> spec.Basic.Ack | DeliveredMessage | None:
        self._check_open()
        properties = copy.copy(properties or spec.Basic.Properties(delivery_mode=1))
        if not properties.message_id:  # aiormq gives every publish a message id
            properties.message_id = uuid.uuid4().hex
        self._confirm_tag += 1
        try:
            routed, refused = self._call(
                self.broker.publish, self, exchange, routing_key, bytes(body), properties
            )
        except AMQPChannelError:
            if self.publisher_confirms:
                raise  # the confirm never comes: the channel's closing fails the publish
            return None  # written; the broker closes the channel afterwards
        await asyncio.sleep(0)  # the round trip to the broker
        returned = None
        if mandatory and not routed:
            frame = spec.Basic.Return(
                reply_code=NO_ROUTE, reply_text="NO_ROUTE", exchange=exchange,
                routing_key=routing_key,
            )  # fmt: skip
            returned = DeliveredMessage(frame, ContentHeader(0, len(body), properties), body, self)  # type: ignore[arg-type]
            if self.on_return_raises and self.publisher_confirms:
                raise PublishError(returned, frame)
            for callback in list(self.on_return_callbacks):
                callback(returned)
        if not self.publisher_confirms:
            return None
        if refused:
            raise DeliveryError(None, spec.Basic.Nack(delivery_tag=self._confirm_tag))
        return returned or spec.Basic.Ack(delivery_tag=self._confirm_tag)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        for entry in self._take(delivery_tag, multiple):
            self.broker.settled(entry, requeue=None)
        await asyncio.sleep(0)

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        for entry in self._take(delivery_tag, multiple):
            self.broker.settled(entry, requeue=requeue)
        await asyncio.sleep(0)

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        await self.basic_nack(delivery_tag, requeue=requeue)

    async def close(self, exc: BaseException | None = None) -> None:
        self.shut(None)
        await asyncio.sleep(0)

    # What the aio-pika side calls

    def consume(self, queue_name: str, callback: Callback, *, no_ack: bool, tag: str) -> str:
        self._check_open()
        if tag in self._consumers:
            self._fail(ChannelError(PRECONDITION_FAILED, f"consumer tag '{tag}' in use"))
        if queue_name == DIRECT_REPLY_TO:
            return self._consume_replies(callback, no_ack, tag)
        queue = self._call(
            self.broker.declare_queue, queue_name, self.connection, passive=True, exclusive=False
        )
        consumer = Consumer(tag, queue, self, callback, no_ack, self.prefetch_count)
        self._consumers[tag] = consumer
        self.broker.consume(consumer)
        return tag

    def _consume_replies(self, callback: Callback, no_ack: bool, tag: str) -> str:
        if not no_ack:
            self._fail(ChannelError(PRECONDITION_FAILED, "reply consumer cannot acknowledge"))
        self.reply_token = secrets.token_urlsafe(12)
        replies = Queue(DIRECT_REPLY_TO, owner=self.connection)
        consumer = Consumer(tag, replies, self, callback, no_ack=True, prefetch=0)
        self._consumers[tag] = consumer
        self.broker.reply_consumers[self.reply_token] = consumer
        return tag

    def cancel(self, tag: str) -> None:
        self._check_open()
        consumer = self._consumers.pop(tag, None)
        if consumer is not None:
            self.broker.cancel(consumer)

    def deliver(
        self, consumer: Consumer, stored: Stored, properties: spec.Basic.Properties
    ) -> None:
        tag = self._next_tag()
        if not consumer.no_ack:
            self._unacked[tag] = Unacked(consumer.queue, stored, consumer)
            consumer.unacked += 1
        frame = spec.Basic.Deliver(
            consumer_tag=consumer.tag, delivery_tag=tag, redelivered=stored.redelivered,
            exchange=stored.exchange, routing_key=stored.routing_key,
        )  # fmt: skip
        message = self._incoming(frame, stored, properties, consumer.no_ack)
        task = asyncio.get_running_loop().create_task(consumer.callback(message))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def got(
        self, queue: Queue, stored: Stored, properties: spec.Basic.Properties, no_ack: bool
    ) -> DeliveredMessage:
        tag = self._next_tag()
        if not no_ack:
            self._unacked[tag] = Unacked(queue, stored, None)
        frame = spec.Basic.GetOk(
            delivery_tag=tag, redelivered=stored.redelivered, exchange=stored.exchange,
            routing_key=stored.routing_key, message_count=len(queue.ready),
        )  # fmt: skip
        return DeliveredMessage(frame, self._header(stored, properties), stored.body, self)  # type: ignore[arg-type]

    def call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a broker operation for this channel; a refusal closes the channel."""
        self._check_open()
        return self._call(operation, *args, **kwargs)

    def shut(self, error: BaseException | None) -> None:
        """Closed by the client (error None) or by the broker: consumers go, unacked
        deliveries return to their queues, running deliveries are cancelled."""
        if self.is_closed:
            return
        self.is_closed, self.closed_by = True, error
        for consumer in self._consumers.values():
            self.broker.cancel(consumer)
        self._consumers.clear()
        for tag in sorted(self._unacked, reverse=True):  # back to the front, in order
            self.broker.settled(self._unacked.pop(tag), requeue=True)
        for task in list(self._tasks):
            task.cancel()
        if self.on_close is not None:
            self.on_close(error)

    # Inside

    def _call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except ChannelError as refusal:
            self._fail(refusal)

    def _fail(self, refusal: ChannelError) -> None:
        error = refusal.as_amqp()
        self.shut(error)
        raise error

    def _check_open(self) -> None:
        if self.is_closed:
            raise ChannelInvalidStateError(f"channel {self.number} is closed")

    def _take(self, tag: int, multiple: bool) -> list[Unacked]:
        self._check_open()
        if tag not in self._unacked:
            # basic.ack and basic.nack have no reply: the call returns, and the broker closes
            # the channel (as it settles nothing, its deliveries go back to their queues).
            self.shut(ChannelError(PRECONDITION_FAILED, f"unknown delivery tag {tag}").as_amqp())
            return []
        tags = [t for t in self._unacked if t <= tag] if multiple else [tag]
        return [self._unacked.pop(t) for t in sorted(tags)]

    def _next_tag(self) -> int:
        self._last_tag += 1
        return self._last_tag

    def _incoming(
        self, frame: spec.Basic.Deliver, stored: Stored, properties: Any, no_ack: bool
    ) -> aio_pika.IncomingMessage:
        delivered = DeliveredMessage(frame, self._header(stored, properties), stored.body, self)  # type: ignore[arg-type]
        return aio_pika.IncomingMessage(delivered, no_ack=no_ack)

    @staticmethod
    def _header(stored: Stored, properties: spec.Basic.Properties) -> ContentHeader:
        return ContentHeader(0, len(stored.body), properties)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a consumer callback failed", exc_info=task.exception())
