"""The broker drops the worker's connection in the middle of a backlog: the robust connection
comes back, unacked commands are redelivered and answered from their idempotency records, and
nothing is done twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, assert_signed_up_once, key
from tests.support.vhosts import rabbitmqctl, vhost_connection_pids

pytestmark = pytest.mark.integration

BACKLOG = 30
# Slow enough hashing, on one thread, that the backlog outlasts the cut.
SLOW_HASHING = {
    "IDENTITY_ARGON2_TIME_COST": "3",
    "IDENTITY_ARGON2_MEMORY_KIB": "65536",
    "IDENTITY_HASH_WORKERS": "1",
}


def _connections_of(vhost: str) -> list[str]:
    return vhost_connection_pids(vhost)


async def test_a_connection_lost_mid_backlog_loses_nothing_and_repeats_nothing(
    isolated: Isolated,
) -> None:
    worker = isolated.start(**SLOW_HASHING)
    worker_connections = _connections_of(isolated.vhost)  # before the caller connects
    assert worker_connections
    caller = await isolated.bus()
    tag = uuid.uuid4().hex[:8]
    people = [Person.new(f"cut{tag}n{n}") for n in range(BACKLOG)]
    sent = {
        await caller.command("account.create", person.create_payload(), key("cut")): person
        for person in people
    }
    await caller.wait_for(lambda: len(caller.replies) >= 3)

    for pid in worker_connections:
        await asyncio.to_thread(
            rabbitmqctl, "close_connection", pid, "test: connection lost mid-backlog"
        )

    await caller.wait_for(lambda: set(sent) <= set(caller.replies), timeout=60)
    event_ids = await assert_signed_up_once(caller, sent, isolated.database_url, f"cut{tag}n%")
    # Every event reaches the subscribers, whichever connection published it.
    await caller.wait_for(lambda: set(event_ids) <= {e["event_id"] for e in caller.events})
    assert _connections_of(isolated.vhost) != worker_connections  # it really reconnected
    worker.wait_ready(20)
    # The cut caught deliveries in the middle of their work (the prefetch keeps two handed
    # out): they came back and were answered. One whose ack was on the wire when the
    # connection went is delivered and answered twice, the same way both times (above).
    done = worker.log_entries("command")
    assert any(line["redelivered"] for line in done), "the cut caught nothing in flight"
    assert {line["correlation_id"] for line in done} == set(sent)
    first_deliveries = [line["correlation_id"] for line in done if not line["redelivered"]]
    assert len(first_deliveries) == len(set(first_deliveries))
