"""The worker's HTTP sidecar under slow clients (issue 13, finding 10): 400 connections that
send half a request and wait made 403 threads."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.support.eventually import eventually_sync
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.security

SLOW_CLIENTS = 400


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for process {pid}")


def test_400_slow_connections_make_no_threads_and_healthz_still_answers(
    worker: WorkerProcess,
) -> None:
    before = _threads(worker.pid)
    clients = []
    try:
        for _ in range(SLOW_CLIENTS):
            client = socket.create_connection(("127.0.0.1", worker.port), timeout=5)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: worker\r\n")  # and nothing more
            clients.append(client)
        eventually_sync(
            lambda: worker.http_get("/healthz", timeout=2)[0] == 200,
            timeout=10,
            what="/healthz answering under 400 slow connections",
        )
        started = time.monotonic()
        status, _ = worker.http_get("/healthz", timeout=2)
        answered_in = time.monotonic() - started
        during = _threads(worker.pid)
    finally:
        for client in clients:
            client.close()

    assert status == 200
    assert answered_in < 1.0
    # The sidecar serves every connection from one thread; the worker's own threads (argon2
    # pool, asyncpg, ...) are what they were.
    assert during <= before + 2, (before, during)
    print(f"threads: {before} before, {during} with {SLOW_CLIENTS} slow connections")
