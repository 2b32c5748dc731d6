"""The composition root on adapters it is given: no PostgreSQL, no RabbitMQ."""

from __future__ import annotations

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from messages.topology import COMMANDS_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE, UNROUTED_EXCHANGE
from stores import MemoryIdentityStore, TransientStoreError
from tests.support.memory_broker import MemoryBroker
from tests.support.pipeline import worker_settings
from worker.bootstrap import build
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE


async def test_build_wires_the_worker_on_the_store_and_connection_it_is_given() -> None:
    broker, store = MemoryBroker(), MemoryIdentityStore()
    connection = broker.connect()

    parts = await build(
        worker_settings("amqp://memory.invalid/"), store=store, connection=connection
    )
    try:
        assert parts.store is store
        assert parts.connection is connection
        # The topology was declared on the broker it was given.
        assert {PASSWORD_QUEUE, FAST_QUEUE, DEAD_QUEUE} <= set(broker.queues)
        assert {COMMANDS_EXCHANGE, UNROUTED_EXCHANGE, EVENTS_EXCHANGE} <= set(broker.exchanges)
    finally:
        await connection.close()
        parts.passwords.close()
        await store.close()


async def test_a_build_that_fails_closes_what_it_was_given() -> None:
    store = MemoryIdentityStore()
    connection = MemoryBroker().connect()
    await connection.close()  # opening a channel on it fails

    with pytest.raises(ChannelInvalidStateError):
        await build(worker_settings("amqp://memory.invalid/"), store=store, connection=connection)

    with pytest.raises(TransientStoreError):
        await store.ping()  # closed by the failed build, as a store it made would be
