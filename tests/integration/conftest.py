"""Fixtures for tests against the real RabbitMQ.

Each test session gets its own vhost (tests.support.vhosts), so its queues never meet another
run's (or a developer's running worker's) and nothing needs cleaning between runs. A broker
that is down is a failure, never a skip: a green run must mean the integration tests ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import migrated_database, worker_role
from tests.support import workers
from tests.support.bus import Bus
from tests.support.vhosts import BROKER, fresh_vhost


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A fresh vhost the guest user may use, deleted with everything in it at the end."""
    with fresh_vhost() as vhost:
        yield vhost


@pytest.fixture(scope="session")
def amqp_url(amqp_vhost: str) -> str:
    """The URL of the session's fresh vhost."""
    return f"{BROKER}/{amqp_vhost}"


@pytest.fixture(scope="session")
async def pg_worker_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """The session database as the worker's own role sees it: rows only, no DDL."""
    async with worker_role(pg_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def worker_env(amqp_url: str, pg_dsn: str, pg_worker_dsn: str) -> dict[str, str]:
    """Environment for `identity-worker run` against this session's vhost and database, as a
    restricted role (the owner's URL is there for the migration on start)."""
    return workers.worker_env(amqp_url, pg_worker_dsn, pg_dsn)


@pytest.fixture(scope="session")
def worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[workers.WorkerProcess]:
    """One worker shared by the tests that only talk to it through the broker."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    process = workers.WorkerProcess(worker_env, log).start()
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
def start_worker(
    worker_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., workers.WorkerProcess]]:
    """Start extra workers (same vhost and database); all are stopped after the test."""
    started: list[workers.WorkerProcess] = []

    def start(**extra_env: str) -> workers.WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        process = workers.WorkerProcess({**worker_env, **extra_env}, log)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.alive():
            process.kill()


@pytest.fixture
async def bus(amqp_url: str, worker: workers.WorkerProcess) -> AsyncIterator[Bus]:
    """A caller on the session's vhost, with its own reply, event and dead-letter queues."""
    opened = await Bus.open(amqp_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="module")
def private_amqp_vhost() -> Iterator[str]:
    """A vhost no worker runs on, for tests that declare and drain the queues themselves."""
    with fresh_vhost() as vhost:
        yield vhost


@pytest.fixture(scope="module")
def private_amqp_url(private_amqp_vhost: str) -> str:
    return f"{BROKER}/{private_amqp_vhost}"


@dataclass
class Isolated:
    """A vhost and a database of a test's own, and the workers it started on them.

    Workers on another vhost must not share the session database: every relay publishes every
    unpublished outbox row of its database, so it would carry the shared worker's events to the
    wrong vhost (and the other way round).
    """

    vhost: str
    amqp_url: str
    database_url: str  # the owner's: what tests inspect with
    env: dict[str, str]
    log_dir: Path
    workers: list[workers.WorkerProcess] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)

    def worker(self, **extra_env: str) -> workers.WorkerProcess:
        """A worker process on this vhost and database, not started yet."""
        log = self.log_dir / f"isolated-worker-{len(self.workers)}.log"
        process = workers.WorkerProcess({**self.env, **extra_env}, log)
        self.workers.append(process)
        return process

    def start(self, **extra_env: str) -> workers.WorkerProcess:
        return self.worker(**extra_env).start()

    async def bus(self) -> Bus:
        """A caller with captures on this vhost (closed after the test); it publishes to
        identity.commands, so a worker must have declared the topology first."""
        opened = await Bus.open(self.amqp_url)
        self.buses.append(opened)
        return opened


@pytest.fixture
async def isolated(tmp_path: Path) -> AsyncIterator[Isolated]:
    """A fresh vhost and a fresh migrated database; its workers are killed afterwards."""
    with fresh_vhost() as vhost:
        async with migrated_database() as dsn, worker_role(dsn) as worker_dsn:
            amqp_url = f"{BROKER}/{vhost}"
            env = workers.worker_env(amqp_url, worker_dsn, dsn)
            place = Isolated(vhost, amqp_url, dsn, env, tmp_path)
            try:
                yield place
            finally:
                for opened in place.buses:
                    await opened.close()
                for process in place.workers:
                    if process.alive():
                        process.kill()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the session database, to check what the worker committed."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()
