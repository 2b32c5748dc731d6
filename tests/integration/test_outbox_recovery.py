"""An event is published if and only if its change committed, even when the worker dies
between the two."""

from __future__ import annotations

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractConnection

from messages.topology import EVENTS_EXCHANGE
from tests.integration.conftest import Isolated
from tests.integration.scenarios import (
    Person,
    assert_free_of,
    call_ok,
    key,
    sign_in,
    sign_up,
    wait_for_log,
)
from tests.support.eventually import eventually

pytestmark = pytest.mark.integration

BLOCKER = "test.events-blocker"


async def _block_events(amqp_url: str) -> AbstractConnection:
    """Make the broker refuse every event: a queue bound to all of identity.events that
    holds nothing and rejects what would overflow it, so each publish is nacked."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    events = await channel.get_exchange(EVENTS_EXCHANGE)
    blocker = await channel.declare_queue(
        BLOCKER, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await blocker.bind(events, "#")
    return connection


async def _unblock_events(connection: AbstractConnection) -> None:
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(BLOCKER)


async def _unpublished(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT event_id FROM outbox WHERE published_at IS NULL ORDER BY seq")
    return [row["event_id"] for row in rows]


async def _wait_until_all_published(db: asyncpg.Connection, timeout: float = 30.0) -> None:
    async def none_left() -> bool:
        return not await _unpublished(db)

    await eventually(none_left, timeout=timeout, every=0.1, what="every outbox row published")


async def test_events_committed_before_the_worker_was_killed_are_published_by_the_next(
    isolated: Isolated,
) -> None:
    """Deterministic "committed, not yet published, then the process dies":

    1. On a vhost and database of the test's own, a queue bound to every event type refuses
       all messages (max length 0, reject-publish), so the broker nacks each event the relay
       publishes; the relay keeps those rows unpublished and retries them at each poll.
       Replies go through the default exchange and are not affected.
    2. Commands commit through the worker: their replies arrive, and the outbox holds their
       events, all unpublished (checked in the database).
    3. The worker is killed with SIGKILL: nothing flushes, nothing is cleaned up.
    4. The blocker goes; a capture queue is bound (after the kill, so it can only receive what
       a later relay publishes); a new worker starts. Every row of step 2 is published by it,
       with the event_id it was committed with, and marked published.
    """
    first = isolated.start()
    caller = await isolated.bus()
    blocker = await _block_events(isolated.amqp_url)
    person = Person.new("outbox")
    account = await sign_up(caller, person)
    started = await sign_in(caller, person)
    update = {"account_id": account["id"], "expected_version": 1, "display_name": "Survivor"}
    await call_ok(caller, "account.update", update, key("survive"))
    db = await asyncpg.connect(isolated.database_url)
    try:
        committed = await _unpublished(db)
        assert len(committed) == 3  # account.created, session.started, account.updated
        # The relay did try, and was refused: the rows stay for the next relay.
        await wait_for_log(first, "events not confirmed")

        first.kill()
        await _unblock_events(blocker)
        capture = await isolated.bus()
        isolated.start()

        await capture.wait_for(
            lambda: set(committed) <= {e["event_id"] for e in capture.events}, timeout=30
        )
        await _wait_until_all_published(db)
    finally:
        await db.close()
    republished = {e["event_id"]: e for e in capture.events if e["event_id"] in committed}
    assert sorted(e["type"] for e in republished.values()) == [
        "account.created",
        "account.updated",
        "session.started",
    ]
    for event in republished.values():
        assert event["data"]
        assert_free_of(event, person.password, started["token"])
