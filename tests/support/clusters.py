"""A three-node RabbitMQ cluster and a PostgreSQL primary with a standby, on this machine, for
tests: thin drivers of scripts/rabbit-cluster.sh and scripts/pg-failover.sh.

Each instance takes a base directory, node names and ports of its own (free ports picked at
random), so a test run never meets a cluster someone started by hand with the defaults, nor
another run's. A script that fails raises `ScriptFailed` with its output: a missing RabbitMQ
or PostgreSQL installation fails the test, it never skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RABBIT_SCRIPT = ROOT / "scripts" / "rabbit-cluster.sh"
PG_SCRIPT = ROOT / "scripts" / "pg-failover.sh"
# The system temporary directory, not pytest's: the postgres user must reach the data there.
TMP = Path(tempfile.gettempdir())
MACHINE_COOKIES = (Path("/var/lib/rabbitmq/.erlang.cookie"), Path.home() / ".erlang.cookie")


class ScriptFailed(AssertionError):
    """A cluster script exited non-zero (or hung); the message carries its output."""


def run_script(script: Path, env: dict[str, str], *args: str, timeout: float = 180) -> str:
    try:
        done = subprocess.run(
            [str(script), *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ScriptFailed(f"{script.name} {' '.join(args)} hung for {timeout} s") from exc
    if done.returncode != 0:
        raise ScriptFailed(
            f"{script.name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_base(
    count: int,
    *,
    low: int,
    high: int,
    also_offset: int | None = None,
    offsets: tuple[int, ...] = (),
) -> int:
    """A base such that base+1 .. base+count are free (and, with `also_offset` and each of
    `offsets`, the same ports shifted by it), below the kernel's ephemeral range."""
    shifts = (0, *(() if also_offset is None else (also_offset,)), *offsets)
    for _ in range(200):
        base = random.randrange(low, high)
        ports = [base + n + shift for n in range(1, count + 1) for shift in shifts]
        if all(port_free(p) for p in ports):
            return base
    raise ScriptFailed(f"no {count} free ports in {low}-{high}")


def wait_until(
    check: Callable[[], object], what: str, timeout: float = 60.0, every: float = 0.2
) -> float:
    """Poll `check()` until it is truthy; returns the seconds it took."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except (ScriptFailed, OSError) as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


def machine_rabbitmq_state() -> dict[str, str]:
    """What must not change when a local cluster comes and goes: the machine broker's cookie
    (and the one in this user's home, if any), and the nodes of the machine broker's cluster."""
    state = {}
    for path in MACHINE_COOKIES:
        state[str(path)] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"
        )
    status = subprocess.run(
        ["rabbitmqctl", "-q", "cluster_status", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if status.returncode != 0:
        raise AssertionError(f"the machine's RabbitMQ does not answer: {status.stderr.strip()}")
    # Only who is in the cluster: alarms and the like may change under other tests.
    members = json.loads(status.stdout)
    state["disk_nodes"] = ",".join(sorted(members["disk_nodes"]))
    state["running_nodes"] = ",".join(sorted(members["running_nodes"]))
    return state


@dataclass
class RabbitCluster:
    """scripts/rabbit-cluster.sh with a directory, node names and ports of its own."""

    directory: Path
    name: str
    port: int
    dist_port: int
    vhost: str = "identity"
    user: str = "identity"
    password: str = "identity"
    started_s: float | None = None
    nodes: int = 3
    # ca.pem, server.pem, server.key: the nodes also listen for AMQP over TLS (tls_url).
    tls_dir: Path | None = None

    # The TLS port of node N is the AMQP port + this (the script's default).
    TLS_OFFSET = 10

    @classmethod
    def fresh(cls, *, nodes: int = 3, tls_dir: Path | None = None) -> RabbitCluster:
        offsets = (cls.TLS_OFFSET,) if tls_dir is not None else ()
        port = free_port_base(nodes, low=15000, high=19000, also_offset=5000, offsets=offsets)
        tag = secrets.token_hex(3)
        return cls(
            TMP / f"identity-rabbit-{tag}",
            f"identity-t{tag}-",
            port,
            port + 5000,
            nodes=nodes,
            tls_dir=tls_dir,
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "RABBIT_CLUSTER_DIR": str(self.directory),
            "RABBIT_CLUSTER_NAME": self.name,
            "RABBIT_CLUSTER_PORT": str(self.port),
            "RABBIT_CLUSTER_DIST_PORT": str(self.dist_port),
            "RABBIT_CLUSTER_USER": self.user,
            "RABBIT_CLUSTER_PASSWORD": self.password,
            "RABBIT_CLUSTER_VHOST": self.vhost,
            "RABBIT_CLUSTER_NODES": str(self.nodes),
            "RABBIT_CLUSTER_TLS_DIR": str(self.tls_dir or ""),
        }

    def run(self, *args: str, timeout: float = 180) -> str:
        return run_script(RABBIT_SCRIPT, self.env, *args, timeout=timeout)

    def node(self, n: int) -> str:
        return f"{self.name}{n}@localhost"

    def number(self, node: str) -> int:
        """1, 2 or 3 for one of this cluster's node names."""
        short, _, host = node.partition("@")
        assert host == "localhost", node
        assert short.startswith(self.name), node
        return int(short.removeprefix(self.name))

    def url(self, n: int) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port + n}/{self.vhost}"

    def tls_url(self, n: int, host: str = "127.0.0.1") -> str:
        """Node `n`'s AMQP-over-TLS listener (a cluster started with `tls_dir`)."""
        port = self.port + self.TLS_OFFSET + n
        return f"amqps://{self.user}:{self.password}@{host}:{port}/{self.vhost}"

    @property
    def urls(self) -> list[str]:
        return [self.url(n) for n in range(1, self.nodes + 1)]

    def start(self) -> None:
        started = time.monotonic()
        self.run("start")
        self.started_s = time.monotonic() - started

    def stop(self, n: int) -> None:
        self.run("stop", str(n))

    def kill(self, n: int) -> None:
        self.run("kill", str(n))

    def restart(self, n: int) -> None:
        self.run("restart", str(n))

    def leader(self, queue: str) -> int:
        """The number of the node leading quorum queue `queue`."""
        return self.number(self.run("leader", queue).strip())

    def ctl(self, n: int, *args: str) -> str:
        return self.run("ctl", str(n), *args)

    def queue_members(self, n: int, queue: str) -> tuple[list[str], list[str]]:
        """(members, online members) of a quorum queue, as node `n` sees them."""
        listing = self.ctl(
            n, "list_queues", "-q", "-p", self.vhost, "name", "members", "online",
            "--no-table-headers",
        )  # fmt: skip
        for line in listing.splitlines():
            name, _, rest = line.partition("\t")
            if name == queue:
                members, _, online = rest.partition("\t")
                return _erlang_list(members), _erlang_list(online)
        raise AssertionError(f"no queue {queue} on node {n}:\n{listing}")

    def status(self) -> str:
        return self.run("status")

    def teardown(self) -> None:
        self.run("teardown", timeout=120)

    @contextlib.contextmanager
    def running(self) -> Iterator[RabbitCluster]:
        try:
            self.start()
            yield self
        finally:
            self.teardown()


def _erlang_list(text: str) -> list[str]:
    """`[a@h, b@h]` as printed by rabbitmqctl -> ["a@h", "b@h"]."""
    inner = text.strip().removeprefix("[").removesuffix("]")
    return [item.strip() for item in inner.split(",") if item.strip()]


@dataclass
class PgFailover:
    """scripts/pg-failover.sh with a directory and ports of its own."""

    directory: Path
    port_a: int
    port_b: int
    sync: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    standby: bool = True
    # ca.pem, server.pem, server.key: the nodes take TLS (ssl = on) with these.
    ssl_dir: Path | None = None

    @classmethod
    def fresh(
        cls, *, sync: bool = False, standby: bool = True, ssl_dir: Path | None = None
    ) -> PgFailover:
        base = free_port_base(2, low=25000, high=29000)
        tag = secrets.token_hex(3)
        return cls(
            TMP / f"identity-pg-{tag}",
            base + 1,
            base + 2,
            sync,
            standby=standby,
            ssl_dir=ssl_dir,
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "PG_FAILOVER_DIR": str(self.directory),
            "PG_FAILOVER_PORT_A": str(self.port_a),
            "PG_FAILOVER_PORT_B": str(self.port_b),
            "PG_FAILOVER_SYNC": "1" if self.sync else "0",
            "PG_FAILOVER_STANDBY": "1" if self.standby else "0",
            "PG_FAILOVER_SSL_DIR": str(self.ssl_dir or ""),
        }

    def run(self, *args: str, timeout: float = 180) -> str:
        started = time.monotonic()
        out = run_script(PG_SCRIPT, self.env, *args, timeout=timeout)
        self.timings[args[0]] = round(time.monotonic() - started, 2)
        return out

    def url(self, database: str = "postgres") -> str:
        """The libpq multi-host URL of both nodes, asking for the one that takes writes."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.port_a},127.0.0.1:{self.port_b}/{database}"
            "?target_session_attrs=read-write"
        )

    def node_url(self, node: str, database: str = "postgres") -> str:
        port = self.port_a if node == "a" else self.port_b
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def start(self) -> None:
        self.run("start")

    def promote(self) -> None:
        self.run("promote")

    def kill_primary(self) -> None:
        self.run("kill-primary")

    def stop_primary(self) -> None:
        self.run("stop-primary")

    def rejoin(self) -> None:
        self.run("rejoin")

    def status(self) -> str:
        return self.run("status")

    def teardown(self) -> None:
        self.run("teardown", timeout=120)

    @contextlib.contextmanager
    def running(self) -> Iterator[PgFailover]:
        try:
            self.start()
            yield self
        finally:
            self.teardown()
