"""Sign-in tokens, `session.refresh` and roles, on the in-memory store with a fake clock.

Rotation and reuse detection follow the OAuth 2.0 Security BCP: a refresh token works once; a
used one that comes back ends its session (someone holds a copy), unless it comes back within
the reuse grace of its own rotation (a client racing itself), which only says invalid_token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

import jwt
import pytest

from client import AccessTokenExpired, AccessTokenVerifier
from messages import (
    ChangePassword,
    EndAllSessions,
    EndSession,
    GetJwks,
    GrantRole,
    RefreshSession,
    RevokeRole,
    StartSessionResult,
    VerifySession,
)
from services.access_tokens import AccessTokenSigner
from services.clock import FakeClock
from services.errors import (
    InvalidInputError,
    InvalidTokenError,
    NotFoundError,
    SessionExpiredError,
)
from services.identity import IdentityService
from services.roles import MAX_ROLES
from stores import AccountChanges
from stores.memory import MemoryIdentityStore
from tests.support.factory import TEST_JWT_KEYS
from tests.unit.helpers import PASSWORD, create_cmd, ctx, pending_events, start_cmd

GRACE_S = 10  # TokenPolicy's default, which the test service runs with


def refresh_cmd(token: str) -> RefreshSession:
    return RefreshSession.model_validate({"refresh_token": token})


def secret(result: Any, name: str) -> str:
    value: str = getattr(result, name).get_secret_value()
    return value


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def verifier(clock: FakeClock) -> AccessTokenVerifier:
    async def jwks() -> Mapping[str, Any]:
        return AccessTokenSigner(TEST_JWT_KEYS).jwks()

    return AccessTokenVerifier(jwks, now=lambda: clock.now().timestamp())


async def signed_in(service: IdentityService) -> StartSessionResult:
    await service.create_account(create_cmd(), ctx())
    return await service.start_session(start_cmd(), ctx())


async def session_of(store: MemoryIdentityStore, session_id: str) -> Any:
    found = await store.get_session_with_account(session_id)
    assert found is not None
    return found[0]


async def test_a_sign_in_hands_out_an_access_token_that_verifies_locally_and_a_refresh_token(
    service: IdentityService, clock: FakeClock
) -> None:
    started = await signed_in(service)
    access = secret(started, "access_token")
    claims = await verifier(clock).verify_access_token(access)
    assert claims.account_id == started.account.id
    assert claims.session_id == started.session.id
    assert claims.roles == ()
    assert claims.issued_at == int(clock.now().timestamp())
    assert started.access_token_expires_at == clock.now() + timedelta(seconds=600)
    assert claims_of(access)["exp"] == int(started.access_token_expires_at.timestamp())
    assert secret(started, "refresh_token").startswith("r1.")
    assert len(secret(started, "refresh_token").rpartition(".")[2]) == 43  # 256-bit MAC


async def test_the_access_token_expires_on_the_injected_clock(
    service: IdentityService, clock: FakeClock
) -> None:
    access = secret(await signed_in(service), "access_token")
    check = verifier(clock)
    clock.advance(599)
    await check.verify_access_token(access)
    clock.advance(1 + 30)  # exp, and the verifier's leeway
    with pytest.raises(AccessTokenExpired):
        await check.verify_access_token(access)


async def test_a_replayed_sign_in_returns_the_same_tokens_even_after_a_refresh_and_a_role(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())
    first = await service.start_session(start_cmd(), ctx("sign-in-1"))
    clock.advance(60)
    await service.roles.grant_role(GrantRole(account_id=first.account.id, role="admin"), ctx())
    await service.tokens.refresh_session(refresh_cmd(secret(first, "refresh_token")), ctx())
    again = await service.start_session(start_cmd(), ctx("sign-in-1"))
    for name in ("token", "access_token", "refresh_token"):
        assert secret(again, name) == secret(first, name), name
    assert again == first
    stored = await store.get_idempotency("sign-in-1")
    assert stored is not None
    for name in ("token", "access_token", "refresh_token"):
        assert secret(first, name) not in str(stored.reply)
    assert set(stored.reply["derive"]) == {
        "generation",
        "issued_at",
        "expires_at",
        "roles",
        "jwt_kid",
        "refresh_kid",
    }


async def test_a_refresh_rotates_both_tokens_counts_as_activity_and_uses_up_the_old_one(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    clock.advance(minutes=29)  # just inside the 30-minute idle timeout
    refreshed = await service.tokens.refresh_session(
        refresh_cmd(secret(started, "refresh_token")), ctx()
    )
    assert refreshed.session == started.session
    assert secret(refreshed, "refresh_token") != secret(started, "refresh_token")
    claims = await verifier(clock).verify_access_token(secret(refreshed, "access_token"))
    assert claims.issued_at == int(clock.now().timestamp())
    record = await session_of(store, started.session.id)
    assert (record.refresh_generation, record.refreshed_at) == (1, clock.now())
    assert record.last_seen_at == clock.now()
    clock.advance(minutes=29)  # alive because the refresh was activity
    again = await service.tokens.refresh_session(
        refresh_cmd(secret(refreshed, "refresh_token")), ctx()
    )
    assert (await session_of(store, started.session.id)).refresh_generation == 2
    assert secret(again, "refresh_token") not in {
        secret(started, "refresh_token"),
        secret(refreshed, "refresh_token"),
    }
    events = await pending_events(store)
    assert [e["type"] for e in events].count("session.ended") == 0


async def test_a_replayed_refresh_returns_the_same_tokens_even_after_the_next_refresh(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    clock.advance(30)
    first = await service.tokens.refresh_session(
        refresh_cmd(secret(started, "refresh_token")), ctx("refresh-1")
    )
    clock.advance(GRACE_S + 1)
    await service.tokens.refresh_session(refresh_cmd(secret(first, "refresh_token")), ctx())
    clock.advance(30)
    again = await service.tokens.refresh_session(
        refresh_cmd(secret(started, "refresh_token")), ctx("refresh-1")
    )
    assert again == first
    assert secret(again, "access_token") == secret(first, "access_token")
    assert secret(again, "refresh_token") == secret(first, "refresh_token")
    stored = await store.get_idempotency("refresh-1")
    assert stored is not None
    assert secret(first, "refresh_token") not in str(stored.reply)
    assert secret(first, "access_token") not in str(stored.reply)
    # The replay was not a reuse: the session lives on.
    assert (await session_of(store, started.session.id)).ended_at is None


async def test_a_used_refresh_token_presented_again_ends_the_session(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    old = secret(started, "refresh_token")
    refreshed = await service.tokens.refresh_session(refresh_cmd(old), ctx())
    clock.advance(GRACE_S)
    with pytest.raises(InvalidTokenError) as reused:
        await service.tokens.refresh_session(refresh_cmd(old), ctx("reuse-1"))
    assert "ended" in reused.value.message
    record = await session_of(store, started.session.id)
    assert record.end_reason == "refresh_token_reused"
    ended = [e for e in await pending_events(store) if e["type"] == "session.ended"]
    assert [e["data"]["reason"] for e in ended] == ["refresh_token_reused"]
    assert ended[0]["causation_id"] == "reuse-1"
    # The thief's copy and the holder's fresh token are both dead now, and so is the session.
    with pytest.raises(SessionExpiredError):
        await service.tokens.refresh_session(refresh_cmd(secret(refreshed, "refresh_token")), ctx())
    with pytest.raises(SessionExpiredError):
        await service.verify_session(
            VerifySession.model_validate({"token": secret(started, "token")})
        )
    # The key remembers its answer.
    with pytest.raises(InvalidTokenError):
        await service.tokens.refresh_session(refresh_cmd(old), ctx("reuse-1"))


async def test_a_used_token_back_within_the_grace_is_refused_without_ending_the_session(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    old = secret(started, "refresh_token")
    await service.tokens.refresh_session(refresh_cmd(old), ctx())
    clock.advance(GRACE_S - 1)
    with pytest.raises(InvalidTokenError) as raced:
        await service.tokens.refresh_session(refresh_cmd(old), ctx())
    assert "ended" not in raced.value.message
    assert (await session_of(store, started.session.id)).ended_at is None


async def test_an_older_generation_ends_the_session_even_within_the_grace(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    gen0 = secret(started, "refresh_token")
    gen1 = await service.tokens.refresh_session(refresh_cmd(gen0), ctx())
    await service.tokens.refresh_session(refresh_cmd(secret(gen1, "refresh_token")), ctx())
    with pytest.raises(InvalidTokenError):
        await service.tokens.refresh_session(refresh_cmd(gen0), ctx())
    assert (await session_of(store, started.session.id)).end_reason == "refresh_token_reused"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # the MAC
        lambda t: t.replace(".0.", ".1.", 1),  # the generation
        lambda t: "r1.nokey" + t[t.index(".ses_") :],  # the kid
        lambda t: "v1" + t[2:],  # the version
        lambda t: t + "=",
        lambda t: "",
    ],
)
async def test_a_forged_refresh_token_is_refused_and_nothing_is_remembered(
    service: IdentityService, store: MemoryIdentityStore, mangle: Any
) -> None:
    started = await signed_in(service)
    with pytest.raises(InvalidTokenError):
        await service.tokens.refresh_session(
            RefreshSession.model_construct(
                refresh_token=_secret(mangle(secret(started, "refresh_token")))
            ),
            ctx("forged-1"),
        )
    assert await store.get_idempotency("forged-1") is None
    assert (await session_of(store, started.session.id)).ended_at is None


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


async def test_every_way_a_session_ends_makes_its_refresh_token_useless(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    await service.create_account(create_cmd(), ctx())

    async def fresh() -> StartSessionResult:
        return await service.start_session(start_cmd(), ctx())

    async def refused(started: StartSessionResult) -> None:
        with pytest.raises(SessionExpiredError):
            await service.tokens.refresh_session(
                refresh_cmd(secret(started, "refresh_token")), ctx()
            )

    signed_out = await fresh()
    await service.end_session(
        EndSession.model_validate({"token": secret(signed_out, "token")}), ctx()
    )
    await refused(signed_out)

    everywhere = await fresh()
    await service.end_all_sessions(EndAllSessions(account_id=everywhere.account.id), ctx())
    await refused(everywhere)

    changed = await fresh()
    new_password = "another long passphrase here"
    await service.change_password(
        ChangePassword.model_validate(
            {
                "account_id": changed.account.id,
                "current_password": PASSWORD,
                "new_password": new_password,
            }
        ),
        ctx(),
    )
    await refused(changed)

    disabled = await service.start_session(start_cmd(password=new_password), ctx())
    account = await store.get_account(disabled.account.id)
    assert account is not None
    async with store.unit_of_work() as uow:
        await uow.update_account(
            account.id, account.version, AccountChanges(updated_at=clock.now(), status="disabled")
        )
    await refused(disabled)
    async with store.unit_of_work() as uow:
        await uow.update_account(
            account.id, account.version + 1, AccountChanges(updated_at=clock.now(), status="active")
        )

    idle = await service.start_session(start_cmd(password=new_password), ctx())
    clock.advance(minutes=30)  # the idle timeout
    await refused(idle)

    expiring = await service.start_session(start_cmd(password=new_password), ctx())
    for _ in range(48):  # kept busy, but not past its absolute lifetime of 24 hours
        clock.advance(minutes=29, seconds=59)
        expiring = await service.tokens.refresh_session(  # type: ignore[assignment]
            refresh_cmd(secret(expiring, "refresh_token")), ctx()
        )
    clock.advance(minutes=1)  # 24 hours after the sign-in, a minute after the last refresh
    await refused(expiring)


async def test_the_access_token_never_outlives_its_session(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    record = await session_of(store, started.session.id)
    # Shorten the session to 2 minutes from now, as if it had been running for almost a day.
    store._tables.sessions[record.id] = replace(
        record, expires_at=clock.now() + timedelta(minutes=2)
    )
    refreshed = await service.tokens.refresh_session(
        refresh_cmd(secret(started, "refresh_token")), ctx()
    )
    assert refreshed.access_token_expires_at == clock.now() + timedelta(minutes=2)


async def test_roles_granted_and_revoked_reach_verify_at_once_and_tokens_after_a_refresh(
    service: IdentityService, clock: FakeClock, store: MemoryIdentityStore
) -> None:
    started = await signed_in(service)
    account_id = started.account.id
    granted = await service.roles.grant_role(
        GrantRole(account_id=account_id, role="support"), ctx()
    )
    granted = await service.roles.grant_role(GrantRole(account_id=account_id, role="admin"), ctx())
    assert granted.account.roles == ["admin", "support"]
    assert granted.account.version == started.account.version + 2
    verified = await service.verify_session(
        VerifySession.model_validate({"token": secret(started, "token")})
    )
    assert verified.account.roles == ["admin", "support"]
    # The token issued before the change keeps the roles it was issued with.
    assert claims_of(secret(started, "access_token"))["roles"] == []
    refreshed = await service.tokens.refresh_session(
        refresh_cmd(secret(started, "refresh_token")), ctx()
    )
    assert claims_of(secret(refreshed, "access_token"))["roles"] == ["admin", "support"]

    revoked = await service.roles.revoke_role(
        RevokeRole(account_id=account_id, role="admin"), ctx()
    )
    assert revoked.account.roles == ["support"]
    changes = [
        e["data"] for e in await pending_events(store) if e["type"] == "account.roles_changed"
    ]
    assert changes == [
        {"account_id": account_id, "roles": ["support"]},
        {"account_id": account_id, "roles": ["admin", "support"]},
        {"account_id": account_id, "roles": ["support"]},
    ]


async def test_granting_a_held_role_or_revoking_a_missing_one_changes_nothing(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account_id = (await signed_in(service)).account.id
    first = await service.roles.grant_role(GrantRole(account_id=account_id, role="admin"), ctx())
    again = await service.roles.grant_role(GrantRole(account_id=account_id, role="admin"), ctx())
    missing = await service.roles.revoke_role(RevokeRole(account_id=account_id, role="x"), ctx())
    assert again.account == first.account == missing.account
    types = [e["type"] for e in await pending_events(store)]
    assert types.count("account.roles_changed") == 1


async def test_roles_need_an_account_a_valid_name_and_stay_bounded(
    service: IdentityService,
) -> None:
    account_id = (await signed_in(service)).account.id
    with pytest.raises(NotFoundError):
        await service.roles.grant_role(GrantRole(account_id="acct_" + "0" * 26, role="a"), ctx())
    for bad in ("Admin", "1st", "", "a" * 65, "a b"):
        with pytest.raises(ValueError, match="role"):
            GrantRole.model_validate({"account_id": account_id, "role": bad})
    for n in range(MAX_ROLES):
        await service.roles.grant_role(GrantRole(account_id=account_id, role=f"r{n}"), ctx())
    with pytest.raises(InvalidInputError):
        await service.roles.grant_role(GrantRole(account_id=account_id, role="one.too:many"), ctx())


async def test_keys_jwks_lists_the_public_keys_the_signing_one_first(
    service: IdentityService,
) -> None:
    result = await service.tokens.jwks(GetJwks())
    assert [key.kid for key in result.keys] == [key.kid for key in TEST_JWT_KEYS]
    assert result.to_wire() == AccessTokenSigner(TEST_JWT_KEYS).jwks()
