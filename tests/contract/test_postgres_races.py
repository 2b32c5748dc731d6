"""The sign-in race on PostgreSQL, where a row lock rather than a single-unit store decides it.

A sign-in checks the password outside any transaction. If a password change is in flight when
the sign-in's transaction starts (its row lock held, its new hash and its ended sessions not
yet committed), the sign-in must wait for it and see the new hash; reading the committed row
without the lock would insert a session that the change never ended.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from messages import CreateAccount, StartSession
from services.errors import InvalidCredentialsError
from services.identity import IdentityService
from services.operations import CommandContext
from services.passwords import HashingPool
from tests.support.eventually import eventually
from tests.support.postgres import lock_waiters

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different long passphrase"


def ctx() -> CommandContext:
    return CommandContext(idempotency_key=str(uuid.uuid4()), correlation_id="corr-1")


async def test_a_sign_in_waits_for_a_password_change_in_flight_and_opens_no_session(
    service: IdentityService,
    passwords: HashingPool,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    email = f"race-{uuid.uuid4().hex[:12]}@example.com"
    create = {"email": email, "password": PASSWORD, "display_name": "Racer"}
    account = (await service.create_account(CreateAccount.model_validate(create), ctx())).account
    new_hash = await passwords.hash(NEW_PASSWORD)
    change = await asyncpg.connect(pg_dsn)
    in_flight = change.transaction()
    commit: asyncio.Task[None] | None = None

    async def commit_once_the_sign_in_waits() -> None:
        # The interleaving under test: the sign-in's transaction is blocked on the row lock
        # the change holds. Commit only once PostgreSQL shows it waiting.
        observer = await asyncpg.connect(pg_dsn)
        try:
            await eventually(
                lambda: lock_waiters(observer, change.get_server_pid()),
                timeout=10,
                what="the sign-in waiting for the change's row lock",
            )
        finally:
            await observer.close()
        await in_flight.commit()

    real_verify = passwords.verify

    async def verify_then_change(password_hash: str, password: str) -> bool:
        nonlocal commit
        ok = await real_verify(password_hash, password)
        monkeypatch.setattr(passwords, "verify", real_verify)
        # What account.change_password does in its transaction, held open.
        await in_flight.start()
        await change.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account.id)
        await change.execute(
            "UPDATE accounts SET password_hash = $2, version = version + 1 WHERE id = $1",
            account.id,
            new_hash,
        )
        await change.execute(
            "UPDATE sessions SET ended_at = now(), end_reason = 'password_changed'"
            " WHERE account_id = $1 AND ended_at IS NULL",
            account.id,
        )
        commit = asyncio.create_task(commit_once_the_sign_in_waits())
        return ok

    monkeypatch.setattr(passwords, "verify", verify_then_change)
    try:
        start = StartSession.model_validate({"email": email, "password": PASSWORD})
        with pytest.raises(InvalidCredentialsError):
            await service.start_session(start, ctx())
        assert commit is not None
        await commit
        still_open = await change.fetchval(
            "SELECT count(*) FROM sessions WHERE account_id = $1 AND ended_at IS NULL",
            account.id,
        )
    finally:
        if commit is not None:
            await asyncio.gather(commit, return_exceptions=True)
        await change.close()
    assert still_open == 0
