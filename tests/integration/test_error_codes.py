"""Every error code of contract v1, produced by the real worker and answered on the reply queue.

`unknown_command` is produced both for a command name that identity.commands does not bind
(its alternate exchange hands it to the fast queue) and for a message published straight to
a worker queue under a routing key that is no command.
"""

from __future__ import annotations

import asyncio
from functools import partial

import aio_pika
import orjson
import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import (
    Person,
    assert_free_of,
    call_error,
    call_ok,
    key,
    sign_in,
    sign_up,
)
from tests.support.bus import Bus
from tests.support.eventually import eventually
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

pytestmark = pytest.mark.integration

UNKNOWN_ACCOUNT = "acct_" + "0" * 26


async def test_a_body_that_is_not_json_is_a_malformed_message(bus: Bus) -> None:
    correlation_id = await bus.publish("account.get", b"account please")

    reply = await bus.reply(correlation_id)

    assert reply["ok"] is False
    assert reply["error"]["code"] == "malformed_message"


async def test_a_routing_key_that_is_no_command_is_an_unknown_command(bus: Bus) -> None:
    body = orjson.dumps({"idempotency_key": key("unknown"), "payload": {}})

    correlation_id = await bus.send_to_queue(FAST_QUEUE, body)
    reply = await bus.reply(correlation_id)

    assert reply["ok"] is False
    assert reply["command"] == FAST_QUEUE
    assert reply["error"]["code"] == "unknown_command"


async def test_an_unknown_command_name_on_the_commands_exchange_is_answered(bus: Bus) -> None:
    body = {"idempotency_key": key("delete"), "payload": {"account_id": "acct_" + "0" * 26}}

    reply = await bus.reply(await bus.publish("account.erase", body))

    assert reply["ok"] is False
    assert reply["command"] == "account.erase"
    assert reply["error"]["code"] == "unknown_command"


async def test_invalid_fields_are_a_validation_failure_naming_each_field(bus: Bus) -> None:
    person = Person.new("invalid")
    payload = {**person.create_payload(), "display_name": "", "nickname": "ada"}
    invalid_key = key("invalid")

    reply = await bus.call("account.create", payload, key=invalid_key)

    assert reply["ok"] is False
    assert reply["idempotency_key"] == invalid_key
    error = reply["error"]
    assert error["code"] == "validation_failed"
    fields = {field["field"]: field["message"] for field in error["fields"]}
    assert set(fields) == {"payload.display_name", "payload.nickname"}
    assert all(fields.values())
    assert_free_of(error, person.password)


async def test_a_key_the_database_cannot_hold_is_refused_and_harms_no_other_command(
    bus: Bus,
) -> None:
    """U+0000 cannot be stored as text: the key is unusable, refused at the edge before any
    look-up, and commands asked for at the same moment are answered as usual."""
    people = [Person.new(f"nul{n}") for n in range(4)]
    bad = Person.new("nulkey")

    replies = await asyncio.gather(
        bus.call("account.create", bad.create_payload(), key="nul\x00key"),
        *(bus.call("account.create", p.create_payload(), key=key("nul")) for p in people),
    )

    error = replies[0]["error"]
    assert error["code"] == "malformed_message"
    assert "U+0000" in error["message"]
    assert all(reply["ok"] is True for reply in replies[1:]), replies[1:]


async def test_a_weak_password_is_a_validation_failure_of_the_password_field(bus: Bus) -> None:
    person = Person.new("weak")
    payload = {**person.create_payload(), "password": "short"}

    error = await call_error(bus, "account.create", payload, key("weak"))

    assert error["code"] == "validation_failed"
    assert [field["field"] for field in error["fields"]] == ["payload.password"]


async def test_a_key_reused_for_another_payload_is_refused(bus: Bus) -> None:
    reused = key("reused")
    await call_ok(bus, "account.create", Person.new("first").create_payload(), reused)

    error = await call_error(bus, "account.create", Person.new("second").create_payload(), reused)

    assert error["code"] == "idempotency_key_reused"


async def test_an_email_already_registered_in_another_case_is_taken(bus: Bus) -> None:
    person = Person.new("taken")
    await sign_up(bus, person)
    shouting = Person(person.email.upper(), person.password, "Other")

    error = await call_error(bus, "account.create", shouting.create_payload(), key("taken"))

    assert error["code"] == "email_taken"


async def test_a_wrong_password_and_an_unknown_email_are_the_same_invalid_credentials(
    bus: Bus,
) -> None:
    person = Person.new("creds")
    await sign_up(bus, person)

    wrong = await call_error(
        bus, "session.start", {"email": person.email, "password": "not-the-password"}, key("w")
    )
    unknown = await call_error(
        bus, "session.start", Person.new("nobody").credentials(), key("unknown-email")
    )

    assert wrong["code"] == unknown["code"] == "invalid_credentials"
    assert wrong["message"] == unknown["message"]


async def test_repeated_failed_sign_ins_are_rate_limited_with_a_retry_after(bus: Bus) -> None:
    person = Person.new("throttled")
    await sign_up(bus, person)
    wrong = {"email": person.email, "password": "guessing-the-password"}

    codes = []
    for attempt in range(10):
        error = await call_error(bus, "session.start", wrong, key(f"guess-{attempt}"))
        codes.append(error["code"])
        if error["code"] == "rate_limited":
            break

    assert codes[-1] == "rate_limited"
    assert set(codes[:-1]) == {"invalid_credentials"}
    assert isinstance(error["retry_after_s"], int)
    assert error["retry_after_s"] >= 1
    # The right password is refused too while the lock lasts.
    locked = await call_error(bus, "session.start", person.credentials(), key("locked"))
    assert locked["code"] == "rate_limited"


async def test_a_forged_token_is_an_invalid_token(bus: Bus) -> None:
    error = await call_error(bus, "session.verify", {"token": "v1.test-k1.ses_forged.signature"})

    assert error["code"] == "invalid_token"


async def test_an_ended_session_is_expired(bus: Bus) -> None:
    person = Person.new("expired")
    await sign_up(bus, person)
    started = await sign_in(bus, person)
    await call_ok(bus, "session.end", {"token": started["token"]}, key("end"))

    error = await call_error(bus, "session.verify", {"token": started["token"]})

    assert error["code"] == "session_expired"


async def test_an_account_that_does_not_exist_is_not_found(bus: Bus) -> None:
    error = await call_error(bus, "account.get", {"account_id": UNKNOWN_ACCOUNT})

    assert error["code"] == "not_found"


async def test_an_update_from_a_stale_version_is_a_version_conflict(bus: Bus) -> None:
    account = await sign_up(bus, Person.new("stale"))
    first = {"account_id": account["id"], "expected_version": 1, "display_name": "One"}
    await call_ok(bus, "account.update", first, key("update-1"))

    stale = {"account_id": account["id"], "expected_version": 1, "display_name": "Two"}
    error = await call_error(bus, "account.update", stale, key("update-2"))

    assert error["code"] == "version_conflict"
    current = await call_ok(bus, "account.get", {"account_id": account["id"]})
    assert current["account"]["display_name"] == "One"
    assert current["account"]["version"] == 2


async def _crash_consumers_holding(amqp_url: str, queue_name: str, times: int) -> list[int]:
    """Take the only message of `queue_name` and drop the channel without acking, `times`
    times, like a worker dying mid-command; returns the delivery counts the broker showed."""
    counts = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for _ in range(times):
            channel = await connection.channel()
            queue = await channel.get_queue(queue_name)
            message = await eventually(
                partial(queue.get, no_ack=False, fail=False),
                timeout=10,
                what="the command back on its queue",
            )
            assert message is not None
            counts.append(message.headers["x-delivery-count"])
            await channel.close()
    return counts


async def test_a_command_that_kept_crashing_workers_gets_internal_error_and_a_clean_dead_letter(
    isolated: Isolated,
) -> None:
    """A command whose deliveries all died unacknowledged (here: a consumer that takes it and
    drops its channel, which the quorum queue counts exactly like a worker killed mid-way)
    reaches the worker with `x-delivery-count` at the worker's limit (4 by default): the
    worker answers `internal_error`, dead-letters a copy without the password, acks, and the
    command takes no effect."""
    isolated.start().terminate()  # declares the topology, then leaves the queue to the test
    bus = await isolated.bus()
    person = Person.new("poison")
    poison_key = key("poison")
    correlation_id = await bus.command("account.create", person.create_payload(), poison_key)

    counts = await _crash_consumers_holding(isolated.amqp_url, PASSWORD_QUEUE, 4)
    isolated.start()
    reply = await bus.reply(correlation_id)

    assert counts == [0, 1, 2, 3]
    assert reply["ok"] is False
    assert reply["error"]["code"] == "internal_error"
    await bus.wait_for(lambda: any(d["correlation_id"] == correlation_id for d in bus.dead))
    [dead] = [d for d in bus.dead if d["correlation_id"] == correlation_id]
    assert dead["reason"] == "delivery_limit"
    assert dead["command"] == "account.create"
    assert dead["delivery_count"] == 4
    assert_free_of(dead, person.password)
    # Nothing was created: the address is still free.
    await call_ok(bus, "account.create", person.create_payload(), key("after-poison"))
