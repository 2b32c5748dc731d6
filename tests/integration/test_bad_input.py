"""A bad message is an answer, not an outage: it gets its error reply, the good commands behind
it are processed, and what ops may look at in identity.dead holds no secret."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest

from tests.integration.scenarios import (
    Person,
    assert_event,
    assert_free_of,
    events_caused_by,
    key,
    sign_up,
)
from tests.support.bus import Bus

pytestmark = pytest.mark.integration

# Above the worker's default IDENTITY_MAX_MESSAGE_BYTES (64 KiB).
TOO_LARGE = 70_000


@dataclass(frozen=True)
class Bad:
    """A bad body for account.create; `{password}` is replaced by a password of the test."""

    body: bytes
    content_type: str
    dead_letter: str | None  # the reason the worker dead-letters it with, if it does


def _envelope(password: str, *, with_key: bool = True, padding: int = 0) -> dict[str, object]:
    payload = {"email": "bad@example.com", "password": password, "display_name": "Bad"}
    body: dict[str, object] = {"payload": payload}
    if with_key:
        body["idempotency_key"] = key("bad")
    if padding:
        body["metadata"] = {"user_agent": "x" * padding}
    return body


def _bad(case: str, password: str) -> Bad:
    json = "application/json"
    if case == "not_json":
        return Bad(b'{"payload": {"password": "' + password.encode(), json, "malformed_json")
    if case == "invalid_utf8":
        body = orjson.dumps(_envelope(password)).replace(b"bad@", b"b\xff\xfe@")
        return Bad(body, json, "malformed_json")
    if case == "wrong_content_type":
        return Bad(orjson.dumps(_envelope(password)), "text/plain", "wrong_content_type")
    if case == "too_large":
        return Bad(orjson.dumps(_envelope(password, padding=TOO_LARGE)), json, "too_large")
    if case == "json_array":
        return Bad(orjson.dumps([_envelope(password)]), json, "not_an_object")
    if case == "missing_key":
        return Bad(orjson.dumps(_envelope(password, with_key=False)), json, None)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["not_json", "invalid_utf8", "wrong_content_type", "too_large", "json_array", "missing_key"],
)
async def test_a_malformed_message_is_answered_and_the_commands_behind_it_are_processed(
    bus: Bus, case: str
) -> None:
    secret = Person.new("bad").password
    bad = _bad(case, secret)
    good = [Person.new(f"after-{case.replace('_', '')}") for _ in range(2)]

    bad_id = await bus.publish("account.create", bad.body, content_type=bad.content_type)
    good_ids = [
        await bus.command("account.create", person.create_payload(), key("good")) for person in good
    ]

    reply = await bus.reply(bad_id)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "malformed_message"
    assert_free_of(reply, secret)
    for correlation_id, person in zip(good_ids, good, strict=True):
        good_reply = await bus.reply(correlation_id)
        assert good_reply["ok"] is True, good_reply
        assert good_reply["result"]["account"]["email"] == person.email
    if bad.dead_letter is not None:
        await bus.wait_for(lambda: any(d["correlation_id"] == bad_id for d in bus.dead))
        [dead] = [d for d in bus.dead if d["correlation_id"] == bad_id]
        assert dead["reason"] == bad.dead_letter
        assert dead["command"] == "account.create"
        assert dead["body_bytes"] == len(bad.body)
        assert_free_of(dead, secret)


async def test_a_dead_letter_of_a_body_that_is_not_an_object_keeps_only_its_size(
    bus: Bus,
) -> None:
    # A list or a bare value has no field names to tell a password by ("hunter2" alone, or
    # [email, password]): none of it is copied. Object bodies are kept redacted (unit tests).
    secret = Person.new("masked").password
    for body in (orjson.dumps(["kept@example.com", secret]), orjson.dumps(secret)):
        correlation_id = await bus.publish("account.create", body)
        reply = await bus.reply(correlation_id)
        assert reply["error"]["code"] == "malformed_message", reply

        def arrived(cid: str = correlation_id) -> bool:
            return any(d["correlation_id"] == cid for d in bus.dead)

        await bus.wait_for(arrived)
        [dead] = [d for d in bus.dead if d["correlation_id"] == correlation_id]
        assert dead["reason"] == "not_an_object"
        assert dead["body"] is None
        assert dead["body_bytes"] == len(body)
        assert_free_of(dead, secret)


async def test_a_message_too_short_for_an_object_is_answered_and_named_in_the_reply(
    bus: Bus,
) -> None:
    correlation_id = await bus.publish("account.get", b"")

    reply = await bus.reply(correlation_id)

    assert reply["ok"] is False
    assert reply["command"] == "account.get"
    assert reply["error"]["code"] == "malformed_message"


async def test_a_command_without_reply_to_is_processed_and_announced(bus: Bus) -> None:
    person = Person.new("noreply")
    silent_key = key("noreply")

    correlation_id = await bus.command(
        "account.create", person.create_payload(), silent_key, reply=False
    )

    [event] = await events_caused_by(bus, silent_key, 1)
    assert_event(event, "account.created", silent_key, correlation_id)
    assert event["data"]["account"]["email"] == person.email
    assert correlation_id not in bus.replies
    # The account exists: the same address is now taken.
    taken = await bus.call("account.create", person.create_payload(), key("again"))
    assert taken["error"]["code"] == "email_taken"


async def test_a_bad_query_is_answered_without_disturbing_the_next_one(bus: Bus) -> None:
    account = await sign_up(bus, Person.new("query"))

    bad_id = await bus.publish("account.get", b"[1, 2, 3]")
    good_id = await bus.publish("account.get", {"payload": {"account_id": account["id"]}})

    assert (await bus.reply(bad_id))["error"]["code"] == "malformed_message"
    assert (await bus.reply(good_id))["result"] == {"account": account}
