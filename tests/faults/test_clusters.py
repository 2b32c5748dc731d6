"""Beyond one node (contract v2, section 3), under the fault suite's load.

- A three-node RabbitMQ cluster of the test's own (tests.support.clusters), two workers
  connected to different nodes through IDENTITY_AMQP_URL's list of nodes: the node leading
  the command queues is killed (-9) mid-stream and brought back, then a second node is stopped
  gracefully and brought back. The workers, the load and the checker move to other nodes.
- A PostgreSQL primary with a synchronous streaming standby: the worker on the multi-host
  URL (`target_session_attrs=read-write`); mid-stream the primary is stopped and the standby
  promoted, and the worker follows it.

Each run is handed to tests.support.checker as every other fault scenario: every command
answered identically per key, one effect per success, every committed event published once,
no message stuck, no secret anywhere. The machine's own RabbitMQ and PostgreSQL are never
touched but to hold the load's vhost (PostgreSQL scenario) and the test databases (RabbitMQ
scenario).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from stores import migrate
from tests.conftest import migrated_database, worker_role
from tests.support import workers
from tests.support.bus import Bus
from tests.support.checker import Report, check_run, rabbitmqctl
from tests.support.clusters import PgFailover, RabbitCluster, machine_rabbitmq_state, wait_until
from tests.support.load import LoadGenerator, MissingReplies
from tests.support.vhosts import BROKER
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

pytestmark = pytest.mark.faults

# Longer than the single-broker scenarios: four node operations (5 to 10 s each here) fit in
# the stream, with load before, between and after them.
TOTAL = 400
DURATION_S = 40.0
WORKER_ROLE = "identity_cluster_worker"


class ServiceGaps:
    """The longest stretch without a new reply while the load runs: the time without service
    as a caller sees it (the load's own pace leaves ~0.1 s between replies)."""

    def __init__(self, bus: Bus, every_s: float = 0.05) -> None:
        self.bus = bus
        self.every_s = every_s
        self.longest_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ServiceGaps:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        seen, since = 0, time.monotonic()
        while True:
            count = sum(len(replies) for replies in self.bus.replies.values())
            now = time.monotonic()
            if count != seen:
                self.longest_s = max(self.longest_s, now - since)
                seen, since = count, now
            await asyncio.sleep(self.every_s)


Fault = Callable[[LoadGenerator], Awaitable[dict[str, Any]]]


async def run_load(
    bus: Bus,
    fault: Fault,
    *,
    seed: int,
    dsn: str,
    vhost: str,
    logs: Callable[[], list[str]],
    metrics: Callable[[], list[str]],
    **check: Any,
) -> Report:
    """The load with `fault` in its middle, then the checker's verdict, with the figures."""
    started = time.monotonic()
    load = LoadGenerator(bus, seed=seed, total=TOTAL, duration_s=DURATION_S, duplicate_rate=0.1)
    async with ServiceGaps(bus) as gaps:
        running = asyncio.create_task(load.run())
        try:
            injected = await fault(load)
        finally:
            stats = await running
        missing = ""
        try:
            await load.wait_replies(timeout=120)
        except MissingReplies as exc:
            missing = str(exc)
    report = await check_run(
        bus, dsn, vhost, secrets=load.secrets, logs=logs(), metrics=metrics(), **check
    )
    figures = report.figures
    figures.update(injected)
    figures.update(
        load_commands=stats.commands,
        republished_unconfirmed=stats.republished,
        longest_without_a_reply_s=round(gaps.longest_s, 2),
        duration_s=round(time.monotonic() - started, 1),
        summary={
            "commands_sent": figures.get("commands_published"),
            "lost": figures.get("lost_replies", 0)
            + figures.get("lost_rows", 0)
            + figures.get("events_lost", 0),
            "duplicated": figures.get("duplicated_rows", 0)
            + figures.get("events_duplicated", 0)
            + figures.get("inconsistent_replies", 0),
            "events_unpublished": figures.get("events_lost", 0),
            "stuck": figures.get("stuck_messages", 0),
            "time_without_service_s": round(gaps.longest_s, 2),
        },
    )
    if missing:
        report.problem(missing)
    if stats.commands != TOTAL:
        report.problem(f"the load issued {stats.commands} of {TOTAL} commands")
    return report


async def timed(what: Callable[[], object]) -> float:
    started = time.monotonic()
    await asyncio.to_thread(what)
    return round(time.monotonic() - started, 2)


def stop_all(processes: list[workers.WorkerProcess]) -> None:
    for process in processes:
        if process.alive():
            process.kill()


# -- RabbitMQ: three nodes -----------------------------------------------------------------


@asynccontextmanager
async def rabbit_cluster() -> AsyncIterator[RabbitCluster]:
    # A broker user of the test's own: the script's default, `identity`, would put the test's
    # reply queues in the worker's own `identity.` namespace, where it never answers.
    cluster = dataclasses.replace(RabbitCluster.fresh(), user="cluster-caller")
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.teardown)


def from_node(cluster: RabbitCluster, first: int) -> str:
    """IDENTITY_AMQP_URL naming every node, node `first` first."""
    urls = cluster.urls
    return ",".join(urls[first - 1 :] + urls[: first - 1])


async def test_two_workers_on_a_three_node_cluster_lose_nothing_when_nodes_go(
    tmp_path: Path, figures: dict[str, dict[str, Any]]
) -> None:
    """The node leading the command queues dies (kill -9) with commands in flight and comes
    back; then another node stops gracefully and comes back. Quorum queues on three nodes keep
    every confirmed message through either; the workers' connections move to the next node;
    unacked deliveries come back and are answered from the idempotency record."""
    machine_before = await asyncio.to_thread(machine_rabbitmq_state)
    async with (
        rabbit_cluster() as cluster,
        migrated_database() as dsn,
        worker_role(dsn) as worker_dsn,
    ):
        extra = {"IDENTITY_CALLERS": f"{cluster.user}=*"}
        processes = [
            workers.WorkerProcess(
                workers.worker_env(from_node(cluster, first), worker_dsn, dsn, **extra),
                tmp_path / f"worker-{first}.log",
            )
            for first in (1, 2)  # worker 1 declares the queues through node 1
        ]
        try:
            for process in processes:
                await asyncio.to_thread(process.start)
            for queue in (FAST_QUEUE, PASSWORD_QUEUE):
                members, online = await asyncio.to_thread(cluster.queue_members, 1, queue)
                assert len(members) == 3, (queue, members)
                assert sorted(online) == sorted(members), (queue, online)
            bus = await Bus.open(from_node(cluster, 3), durable="faults.cluster", quorum=True)
            try:

                async def fault(load: LoadGenerator) -> dict[str, Any]:
                    await load.reached(0.2)
                    leader = await asyncio.to_thread(cluster.leader, FAST_QUEUE)
                    kill_s = await timed(lambda: cluster.kill(leader))
                    elected: list[int] = []

                    def another_leader() -> bool:
                        elected.append(cluster.leader(FAST_QUEUE))  # ScriptFailed: none yet
                        return elected[-1] != leader

                    election_s = await asyncio.to_thread(wait_until, another_leader, "a leader")
                    restart_s = await timed(lambda: cluster.restart(leader))
                    await load.reached(0.55)
                    # The next node: one a worker is connected to (worker 1 moved from node 1
                    # to 2, worker 2 from node 2 to 3), or node 1 where worker 1 stayed.
                    second = leader % 3 + 1
                    stop_s = await timed(lambda: cluster.stop(second))
                    second_restart_s = await timed(lambda: cluster.restart(second))
                    return {
                        "faults_injected": 2,
                        "fault": f"kill -9 of node {leader} (leader of {FAST_QUEUE}),"
                        f" restart; graceful stop of node {second}, restart",
                        "new_leader": elected[-1],
                        "leader_elected_after_kill_s": round(election_s, 2),
                        "kill_s": kill_s,
                        "restart_s": restart_s,
                        "stop_s": stop_s,
                        "second_restart_s": second_restart_s,
                        "cluster_start_s": round(cluster.started_s or 0, 1),
                    }

                report = await run_load(
                    bus,
                    fault,
                    seed=808,
                    dsn=dsn,
                    vhost=cluster.vhost,
                    logs=lambda: [p.log_text() for p in processes],
                    metrics=lambda: [p.metrics() for p in processes if p.alive()],
                    ctl=lambda *args: cluster.ctl(1, *args),
                )
                report.figures["workers_alive"] = sum(p.alive() for p in processes)
                report.figures["redelivered_commands"] = sum(
                    p.log_text().count('"redelivered":true') for p in processes
                )
                figures["cluster_rabbitmq_nodes_lost"] = report.figures
            finally:
                await bus.close()
        finally:
            await asyncio.to_thread(stop_all, processes)
    assert not report.problems, report.describe()
    assert report.figures["workers_alive"] == 2, "a worker died instead of moving"
    assert await asyncio.to_thread(machine_rabbitmq_state) == machine_before


# -- PostgreSQL: a primary and a synchronous standby -----------------------------------------


@asynccontextmanager
async def pg_failover() -> AsyncIterator[PgFailover]:
    pg = PgFailover.fresh(sync=True)
    try:
        await asyncio.to_thread(pg.start)
        yield pg
    finally:
        await asyncio.to_thread(pg.teardown)


def multi_host(pg: PgFailover, user: str) -> str:
    """The worker's kind of URL: both nodes, the writable one wanted."""
    return pg.url("identity").replace("postgresql://postgres@", f"postgresql://{user}@", 1)


@asynccontextmanager
async def machine_vhost() -> AsyncIterator[str]:
    vhost = f"identity-faults-{time.monotonic_ns():x}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
        )
        yield vhost
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_the_worker_follows_a_promoted_standby_under_load(
    how: str, tmp_path: Path, figures: dict[str, dict[str, Any]]
) -> None:
    """The primary stops (fast shutdown) or dies (kill -9) mid-stream and the standby is
    promoted: the worker's failed units are retried (transient), the pool reconnects through
    the multi-host URL to the new primary, and with synchronous replication nothing
    acknowledged is lost, even when the primary had no chance to ship its last WAL."""
    async with pg_failover() as pg, machine_vhost() as vhost:
        admin = await asyncpg.connect(pg.node_url("a"))
        try:
            await admin.execute(f"CREATE ROLE {WORKER_ROLE} LOGIN")
        finally:
            await admin.close()
        owner_url = pg.url("identity")
        await migrate(owner_url, worker_role=WORKER_ROLE)
        amqp_url = f"{BROKER}/{vhost}"
        process = workers.WorkerProcess(
            workers.worker_env(amqp_url, multi_host(pg, WORKER_ROLE), owner_url),
            tmp_path / "worker.log",
        )
        try:
            await asyncio.to_thread(process.start)
            bus = await Bus.open(amqp_url, durable="faults.pg-failover")
            try:

                async def fault(load: LoadGenerator) -> dict[str, Any]:
                    await load.reached(0.4)
                    stop_s = await timed(pg.stop_primary if how == "stop" else pg.kill_primary)
                    promote_s = await timed(pg.promote)
                    return {
                        "faults_injected": 1,
                        "fault": f"primary {'stopped' if how == 'stop' else 'killed (-9)'},"
                        " synchronous standby promoted",
                        "stop_primary_s": stop_s,
                        "promote_s": promote_s,
                    }

                report = await run_load(
                    bus,
                    fault,
                    seed=909,
                    dsn=owner_url,
                    vhost=vhost,
                    logs=lambda: [process.log_text()],
                    metrics=lambda: [process.metrics()] if process.alive() else [],
                )
                report.figures["worker_alive"] = process.alive()
                # The worker's pool is on the promoted node now (the old primary is down).
                promoted = await asyncpg.connect(pg.node_url("b"))
                try:
                    report.figures["worker_connections_on_new_primary"] = await promoted.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", WORKER_ROLE
                    )
                    assert not await promoted.fetchval("SELECT pg_is_in_recovery()")
                finally:
                    await promoted.close()
                figures[f"cluster_postgres_failover_{how}"] = report.figures
            finally:
                await bus.close()
        finally:
            with suppress(Exception):
                await asyncio.to_thread(stop_all, [process])
    assert not report.problems, report.describe()
    assert report.figures["worker_alive"], "the worker died instead of reconnecting"
    assert report.figures["worker_connections_on_new_primary"] > 0
