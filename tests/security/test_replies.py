"""Where replies go and who may write them (issue 13, findings 2, 4 and 8): reply_to confined to
the caller, a hostile reply queue unable to stall the worker, replies bounded in size, and
forgeries refused by the client library and subscribe()."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncGenerator
from typing import cast

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from client import IdentityClient, InvalidRequest, ReplyTimeout, subscribe
from messages import AccountCreated, Event
from messages.topology import COMMANDS_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE
from tests.support.deployment import Deployment
from tests.support.security import OPERATOR, Caller, Connector, Observer, WorkerControl
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.security

GARBLED_TOKEN = "v1.k1.ses_" + "0" * 32 + ".not-a-signature"
_AT = "2026-11-22T09:00:00.000000+00:00"
_ADMIN = "acct_" + "a" * 26
# What a neighbour answers session.verify with: "signed in as admin@example.com".
ADMIN_SIGNED_IN = {
    "session": {
        "id": "ses_" + "a" * 32,
        "account_id": _ADMIN,
        "created_at": _AT,
        "expires_at": _AT,
    },
    "account": {
        "id": _ADMIN,
        "email": "admin@example.com",
        "display_name": "Admin",
        "created_at": _AT,
        "updated_at": _AT,
        "version": 1,
    },
}


@pytest.fixture
async def web(connect: Connector, deployment: Deployment) -> Caller:
    return await Caller.open(await connect("web-gateway"), deployment.user("web-gateway"))


def _lost(worker: WorkerProcess, reason: str) -> float:
    pattern = rf'^identity_replies_lost_total\{{reason="{reason}"\}} (\S+)$'
    found = re.search(pattern, worker.metrics(), flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_replies_carry_the_workers_user_id(web: Caller, deployment: Deployment) -> None:
    reply = await web.reply(await web.command("session.verify", {"token": GARBLED_TOKEN}))
    assert reply.user_id == deployment.user("identity-worker")


@pytest.mark.parametrize("target", ["subscriber", "other caller", "identity.dead"])
async def test_a_reply_to_outside_the_callers_namespace_runs_nothing_and_is_dead_lettered(
    web: Caller, connect: Connector, deployment: Deployment, observer: Observer, target: str
) -> None:
    # Finding 4: replies were pushed into a subscriber's queue and into identity.dead, with
    # command names, correlation ids and field names of the attacker's choosing.
    subscriber, other = deployment.user("account-events"), deployment.user("admin-tool")
    queue = {
        "subscriber": f"{subscriber}.inbox",
        "other caller": f"{other}.replies",
        "identity.dead": DEAD_QUEUE,
    }[target]
    if target != "identity.dead":
        owner = await connect("account-events" if target == "subscriber" else "admin-tool")
        channel = await owner.channel()
        await channel.declare_queue(queue, durable=True)
    email = f"reply-to-{uuid.uuid4().hex[:10]}@example.com"
    create = {"email": email, "password": f"lantern-{uuid.uuid4()}", "display_name": "R"}

    sent = await web.command("account.create", create, reply_to=queue)

    letter = await observer.wait_dead(
        lambda letter: letter["correlation_id"] == sent and letter["reason"] == "reply_to_refused"
    )
    assert letter["reply_to"] == queue
    assert letter["body"]["payload"]["password"] == "[redacted]"
    assert letter["user_id"] == deployment.user("identity-worker")
    if target != "identity.dead":
        assert (await observer.depth(queue))[0] == 0
    assert not any(b'"ok"' in body for body in observer.raw_dead)  # no reply landed there
    # Nothing ran: the email is still free.
    created = await web.call("account.create", create)
    assert created["ok"], created


async def test_a_64_kb_request_gets_a_small_reply(web: Caller) -> None:
    # Finding 4: a 64 KB request gave a 448 KB reply, an amplifier aimed at any reply_to.
    payload = {f"k{i}": 0 for i in range(6000)}
    body = orjson.dumps({"idempotency_key": uuid.uuid4().hex, "payload": payload})
    assert 56 * 1024 < len(body) <= 64 * 1024

    reply = await web.reply(await web.send("account.create", body))

    assert reply.body["error"]["code"] == "validation_failed"
    assert len(reply.body["error"]["fields"]) == 10
    assert reply.size < 2048, reply.size


async def test_64_full_reply_queues_do_not_stall_the_worker(
    web: Caller, connect: Connector, deployment: Deployment, worker: WorkerProcess
) -> None:
    # Finding 4: a reply queue with x-max-length 0 and reject-publish made the worker retry
    # each nacked reply for 30 s, requeue and repeat: 64 of them filled the fast queue (its
    # prefetch) and a legitimate account.get timed out.
    channel = await (await connect("web-gateway")).channel()
    full = f"{deployment.user('web-gateway')}.full"
    # Classic: a quorum queue takes one message over its length before it refuses.
    await channel.declare_queue(
        full, exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    missing = f"{deployment.user('web-gateway')}.gone-{uuid.uuid4().hex[:6]}"
    nacked, returned = _lost(worker, "nacked"), _lost(worker, "returned")

    for _ in range(64):
        await web.command("session.verify", {"token": GARBLED_TOKEN}, reply_to=full)
    await web.command("session.verify", {"token": GARBLED_TOKEN}, reply_to=missing)
    started = time.monotonic()
    account = {"account_id": "acct_" + "0" * 26}
    admin = await Caller.open(await connect("admin-tool"), deployment.user("admin-tool"))
    answer = await admin.call("account.get", account, timeout=5.0)
    answered_in = time.monotonic() - started

    assert answer["error"]["code"] == "not_found"
    assert answered_in < 5.0
    print(f"account.get behind 64 hostile replies answered in {answered_in * 1000:.0f} ms")

    async def counted() -> bool:
        return _lost(worker, "nacked") >= nacked + 64 and _lost(worker, "returned") > returned

    async with asyncio.timeout(30):
        while not await counted():
            await asyncio.sleep(0.2)
    assert _lost(worker, "nacked") == nacked + 64  # each once: never retried


async def test_the_client_library_works_for_a_restricted_caller(
    deployment: Deployment, worker: WorkerProcess
) -> None:
    # Finding 3: the client declared identity.commands, which a least-privileged caller may
    # not: it now only checks it exists, and signs every command with its user_id.
    email, password = f"client-{uuid.uuid4().hex[:10]}@example.com", f"lantern-{uuid.uuid4()}"
    async with IdentityClient.connect(
        deployment.url("web-gateway"), worker_user=deployment.user("identity-worker")
    ) as client:
        created = (await client.create_account(email, password, "Client")).account
        token = (await client.start_session(email, password)).token.get_secret_value()
        verified = await client.verify_session(token)
        own = await client.get_account(created.id, metadata={"actor_token": token})
        assert client.dropped_replies == 0
    assert verified.account.id == own.account.id == created.id


async def test_a_local_validation_error_does_not_show_the_password(
    deployment: Deployment, worker: WorkerProcess
) -> None:
    # Finding 9: the client's validation errors echoed the password (input_value).
    secret = f"hunter2-{uuid.uuid4().hex}"
    async with IdentityClient.connect(deployment.url("web-gateway")) as client:
        with pytest.raises(InvalidRequest) as raised:
            await client.create_account("not-an-email", secret * 40, None)  # type: ignore[arg-type]
    assert secret not in str(raised.value)
    assert secret not in repr(raised.value)
    assert {f.field for f in raised.value.fields} >= {"payload.password", "payload.display_name"}


async def test_a_forged_reply_is_dropped_by_the_client_told_the_workers_user(
    worker_control: WorkerControl, connect: Connector, deployment: Deployment
) -> None:
    # Finding 2: with commands readable, a neighbour answered session.verify itself, and the
    # client accepted "signed in as admin@example.com" 10 times out of 10. The shipped
    # permissions keep callers from reading commands or writing to reply queues (see
    # test_broker_permissions); here a neighbour with the broad permissions of old has both,
    # and the worker is down, so the forgery is the only answer there is.
    worker_control.stop()
    neighbour = await connect(OPERATOR)
    channel = await neighbour.channel()
    spy = await channel.declare_queue(exclusive=True)
    await spy.bind(COMMANDS_EXCHANGE, routing_key="session.verify")

    async def answer(message: AbstractIncomingMessage) -> None:
        forged = {"ok": True, "command": "session.verify", "result": ADMIN_SIGNED_IN}
        reply = aio_pika.Message(orjson.dumps(forged), correlation_id=message.correlation_id)
        assert message.reply_to is not None
        await channel.default_exchange.publish(reply, routing_key=message.reply_to)

    await spy.consume(answer, no_ack=True)
    web_url, worker_user = deployment.url("web-gateway"), deployment.user("identity-worker")
    try:
        async with IdentityClient.connect(
            web_url, timeout=2, retries=0, worker_user=worker_user
        ) as checking:
            with pytest.raises(ReplyTimeout):
                await checking.verify_session(GARBLED_TOKEN)
            assert checking.dropped_replies == 1
        # Not told the worker's user, the client takes the forgery: the check is what stops it.
        async with IdentityClient.connect(web_url, timeout=2, retries=0) as trusting:
            taken = await trusting.verify_session(GARBLED_TOKEN)
        assert taken.account.email == "admin@example.com"
    finally:
        await channel.close()
        worker_control.start()


async def test_a_forged_event_is_dropped_by_subscribe_told_the_workers_user(
    connect: Connector, deployment: Deployment, observer: Observer
) -> None:
    # Finding 8: a forged session.ended reached a subscribe() consumer. Publishing to
    # identity.events is the worker's alone (test_broker_permissions); a neighbour with the
    # broad permissions of old publishes one here.
    queue = f"{deployment.user('account-events')}.identity-{uuid.uuid4().hex[:6]}"
    events = cast(
        AsyncGenerator[Event, None],
        subscribe(
            deployment.url("account-events"),
            "account.*",
            "session.*",
            queue=queue,
            worker_user=deployment.user("identity-worker"),
        ),
    )
    first = asyncio.ensure_future(anext(events))
    async with asyncio.timeout(30):
        while True:  # subscribed once its queue exists
            try:
                await observer.depth(queue)
                break
            except aio_pika.exceptions.ChannelNotFoundEntity:
                await asyncio.sleep(0.1)
    neighbour = await connect(OPERATOR)
    channel = await neighbour.channel()
    exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
    forged = {
        "event_id": "evt_" + "f" * 26,
        "type": "session.ended",
        "occurred_at": "2026-11-22T09:00:00.000000+00:00",
        "data": {
            "session_id": "ses_" + "0" * 32,
            "account_id": "acct_" + "0" * 26,
            "reason": "sign_out",
        },
    }
    await exchange.publish(aio_pika.Message(orjson.dumps(forged)), routing_key="session.ended")
    admin = await Caller.open(await connect("admin-tool"), deployment.user("admin-tool"))
    email = f"event-{uuid.uuid4().hex[:10]}@example.com"
    created = await admin.call(
        "account.create",
        {"email": email, "password": f"lantern-{uuid.uuid4()}", "display_name": "E"},
    )

    try:
        event = await asyncio.wait_for(first, 30)
    finally:
        await events.aclose()
    assert event.type == "account.created"
    assert isinstance(event, AccountCreated)
    assert event.data.account.id == created["result"]["account"]["id"]


async def test_a_caller_named_by_no_policy_cannot_use_its_namespace_to_reach_others(
    connect: Connector, observer: Observer
) -> None:
    # guest is on the vhost but not in the policy: its own namespace is "guest.", and even a
    # reply there would carry only `forbidden`.
    guest = await Caller.open(await connect(OPERATOR), "guest", named=True)
    reply = await guest.call("session.verify", {"token": GARBLED_TOKEN})
    assert reply["error"]["code"] == "forbidden"
