"""The benchmark's surroundings: a throw-away vhost and database, worker processes, CPU and
memory readings from /proc."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.passwords import HUGE_PAGES_TUNABLE, malloc_hugetlb

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The PostgreSQL server the benchmarks use, host:port: the machine's by default; another one
# (its own settings, e.g. a cluster of scripts/pg-failover.sh) with BENCH_POSTGRES.
PG_SERVER = os.environ.get("BENCH_POSTGRES", "127.0.0.1:5432")
PG_ADMIN = f"postgresql://postgres@{PG_SERVER}/postgres"
TICKS = os.sysconf("SC_CLK_TCK")


def as_deployed() -> None:
    """Run this script again, if need be, in the environment the worker is deployed with
    (the Dockerfile, `make run`): argon2's memory on huge pages. The worker processes inherit
    it, and the argon2 ceiling, measured in this process, hashes as they do. A hugetlb value
    given explicitly (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to measure without) is kept."""
    if malloc_hugetlb() is not None:
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = {**os.environ, "GLIBC_TUNABLES": ":".join([*tunables, HUGE_PAGES_TUNABLE])}
    # orig_argv keeps the interpreter's own options (-X, -W, -m) as well as the script's.
    os.execve(sys.executable, sys.orig_argv, env)  # noqa: S606 (the same command again)


def git_head() -> str:
    """The checkout's commit, with "+changes" if tracked files differ from it: what a run ran
    (worker processes import from this checkout when they start)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Sandbox:
    """A fresh vhost and database, removed by `close()` whatever happened."""

    name: str = field(default_factory=lambda: "bench_" + secrets.token_hex(4))
    vhost_made: bool = False
    db_made: bool = False
    role_made: bool = False

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.name}"

    @property
    def database_url(self) -> str:
        """The owner's (a superuser): migrations and the benchmark's own writes."""
        return f"postgresql://postgres@{PG_SERVER}/{self.name}"

    @property
    def worker_role(self) -> str:
        return f"{self.name}_worker"

    @property
    def worker_database_url(self) -> str:
        """The worker's own role, rows only: production refuses to run it as a superuser."""
        return f"postgresql://{self.worker_role}@{PG_SERVER}/{self.name}"

    async def open(self) -> None:
        rabbitmqctl("add_vhost", self.name)
        self.vhost_made = True
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
            self.db_made = True
            await conn.execute(f'CREATE ROLE "{self.worker_role}" LOGIN')
            self.role_made = True
        finally:
            await conn.close()

    async def close(self) -> None:
        if self.vhost_made:
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_vhost", self.name)
        if self.db_made:
            with contextlib.suppress(Exception):
                conn = await asyncpg.connect(PG_ADMIN)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                    if self.role_made:
                        await conn.execute(f'DROP ROLE IF EXISTS "{self.worker_role}"')
                finally:
                    await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_cpu(stat: Path) -> float:
    """User + system CPU seconds from a `/proc/.../stat` file (0 if it is gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, its exited threads included."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each live thread of a process, by thread id."""
    tasks = Path(f"/proc/{pid}/task")
    return {int(task.name): _stat_cpu(task / "stat") for task in tasks.iterdir()}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


class CpuMeter:
    """CPU seconds spent by the worker(s), RabbitMQ, PostgreSQL and this process over a span.

    RabbitMQ and PostgreSQL processes are listed at both ends of the span, so a backend
    started during it (the worker's pool grows under load) is counted from its start.
    """

    def __init__(self, workers: list[int]) -> None:
        self.workers = workers
        self.named = {"rabbitmq": "beam.smp", "postgres": "postgres"}

    def _sample(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"worker": sum(cpu_seconds(p) for p in self.workers)}
        for group, comm in self.named.items():
            sample[group] = {pid: cpu_seconds(pid) for pid in pids_named(comm)}
        times = os.times()
        sample["bench"] = times.user + times.system
        busy, total = machine_busy()
        sample["_busy"], sample["_total"] = busy, total
        return sample

    @contextlib.contextmanager
    def span(self, into: dict[str, float]) -> Iterator[None]:
        before, started = self._sample(), time.perf_counter()
        yield
        after, wall = self._sample(), time.perf_counter() - started
        used = {name: after[name] - before[name] for name in ("worker", "bench")}
        for group in self.named:
            used[group] = sum(t - before[group].get(pid, 0.0) for pid, t in after[group].items())
        for name in ("worker", "rabbitmq", "postgres", "bench"):
            into[f"cpu_{name}_cores"] = round(used[name] / wall, 3)
        total = after["_total"] - before["_total"]
        into["machine_busy_pct"] = round(100 * (after["_busy"] - before["_busy"]) / total, 1)


class WorkerProcess:
    """`identity-worker run` as a subprocess, its sidecar on a free port, logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, cpus: str | None = None) -> None:
        self.port = free_port()
        self.env = {**env, "IDENTITY_HTTP_PORT": str(self.port)}
        self.log_path = log_path
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> WorkerProcess:
        command = [str(BIN / "identity-worker"), "run"]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s; see {self.log_path}")

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.pid)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The load generator publishes as guest, every command from one source: production mode with a
# policy that lets guest send everything, and an argon2 budget per source it never reaches.
BENCH_CALLERS = "guest=*"
BENCH_HMAC_KEY = new_hmac_key()
# One access-token key per benchmark process: every worker of a run signs with it.
_JWT_KEYS = format_jwt_key(new_jwt_key())


def worker_env(sandbox: Sandbox, signing_keys: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    env.update(
        IDENTITY_AMQP_URL=sandbox.amqp_url,
        IDENTITY_DATABASE_URL=sandbox.worker_database_url,
        IDENTITY_MIGRATION_DATABASE_URL=sandbox.database_url,
        IDENTITY_SIGNING_KEYS=signing_keys,
        IDENTITY_HMAC_KEY=BENCH_HMAC_KEY,
        IDENTITY_CALLERS=BENCH_CALLERS,
        IDENTITY_SOURCE_HASH_RATE_PER_S="1000000",
        IDENTITY_SOURCE_HASH_BURST="1000000",
        IDENTITY_JWT_KEYS=_JWT_KEYS,
        IDENTITY_HTTP_HOST="127.0.0.1",
        IDENTITY_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env
