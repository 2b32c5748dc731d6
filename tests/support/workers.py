"""Real worker processes for tests: `identity-worker run` as a subprocess, ready-checked
through its sidecar, stopped with SIGTERM or killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import orjson

from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.tokens import format_signing_key, new_signing_key
from tests.support.eventually import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
WORKER_BIN = Path(sys.executable).with_name("identity-worker")

# Keys made for this test session (never written in the repository), shared by every worker
# of the session so that they accept each other's tokens.
TEST_SIGNING_KEYS = format_signing_key(new_signing_key())
TEST_HMAC_KEY = new_hmac_key()
TEST_JWT_KEYS = format_jwt_key(new_jwt_key())
# The tests publish as the broker's guest user, and may send everything.
TEST_CALLERS = "guest=*"
# Cheap argon2id: the tests are about delivery guarantees, not hash strength.
FAST_ARGON2 = {
    "IDENTITY_ARGON2_TIME_COST": "1",
    "IDENTITY_ARGON2_MEMORY_KIB": "8192",
    "IDENTITY_ARGON2_PARALLELISM": "1",
}
# An argon2 budget per source that no test reaches (they all publish as one source) unless
# it sets its own.
UNLIMITED_BUDGET = {
    "IDENTITY_SOURCE_HASH_RATE_PER_S": "1000000",
    "IDENTITY_SOURCE_HASH_BURST": "1000000",
}
# Production mode, as a deployment runs (a test about dev mode sets IDENTITY_DEV_MODE).
PRODUCTION = {
    "IDENTITY_SIGNING_KEYS": TEST_SIGNING_KEYS,
    "IDENTITY_HMAC_KEY": TEST_HMAC_KEY,
    "IDENTITY_CALLERS": TEST_CALLERS,
    "IDENTITY_JWT_KEYS": TEST_JWT_KEYS,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(
    amqp_url: str, database_url: str, migration_url: str | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a worker process: production mode, `database_url` its own
    (restricted) role, `migration_url` the owner's, for the migration on start."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDENTITY_")}
    env.update(FAST_ARGON2)
    env.update(UNLIMITED_BUDGET)
    env.update(PRODUCTION)
    env.update(
        IDENTITY_AMQP_URL=amqp_url,
        IDENTITY_DATABASE_URL=database_url,
        IDENTITY_MIGRATION_DATABASE_URL=migration_url or "",
        IDENTITY_HTTP_HOST="127.0.0.1",
        IDENTITY_READINESS_PROBE_S="0.5",
        IDENTITY_OUTBOX_POLL_S="0.5",
        IDENTITY_USE_UVLOOP="true",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """One `identity-worker run` process with its own sidecar port and log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**env, "IDENTITY_HTTP_PORT": str(self.port)}
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 60.0) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(WORKER_BIN), "run"],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(ready_timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def readiness(self) -> int:
        try:
            return self.http_get("/readyz")[0]
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_readiness(200, timeout)

    def wait_readiness(self, status: int, timeout: float) -> None:
        def reached() -> bool:
            if not self.alive():  # no use waiting any longer
                code = self.process and self.process.returncode
                raise AssertionError(f"worker exited ({code}):\n{self.log_tail()}")
            return self.readiness() == status

        eventually_sync(
            reached,
            timeout=timeout,
            every=0.1,
            what=lambda: f"readiness {status}:\n{self.log_tail()}",
        )

    def metrics(self) -> str:
        return self.http_get("/metrics")[1]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.process is not None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        assert self.process is not None
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=30)
        self._close_log()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self, msg: str) -> list[dict[str, Any]]:
        """The worker's JSON log lines whose `msg` is `msg`, parsed, in order."""
        lines = (orjson.loads(line) for line in self.log_text().splitlines() if line[:1] == "{")
        return [line for line in lines if line.get("msg") == msg]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
