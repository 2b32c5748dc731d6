"""Virtual hosts of the tests' own on the local RabbitMQ, made and dropped with rabbitmqctl.

Each test session (or test) that talks to the real broker gets a fresh vhost, so its queues
never meet another run's (or a developer's running worker's) and nothing needs cleaning
between runs. A broker that is down is a failure, never a skip.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# The broker the vhosts are created on by the local rabbitmqctl.
BROKER = "amqp://guest:guest@127.0.0.1:5672"


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl, failing the test run with its own output when it does not succeed."""
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl is not on PATH: the tests on RabbitMQ need a local broker")
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"rabbitmqctl {args[0]} timed out: is RabbitMQ running?")
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def vhost_connection_pids(vhost: str) -> list[str]:
    """The pids of the client connections of `vhost` only. (`list_connections -p` does not
    filter on RabbitMQ 3.10, so the vhost column is read and matched here.)"""
    listing = rabbitmqctl("list_connections", "pid", "vhost", "--silent")
    pids = []
    for line in listing.splitlines():
        pid, _, host = line.strip().partition("\t")
        if pid.startswith("<") and host.strip() == vhost:
            pids.append(pid)
    return pids


@contextmanager
def fresh_vhost() -> Iterator[str]:
    """A vhost of its own (the guest user may use it), deleted with everything in it."""
    vhost = f"identity-test-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)
