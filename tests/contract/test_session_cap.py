"""The session cap (contract v2, section 5, "Paging"): an account holds at most
`max_per_account` live sessions, and a sign-in beyond it ends the oldest in its own
transaction, announced as `session.ended` with reason `session_limit` before its
`session.started`. On both stores through the service, and on PostgreSQL under concurrent
sign-ins, where the account's row lock is what keeps the count.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import orjson
import pytest

from messages import CreateAccount, StartSession, StartSessionResult
from services.clock import FakeClock
from services.identity import IdentityService, SessionPolicy
from services.operations import CommandContext
from stores import IdentityStore, PostgresIdentityStore, SessionRecord
from tests.contract.test_store_contract import drain
from tests.support.factory import TEST_CONFIG, TEST_START, running_service

PASSWORD = "correct horse battery staple"
CAP = 3


def ctx(source: str = "caller:web") -> CommandContext:
    return CommandContext(idempotency_key=uuid.uuid4().hex, source=source)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(TEST_START)


@pytest.fixture
async def capped(store: IdentityStore, clock: FakeClock) -> AsyncIterator[IdentityService]:
    config = replace(TEST_CONFIG, sessions=SessionPolicy(max_per_account=CAP))
    async with running_service(store, clock=clock, config=config) as (service, _):
        yield service


async def new_account(service: IdentityService) -> str:
    email = f"cap-{secrets.token_hex(6)}@example.com"
    create = {"email": email, "password": PASSWORD, "display_name": "Ada"}
    await service.create_account(CreateAccount.model_validate(create), ctx())
    return email


async def sign_in(
    service: IdentityService, email: str, source: str = "caller:web"
) -> StartSessionResult:
    start = StartSession.model_validate({"email": email, "password": PASSWORD})
    return await service.start_session(start, ctx(source))


async def live_ids(store: IdentityStore, account_id: str, now: datetime) -> list[str]:
    """The account's live sessions at `now`, oldest first."""
    found = await store.list_live_sessions(
        account_id,
        now=now,
        idle_since=now - SessionPolicy().idle_timeout,
        after=None,
        limit=1000,
    )
    return [s.id for s in found]


async def stored_session(store: IdentityStore, session_id: str) -> SessionRecord | None:
    async with store.unit_of_work() as uow:
        return await uow.get_session(session_id)


async def published(store: IdentityStore, account_id: str) -> list[dict[str, object]]:
    """Every pending event about `account_id`, in outbox order (and the outbox drained)."""
    found: list[dict[str, object]] = []
    while True:
        async with store.claim_events(100) as batch:
            for pending in batch.events:
                body = orjson.loads(pending.body)
                if account_id in pending.body.decode():
                    found.append({"type": body["type"], "data": body["data"]})
            batch.mark_published([e.seq for e in batch.events])
        if not batch.events:
            return found


async def test_a_sign_in_beyond_the_cap_ends_the_oldest_live_session(
    store: IdentityStore, capped: IdentityService, clock: FakeClock
) -> None:
    email = await new_account(capped)
    opened = []
    for _ in range(CAP):
        opened.append((await sign_in(capped, email)).session)
        clock.advance(1)
    account_id = opened[0].account_id
    await drain(store)

    newest = (await sign_in(capped, email)).session

    live = await live_ids(store, account_id, clock.now())
    assert live == [s.id for s in opened[1:]] + [newest.id]
    events = await published(store, account_id)
    assert [e["type"] for e in events] == ["session.ended", "session.started"]
    assert events[0]["data"] == {
        "session_id": opened[0].id,
        "account_id": account_id,
        "reason": "session_limit",
    }
    ended = await stored_session(store, opened[0].id)
    assert ended is not None
    assert ended.end_reason == "session_limit"


async def test_ended_and_expired_sessions_do_not_count_against_the_cap(
    store: IdentityStore, capped: IdentityService, clock: FakeClock
) -> None:
    email = await new_account(capped)
    first = (await sign_in(capped, email)).session
    clock.advance(hours=1)  # idled out (30 minutes): over already, not counted
    for _ in range(CAP - 1):
        await sign_in(capped, email)
        clock.advance(1)
    await drain(store)

    await sign_in(capped, email)  # the third live one: nothing to end

    assert len(await live_ids(store, first.account_id, clock.now())) == CAP
    events = await published(store, first.account_id)
    assert [e["type"] for e in events] == ["session.started"]
    idle = await stored_session(store, first.id)
    assert idle is not None
    assert idle.ended_at is None


async def test_a_lowered_cap_ends_every_session_beyond_it_at_the_next_sign_in(
    store: IdentityStore, clock: FakeClock
) -> None:
    config = replace(TEST_CONFIG, sessions=SessionPolicy(max_per_account=5))
    async with running_service(store, clock=clock, config=config) as (generous, _):
        email = await new_account(generous)
        for _ in range(5):
            account_id = (await sign_in(generous, email)).session.account_id
            clock.advance(1)
    await drain(store)
    config = replace(TEST_CONFIG, sessions=SessionPolicy(max_per_account=2))
    async with running_service(store, clock=clock, config=config) as (strict, _):
        newest = (await sign_in(strict, email)).session
        live = await live_ids(store, account_id, clock.now())
    assert len(live) == 2
    assert live[-1] == newest.id
    events = await published(store, account_id)
    assert [e["type"] for e in events] == ["session.ended"] * 4 + ["session.started"]


async def test_a_replayed_sign_in_ends_nothing_more(
    store: IdentityStore, capped: IdentityService, clock: FakeClock
) -> None:
    email = await new_account(capped)
    for _ in range(CAP):
        await sign_in(capped, email)
        clock.advance(1)
    start = StartSession.model_validate({"email": email, "password": PASSWORD})
    again = ctx()
    first = await capped.start_session(start, again)
    clock.advance(1)
    replayed = await capped.start_session(start, again)
    assert replayed.session.id == first.session.id
    assert len(await live_ids(store, first.session.account_id, clock.now())) == CAP


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SessionPolicy(max_per_account=0)


async def test_concurrent_sign_ins_at_the_cap_never_leave_more_than_the_cap_live(
    pg_store: PostgresIdentityStore,
) -> None:
    """Eight sign-ins at once on an account at its cap: each locks the account's row, so each
    counts the sessions the others committed, and the cap holds at every commit."""
    config = replace(TEST_CONFIG, sessions=SessionPolicy(max_per_account=CAP))
    async with running_service(pg_store, config=config) as (service, _):
        email = await new_account(service)
        for _ in range(CAP):
            account_id = (await sign_in(service, email)).session.account_id
        # From as many sources: each in-flight attempt counts against its source until settled.
        at_once = (sign_in(service, email, f"caller:{n}") for n in range(8))
        results = await asyncio.gather(*at_once)
    live = await pg_store._pool.fetchval(
        "SELECT count(*) FROM sessions WHERE account_id = $1 AND ended_at IS NULL", account_id
    )
    capped_ends = await pg_store._pool.fetchval(
        "SELECT count(*) FROM sessions WHERE account_id = $1 AND end_reason = 'session_limit'",
        account_id,
    )
    assert live == CAP
    assert capped_ends == 8
    assert len({r.session.id for r in results}) == 8
