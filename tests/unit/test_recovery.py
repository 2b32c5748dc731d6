"""Recovery and verification on the in-memory store, with the injected clock: codes mailed,
used once, expired, voided by 5 wrong tries or by a newer code, throttled without telling
anything; email changes; sign-in that requires a verified address."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from messages import (
    ChangePassword,
    CompleteRecovery,
    ConfirmVerification,
    RequestRecovery,
    RequestVerification,
    UpdateAccount,
)
from services.clock import FakeClock
from services.codes import CodePolicy
from services.errors import (
    EmailNotVerifiedError,
    InvalidCodeError,
    InvalidCredentialsError,
    NotFoundError,
    PasswordPolicyError,
    RateLimitedError,
)
from services.identity import IdentityService
from stores import AccountChanges
from stores.memory import MemoryIdentityStore
from tests.support.factory import TEST_CONFIG, running_service
from tests.unit.helpers import PASSWORD, create_cmd, ctx, pending_events, start_cmd, take_mail

NEW_PASSWORD = "a brand new passphrase for ada"
EMAIL = "ada@example.com"


def complete(code: str, email: str = EMAIL, password: str = NEW_PASSWORD) -> CompleteRecovery:
    return CompleteRecovery.model_validate({"email": email, "code": code, "new_password": password})


def confirm(code: str, email: str = EMAIL) -> ConfirmVerification:
    return ConfirmVerification.model_validate({"email": email, "code": code})


async def signed_up(service: IdentityService, store: MemoryIdentityStore) -> str:
    """An account for EMAIL; its verification mail is taken out of the way."""
    account = (await service.create_account(create_cmd(EMAIL), ctx())).account
    await take_mail(store, service)
    return account.id


async def recovery_code(service: IdentityService, store: MemoryIdentityStore) -> str:
    await service.flows.request_recovery(RequestRecovery(email=EMAIL), ctx())
    (mail,) = await take_mail(store, service)
    assert mail["kind"] == "recovery_code"
    code: str = mail["code"]
    return code


@pytest.fixture
async def strict_service(
    store: MemoryIdentityStore, clock: FakeClock
) -> AsyncIterator[IdentityService]:
    """The service with IDENTITY_REQUIRE_VERIFIED_EMAIL=true."""
    config = replace(TEST_CONFIG, codes=CodePolicy(require_verified_email=True))
    async with running_service(store, clock=clock, config=config) as (service, _):
        yield service


# -- verification ---------------------------------------------------------------------------


async def test_a_new_account_is_mailed_a_verification_code_that_proves_its_address(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(EMAIL), ctx())).account
    assert account.email_verified is False
    (mail,) = await take_mail(store, service)
    assert (mail["kind"], mail["to"], mail["account_id"]) == (
        "verification_code",
        "ada@example.com",
        account.id,
    )
    result = await service.flows.confirm_verification(confirm(mail["code"]), ctx("k-confirm"))
    assert result.account.email_verified is True
    assert result.account.version == 2
    events = await pending_events(store)
    assert events[-1]["type"] == "account.email_verified"
    assert events[-1]["data"] == {"account_id": account.id}
    # Used up: the same code again is refused (a replay of the same key is not).
    with pytest.raises(InvalidCodeError):
        await service.flows.confirm_verification(confirm(mail["code"]), ctx())
    assert await service.flows.confirm_verification(confirm(mail["code"]), ctx("k-confirm"))


async def test_no_code_on_create_when_turned_off(
    store: MemoryIdentityStore, clock: FakeClock
) -> None:
    config = replace(TEST_CONFIG, codes=CodePolicy(send_verification_on_create=False))
    async with running_service(store, clock=clock, config=config) as (service, _):
        await service.create_account(create_cmd(EMAIL), ctx())
        assert await take_mail(store, service) == []


async def test_a_verification_request_mails_a_new_code_and_voids_the_old_one(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(EMAIL), ctx())
    (first,) = await take_mail(store, service)
    account_id = first["account_id"]
    result = await service.flows.request_verification(
        RequestVerification(account_id=account_id), ctx()
    )
    assert result.accepted is True
    (second,) = await take_mail(store, service)
    assert second["kind"] == "verification_code"
    assert second["code"] != first["code"]
    with pytest.raises(InvalidCodeError):
        await service.flows.confirm_verification(confirm(first["code"]), ctx())
    await service.flows.confirm_verification(confirm(second["code"]), ctx())


async def test_a_verified_address_is_sent_no_code_and_an_unknown_account_is_not_found(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(EMAIL), ctx())
    (mail,) = await take_mail(store, service)
    await service.flows.confirm_verification(confirm(mail["code"]), ctx())
    await service.flows.request_verification(
        RequestVerification(account_id=mail["account_id"]), ctx()
    )
    assert await take_mail(store, service) == []
    with pytest.raises(NotFoundError):
        await service.flows.request_verification(
            RequestVerification(account_id="acct_" + "9" * 26), ctx()
        )


async def test_a_code_for_another_address_or_purpose_is_invalid(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(EMAIL), ctx())
    (mail,) = await take_mail(store, service)
    await service.create_account(create_cmd("bob@example.com"), ctx())
    await take_mail(store, service)
    with pytest.raises(InvalidCodeError):
        await service.flows.confirm_verification(confirm(mail["code"], "bob@example.com"), ctx())
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete(mail["code"]), ctx())


# -- email change and password change --------------------------------------------------------


async def test_an_email_change_unverifies_mails_the_new_address_a_code_and_the_old_a_notice(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(EMAIL), ctx())).account
    (old_code,) = await take_mail(store, service)
    await service.flows.confirm_verification(confirm(old_code["code"]), ctx())
    update = UpdateAccount.model_validate(
        {
            "account_id": account.id,
            "expected_version": 2,
            "email": "ada.new@example.com",
            "current_password": PASSWORD,
        }
    )
    updated = (await service.update_account(update, ctx())).account
    assert updated.email_verified is False
    mails = await take_mail(store, service)
    assert sorted((m["kind"], m["to"], m["code"] is None) for m in mails) == [
        ("email_changed_notice", "ada@example.com", True),
        ("verification_code", "ada.new@example.com", False),
    ]
    code = next(m["code"] for m in mails if m["code"])
    assert await service.flows.confirm_verification(confirm(code, "ada.new@example.com"), ctx())


async def test_a_password_change_mails_a_notice(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account_id = await signed_up(service, store)
    change = ChangePassword.model_validate(
        {"account_id": account_id, "current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    await service.change_password(change, ctx())
    mails = await take_mail(store, service)
    assert [(m["kind"], m["to"], m["code"]) for m in mails] == [
        ("password_changed_notice", "ada@example.com", None)
    ]


# -- recovery -------------------------------------------------------------------------------


async def test_recovery_sets_the_password_verifies_the_address_and_ends_every_session(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account_id = await signed_up(service, store)
    for _ in range(2):
        await service.start_session(start_cmd(EMAIL), ctx())
    code = await recovery_code(service, store)
    typed = code.lower().replace("-", " ")  # as a person might type it
    result = await service.flows.complete_recovery(complete(typed), ctx("k-reset"))
    assert result.sessions_ended == 2
    assert result.account.email_verified is True
    assert await take_mail(store, service) == [
        {"kind": "password_changed_notice", "to": EMAIL, "account_id": account_id, "code": None}
    ]
    events = await pending_events(store)
    types = [e["type"] for e in events]
    assert types.count("account.recovery_requested") == 1
    reset = next(e for e in events if e["type"] == "account.password_reset")
    assert reset["data"] == {"account_id": account_id, "sessions_ended": 2}
    reasons = [e["data"]["reason"] for e in events if e["type"] == "session.ended"]
    assert reasons == ["password_reset", "password_reset"]
    requested = next(e for e in events if e["type"] == "account.recovery_requested")
    assert requested["data"] == {"account_id": account_id}
    assert code not in str(events)
    assert code.replace("-", "") not in str(events)
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(EMAIL), ctx())
    assert await service.start_session(start_cmd(EMAIL, NEW_PASSWORD), ctx())
    # A replay answers the same; the code cannot be used a second time.
    again = await service.flows.complete_recovery(complete(typed), ctx("k-reset"))
    assert again == result
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete(code), ctx())


async def test_an_unknown_email_or_a_disabled_account_gets_the_same_answer_and_no_mail(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account_id = await signed_up(service, store)
    unknown = await service.flows.request_recovery(
        RequestRecovery(email="nobody@example.com"), ctx()
    )
    async with store.unit_of_work() as uow:
        current = await uow.get_account(account_id)
        assert current is not None
        await uow.update_account(
            account_id,
            current.version,
            AccountChanges(updated_at=current.updated_at, status="disabled"),
        )
    disabled = await service.flows.request_recovery(RequestRecovery(email=EMAIL), ctx())
    assert unknown == disabled
    assert unknown.to_wire() == {"accepted": True}
    assert await take_mail(store, service) == []
    assert [e["type"] for e in await pending_events(store)] == ["account.created"]


async def test_a_code_expires_with_its_lifetime(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    await signed_up(service, store)
    code = await recovery_code(service, store)
    clock.advance(900)
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete(code), ctx())


async def test_a_code_is_good_until_just_before_it_expires(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    await signed_up(service, store)
    code = await recovery_code(service, store)
    clock.advance(899)
    assert await service.flows.complete_recovery(complete(code), ctx())


async def test_five_wrong_codes_void_the_right_one(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await signed_up(service, store)
    code = await recovery_code(service, store)
    wrong = "0000-0000" if code != "0000-0000" else "1111-1111"
    for _ in range(5):
        with pytest.raises(InvalidCodeError):
            await service.flows.complete_recovery(complete(wrong), ctx())
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete(code), ctx())


async def test_four_wrong_codes_leave_the_right_one_good(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await signed_up(service, store)
    code = await recovery_code(service, store)
    wrong = "0000-0000" if code != "0000-0000" else "1111-1111"
    for _ in range(4):
        with pytest.raises(InvalidCodeError):
            await service.flows.complete_recovery(complete(wrong), ctx())
    assert await service.flows.complete_recovery(complete(code), ctx())


async def test_a_second_request_voids_the_first_code(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await signed_up(service, store)
    first = await recovery_code(service, store)
    second = await recovery_code(service, store)
    assert first != second
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete(first), ctx())
    assert await service.flows.complete_recovery(complete(second), ctx())


async def test_requests_beyond_the_limit_per_email_send_nothing_until_the_window_ends(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    await signed_up(service, store)
    for _ in range(3):
        await recovery_code(service, store)
    answer = await service.flows.request_recovery(RequestRecovery(email=EMAIL), ctx())
    assert answer.accepted is True
    assert await take_mail(store, service) == []
    clock.advance(900)
    assert await recovery_code(service, store)


async def test_attempts_beyond_the_limit_per_email_are_rate_limited_known_or_not(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    await signed_up(service, store)
    for email in (EMAIL, "nobody@example.com"):
        for _ in range(10):
            with pytest.raises(InvalidCodeError):
                await service.flows.complete_recovery(complete("0000-0000", email), ctx())
        with pytest.raises(RateLimitedError) as refused:
            await service.flows.complete_recovery(complete("0000-0000", email), ctx())
        assert 0 < refused.value.retry_after_s <= 900
    clock.advance(900)
    with pytest.raises(InvalidCodeError):
        await service.flows.complete_recovery(complete("0000-0000"), ctx())


async def test_the_new_password_must_meet_the_policy_and_the_code_stays_good(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await signed_up(service, store)
    code = await recovery_code(service, store)
    with pytest.raises(PasswordPolicyError):
        await service.flows.complete_recovery(complete(code, password="short"), ctx())
    assert await service.flows.complete_recovery(complete(code), ctx())


async def test_an_email_change_voids_a_recovery_code_sent_to_the_old_address(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account_id = await signed_up(service, store)
    code = await recovery_code(service, store)
    update = UpdateAccount.model_validate(
        {
            "account_id": account_id,
            "expected_version": 1,
            "email": "ada.new@example.com",
            "current_password": PASSWORD,
        }
    )
    await service.update_account(update, ctx())
    for email in (EMAIL, "ada.new@example.com"):
        with pytest.raises(InvalidCodeError):
            await service.flows.complete_recovery(complete(code, email), ctx())


# -- sign-in that requires a verified address -----------------------------------------------


async def test_an_unverified_address_is_told_only_after_the_right_password(
    strict_service: IdentityService, store: MemoryIdentityStore
) -> None:
    service = strict_service
    await service.create_account(create_cmd(EMAIL), ctx())
    (mail,) = await take_mail(store, service)
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(start_cmd(EMAIL, "not the password at all!"), ctx())
    for _ in range(6):  # a right password is never counted as a failed guess
        with pytest.raises(EmailNotVerifiedError):
            await service.start_session(start_cmd(EMAIL), ctx())
    await service.flows.confirm_verification(confirm(mail["code"]), ctx())
    assert await service.start_session(start_cmd(EMAIL), ctx())


async def test_recovery_proves_the_address_for_sign_in(
    strict_service: IdentityService, store: MemoryIdentityStore
) -> None:
    service = strict_service
    await signed_up(service, store)
    code = await recovery_code(service, store)
    await service.flows.complete_recovery(complete(code), ctx())
    assert await service.start_session(start_cmd(EMAIL, NEW_PASSWORD), ctx())
