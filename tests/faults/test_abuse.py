"""Abuse of sign-in: password guessing across several workers, and what timing gives away."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.faults.tools import Environment
from tests.support.bus import Bus
from tests.support.checker import scan_for_secrets
from worker.settings import load_settings

pytestmark = pytest.mark.faults

FREE_FAILURES = load_settings({}, keys_needed=False).throttle_free_failures
LOCK_S = 30


def _password() -> str:
    return f"Gq{uuid.uuid4().hex}#"


def _codes(replies: list[dict[str, Any]]) -> Counter[str]:
    return Counter("ok" if r["ok"] else r["error"]["code"] for r in replies)


def _sign_ins_handled(metrics: str) -> float:
    pattern = r'^identity_commands_total\{command="session\.start",[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, re.MULTILINE))


async def test_password_guessing_is_throttled_across_workers(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    env = fault_env
    # A first lock of 30 s (the default is 1 s, doubling): the whole test runs inside it, so
    # what it sees does not depend on how fast the machine is.
    for _ in range(3):
        await env.start_worker(IDENTITY_THROTTLE_BASE_DELAY_S=str(LOCK_S))
    bus = await Bus.open(env.amqp_url, durable="faults.brute-force")
    secrets: set[str] = set()
    try:
        right = _password()
        secrets.add(right)
        known = f"known-{uuid.uuid4().hex[:8]}@example.com"
        created = await bus.call_confirmed(
            "account.create", {"email": known, "password": right, "display_name": "Target"}
        )
        assert created["ok"] is True, created
        results: dict[str, Counter[str]] = {}
        for label, email in (("existing", known), ("unknown", f"nobody-{uuid.uuid4().hex}@x.io")):
            # One guess after another...
            sequential = []
            for _ in range(FREE_FAILURES + 7):
                guess = _password()
                secrets.add(guess)
                sequential.append(
                    await bus.call_confirmed("session.start", {"email": email, "password": guess})
                )
            codes = _codes(sequential)
            assert set(codes) == {"invalid_credentials", "rate_limited"}, codes
            assert codes["invalid_credentials"] <= FREE_FAILURES + 1, codes
            assert [r["error"]["code"] for r in sequential[:FREE_FAILURES]] == [
                "invalid_credentials"
            ] * FREE_FAILURES
            limited = [r for r in sequential if r["error"]["code"] == "rate_limited"]
            assert all(1 <= r["error"]["retry_after_s"] <= LOCK_S for r in limited), limited
            results[f"{label}_sequential"] = codes
            # ...and a burst at once, spread over the three workers.
            # (a fresh address each time: the burst must race for the free failures itself)
            burst_email = f"burst-{uuid.uuid4().hex}@x.io"
            if label == "existing":
                burst_email = f"burst-{uuid.uuid4().hex[:8]}@example.com"
                payload = {
                    "email": burst_email,
                    "password": _password(),
                    "display_name": "Burst Target",
                }
                created = await bus.call_confirmed("account.create", payload)
                assert created["ok"] is True, created
            guesses = [_password() for _ in range(24)]
            secrets.update(guesses)
            burst = await asyncio.gather(
                *(
                    bus.call_confirmed("session.start", {"email": burst_email, "password": g})
                    for g in guesses
                )
            )
            codes = _codes(list(burst))
            assert set(codes) <= {"invalid_credentials", "rate_limited"}, codes
            assert codes["invalid_credentials"] <= FREE_FAILURES + 1, codes
            results[f"{label}_burst"] = codes
        # While locked, even the right password is refused, without a hash being checked.
        locked = await bus.call_confirmed("session.start", {"email": known, "password": right})
        assert locked["ok"] is False
        assert locked["error"]["code"] == "rate_limited", locked
        handled = [_sign_ins_handled(w.metrics()) for w in env.alive()]
        assert sum(1 for n in handled if n > 0) >= 2, handled
        leaks = scan_for_secrets(
            secrets,
            [("log", t) for t in env.logs()] + [("metrics", m) for m in env.metrics()],
        )
        assert leaks == []
        figures["brute_force"] = {
            "commands_published": len(bus.sent),
            "workers": len(env.workers),
            "sign_ins_per_worker": handled,
            "outcomes": {k: dict(v) for k, v in results.items()},
            "leaked": len(leaks),
        }
    finally:
        await bus.close()


async def test_unknown_email_and_wrong_password_take_the_same_time(
    fault_env: Environment, figures: dict[str, dict[str, Any]]
) -> None:
    """Production argon2 parameters; the round trip through the broker is what an attacker
    measures. Samples alternate between the two kinds so drift affects both alike."""
    defaults = load_settings({}, keys_needed=False)
    env = fault_env
    await env.start_worker(
        IDENTITY_ARGON2_TIME_COST=str(defaults.argon2_time_cost),
        IDENTITY_ARGON2_MEMORY_KIB=str(defaults.argon2_memory_kib),
        IDENTITY_ARGON2_PARALLELISM=str(defaults.argon2_parallelism),
    )
    bus = await Bus.open(env.amqp_url, durable="faults.timing")
    try:
        per_account = FREE_FAILURES - 1  # stay clear of the throttle
        rounds = 36
        emails = []
        for i in range(-(-rounds // per_account)):
            email = f"timed-{i}-{uuid.uuid4().hex[:6]}@example.com"
            payload = {"email": email, "password": _password(), "display_name": f"Timed {i}"}
            created = await bus.call_confirmed("account.create", payload)
            assert created["ok"] is True, created
            emails.append(email)

        async def timed(email: str) -> float:
            started = time.perf_counter()
            reply = await bus.call_confirmed(
                "session.start", {"email": email, "password": _password()}
            )
            elapsed = time.perf_counter() - started
            assert reply["error"]["code"] == "invalid_credentials", reply
            return elapsed

        for _ in range(2):  # warm-up, not counted
            await timed(f"warm-{uuid.uuid4().hex}@example.com")
        unknown: list[float] = []
        wrong: list[float] = []
        for i in range(rounds):
            pair = [
                (unknown, f"ghost-{uuid.uuid4().hex}@example.com"),
                (wrong, emails[i // per_account]),
            ]
            for samples, email in pair if i % 2 == 0 else reversed(pair):
                samples.append(await timed(email))
        m_unknown, m_wrong = statistics.median(unknown), statistics.median(wrong)
        difference = abs(m_unknown - m_wrong) / max(m_unknown, m_wrong)
        figures["timing"] = {
            "samples_per_kind": rounds,
            "median_unknown_email_ms": round(m_unknown * 1000, 1),
            "median_wrong_password_ms": round(m_wrong * 1000, 1),
            "relative_difference": round(difference, 3),
            "argon2": {
                "time_cost": defaults.argon2_time_cost,
                "memory_kib": defaults.argon2_memory_kib,
                "parallelism": defaults.argon2_parallelism,
            },
        }
        assert difference < 0.2, figures["timing"]
    finally:
        await bus.close()
