"""The aio-pika side of the in-memory broker: connection, channels, exchanges and queues with
the methods and results of aio-pika's robust classes, for the calls the worker, the client
and the tests make."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.exceptions import QueueEmpty
from aio_pika.tools import CallbackCollection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from yarl import URL

from tests.support.memory_broker.channel import WireChannel

if TYPE_CHECKING:
    from tests.support.memory_broker.broker import MemoryBroker


class MemoryConnection:
    """What `aio_pika.connect_robust()` returns, on a MemoryBroker; it never reconnects."""

    basic_nack = True  # aio-pika's IncomingMessage.nack asks whether the server has it

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        # As aio-pika's connection has it: the client library reads its user from here.
        self.url = URL("amqp://guest:guest@memory.invalid/")
        self.close_callbacks = CallbackCollection(self)
        self.connected = asyncio.Event()
        self.connected.set()
        self.is_closed = False
        self._numbers = itertools.count(1)
        self._channels: list[MemoryChannel] = []

    def channel(
        self,
        channel_number: int | None = None,
        publisher_confirms: bool = True,
        on_return_raises: bool = False,
    ) -> MemoryChannel:
        if self.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("the connection is closed")
        wire = WireChannel(
            self.broker,
            self,
            channel_number or next(self._numbers),
            publisher_confirms=publisher_confirms,
            on_return_raises=on_return_raises,
        )
        channel = MemoryChannel(self, wire)
        self._channels.append(channel)
        return channel

    async def close(self, exc: BaseException | None = None) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.connected.clear()
        for channel in self._channels:
            channel.wire.shut(None)
        self.broker.connection_closed(self)
        await self.close_callbacks(exc)

    async def __aenter__(self) -> MemoryConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MemoryChannel:
    """An open channel (awaiting it, as `await connection.channel()` does, returns it)."""

    def __init__(self, connection: MemoryConnection, wire: WireChannel) -> None:
        self.connection = connection
        self.wire = wire
        self.close_callbacks = CallbackCollection(self)
        self.return_callbacks = CallbackCollection(self)
        self.default_exchange = MemoryExchange(self, "")
        wire.on_close = self._on_close
        wire.on_return_callbacks.add(self._on_return)
        self._tags = itertools.count(1)

    def __await__(self) -> Generator[Any, None, MemoryChannel]:
        return self._opened().__await__()

    async def _opened(self) -> MemoryChannel:
        return self

    async def __aenter__(self) -> MemoryChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def is_closed(self) -> bool:
        return self.wire.is_closed

    @property
    def number(self) -> int:
        return self.wire.number

    async def get_underlay_channel(self) -> WireChannel:
        return self.wire

    async def close(self, exc: BaseException | None = None) -> None:
        await self.wire.close(exc)

    async def set_qos(
        self,
        prefetch_count: int = 0,
        prefetch_size: int = 0,
        global_: bool = False,
        timeout: float | None = None,
        all_channels: bool | None = None,
    ) -> spec.Basic.QosOk:
        self.wire.prefetch_count = prefetch_count  # per consumer, for those made from now on
        return spec.Basic.QosOk()

    async def declare_exchange(
        self,
        name: str,
        type: aio_pika.ExchangeType | str = aio_pika.ExchangeType.DIRECT,
        *,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> MemoryExchange:
        exchange = self.wire.call(
            self.connection.broker.declare_exchange,
            name,
            aio_pika.ExchangeType(type).value,
            passive=passive,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            arguments=dict(arguments or {}),
        )
        await asyncio.sleep(0)
        return MemoryExchange(self, exchange.name)

    async def get_exchange(self, name: str, *, ensure: bool = True) -> MemoryExchange:
        if ensure:
            return await self.declare_exchange(name, passive=True)
        return MemoryExchange(self, name)

    async def declare_queue(
        self,
        name: str | None = None,
        *,
        durable: bool = False,
        exclusive: bool = False,
        passive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> MemoryQueue:
        queue = self.wire.call(
            self.connection.broker.declare_queue,
            name or "",
            self.connection,
            passive=passive,
            exclusive=exclusive,
            durable=durable,
            auto_delete=auto_delete,
            arguments=dict(arguments or {}),
        )
        await asyncio.sleep(0)
        ok = spec.Queue.DeclareOk(
            queue=queue.name, message_count=len(queue.ready), consumer_count=len(queue.consumers)
        )
        return MemoryQueue(self, queue.name, ok)

    async def get_queue(self, name: str, *, ensure: bool = True) -> MemoryQueue:
        if ensure:
            return await self.declare_queue(name, passive=True)
        return MemoryQueue(self, name, None)

    async def queue_delete(self, queue_name: str, **_: Any) -> spec.Queue.DeleteOk:
        count = self.wire.call(self.connection.broker.delete_queue, queue_name)
        return spec.Queue.DeleteOk(message_count=count)

    async def exchange_delete(self, exchange_name: str, **_: Any) -> spec.Exchange.DeleteOk:
        self.wire.call(self.connection.broker.delete_exchange, exchange_name)
        return spec.Exchange.DeleteOk()

    def consumer_tag(self) -> str:
        return f"ctag{self.number}.{next(self._tags)}"

    def _on_close(self, error: BaseException | None) -> None:
        self.close_callbacks(error)  # runs them in tasks of their own, as aio-pika does

    def _on_return(self, message: DeliveredMessage) -> None:
        self.return_callbacks(aio_pika.IncomingMessage(message, no_ack=True))


class MemoryExchange:
    def __init__(self, channel: MemoryChannel, name: str) -> None:
        self.channel = channel
        self.name = name

    async def publish(
        self,
        message: aio_pika.abc.AbstractMessage,
        routing_key: str,
        *,
        mandatory: bool = True,
        immediate: bool = False,
        timeout: float | None = None,
    ) -> Any:
        return await self.channel.wire.basic_publish(
            message.body,
            exchange=self.name,
            routing_key=routing_key,
            properties=message.properties,
            mandatory=mandatory,
            immediate=immediate,
            timeout=timeout,
        )


class MemoryQueue:
    def __init__(
        self, channel: MemoryChannel, name: str, declaration_result: spec.Queue.DeclareOk | None
    ) -> None:
        self.channel = channel
        self.name = name
        self.declaration_result = declaration_result

    async def bind(
        self,
        exchange: MemoryExchange | str,
        routing_key: str | None = None,
        *,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> spec.Queue.BindOk:
        source = exchange if isinstance(exchange, str) else exchange.name
        key = self.name if routing_key is None else routing_key  # aio-pika's default
        connection = self.channel.connection
        self.channel.wire.call(connection.broker.bind, self.name, source, key, connection)
        return spec.Queue.BindOk()

    async def unbind(
        self, exchange: MemoryExchange | str, routing_key: str | None = None, **_: Any
    ) -> spec.Queue.UnbindOk:
        source = exchange if isinstance(exchange, str) else exchange.name
        key = self.name if routing_key is None else routing_key
        self.channel.wire.call(self.channel.connection.broker.unbind, self.name, source, key)
        return spec.Queue.UnbindOk()

    async def consume(
        self,
        callback: Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[Any]],
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: str | None = None,
        timeout: float | None = None,
    ) -> str:
        tag = consumer_tag or self.channel.consumer_tag()
        return self.channel.wire.consume(self.name, callback, no_ack=no_ack, tag=tag)

    async def cancel(
        self, consumer_tag: str, timeout: float | None = None, nowait: bool = False
    ) -> None:
        self.channel.wire.cancel(consumer_tag)
        await asyncio.sleep(0)

    async def get(
        self, *, no_ack: bool = False, fail: bool = True, timeout: float | None = 5
    ) -> aio_pika.IncomingMessage | None:
        broker = self.channel.connection.broker
        got = self.channel.wire.call(broker.get, self.channel.wire, self.name, no_ack)
        await asyncio.sleep(0)
        if isinstance(got.delivery, spec.Basic.GetEmpty):
            if fail:
                raise QueueEmpty
            return None
        return aio_pika.IncomingMessage(got, no_ack=no_ack)

    async def purge(
        self, no_wait: bool = False, timeout: float | None = None
    ) -> spec.Queue.PurgeOk:
        queue = self.channel.wire.call(
            self.channel.connection.broker.declare_queue,
            self.name,
            self.channel.connection,
            passive=True,
            exclusive=False,
        )
        count = len(queue.ready)
        queue.ready.clear()
        return spec.Queue.PurgeOk(message_count=count)

    async def delete(self, *, if_unused: bool = True, if_empty: bool = True, **_: Any) -> Any:
        return await self.channel.queue_delete(self.name)
