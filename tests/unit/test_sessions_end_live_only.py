"""Every command that ends an account's sessions ends only the live ones, as `session.verify`
judges them: a session that expired or idled out was over already, so it is neither counted
in `sessions_ended` nor announced by a `session.ended`. (`session.end`, `session.end_all` and
`account.change_password` are in test_identity_sessions.py.)"""

from __future__ import annotations

import pytest

from messages import CompleteRecovery, DeleteAccount, DisableAccount, RequestRecovery, RevokeSession
from services.clock import FakeClock
from services.identity import IdentityService
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import (
    ctx,
    ended_session_ids,
    pending_events,
    session_id,
    sessions_live_idle_and_expired,
    take_mail,
)


async def events_of(store: MemoryIdentityStore, key: str) -> list[dict[str, object]]:
    """The events the command sent with idempotency key `key`, in order."""
    return [e for e in await pending_events(store) if e["causation_id"] == key]


async def test_disable_ends_counts_and_announces_only_the_live_session(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account_id, tokens = await sessions_live_idle_and_expired(service, clock)

    disable = DisableAccount(account_id=account_id, reason="abuse report 42")
    result = await service.lifecycle.disable_account(disable, ctx("off"))

    assert result.sessions_ended == 1
    events = await events_of(store, "off")
    assert ended_session_ids(events) == [session_id(tokens["live"])]
    assert events[-1]["type"] == "account.disabled"
    assert events[-1]["data"]["sessions_ended"] == 1  # type: ignore[index]
    for state in ("expired", "idle"):  # left as they were: over already
        record = store._tables.sessions[session_id(tokens[state])]
        assert (record.ended_at, record.end_reason) == (None, None)


async def test_erasure_deletes_every_session_but_counts_and_announces_only_the_live_one(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account_id, tokens = await sessions_live_idle_and_expired(service, clock)

    result = await service.lifecycle.delete_account(
        DeleteAccount(account_id=account_id), ctx("del")
    )

    assert result.sessions_ended == 1
    events = await events_of(store, "del")
    assert [e["type"] for e in events] == ["session.ended", "account.deleted"]
    assert ended_session_ids(events) == [session_id(tokens["live"])]
    for token in tokens.values():
        assert session_id(token) not in store._tables.sessions


async def test_a_password_reset_ends_counts_and_announces_only_the_live_session(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    account_id, tokens = await sessions_live_idle_and_expired(service, clock)
    await take_mail(store, service)  # the verification mail of the sign-up
    await service.flows.request_recovery(RequestRecovery(email="ada@example.com"), ctx())
    (mail,) = await take_mail(store, service)
    complete = CompleteRecovery.model_validate(
        {"email": "ada@example.com", "code": mail["code"], "new_password": "a brand new passphrase"}
    )

    result = await service.flows.complete_recovery(complete, ctx("reset"))

    assert result.sessions_ended == 1
    events = await events_of(store, "reset")
    assert ended_session_ids(events) == [session_id(tokens["live"])]
    assert events[-1]["type"] == "account.password_reset"
    assert events[-1]["data"] == {"account_id": account_id, "sessions_ended": 1}


@pytest.mark.parametrize("state", ["idle", "expired", "live"])
async def test_revoking_announces_only_a_session_that_was_live(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock, state: str
) -> None:
    _, tokens = await sessions_live_idle_and_expired(service, clock)
    revoked = session_id(tokens[state])

    result = await service.sessions_admin.revoke_session(
        RevokeSession(session_id=revoked), ctx("rev")
    )

    assert result.session_id == revoked  # not an error either way
    expected = [revoked] if state == "live" else []
    assert ended_session_ids(await events_of(store, "rev")) == expected
