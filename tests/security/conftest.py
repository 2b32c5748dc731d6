"""The security suite: the shipped broker permissions loaded into a fresh vhost with real users
(random passwords), and the worker running as its own user with a caller policy over them.

Each test plays an attacker holding the credentials of one of those users (a neighbouring
service on the same vhost, the usual way in) and checks that the promise holds. `guest`
stands for the operator: it may do anything on the vhost, and observes (dead letters,
queues) or plays a neighbour with the broad permissions the old docs implied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.conftest import worker_role
from tests.support import workers
from tests.support.deployment import Deployment, shipped_deployment
from tests.support.security import OPERATOR, Connector, Observer, WorkerControl
from tests.support.vhosts import BROKER, rabbitmqctl

# Least privilege for the web gateway, everything for the admin tool (the example of
# deploy/rabbitmq/README.md).
WEB_GRANTS = (
    "session.start,session.verify,session.end,account.create,"
    "account.get@self,account.update@self,session.end_all@self"
)


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    with shipped_deployment() as deployed:
        # The operator: everything on the vhost (no impersonator tag: guest is administrator).
        rabbitmqctl("set_permissions", "-p", deployed.vhost, "guest", ".*", ".*", ".*")
        yield deployed


@pytest.fixture(scope="session")
def policy(deployment: Deployment) -> str:
    web, admin = deployment.user("web-gateway"), deployment.user("admin-tool")
    return f"{web}={WEB_GRANTS};{admin}=*"


@pytest.fixture(scope="session")
async def pg_worker_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """The session database as the worker's own role sees it: rows only, no DDL."""
    async with worker_role(pg_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def worker_control(
    deployment: Deployment,
    policy: str,
    pg_dsn: str,
    pg_worker_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerControl]:
    """The worker as `identity-worker` (production mode, its own database role), with
    IDENTITY_CALLERS over the deployment's users; a test may stop and start it (the next test
    finds it running again)."""
    env = workers.worker_env(
        deployment.url("identity-worker"), pg_worker_dsn, pg_dsn, IDENTITY_CALLERS=policy
    )
    control = WorkerControl(env, tmp_path_factory.mktemp("security-worker"))
    try:
        yield control
    finally:
        control.stop()


@pytest.fixture
def worker(worker_control: WorkerControl) -> workers.WorkerProcess:
    return worker_control.running()


@pytest.fixture
async def observer(
    deployment: Deployment, worker: workers.WorkerProcess
) -> AsyncIterator[Observer]:
    """The operator's view: every dead letter from now on, and queue depths."""
    opened = await Observer.open(f"{BROKER}/{deployment.vhost}")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def connect(
    deployment: Deployment, worker: workers.WorkerProcess
) -> AsyncIterator[Connector]:
    """`await connect("web-gateway")`: a connection as that shipped user (or as the operator,
    OPERATOR), closed afterwards."""
    opened: list[AbstractRobustConnection] = []

    async def as_user(shipped: str) -> AbstractRobustConnection:
        url = f"{BROKER}/{deployment.vhost}" if shipped == OPERATOR else deployment.url(shipped)
        connection = await aio_pika.connect_robust(url)
        opened.append(connection)
        return connection

    yield as_user
    for connection in opened:
        await connection.close()


# The web gateway's rate in the rated worker; every other caller gets RATED_DEFAULT.
WEB_RATE = 5
RATED_DEFAULT = 500


@pytest.fixture
def rated_worker(
    worker_control: WorkerControl,
    deployment: Deployment,
    policy: str,
    pg_dsn: str,
    pg_worker_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[workers.WorkerProcess]:
    """The worker with IDENTITY_CALLER_RATES in place of the suite's: the suite's is stopped
    first (the rates are per worker, so one worker must see every command), and the next test
    that asks for it starts it again."""
    worker_control.stop()
    rates = f"{deployment.user('web-gateway')}={WEB_RATE}/s;*={RATED_DEFAULT}/s"
    env = workers.worker_env(
        deployment.url("identity-worker"),
        pg_worker_dsn,
        pg_dsn,
        IDENTITY_CALLERS=policy,
        IDENTITY_CALLER_RATES=rates,
    )
    control = WorkerControl(env, tmp_path_factory.mktemp("rated-worker"))
    try:
        yield control.running()
    finally:
        control.stop()


@pytest.fixture
async def rated_connect(
    deployment: Deployment, rated_worker: workers.WorkerProcess
) -> AsyncIterator[Connector]:
    """`connect`, for the rated worker."""
    opened: list[AbstractRobustConnection] = []

    async def as_user(shipped: str) -> AbstractRobustConnection:
        connection = await aio_pika.connect_robust(deployment.url(shipped))
        opened.append(connection)
        return connection

    yield as_user
    for connection in opened:
        await connection.close()
