"""IdentityService: accounts, idempotency and optimistic concurrency on the in-memory store."""

from __future__ import annotations

import pytest

from messages import ChangePassword, GetAccount, UpdateAccount
from services.errors import (
    EmailTakenError,
    IdempotencyKeyReusedError,
    InvalidCredentialsError,
    InvalidInputError,
    NotFoundError,
    PasswordPolicyError,
    VersionConflictError,
)
from services.identity import IdentityService
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import PASSWORD, create_cmd, ctx, pending_events, start_cmd


async def test_created_account_starts_at_version_one_and_announces_itself(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    result = await service.create_account(create_cmd(), ctx("k-create"))
    assert result.account.id.startswith("acct_")
    assert result.account.email == "Ada@Example.com"
    assert result.account.version == 1
    events = await pending_events(store)
    assert [e["type"] for e in events] == ["account.created"]
    assert events[0]["data"]["account"]["id"] == result.account.id
    assert events[0]["causation_id"] == "k-create"
    assert events[0]["correlation_id"] == "corr-1"


async def test_email_is_unique_whatever_its_case_and_spacing(service: IdentityService) -> None:
    await service.create_account(create_cmd("Ada@Example.com"), ctx())
    with pytest.raises(EmailTakenError):
        await service.create_account(create_cmd("  ada@EXAMPLE.com "), ctx())


async def test_replayed_create_returns_the_same_account_and_no_second_event(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    first = await service.create_account(create_cmd(), ctx("same-key"))
    again = await service.create_account(create_cmd(), ctx("same-key"))
    assert again == first
    assert len(await pending_events(store)) == 1


async def test_key_reused_with_another_payload_is_refused(service: IdentityService) -> None:
    await service.create_account(create_cmd(), ctx("k"))
    with pytest.raises(IdempotencyKeyReusedError):
        await service.create_account(create_cmd(password=PASSWORD + " again"), ctx("k"))


async def test_key_reused_with_another_command_is_refused(service: IdentityService) -> None:
    await service.create_account(create_cmd(), ctx("k"))
    with pytest.raises(IdempotencyKeyReusedError):
        await service.start_session(start_cmd(), ctx("k"))


async def test_a_failed_command_replays_its_error_without_redoing_it(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    with pytest.raises(EmailTakenError):
        await service.create_account(create_cmd("ADA@example.com"), ctx("dup"))
    stored = await store.get_idempotency("dup")
    assert stored is not None
    assert stored.reply["error"]["code"] == "email_taken"
    with pytest.raises(EmailTakenError):
        await service.create_account(create_cmd("ADA@example.com"), ctx("dup"))


async def test_weak_passwords_are_refused_with_the_field_named(service: IdentityService) -> None:
    with pytest.raises(PasswordPolicyError) as caught:
        await service.create_account(create_cmd(password="short"), ctx())
    assert caught.value.fields[0].field == "payload.password"
    with pytest.raises(PasswordPolicyError):
        await service.create_account(create_cmd(password="passwordpassword"), ctx())


async def test_get_unknown_account_is_not_found(service: IdentityService) -> None:
    with pytest.raises(NotFoundError):
        await service.get_account(GetAccount(account_id="acct_" + "0" * 26))


async def test_update_with_stale_version_changes_nothing(service: IdentityService) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    rename = {"account_id": account.id, "expected_version": 1, "display_name": "Countess"}
    updated = await service.update_account(UpdateAccount.model_validate(rename), ctx())
    assert updated.account.version == 2
    assert updated.account.display_name == "Countess"
    stale = {**rename, "display_name": "Someone else"}
    with pytest.raises(VersionConflictError):
        await service.update_account(UpdateAccount.model_validate(stale), ctx())
    current = await service.get_account(GetAccount(account_id=account.id))
    assert current.account.display_name == "Countess"
    assert current.account.version == 2


async def test_update_announces_which_fields_changed(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    change = {"account_id": account.id, "expected_version": 1, "display_name": "A. Lovelace"}
    await service.update_account(UpdateAccount.model_validate(change), ctx())
    events = await pending_events(store)
    assert events[-1]["type"] == "account.updated"
    assert events[-1]["data"]["changed"] == ["display_name"]


async def test_email_change_needs_the_current_password(service: IdentityService) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    change = {"account_id": account.id, "expected_version": 1, "email": "ada@new.example"}
    with pytest.raises(InvalidInputError) as caught:
        await service.update_account(UpdateAccount.model_validate(change), ctx())
    assert caught.value.fields[0].field == "payload.current_password"
    wrong = {**change, "current_password": "not the password at all"}
    with pytest.raises(InvalidCredentialsError):
        await service.update_account(UpdateAccount.model_validate(wrong), ctx())
    right = {**change, "current_password": PASSWORD}
    updated = await service.update_account(UpdateAccount.model_validate(right), ctx())
    assert updated.account.email == "ada@new.example"
    await service.start_session(start_cmd("ada@new.example"), ctx())


async def test_email_change_to_a_taken_address_is_refused(service: IdentityService) -> None:
    await service.create_account(create_cmd("grace@example.com"), ctx())
    account = (await service.create_account(create_cmd(), ctx())).account
    change = {
        "account_id": account.id,
        "expected_version": 1,
        "email": "Grace@Example.com",
        "current_password": PASSWORD,
    }
    with pytest.raises(EmailTakenError):
        await service.update_account(UpdateAccount.model_validate(change), ctx())


async def test_changing_the_password_ends_every_session(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    first = await service.start_session(start_cmd(), ctx())
    await service.start_session(start_cmd(), ctx())
    new_password = "a different long passphrase"
    change = ChangePassword.model_validate(
        {"account_id": account.id, "current_password": PASSWORD, "new_password": new_password}
    )
    result = await service.change_password(change, ctx())
    assert result.sessions_ended == 2
    assert result.account.version == 2
    types = [e["type"] for e in await pending_events(store)]
    assert types.count("session.ended") == 2
    assert "account.password_changed" in types
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(), ctx())
    await service.start_session(start_cmd(password=new_password), ctx())
    assert first.session.account_id == account.id


async def test_change_password_refuses_a_wrong_current_or_an_unchanged_password(
    service: IdentityService,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    wrong = {
        "account_id": account.id,
        "current_password": "nope nope nope nope",
        "new_password": "x" * 20,
    }
    with pytest.raises(InvalidCredentialsError):
        await service.change_password(ChangePassword.model_validate(wrong), ctx())
    same = {"account_id": account.id, "current_password": PASSWORD, "new_password": PASSWORD}
    with pytest.raises(PasswordPolicyError):
        await service.change_password(ChangePassword.model_validate(same), ctx())
