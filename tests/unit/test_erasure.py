"""account.delete (services.lifecycle) on the in-memory store: after a full history, nothing
the store holds (every table, walked generically) names the account's emails, display
names, password hashes or devices; replays answer not_found; the email is free again."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import orjson
import pytest

from messages import (
    ChangePassword,
    CreateAccount,
    DeleteAccount,
    DisableAccount,
    EnableAccount,
    EndAllSessions,
    GetAccount,
    ListSessions,
    Metadata,
    RevokeSession,
    StartSession,
    UpdateAccount,
    VerifySession,
)
from services.clock import FakeClock
from services.errors import (
    IdempotencyKeyReusedError,
    InvalidCredentialsError,
    NotFoundError,
    SessionExpiredError,
)
from services.identity import IdentityService
from services.operations import CommandContext
from stores import StoreError
from stores.memory import MemoryIdentityStore
from tests.contract.builders import account as account_record
from tests.unit.helpers import PASSWORD, ctx, pending_events

WRONG = "wrong password but long"
NEW_PASSWORD = "tr0ubadour and stapler"


def stored_values(value: Any) -> Iterator[str | bytes]:
    """Every text and byte string inside `value`: records, dicts (keys too), collections.
    Anything else that could hold text fails the walk, so a new kind of value cannot hide."""
    if isinstance(value, str | bytes):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from stored_values(getattr(value, field.name))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from stored_values(key)
            yield from stored_values(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from stored_values(item)
    elif not isinstance(value, int | float | datetime | type(None)):
        raise TypeError(f"the walk does not know {type(value).__name__}")


def found_in(store: MemoryIdentityStore, needles: list[str]) -> list[str]:
    """The needles (letter case ignored) that some stored value holds."""
    haystack = [v.lower() for v in stored_values(store._tables)]
    return [
        needle
        for needle in needles
        if any(
            (needle.lower() in v) if isinstance(v, str) else (needle.lower().encode() in v)
            for v in haystack
        )
    ]


@dataclasses.dataclass
class History:
    account_id: str
    session_ids: list[str]
    tokens: list[str]
    keys: dict[str, str]
    personal: list[str]  # every email, display name and device it had, its password hash


def device(agent: str) -> CommandContext:
    metadata = Metadata(client_ip="198.51.100.23", user_agent=agent)
    return CommandContext(idempotency_key=str(uuid.uuid4()), metadata=metadata)


async def full_history(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> History:
    """Sign-up, sign-ins from a device, a failed one, changes of name, email and password,
    a disable and an enable, a revoke, and events both published and still pending."""
    tag = uuid.uuid4().hex[:10]
    email, moved = f"Erase.Me.{tag}@Example.com", f"moved.{tag}@example.com"
    name, renamed = f"Erin {tag}", f"Erin Moved {tag}"
    agent = f"Browser/{tag}"
    keys = {step: f"{step}-{tag}" for step in ("create", "start", "update", "chpw", "off")}
    keys |= {"on": f"on-{tag}", "revoke": f"revoke-{tag}"}
    create = CreateAccount.model_validate(
        {"email": email, "password": PASSWORD, "display_name": name}
    )
    account = (await service.create_account(create, ctx(keys["create"]))).account
    started = await service.start_session(
        StartSession.model_validate({"email": email, "password": PASSWORD}),
        CommandContext(idempotency_key=keys["start"], metadata=device(agent).metadata),
    )
    with pytest.raises(InvalidCredentialsError):
        await service.start_session(
            StartSession.model_validate({"email": email, "password": WRONG}), ctx()
        )
    update = UpdateAccount.model_validate(
        {
            "account_id": account.id,
            "expected_version": 1,
            "email": moved,
            "display_name": renamed,
            "current_password": PASSWORD,
        }
    )
    await service.update_account(update, ctx(keys["update"]))
    # Published by now: these rows are kept, scrubbed; the later ones are still pending.
    async with store.claim_events(10_000) as batch:
        batch.mark_published([event.seq for event in batch.events])
    clock.advance(seconds=1)
    change = ChangePassword.model_validate(
        {"account_id": account.id, "current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    await service.change_password(change, ctx(keys["chpw"]))
    second_hash = (await store.get_account(account.id)).password_hash  # type: ignore[union-attr]
    sign_in = StartSession.model_validate({"email": moved, "password": NEW_PASSWORD})
    sessions = [await service.start_session(sign_in, device(agent)) for _ in range(3)]
    await service.sessions_admin.revoke_session(
        RevokeSession(session_id=sessions[0].session.id), ctx(keys["revoke"])
    )
    await service.lifecycle.disable_account(
        DisableAccount(account_id=account.id, reason=f"complaint about {renamed}"),
        ctx(keys["off"]),
    )
    await service.lifecycle.enable_account(EnableAccount(account_id=account.id), ctx(keys["on"]))
    sessions += [await service.start_session(sign_in, device(agent)) for _ in range(2)]
    with pytest.raises(InvalidCredentialsError):  # counted by the throttle, under the email
        await service.start_session(
            StartSession.model_validate({"email": moved, "password": WRONG}), ctx()
        )
    return History(
        account_id=account.id,
        session_ids=[started.session.id] + [s.session.id for s in sessions],
        tokens=[s.token.get_secret_value() for s in sessions],
        keys=keys,
        # The first hash is not among them: the password change left it nowhere.
        personal=[email, moved, name, renamed, second_hash, agent],
    )


async def delete(service: IdentityService, account_id: str, key: str) -> int:
    result = await service.lifecycle.delete_account(DeleteAccount(account_id=account_id), ctx(key))
    assert result.account_id == account_id
    return result.sessions_ended


async def test_after_erasure_no_stored_value_names_the_account(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    # The walk finds each of them before: it can see what it looks for, everywhere it is.
    assert found_in(store, history.personal) == history.personal

    assert await delete(service, history.account_id, "delete-1") == 2

    assert found_in(store, history.personal) == []


async def test_erasure_keeps_published_events_as_id_and_type_and_drops_pending_ones(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    published = [row.event for row in store._tables.outbox.values() if row.published_at]
    pending_before = [e["event_id"] for e in await pending_events(store)]
    assert published
    assert pending_before

    await delete(service, history.account_id, "delete-1")

    rows = {row.event.event_id: row for row in store._tables.outbox.values()}
    for event in published:
        assert orjson.loads(rows[event.event_id].event.body) == {
            "event_id": event.event_id,
            "type": event.type,
            "erased": True,
        }
    pending = await pending_events(store)
    assert not set(pending_before) & {e["event_id"] for e in pending}
    assert [(e["type"], e["data"].get("reason")) for e in pending] == [
        ("session.ended", "account_deleted"),
        ("session.ended", "account_deleted"),
        ("account.deleted", None),
    ]
    assert pending[-1]["data"] == {"account_id": history.account_id}


async def test_replays_of_replies_that_held_the_account_answer_not_found(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    await delete(service, history.account_id, "delete-1")

    for step in ("create", "update", "chpw", "off", "on", "revoke", "start"):
        record = await store.get_idempotency(history.keys[step])
        assert record is not None, step
        assert record.reply["error"]["code"] == "not_found", step
    email, name = history.personal[0], history.personal[2]
    create = CreateAccount.model_validate(
        {"email": email, "password": PASSWORD, "display_name": name}
    )
    start = StartSession.model_validate({"email": email, "password": PASSWORD})
    with pytest.raises(NotFoundError):
        await service.create_account(create, ctx(history.keys["create"]))
    with pytest.raises(NotFoundError):  # not a token for a session that is gone
        await service.start_session(start, ctx(history.keys["start"]))
    with pytest.raises(NotFoundError):
        await service.lifecycle.enable_account(
            EnableAccount(account_id=history.account_id), ctx(history.keys["on"])
        )
    # The fingerprint stays: the same key with another command is still refused as such.
    with pytest.raises(IdempotencyKeyReusedError):
        await service.lifecycle.enable_account(
            EnableAccount(account_id="acct_" + "0" * 26), ctx(history.keys["on"])
        )


async def test_delete_is_idempotent_by_key_and_later_keys_are_not_found(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    first = await service.lifecycle.delete_account(
        DeleteAccount(account_id=history.account_id), ctx("delete-1")
    )
    replay = await service.lifecycle.delete_account(
        DeleteAccount(account_id=history.account_id), ctx("delete-1")
    )
    assert replay == first
    with pytest.raises(NotFoundError):
        await delete(service, history.account_id, "delete-2")
    assert [e["type"] for e in await pending_events(store)].count("account.deleted") == 1


async def test_an_erased_account_is_gone_for_every_later_command(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    await delete(service, history.account_id, "delete-1")
    account_id = history.account_id

    with pytest.raises(NotFoundError):
        await service.get_account(GetAccount(account_id=account_id))
    for late in (
        service.lifecycle.disable_account(DisableAccount(account_id=account_id, reason="x"), ctx()),
        service.end_all_sessions(EndAllSessions(account_id=account_id), ctx()),
        service.sessions_admin.list_sessions(ListSessions(account_id=account_id)),
        service.sessions_admin.revoke_session(
            RevokeSession(session_id=history.session_ids[-1]), ctx()
        ),
    ):
        with pytest.raises(NotFoundError):
            await late
    for token in history.tokens:
        with pytest.raises(SessionExpiredError):
            await service.verify_session(VerifySession.model_validate({"token": token}))
    assert await service.sessions_admin.session_account(history.session_ids[-1]) is None


async def test_the_email_can_register_again_and_the_id_never_comes_back(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    moved = history.personal[1]
    await delete(service, history.account_id, "delete-1")

    again = CreateAccount.model_validate(
        {"email": moved, "password": PASSWORD, "display_name": "Someone Else"}
    )
    fresh = (await service.create_account(again, ctx())).account
    assert fresh.id != history.account_id
    with pytest.raises(StoreError):
        async with store.unit_of_work() as uow:
            await uow.insert_account(account_record(id=history.account_id))


async def test_erasure_forgets_the_sign_in_throttle_of_the_email(
    service: IdentityService, store: MemoryIdentityStore, clock: FakeClock
) -> None:
    history = await full_history(service, store, clock)
    moved = history.personal[1]
    tag = service._auth.throttle_key(moved.lower())
    tables = store._tables

    def rows() -> list[object]:
        pairs = [key for key in [*tables.pairs, *tables.known_sources] if key[0] == tag]
        return [*pairs, *([tag] if tag in tables.email_counters else [])]

    assert rows()
    await delete(service, history.account_id, "delete-1")
    assert rows() == []
