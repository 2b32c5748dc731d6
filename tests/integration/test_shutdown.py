"""SIGTERM under a backlog: the worker finishes what it holds, answers every command it acked,
leaves the rest to the queue, and exits 0 within its grace period."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, assert_signed_up_once, key, sign_up
from tests.support.eventually import eventually
from tests.support.postgres import lock_waiters
from tests.support.workers import WORKER_BIN, WorkerProcess, worker_env
from worker.app import STOP_STEPS_S

pytestmark = pytest.mark.integration

BACKLOG = 40
GRACE_S = 10.0
# Slow enough hashing, on one thread, that the backlog is still there when SIGTERM comes.
SLOW_HASHING = {
    "IDENTITY_ARGON2_TIME_COST": "2",
    "IDENTITY_ARGON2_MEMORY_KIB": "32768",
    "IDENTITY_HASH_WORKERS": "1",
    "IDENTITY_SHUTDOWN_GRACE_S": str(GRACE_S),
}


def _acked_correlation_ids(worker: WorkerProcess) -> list[str]:
    """The commands the worker logged as done; it logs one only after its ack."""
    return [entry["correlation_id"] for entry in worker.log_entries("command")]


async def _until_it_waits_for(blocker: asyncpg.Connection, database_url: str) -> None:
    """Until a backend (the worker's, running the command) waits on the blocker's lock."""
    observer = await asyncpg.connect(database_url)
    try:
        await eventually(
            lambda: lock_waiters(observer, blocker.get_server_pid()),
            what="the command waiting for the lock",
        )
    finally:
        await observer.close()


async def test_sigterm_under_a_backlog_answers_what_was_acked_and_loses_nothing(
    isolated: Isolated,
) -> None:
    first = isolated.start(**SLOW_HASHING)
    bus = await isolated.bus()
    tag = uuid.uuid4().hex[:8]
    people = [Person.new(f"drain{tag}n{n}") for n in range(BACKLOG)]
    sent = {
        await bus.command("account.create", person.create_payload(), key("drain")): person
        for person in people
    }
    await bus.wait_for(lambda: len(bus.replies) >= 3)

    stopping = time.monotonic()
    code = first.terminate(timeout=GRACE_S + 20)
    stopped_in = time.monotonic() - stopping

    assert code == 0, first.log_tail()
    assert stopped_in < GRACE_S + 10
    acked = _acked_correlation_ids(first)
    assert len(acked) == len(set(acked))
    assert 3 <= len(acked) < BACKLOG, "the backlog was gone before SIGTERM: nothing was tested"
    # SIGTERM found commands in the middle of their work (the prefetch keeps two delivered),
    # and they were finished rather than dropped.
    [stopping_line] = first.log_entries("stopping: draining in-flight commands")
    assert stopping_line["in_flight"] >= 1
    # Every command the stopped worker acked has its reply (it replies before it acks).
    await bus.wait_for(lambda: set(acked) <= set(bus.replies))

    isolated.start()
    await bus.wait_for(lambda: set(sent) <= set(bus.replies), timeout=60)

    await assert_signed_up_once(bus, sent, isolated.database_url, f"drain{tag}n%")
    assert "identity worker stopped" in first.log_text()


async def test_a_command_stuck_past_the_grace_period_is_cut_off_and_answered_later(
    isolated: Isolated,
) -> None:
    grace_s = 2.0
    first = isolated.start(IDENTITY_SHUTDOWN_GRACE_S=str(grace_s))
    bus = await isolated.bus()
    account = await sign_up(bus, Person.new("stuck"))
    blocker = await asyncpg.connect(isolated.database_url)
    try:
        locking = blocker.transaction()
        await locking.start()
        await blocker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        stuck = await bus.command("account.get", {"account_id": account["id"]}, None)
        await _until_it_waits_for(blocker, isolated.database_url)

        stopping = time.monotonic()
        code = first.terminate(timeout=grace_s + STOP_STEPS_S + 10)
        stopped_in = time.monotonic() - stopping
        await locking.rollback()
    finally:
        await blocker.close()

    assert code == 0, first.log_tail()
    assert stopped_in < grace_s + STOP_STEPS_S
    assert first.log_entries("grace period over: cancelling commands")
    assert stuck not in bus.replies
    isolated.start()  # the delivery went back to the queue unacked
    await bus.wait_for(lambda: stuck in bus.replies, timeout=30)
    [reply] = bus.replies[stuck]
    assert reply["result"]["account"]["id"] == account["id"]


async def test_sigterm_during_start_up_stops_it_at_once(isolated: Isolated, tmp_path: Path) -> None:
    # A broker address that accepts connections and never answers: start-up waits there,
    # after its migrations, before the worker has a signal handler of its own.
    with socket.socket() as silent, (tmp_path / "worker.log").open("wb") as log:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        broker = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        process = subprocess.Popen(
            [str(WORKER_BIN), "run"],
            env=worker_env(broker, isolated.env["IDENTITY_DATABASE_URL"], isolated.database_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # It connects once its migrations are done: from then on it waits for an answer.
            silent.setblocking(False)
            async with asyncio.timeout(60):
                caller, _ = await asyncio.get_running_loop().sock_accept(silent)
            with caller:
                assert process.poll() is None, (tmp_path / "worker.log").read_text()
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=5)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Exited through its handler; a process with none dies of the signal (-15) where it is not
    # PID 1, and ignores it where it is.
    assert code == 128 + signal.SIGTERM
