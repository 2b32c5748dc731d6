"""Faults under a steady mixed load: each scenario describes only its fault.

Every scenario runs the same load (all eight commands, a few hundred of them over ~15 s) on a
fresh vhost and database, injects its fault in the middle, lets the load finish, and hands
everything to `tests.support.checker`: every command answered identically per key, exactly one
effect per success, every committed event published and none other, no message stuck, no
secret anywhere. Where the fault touches a dependency, readiness must go 503 and back to 200.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.faults import tools
from tests.faults.tools import Environment, ReadinessWatch
from tests.support.bus import Bus
from tests.support.checker import check_run
from tests.support.load import LoadGenerator, MissingReplies

pytestmark = pytest.mark.faults

TOTAL = 360
DURATION_S = 14.0

Fault = Callable[[LoadGenerator, Environment], Awaitable[dict[str, Any]]]


async def run_scenario(
    env: Environment,
    figures: dict[str, dict[str, Any]],
    name: str,
    fault: Fault,
    *,
    workers: int = 1,
    seed: int,
    duplicate_rate: float = 0.0,
) -> None:
    for _ in range(workers):
        await env.start_worker()
    bus = await Bus.open(env.amqp_url, durable=f"faults.{name}")
    started = time.monotonic()
    try:
        load = LoadGenerator(
            bus, seed=seed, total=TOTAL, duration_s=DURATION_S, duplicate_rate=duplicate_rate
        )
        running = asyncio.create_task(load.run())
        try:
            injected = await fault(load, env)
        finally:
            stats = await running
        missing = ""
        try:
            await load.wait_replies(timeout=90)
        except MissingReplies as exc:
            missing = str(exc)
        report = await check_run(
            bus,
            env.dsn,
            env.vhost,
            secrets=load.secrets,
            logs=env.logs(),
            metrics=env.metrics(),
        )
        report.figures.update(injected)
        report.figures.update(
            load_commands=stats.commands,
            republished_unconfirmed=stats.republished,
            workers_started=len(env.workers),
            redelivered_commands=sum(log.count('"redelivered":true') for log in env.logs()),
            duration_s=round(time.monotonic() - started, 1),
            by_command=stats.by_command,
        )
        figures[name] = report.figures
    finally:
        await bus.close()
    assert not missing, missing
    assert not report.problems, f"{name}:\n{report.describe()}"
    assert stats.commands == TOTAL, f"the load issued {stats.commands} of {TOTAL} commands"


async def test_kill_9_mid_load_then_restart(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """SIGKILL while commands are in flight: unacked deliveries come back to the restarted
    worker and are answered from the idempotency record if they had committed; outbox rows
    the dead worker never published are published by the new one."""

    async def fault(load: LoadGenerator, env: Environment) -> dict[str, Any]:
        kills = 0
        for point in (0.25, 0.5, 0.75):
            await load.reached(point)
            victim = env.alive()[0]
            await asyncio.to_thread(victim.kill)
            kills += 1
            await asyncio.sleep(0.5)  # commands pile up with no consumer at all
            await env.start_worker()
        return {"faults_injected": kills, "fault": "kill -9 of the only worker, then restart"}

    await run_scenario(fault_env, figures, "kill_9", fault, seed=101)


async def test_two_then_three_workers_with_every_command_sent_twice(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """Competing consumers and duplicate deliveries racing each other: the idempotency
    record's unique key lets one delivery commit; the other replays its reply."""

    async def fault(load: LoadGenerator, env: Environment) -> dict[str, Any]:
        await load.reached(0.4)
        await env.start_worker()
        return {
            "faults_injected": 1,
            "fault": "2 then 3 workers; every command published twice",
        }

    await run_scenario(
        fault_env, figures, "competing_duplicates", fault, workers=2, seed=202, duplicate_rate=1.0
    )


async def test_broker_connections_cut_under_the_worker(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """Every connection of the vhost (the worker's and the load's) closed twice: unacked
    deliveries are requeued, replies survive in a durable reply queue, unconfirmed publishes
    are re-sent with the same key."""

    async def fault(load: LoadGenerator, env: Environment) -> dict[str, Any]:
        cuts = closed = 0
        for point in (0.3, 0.65):
            await load.reached(point)
            worker = env.alive()[0]
            with ReadinessWatch(worker) as watch:
                now_closed = await asyncio.to_thread(tools.close_vhost_connections, env.vhost)
                assert now_closed >= 2, f"closed {now_closed} connections on the vhost"
                closed += now_closed
                cuts += 1
                await watch.wait_seen(503)
                await watch.wait_for(200)
            assert watch.saw(503), watch.statuses
            assert watch.statuses[-1] == 200, watch.statuses
        return {
            "faults_injected": cuts,
            "connections_closed": closed,
            "readiness_503_then_200": True,
            "fault": "rabbitmqctl close_connection of every connection on the vhost",
        }

    await run_scenario(fault_env, figures, "broker_cut", fault, seed=303)


async def test_postgres_restarted_under_the_worker(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """The database goes away mid-transaction: transient faults are retried with back-off,
    nothing half-committed, readiness reports the outage."""

    async def fault(load: LoadGenerator, env: Environment) -> dict[str, Any]:
        await load.reached(0.4)
        worker = env.alive()[0]
        began = time.monotonic()
        with ReadinessWatch(worker) as watch:
            # Stopped, then started once the worker has noticed: a bare restart can be over
            # in 100 ms, between two readiness probes, and then proves little.
            try:
                await asyncio.to_thread(tools.stop_postgres)
                await watch.wait_seen(503, timeout=20)
                await asyncio.sleep(1.0)
            finally:
                await asyncio.to_thread(tools.ensure_postgres)
            outage = time.monotonic() - began
            await watch.wait_for(200)
        return {
            "faults_injected": 1,
            "database_down_s": round(outage, 1),
            "readiness_503_then_200": True,
            "fault": "PostgreSQL server stopped under the worker, then started",
        }

    try:
        await run_scenario(fault_env, figures, "postgres_restart", fault, seed=404)
    finally:
        assert tools.pg_ready(), "PostgreSQL must be left running"


async def test_sigterm_mid_load_then_restart(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """Graceful stop of one of two workers: readiness 503 while draining, in-flight commands
    finish, the outbox is flushed, exit 0; a new worker takes its place."""

    async def fault(load: LoadGenerator, env: Environment) -> dict[str, Any]:
        await load.reached(0.4)
        victim = env.alive()[0]
        with ReadinessWatch(victim, interval_s=0.005) as watch:
            assert victim.process is not None
            victim.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(victim.process.wait, 60)
        assert code == 0, f"exit {code}:\n{victim.log_tail()}"
        assert watch.saw(503), f"readiness never went 503 while draining: {watch.statuses}"
        assert "identity worker stopped" in victim.log_text()
        replacement = await env.start_worker()
        assert replacement.readiness() == 200
        return {
            "faults_injected": 1,
            "exit_code": code,
            "readiness_503_then_200": True,
            "fault": "SIGTERM to one of two workers, then a new one",
        }

    await run_scenario(fault_env, figures, "sigterm", fault, workers=2, seed=505)
