"""The client library against a real worker: typed results, typed errors, safe retries, and
the event subscriber with de-duplication."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import orjson
import pytest

from client import IdentityClient, subscribe
from client.errors import (
    EmailTaken,
    IdempotencyKeyReused,
    InvalidCredentials,
    InvalidToken,
    NotFound,
    SessionExpired,
    VersionConflict,
)
from messages import Event
from messages.topology import EVENTS_EXCHANGE
from tests.integration.scenarios import Person
from tests.support.eventually import eventually
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(amqp_url: str, worker: WorkerProcess) -> AsyncIterator[IdentityClient]:
    async with IdentityClient.connect(amqp_url, timeout=15) as opened:
        yield opened


async def test_every_method_returns_its_typed_result(client: IdentityClient) -> None:
    ada = Person.new("client")
    account = (await client.create_account(ada.email, ada.password, ada.display_name)).account
    assert (await client.get_account(account.id)).account == account
    renamed = await client.update_account(account.id, 1, display_name="Countess")
    assert renamed.account.version == 2
    started = await client.start_session(ada.email, ada.password)
    token = started.token.get_secret_value()
    assert (await client.verify_session(token)).session.id == started.session.id
    assert (await client.end_session(token)).session_id == started.session.id
    await client.start_session(ada.email, ada.password)
    changed = await client.change_password(account.id, ada.password, ada.password + " anew")
    assert changed.sessions_ended == 1
    again = await client.start_session(ada.email, ada.password + " anew")
    ended = await client.end_all_sessions(account.id)
    assert ended.sessions_ended == 1
    with pytest.raises(SessionExpired):
        await client.verify_session(again.token)


async def test_error_replies_raise_their_typed_errors(client: IdentityClient) -> None:
    ada = Person.new("client-errors")
    account = (await client.create_account(ada.email, ada.password, ada.display_name)).account
    with pytest.raises(EmailTaken):
        await client.create_account(ada.email.upper(), ada.password, "Twin")
    with pytest.raises(InvalidCredentials):
        await client.start_session(ada.email, "not the password at all")
    with pytest.raises(NotFound):
        await client.get_account("acct_" + "0" * 26)
    with pytest.raises(VersionConflict):
        await client.update_account(account.id, 7, display_name="Late")
    with pytest.raises(InvalidToken):
        await client.verify_session("v1.test-k1.ses_" + "a" * 32 + ".forged")
    key = uuid.uuid4().hex
    await client.end_all_sessions(account.id, idempotency_key=key)
    with pytest.raises(IdempotencyKeyReused) as reused:
        await client.update_account(account.id, 1, display_name="Other", idempotency_key=key)
    assert reused.value.code == "idempotency_key_reused"


async def test_a_retry_after_a_timeout_reuses_the_key_and_takes_effect_once(
    amqp_url: str, pg_dsn: str, worker: WorkerProcess
) -> None:
    ada = Person.new("client-retry")
    replays_before = _replays(worker, "account.create")
    # A reply window far shorter than an argon2 hash: the first attempt times out and the
    # client sends the same command again under the same idempotency key.
    async with IdentityClient.connect(amqp_url, timeout=0.005, retries=200) as impatient:
        created = await impatient.create_account(ada.email, ada.password, ada.display_name)
    connection = await asyncpg.connect(pg_dsn)
    try:
        rows = await connection.fetch(
            "SELECT id FROM accounts WHERE email_canonical = $1", ada.email.lower()
        )
    finally:
        await connection.close()
    assert [row["id"] for row in rows] == [created.account.id]
    # The retries really happened, and the worker answered them from the stored reply. The
    # client returns on the first reply; copies taken before the first commit are still hashing
    # then, and are answered from the stored reply once they find it: wait for one of them.
    await eventually(
        lambda: _replays(worker, "account.create") > replays_before, what="a replay counted"
    )


def _replays(worker: WorkerProcess, command: str) -> float:
    prefix = f'identity_idempotent_replays_total{{command="{command}"}} '
    for line in worker.metrics().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def test_subscriber_yields_each_event_once_even_when_it_is_published_twice(
    amqp_url: str, client: IdentityClient
) -> None:
    queue = f"test.subscriber.{uuid.uuid4().hex[:8]}"
    seen: list[Event] = []
    ready = asyncio.Event()

    async def consume() -> None:
        events = subscribe(amqp_url, "account.created", queue=queue)
        ready.set()
        async for event in events:
            seen.append(event)

    task = asyncio.create_task(consume())
    await ready.wait()
    await _wait_for_queue(amqp_url, queue)
    ada = Person.new("subscriber")
    account = (await client.create_account(ada.email, ada.password, ada.display_name)).account
    original = await _wait_for_event(seen, account.id)
    await _republish(amqp_url, original)  # what a relay does after a crash: same event_id
    marker = Person.new("subscriber-marker")
    later = (await client.create_account(marker.email, marker.password, "Marker")).account
    await _wait_for_event(seen, later.id)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ids = [event.event_id for event in seen]
    assert ids.count(original.event_id) == 1
    assert all(event.type == "account.created" for event in seen)


async def _wait_for_queue(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)

    async def declared() -> bool:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return True

    try:
        await eventually(declared, timeout=10, every=0.1, what=f"subscriber queue {queue}")
    finally:
        await connection.close()


async def _wait_for_event(seen: list[Event], account_id: str) -> Event:
    def created() -> Event | None:
        for event in seen:
            if event.type == "account.created" and event.data.account.id == account_id:
                return event
        return None

    event = await eventually(created, timeout=15, what=f"account.created for {account_id}")
    assert event is not None
    return event


async def _republish(amqp_url: str, event: Event) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        body = orjson.dumps(event.model_dump(mode="json"))
        await exchange.publish(
            aio_pika.Message(body, content_type="application/json", message_id=event.event_id),
            routing_key=event.type,
        )
    finally:
        await connection.close()
