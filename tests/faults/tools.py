"""The faults themselves, and the environment each scenario runs in.

An `Environment` is a fresh vhost and a fresh migrated database: the outbox relay of any worker
on a database publishes to that worker's vhost, so a scenario that shared either with another
test would see (or lose) someone else's events. Workers are started and stopped off the event
loop (`start`/`kill`/`terminate` wait synchronously), so the load keeps flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import migrated_database, worker_role
from tests.support import workers
from tests.support.checker import rabbitmqctl

BROKER = "amqp://guest:guest@127.0.0.1:5672"
PG_VERSION_DIR = Path("/etc/postgresql")


@dataclass(repr=False)
class Environment:
    vhost: str
    amqp_url: str
    dsn: str
    log_dir: Path
    env: dict[str, str]
    workers: list[workers.WorkerProcess] = field(default_factory=list)

    async def start_worker(self, **extra: str) -> workers.WorkerProcess:
        log = self.log_dir / f"worker-{len(self.workers)}.log"
        process = workers.WorkerProcess({**self.env, **extra}, log)
        self.workers.append(process)
        return await asyncio.to_thread(process.start)

    def alive(self) -> list[workers.WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def logs(self) -> list[str]:
        return [w.log_text() for w in self.workers]

    def metrics(self) -> list[str]:
        return [w.metrics() for w in self.alive()]


@asynccontextmanager
async def environment(log_dir: Path, **extra_env: str) -> AsyncIterator[Environment]:
    vhost = f"identity-faults-{secrets.token_hex(4)}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
        )
        async with migrated_database() as dsn, worker_role(dsn) as worker_dsn:
            amqp_url = f"{BROKER}/{vhost}"
            env = Environment(
                vhost,
                amqp_url,
                dsn,
                log_dir,
                workers.worker_env(amqp_url, worker_dsn, dsn, **extra_env),
            )
            try:
                yield env
            finally:
                for process in env.workers:
                    if process.alive():
                        await asyncio.to_thread(process.kill)
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


# -- broker faults ---------------------------------------------------------------------------


def close_vhost_connections(vhost: str, reason: str = "fault injection") -> int:
    """Close every client connection of `vhost` (the workers' and the test's own), leaving
    the rest of the broker alone; returns how many were closed."""
    out = rabbitmqctl("list_connections", "-q", "pid", "vhost")
    closed = 0
    for line in out.splitlines():
        pid, _, host = line.partition("\t")
        if host.strip() == vhost:
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid.strip(), reason],
                capture_output=True,
                timeout=30,
                check=False,
            )
            closed += 1
    return closed


def broker_running() -> bool:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def ensure_broker() -> None:
    """Start RabbitMQ if it does not answer, and wait until it does."""
    if broker_running():
        return
    subprocess.run(["rabbitmq-server", "-detached"], timeout=60, check=False)
    subprocess.run(["rabbitmqctl", "await_startup"], timeout=120, check=False)
    if not broker_running():
        raise RuntimeError("RabbitMQ could not be started")


# -- database faults -------------------------------------------------------------------------


def _pg_version() -> str:
    return sorted(p.name for p in PG_VERSION_DIR.iterdir())[-1]


def _pg_ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", action],
        capture_output=True,
        timeout=120,
        check=False,
    )


def pg_ready() -> bool:
    if shutil.which("pg_isready") is None:
        raise RuntimeError("pg_isready is not on PATH")
    done = subprocess.run(
        ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], timeout=30, check=False
    )
    return done.returncode == 0


def wait_pg_ready(timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg_ready():
            return True
        time.sleep(0.2)
    return False


def restart_postgres() -> None:
    """Restart the whole server (every database on it): kept as short as it can be."""
    try:
        _pg_ctl("restart")
    finally:
        ensure_postgres()


def stop_postgres() -> None:
    """Stop the whole server: callers must `ensure_postgres()` in a `finally`."""
    _pg_ctl("stop")


def ensure_postgres() -> None:
    """Start PostgreSQL if it does not answer, and wait until it does."""
    if wait_pg_ready(5):
        return
    _pg_ctl("start")
    if not wait_pg_ready(60):
        raise RuntimeError("PostgreSQL could not be started")


# -- readiness -------------------------------------------------------------------------------


class ReadinessWatch:
    """Polls a worker's /readyz from a thread every `interval_s`, recording each change of
    status (0 = no answer), so a fault's 503 window is seen however short it is."""

    def __init__(self, worker: workers.WorkerProcess, interval_s: float = 0.01) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ReadinessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            status = self.worker.readiness() if self.worker.alive() else 0
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            self._stop.wait(self.interval_s)

    def saw(self, status: int) -> bool:
        return status in self.statuses

    async def wait_for(self, status: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.statuses and self.statuses[-1] == status):
            if time.monotonic() > deadline:
                raise AssertionError(f"readiness never became {status}: {self.statuses}")
            await asyncio.sleep(0.02)

    async def wait_seen(self, status: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.saw(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"readiness never showed {status}: {self.statuses}")
            await asyncio.sleep(0.02)
