"""Every command of contract v1 through the broker: its reply's shape, and the events it
announces on identity.events (with the contract's envelope, never a secret)."""

from __future__ import annotations

import uuid

import aio_pika
import orjson
import pytest

from messages.topology import COMMANDS_EXCHANGE
from tests.integration.scenarios import (
    Person,
    assert_account,
    assert_event,
    assert_free_of,
    assert_session,
    call_ok,
    events_caused_by,
    is_utc_offset_time,
    key,
    send,
    sign_in,
    sign_up,
)
from tests.support.bus import Bus

pytestmark = pytest.mark.integration


async def test_account_create_returns_the_account_and_announces_it(bus: Bus) -> None:
    person = Person.new("create")
    create_key = key("create")

    correlation_id, reply = await send(bus, "account.create", person.create_payload(), create_key)

    assert reply["ok"] is True
    assert reply["idempotency_key"] == create_key
    account = reply["result"]["account"]
    assert set(reply["result"]) == {"account"}
    assert_account(account, person)
    assert account["version"] == 1
    assert account["created_at"] == account["updated_at"]
    assert_free_of(reply, person.password)
    [event] = await events_caused_by(bus, create_key, 1)
    assert_event(event, "account.created", create_key, correlation_id)
    assert event["data"] == {"account": account}
    assert_free_of(event, person.password)


async def test_account_get_returns_the_account_as_created(bus: Bus) -> None:
    person = Person.new("get")
    account = await sign_up(bus, person)

    result = await call_ok(bus, "account.get", {"account_id": account["id"]})

    assert result == {"account": account}


async def test_account_get_needs_no_idempotency_key(bus: Bus) -> None:
    account = await sign_up(bus, Person.new("getnokey"))

    correlation_id = await bus.publish("account.get", {"payload": {"account_id": account["id"]}})
    reply = await bus.reply(correlation_id)

    assert reply["ok"] is True
    assert reply["result"] == {"account": account}


async def test_account_update_changes_the_fields_bumps_the_version_and_says_what_changed(
    bus: Bus,
) -> None:
    person = Person.new("update")
    account = await sign_up(bus, person)
    new_email = f"moved-{person.email}"
    update_key = key("update")
    payload = {
        "account_id": account["id"],
        "expected_version": 1,
        "email": new_email,
        "display_name": "Moved",
        "current_password": person.password,
    }

    correlation_id, reply = await send(bus, "account.update", payload, update_key)

    assert reply["ok"] is True, reply
    updated = reply["result"]["account"]
    assert_account(updated)
    assert updated["id"] == account["id"]
    assert updated["email"] == new_email
    assert updated["display_name"] == "Moved"
    assert updated["version"] == 2
    assert updated["created_at"] == account["created_at"]
    assert updated["updated_at"] > account["updated_at"]
    [event] = await events_caused_by(bus, update_key, 1)
    assert_event(event, "account.updated", update_key, correlation_id)
    assert event["data"]["account"] == updated
    assert sorted(event["data"]["changed"]) == ["display_name", "email"]
    assert_free_of(event, person.password)
    # The new address is the sign-in name from now on.
    signed_in = await sign_in(bus, Person(new_email, person.password, "Moved"))
    assert signed_in["account"] == updated


async def test_account_change_password_ends_every_session_and_announces_it(bus: Bus) -> None:
    person = Person.new("chpw")
    account = await sign_up(bus, person)
    first = await sign_in(bus, person)
    second = await sign_in(bus, person)
    new_password = f"{person.password}-renewed"
    change_key = key("chpw")
    payload = {
        "account_id": account["id"],
        "current_password": person.password,
        "new_password": new_password,
    }

    correlation_id, reply = await send(bus, "account.change_password", payload, change_key)

    assert reply["ok"] is True, reply
    assert set(reply["result"]) == {"account", "sessions_ended"}
    assert reply["result"]["sessions_ended"] == 2
    assert_account(reply["result"]["account"])
    assert reply["result"]["account"]["version"] == 2
    events = await events_caused_by(bus, change_key, 3)
    for event in events:
        assert_event(event, event["type"], change_key, correlation_id)
        assert_free_of(event, person.password, new_password, first["token"], second["token"])
    ended = [e["data"] for e in events if e["type"] == "session.ended"]
    assert sorted(data["session_id"] for data in ended) == sorted(
        [first["session"]["id"], second["session"]["id"]]
    )
    assert {data["reason"] for data in ended} == {"password_changed"}
    assert {data["account_id"] for data in ended} == {account["id"]}
    [changed] = [e["data"] for e in events if e["type"] == "account.password_changed"]
    assert changed == {"account_id": account["id"], "sessions_ended": 2}
    # The old sessions are over; the new password signs in.
    verify = await bus.call("session.verify", {"token": first["token"]})
    assert verify["error"]["code"] == "session_expired"
    await sign_in(bus, Person(person.email, new_password, person.display_name))


async def test_session_start_returns_the_session_its_token_and_the_account(bus: Bus) -> None:
    person = Person.new("start")
    account = await sign_up(bus, person)
    start_key = key("start")

    correlation_id, reply = await send(bus, "session.start", person.credentials(), start_key)

    assert reply["ok"] is True, reply
    result = reply["result"]
    assert set(result) == {
        "session",
        "token",
        "account",
        "access_token",
        "access_token_expires_at",
        "refresh_token",
    }
    assert_session(result["session"], account["id"])
    for token in ("token", "access_token", "refresh_token"):
        assert isinstance(result[token], str)
        assert result[token]
    assert is_utc_offset_time(result["access_token_expires_at"])
    assert result["account"] == account
    [event] = await events_caused_by(bus, start_key, 1)
    assert_event(event, "session.started", start_key, correlation_id)
    assert event["data"] == {"session": result["session"]}
    assert_free_of(
        event, result["token"], result["access_token"], result["refresh_token"], person.password
    )


async def test_session_verify_returns_the_session_and_the_account(bus: Bus) -> None:
    person = Person.new("verify")
    account = await sign_up(bus, person)
    started = await sign_in(bus, person)

    reply = await bus.call("session.verify", {"token": started["token"]})

    assert reply["ok"] is True, reply
    assert reply["result"] == {"session": started["session"], "account": account}
    assert_free_of(reply, started["token"])


async def test_session_end_ends_the_session_and_ending_it_again_is_not_an_error(
    bus: Bus,
) -> None:
    person = Person.new("end")
    account = await sign_up(bus, person)
    started = await sign_in(bus, person)
    end_key = key("end")

    correlation_id, reply = await send(bus, "session.end", {"token": started["token"]}, end_key)

    assert reply["ok"] is True, reply
    assert reply["result"] == {"session_id": started["session"]["id"]}
    assert_free_of(reply, started["token"])
    [event] = await events_caused_by(bus, end_key, 1)
    assert_event(event, "session.ended", end_key, correlation_id)
    assert event["data"] == {
        "session_id": started["session"]["id"],
        "account_id": account["id"],
        "reason": "sign_out",
    }
    assert_free_of(event, started["token"])
    verify = await bus.call("session.verify", {"token": started["token"]})
    assert verify["error"]["code"] == "session_expired"
    again = await bus.call("session.end", {"token": started["token"]}, key=key("end-again"))
    assert again["ok"] is True
    assert again["result"] == {"session_id": started["session"]["id"]}


async def test_session_end_all_ends_every_open_session_of_the_account(bus: Bus) -> None:
    person = Person.new("endall")
    account = await sign_up(bus, person)
    sessions = [await sign_in(bus, person) for _ in range(3)]
    end_all_key = key("endall")

    correlation_id, reply = await send(
        bus, "session.end_all", {"account_id": account["id"]}, end_all_key
    )

    assert reply["ok"] is True, reply
    assert reply["result"] == {"account_id": account["id"], "sessions_ended": 3}
    events = await events_caused_by(bus, end_all_key, 3)
    for event in events:
        assert_event(event, "session.ended", end_all_key, correlation_id)
        assert event["data"]["reason"] == "sign_out_everywhere"
        assert event["data"]["account_id"] == account["id"]
    assert sorted(e["data"]["session_id"] for e in events) == sorted(
        s["session"]["id"] for s in sessions
    )
    for started in sessions:
        verify = await bus.call("session.verify", {"token": started["token"]})
        assert verify["error"]["code"] == "session_expired"


async def test_a_query_echoes_its_optional_key_and_never_claims_it(bus: Bus) -> None:
    account = await sign_up(bus, Person.new("querykey"))
    query_key = key("query")

    first = await bus.call("account.get", {"account_id": account["id"]}, key=query_key)
    other = await bus.call("account.get", {"account_id": "acct_" + "2" * 26}, key=query_key)

    assert first["idempotency_key"] == query_key
    assert first["result"] == {"account": account}
    # A query is not remembered: the same key on another query is simply answered.
    assert other["idempotency_key"] == query_key
    assert other["error"]["code"] == "not_found"


async def test_the_reply_carries_the_message_id_when_there_is_no_correlation_id(
    bus: Bus,
) -> None:
    account = await sign_up(bus, Person.new("msgid"))
    message_id = uuid.uuid4().hex
    exchange = await bus.channel.get_exchange(COMMANDS_EXCHANGE)

    await exchange.publish(
        aio_pika.Message(
            orjson.dumps({"payload": {"account_id": account["id"]}}),
            content_type="application/json",
            message_id=message_id,
            reply_to=bus.reply_queue,
            user_id=bus.user_id,
        ),
        routing_key="account.get",
    )
    reply = await bus.reply(message_id)

    assert reply["result"] == {"account": account}
