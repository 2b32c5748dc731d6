"""At-least-once in, effectively-once out: duplicates of one command (same key, same payload),
one after another or racing on one or two workers, get one reply, one effect, one set of events.

"One effect" is checked in the database the worker commits to (accounts and outbox rows of the
key); "one set of events" on identity.events: every event of the key carries one event_id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.integration.scenarios import (
    Person,
    call_error,
    call_ok,
    events_caused_by,
    key,
    sign_up,
)
from tests.support.bus import Bus
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration


async def _accounts_with_email(db: asyncpg.Connection, email: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM accounts WHERE email_canonical = lower($1)", email
    )
    return count


async def _outbox_events_of(db: asyncpg.Connection, idempotency_key: str) -> list[str]:
    rows = await db.fetch(
        "SELECT event_id FROM outbox"
        " WHERE convert_from(body, 'UTF8')::jsonb ->> 'causation_id' = $1 ORDER BY seq",
        idempotency_key,
    )
    return [row["event_id"] for row in rows]


async def _same_command_at_once(
    bus: Bus, command: str, payload: dict[str, Any], idempotency_key: str, copies: int
) -> list[dict[str, Any]]:
    correlation_ids = await asyncio.gather(
        *(bus.command(command, payload, idempotency_key) for _ in range(copies))
    )
    return list(await asyncio.gather(*(bus.reply(cid) for cid in correlation_ids)))


async def _commands_handled(worker: WorkerProcess, command: str) -> float:
    total = 0.0
    for line in worker.metrics().splitlines():
        if line.startswith(f'identity_commands_total{{command="{command}"'):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_duplicate_delivery_gets_the_same_reply_and_takes_effect_once(
    bus: Bus, db: asyncpg.Connection
) -> None:
    person = Person.new("dup")
    dup_key = key("dup")

    first = await bus.reply(await bus.command("account.create", person.create_payload(), dup_key))
    second = await bus.reply(await bus.command("account.create", person.create_payload(), dup_key))

    assert first["ok"] is True
    assert second == first
    assert await _accounts_with_email(db, person.email) == 1
    [event_id] = await _outbox_events_of(db, dup_key)
    [event] = await events_caused_by(bus, dup_key, 1)
    assert event["event_id"] == event_id


async def test_a_duplicate_of_a_refused_command_gets_the_same_refusal(bus: Bus) -> None:
    person = Person.new("dupfail")
    await sign_up(bus, person)
    again = Person(person.email, person.password, "Again")
    refused_key = key("dupfail")

    first = await call_error(bus, "account.create", again.create_payload(), refused_key)
    second = await call_error(bus, "account.create", again.create_payload(), refused_key)

    assert first["code"] == "email_taken"
    assert second == first


async def test_ten_concurrent_duplicates_get_one_reply_one_effect_one_event(
    bus: Bus, db: asyncpg.Connection
) -> None:
    person = Person.new("ten")
    ten_key = key("ten")

    replies = await _same_command_at_once(
        bus, "account.create", person.create_payload(), ten_key, 10
    )

    assert replies[0]["ok"] is True
    assert all(reply == replies[0] for reply in replies)
    assert await _accounts_with_email(db, person.email) == 1
    [event_id] = await _outbox_events_of(db, ten_key)
    [event] = await events_caused_by(bus, ten_key, 1)
    assert event["event_id"] == event_id
    assert {e["event_id"] for e in bus.events_caused_by(ten_key)} == {event_id}


async def test_duplicates_racing_on_two_workers_get_one_reply_one_effect_one_event(
    bus: Bus,
    db: asyncpg.Connection,
    worker: WorkerProcess,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    second_worker = start_worker()
    person = Person.new("two")
    two_key = key("two")
    before = await _commands_handled(worker, "account.create")

    replies = await _same_command_at_once(
        bus, "account.create", person.create_payload(), two_key, 20
    )

    # Both workers took some of the copies: the race really was between two processes.
    assert await _commands_handled(worker, "account.create") > before
    assert await _commands_handled(second_worker, "account.create") > 0
    assert replies[0]["ok"] is True
    assert all(reply == replies[0] for reply in replies)
    assert await _accounts_with_email(db, person.email) == 1
    [event_id] = await _outbox_events_of(db, two_key)
    [event] = await events_caused_by(bus, two_key, 1)
    assert event["event_id"] == event_id


async def test_concurrent_duplicate_sign_ins_start_one_session(
    bus: Bus, db: asyncpg.Connection
) -> None:
    person = Person.new("racestart")
    account = await sign_up(bus, person)
    start_key = key("racestart")

    replies = await _same_command_at_once(bus, "session.start", person.credentials(), start_key, 10)

    assert replies[0]["ok"] is True
    assert all(reply == replies[0] for reply in replies)
    sessions = await db.fetchval(
        "SELECT count(*) FROM sessions WHERE account_id = $1", account["id"]
    )
    assert sessions == 1
    assert len(await _outbox_events_of(db, start_key)) == 1


async def test_a_reused_key_with_another_payload_is_refused_and_changes_nothing(
    bus: Bus, db: asyncpg.Connection
) -> None:
    first, second = Person.new("keyed"), Person.new("otherpayload")
    reused = key("reused")
    await call_ok(bus, "account.create", first.create_payload(), reused)

    other_payload = await call_error(bus, "account.create", second.create_payload(), reused)
    other_command = await call_error(bus, "session.start", first.credentials(), reused)

    assert other_payload["code"] == "idempotency_key_reused"
    assert other_command["code"] == "idempotency_key_reused"
    assert await _accounts_with_email(db, second.email) == 0
    assert len(await _outbox_events_of(db, reused)) == 1


async def test_a_changed_password_under_the_same_key_is_another_payload(bus: Bus) -> None:
    person = Person.new("pwdiff")
    await sign_up(bus, person)
    start_key = key("pwdiff")
    await call_ok(bus, "session.start", person.credentials(), start_key)

    retry = {"email": person.email, "password": f"{person.password}-typo"}
    error = await call_error(bus, "session.start", retry, start_key)

    assert error["code"] == "idempotency_key_reused"


async def test_replayed_start_returns_the_same_token(bus: Bus, db: asyncpg.Connection) -> None:
    person = Person.new("replay")
    await sign_up(bus, person)
    start_key = key("replay")

    first = await call_ok(bus, "session.start", person.credentials(), start_key)
    replayed = await call_ok(bus, "session.start", person.credentials(), start_key)

    assert replayed == first
    assert replayed["token"] == first["token"]
    verified = await call_ok(bus, "session.verify", {"token": replayed["token"]})
    assert verified["session"] == first["session"]
    assert len(await _outbox_events_of(db, start_key)) == 1
