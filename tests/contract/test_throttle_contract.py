"""Throttling by source, as every IdentityStore keeps it (memory and PostgreSQL alike): the
(email, source) and per-email counters, known-good sources, the argon2 budget per source, and
their purge. Emails and sources are opaque keyed tags to the store; each test makes its own."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from datetime import timedelta

import pytest

from stores import HashBudget, IdentityStore, ThrottleRules, ThrottleSchedule
from tests.contract.builders import T0

PAIR = ThrottleSchedule(free_failures=3, base_delay_s=2.0, max_delay_s=10.0, reset_after_s=3600)
RULES = ThrottleRules(pair=PAIR, email=replace(PAIR, free_failures=6), known_source_s=86400.0)
BUDGET = HashBudget(rate_per_s=0.5, burst=4)


def tag() -> bytes:
    return secrets.token_bytes(16)


def at(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


async def reserve(
    store: IdentityStore,
    email: bytes,
    source: bytes,
    seconds: float = 0,
    rules: ThrottleRules = RULES,
) -> tuple[bool, int, float]:
    decision = await store.reserve_password_attempt(email, source, T0 + at(seconds), rules)
    return decision.allowed, decision.failures, decision.retry_after_s


# One source on one email


async def test_free_failures_pass_then_the_next_attempt_locks(store: IdentityStore) -> None:
    email, source = tag(), tag()
    results = [await reserve(store, email, source) for _ in range(5)]
    assert results == [
        (True, 1, 0.0),
        (True, 2, 0.0),
        (True, 3, 0.0),
        (True, 4, 0.0),  # counted up front: the fourth failure locks this source for 2 s
        (False, 4, 2.0),
    ]


async def test_lock_doubles_up_to_the_maximum_and_expires(store: IdentityStore) -> None:
    email, source = tag(), tag()
    for _ in range(4):
        await reserve(store, email, source)
    now, locks = 0.0, []
    for _ in range(4):
        refused = await reserve(store, email, source, now)
        now += refused[2]
        locks.append(refused)
        assert (await reserve(store, email, source, now))[0]
    assert locks == [(False, 4, 2.0), (False, 5, 4.0), (False, 6, 8.0), (False, 7, 10.0)]


async def test_refused_attempt_reports_the_remaining_lock(store: IdentityStore) -> None:
    email, source = tag(), tag()
    for _ in range(4):
        await reserve(store, email, source)
    assert await reserve(store, email, source, 0.5) == (False, 4, 1.5)
    assert await reserve(store, email, source, 2.0) == (True, 5, 0.0)


async def test_counter_restarts_only_when_older_than_reset_after(store: IdentityStore) -> None:
    email, other, source = tag(), tag(), tag()
    await reserve(store, email, source)
    await reserve(store, other, source)
    assert await reserve(store, email, source, 3600) == (True, 2, 0.0)
    assert await reserve(store, other, source, 3600.001) == (True, 1, 0.0)


async def test_concurrent_reservations_are_counted_once_each(store: IdentityStore) -> None:
    email, source = tag(), tag()
    lenient = ThrottleRules(
        pair=replace(PAIR, free_failures=100), email=replace(PAIR, free_failures=100)
    )
    decisions = await asyncio.gather(
        *(store.reserve_password_attempt(email, source, T0, lenient) for _ in range(20))
    )
    assert all(d.allowed for d in decisions)
    assert sorted(d.failures for d in decisions) == list(range(1, 21))
    assert sorted(d.email_failures for d in decisions) == list(range(1, 21))


async def test_concurrent_reservations_cannot_race_past_the_lock(store: IdentityStore) -> None:
    email, source = tag(), tag()
    decisions = await asyncio.gather(
        *(store.reserve_password_attempt(email, source, T0, RULES) for _ in range(20))
    )
    allowed = sorted(d.failures for d in decisions if d.allowed)
    refused = [(d.failures, d.retry_after_s, d.locked) for d in decisions if not d.allowed]
    assert allowed == [1, 2, 3, 4]
    assert refused == [(4, 2.0, "source")] * 16


# Many sources on one email


async def test_a_locked_source_does_not_lock_another_source(store: IdentityStore) -> None:
    email, attacker, victim = tag(), tag(), tag()
    for _ in range(4):
        await reserve(store, email, attacker)
    assert (await reserve(store, email, attacker))[0] is False
    assert await reserve(store, email, victim) == (True, 1, 0.0)


async def test_the_email_counter_locks_new_sources_but_spares_known_good_ones(
    store: IdentityStore,
) -> None:
    email, victim = tag(), tag()
    await reserve(store, email, victim)
    await store.settle_password_attempt(email, victim, T0)  # the victim signed in once
    for _ in range(7):  # seven failures, each from a source of its own: the email locks
        assert (await reserve(store, email, tag()))[0]

    refused = await store.reserve_password_attempt(email, tag(), T0, RULES)
    assert (refused.allowed, refused.locked, refused.retry_after_s) == (False, "email", 2.0)
    assert refused.email_failures == 7
    allowed = await store.reserve_password_attempt(email, victim, T0, RULES)
    assert allowed.allowed
    assert (allowed.failures, allowed.email_failures) == (1, 8)


async def test_a_known_good_source_is_forgotten_after_known_source_s(
    store: IdentityStore,
) -> None:
    email, victim = tag(), tag()
    await store.settle_password_attempt(email, victim, T0)
    for _ in range(7):
        await reserve(store, email, tag(), 10)
    assert (await reserve(store, email, victim, 10))[0]
    late = 86400 + 1
    for _ in range(8):
        await reserve(store, email, tag(), late)
    assert (await reserve(store, email, victim, late))[0] is False


async def test_a_refused_attempt_changes_no_counter(store: IdentityStore) -> None:
    email, source = tag(), tag()
    for _ in range(4):
        await reserve(store, email, source)
    for _ in range(3):
        assert (await reserve(store, email, source, 1))[0] is False
    decision = await store.reserve_password_attempt(email, source, T0 + at(2), RULES)
    assert (decision.failures, decision.email_failures) == (5, 5)


async def test_refund_uncounts_one_attempt_on_both_counters(store: IdentityStore) -> None:
    email, source = tag(), tag()
    await reserve(store, email, source)
    await reserve(store, email, source)
    await store.refund_password_attempt(email, source)
    decision = await store.reserve_password_attempt(email, source, T0, RULES)
    assert (decision.failures, decision.email_failures) == (2, 2)
    for _ in range(3):
        await store.refund_password_attempt(email, source)
    await store.refund_password_attempt(tag(), tag())
    decision = await store.reserve_password_attempt(email, source, T0, RULES)
    assert (decision.failures, decision.email_failures) == (1, 1)


async def test_settling_forgets_the_pair_uncounts_the_email_and_knows_the_source(
    store: IdentityStore,
) -> None:
    email, source, other = tag(), tag(), tag()
    for _ in range(3):
        await reserve(store, email, other)
    for _ in range(4):
        await reserve(store, email, source)  # the fourth locks this source
    await store.settle_password_attempt(email, source, T0)

    decision = await store.reserve_password_attempt(email, source, T0, RULES)
    assert (decision.allowed, decision.failures, decision.email_failures) == (True, 1, 7)
    # The seventh failure locked the email (7 > 6): other sources wait, the settled one,
    # known-good now, does not.
    again = await store.reserve_password_attempt(email, other, T0, RULES)
    assert (again.allowed, again.locked, again.failures) == (False, "email", 3)
    assert (await reserve(store, email, tag()))[0] is False
    assert (await reserve(store, email, source))[0] is True


# Argon2 budget per source


async def spend(store: IdentityStore, source: bytes, seconds: float, cost: int = 1) -> float | None:
    """None when allowed, else the retry-after."""
    decision = await store.spend_hash_budget(source, cost, T0 + at(seconds), BUDGET)
    return None if decision.allowed else decision.retry_after_s


async def test_the_budget_allows_a_burst_then_refills_at_its_rate(store: IdentityStore) -> None:
    source = tag()
    assert [await spend(store, source, 0) for _ in range(4)] == [None] * 4
    assert await spend(store, source, 0) == pytest.approx(2.0)
    assert await spend(store, source, 1) == pytest.approx(1.0)
    assert await spend(store, source, 2) is None
    assert await spend(store, source, 2) == pytest.approx(2.0)
    assert await spend(store, source, 100, cost=2) is None  # full again, never above burst
    assert await spend(store, source, 100, cost=2) is None
    assert await spend(store, source, 100) == pytest.approx(2.0)


async def test_a_refused_spend_takes_nothing(store: IdentityStore) -> None:
    source = tag()
    await spend(store, source, 0, cost=3)
    assert await spend(store, source, 0, cost=2) == pytest.approx(2.0)
    assert await spend(store, source, 0, cost=1) is None


async def test_each_source_has_its_own_budget(store: IdentityStore) -> None:
    spender, other = tag(), tag()
    await spend(store, spender, 0, cost=4)
    assert await spend(store, spender, 0) is not None
    assert await spend(store, other, 0, cost=4) is None


async def test_concurrent_spends_cannot_overdraw(store: IdentityStore) -> None:
    source = tag()
    decisions = await asyncio.gather(
        *(store.spend_hash_budget(source, 1, T0, BUDGET) for _ in range(20))
    )
    assert sum(d.allowed for d in decisions) == 4


# Purge


async def test_purge_removes_old_counters_known_sources_and_full_buckets(
    store: IdentityStore,
) -> None:
    old, young = T0 - timedelta(days=2), T0
    cutoff = T0 - timedelta(days=1)
    stale, fresh, source = tag(), tag(), tag()
    await store.reserve_password_attempt(stale, source, old, RULES)
    await store.reserve_password_attempt(fresh, source, young, RULES)
    forgotten, remembered = tag(), tag()
    await store.settle_password_attempt(forgotten, source, old)
    await store.settle_password_attempt(remembered, source, young)
    idle, busy = tag(), tag()
    await store.spend_hash_budget(idle, 1, old, BUDGET)
    await store.spend_hash_budget(busy, 4, young, BUDGET)

    counts = await store.purge(
        idempotency_before=cutoff,
        outbox_before=cutoff,
        throttle_before=cutoff,
        sessions_before=cutoff,
        known_sources_before=cutoff,
        budgets_before=cutoff,
    )

    assert counts.throttle >= 2  # the stale email's pair and email counters
    assert counts.known_sources >= 1
    assert counts.budgets >= 1
    restarted = await store.reserve_password_attempt(stale, source, young, RULES)
    assert (restarted.failures, restarted.email_failures) == (1, 1)
    kept = await store.reserve_password_attempt(fresh, source, young, RULES)
    assert (kept.failures, kept.email_failures) == (2, 2)
    for email in (forgotten, remembered):
        for _ in range(7):
            await store.reserve_password_attempt(email, tag(), young, RULES)
    assert not (await store.reserve_password_attempt(forgotten, source, young, RULES)).allowed
    assert (await store.reserve_password_attempt(remembered, source, young, RULES)).allowed
    assert (await store.spend_hash_budget(busy, 1, young, BUDGET)).allowed is False


async def test_purge_without_the_new_cutoffs_keeps_known_sources_and_budgets(
    store: IdentityStore,
) -> None:
    email, source, spender = tag(), tag(), tag()
    long_ago = T0 - timedelta(days=400)
    await store.settle_password_attempt(email, source, long_ago)
    await store.spend_hash_budget(spender, 4, long_ago, BUDGET)
    cutoff = T0 - timedelta(days=1)
    await store.purge(
        idempotency_before=cutoff,
        outbox_before=cutoff,
        throttle_before=cutoff,
        sessions_before=cutoff,
    )
    for _ in range(7):
        await store.reserve_password_attempt(email, tag(), T0, RULES)
    # Still known-good: with a 400-day window it was never forgotten.
    wide = replace(RULES, known_source_s=400 * 86400.0 + 1)
    assert (await store.reserve_password_attempt(email, source, T0, wide)).allowed
