"""Disable and enable (services.lifecycle) on the in-memory store: sessions end with the
change, sign-in answers after the password, verify checks the status, repeats change nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from messages import DisableAccount, EnableAccount, EndAllSessions, VerifySession
from services.clock import FakeClock
from services.errors import (
    AccountDisabledError,
    InvalidCredentialsError,
    NotFoundError,
    SessionExpiredError,
)
from services.identity import IdentityService
from stores import AccountChanges
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import create_cmd, ctx, pending_events, start_cmd

WRONG = "wrong password but long"


def disable_cmd(account_id: str, reason: str = "abuse report 42") -> DisableAccount:
    return DisableAccount(account_id=account_id, reason=reason)


def verify_cmd(token: str) -> VerifySession:
    return VerifySession.model_validate({"token": token})


async def test_disable_ends_every_live_session_and_announces_it_after_them(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    tokens = [
        (await service.start_session(start_cmd(), ctx())).token.get_secret_value() for _ in range(3)
    ]
    clock.advance(seconds=5)

    result = await service.lifecycle.disable_account(disable_cmd(account.id), ctx("off-1"))

    assert result.sessions_ended == 3
    assert result.account.status == "disabled"
    assert result.account.version == account.version + 1
    assert result.account.updated_at == clock.now()
    events = [e for e in await pending_events(store) if e["causation_id"] == "off-1"]
    assert [e["type"] for e in events] == ["session.ended"] * 3 + ["account.disabled"]
    assert {e["data"]["reason"] for e in events[:3]} == {"account_disabled"}
    assert events[-1]["data"] == {
        "account_id": account.id,
        "reason": "abuse report 42",
        "sessions_ended": 3,
    }
    for token in tokens:
        with pytest.raises(SessionExpiredError):
            await service.verify_session(verify_cmd(token))


async def test_a_disabled_account_answers_sign_in_only_after_the_password_was_right(
    service: IdentityService,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    await service.lifecycle.disable_account(disable_cmd(account.id), ctx())

    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(password=WRONG), ctx())
    with pytest.raises(AccountDisabledError):
        await service.start_session(start_cmd(), ctx())


async def test_a_session_that_outlived_the_disable_does_not_verify(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    token = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    # The status changed without ending the session: verify checks the status itself.
    async with store.unit_of_work() as uow:
        record = await uow.get_account(account.id)
        assert record is not None
        changes = AccountChanges(updated_at=record.updated_at, status="disabled")
        await uow.update_account(account.id, record.version, changes)

    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(token))


async def test_disabling_a_disabled_account_changes_and_announces_nothing(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    first = await service.lifecycle.disable_account(disable_cmd(account.id), ctx("off-1"))
    again = await service.lifecycle.disable_account(
        disable_cmd(account.id, "second report"), ctx("off-2")
    )

    assert again.account == first.account
    assert again.sessions_ended == 0
    types = [e["type"] for e in await pending_events(store)]
    assert types.count("account.disabled") == 1


async def test_a_replayed_disable_returns_its_reply_and_announces_once(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    await service.start_session(start_cmd(), ctx())
    first = await service.lifecycle.disable_account(disable_cmd(account.id), ctx("off-1"))
    replay = await service.lifecycle.disable_account(disable_cmd(account.id), ctx("off-1"))

    assert replay == first
    assert [e["type"] for e in await pending_events(store)].count("account.disabled") == 1


async def test_enable_restores_sign_in_but_not_the_ended_sessions(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    old = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    disabled = await service.lifecycle.disable_account(disable_cmd(account.id), ctx())
    clock.advance(seconds=1)

    enabled = await service.lifecycle.enable_account(
        EnableAccount(account_id=account.id), ctx("on")
    )

    assert enabled.account.status == "active"
    assert enabled.account.version == disabled.account.version + 1
    events = [e for e in await pending_events(store) if e["causation_id"] == "on"]
    assert [(e["type"], e["data"]) for e in events] == [
        ("account.enabled", {"account_id": account.id})
    ]
    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(old))
    fresh = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    assert (await service.verify_session(verify_cmd(fresh))).account.status == "active"


async def test_enabling_an_active_account_changes_and_announces_nothing(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    result = await service.lifecycle.enable_account(EnableAccount(account_id=account.id), ctx())
    assert result.account == account
    assert [e["type"] for e in await pending_events(store)] == ["account.created"]


async def test_disable_and_enable_of_an_unknown_account_are_not_found(
    service: IdentityService,
) -> None:
    missing = "acct_" + "0" * 26
    with pytest.raises(NotFoundError):
        await service.lifecycle.disable_account(disable_cmd(missing), ctx())
    with pytest.raises(NotFoundError):
        await service.lifecycle.enable_account(EnableAccount(account_id=missing), ctx())


async def test_the_stored_disable_reply_names_its_account_for_erasure(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx("create"))).account
    await service.lifecycle.disable_account(disable_cmd(account.id), ctx("off"))
    for key in ("create", "off"):
        record = await store.get_idempotency(key)
        assert record is not None
        assert record.account_id == account.id


async def test_sessions_of_a_disabled_account_stay_ended_after_end_all(
    service: IdentityService, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    await service.start_session(start_cmd(), ctx())
    await service.lifecycle.disable_account(disable_cmd(account.id), ctx())
    clock.advance(timedelta(minutes=1).total_seconds())
    ended = await service.end_all_sessions(EndAllSessions(account_id=account.id), ctx())
    assert ended.sessions_ended == 0


@pytest.mark.parametrize("reason", ["", "r" * 201, "bad\nline", " padded"])
def test_a_disable_reason_is_1_to_200_visible_characters(reason: str) -> None:
    with pytest.raises(ValidationError):
        disable_cmd("acct_" + "0" * 26, reason)


def test_a_disable_reason_of_200_characters_is_fine() -> None:
    assert len(disable_cmd("acct_" + "0" * 26, "r" * 200).reason) == 200
