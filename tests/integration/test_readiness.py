"""/healthz and /readyz of the sidecar while the worker's dependencies come and go.

The outages are made for one worker only, never for the shared servers: its database is one of
its own that stops accepting connections, its vhost one of its own whose user loses its
permissions while the worker's connection is closed by the broker.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, set_connections_allowed, sign_up
from tests.support.eventually import eventually
from tests.support.vhosts import rabbitmqctl, vhost_connection_pids
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration

OUTAGE_TIMEOUT = 20.0


async def _readiness(worker: WorkerProcess) -> tuple[int, dict[str, object]]:
    status, body = await asyncio.to_thread(worker.http_get, "/readyz")
    return status, json.loads(body)


async def _wait_readiness(worker: WorkerProcess, status: int) -> dict[str, object]:
    async def answered() -> dict[str, object] | None:
        code, body = await _readiness(worker)
        return body if code == status else None

    body = await eventually(
        answered,
        timeout=OUTAGE_TIMEOUT,
        every=0.1,
        what=lambda: f"readiness {status}:\n{worker.log_tail()}",
    )
    assert body is not None
    return body


def _close_connections_of(vhost: str) -> int:
    pids = vhost_connection_pids(vhost)
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: cut this worker off the broker")
    return len(pids)


async def test_a_running_worker_is_alive_and_ready(worker: WorkerProcess) -> None:
    assert worker.http_get("/healthz") == (200, '{"status": "ok"}')
    assert await _readiness(worker) == (200, {"status": "ready"})


async def test_not_ready_while_the_database_refuses_connections_then_ready_again(
    isolated: Isolated,
) -> None:
    worker = isolated.start()

    await set_connections_allowed(isolated.database_url, False)
    try:
        down = await _wait_readiness(worker, 503)
        assert worker.http_get("/healthz")[0] == 200
    finally:
        await set_connections_allowed(isolated.database_url, True)
    await _wait_readiness(worker, 200)

    assert down["status"] == "not_ready"
    reasons = down["reasons"]
    assert isinstance(reasons, list)
    assert [r for r in reasons if r.startswith("database")], reasons
    assert not [r for r in reasons if r.startswith("broker")], reasons
    assert "postgres" not in json.dumps(down)  # no URL, user or password in the reason
    # And it works again: a command goes all the way through.
    caller = await isolated.bus()
    assert (await sign_up(caller, Person.new("dbback")))["version"] == 1


async def test_not_ready_while_the_broker_connection_is_cut_then_ready_again(
    isolated: Isolated,
) -> None:
    worker = isolated.start()

    # Without permissions on its vhost the worker cannot reconnect until they are back.
    rabbitmqctl("clear_permissions", "-p", isolated.vhost, "guest")
    try:
        assert _close_connections_of(isolated.vhost) >= 1
        down = await _wait_readiness(worker, 503)
        assert worker.http_get("/healthz")[0] == 200
    finally:
        rabbitmqctl("set_permissions", "-p", isolated.vhost, "guest", ".*", ".*", ".*")
    await _wait_readiness(worker, 200)

    reasons = down["reasons"]
    assert isinstance(reasons, list)
    assert [r for r in reasons if r.startswith("broker")], reasons
    assert "guest" not in json.dumps(down)
    # The consumers came back with the connection: commands are processed again.
    caller = await isolated.bus()
    assert (await sign_up(caller, Person.new("brokerback")))["version"] == 1
