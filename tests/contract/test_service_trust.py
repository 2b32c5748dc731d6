"""Throttling by source and the reservation rules, at the service, on both stores.

The three goals of contract v2, section 1 ("Throttling by source"), each proven, and counted
where the contract asks for numbers (SECURITY.md quotes them):

1. a sender without the password, from sources other than the victim's, cannot stop the
   victim from signing in with the right password from the victim's source;
2. guessing stays bounded per email across all sources;
3. one source cannot spray unbounded argon2 work over many emails, account.create included.

And issue 18: only a reserved attempt is refunded (items 1), a verified password never counts
as a failure (item 2), fingerprints survive signing-key rotation (item 4).
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import pytest

from messages import ChangePassword, CreateAccount, StartSession, UpdateAccount
from services.clock import FakeClock
from services.errors import (
    EmailTakenError,
    IdempotencyKeyReusedError,
    InvalidCredentialsError,
    PasswordPolicyError,
    RateLimitedError,
)
from services.identity import IdentityService
from services.operations import CommandContext
from services.passwords import HashingPool
from services.tokens import SigningKey
from stores import HashBudget, IdentityStore, ThrottleSchedule
from tests.support.factory import TEST_CONFIG, TEST_KEYS, TEST_START, running_service

PASSWORD = "correct horse battery staple"
WRONG = "an entirely wrong passphrase"
DAY = 86400.0


def ctx(source: str, key: str | None = None) -> CommandContext:
    return CommandContext(idempotency_key=key or uuid.uuid4().hex, source=source)


def email() -> str:
    return f"user-{secrets.token_hex(6)}@example.com"


def new_source() -> str:
    """A source no other test names. The PostgreSQL runs share one database per session, every
    test's clock starts at TEST_START, and the argon2 budget is kept per source: a bucket one
    test spent (up to a later moment of its clock) would still be spent for any later test
    that names the same source, refusing it before any check it meant to make."""
    return f"ip:2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def create(address: str, password: str = PASSWORD) -> CreateAccount:
    return CreateAccount.model_validate(
        {"email": address, "password": password, "display_name": "Ada"}
    )


def start(address: str, password: str = PASSWORD) -> StartSession:
    return StartSession.model_validate({"email": address, "password": password})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(TEST_START)


@pytest.fixture
async def service(store: IdentityStore, clock: FakeClock) -> AsyncIterator[IdentityService]:
    async with running_service(store, clock=clock) as (built, _):
        yield built


async def attempt(service: IdentityService, address: str, password: str, source: str) -> str:
    """ "ok", "invalid_credentials" or "rate_limited"."""
    try:
        await service.start_session(start(address, password), ctx(source))
    except InvalidCredentialsError:
        return "invalid_credentials"
    except RateLimitedError:
        return "rate_limited"
    return "ok"


# Goal 1: the victim's own source gets in


async def test_the_victim_signs_in_from_its_source_while_the_attacker_is_locked_out(
    service: IdentityService,
) -> None:
    victim, victim_source, attacker = email(), new_source(), new_source()
    await service.create_account(create(victim), ctx(victim_source))
    assert await attempt(service, victim, PASSWORD, victim_source) == "ok"
    # One attacker source hammers until it is locked, then many more until the email is.
    hammer = [await attempt(service, victim, WRONG, attacker) for _ in range(8)]
    assert hammer[:6] == ["invalid_credentials"] * 6
    assert hammer[6:] == ["rate_limited"] * 2
    spread = [await attempt(service, victim, WRONG, new_source()) for _ in range(38)]
    assert "rate_limited" in spread
    assert await attempt(service, victim, WRONG, new_source()) == "rate_limited"

    assert await attempt(service, victim, PASSWORD, victim_source) == "ok"


async def test_the_victims_own_typos_do_not_lock_it_out_of_its_source(
    service: IdentityService,
) -> None:
    victim, victim_source = email(), new_source()
    await service.create_account(create(victim), ctx(victim_source))
    assert await attempt(service, victim, PASSWORD, victim_source) == "ok"
    for _ in range(30):
        await attempt(service, victim, WRONG, new_source())
    for _ in range(3):
        assert await attempt(service, victim, WRONG, victim_source) == "invalid_credentials"
    assert await attempt(service, victim, PASSWORD, victim_source) == "ok"


# Goal 2: guessing per email is bounded, however many sources


def guesses_per_day(schedule: ThrottleSchedule, seconds: float = DAY) -> int:
    """Guesses a patient attacker gets on one counter in `seconds`: the free ones and the one
    that sets the first lock at once, then one each time a lock runs out."""
    guesses, elapsed, failures = schedule.free_failures + 1, 0.0, schedule.free_failures + 1
    while True:
        elapsed += schedule.lock_seconds(failures)
        if elapsed >= seconds:
            return guesses
        guesses += 1
        failures += 1


async def test_guessing_one_email_from_a_new_source_each_time_is_bounded_per_day(
    service: IdentityService, clock: FakeClock
) -> None:
    victim = email()
    await service.create_account(create(victim), ctx(new_source()))
    end = clock.now() + timedelta(seconds=DAY)
    guesses = sources = 0
    while clock.now() < end:
        sources += 1
        try:
            await service.start_session(start(victim, WRONG), ctx(new_source()))
        except InvalidCredentialsError:
            guesses += 1
        except RateLimitedError as limited:
            clock.advance(limited.retry_after_s)

    bound = guesses_per_day(ThrottleSchedule(free_failures=20))
    assert guesses == bound
    assert bound == 125  # SECURITY.md, "Throttling": 21 at once, then one per lock
    assert sources > guesses  # the refused ones were many more sources, to no avail


def test_one_source_on_one_email_gets_a_bounded_number_of_guesses_per_day() -> None:
    assert guesses_per_day(ThrottleSchedule(free_failures=5)) == 110


# Goal 3: one source cannot spray argon2 work over many emails


@pytest.fixture
async def budgeted(
    store: IdentityStore, clock: FakeClock
) -> AsyncIterator[tuple[IdentityService, list[str]]]:
    """The service with the production budget (0.5 hashes/s, a burst of 30), counting every
    argon2 computation it makes."""
    hashes: list[str] = []
    config = replace(TEST_CONFIG, budget=HashBudget())
    async with running_service(
        store, clock=clock, config=config, on_hash_timing=lambda op, _: hashes.append(op)
    ) as (built, _):
        yield built, hashes


async def test_one_source_gets_its_burst_of_hashes_over_many_emails_then_waits(
    budgeted: tuple[IdentityService, list[str]], clock: FakeClock
) -> None:
    service, hashes = budgeted
    sprayer = new_source()
    outcomes = []
    for _ in range(20):  # account.create spends from the same budget
        try:
            await service.create_account(create(email()), ctx(sprayer))
            outcomes.append("created")
        except RateLimitedError:
            outcomes.append("rate_limited")
    for _ in range(20):
        outcomes.append(await attempt(service, email(), WRONG, sprayer))

    assert outcomes.count("created") == 20
    assert outcomes.count("invalid_credentials") == 10
    assert outcomes[30:] == ["rate_limited"] * 10
    assert len(hashes) == 30
    # Another source is not held back by this one.
    assert await attempt(service, email(), WRONG, new_source()) == "invalid_credentials"
    # The budget refills at its rate: 10 s later, 5 more.
    clock.advance(10)
    later = [await attempt(service, email(), WRONG, sprayer) for _ in range(6)]
    assert later == ["invalid_credentials"] * 5 + ["rate_limited"]


async def test_the_budget_refusal_says_when_to_come_back_and_counts_no_failure(
    budgeted: tuple[IdentityService, list[str]],
) -> None:
    service, _ = budgeted
    sprayer, victim = new_source(), email()
    await service.create_account(create(victim), ctx(new_source()))
    for _ in range(30):
        await attempt(service, email(), WRONG, sprayer)
    with pytest.raises(RateLimitedError) as refused:
        await service.start_session(start(victim, PASSWORD), ctx(sprayer))
    assert refused.value.retry_after_s == 2
    assert "source" in refused.value.message


# Issue 18, item 1: only a reserved attempt is refunded


async def test_copies_of_one_key_during_a_lock_refund_nothing(
    service: IdentityService, clock: FakeClock
) -> None:
    victim, source = email(), new_source()
    await service.create_account(create(victim), ctx(new_source()))
    for _ in range(6):  # the sixth failure locks this source for 1 s
        await attempt(service, victim, WRONG, source)
    copies = ctx(source, key=uuid.uuid4().hex)
    results = await asyncio.gather(
        *(service.start_session(start(victim, WRONG), copies) for _ in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, RateLimitedError) for r in results)

    # Still six failures: the next one, after the lock, doubles it (2 s), not a free guess.
    clock.advance(1)
    assert await attempt(service, victim, WRONG, source) == "invalid_credentials"
    clock.advance(1)
    assert await attempt(service, victim, WRONG, source) == "rate_limited"


async def test_copies_of_one_key_count_as_one_attempt(
    service: IdentityService, clock: FakeClock
) -> None:
    victim, source = email(), new_source()
    await service.create_account(create(victim), ctx(new_source()))
    copies = ctx(source, key=uuid.uuid4().hex)
    results = await asyncio.gather(
        *(service.start_session(start(victim, WRONG), copies) for _ in range(4)),
        return_exceptions=True,
    )
    assert all(isinstance(r, InvalidCredentialsError) for r in results)
    # One failure counted: four more are free, the fifth (sixth overall) locks.
    outcomes = [await attempt(service, victim, WRONG, source) for _ in range(6)]
    assert outcomes == ["invalid_credentials"] * 5 + ["rate_limited"]


# Issue 18, item 2: a verified password never counts as a failure


async def test_right_passwords_in_failed_password_changes_leave_sign_in_open(
    service: IdentityService,
) -> None:
    victim, source = email(), new_source()
    created = await service.create_account(create(victim), ctx(source))
    refused_new = ChangePassword.model_validate(
        {"account_id": created.account.id, "current_password": PASSWORD, "new_password": "short"}
    )
    for _ in range(6):
        with pytest.raises(PasswordPolicyError):
            await service.change_password(refused_new, ctx(source))

    assert await attempt(service, victim, PASSWORD, source) == "ok"


async def test_right_passwords_in_email_changes_to_a_taken_address_leave_sign_in_open(
    service: IdentityService,
) -> None:
    victim, taken, source = email(), email(), new_source()
    created = await service.create_account(create(victim), ctx(source))
    await service.create_account(create(taken), ctx(source))
    change = UpdateAccount.model_validate(
        {
            "account_id": created.account.id,
            "expected_version": 1,
            "email": taken,
            "current_password": PASSWORD,
        }
    )
    for _ in range(6):
        with pytest.raises(EmailTakenError):
            await service.update_account(change, ctx(source))

    assert await attempt(service, victim, PASSWORD, source) == "ok"


# Issue 18, item 4: fingerprints survive signing-key rotation


async def test_a_retry_after_its_signing_key_was_dropped_gets_the_same_reply(
    store: IdentityStore, clock: FakeClock
) -> None:
    victim, source = email(), new_source()
    create_ctx, start_ctx = ctx(source), ctx(source)
    async with running_service(store, clock=clock, keys=TEST_KEYS[:1]) as (first, _):
        created = await first.create_account(create(victim), create_ctx)
        started = await first.start_session(start(victim), start_ctx)
    # The README's rotation: a new key first, then, a day later, the old one dropped.
    rotated = [SigningKey("k9", secrets.token_bytes(32))]
    async with running_service(store, clock=clock, keys=rotated) as (after, _):
        assert await after.create_account(create(victim), create_ctx) == created
        replayed = await after.start_session(start(victim), start_ctx)
        # The password is in the fingerprint: the key alone replays nothing.
        with pytest.raises(IdempotencyKeyReusedError):
            await after.start_session(start(victim, WRONG), start_ctx)

    assert replayed.session == started.session
    assert replayed.token.get_secret_value().split(".")[1] == "k9"


async def test_password_work_runs_in_the_hashing_pool_only_once_allowed(
    store: IdentityStore, clock: FakeClock
) -> None:
    """A refused attempt (locked source) hashes nothing: the lock is cheap to keep."""
    hashes: list[str] = []
    async with running_service(
        store, clock=clock, on_hash_timing=lambda op, _: hashes.append(op)
    ) as (service, passwords):
        assert isinstance(passwords, HashingPool)
        victim, source = email(), new_source()
        await service.create_account(create(victim), ctx(new_source()))
        for _ in range(6):
            await attempt(service, victim, WRONG, source)
        before = len(hashes)
        for _ in range(5):
            assert await attempt(service, victim, WRONG, source) == "rate_limited"
        assert len(hashes) == before
