"""The `store` fixture: every store contract test runs once on each IdentityStore
implementation; `service` and `passwords` are the service on PostgreSQL, for the races a row
lock decides; the `broker` fixture: every broker and pipeline test runs once on the in-memory
broker double and once on RabbitMQ.

The contract suite gets a database of its own: its outbox tests publish whatever is pending,
which must not race the relay of a worker that another suite started on `pg_dsn`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from services.identity import IdentityService
from services.passwords import HashingPool
from stores import IdentityStore, MemoryIdentityStore, PostgresIdentityStore
from tests.conftest import migrated_database
from tests.support.bus import Bus
from tests.support.factory import running_service
from tests.support.pipeline import MEMORY, RABBITMQ, Broker, running_worker
from tests.support.vhosts import BROKER, fresh_vhost
from worker.app import Worker


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    async with migrated_database() as dsn:
        yield dsn


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> IdentityStore:
    if request.param == "memory":
        return MemoryIdentityStore()
    # Looked up only for this parameter, so the memory runs never need a database.
    pg_store: IdentityStore = request.getfixturevalue("pg_store")
    return pg_store


@pytest.fixture
async def pg_service(
    pg_store: PostgresIdentityStore,
) -> AsyncIterator[tuple[IdentityService, HashingPool]]:
    """The service on PostgreSQL, built as the worker builds it, with cheap argon2."""
    async with running_service(pg_store) as built:
        yield built


@pytest.fixture
def service(pg_service: tuple[IdentityService, HashingPool]) -> IdentityService:
    return pg_service[0]


@pytest.fixture
def passwords(pg_service: tuple[IdentityService, HashingPool]) -> HashingPool:
    return pg_service[1]


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A fresh vhost on the local RabbitMQ for this session's runs on the real broker."""
    with fresh_vhost() as vhost:
        yield f"{BROKER}/{vhost}"


@pytest.fixture(scope="module", params=[MEMORY, pytest.param(RABBITMQ, marks=pytest.mark.rabbitmq)])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each test that takes it runs twice: on the in-memory broker double, and on RabbitMQ
    (deselect that one with `-m "not rabbitmq"`)."""
    if request.param == MEMORY:
        return Broker.in_memory()
    # Looked up only for this parameter, so the memory runs never need RabbitMQ.
    return Broker.rabbitmq(request.getfixturevalue("rabbitmq_url"))


@pytest.fixture
async def connection(broker: Broker) -> AsyncIterator[AbstractRobustConnection]:
    """A connection of the test's own to `broker`, closed afterwards."""
    opened = await broker.connect()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="module")
async def pipeline_worker(broker: Broker) -> AsyncIterator[Worker]:
    """One worker per module and broker, built by `build()` in this process on the in-memory
    store (tests use unique emails and keys, so they share it)."""
    async with running_worker(broker) as worker:
        yield worker


@pytest.fixture
async def bus(broker: Broker, pipeline_worker: Worker) -> AsyncIterator[Bus]:
    """A caller on `broker` with its own reply, event and dead-letter captures."""
    opened = await Bus.attach(await broker.connect())
    try:
        yield opened
    finally:
        await opened.close()
