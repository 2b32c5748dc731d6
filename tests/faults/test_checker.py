"""The checker must catch what it is there to catch: a clean run passes, and each kind of
breakage planted in a copy of that run's captures (or in its database) is reported."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import aio_pika
import asyncpg
import pytest

from messages.topology import COURIER_QUEUE
from tests.faults.tools import Environment
from tests.support.bus import Bus
from tests.support.checker import check_run
from tests.support.load import LoadGenerator

pytestmark = pytest.mark.faults


def _planted(bus: Bus) -> Bus:
    twin = copy.copy(bus)
    twin.replies = copy.deepcopy(bus.replies)
    twin.events = copy.deepcopy(bus.events)
    twin.dead = copy.deepcopy(bus.dead)
    twin.sent = list(bus.sent)
    return twin


async def test_the_checker_reports_every_kind_of_breakage(fault_env: Environment) -> None:
    env = fault_env
    worker = await env.start_worker()
    bus = await Bus.open(env.amqp_url, durable="faults.checker")
    try:
        load = LoadGenerator(bus, seed=7, total=60, duration_s=3.0, users=6)
        await load.run()
        await load.wait_replies()
        clean = await check_run(bus, env.dsn, env.vhost, secrets=load.secrets)
        assert clean.problems == [], clean.describe()

        async def problems(twin: Bus, **kw: Any) -> str:
            report = await check_run(
                twin, env.dsn, env.vhost, secrets=load.secrets, settle_timeout=1, **kw
            )
            return report.describe()

        lost_event = _planted(bus)
        gone = lost_event.events.pop()
        assert "never captured" in await problems(lost_event)

        phantom = _planted(bus)
        phantom.events.append({**gone, "event_id": "evt_" + "0" * 26})
        assert "no outbox row" in await problems(phantom)

        differing = _planted(bus)
        answered = next(s for s in bus.sent if s.command == "account.create")
        first = differing.replies[answered.correlation_id][0]
        differing.replies[answered.correlation_id].append({**first, "ok": False})
        assert "different replies" in await problems(differing)

        unanswered = _planted(bus)
        del unanswered.replies[answered.correlation_id]
        assert "no reply" in await problems(unanswered)

        leaked = _planted(bus)
        leaked.dead.append({"reason": "test", "body": {"password": next(iter(load.secrets))}})
        assert "secret found" in await problems(leaked, expect_dead_letters=True)
        assert "secret found in worker log" in await problems(
            _planted(bus), logs=[f"token {next(iter(load.secrets))}"]
        )

        # The clean check drained identity.courier as the mail sender would: every message is
        # gone from the queue now, as if lost, and a stray one has no courier row.
        assert clean.figures["courier_received"] == clean.figures["courier_written"] > 0
        assert "relayed but not in the queue" in await problems(_planted(bus))
        await bus.channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="stray-courier-message"), routing_key=COURIER_QUEUE
        )
        assert "stray-courier-message" in await problems(_planted(bus))

        conn = await asyncpg.connect(env.dsn)
        try:
            await conn.execute(
                "INSERT INTO accounts SELECT 'acct_' || $1, 'x' || email, 'x' || email_canonical,"
                " display_name, password_hash, created_at, updated_at, version"
                " FROM accounts LIMIT 1",
                uuid.uuid4().hex[:26],
            )
        finally:
            await conn.close()
        assert "without a successful create" in await problems(_planted(bus))
        assert worker.alive()
    finally:
        await bus.close()
