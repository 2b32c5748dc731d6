"""The worker's pipeline in this process (decode, service, reply, ack, outbox relay), built by
`worker.bootstrap.build()` on the in-memory store, run once on the in-memory broker double
and once on RabbitMQ (the `broker` fixture): callers see the same on both."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from client import IdentityClient
from messages.events import parse_event
from messages.topology import EVENTS_EXCHANGE
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.pipeline import Broker
from worker.app import Worker


def _email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def _password() -> str:
    return f"Pipeline-{uuid.uuid4().hex[:12]}-lantern"


def _create(email: str, password: str) -> dict[str, Any]:
    return {"email": email, "password": password, "display_name": "Ada"}


async def test_an_account_is_created_signed_in_and_verified_through_the_client(
    broker: Broker, pipeline_worker: Worker, bus: Bus
) -> None:
    email, password = _email("client"), _password()
    connection = await broker.connect()
    try:
        async with IdentityClient(connection, timeout=30) as client:  # direct reply-to
            created = (await client.create_account(email, password, "Ada")).account
            started = await client.start_session(email, password)
            verified = await client.verify_session(started.token.get_secret_value())
    finally:
        await connection.close()

    assert created.email == email
    assert verified.account.id == created.id
    assert verified.session.id == started.session.id
    events = await eventually(
        lambda: len(_events_about(bus, created.id)) == 2 and _events_about(bus, created.id),
        what="account.created and session.started",
    )
    assert sorted(event["type"] for event in events) == ["account.created", "session.started"]
    assert password not in str(events)


def _events_about(bus: Bus, account_id: str) -> list[dict[str, Any]]:
    return [event for event in bus.events if account_id in orjson.dumps(event).decode()]


async def test_a_replayed_key_gets_the_same_reply_and_no_second_event(bus: Bus) -> None:
    key = uuid.uuid4().hex
    payload = _create(_email("replay"), _password())

    first = await bus.call("account.create", payload, key=key)
    again = await bus.call("account.create", payload, key=key)
    marker = await bus.call("account.create", _create(_email("marker"), _password()))

    assert first["ok"] is True, first
    assert again == first
    # Events leave in commit order: once the later command's is here, a second one of the
    # replayed key would be too.
    await eventually(lambda: bus.events_caused_by(marker["idempotency_key"]), what="the marker")
    assert [event["type"] for event in bus.events_caused_by(key)] == ["account.created"]


async def test_a_body_that_is_not_json_is_answered_and_dead_lettered_without_it(bus: Bus) -> None:
    password = _password()
    body = b'{"idempotency_key": "k", "payload": {"password": "' + password.encode() + b'"'

    reply = await bus.reply(await bus.publish("account.create", body))

    assert reply["ok"] is False
    assert reply["error"]["code"] == "malformed_message"
    dead = await eventually(
        lambda: [d for d in bus.dead if d["body_bytes"] == len(body)], what="the dead letter"
    )
    assert dead[0]["reason"] == "malformed_json"
    assert dead[0]["body"] is None
    assert password not in str(reply) + str(dead)


async def test_a_body_of_another_content_type_is_refused_unread(bus: Bus) -> None:
    reply = await bus.reply(await bus.publish("account.get", b"<get/>", content_type="text/xml"))

    assert reply["ok"] is False
    assert reply["error"]["code"] == "malformed_message"
    await eventually(
        lambda: any(d["reason"] == "wrong_content_type" for d in bus.dead), what="a dead letter"
    )


async def test_an_invalid_payload_is_answered_with_its_fields_and_key(bus: Bus) -> None:
    key = uuid.uuid4().hex
    password = _password()

    reply = await bus.call("session.start", {"email": 7, "password": password}, key=key)

    assert reply["ok"] is False
    assert reply["idempotency_key"] == key
    assert reply["error"]["code"] == "validation_failed"
    assert [f["field"] for f in reply["error"]["fields"]] == ["payload.email"]
    assert password not in str(reply)


async def test_an_unknown_command_is_answered_through_the_alternate_exchange(bus: Bus) -> None:
    reply = await bus.call("account.erase", {"account_id": "acct_" + "0" * 26})

    assert reply["ok"] is False
    assert reply["error"]["code"] == "unknown_command"


async def test_the_relay_publishes_events_with_their_type_id_and_persistence(
    bus: Bus, connection: AbstractRobustConnection
) -> None:
    channel = await connection.channel()
    events = await channel.declare_queue(exclusive=True)
    await events.bind(await channel.get_exchange(EVENTS_EXCHANGE), "account.created")

    created = await bus.call("account.create", _create(_email("relay"), _password()))
    account_id = created["result"]["account"]["id"]

    async def published() -> AbstractIncomingMessage | None:
        message = await events.get(no_ack=True, fail=False)
        found = message is not None and account_id.encode() in message.body
        return message if found else None

    message = await eventually(published, what="the account.created event")
    event = parse_event(message.body)
    assert event.type == "account.created"
    assert event.causation_id == created["idempotency_key"]
    assert (message.routing_key, message.type) == (event.type, event.type)
    assert message.message_id == event.event_id
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
