"""`session.list` pages (contract v2, section 5, "Paging") on both stores through the service:
the cursor survives PostgreSQL's timestamps to the microsecond, pages neither repeat nor skip
while sessions start and end between them, and a cursor this service did not give is a
validation failure on either store, never an error of the database.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest

from messages import CreateAccount, ListSessions, RevokeSession, StartSession
from services.clock import FakeClock
from services.errors import InvalidInputError
from services.identity import IdentityService, SessionPolicy
from services.operations import CommandContext
from stores import IdentityStore
from tests.support.factory import TEST_CONFIG, TEST_START, running_service

PASSWORD = "correct horse battery staple"
SESSION = "ses_" + "a" * 32


def ctx() -> CommandContext:
    return CommandContext(idempotency_key=uuid.uuid4().hex, source="caller:web")


def crafted(position: object) -> str:
    """A cursor made by hand: the encoding is not secret, only what it may name is checked."""
    return base64.urlsafe_b64encode(orjson.dumps(position)).rstrip(b"=").decode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(TEST_START)


@pytest.fixture
async def service(store: IdentityStore, clock: FakeClock) -> AsyncIterator[IdentityService]:
    config = replace(TEST_CONFIG, sessions=SessionPolicy(max_per_account=1000))
    async with running_service(store, clock=clock, config=config) as (service, _):
        yield service


async def new_account(service: IdentityService) -> tuple[str, str]:
    email = f"page-{secrets.token_hex(6)}@example.com"
    create = {"email": email, "password": PASSWORD, "display_name": "Ada"}
    created = await service.create_account(CreateAccount.model_validate(create), ctx())
    return created.account.id, email


async def sign_in(service: IdentityService, email: str) -> str:
    start = StartSession.model_validate({"email": email, "password": PASSWORD})
    return (await service.start_session(start, ctx())).session.id


async def page(
    service: IdentityService, account_id: str, limit: int, cursor: str | None
) -> tuple[list[str], str | None]:
    cmd = ListSessions.model_validate({"account_id": account_id, "limit": limit, "cursor": cursor})
    listed = await service.sessions_admin.list_sessions(cmd)
    return [s.id for s in listed.sessions], listed.next_cursor


async def test_pages_walk_every_session_once_while_others_start_and_end_between_them(
    service: IdentityService, clock: FakeClock
) -> None:
    account_id, email = await new_account(service)
    before = []
    for n in range(7):
        before.append(await sign_in(service, email))
        clock.advance(0.000001 * (n + 1))  # microseconds apart: the cursor must keep them
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        ids, cursor = await page(service, account_id, 2, cursor)
        seen.extend(ids)
        pages += 1
        # Between pages: a new sign-in, and the oldest not yet listed one revoked.
        clock.advance(0.5)
        await sign_in(service, email)
        unseen = [s for s in before if s not in seen]
        if unseen:
            gone = RevokeSession(session_id=unseen[-1])
            await service.sessions_admin.revoke_session(gone, ctx())
            before.remove(unseen[-1])
        if cursor is None:
            break
    assert len(seen) == len(set(seen))  # nothing twice
    assert [s for s in seen if s in before] == before  # every survivor, in order
    assert pages >= 3


async def test_the_last_page_has_no_cursor_and_the_default_page_holds_fifty(
    service: IdentityService,
) -> None:
    account_id, email = await new_account(service)
    for _ in range(51):
        await sign_in(service, email)
    cmd = ListSessions.model_validate({"account_id": account_id})
    first = await service.sessions_admin.list_sessions(cmd)
    assert len(first.sessions) == 50
    assert first.next_cursor is not None
    ids, cursor = await page(service, account_id, 200, first.next_cursor)
    assert len(ids) == 1
    assert cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        crafted(["0001-01-01T00:00:00+14:00", SESSION]),  # before the start of time in UTC
        crafted(["9999-12-31T23:59:59-14:00", SESSION]),  # after its end
        crafted(["2026-11-22T09:00:00+00:00", "ses_\u0000"]),  # a NUL: no text in PostgreSQL
        crafted(["2026-11-22T09:00:00+00:00", "not a session id"]),
        crafted(["2026-11-22T09:00:00+00:00", SESSION, "more"]),
        crafted({"created_at": "2026-11-22T09:00:00+00:00", "id": SESSION}),
        crafted(["2026-11-22T09:00:00", SESSION]),  # no offset
        "bm9wZQ",
    ],
)
async def test_a_cursor_this_service_did_not_give_is_a_validation_failure(
    service: IdentityService, cursor: str
) -> None:
    account_id, email = await new_account(service)
    await sign_in(service, email)
    with pytest.raises(InvalidInputError) as refused:
        await page(service, account_id, 10, cursor)
    assert [f.field for f in refused.value.fields] == ["payload.cursor"]
