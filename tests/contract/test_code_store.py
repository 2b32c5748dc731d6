"""What every store promises about one-time codes, their throttle and the courier outbox,
checked on the in-memory store and on PostgreSQL alike.

The courier outbox is one queue for the whole database, so its tests first relay whatever
earlier tests left (`drain_mail`); every other test uses its own accounts, emails and tags.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from datetime import timedelta

import orjson
import pytest

from stores import (
    RECOVERY,
    VERIFICATION,
    AccountChanges,
    CodeIssue,
    DuplicateKeyError,
    IdentityStore,
    Limit,
    NewCode,
    NewMail,
)
from tests.contract.builders import T0, account, event, idempotency, unique

MAC = b"m" * 32
OTHER_MAC = b"x" * 32
WINDOW = timedelta(minutes=15)


class Boom(Exception):
    """Raised inside a unit of work to make it roll back."""


def tag() -> bytes:
    return secrets.token_bytes(16)


def code(account_id: str, purpose: str = RECOVERY, mac: bytes = MAC) -> NewCode:
    return NewCode(account_id, purpose, mac, T0, T0 + timedelta(minutes=15))


def mail(
    account_id: str = "acct_x", sealed: bytes | None = b"sealed", **overrides: object
) -> NewMail:
    fields: dict[str, object] = {
        "message_id": unique("msg"),
        "kind": "recovery_code",
        "recipient": "ada@example.com",
        "account_id": account_id,
        "display_name": "Ada",
        "sealed_code": sealed,
        "expires_at": T0 + timedelta(minutes=15),
        "created_at": T0,
    }
    return NewMail(**(fields | overrides))  # type: ignore[arg-type]


async def commit_account(store: IdentityStore, **overrides: object) -> tuple[str, str]:
    record = account(**overrides)
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
    return record.id, record.email_canonical


async def commit_code(store: IdentityStore, new: NewCode) -> None:
    async with store.unit_of_work() as uow:
        await uow.put_code(new)


async def use(
    store: IdentityStore, account_id: str, mac: bytes = MAC, at: timedelta = timedelta(0)
) -> bool:
    async with store.unit_of_work() as uow:
        return await uow.use_code(account_id, RECOVERY, mac, T0 + at, 5)


async def drain_mail(store: IdentityStore) -> None:
    while True:
        async with store.claim_mail(100) as batch:
            batch.mark_relayed([m.seq for m in batch.mails])
        if not batch.mails:
            return


def issue(email: str, **overrides: object) -> CodeIssue:
    fields: dict[str, object] = {
        "email_canonical": email,
        "purpose": RECOVERY,
        "mac": MAC,
        "created_at": T0,
        "expires_at": T0 + timedelta(minutes=15),
        "limits": (Limit(tag(), 3), Limit(tag(), 50)),
        "window": WINDOW,
        "unverified_only": False,
        "message_id": unique("msg"),
        "kind": "recovery_code",
        "sealed_code": b"sealed",
        "event": event(
            type="account.recovery_requested",
            body=orjson.dumps({"type": "account.recovery_requested", "data": {"account_id": "x"}}),
        ),
    }
    return CodeIssue(**(fields | overrides))  # type: ignore[arg-type]


# Codes in a unit of work


async def test_a_code_is_used_once_and_only_with_its_mac(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))
    assert not await use(store, owner, OTHER_MAC)
    assert await use(store, owner)
    assert not await use(store, owner)


async def test_a_code_is_not_used_at_or_after_its_expiry(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))
    assert not await use(store, owner, at=timedelta(minutes=15))
    assert await use(store, owner, at=timedelta(minutes=15) - timedelta(microseconds=1))


async def test_a_new_code_replaces_the_old_one_of_its_purpose_only(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))
    await commit_code(store, code(owner, VERIFICATION, OTHER_MAC))
    await commit_code(store, code(owner, RECOVERY, OTHER_MAC))
    assert not await use(store, owner, MAC)
    assert await use(store, owner, OTHER_MAC)
    async with store.unit_of_work() as uow:
        assert await uow.use_code(owner, VERIFICATION, OTHER_MAC, T0, 5)


async def test_dropped_codes_are_void(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))
    await commit_code(store, code(owner, VERIFICATION))
    async with store.unit_of_work() as uow:
        await uow.drop_codes(owner)
    assert not await use(store, owner)
    async with store.unit_of_work() as uow:
        assert not await uow.use_code(owner, VERIFICATION, MAC, T0, 5)


async def test_a_use_in_a_unit_that_raises_leaves_the_code_good(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            assert await uow.use_code(owner, RECOVERY, MAC, T0, 5)
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    assert await use(store, owner)


async def test_a_unit_sees_its_own_code_writes(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    async with store.unit_of_work() as uow:
        await uow.put_code(code(owner))
        assert await uow.use_code(owner, RECOVERY, MAC, T0, 5)
        assert not await uow.use_code(owner, RECOVERY, MAC, T0, 5)


async def test_two_units_using_one_code_at_once_exactly_one_wins(store: IdentityStore) -> None:
    owner, _ = await commit_account(store)
    await commit_code(store, code(owner))
    results = await asyncio.gather(*(use(store, owner) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]


# Attempts


async def test_a_right_attempt_returns_the_account_and_does_not_use_the_code(
    store: IdentityStore,
) -> None:
    owner, email = await commit_account(store)
    await commit_code(store, code(owner))
    found = await store.attempt_code(email, RECOVERY, MAC, T0, 5)
    assert found is not None
    assert found.id == owner
    assert await use(store, owner)


async def test_wrong_attempts_are_counted_and_the_last_one_voids_the_code(
    store: IdentityStore,
) -> None:
    owner, email = await commit_account(store)
    await commit_code(store, code(owner))
    for _ in range(4):
        assert await store.attempt_code(email, RECOVERY, OTHER_MAC, T0, 5) is None
    assert await store.attempt_code(email, RECOVERY, MAC, T0, 5) is not None
    assert await store.attempt_code(email, RECOVERY, OTHER_MAC, T0, 5) is None
    assert await store.attempt_code(email, RECOVERY, MAC, T0, 5) is None
    assert not await use(store, owner)


async def test_concurrent_wrong_attempts_are_each_counted(store: IdentityStore) -> None:
    owner, email = await commit_account(store)
    await commit_code(store, code(owner))
    await asyncio.gather(*(store.attempt_code(email, RECOVERY, OTHER_MAC, T0, 5) for _ in range(5)))
    assert await store.attempt_code(email, RECOVERY, MAC, T0, 5) is None


async def test_no_account_no_code_expired_or_disabled_all_answer_none(
    store: IdentityStore,
) -> None:
    owner, email = await commit_account(store)
    assert await store.attempt_code(email, RECOVERY, MAC, T0, 5) is None
    assert await store.attempt_code(unique("nobody"), RECOVERY, MAC, T0, 5) is None
    await commit_code(store, code(owner))
    assert await store.attempt_code(email, RECOVERY, MAC, T0 + WINDOW, 5) is None
    async with store.unit_of_work() as uow:
        await uow.update_account(owner, 1, AccountChanges(updated_at=T0, status="disabled"))
    assert await store.attempt_code(email, RECOVERY, MAC, T0, 5) is None


# The throttle


async def test_hits_within_the_limit_pass_then_the_window_must_end(store: IdentityStore) -> None:
    limits = [Limit(tag(), 2), Limit(tag(), 10)]
    assert await store.hit_limits(limits, T0, WINDOW) == 0
    assert await store.hit_limits(limits, T0 + timedelta(minutes=5), WINDOW) == 0
    wait = await store.hit_limits(limits, T0 + timedelta(minutes=5), WINDOW)
    assert wait == pytest.approx(600.0)
    assert await store.hit_limits(limits, T0 + WINDOW, WINDOW) == 0


async def test_concurrent_hits_are_each_counted(store: IdentityStore) -> None:
    limits = [Limit(tag(), 5)]
    waits = await asyncio.gather(*(store.hit_limits(limits, T0, WINDOW) for _ in range(7)))
    assert sorted(w > 0 for w in waits) == [False] * 5 + [True] * 2


# Issuing a code in one write


async def test_issuing_to_an_active_account_stores_code_mail_event_and_record(
    store: IdentityStore,
) -> None:
    owner, email = await commit_account(store, display_name="Ada L.")
    await drain_mail(store)
    request = issue(email)
    record = idempotency(command="account.recovery.request")
    assert await store.issue_code(request, record) is True
    assert await store.get_idempotency(record.key) == record
    assert await use(store, owner)
    async with store.claim_mail(100) as batch:
        (sent,) = batch.mails
        batch.mark_relayed([sent.seq])
    assert (sent.message_id, sent.kind, sent.account_id, sent.display_name) == (
        request.message_id,
        "recovery_code",
        owner,
        "Ada L.",
    )
    assert sent.recipient == email
    assert bytes(sent.sealed_code or b"") == b"sealed"
    assert request.event is not None
    async with store.claim_events(10_000) as events:
        (written,) = [e for e in events.events if e.event_id == request.event.event_id]
    assert orjson.loads(written.body)["data"] == {"account_id": owner}


@pytest.mark.parametrize("case", ["unknown", "disabled", "verified", "limited"])
async def test_issuing_otherwise_stores_only_the_record(store: IdentityStore, case: str) -> None:
    owner, email = await commit_account(store, email_verified=True)
    if case == "disabled":
        async with store.unit_of_work() as uow:
            await uow.update_account(owner, 1, AccountChanges(updated_at=T0, status="disabled"))
    limited = Limit(tag(), 0 if case == "limited" else 5)
    request = issue(
        unique("nobody") if case == "unknown" else email,
        unverified_only=case == "verified",
        limits=(limited,),
    )
    await drain_mail(store)
    record = idempotency(command="account.recovery.request")
    assert await store.issue_code(request, record) is False
    assert await store.get_idempotency(record.key) == record
    assert not await use(store, owner)
    async with store.claim_mail(100) as batch:
        assert list(batch.mails) == []
    assert request.event is not None
    async with store.claim_events(10_000) as events:
        assert request.event.event_id not in {e.event_id for e in events.events}


async def test_issuing_with_a_taken_key_writes_nothing_and_counts_nothing(
    store: IdentityStore,
) -> None:
    owner, email = await commit_account(store)
    record = idempotency()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], record)
    limit = Limit(tag(), 1)
    with pytest.raises(DuplicateKeyError):
        await store.issue_code(issue(email, limits=(limit,)), replace(record, command="x"))
    assert not await use(store, owner)
    assert await store.hit_limits([limit], T0, WINDOW) == 0


async def test_issuing_counts_the_limits_known_email_or_not(store: IdentityStore) -> None:
    _, email = await commit_account(store)
    limit = Limit(tag(), 1)
    assert await store.issue_code(issue(email, limits=(limit,)), None) is True
    assert await store.issue_code(issue(email, limits=(limit,)), None) is False
    other = Limit(tag(), 1)
    await store.issue_code(issue(unique("nobody"), limits=(other,)), None)
    assert await store.hit_limits([other], T0, WINDOW) > 0


# The courier outbox


async def test_mail_is_claimed_in_order_until_relayed_and_loses_its_code(
    store: IdentityStore,
) -> None:
    await drain_mail(store)
    first, second = mail(), mail(sealed=None, expires_at=None, kind="password_changed_notice")
    async with store.unit_of_work() as uow:
        await uow.add_mail([first, second])
    async with store.claim_mail(100) as batch:
        assert [m.message_id for m in batch.mails] == [first.message_id, second.message_id]
        assert batch.mails[1].sealed_code is None
        batch.mark_relayed([batch.mails[1].seq])
    async with store.claim_mail(100) as batch:
        assert [m.message_id for m in batch.mails] == [first.message_id]
        assert bytes(batch.mails[0].sealed_code or b"") == b"sealed"
        batch.mark_relayed([batch.mails[0].seq])
    async with store.claim_mail(100) as batch:
        assert list(batch.mails) == []


async def test_mail_of_an_open_or_failed_unit_is_not_claimable(store: IdentityStore) -> None:
    await drain_mail(store)

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            await uow.add_mail([mail()])
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    async with store.claim_mail(100) as batch:
        assert list(batch.mails) == []


async def test_concurrent_claims_never_share_a_row(store: IdentityStore) -> None:
    await drain_mail(store)
    async with store.unit_of_work() as uow:
        await uow.add_mail([mail() for _ in range(6)])
    async with store.claim_mail(3) as first, store.claim_mail(10) as second:
        assert len(first.mails) == 3
        assert len(second.mails) == 3
        assert not {m.seq for m in first.mails} & {m.seq for m in second.mails}
        first.mark_relayed([m.seq for m in first.mails])
        second.mark_relayed([m.seq for m in second.mails])


async def test_mail_backlog_counts_rows_not_relayed_and_the_oldest_age(
    store: IdentityStore,
) -> None:
    await drain_mail(store)
    assert await store.mail_backlog(T0) == (0, 0.0)
    async with store.unit_of_work() as uow:
        await uow.add_mail([mail(created_at=T0 - timedelta(seconds=30)), mail()])
    assert await store.mail_backlog(T0) == (2, 30.0)
    await drain_mail(store)


async def test_purge_deletes_expired_codes_relayed_mail_and_old_counters(
    store: IdentityStore,
) -> None:
    old_owner, _ = await commit_account(store)
    young_owner, _ = await commit_account(store)
    await commit_code(store, replace(code(old_owner), expires_at=T0 - timedelta(days=2)))
    await commit_code(store, code(young_owner))
    await drain_mail(store)
    old_mail = mail(created_at=T0 - timedelta(days=9))
    async with store.unit_of_work() as uow:
        await uow.add_mail([old_mail, mail()])
    old_tag, young_tag = Limit(tag(), 1), Limit(tag(), 1)
    await store.hit_limits([old_tag], T0 - timedelta(days=2), WINDOW)
    await store.hit_limits([young_tag], T0, WINDOW)
    async with store.claim_mail(100) as batch:
        relayed = [m.seq for m in batch.mails if m.message_id == old_mail.message_id]
        batch.mark_relayed(relayed)

    counts = await store.purge_codes(
        codes_before=T0 - timedelta(days=1),
        mail_before=T0 - timedelta(days=7),
        throttle_before=T0 - timedelta(days=1),
    )

    assert (counts.codes, counts.mail, counts.throttle) >= (1, 1, 1)
    async with store.unit_of_work() as uow:
        assert await uow.use_code(young_owner, RECOVERY, MAC, T0, 5)
    assert await store.mail_backlog(T0) == (1, 0.0)
    assert await store.hit_limits([old_tag], T0, WINDOW) == 0
    assert await store.hit_limits([young_tag], T0, WINDOW) > 0
    await drain_mail(store)
