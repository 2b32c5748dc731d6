"""The broker's objects: exchanges, queues, consumers and stored messages, and the refusals
that close a channel."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aio_pika
from aiormq.channel import exception_by_code
from pamqp import commands as spec

if TYPE_CHECKING:
    from tests.support.memory_broker.channel import WireChannel
    from tests.support.memory_broker.client import MemoryConnection

NOT_FOUND, ACCESS_REFUSED, RESOURCE_LOCKED, PRECONDITION_FAILED = 404, 403, 405, 406
NO_ROUTE = 312
EXCHANGE_TYPES = ("direct", "topic", "fanout")
DELIVERY_COUNT = "x-delivery-count"

Callback = Callable[[aio_pika.IncomingMessage], Awaitable[Any]]


class ChannelError(Exception):
    """A channel-level refusal: the broker closes the channel (raised as aiormq's error)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    def as_amqp(self) -> BaseException:
        return exception_by_code(spec.Channel.Close(reply_code=self.code, reply_text=self.text))


@dataclass
class Stored:
    """One message in one queue (each queue it was routed to has its own copy)."""

    body: bytes
    properties: spec.Basic.Properties
    exchange: str
    routing_key: str
    redelivered: bool = False
    returns: int = 0  # times handed back unacknowledged (what quorum queues count)


@dataclass(eq=False)
class Exchange:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: list[tuple[Queue, str]] = field(default_factory=list)

    def route(self, routing_key: str) -> list[Queue]:
        return [q for q, key in self.bindings if self._matches(key, routing_key)]

    def _matches(self, key: str, routing_key: str) -> bool:
        if self.type == "fanout":
            return True
        if self.type == "topic":
            return _topic_matches(key.split("."), routing_key.split("."))
        return key == routing_key


def _topic_matches(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_matches(rest, words[1:])


@dataclass(eq=False)
class Consumer:
    tag: str
    queue: Queue
    channel: WireChannel
    callback: Callback
    no_ack: bool
    prefetch: int  # 0: no limit
    unacked: int = 0

    @property
    def has_room(self) -> bool:
        return self.no_ack or self.prefetch == 0 or self.unacked < self.prefetch


@dataclass(eq=False)
class Queue:
    name: str
    durable: bool = False
    owner: MemoryConnection | None = None  # exclusive to this connection
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    ready: deque[Stored] = field(default_factory=deque)
    consumers: list[Consumer] = field(default_factory=list)
    deleted: bool = False
    _turn: int = 0

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    def next_consumer(self) -> Consumer | None:
        """The next consumer with room for a delivery, round robin."""
        for offset in range(len(self.consumers)):
            consumer = self.consumers[(self._turn + offset) % len(self.consumers)]
            if consumer.has_room:
                self._turn = (self._turn + offset + 1) % len(self.consumers)
                return consumer
        return None


@dataclass
class Unacked:
    queue: Queue
    message: Stored
    consumer: Consumer | None  # None for basic.get
