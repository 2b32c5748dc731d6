"""Either broker for one test (the in-memory double or a vhost of the local RabbitMQ), and the
worker assembled in this process by `worker.bootstrap.build` on the in-memory store and it.

Like faststream's `TestRabbitBroker(broker, with_real=...)`, one test runs unchanged on both:
it asks a `Broker` for connections and never knows which one it got.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from stores import IdentityStore, MemoryIdentityStore
from tests.support.memory_broker import MemoryBroker
from tests.support.workers import (
    TEST_CALLERS,
    TEST_HMAC_KEY,
    TEST_JWT_KEYS,
    TEST_SIGNING_KEYS,
)
from worker.app import Worker
from worker.bootstrap import build
from worker.settings import Settings

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


def worker_settings(amqp_url: str, **overrides: Any) -> Settings:
    """What a test worker runs with: production mode with the session's keys and a policy that
    lets guest send everything, cheap argon2 and no budget to speak of, a sidecar on a free
    port, short polls."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        # The in-memory broker's URL names a host that is not loopback, and no wire.
        "allow_plaintext": True,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "signing_keys": TEST_SIGNING_KEYS,
        "hmac_key": TEST_HMAC_KEY,
        "callers": TEST_CALLERS,
        "source_hash_rate_per_s": 1e6,
        "source_hash_burst": 1_000_000,
        "jwt_keys": TEST_JWT_KEYS,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8192,
        "argon2_parallelism": 1,
        "hash_workers": 2,
        "outbox_poll_s": 0.5,
        "readiness_probe_s": 0.5,
    }
    return Settings(**{**values, **overrides})


@asynccontextmanager
async def running_worker(
    broker: Broker, *, store: IdentityStore | None = None, **settings: Any
) -> AsyncIterator[Worker]:
    """A worker built by `build()` on `store` (the in-memory one unless given) and a
    connection to `broker`, consuming until the block ends; then stopped as SIGTERM stops
    it."""
    parts = await build(
        worker_settings(broker.url, **settings),
        store=store if store is not None else MemoryIdentityStore(),
        connection=await broker.connect(),
    )
    worker = Worker(parts)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()
        gc.unfreeze()  # the worker froze what existed at its start; this process lives on
