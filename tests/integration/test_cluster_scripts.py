"""The local cluster scripts themselves: scripts/rabbit-cluster.sh starts three clustered
RabbitMQ nodes whose quorum queues live on all three and outlive their leader, and
scripts/pg-failover.sh a streaming standby that a promotion turns into the primary the
multi-host URL finds. Both leave the machine's own RabbitMQ and PostgreSQL as they were."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.integration.conftest import BROKER
from tests.support.clusters import (
    PG_SCRIPT,
    RABBIT_SCRIPT,
    PgFailover,
    RabbitCluster,
    ScriptFailed,
    machine_rabbitmq_state,
    run_script,
    wait_until,
)

pytestmark = pytest.mark.integration

QUEUE = "identity.cluster-check"
# As the worker declares its command queues (worker/topology.py), minus the dead-lettering.
QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-delivery-limit": 5, "x-overflow": "reject-publish"}
MESSAGES = 200


async def publish(url: str, count: int) -> None:
    """`count` persistent messages into QUEUE through the node of `url`, every one confirmed."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(b"%d" % n, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=QUEUE,
                )
                for n in range(count)
            )
        )


async def depth(url: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


def new_leader(cluster: RabbitCluster, old: int) -> int | None:
    try:
        leader = cluster.leader(QUEUE)
    except ScriptFailed:
        return None  # the queue has no leader at this instant
    return leader if leader != old else None


async def test_rabbit_cluster_replicates_a_quorum_queue_everywhere_and_outlives_its_leader() -> (
    None
):
    machine_before = machine_rabbitmq_state()
    cluster = RabbitCluster.fresh()
    timings: dict[str, float] = {}
    with cluster.running():
        status = cluster.status()
        assert status.count("running (pid") == 3, status
        for n in (1, 2, 3):
            assert cluster.node(n) in status

        # Declared through node 2 once the cluster is formed: a replica on every node.
        await publish(cluster.url(2), MESSAGES)
        members, online = cluster.queue_members(1, QUEUE)
        assert sorted(members) == [cluster.node(n) for n in (1, 2, 3)]
        assert sorted(online) == sorted(members)

        leader = cluster.leader(QUEUE)
        started = time.monotonic()
        cluster.kill(leader)
        timings["kill"] = time.monotonic() - started
        timings["new_leader"] = wait_until(
            lambda: new_leader(cluster, leader), "a new leader after kill -9 of the old one"
        )
        survivor = next(n for n in (1, 2, 3) if n != leader)
        assert "stopped" in cluster.status().splitlines()[leader - 1]
        # Every confirmed message is still there, and two of three nodes take new ones.
        assert await depth(cluster.url(survivor)) == MESSAGES
        await publish(cluster.url(survivor), 1)
        assert await depth(cluster.url(survivor)) == MESSAGES + 1

        started = time.monotonic()
        cluster.restart(leader)
        timings["restart"] = time.monotonic() - started
        wait_until(
            lambda: len(cluster.queue_members(survivor, QUEUE)[1]) == 3,
            "the restarted node's replica back online",
        )
        assert await depth(cluster.url(leader)) == MESSAGES + 1

        # A graceful stop of another node: the two left still serve the queue.
        other = next(n for n in (1, 2, 3) if n not in (leader, survivor))
        started = time.monotonic()
        cluster.stop(other)
        timings["stop"] = time.monotonic() - started
        assert "stopped" in cluster.status().splitlines()[other - 1]
        assert await depth(cluster.url(leader)) == MESSAGES + 1
    assert not cluster.directory.exists()
    for n in (1, 2, 3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", cluster.port + n))  # the ports are released
    # The machine's own broker: same cookie, same lone node, and it still takes connections.
    assert machine_rabbitmq_state() == machine_before
    connection = await aio_pika.connect(f"{BROKER}/")
    await connection.close()
    assert cluster.started_s is not None
    timings["start"] = cluster.started_s
    print("timings, s:", {name: round(seconds, 2) for name, seconds in timings.items()})


def test_rabbit_cluster_start_refuses_a_taken_port_and_leaves_nothing_behind() -> None:
    cluster = RabbitCluster.fresh()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cluster.port + 2))
        taken.listen()
        with pytest.raises(ScriptFailed, match=f"port {cluster.port + 2} is taken"):
            cluster.start()
    assert not cluster.directory.exists()


@pytest.mark.parametrize("script", [RABBIT_SCRIPT, PG_SCRIPT], ids=["rabbit", "pg"])
def test_teardown_never_removes_a_directory_the_script_did_not_make(
    script: Path, tmp_path: Path
) -> None:
    keep = tmp_path / "someone-elses"
    keep.mkdir()
    (keep / "data").write_text("precious")
    variable = "RABBIT_CLUSTER_DIR" if script == RABBIT_SCRIPT else "PG_FAILOVER_DIR"
    with pytest.raises(ScriptFailed, match="not removing it"):
        run_script(script, {variable: str(keep)}, "teardown")
    assert (keep / "data").read_text() == "precious"


async def server_port(url: str) -> tuple[int, bool]:
    """(the port of the server `url` reaches, whether it is in recovery)."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        port = int(await connection.fetchval("SHOW port"))
        return port, bool(await connection.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await connection.close()


async def rows_on(url: str) -> set[int] | None:
    """The rows of table t on one server (None before the table has arrived there)."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return {r[0] for r in await connection.fetch("SELECT x FROM t")}
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await connection.close()


async def wait_for_rows(url: str, wanted: set[int], what: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if (await rows_on(url) or set()) >= wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: rows {wanted} not there within {timeout} s")


async def write(url: str, value: int) -> None:
    """One row into table t; a commit that waits longer than 15 s fails."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        await asyncio.wait_for(connection.execute("INSERT INTO t VALUES ($1)", value), 15)
    finally:
        await connection.close()


async def machine_postgres_answers() -> None:
    connection = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=10)
    try:
        assert await connection.fetchval("SELECT 1") == 1
    finally:
        await connection.close()


async def test_pg_standby_replicates_and_the_multi_host_url_follows_a_promotion() -> None:
    failover = PgFailover.fresh()
    timings: dict[str, float] = {}
    with failover.running():
        assert await server_port(failover.url()) == (failover.port_a, False)
        assert await server_port(failover.node_url("b")) == (failover.port_b, True)
        await write(failover.url(), 1)
        timings["replicated"] = await wait_for_rows(
            failover.node_url("b"), {1}, "the standby after a write on the primary"
        )
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await write(failover.node_url("b"), 99)

        failover.kill_primary()
        failover.promote()
        # The same URL now reaches node b, which has the row and takes writes.
        assert await server_port(failover.url()) == (failover.port_b, False)
        await write(failover.url(), 2)
        assert await rows_on(failover.url()) == {1, 2}

        # The old primary comes back as a standby of the new one, and catches up.
        failover.rejoin()
        assert await server_port(failover.node_url("a")) == (failover.port_a, True)
        await wait_for_rows(failover.node_url("a"), {1, 2}, "the rejoined node")
        assert await server_port(failover.url()) == (failover.port_b, False)
    assert not failover.directory.exists()
    await machine_postgres_answers()
    timings.update(failover.timings)
    print("timings, s:", {name: round(seconds, 2) for name, seconds in timings.items()})


async def test_pg_synchronous_standby_and_a_promotion_that_does_not_block_writes() -> None:
    failover = PgFailover.fresh(sync=True)
    with failover.running():
        primary = await asyncpg.connect(failover.url(), timeout=10)
        try:
            states = await primary.fetch(
                "SELECT application_name, sync_state FROM pg_stat_replication"
            )
        finally:
            await primary.close()
        assert [tuple(r) for r in states] == [("node_b", "sync")]
        await write(failover.url(), 1)
        # A commit returned: the standby had flushed it (it may not have applied it yet).
        await wait_for_rows(failover.node_url("b"), {1}, "the synchronous standby")

        failover.stop_primary()
        failover.promote()
        # Alone, the new primary must not wait for a standby it does not have.
        await write(failover.url(), 2)
        failover.rejoin()
        primary = await asyncpg.connect(failover.url(), timeout=10)
        try:
            states = await primary.fetch(
                "SELECT application_name, sync_state FROM pg_stat_replication"
            )
        finally:
            await primary.close()
        assert [tuple(r) for r in states] == [("node_a", "sync")]
        await write(failover.url(), 3)
        await wait_for_rows(failover.node_url("a"), {1, 2, 3}, "the rejoined synchronous standby")
    await machine_postgres_answers()
