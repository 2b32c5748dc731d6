"""The broker: declarations, routing, dead-lettering, and handing messages to consumers."""

from __future__ import annotations

import asyncio
import copy
import secrets
from typing import TYPE_CHECKING, Any

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from messages.topology import DIRECT_REPLY_TO
from tests.support.memory_broker.model import (
    ACCESS_REFUSED,
    DELIVERY_COUNT,
    EXCHANGE_TYPES,
    NOT_FOUND,
    PRECONDITION_FAILED,
    RESOURCE_LOCKED,
    ChannelError,
    Consumer,
    Exchange,
    Queue,
    Stored,
    Unacked,
)

if TYPE_CHECKING:
    from tests.support.memory_broker.channel import WireChannel
    from tests.support.memory_broker.client import MemoryConnection


class MemoryBroker:
    """One virtual host: its exchanges, queues and the deliveries in flight."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {"": Exchange("", "direct")}
        self.queues: dict[str, Queue] = {}
        self.reply_consumers: dict[str, Consumer] = {}  # direct reply-to, by token
        self.published = 0
        self._dispatch_scheduled = False

    def connect(self) -> MemoryConnection:
        """A new connection, open (what `aio_pika.connect_robust(url)` returns)."""
        from tests.support.memory_broker.client import MemoryConnection

        return MemoryConnection(self)

    def unacked(self, queue: str) -> int:
        """Messages of `queue` delivered and not settled yet, on every channel."""
        return sum(c.unacked for c in self.queues[queue].consumers)

    # Declarations

    def declare_exchange(
        self, name: str, type_: str, *, passive: bool, **properties: Any
    ) -> Exchange:
        found = self.exchanges.get(name)
        if passive:
            if found is None:
                raise ChannelError(NOT_FOUND, f"no exchange '{name}'")
            return found
        if name == "" or name.startswith("amq."):
            raise ChannelError(ACCESS_REFUSED, f"exchange name '{name}' is reserved")
        if type_ not in EXCHANGE_TYPES:
            raise ChannelError(PRECONDITION_FAILED, f"exchange type '{type_}' is not modelled")
        wanted = Exchange(name, type_, **properties)
        if found is None:
            self.exchanges[name] = wanted
            return wanted
        for attribute in ("type", "durable", "auto_delete", "internal", "arguments"):
            if getattr(found, attribute) != getattr(wanted, attribute):
                raise ChannelError(
                    PRECONDITION_FAILED, f"inequivalent {attribute} for exchange '{name}'"
                )
        return found

    def declare_queue(
        self, name: str, owner: MemoryConnection, *, passive: bool, exclusive: bool, **rest: Any
    ) -> Queue:
        found = self.queues.get(name)
        if found is not None and found.owner not in (None, owner):
            raise ChannelError(RESOURCE_LOCKED, f"queue '{name}' is exclusive to another")
        if passive:
            if found is None:
                raise ChannelError(NOT_FOUND, f"no queue '{name}'")
            return found
        if not name:
            name = f"amq.gen-{secrets.token_urlsafe(16)}"
        elif name.startswith("amq."):
            raise ChannelError(ACCESS_REFUSED, f"queue name '{name}' is reserved")
        wanted = Queue(name, owner=owner if exclusive else None, **rest)
        if found is None:
            self.queues[name] = wanted
            return wanted
        for attribute in ("durable", "owner", "auto_delete", "arguments"):
            if getattr(found, attribute) != getattr(wanted, attribute):
                raise ChannelError(
                    PRECONDITION_FAILED, f"inequivalent {attribute} for queue '{name}'"
                )
        return found

    def bind(self, queue: str, exchange: str, routing_key: str, owner: MemoryConnection) -> None:
        if exchange == "":
            raise ChannelError(ACCESS_REFUSED, "the default exchange cannot be bound")
        target = self.declare_queue(queue, owner, passive=True, exclusive=False)
        source = self.declare_exchange(exchange, "", passive=True)
        if (target, routing_key) not in source.bindings:
            source.bindings.append((target, routing_key))

    def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        source = self.declare_exchange(exchange, "", passive=True)
        source.bindings = [
            (q, key) for q, key in source.bindings if (q.name, key) != (queue, routing_key)
        ]

    def delete_queue(self, name: str) -> int:
        queue = self.queues.pop(name, None)
        if queue is None:
            return 0
        queue.deleted = True
        for consumer in list(queue.consumers):
            self.cancel(consumer)
        for exchange in self.exchanges.values():
            exchange.bindings = [(q, key) for q, key in exchange.bindings if q is not queue]
        return len(queue.ready)

    def delete_exchange(self, name: str) -> None:
        self.exchanges.pop(name, None)

    # Publishing

    def publish(
        self,
        sender: WireChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
    ) -> tuple[bool, bool]:
        """Route a message; (routed anywhere, refused by a queue)."""
        source = self.exchanges.get(exchange)
        if source is None:
            raise ChannelError(NOT_FOUND, f"no exchange '{exchange}'")
        if properties.reply_to == DIRECT_REPLY_TO:
            if sender.reply_token is None:
                raise ChannelError(PRECONDITION_FAILED, "fast reply consumer does not exist")
            properties.reply_to = f"{DIRECT_REPLY_TO}.{sender.reply_token}"
        self.published += 1
        if exchange == "" and routing_key.startswith(DIRECT_REPLY_TO + "."):
            return self._reply_directly(routing_key, body, properties), False
        queues = self._route(source, routing_key, set())
        refused = False
        for queue in queues:
            stored = Stored(body, properties, exchange, routing_key)
            refused |= not self._enqueue(queue, stored)
        return bool(queues), refused

    def _route(self, exchange: Exchange, routing_key: str, seen: set[str]) -> list[Queue]:
        if exchange.name == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        queues = exchange.route(routing_key)
        alternate = exchange.arguments.get("alternate-exchange")
        if not queues and alternate in self.exchanges and alternate not in seen:
            seen.add(exchange.name)
            return self._route(self.exchanges[alternate], routing_key, seen)
        return list(dict.fromkeys(queues))  # one copy per queue, however many bindings match

    def _enqueue(self, queue: Queue, stored: Stored) -> bool:
        """Store a message in `queue`; False when the queue refused it (a nack)."""
        limit = queue.arguments.get("x-max-length")
        full = limit is not None and len(queue.ready) >= limit
        if full and queue.arguments.get("x-overflow") == "reject-publish":
            return False
        queue.ready.append(stored)
        while limit is not None and len(queue.ready) > limit:  # drop-head: the oldest go
            self._dead_letter(queue, queue.ready.popleft(), "maxlen")
        self._schedule_dispatch()
        return True

    def _reply_directly(
        self, routing_key: str, body: bytes, properties: spec.Basic.Properties
    ) -> bool:
        consumer = self.reply_consumers.get(routing_key.removeprefix(DIRECT_REPLY_TO + "."))
        if consumer is None or consumer.channel.is_closed:
            return False
        stored = Stored(body, properties, "", routing_key)
        consumer.channel.deliver(consumer, stored, properties)
        return True

    def _dead_letter(self, queue: Queue, stored: Stored, reason: str) -> None:
        target = self.exchanges.get(queue.arguments.get("x-dead-letter-exchange", ""))
        if target is None or target.name == "":
            return
        routing_key = queue.arguments.get("x-dead-letter-routing-key", stored.routing_key)
        properties = copy.copy(stored.properties)
        headers = dict(properties.headers or {})
        headers.pop(DELIVERY_COUNT, None)
        death = {
            "count": 1,
            "reason": reason,
            "queue": queue.name,
            "exchange": stored.exchange,
            "routing-keys": [stored.routing_key],
        }
        headers["x-death"] = [death, *headers.get("x-death", [])]
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-exchange", stored.exchange)
        properties.headers = headers
        for dead_queue in self._route(target, routing_key, set()):
            self._enqueue(dead_queue, Stored(stored.body, properties, target.name, routing_key))

    # Delivering

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        for queue in list(self.queues.values()):
            while queue.ready:
                consumer = queue.next_consumer()
                if consumer is None:
                    break
                stored = queue.ready.popleft()
                consumer.channel.deliver(
                    consumer, stored, self._delivered_properties(queue, stored)
                )

    @staticmethod
    def _delivered_properties(queue: Queue, stored: Stored) -> spec.Basic.Properties:
        if not (queue.quorum and stored.returns):
            return stored.properties
        properties = copy.copy(stored.properties)
        properties.headers = {**(properties.headers or {}), DELIVERY_COUNT: stored.returns}
        return properties

    def get(self, channel: WireChannel, queue_name: str, no_ack: bool) -> DeliveredMessage:
        queue = self.declare_queue(queue_name, channel.connection, passive=True, exclusive=False)
        if not queue.ready:
            return DeliveredMessage(spec.Basic.GetEmpty(), ContentHeader(), b"", channel)  # type: ignore[arg-type]
        stored = queue.ready.popleft()
        return channel.got(queue, stored, self._delivered_properties(queue, stored), no_ack)

    def settled(self, entry: Unacked, *, requeue: bool | None) -> None:
        """A delivery was acked (requeue None), or rejected and requeued or not."""
        if entry.consumer is not None:
            entry.consumer.unacked -= 1
        if requeue is True:
            self._return(entry.queue, entry.message)
        elif requeue is False:
            self._dead_letter(entry.queue, entry.message, "rejected")
        self._schedule_dispatch()

    def _return(self, queue: Queue, stored: Stored) -> None:
        if queue.deleted:
            return
        stored.redelivered = True
        if queue.quorum:
            stored.returns += 1
            limit = queue.arguments.get("x-delivery-limit")
            if limit is not None and stored.returns > limit:
                self._dead_letter(queue, stored, "delivery_limit")
                return
        queue.ready.appendleft(stored)

    def consume(self, consumer: Consumer) -> None:
        consumer.queue.consumers.append(consumer)
        self._schedule_dispatch()

    def cancel(self, consumer: Consumer) -> None:
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
            if queue.auto_delete and not queue.consumers:
                self.delete_queue(queue.name)
        self.reply_consumers = {
            token: c for token, c in self.reply_consumers.items() if c is not consumer
        }

    def connection_closed(self, connection: MemoryConnection) -> None:
        for queue in [q for q in self.queues.values() if q.owner is connection]:
            self.delete_queue(queue.name)
