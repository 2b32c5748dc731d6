"""Either broker for one test: the in-memory double or a vhost of the local RabbitMQ.

Like faststream's `TestRabbitBroker(broker, with_real=...)`, one test runs unchanged on both:
it asks a `Broker` for connections and never knows which one it got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from tests.support.memory_broker import MemoryBroker

MEMORY = "memory"
RABBITMQ = "rabbitmq"


@dataclass
class Broker:
    """Where a test's connections go: `kind` is MEMORY or RABBITMQ."""

    kind: str
    url: str
    memory: MemoryBroker | None = field(default=None, repr=False)

    @classmethod
    def in_memory(cls) -> Broker:
        return cls(MEMORY, "amqp://guest:guest@memory.invalid/", MemoryBroker())

    @classmethod
    def rabbitmq(cls, url: str) -> Broker:
        return cls(RABBITMQ, url)

    async def connect(self) -> AbstractRobustConnection:
        if self.memory is not None:
            connection: Any = self.memory.connect()
            return connection  # an aio-pika robust connection in all but name
        return await aio_pika.connect_robust(self.url)
