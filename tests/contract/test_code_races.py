"""Codes on PostgreSQL, where row locks rather than a single-unit store decide the races:
two completes with the right code, exactly one wins."""

from __future__ import annotations

import asyncio
import uuid

from messages import CompleteRecovery, ConfirmVerification, CreateAccount, RequestRecovery
from services.codes import show_code
from services.errors import InvalidCodeError
from services.identity import IdentityService
from services.operations import CommandContext
from services.passwords import HashingPool
from stores import PostgresIdentityStore

PASSWORD = "correct horse battery staple"


def ctx() -> CommandContext:
    return CommandContext(idempotency_key=str(uuid.uuid4()), correlation_id="corr-1")


async def mailed_code(
    store: PostgresIdentityStore, service: IdentityService, account_id: str, kind: str
) -> str:
    """The code last mailed to the account (its rows taken out of the courier outbox)."""
    keys = service._codes.keys
    async with store.claim_mail(10_000) as batch:
        mine = [m for m in batch.mails if m.account_id == account_id]
        batch.mark_relayed([m.seq for m in mine])
    (last,) = [m for m in mine if m.kind == kind][-1:]
    assert last.sealed_code is not None
    return show_code(keys.unseal(last.message_id, last.sealed_code))


async def new_account(service: IdentityService) -> tuple[str, str]:
    email = f"race-{uuid.uuid4().hex[:12]}@example.com"
    create = CreateAccount.model_validate(
        {"email": email, "password": PASSWORD, "display_name": "Racer"}
    )
    return (await service.create_account(create, ctx())).account.id, email


async def test_two_recovery_completes_with_the_right_code_exactly_one_wins(
    service: IdentityService, passwords: HashingPool, pg_store: PostgresIdentityStore
) -> None:
    account_id, email = await new_account(service)
    await service.flows.request_recovery(RequestRecovery(email=email), ctx())
    code = await mailed_code(pg_store, service, account_id, "recovery_code")

    async def complete(password: str) -> str:
        cmd = CompleteRecovery.model_validate(
            {"email": email, "code": code, "new_password": password}
        )
        try:
            await service.flows.complete_recovery(cmd, ctx())
        except InvalidCodeError:
            return "invalid_code"
        return password

    outcomes = await asyncio.gather(
        complete("one contender's long passphrase"),
        complete("another contender's long phrase"),
    )
    assert sorted(outcomes).count("invalid_code") == 1
    winner = next(o for o in outcomes if o != "invalid_code")
    stored = await pg_store.get_account_by_email(email)
    assert stored is not None
    assert await passwords.verify(stored.password_hash, winner)


async def test_two_confirms_with_the_right_code_verify_once(
    service: IdentityService, pg_store: PostgresIdentityStore
) -> None:
    account_id, email = await new_account(service)
    code = await mailed_code(pg_store, service, account_id, "verification_code")
    cmd = ConfirmVerification.model_validate({"email": email, "code": code})
    outcomes = await asyncio.gather(
        *(service.flows.confirm_verification(cmd, ctx()) for _ in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, InvalidCodeError) for o in outcomes) == 2
    verified = await pg_store.get_account(account_id)
    assert verified is not None
    assert verified.email_verified is True
    assert verified.version == 2
