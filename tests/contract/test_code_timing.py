"""`account.recovery.request` on PostgreSQL takes the same time for a known email (a code
issued every time) as for an unknown one: one statement of the same shape either way."""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from messages import CreateAccount, RequestRecovery
from services.clock import SystemClock
from services.codes import CodePolicy
from services.identity import IdentityService
from services.operations import CommandContext
from stores import PostgresIdentityStore
from tests.support.factory import TEST_CONFIG, running_service

ROUNDS = 300  # of each kind, after the warm-up


def ctx() -> CommandContext:
    return CommandContext(idempotency_key=str(uuid.uuid4()), source="caller:timing")


@pytest.fixture
async def roomy(pg_store: PostgresIdentityStore) -> AsyncIterator[IdentityService]:
    """Limits out of the way, so that every request for the known email issues a code."""
    codes = CodePolicy(requests_per_email=100_000, requests_per_source=100_000)
    config = replace(TEST_CONFIG, codes=codes)
    async with running_service(pg_store, clock=SystemClock(), config=config) as (service, _):
        yield service


async def test_known_and_unknown_emails_take_the_same_time(roomy: IdentityService) -> None:
    service = roomy
    known = f"timed-{uuid.uuid4().hex[:10]}@example.com"
    create = {"email": known, "password": "correct horse battery staple", "display_name": "T"}
    await service.create_account(CreateAccount.model_validate(create), ctx())
    # Shuffled, so that whatever one request leaves behind (autovacuum, a relay) falls on
    # both kinds alike.
    plan = ["known", "unknown"] * (ROUNDS + 20)
    random.shuffle(plan)
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    for n, kind in enumerate(plan):
        email = known if kind == "known" else f"nobody-{uuid.uuid4().hex[:10]}@example.com"
        started = time.perf_counter()
        answer = await service.flows.request_recovery(RequestRecovery(email=email), ctx())
        elapsed = time.perf_counter() - started
        assert answer.accepted is True
        if n >= 40:  # the warm-up: connections, statement caches
            timings[kind].append(elapsed)
    known_ms = statistics.median(timings["known"]) * 1000
    unknown_ms = statistics.median(timings["unknown"]) * 1000
    print(
        f"recovery.request on PostgreSQL, median: known {known_ms:.3f} ms,"
        f" unknown {unknown_ms:.3f} ms"
    )
    assert abs(known_ms - unknown_ms) <= 0.2 * min(known_ms, unknown_ms)
