"""session.list and session.revoke (services.sessions_admin) on the in-memory store: live
sessions only, what sign-in was told about the client, stable pages, one session ended by id."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from messages import ListSessions, Metadata, RevokeSession, StartSessionResult, VerifySession
from services.clock import FakeClock
from services.errors import InvalidInputError, NotFoundError, SessionExpiredError
from services.identity import IdentityService
from services.operations import CommandContext
from services.sessions_admin import decode_cursor, encode_cursor
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import create_cmd, ctx, pending_events, start_cmd

MISSING_ACCOUNT = "acct_" + "0" * 26
MISSING_SESSION = "ses_" + "0" * 32


def list_cmd(account_id: str, limit: int | None = None, cursor: str | None = None) -> ListSessions:
    fields: dict[str, object] = {"account_id": account_id, "cursor": cursor}
    if limit is not None:
        fields["limit"] = limit
    return ListSessions.model_validate(fields)


def from_device(ip: str, agent: str) -> CommandContext:
    metadata = Metadata(client_ip=ip, user_agent=agent)
    return CommandContext(idempotency_key=ctx().idempotency_key, metadata=metadata)


def verify_cmd(started: StartSessionResult) -> VerifySession:
    return VerifySession.model_validate({"token": started.token.get_secret_value()})


async def sign_in(service: IdentityService, context: CommandContext | None = None) -> str:
    started: StartSessionResult = await service.start_session(start_cmd(), context or ctx())
    return started.session.id


async def test_the_list_shows_live_sessions_with_what_sign_in_was_told_and_no_token(
    service: IdentityService, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    laptop = await service.start_session(start_cmd(), from_device("203.0.113.7", "laptop/1.0"))
    clock.advance(seconds=1)
    phone = await service.start_session(start_cmd(), ctx())

    listed = await service.sessions_admin.list_sessions(list_cmd(account.id))

    assert [s.id for s in listed.sessions] == [laptop.session.id, phone.session.id]
    first = listed.sessions[0]
    assert (first.client_ip, first.user_agent) == ("203.0.113.7", "laptop/1.0")
    assert (listed.sessions[1].client_ip, listed.sessions[1].user_agent) == (None, None)
    assert first.created_at == laptop.session.created_at
    assert first.expires_at == laptop.session.expires_at
    assert first.last_seen_at == laptop.session.created_at
    assert listed.next_cursor is None
    wire = str(listed.to_wire())
    assert laptop.token.get_secret_value() not in wire
    assert "token" not in listed.to_wire()["sessions"][0]


async def test_ended_expired_and_idle_sessions_are_not_listed(
    service: IdentityService, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    idle = await sign_in(service)
    clock.advance(minutes=20)
    revoked = await sign_in(service)
    await service.sessions_admin.revoke_session(RevokeSession(session_id=revoked), ctx())
    active = await service.start_session(start_cmd(), ctx())
    clock.advance(minutes=15)  # the first session is idle now (30 min), the third is not
    await service.verify_session(verify_cmd(active))

    listed = await service.sessions_admin.list_sessions(list_cmd(account.id))

    assert [s.id for s in listed.sessions] == [active.session.id]
    assert idle not in {s.id for s in listed.sessions}
    assert listed.sessions[0].last_seen_at == clock.now()
    clock.advance(hours=24)
    assert (await service.sessions_admin.list_sessions(list_cmd(account.id))).sessions == []


async def test_pages_follow_each_other_without_repeats_or_gaps_while_sessions_change(
    service: IdentityService, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    ids = []
    for n in range(5):
        ids.append(await sign_in(service))
        if n % 2:  # some share a created_at: the id breaks the tie
            clock.advance(seconds=1)
    # (created_at, id): two at the first second, two at the next, one at the third.
    expected = [*sorted(ids[:2]), *sorted(ids[2:4]), ids[4]]

    first = await service.sessions_admin.list_sessions(list_cmd(account.id, limit=2))
    assert [s.id for s in first.sessions] == expected[:2]
    assert first.next_cursor is not None
    # Between pages: a listed session and a not yet listed one end, a new one starts.
    for gone in (expected[0], expected[3]):
        await service.sessions_admin.revoke_session(RevokeSession(session_id=gone), ctx())
    clock.advance(seconds=1)
    newest = await sign_in(service)
    second = await service.sessions_admin.list_sessions(
        list_cmd(account.id, limit=2, cursor=first.next_cursor)
    )
    assert [s.id for s in second.sessions] == [expected[2], expected[4]]
    assert second.next_cursor is not None
    third = await service.sessions_admin.list_sessions(
        list_cmd(account.id, limit=2, cursor=second.next_cursor)
    )
    assert [s.id for s in third.sessions] == [newest]
    assert third.next_cursor is None


async def test_a_full_last_page_says_there_is_no_next_one(service: IdentityService) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    for _ in range(2):
        await sign_in(service)
    page = await service.sessions_admin.list_sessions(list_cmd(account.id, limit=2))
    assert len(page.sessions) == 2
    assert page.next_cursor is None


async def test_sessions_are_listed_in_creation_order(
    service: IdentityService, clock: FakeClock
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    ids = []
    for _ in range(3):
        ids.append(await sign_in(service))
        clock.advance(seconds=1)
    listed = await service.sessions_admin.list_sessions(list_cmd(account.id))
    assert [s.id for s in listed.sessions] == ids


@pytest.mark.parametrize(
    "cursor", ["bm9wZQ", "W10", "WyJ4IiwgMV0", "WyIyMDI2LTAxLTAxVDAwOjAwIiwieCJd"]
)
async def test_a_cursor_this_service_did_not_give_is_a_validation_failure(
    service: IdentityService, cursor: str
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    with pytest.raises(InvalidInputError) as refused:
        await service.sessions_admin.list_sessions(list_cmd(account.id, cursor=cursor))
    assert [f.field for f in refused.value.fields] == ["payload.cursor"]


async def test_a_cursor_is_the_position_of_the_last_session_of_the_page(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    session_id = await sign_in(service)
    async with store.unit_of_work() as uow:
        record = await uow.get_session(session_id)
    assert record is not None
    assert decode_cursor(encode_cursor(record)) == (record.created_at, record.id)


async def test_listing_an_unknown_account_is_not_found(service: IdentityService) -> None:
    with pytest.raises(NotFoundError):
        await service.sessions_admin.list_sessions(list_cmd(MISSING_ACCOUNT))


@pytest.mark.parametrize("limit", [0, 201])
def test_a_page_holds_1_to_200_sessions(limit: int) -> None:
    with pytest.raises(ValidationError):
        list_cmd(MISSING_ACCOUNT, limit=limit)


def test_a_page_holds_50_sessions_unless_asked() -> None:
    assert list_cmd(MISSING_ACCOUNT).limit == 50
    assert list_cmd(MISSING_ACCOUNT, limit=200).limit == 200


async def test_revoke_ends_one_session_and_names_its_account(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    kept = await service.start_session(start_cmd(), ctx())
    gone = await service.start_session(start_cmd(), ctx())

    result = await service.sessions_admin.revoke_session(
        RevokeSession(session_id=gone.session.id), ctx("revoke-1")
    )

    assert (result.session_id, result.account_id) == (gone.session.id, account.id)
    with pytest.raises(SessionExpiredError):
        await service.verify_session(verify_cmd(gone))
    await service.verify_session(verify_cmd(kept))
    events = [e for e in await pending_events(store) if e["causation_id"] == "revoke-1"]
    assert [(e["type"], e["data"]) for e in events] == [
        (
            "session.ended",
            {"session_id": gone.session.id, "account_id": account.id, "reason": "revoked"},
        )
    ]


async def test_revoking_an_ended_session_is_fine_and_announces_nothing(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    session_id = await sign_in(service)
    await service.sessions_admin.revoke_session(RevokeSession(session_id=session_id), ctx())
    again = await service.sessions_admin.revoke_session(
        RevokeSession(session_id=session_id), ctx("again")
    )
    assert again.account_id == account.id
    assert [e for e in await pending_events(store) if e["causation_id"] == "again"] == []


async def test_revoking_an_unknown_session_is_not_found(service: IdentityService) -> None:
    with pytest.raises(NotFoundError) as missing:
        await service.sessions_admin.revoke_session(
            RevokeSession(session_id=MISSING_SESSION), ctx()
        )
    assert "session" in missing.value.message


async def test_the_account_a_session_belongs_to_is_told_for_self_grants(
    service: IdentityService,
) -> None:
    account = (await service.create_account(create_cmd(), ctx())).account
    session_id = await sign_in(service)
    assert await service.sessions_admin.session_account(session_id) == account.id
    await service.sessions_admin.revoke_session(RevokeSession(session_id=session_id), ctx())
    assert await service.sessions_admin.session_account(session_id) == account.id
    assert await service.sessions_admin.session_account(MISSING_SESSION) is None
