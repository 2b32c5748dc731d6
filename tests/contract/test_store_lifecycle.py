"""What every IdentityStore promises for contract v2's lifecycle commands, on the in-memory
store and on PostgreSQL alike: what a session keeps of its client, pages of live sessions,
the account a reply or an event is about, and erasure with its tombstone.

Published outbox rows are out of the port's sight (only the relay reads the outbox), so the
erasure tests read them with `outbox_body`, which looks inside each implementation.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from stores import (
    ErasureCounts,
    IdentityStore,
    MemoryIdentityStore,
    PostgresIdentityStore,
    StoreError,
    ThrottleRules,
)
from stores.postgres import migrate
from stores.postgres.migrate import _CREATE_LEDGER, ensure_database, migration_files
from tests.contract.builders import SEEN_BEFORE, T0, account, event, idempotency, session, unique
from tests.contract.test_store_contract import Boom, commit_account, drain
from tests.support.eventually import eventually
from tests.support.postgres import lock_waiters

ERASED_REPLY: dict[str, Any] = {"ok": False, "error": {"code": "not_found", "message": "gone"}}
RULES = ThrottleRules()
SOURCE = b"source-tag"


async def outbox_body(store: IdentityStore, event_id: str) -> bytes | None:
    """The body of the outbox row of `event_id`, published or not; None if there is none."""
    if isinstance(store, MemoryIdentityStore):
        rows = [r for r in store._tables.outbox.values() if r.event.event_id == event_id]
        return rows[0].event.body if rows else None
    assert isinstance(store, PostgresIdentityStore)
    body = await store._pool.fetchval("SELECT body FROM outbox WHERE event_id = $1", event_id)
    return None if body is None else bytes(body)


async def publish_all(store: IdentityStore) -> None:
    async with store.claim_events(10_000) as batch:
        batch.mark_published([e.seq for e in batch.events])


def tag(email: str) -> bytes:
    """A stand-in for the keyed tag the throttle counts an email under (opaque to stores)."""
    return b"tag:" + email.encode()


async def erase(store: IdentityStore, account_id: str, email: str) -> ErasureCounts:
    async with store.unit_of_work() as uow:
        return await uow.erase_account(
            account_id,
            erased_at=T0 + timedelta(days=1),
            email_canonical=email,
            email_tag=tag(email),
            erased_reply=ERASED_REPLY,
        )


# What a session keeps of its client


async def test_a_session_keeps_the_client_it_was_opened_from(store: IdentityStore) -> None:
    owner = account()
    record = session(owner.id, client_ip="203.0.113.7", user_agent="laptop/1.0 (x11)")
    bare = session(owner.id)
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.insert_session(record)
        await uow.insert_session(bare)
    assert await store.get_session_with_account(record.id) == (record, owner)
    async with store.unit_of_work() as uow:
        assert await uow.get_session(bare.id) == bare
        ended = await uow.end_session(record.id, T0, "revoked", idle_cutoff=SEEN_BEFORE)
    assert ended == replace(record, ended_at=T0, end_reason="revoked")


# Pages of live sessions


async def test_only_live_sessions_of_the_account_are_listed_in_creation_order(
    store: IdentityStore,
) -> None:
    account_id, other_id = await commit_account(store), await commit_account(store)
    now = T0 + timedelta(hours=2)
    later, first, ended, expired, idle, others = (
        session(account_id, created_at=T0 + timedelta(minutes=20), last_seen_at=now),
        session(account_id, created_at=T0 + timedelta(minutes=10), last_seen_at=now),
        session(account_id, last_seen_at=now),
        session(account_id, expires_at=now, last_seen_at=now),
        session(account_id, last_seen_at=now - timedelta(minutes=30)),
        session(other_id, last_seen_at=now),
    )
    async with store.unit_of_work() as uow:
        for record in (later, first, ended, expired, idle, others):
            await uow.insert_session(record)
        await uow.end_session(ended.id, now, "sign_out", idle_cutoff=SEEN_BEFORE)

    listed = await store.list_live_sessions(
        account_id, now=now, idle_since=now - timedelta(minutes=30), after=None, limit=10
    )

    assert listed == [first, later]


async def test_a_page_starts_after_its_position_and_holds_at_most_the_limit(
    store: IdentityStore,
) -> None:
    account_id = await commit_account(store)
    # Two share a creation time: the id orders them.
    times = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]
    records = [session(account_id, created_at=t) for t in times]
    async with store.unit_of_work() as uow:
        for record in records:
            await uow.insert_session(record)
    ordered = sorted(records, key=lambda s: (s.created_at, s.id))

    async def page(after: tuple[Any, str] | None, limit: int) -> list[str]:
        found = await store.list_live_sessions(
            account_id, now=T0, idle_since=T0 - timedelta(hours=1), after=after, limit=limit
        )
        return [s.id for s in found]

    assert await page(None, 2) == [s.id for s in ordered[:2]]
    assert await page((ordered[1].created_at, ordered[1].id), 2) == [s.id for s in ordered[2:]]
    assert await page((ordered[3].created_at, ordered[3].id), 2) == []
    assert await page((ordered[0].created_at, ordered[0].id), 1) == [ordered[1].id]


async def test_an_unknown_account_has_no_sessions_to_list(store: IdentityStore) -> None:
    assert (
        await store.list_live_sessions(
            unique("acct"), now=T0, idle_since=T0 - timedelta(hours=1), after=None, limit=5
        )
        == []
    )


# The account a reply or an event is about


async def test_a_stored_reply_keeps_the_account_it_is_about(store: IdentityStore) -> None:
    about, anonymous = idempotency(account_id=unique("acct")), idempotency()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([], about)
        await uow.record_outcome([], anonymous)
    assert await store.get_idempotency(about.key) == about
    assert await store.get_idempotency(anonymous.key) == anonymous


# Erasure


async def test_erasure_removes_the_account_and_its_sessions_and_frees_its_email(
    store: IdentityStore,
) -> None:
    owner, neighbour = account(), account()
    records = [session(owner.id), session(owner.id, client_ip="192.0.2.1")]
    kept = session(neighbour.id)
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.insert_account(neighbour)
        for record in (*records, kept):
            await uow.insert_session(record)
        await uow.end_session(records[0].id, T0, "sign_out", idle_cutoff=SEEN_BEFORE)

    counts = await erase(store, owner.id, owner.email_canonical)

    assert counts.sessions == 2
    assert await store.get_account(owner.id) is None
    assert await store.get_account_by_email(owner.email_canonical) is None
    for record in records:
        assert await store.get_session_with_account(record.id) is None
    assert await store.get_session_with_account(kept.id) == (kept, neighbour)
    async with store.unit_of_work() as uow:
        assert await uow.get_session(records[1].id) is None
        await uow.insert_account(replace(owner, id=unique("acct")))  # the email is free


async def test_an_erased_id_is_never_inserted_again(store: IdentityStore) -> None:
    owner = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
    await erase(store, owner.id, owner.email_canonical)
    with pytest.raises(StoreError):
        async with store.unit_of_work() as uow:
            await uow.insert_account(replace(owner, email_canonical=unique("e") + "@example.com"))
    assert await store.get_account(owner.id) is None


async def test_erasing_an_erased_or_unknown_id_finds_nothing_to_erase(
    store: IdentityStore,
) -> None:
    account_id = await commit_account(store)
    await erase(store, account_id, unique("nobody"))
    nothing = ErasureCounts(sessions=0, replies=0, events_dropped=0, events_scrubbed=0, throttle=0)
    assert await erase(store, account_id, unique("nobody")) == nothing
    assert await erase(store, unique("acct"), unique("nobody")) == nothing


async def test_erasure_blanks_the_replies_about_the_account_and_keeps_their_keys(
    store: IdentityStore,
) -> None:
    account_id, other_id = await commit_account(store), await commit_account(store)
    about = [idempotency(account_id=account_id) for _ in range(2)]
    others = [idempotency(account_id=other_id), idempotency()]
    async with store.unit_of_work() as uow:
        for record in (*about, *others):
            await uow.record_outcome([], record)

    counts = await erase(store, account_id, unique("nobody"))

    assert counts.replies == 2
    for record in about:
        assert await store.get_idempotency(record.key) == replace(record, reply=ERASED_REPLY)
    for record in others:
        assert await store.get_idempotency(record.key) == record


async def test_erasure_drops_pending_events_and_cuts_published_ones_to_id_and_type(
    store: IdentityStore,
) -> None:
    await drain(store)
    account_id, other_id = await commit_account(store), await commit_account(store)
    published = [event(account_id=account_id), event(type="session.started", account_id=account_id)]
    pending = event(account_id=account_id, body=b'{"secret":"personal"}')
    neighbours = [event(account_id=other_id), event()]
    async with store.unit_of_work() as uow:
        await uow.record_outcome(published, None)
    await publish_all(store)
    async with store.unit_of_work() as uow:
        await uow.record_outcome([pending, *neighbours], None)

    counts = await erase(store, account_id, unique("nobody"))

    assert (counts.events_dropped, counts.events_scrubbed) == (1, 2)
    for gone in published:
        body = await outbox_body(store, gone.event_id)
        assert body is not None
        assert orjson.loads(body) == {"event_id": gone.event_id, "type": gone.type, "erased": True}
    assert await outbox_body(store, pending.event_id) is None
    async with store.claim_events(100) as batch:
        assert [e.event_id for e in batch.events] == [e.event_id for e in neighbours]
        assert [e.body for e in batch.events] == [e.body for e in neighbours]
        batch.mark_published([e.seq for e in batch.events])


async def pending_commands(store: IdentityStore) -> dict[int, int] | None:
    """PostgreSQL's `outbox_pending` as {command: next_seq}; None on the in-memory store,
    where what is left of a command is its unpublished rows themselves."""
    if not isinstance(store, PostgresIdentityStore):
        return None
    rows = await store._pool.fetch("SELECT command_seq, next_seq FROM outbox_pending")
    return {row["command_seq"]: row["next_seq"] for row in rows}


async def test_erasure_leaves_what_is_left_of_each_command_to_publish_in_order(
    store: IdentityStore,
) -> None:
    await drain(store)
    account_id, other_id = await commit_account(store), await commit_account(store)
    # A command whose first rows are the erased account's, then another account's; and one
    # of the erased account's alone, half published.
    mixed = [event(account_id=account_id) for _ in range(2)]
    mixed += [event(account_id=other_id) for _ in range(2)]
    alone = [event(account_id=account_id) for _ in range(2)]
    for events in (mixed, alone):
        async with store.unit_of_work() as uow:
            await uow.record_outcome(events, None)
    async with store.claim_events(10, per_command=1) as batch:
        first = {e.event_id: e for e in batch.events}
        batch.mark_published([first[alone[0].event_id].seq])  # a relay got this far
    mixed_command = first[mixed[0].event_id].command_seq

    counts = await erase(store, account_id, unique("nobody"))

    assert (counts.events_dropped, counts.events_scrubbed) == (3, 1)
    claimed = []
    for _ in range(3):
        async with store.claim_events(10, per_command=1) as batch:
            claimed.append([e.event_id for e in batch.events])
            if batch.events:
                assert batch.events[0].command_seq == mixed_command
            batch.mark_published([e.seq for e in batch.events])
    # The other account's rows, one claim each, in order; nothing of the erased one.
    assert claimed == [[mixed[2].event_id], [mixed[3].event_id], []]
    assert await store.outbox_backlog(T0) == (0, 0.0)


async def test_erasure_moves_a_command_on_to_its_first_row_left_or_finishes_it(
    pg_store: PostgresIdentityStore,
) -> None:
    """What the claim reads of a command (PostgreSQL's `outbox_pending`) follows the erasure:
    the command starts at its first row left, and one left with none is finished."""
    store: IdentityStore = pg_store
    await drain(store)
    account_id, other_id = await commit_account(store), await commit_account(store)
    mixed = [event(account_id=account_id), event(account_id=other_id)]
    alone = [event(account_id=account_id)]
    for events in (mixed, alone):
        async with store.unit_of_work() as uow:
            await uow.record_outcome(events, None)
    before = await pending_commands(store)
    assert before is not None
    [mixed_command, alone_command] = sorted(before)

    await erase(store, account_id, unique("nobody"))

    async with store.claim_events(10) as batch:
        left = list(batch.events)
    assert [e.event_id for e in left] == [mixed[1].event_id]
    assert await pending_commands(store) == {mixed_command: left[0].seq}
    assert alone_command not in (await pending_commands(store) or {})
    await drain(store)
    assert await pending_commands(store) == {}


async def test_erasure_forgets_the_throttle_rows_of_its_key_only(store: IdentityStore) -> None:
    owner = account()
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
    other = unique("other") + "@example.com"
    for email in (owner.email_canonical, other):
        await store.reserve_password_attempt(tag(email), SOURCE, T0, RULES)

    counts = await erase(store, owner.id, owner.email_canonical)

    # The (email, source) counter and the email's counter.
    assert counts.throttle == 2
    # Counted from one again for the erased email; the other keeps its count.
    again = await store.reserve_password_attempt(tag(owner.email_canonical), SOURCE, T0, RULES)
    assert (again.failures, again.email_failures) == (1, 1)
    other_again = await store.reserve_password_attempt(tag(other), SOURCE, T0, RULES)
    assert (other_again.failures, other_again.email_failures) == (2, 2)


async def test_writes_before_the_erasure_in_its_unit_go_with_it_and_later_ones_stay(
    store: IdentityStore,
) -> None:
    await drain(store)
    owner = account()
    opened = session(owner.id)
    before_reply, after_reply = idempotency(account_id=owner.id), idempotency(account_id=owner.id)
    before_event, after_event = event(account_id=owner.id), event(account_id=owner.id)
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.insert_session(opened)
        await uow.record_outcome([before_event], before_reply)
        counts = await uow.erase_account(
            owner.id,
            erased_at=T0,
            email_canonical=owner.email_canonical,
            email_tag=tag(owner.email_canonical),
            erased_reply=ERASED_REPLY,
        )
        assert await uow.get_account(owner.id) is None
        assert await uow.get_session(opened.id) is None
        await uow.record_outcome([after_event], after_reply)

    assert counts == ErasureCounts(
        sessions=1, replies=1, events_dropped=1, events_scrubbed=0, throttle=0
    )
    assert await store.get_idempotency(before_reply.key) == replace(
        before_reply, reply=ERASED_REPLY
    )
    assert await store.get_idempotency(after_reply.key) == after_reply
    async with store.claim_events(100) as batch:
        assert [e.event_id for e in batch.events] == [after_event.event_id]
        batch.mark_published([e.seq for e in batch.events])


async def test_an_erasure_in_a_unit_that_raises_erases_nothing(store: IdentityStore) -> None:
    owner = account()
    record = session(owner.id, user_agent="kept/1.0")
    reply = idempotency(account_id=owner.id)
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.insert_session(record)
        await uow.record_outcome([], reply)

    async def doomed() -> None:
        async with store.unit_of_work() as uow:
            await uow.erase_account(
                owner.id,
                erased_at=T0,
                email_canonical=owner.email_canonical,
                email_tag=tag(owner.email_canonical),
                erased_reply=ERASED_REPLY,
            )
            raise Boom

    with pytest.raises(Boom):
        await doomed()
    assert await store.get_account(owner.id) == owner
    assert await store.get_session_with_account(record.id) == (record, owner)
    assert await store.get_idempotency(reply.key) == reply
    async with store.unit_of_work() as uow:  # no tombstone either
        assert await uow.get_account(owner.id) == owner


# PostgreSQL only: a relay holding the account's command while the erasure runs


@pytest.mark.parametrize("published", [True, False], ids=["relay-publishes", "relay-fails"])
async def test_erasure_waits_for_a_relay_holding_the_rows_then_scrubs_or_drops_them(
    pg_store: PostgresIdentityStore, pg_dsn: str, published: bool
) -> None:
    store: IdentityStore = pg_store
    await drain(store)
    owner = account()
    held = event(account_id=owner.id, body=b'{"email":"held@example.com"}')
    async with store.unit_of_work() as uow:
        await uow.insert_account(owner)
        await uow.record_outcome([held], None)
    observer = await asyncpg.connect(pg_dsn)
    try:
        async with store.claim_events(10) as batch:
            assert [e.event_id for e in batch.events] == [held.event_id]
            # A relay holds a whole command by its row in outbox_pending.
            relay_pid = await observer.fetchval(
                "SELECT pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " WHERE c.relname = 'outbox_pending' AND l.mode = 'RowShareLock' AND pid <> $1",
                await observer.fetchval("SELECT pg_backend_pid()"),
            )
            assert relay_pid is not None
            erasing = asyncio.create_task(erase(store, owner.id, owner.email_canonical))
            await eventually(
                lambda: lock_waiters(observer, relay_pid),
                timeout=10,
                what="the erasure waiting for the relay's hold on the command",
            )
            if published:
                batch.mark_published([e.seq for e in batch.events])
        counts = await erasing
        # Nothing is left to publish of the command, and nothing says otherwise.
        pending = await observer.fetchval(
            "SELECT count(*) FROM outbox_pending WHERE command_seq = $1",
            batch.events[0].command_seq,
        )
    finally:
        await observer.close()

    assert pending == 0
    assert await store.outbox_backlog(T0) == (0, 0.0)
    body = await outbox_body(store, held.event_id)
    if published:
        assert (counts.events_dropped, counts.events_scrubbed) == (0, 1)
        assert body is not None
        assert b"held@example.com" not in body
    else:
        assert (counts.events_dropped, counts.events_scrubbed) == (1, 0)
        assert body is None


async def test_the_migration_names_the_account_of_replies_and_events_written_before_it(
    pg_scratch_dsn: str,
) -> None:
    """Rows written by a worker before migration 0006 must be found by erasure too."""
    await ensure_database(pg_scratch_dsn)
    conn = await asyncpg.connect(pg_scratch_dsn)
    try:
        await conn.execute(_CREATE_LEDGER)
        for name, text in migration_files():
            if name < "0006":
                await conn.execute(text)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        account_of = {
            "account": {"result": {"account": {"id": "acct_a", "email": "a@example.com"}}},
            "account_id": {"result": {"account_id": "acct_b", "sessions_ended": 1}},
            "session": {"result": {"session": {"id": "ses_1", "account_id": "acct_c"}}},
            "none": {"result": {"session_id": "ses_2"}},
        }
        for key, reply in account_of.items():
            await conn.execute(
                "INSERT INTO idempotency VALUES ($1, 'c', 'f', $2::jsonb, now())",
                key,
                orjson.dumps({"ok": True, **reply}).decode(),
            )
        await conn.execute(
            "INSERT INTO idempotency VALUES ('failed', 'c', 'f', $1::jsonb, now())",
            '{"ok": false, "error": {"code": "email_taken", "message": "m"}}',
        )
        for event_id, data in [
            ("e1", {"account": {"id": "acct_a"}}),
            ("e2", {"account_id": "acct_b", "reason": "sign_out"}),
            ("e3", {"session": {"id": "ses_1", "account_id": "acct_c"}}),
            ("e4", {"other": 1}),
        ]:
            await conn.execute(
                "INSERT INTO outbox (event_id, type, body, created_at) VALUES ($1, 't', $2, now())",
                event_id,
                orjson.dumps({"event_id": event_id, "data": data}),
            )
    finally:
        await conn.close()

    assert await migrate(pg_scratch_dsn) == [n for n, _ in migration_files() if n >= "0006"]

    conn = await asyncpg.connect(pg_scratch_dsn)
    try:
        replies = dict(await conn.fetch("SELECT key, account_id FROM idempotency"))
        events = dict(await conn.fetch("SELECT event_id, account_id FROM outbox"))
    finally:
        await conn.close()
    assert replies == {
        "account": "acct_a",
        "account_id": "acct_b",
        "session": "acct_c",
        "none": None,
        "failed": None,
    }
    assert events == {"e1": "acct_a", "e2": "acct_b", "e3": "acct_c", "e4": None}
