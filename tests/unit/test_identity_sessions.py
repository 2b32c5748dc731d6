"""IdentityService: sign-in, tokens, expiry, throttling and rehash on the in-memory store."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from messages import ChangePassword, EndAllSessions, EndSession, VerifySession
from services.clock import FakeClock
from services.errors import (
    InvalidCredentialsError,
    InvalidTokenError,
    RateLimitedError,
    SessionExpiredError,
)
from services.identity import IdentityService
from services.passwords import HashingPool
from services.tokens import SigningKey, TokenSigner
from stores.memory import MemoryIdentityStore
from tests.support.factory import TEST_CONFIG, TEST_KEYS, running_service
from tests.unit.helpers import (
    PASSWORD,
    create_cmd,
    ctx,
    ended_session_ids,
    pending_events,
    sessions_live_idle_and_expired,
    start_cmd,
)
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def verify_cmd(token: str) -> VerifySession:
    return VerifySession.model_validate({"token": token})


async def test_a_started_session_verifies_and_is_announced_without_its_token(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    started = await service.start_session(start_cmd(), ctx())
    token = started.token.get_secret_value()
    verified = await service.verify_session(verify_cmd(token))
    assert verified.session == started.session
    assert verified.account.id == started.account.id
    events = await pending_events(store)
    assert events[-1]["type"] == "session.started"
    assert token not in str(events)


async def test_replayed_start_returns_the_same_session_and_token(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    first = await service.start_session(start_cmd(), ctx("sign-in-1"))
    again = await service.start_session(start_cmd(), ctx("sign-in-1"))
    assert again.session == first.session
    assert again.token.get_secret_value() == first.token.get_secret_value()
    stored = await store.get_idempotency("sign-in-1")
    assert stored is not None
    assert "token" not in stored.reply["result"]
    types = [e["type"] for e in await pending_events(store)]
    assert types.count("session.started") == 1


async def test_unknown_email_and_wrong_password_get_the_same_error_and_work(
    service: IdentityService, passwords: HashingPool
) -> None:
    await service.create_account(create_cmd(), ctx())
    timings: list[str] = passwords.timings  # type: ignore[attr-defined]
    timings.clear()
    with pytest.raises(InvalidCredentialsError) as wrong:
        await service.start_session(start_cmd(password="wrong password but long"), ctx())
    with pytest.raises(InvalidCredentialsError) as unknown:
        await service.start_session(start_cmd("nobody@example.com"), ctx())
    assert str(wrong.value) == str(unknown.value)
    assert timings == ["verify", "verify"]


async def test_email_is_matched_in_its_canonical_form_on_sign_in(service: IdentityService) -> None:
    await service.create_account(create_cmd("Ada@Example.COM"), ctx())
    started = await service.start_session(start_cmd("  ada@example.com"), ctx())
    assert started.account.email == "Ada@Example.COM"


async def test_repeated_failures_are_throttled_for_known_and_unknown_emails(
    service: IdentityService, clock: FakeClock
) -> None:
    await service.create_account(create_cmd(), ctx())
    for email in ("ada@example.com", "ghost@example.com"):
        for _ in range(6):  # five free failures, the sixth sets the first lock
            with pytest.raises(InvalidCredentialsError):
                await service.start_session(start_cmd(email, "wrong password but long"), ctx())
        with pytest.raises(RateLimitedError) as limited:
            await service.start_session(start_cmd(email, "wrong password but long"), ctx())
        assert limited.value.retry_after_s == 1
    clock.advance(seconds=1)
    with pytest.raises(InvalidCredentialsError):  # allowed again, and the lock doubles
        await service.start_session(start_cmd(password="wrong password but long"), ctx())
    with pytest.raises(RateLimitedError) as limited:
        await service.start_session(start_cmd(), ctx())
    assert limited.value.retry_after_s == 2


def _one_line(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").split())


def _ordinal(n: int) -> str:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th") if n % 100 not in (11, 12, 13) else "th"
    return f"{n}{suffix}"


def test_the_docs_state_the_throttle_the_service_applies() -> None:
    # The test above is the behaviour; this is what README.md and the contract say of it,
    # with the numbers of the default settings. The sixth failure is checked, then locks.
    defaults = load_settings({}, keys_needed=False)
    free, base = defaults.throttle_free_failures, defaults.throttle_base_delay_s
    email_free = defaults.throttle_email_free_failures
    sixth = _ordinal(free + 1)
    rule = f"first {free} failures on an email are free; from the {sixth} on, each failure locks"
    readme = _one_line(ROOT / "README.md")
    longest = defaults.throttle_max_delay_s / 60
    first_lock = f"that source for the email, for {base:g} s after the {sixth}"
    assert f"A source's {rule} {first_lock}" in readme
    assert f"doubling with each further failure up to {longest:g} minutes" in readme
    assert f"The {sixth} guess is still checked" in readme
    assert f"{defaults.throttle_reset_after_s / 3600:g} hours without a failure" in readme
    assert (
        f"The email's first {email_free} failures from all sources are free; "
        f"from the {_ordinal(email_free + 1)} on it locks" in readme
    )
    contract = _one_line(ROOT / "docs" / "contract.md")
    assert f"a source's {rule}" in contract
    assert f"the first {email_free} failures from all sources are free" in contract


async def test_a_successful_sign_in_forgets_earlier_failures(
    service: IdentityService, clock: FakeClock
) -> None:
    await service.create_account(create_cmd(), ctx())
    for _ in range(5):
        with pytest.raises(InvalidCredentialsError):
            await service.start_session(start_cmd(password="wrong password but long"), ctx())
    await service.start_session(start_cmd(), ctx())
    for _ in range(5):
        with pytest.raises(InvalidCredentialsError):
            await service.start_session(start_cmd(password="wrong password but long"), ctx())
    await service.start_session(start_cmd(), ctx())


async def test_a_replayed_failure_is_not_counted_twice(service: IdentityService) -> None:
    await service.create_account(create_cmd(), ctx())
    for _ in range(5):
        with pytest.raises(InvalidCredentialsError):
            await service.start_session(start_cmd(password="wrong password but long"), ctx("same"))
    await service.start_session(start_cmd(), ctx())  # one failure counted, not five


async def test_sessions_expire_after_their_lifetime(
    service: IdentityService, clock: FakeClock
) -> None:
    await service.create_account(create_cmd(), ctx())
    token = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    for _ in range(49):  # active every 29 minutes, so never idle, for 23h41m
        clock.advance(minutes=29)
        await service.verify_session(verify_cmd(token))
    clock.advance(minutes=20)  # 24h01m after sign-in
    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(token))


async def test_idle_sessions_expire_and_last_seen_writes_are_throttled(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    await service.create_account(create_cmd(), ctx())
    started = await service.start_session(start_cmd(), ctx())
    token = started.token.get_secret_value()
    clock.advance(seconds=30)
    await service.verify_session(verify_cmd(token))
    unit = store.unit_of_work()
    async with unit as uow:
        seen = (await uow.get_session(started.session.id)).last_seen_at  # type: ignore[union-attr]
    assert seen == started.session.created_at  # 30 s is inside the touch interval
    clock.advance(minutes=29)
    await service.verify_session(verify_cmd(token))
    clock.advance(minutes=29)
    await service.verify_session(verify_cmd(token))  # still alive: the touch moved last_seen
    clock.advance(minutes=31)
    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(token))


async def test_forged_and_tampered_tokens_are_invalid(service: IdentityService) -> None:
    await service.create_account(create_cmd(), ctx())
    token = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    forged = TokenSigner([SigningKey("k2", secrets.token_bytes(32))]).sign(token.split(".")[2])
    for bad in (forged, token[:-2] + "AA", "not-a-token", token + "x"):
        with pytest.raises(InvalidTokenError):
            await service.verify_session(verify_cmd(bad))


async def test_tokens_survive_key_rotation(
    store: MemoryIdentityStore, clock: FakeClock, service: IdentityService
) -> None:
    await service.create_account(create_cmd(), ctx())
    token = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    new_key, old_key = SigningKey("k3", secrets.token_bytes(32)), TEST_KEYS[0]
    async with running_service(store, clock=clock, keys=[new_key, old_key]) as (rotated, _):
        await rotated.verify_session(verify_cmd(token))
        fresh = (await rotated.start_session(start_cmd(), ctx())).token.get_secret_value()
    assert fresh.split(".")[1] == "k3"
    async with running_service(store, clock=clock, keys=[new_key]) as (retired, _):
        with pytest.raises(InvalidTokenError):
            await retired.verify_session(verify_cmd(token))


async def test_ending_a_session_twice_is_fine_and_announced_once(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    started = await service.start_session(start_cmd(), ctx())
    end = EndSession.model_validate({"token": started.token.get_secret_value()})
    assert (await service.end_session(end, ctx())).session_id == started.session.id
    assert (await service.end_session(end, ctx())).session_id == started.session.id
    ended = [e for e in await pending_events(store) if e["type"] == "session.ended"]
    assert len(ended) == 1
    assert ended[0]["data"]["reason"] == "sign_out"
    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(started.token.get_secret_value()))


async def test_ending_all_sessions_announces_each_one(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    for _ in range(3):
        await service.start_session(start_cmd(), ctx())
    result = await service.end_all_sessions(EndAllSessions(account_id=account.id), ctx())
    assert result.sessions_ended == 3
    reasons = [
        e["data"]["reason"] for e in await pending_events(store) if e["type"] == "session.ended"
    ]
    assert reasons == ["sign_out_everywhere"] * 3


async def test_an_outdated_hash_is_upgraded_on_sign_in_without_a_new_version(
    store: MemoryIdentityStore, clock: FakeClock
) -> None:
    stronger = replace(TEST_CONFIG, argon2_time_cost=2, argon2_memory_kib=9216)
    async with running_service(store, clock=clock) as (old, _):
        account = (await old.create_account(create_cmd(), ctx())).account
    async with running_service(store, clock=clock, config=stronger) as (new, strong):
        clock.advance(timedelta(seconds=5).total_seconds())
        await new.start_session(start_cmd(), ctx())
        record = await store.get_account(account.id)
        assert record is not None
        assert not strong.needs_rehash(record.password_hash)
        assert record.version == 1
        await new.start_session(start_cmd(), ctx())


async def test_ending_all_sessions_ends_only_the_live_ones(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account_id, tokens = await sessions_live_idle_and_expired(service, clock)

    result = await service.end_all_sessions(EndAllSessions(account_id=account_id), ctx())

    # The expired and the idle one were over already: not counted, not announced again.
    assert result.sessions_ended == 1
    assert ended_session_ids(await pending_events(store)) == [tokens["live"].split(".")[2]]


async def test_changing_the_password_ends_only_the_live_sessions(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account_id, tokens = await sessions_live_idle_and_expired(service, clock)
    change = ChangePassword.model_validate(
        {
            "account_id": account_id,
            "current_password": PASSWORD,
            "new_password": "a different long passphrase",
        }
    )

    result = await service.change_password(change, ctx())

    assert result.sessions_ended == 1
    events = await pending_events(store)
    assert ended_session_ids(events) == [tokens["live"].split(".")[2]]
    assert events[-1]["data"]["sessions_ended"] == 1  # account.password_changed


@pytest.mark.parametrize("state", ["idle", "expired"])
async def test_signing_out_of_a_session_that_is_over_announces_nothing(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock, state: str
) -> None:
    _, tokens = await sessions_live_idle_and_expired(service, clock)
    end = EndSession.model_validate({"token": tokens[state]})

    assert (await service.end_session(end, ctx())).session_id == tokens[state].split(".")[2]

    assert ended_session_ids(await pending_events(store)) == []
