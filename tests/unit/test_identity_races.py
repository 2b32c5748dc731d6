"""A password is checked outside any transaction (argon2 takes a while); the stored hash can
change meanwhile. A sign-in or a password change must then check again, never act on what it
checked against a hash that is gone: a session opened with the old password would outlive the
change that was meant to end every session."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from messages import ChangePassword
from services.clock import FakeClock
from services.errors import InvalidCredentialsError
from services.identity import IdentityService, SessionPolicy
from services.passwords import HashingPool
from stores import TransientStoreError
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import PASSWORD, create_cmd, ctx, failures, pending_events, start_cmd

NEW_PASSWORD = "a different long passphrase"
EMAIL = "ada@example.com"


def change_cmd(account_id: str, current: str, new: str) -> ChangePassword:
    return ChangePassword.model_validate(
        {"account_id": account_id, "current_password": current, "new_password": new}
    )


def meanwhile(
    monkeypatch: pytest.MonkeyPatch,
    passwords: HashingPool,
    method: str,
    action: Callable[[], Awaitable[None]],
) -> None:
    """Run `action` once, right after the next call of `passwords.<method>` (verify or hash)
    finishes and before its caller goes on."""
    real = getattr(passwords, method)

    async def then_act(*args: str) -> object:
        result = await real(*args)
        monkeypatch.setattr(passwords, method, real)
        await action()
        return result

    monkeypatch.setattr(passwords, method, then_act)


async def rehash(store: MemoryIdentityStore, passwords: HashingPool, account_id: str) -> None:
    """What a sign-in does when the argon2 parameters changed: a new hash of the same
    password, replacing the old one without a new account version."""
    account = await store.get_account(account_id)
    assert account is not None
    new_hash = await passwords.hash(PASSWORD)
    async with store.unit_of_work() as uow:
        assert await uow.replace_password_hash(account_id, account.password_hash, new_hash)


async def open_sessions(store: MemoryIdentityStore, account_id: str, clock: FakeClock) -> int:
    """How many of the account's sessions are still open. The port lists sessions no other
    way than by ending them, so this ends them (a later sign-in is unaffected)."""
    now = clock.now()
    async with store.unit_of_work() as uow:
        ended = await uow.end_all_sessions(
            account_id, now, "sign_out_everywhere", idle_cutoff=now - SessionPolicy().idle_timeout
        )
    return len(ended)


async def test_a_sign_in_checked_against_a_password_changed_meanwhile_opens_no_session(
    service: IdentityService,
    store: MemoryIdentityStore,
    passwords: HashingPool,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account

    async def change() -> None:
        await service.change_password(change_cmd(account.id, PASSWORD, NEW_PASSWORD), ctx())

    meanwhile(monkeypatch, passwords, "verify", change)
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(), ctx())

    assert await open_sessions(store, account.id, clock) == 0
    types = [e["type"] for e in await pending_events(store)]
    assert "session.started" not in types
    # One failed sign-in, counted once: the first check verified the password of the time
    # (settled: no failure), the second check counted its own.
    assert failures(store, EMAIL) == (1, 1)
    await service.start_session(start_cmd(password=NEW_PASSWORD), ctx())


async def test_a_sign_in_racing_a_rehash_of_the_same_password_still_opens_its_session(
    service: IdentityService,
    store: MemoryIdentityStore,
    passwords: HashingPool,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    meanwhile(monkeypatch, passwords, "verify", lambda: rehash(store, passwords, account.id))

    started = await service.start_session(start_cmd(), ctx())

    assert started.account.id == account.id
    assert await open_sessions(store, account.id, clock) == 1
    types = [e["type"] for e in await pending_events(store)]
    assert types.count("session.started") == 1


async def test_a_password_change_racing_a_rehash_of_the_same_password_still_succeeds(
    service: IdentityService,
    store: MemoryIdentityStore,
    passwords: HashingPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    await service.start_session(start_cmd(), ctx())
    # The new password's hash is made between the check and the transaction.
    meanwhile(monkeypatch, passwords, "hash", lambda: rehash(store, passwords, account.id))

    changed = await service.change_password(change_cmd(account.id, PASSWORD, NEW_PASSWORD), ctx())

    assert changed.sessions_ended == 1
    await service.start_session(start_cmd(password=NEW_PASSWORD), ctx())
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(), ctx())


async def test_a_password_change_racing_another_change_is_refused(
    service: IdentityService,
    store: MemoryIdentityStore,
    passwords: HashingPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    other = "yet another long passphrase"

    async def change_first() -> None:
        await service.change_password(change_cmd(account.id, PASSWORD, other), ctx())

    meanwhile(monkeypatch, passwords, "hash", change_first)
    with pytest.raises(InvalidCredentialsError):
        await service.change_password(change_cmd(account.id, PASSWORD, NEW_PASSWORD), ctx())

    await service.start_session(start_cmd(password=other), ctx())
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(password=NEW_PASSWORD), ctx())


async def test_a_hash_that_changes_under_both_checks_fails_the_sign_in_as_transient(
    service: IdentityService,
    store: MemoryIdentityStore,
    passwords: HashingPool,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account

    async def rehash_now_and_after_the_next_check() -> None:
        await rehash(store, passwords, account.id)
        meanwhile(monkeypatch, passwords, "verify", lambda: rehash(store, passwords, account.id))

    meanwhile(monkeypatch, passwords, "verify", rehash_now_and_after_the_next_check)
    key = ctx()
    # Retried by the worker with back-off, not answered: no reply is stored for the key.
    with pytest.raises(TransientStoreError):
        await service.start_session(start_cmd(), key)

    assert await store.get_idempotency(key.idempotency_key or "") is None
    assert await open_sessions(store, account.id, clock) == 0
    again = await service.start_session(start_cmd(), key)
    assert again.account.id == account.id
