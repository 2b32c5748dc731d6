"""Fixtures for tests against the real RabbitMQ.

Each test session gets its own vhost, so its queues never meet another run's (or a developer's
running worker's) and nothing needs cleaning between runs. A broker that is down is a failure,
never a skip: a green run must mean the integration tests ran.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

# The broker the vhosts are created on by the local rabbitmqctl.
BROKER = "amqp://guest:guest@127.0.0.1:5672"


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl, failing the test run with its own output when it does not succeed."""
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl is not on PATH: the integration tests need a local RabbitMQ")
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"rabbitmqctl {args[0]} timed out: is RabbitMQ running?")
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A fresh vhost the guest user may use, deleted with everything in it at the end."""
    vhost = f"identity-test-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def amqp_url(amqp_vhost: str) -> str:
    """The URL of the session's fresh vhost."""
    return f"{BROKER}/{amqp_vhost}"
