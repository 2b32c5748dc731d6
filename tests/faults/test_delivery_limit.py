"""A message that takes down every worker that picks it up must not loop forever.

Honest mechanism, nothing in the product is switched for the test: the command's first
database statement waits on a table lock the test holds (its own database), so each worker
that receives it is still holding it, unacknowledged, when the test kills it with SIGKILL.
The quorum queue counts each of these returns in `x-delivery-count`; the worker that sees the
count reach its own limit dead-letters a redacted copy (reason `delivery_limit`), answers
`internal_error` and acks, before the queue's raw-body backstop can fire.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import orjson
import pytest

from tests.faults.tools import Environment
from tests.support.bus import Bus
from tests.support.checker import queue_depths, scan_for_secrets, wait_queues_empty
from worker.settings import load_settings
from worker.topology import PASSWORD_QUEUE

pytestmark = pytest.mark.faults


async def _held_unacked(vhost: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(queue_depths, vhost)).get(PASSWORD_QUEUE, (0, 0))[1] != 1:
        if time.monotonic() > deadline:
            raise AssertionError("no worker took the message")
        await asyncio.sleep(0.2)


async def test_a_message_that_keeps_killing_workers_is_dead_lettered(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    env = fault_env
    limit = load_settings({}, keys_needed=False).worker_delivery_limit
    first = await env.start_worker()  # declares the topology
    await asyncio.to_thread(first.terminate)
    bus = await Bus.open(env.amqp_url, durable="faults.delivery-limit")
    locker = await asyncpg.connect(env.dsn)
    secret = f"Kx{uuid.uuid4().hex}!"
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE idempotency IN ACCESS EXCLUSIVE MODE")
        key = f"poison-{uuid.uuid4().hex}"
        cid = await bus.command(
            "session.start", {"email": "victim@example.com", "password": secret}, key
        )
        kills = 0
        for _ in range(limit):
            worker = await env.start_worker()
            await _held_unacked(env.vhost)
            await asyncio.to_thread(worker.kill)
            kills += 1
        # The next worker sees the count at its limit: no database work at all.
        survivor = await env.start_worker()
        reply = await bus.reply(cid, timeout=30)
        await bus.wait_for(lambda: bool(bus.dead))
        await lock.rollback()
    finally:
        await locker.close()
    try:
        assert reply["ok"] is False
        assert reply["error"]["code"] == "internal_error", reply
        assert len(bus.dead) == 1, bus.dead
        letter = bus.dead[0]
        assert letter["reason"] == "delivery_limit"
        assert letter["delivery_count"] == limit
        assert letter["body"] is None  # never parsed, so nothing to redact
        leaks = scan_for_secrets(
            {secret},
            [("dead letter", orjson.dumps(letter).decode()), ("log", survivor.log_text())]
            + [("log", w.log_text()) for w in env.workers],
        )
        assert leaks == []
        depths = await wait_queues_empty(env.vhost)
        assert depths[PASSWORD_QUEUE] == (0, 0), depths
        assert survivor.alive()
        conn = await asyncpg.connect(env.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM idempotency") == 0
            assert await conn.fetchval("SELECT count(*) FROM sessions") == 0
        finally:
            await conn.close()
        figures["delivery_limit"] = {
            "commands_published": 1,
            "faults_injected": kills,
            "fault": "kill -9 of each worker holding the message",
            "dead_letter_reason": letter["reason"],
            "delivery_count": letter["delivery_count"],
            "leaked": len(leaks),
        }
    finally:
        await bus.close()
