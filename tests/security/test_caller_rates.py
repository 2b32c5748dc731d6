"""Per-caller rates over RabbitMQ with two real broker users (contract v2, section 5): one
caller flooding the worker beyond its rate is answered `rate_limited` before any work, and
the other caller's commands, on the same queues, are neither refused nor slowed."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from typing import Any

import pytest

from tests.security.conftest import WEB_RATE
from tests.support.deployment import Deployment
from tests.support.security import Caller, Connector
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.security

FLOOD = 300
PASSWORD = "a long enough passphrase for this test"


def _counted(worker: WorkerProcess, caller: str, decision: str) -> float:
    pattern = (
        rf'^identity_caller_commands_total\{{caller="{re.escape(caller)}",'
        rf'decision="{decision}"\}} (\S+)$'
    )
    found = re.search(pattern, worker.metrics(), flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _timed_sign_ins(admin: Caller, email: str, count: int) -> list[float]:
    """Seconds each of `count` sign-ins took, one after the other; each must succeed."""
    took = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await admin.call("session.start", {"email": email, "password": PASSWORD})
        took.append(time.perf_counter() - started)
        assert reply["ok"], reply
    return took


async def _flood(web: Caller) -> list[dict[str, Any]]:
    """FLOOD sign-ins at once from the web gateway (unknown emails: each admitted one costs an
    argon2 verify), and their replies."""
    sent = [
        await web.command(
            "session.start",
            {"email": f"nobody-{uuid.uuid4().hex[:12]}@example.com", "password": PASSWORD},
        )
        for _ in range(FLOOD)
    ]
    return [(await web.reply(correlation_id, timeout=60)).body for correlation_id in sent]


async def test_a_caller_beyond_its_rate_is_limited_and_does_not_slow_another(
    rated_connect: Connector, rated_worker: WorkerProcess, deployment: Deployment
) -> None:
    web_user, admin_user = deployment.user("web-gateway"), deployment.user("admin-tool")
    web = await Caller.open(await rated_connect("web-gateway"), web_user)
    admin = await Caller.open(await rated_connect("admin-tool"), admin_user)
    email = f"rated-{uuid.uuid4().hex[:10]}@example.com"
    created = await admin.call(
        "account.create", {"email": email, "password": PASSWORD, "display_name": "Rated"}
    )
    assert created["ok"], created
    alone = await _timed_sign_ins(admin, email, 10)

    started = time.perf_counter()
    flooding = asyncio.create_task(_flood(web))
    await asyncio.sleep(0.05)  # the flood is on the queues ahead of the admin's sign-ins
    during = await _timed_sign_ins(admin, email, 10)
    replies = await flooding
    flood_s = time.perf_counter() - started

    limited = [r for r in replies if not r["ok"] and r["error"]["code"] == "rate_limited"]
    answered = [r for r in replies if r not in limited]
    # What the bucket admits over the flood: its burst, then WEB_RATE a second.
    assert len(answered) <= WEB_RATE + WEB_RATE * flood_s + 1
    assert all(r["error"]["code"] == "invalid_credentials" for r in answered), answered[:3]
    assert all(r["error"]["retry_after_s"] >= 1 for r in limited)
    assert _counted(rated_worker, web_user, "rate_limited") == len(limited)
    assert _counted(rated_worker, admin_user, "rate_limited") == 0
    assert _counted(rated_worker, admin_user, "admitted") == 21
    # The other caller was not slowed: its sign-ins behind the flood took about what they
    # take alone (the limited commands cost a reply each, no argon2, no database).
    median_alone, median_during = statistics.median(alone), statistics.median(during)
    # The numbers, for BENCHMARKS.md, with pytest -s.
    print(
        f"\nflood of {FLOOD} from {web_user}: {len(limited)} limited, {len(answered)} answered,"
        f" in {flood_s:.2f}s; {admin_user} sign-in median alone {median_alone * 1000:.1f} ms,"
        f" during the flood {median_during * 1000:.1f} ms, max {max(during) * 1000:.1f} ms"
    )
    assert median_during <= 3 * median_alone + 0.1, (alone, during)
    # The first one waited behind the whole flood on the password queue: 300 replies, not
    # 300 argon2 verifies (2.6 s on the test machine without the rate, 0.3 s with it).
    assert max(during) < 1.0, (alone, during)
