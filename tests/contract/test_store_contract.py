"""What every IdentityStore promises, checked on the in-memory store and on PostgreSQL alike.

The outbox is one queue for the whole database, so outbox tests first publish whatever
earlier tests left unpublished (`drain`); every other test uses its own ids and emails.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from stores import (
    AccountChanges,
    DuplicateEmailError,
    DuplicateKeyError,
    IdentityStore,
    StoreError,
    TransientStoreError,
)
from tests.contract.builders import (
    SEEN_BEFORE,
    T0,
    account,
    event,
    idempotency,
    session,
    unique,
)


class Boom(Exception):
    """Raised inside a unit of work to make it roll back."""


async def drain(store: IdentityStore) -> None:
    while True:
        async with store.claim_events(100) as batch:
            batch.mark_published([e.seq for e in batch.events])
        if not batch.events:
            return


async def commit_account(store: IdentityStore, **overrides: object) -> str:
    record = account(**overrides)
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
    return record.id


# Accounts


async def test_inserted_account_is_found_by_id_and_by_canonical_email(store: IdentityStore) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
        assert await uow.get_account(record.id) == record

    assert await store.get_account(record.id) == record
    assert await store.get_account_by_email(record.email_canonical) == record


async def test_unknown_account_is_none(store: IdentityStore) -> None:
    assert await store.get_account(unique("acct")) is None
    assert await store.get_account_by_email(unique("nobody") + "@example.com") is None


async def test_uncommitted_account_is_invisible_outside_its_unit(store: IdentityStore) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
        assert await store.get_account(record.id) is None
    assert await store.get_account(record.id) == record


async def test_taken_canonical_email_is_rejected(store: IdentityStore) -> None:
    first = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(first)
    with pytest.raises(DuplicateEmailError):
        async with store.unit_of_work() as uow:
            await uow.insert_account(account(email_canonical=first.email_canonical))
    owner = await store.get_account_by_email(first.email_canonical)
    assert owner is not None
    assert owner.id == first.id


async def test_store_compares_canonical_emails_exactly(store: IdentityStore) -> None:
    lower = account()
    upper = account(email_canonical=lower.email_canonical.upper())
    async with store.unit_of_work() as uow:
        await uow.insert_account(lower)
        await uow.insert_account(upper)
    assert await store.get_account_by_email(upper.email_canonical) == upper


async def test_duplicate_account_id_is_rejected(store: IdentityStore) -> None:
    account_id = await commit_account(store)
    with pytest.raises(StoreError):
        async with store.unit_of_work() as uow:
            await uow.insert_account(account(id=account_id))


async def test_update_at_expected_version_applies_changes_and_bumps_version(
    store: IdentityStore,
) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
    later = T0 + timedelta(minutes=5)
    changes = AccountChanges(updated_at=later, display_name="Grace")
    async with store.unit_of_work() as uow:
        locked = await uow.get_account(record.id, for_update=True)
        assert locked == record
        updated = await uow.update_account(record.id, 1, changes)

    expected = replace(record, display_name="Grace", updated_at=later, version=2)
    assert updated == expected
    assert await store.get_account(record.id) == expected


async def test_update_at_stale_version_changes_nothing(store: IdentityStore) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
    changes = AccountChanges(updated_at=T0 + timedelta(minutes=5), display_name="Grace")
    async with store.unit_of_work() as uow:
        assert await uow.update_account(record.id, 2, changes) is None
        assert await uow.update_account(unique("acct"), 1, changes) is None
    assert await store.get_account(record.id) == record


async def test_update_to_a_taken_email_is_rejected(store: IdentityStore) -> None:
    taken, mover = account(), account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(taken)
        await uow.insert_account(mover)
    changes = AccountChanges(updated_at=T0, email_canonical=taken.email_canonical)
    with pytest.raises(DuplicateEmailError):
        async with store.unit_of_work() as uow:
            await uow.update_account(mover.id, 1, changes)
    assert await store.get_account(mover.id) == mover


async def test_email_given_up_by_an_update_can_be_taken(store: IdentityStore) -> None:
    mover = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(mover)
    new_email = unique("moved") + "@example.com"
    changes = AccountChanges(updated_at=T0, email=new_email, email_canonical=new_email)
    async with store.unit_of_work() as uow:
        await uow.update_account(mover.id, 1, changes)
    newcomer = account(email_canonical=mover.email_canonical)
    async with store.unit_of_work() as uow:
        await uow.insert_account(newcomer)
    assert await store.get_account_by_email(mover.email_canonical) == newcomer
    moved = await store.get_account_by_email(new_email)
    assert moved is not None
    assert moved.id == mover.id


async def test_rehash_replaces_the_hash_without_a_new_version(store: IdentityStore) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
        assert await uow.replace_password_hash(record.id, record.password_hash, "$argon2id$new")
    assert await store.get_account(record.id) == replace(record, password_hash="$argon2id$new")


async def test_rehash_of_a_hash_changed_meanwhile_changes_nothing(store: IdentityStore) -> None:
    record = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(record)
    async with store.unit_of_work() as uow:
        assert not await uow.replace_password_hash(record.id, "$argon2id$stale", "$argon2id$new")
        assert not await uow.replace_password_hash(unique("acct"), "x", "y")
    assert await store.get_account(record.id) == record


# Sessions


async def test_session_comes_back_with_its_account_in_one_lookup(store: IdentityStore) -> None:
    owner = account()
    record = session(owner.id)
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.insert_session(record)
        assert await uow.get_session(record.id) == record
    assert await store.get_session_with_account(record.id) == (record, owner)
    assert await store.get_session_with_account(unique("ses")) is None


async def test_concurrent_lookups_each_get_their_own_row(store: IdentityStore) -> None:
    owners = [account() for _ in range(3)]
    sessions = [session(owners[n % 3].id) for n in range(6)]
    records = [idempotency() for _ in range(3)]
    async with store.unit_of_work() as uow:
        for owner in owners:
            await uow.insert_account(owner)
        for record in sessions:
            await uow.insert_session(record)
        for kept in records:
            await uow.record_outcome([], kept)
    missing = unique("ses"), unique("acct"), unique("key")

    # Asked together, many at once and some twice, as a busy worker asks.
    found = await asyncio.gather(
        *(store.get_session_with_account(s.id) for s in sessions * 2),
        store.get_session_with_account(missing[0]),
        *(store.get_account(o.id) for o in owners),
        store.get_account(missing[1]),
        *(store.get_idempotency(r.key) for r in records),
        store.get_idempotency(missing[2]),
    )

    expected: list[object] = [*((s, owners[n % 3]) for n, s in enumerate(sessions))] * 2
    expected += [None, *owners, None, *records, None]
    assert list(found) == expected


async def test_lookup_after_a_commit_sees_it_while_others_are_in_flight(
    store: IdentityStore,
) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    stop, asked = asyncio.Event(), asyncio.Event()

    async def keep_asking() -> None:
        while not stop.is_set():
            await asyncio.gather(*(store.get_session_with_account(record.id) for _ in range(8)))
            asked.set()

    askers = [asyncio.create_task(keep_asking()) for _ in range(4)]
    try:
        await asked.wait()  # the askers are on their next round: in flight from here on
        ended_at = T0 + timedelta(hours=1)
        async with store.unit_of_work() as uow:
            await uow.end_session(record.id, ended_at, "sign_out", idle_cutoff=SEEN_BEFORE)
        after = await store.get_session_with_account(record.id)
    finally:
        stop.set()
        await asyncio.gather(*askers)
    assert after is not None
    assert after[0].ended_at == ended_at


async def test_session_of_an_unknown_account_is_rejected(store: IdentityStore) -> None:
    with pytest.raises(StoreError):
        async with store.unit_of_work() as uow:
            await uow.insert_session(session(unique("acct")))


async def test_ending_a_session_returns_it_only_the_first_time(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    ended_at = T0 + timedelta(hours=1)
    async with store.unit_of_work() as uow:
        ended = await uow.end_session(record.id, ended_at, "sign_out", idle_cutoff=SEEN_BEFORE)
        assert (
            await uow.end_session(record.id, ended_at, "sign_out", idle_cutoff=SEEN_BEFORE) is None
        )
        assert (
            await uow.end_session(unique("ses"), ended_at, "sign_out", idle_cutoff=SEEN_BEFORE)
            is None
        )
    async with store.unit_of_work() as uow:
        assert (
            await uow.end_session(record.id, ended_at, "sign_out", idle_cutoff=SEEN_BEFORE) is None
        )

    assert ended == replace(record, ended_at=ended_at, end_reason="sign_out")
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert found[0] == ended


async def test_ending_all_sessions_returns_only_those_ended_now(store: IdentityStore) -> None:
    account_id, other_id = await commit_account(store), await commit_account(store)
    earlier, open_a, open_b = (
        session(account_id, created_at=T0 + timedelta(seconds=n)) for n in range(3)
    )
    other = session(other_id)
    async with store.unit_of_work() as uow:
        for record in (earlier, open_a, open_b, other):
            await uow.insert_session(record)
        await uow.end_session(earlier.id, T0, "sign_out", idle_cutoff=SEEN_BEFORE)
    now = T0 + timedelta(hours=1)
    async with store.unit_of_work() as uow:
        ended = await uow.end_all_sessions(
            account_id, now, "sign_out_everywhere", idle_cutoff=SEEN_BEFORE
        )
    async with store.unit_of_work() as uow:
        assert (
            await uow.end_all_sessions(
                account_id, now, "sign_out_everywhere", idle_cutoff=SEEN_BEFORE
            )
            == []
        )
        assert await uow.get_session(other.id) == other
        still_first = await uow.get_session(earlier.id)

    assert [s.id for s in ended] == [open_a.id, open_b.id]
    assert all(s.ended_at == now and s.end_reason == "sign_out_everywhere" for s in ended)
    assert still_first is not None
    assert still_first.end_reason == "sign_out"


async def test_only_a_live_session_ends(store: IdentityStore) -> None:
    account_id = await commit_account(store)
    now, cutoff = T0 + timedelta(hours=2), T0 + timedelta(hours=1, minutes=30)
    live = session(account_id, last_seen_at=T0 + timedelta(hours=1, minutes=45))
    idle = session(account_id, last_seen_at=cutoff)  # seen at the cutoff: idled out
    expired = session(account_id, last_seen_at=now, expires_at=now)  # over at its expiry
    async with store.unit_of_work() as uow:
        for record in (live, idle, expired):
            await uow.insert_session(record)

    async with store.unit_of_work() as uow:
        for over in (idle, expired):
            assert await uow.end_session(over.id, now, "sign_out", idle_cutoff=cutoff) is None
        ended = await uow.end_all_sessions(
            account_id, now, "sign_out_everywhere", idle_cutoff=cutoff
        )
    async with store.unit_of_work() as uow:
        assert await uow.get_session(idle.id) == idle  # left as they were: over already
        assert await uow.get_session(expired.id) == expired

    assert [s.id for s in ended] == [live.id]


async def test_touch_moves_last_seen_forward_never_backward(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    await store.touch_session(record.id, T0 + timedelta(minutes=10))
    await store.touch_session(record.id, T0 + timedelta(minutes=5))
    await store.touch_session(unique("ses"), T0)
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert found[0].last_seen_at == T0 + timedelta(minutes=10)


# Idempotency and rollback


async def test_idempotency_record_round_trips_its_reply(store: IdentityStore) -> None:
    record = idempotency()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], record)
    assert await store.get_idempotency(record.key) == record
    assert await store.get_idempotency(unique("key")) is None


async def test_reply_that_is_not_json_is_a_permanent_error(store: IdentityStore) -> None:
    record = idempotency(reply={"unserialisable": object()})
    with pytest.raises(StoreError) as caught:
        async with store.unit_of_work() as uow:
            await uow.record_outcome([], record)
    assert not isinstance(caught.value, TransientStoreError)
    assert await store.get_idempotency(record.key) is None


async def test_unit_that_raises_leaves_nothing_behind(store: IdentityStore) -> None:
    await drain(store)
    record, key, new_event = account(), idempotency(), event()

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            await uow.insert_account(record)
            await uow.record_outcome([new_event], key)
            raise Boom

    with pytest.raises(Boom):
        await doomed()

    assert await store.get_account(record.id) is None
    assert await store.get_account_by_email(record.email_canonical) is None
    assert await store.get_idempotency(key.key) is None
    assert await store.outbox_backlog(T0) == (0, 0.0)
    async with store.unit_of_work() as uow:  # the email and the key are free again
        await uow.insert_account(replace(record, id=unique("acct")))
        await uow.record_outcome([], key)


async def test_unit_that_raises_ends_no_session(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            await uow.end_all_sessions(
                record.account_id, T0, "password_changed", idle_cutoff=SEEN_BEFORE
            )
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    async with store.unit_of_work() as uow:
        assert await uow.get_session(record.id) == record


async def test_a_new_session_starts_at_refresh_generation_zero(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert (found[0].refresh_generation, found[0].refreshed_at) == (0, None)


async def test_a_locked_session_reads_as_the_unit_sees_it(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    async with store.unit_of_work() as uow:
        assert await uow.lock_session(record.id) == record
        await uow.end_session(record.id, T0, "sign_out", idle_cutoff=SEEN_BEFORE)
        locked = await uow.lock_session(record.id)
        assert locked is not None
        assert locked.end_reason == "sign_out"
        assert await uow.lock_session(unique("ses")) is None


async def test_rotating_a_refresh_token_is_a_compare_and_set_on_the_generation(
    store: IdentityStore,
) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    later = T0 + timedelta(minutes=5)
    async with store.unit_of_work() as uow:
        rotated = await uow.rotate_refresh_token(record.id, 0, later)
        assert rotated == replace(
            record, refresh_generation=1, refreshed_at=later, last_seen_at=later
        )
        assert await uow.rotate_refresh_token(record.id, 0, later) is None  # used up
        assert await uow.get_session(record.id) == rotated
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert found[0] == rotated
    async with store.unit_of_work() as uow:
        assert await uow.rotate_refresh_token(record.id, 5, later) is None
        assert await uow.rotate_refresh_token(unique("ses"), 0, later) is None


async def test_a_rotation_never_moves_last_seen_back_and_never_touches_an_ended_session(
    store: IdentityStore,
) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
    await store.touch_session(record.id, T0 + timedelta(minutes=10))
    async with store.unit_of_work() as uow:
        rotated = await uow.rotate_refresh_token(record.id, 0, T0 + timedelta(minutes=5))
    assert rotated is not None
    assert rotated.last_seen_at == T0 + timedelta(minutes=10)
    assert rotated.refreshed_at == T0 + timedelta(minutes=5)
    async with store.unit_of_work() as uow:
        await uow.end_session(
            record.id, T0 + timedelta(minutes=11), "sign_out", idle_cutoff=SEEN_BEFORE
        )
        assert await uow.rotate_refresh_token(record.id, 1, T0 + timedelta(minutes=12)) is None
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert found[0].refresh_generation == 1


async def test_a_unit_that_raises_rotates_nothing(store: IdentityStore) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            assert await uow.rotate_refresh_token(record.id, 0, T0) is not None
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    async with store.unit_of_work() as uow:
        assert await uow.get_session(record.id) == record


async def test_a_session_inserted_and_rotated_in_one_unit_commits_rotated(
    store: IdentityStore,
) -> None:
    record = session(await commit_account(store))
    async with store.unit_of_work() as uow:
        await uow.insert_session(record)
        rotated = await uow.rotate_refresh_token(record.id, 0, T0)
    found = await store.get_session_with_account(record.id)
    assert found is not None
    assert found[0] == rotated


# A command's outcome: its events and its idempotency record in one write


async def claim_all(store: IdentityStore) -> list[str]:
    """Publish every pending event; their ids, in outbox order."""
    async with store.claim_events(100) as batch:
        claimed = list(batch.events)
        batch.mark_published([e.seq for e in claimed])
    assert [e.seq for e in claimed] == sorted(e.seq for e in claimed)
    return [e.event_id for e in claimed]


async def test_outcome_writes_the_events_in_order_and_the_record(store: IdentityStore) -> None:
    await drain(store)
    # Ids that sort against the order given, so an outbox ordered by id would show it.
    new_events = [event(event_id=f"{unique('evt')}_{9 - n}") for n in range(3)]
    record = idempotency()
    async with store.unit_of_work() as uow:
        await uow.record_outcome(new_events, record)

    assert await store.get_idempotency(record.key) == record
    async with store.claim_events(10) as batch:
        claimed = list(batch.events)
        batch.mark_published([e.seq for e in claimed])
    assert [(e.event_id, e.type, e.body, e.created_at) for e in claimed] == [
        (e.event_id, e.type, e.body, e.created_at) for e in new_events
    ]
    assert [e.seq for e in claimed] == sorted(e.seq for e in claimed)


async def test_outcome_with_a_taken_key_is_rejected_and_leaves_no_events(
    store: IdentityStore,
) -> None:
    await drain(store)
    record = idempotency()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], record)

    with pytest.raises(DuplicateKeyError):
        async with store.unit_of_work() as uow:
            await uow.record_outcome([event(), event()], replace(record, fingerprint="other"))

    assert await store.get_idempotency(record.key) == record
    assert await store.outbox_backlog(T0) == (0, 0.0)


async def test_outcome_racing_on_one_key_commits_only_the_winners_events(
    store: IdentityStore,
) -> None:
    await drain(store)
    key = unique("key")
    events_of = [[event(), event()] for _ in range(2)]

    async def attempt(n: int) -> int:
        async with store.unit_of_work() as uow:
            await uow.record_outcome(events_of[n], idempotency(key=key, fingerprint=str(n)))
        return n

    results = await asyncio.gather(*(attempt(n) for n in range(2)), return_exceptions=True)
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1
    assert [type(r) for r in results if not isinstance(r, int)] == [DuplicateKeyError]
    stored = await store.get_idempotency(key)
    assert stored is not None
    assert stored.fingerprint == str(winners[0])
    assert await claim_all(store) == [e.event_id for e in events_of[winners[0]]]


async def test_outcome_without_a_record_writes_only_the_events(store: IdentityStore) -> None:
    await drain(store)
    new_events = [event(), event(type="session.started")]
    async with store.unit_of_work() as uow:
        await uow.record_outcome(new_events, None)
    assert await claim_all(store) == [e.event_id for e in new_events]


async def test_outcome_without_events_writes_only_the_record(store: IdentityStore) -> None:
    await drain(store)
    record = idempotency(reply={"ok": False, "fields": ("email",), "none": None})
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], record)
        await uow.record_outcome([], None)  # nothing to write: nothing happens

    stored = await store.get_idempotency(record.key)
    assert stored == replace(record, reply={"ok": False, "fields": ["email"], "none": None})
    assert await store.outbox_backlog(T0) == (0, 0.0)


# Outbox


async def commit_events(store: IdentityStore, count: int) -> list[str]:
    events = [event(created_at=T0 + timedelta(seconds=n)) for n in range(count)]
    async with store.unit_of_work() as uow:
        await uow.record_outcome(events, None)
    return [e.event_id for e in events]


async def test_events_are_claimed_oldest_first_until_published(store: IdentityStore) -> None:
    await drain(store)
    new_events = [event(), event(type="session.started")]
    async with store.unit_of_work() as uow:
        await uow.record_outcome(new_events, None)
    async with store.claim_events(10) as batch:
        claimed = list(batch.events)
        batch.mark_published([e.seq for e in claimed])
    async with store.claim_events(10) as batch:
        assert list(batch.events) == []

    assert [(e.event_id, e.type, e.body, e.created_at) for e in claimed] == [
        (e.event_id, e.type, e.body, e.created_at) for e in new_events
    ]
    assert claimed[0].seq < claimed[1].seq


async def test_events_left_unmarked_are_claimed_again(store: IdentityStore) -> None:
    await drain(store)
    ids = [await commit_events(store, 1) for _ in range(3)]
    async with store.claim_events(10) as batch:
        batch.mark_published([batch.events[1].seq])
    async with store.claim_events(10) as batch:
        assert [e.event_id for e in batch.events] == ids[0] + ids[2]


async def test_only_the_marked_prefix_of_a_command_is_published(store: IdentityStore) -> None:
    await drain(store)
    ids = await commit_events(store, 4)
    async with store.claim_events(10) as batch:
        # The third row without the second: published out of order, so not recorded.
        batch.mark_published([batch.events[0].seq, batch.events[2].seq])
    assert (await store.outbox_backlog(T0))[0] == 3
    async with store.claim_events(10) as batch:
        assert [e.event_id for e in batch.events] == ids[1:]


async def test_batch_that_raises_publishes_nothing(store: IdentityStore) -> None:
    await drain(store)
    ids = await commit_events(store, 2)

    async def doomed() -> None:
        async with store.claim_events(10) as batch:
            batch.mark_published([e.seq for e in batch.events])
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    async with store.claim_events(10) as batch:
        assert [e.event_id for e in batch.events] == ids


async def test_concurrent_batches_never_claim_the_same_command(store: IdentityStore) -> None:
    await drain(store)
    ids = [await commit_events(store, 1) for _ in range(5)]
    # A store that waited for the first batch's rows instead of skipping them would hang here.
    async with (
        asyncio.timeout(10),
        store.claim_events(2) as first,
        store.claim_events(10) as second,
    ):
        first_ids = [e.event_id for e in first.events]
        second_ids = [e.event_id for e in second.events]
    assert first_ids == ids[0] + ids[1]
    assert second_ids == ids[2] + ids[3] + ids[4]


async def test_a_command_is_claimed_whole_by_one_batch_at_a_time(store: IdentityStore) -> None:
    await drain(store)
    wide = await commit_events(store, 10)
    after = await commit_events(store, 1)
    async with (
        asyncio.timeout(10),
        store.claim_events(1, per_command=4) as first,
        store.claim_events(10) as second,
    ):
        # The second batch skips the whole command, not only the rows the first one took.
        assert [e.event_id for e in first.events] == wide[:4]
        assert [e.event_id for e in second.events] == after
        first.mark_published([e.seq for e in first.events])
        second.mark_published([e.seq for e in second.events])
    async with store.claim_events(10) as batch:  # the rest, once the first batch has ended
        assert [e.event_id for e in batch.events] == wide[4:]


async def test_a_command_is_claimed_again_from_its_first_unpublished_row(
    store: IdentityStore,
) -> None:
    await drain(store)
    ids = await commit_events(store, 4)
    async with store.claim_events(10) as batch:
        assert len({e.command_seq for e in batch.events}) == 1
        batch.mark_published([e.seq for e in batch.events[:2]])
    async with store.claim_events(10, per_command=1) as batch:
        assert [e.event_id for e in batch.events] == ids[2:3]


async def test_each_outcome_is_a_command_of_its_own(store: IdentityStore) -> None:
    await drain(store)
    first, second = [event(), event()], [event()]
    async with store.unit_of_work() as uow:
        await uow.record_outcome(first, None)
        await uow.record_outcome(second, None)
    async with store.claim_events(1) as batch:
        assert [e.event_id for e in batch.events] == [e.event_id for e in first]
        async with store.claim_events(1) as other:
            assert [e.event_id for e in other.events] == [e.event_id for e in second]
            assert other.events[0].command_seq != batch.events[0].command_seq


async def test_racing_relays_take_each_command_in_order_and_once(store: IdentityStore) -> None:
    await drain(store)
    sizes = [1, 7, 2, 12, 1, 1, 5, 3, 9, 1, 4, 1]
    committed = [await commit_events(store, size) for size in sizes]
    held: set[int] = set()
    taken: list[list[str]] = []

    async def relay() -> None:
        while True:
            async with store.claim_events(2, per_command=3) as batch:
                commands = {e.command_seq for e in batch.events}
                assert not commands & held, "two batches hold one command"
                held.update(commands)
                await asyncio.sleep(0)  # let the other relays claim meanwhile
                taken.append([e.event_id for e in batch.events])
                batch.mark_published([e.seq for e in batch.events])
                held.difference_update(commands)
            if not batch.events:
                return

    await asyncio.wait_for(asyncio.gather(*(relay() for _ in range(4))), timeout=30)
    claimed_order = [event_id for ids in taken for event_id in ids]
    assert sorted(claimed_order) == sorted(i for ids in committed for i in ids)
    for ids in committed:  # every command's events came out in order, whatever the batch
        assert [i for i in claimed_order if i in ids] == ids


async def test_events_of_an_open_unit_are_not_claimable(store: IdentityStore) -> None:
    await drain(store)
    async with store.unit_of_work() as uow:
        await uow.record_outcome([event()], None)
        async with store.claim_events(10) as batch:
            assert list(batch.events) == []
    async with store.claim_events(10) as batch:
        assert len(batch.events) == 1


async def test_duplicate_event_id_is_rejected(store: IdentityStore) -> None:
    first = event()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([first], None)
    with pytest.raises(StoreError):
        async with store.unit_of_work() as uow:
            await uow.record_outcome([event(event_id=first.event_id)], None)


async def test_backlog_counts_unpublished_rows_and_the_oldest_age(store: IdentityStore) -> None:
    await drain(store)
    assert await store.outbox_backlog(T0) == (0, 0.0)
    await commit_events(store, 3)
    async with store.claim_events(1) as batch:
        batch.mark_published([batch.events[0].seq])
    assert await store.outbox_backlog(T0 + timedelta(seconds=61)) == (2, 60.0)


# Purge, shared secrets, health


async def test_purge_deletes_only_what_is_old_enough(store: IdentityStore) -> None:
    cutoff = T0 - timedelta(days=1)
    old, young = T0 - timedelta(days=2), T0
    owner = await commit_account(store)
    old_key, young_key = idempotency(created_at=old), idempotency(created_at=young)
    expired = session(owner, created_at=old, last_seen_at=old, expires_at=old)
    ended = session(owner, expires_at=T0 + timedelta(days=9))
    live = session(owner, created_at=old, last_seen_at=old)
    await drain(store)
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], old_key)
        await uow.record_outcome([], young_key)
        for record in (expired, ended, live):
            await uow.insert_session(record)
        await uow.end_session(ended.id, old, "sign_out", idle_cutoff=SEEN_BEFORE)
        await uow.record_outcome(
            [event(created_at=old), event(created_at=old), event(created_at=young)], None
        )
    async with store.claim_events(2) as batch:
        batch.mark_published([batch.events[0].seq])
    counts = await store.purge(
        idempotency_before=cutoff,
        outbox_before=cutoff,
        throttle_before=cutoff,
        sessions_before=cutoff,
    )

    assert (counts.idempotency, counts.outbox, counts.sessions) >= (1, 1, 2)
    assert await store.get_idempotency(old_key.key) is None
    assert await store.get_idempotency(young_key.key) == young_key
    assert await store.get_session_with_account(expired.id) is None
    assert await store.get_session_with_account(ended.id) is None
    assert await store.get_session_with_account(live.id) is not None
    assert await store.outbox_backlog(young) == (2, 2 * 86400.0)


async def test_shared_secret_keeps_the_first_writers_value(store: IdentityStore) -> None:
    name = unique("signing")
    assert await store.shared_secret(name, b"first") == b"first"
    assert await store.shared_secret(name, b"second") == b"first"


async def test_racing_writers_of_a_shared_secret_agree(store: IdentityStore) -> None:
    name = unique("signing")
    candidates = [bytes([n]) * 32 for n in range(10)]
    secrets = await asyncio.gather(*(store.shared_secret(name, c) for c in candidates))
    assert len(set(secrets)) == 1
    assert secrets[0] in candidates


async def test_ping_answers_until_the_store_is_closed(store: IdentityStore) -> None:
    await store.ping()
    await store.close()
    with pytest.raises(TransientStoreError):
        await store.ping()
