"""Races on PostgreSQL, where a row lock rather than a single-unit store decides them: a
sign-in against a password change, and two refreshes with one refresh token.

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

from messages import CreateAccount, RefreshSession, RefreshSessionResult, StartSession
from services.clock import FakeClock
from services.errors import InvalidCredentialsError, InvalidTokenError
from services.identity import IdentityService
from services.operations import CommandContext
from services.passwords import HashingPool
from stores import PostgresIdentityStore
from tests.support.eventually import eventually
from tests.support.factory import TEST_START, running_service
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


async def test_two_refreshes_with_one_token_on_postgresql_exactly_one_wins(
    pg_store: PostgresIdentityStore, pg_dsn: str
) -> None:
    """Both refreshes are made to wait on the session's row lock at once, then let go: one
    rotates, the other finds the generation moved and (inside the reuse grace: one client
    racing itself) gets invalid_token without ending the session. The same token presented
    once the grace is over is a true reuse, and ends it."""
    clock = FakeClock(TEST_START)
    async with running_service(pg_store, clock=clock) as (service, _):
        email = f"refresh-race-{uuid.uuid4().hex[:12]}@example.com"
        create = {"email": email, "password": PASSWORD, "display_name": "Racer"}
        await service.create_account(CreateAccount.model_validate(create), ctx())
        start = StartSession.model_validate({"email": email, "password": PASSWORD})
        started = await service.start_session(start, ctx())
        token = started.refresh_token.get_secret_value()
        refresh = RefreshSession.model_validate({"refresh_token": token})

        holder = await asyncpg.connect(pg_dsn)
        observer = await asyncpg.connect(pg_dsn)
        try:
            held = holder.transaction()
            await held.start()
            await holder.execute(
                "SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", started.session.id
            )
            racers = [
                asyncio.create_task(service.tokens.refresh_session(refresh, ctx()))
                for _ in range(2)
            ]

            async def both_waiting() -> bool:
                waiting = await observer.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
                return int(waiting) >= 2

            await eventually(both_waiting, timeout=10, what="both refreshes on the row lock")
            await held.rollback()
            outcomes = await asyncio.gather(*racers, return_exceptions=True)
        finally:
            await holder.close()
            await observer.close()

        won = [o for o in outcomes if isinstance(o, RefreshSessionResult)]
        lost = [o for o in outcomes if isinstance(o, InvalidTokenError)]
        assert (len(won), len(lost)) == (1, 1), outcomes
        found = await pg_store.get_session_with_account(started.session.id)
        assert found is not None
        assert (found[0].refresh_generation, found[0].ended_at) == (1, None)

        clock.advance(60)  # past the grace: the same token again is theft
        with pytest.raises(InvalidTokenError):
            await service.tokens.refresh_session(refresh, ctx())
        found = await pg_store.get_session_with_account(started.session.id)
        assert found is not None
        assert found[0].end_reason == "refresh_token_reused"
