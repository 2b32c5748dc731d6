"""Contract v2's lifecycle commands through the broker: disable (under a stream of verifies),
enable, session.list with what sign-in was told, session.revoke; the client's typed methods
and `identity-worker send` for each of them."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from client import AccountDisabled, IdentityClient, NotFound, SessionExpired
from tests.integration.scenarios import (
    Person,
    assert_account,
    assert_event,
    assert_free_of,
    call_error,
    call_ok,
    events_caused_by,
    is_utc_offset_time,
    key,
    send,
    sign_in,
    sign_up,
)
from tests.integration.test_tools import cli
from tests.support.bus import Bus
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration

SESSION_INFO_FIELDS = {
    "id",
    "account_id",
    "created_at",
    "expires_at",
    "last_seen_at",
    "client_ip",
    "user_agent",
}


async def sign_in_from(bus: Bus, person: Person, ip: str, agent: str) -> dict[str, Any]:
    """`session.start` as a gateway sends it, with the client's address and user agent."""
    body = {
        "idempotency_key": key("start"),
        "payload": person.credentials(),
        "metadata": {"client_ip": ip, "user_agent": agent},
    }
    reply = await bus.reply(await bus.publish("session.start", body))
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


async def test_disable_ends_the_sessions_refuses_sign_in_and_enable_restores_it(
    bus: Bus,
) -> None:
    person = Person.new("disable")
    account = await sign_up(bus, person)
    tokens = [(await sign_in(bus, person))["token"] for _ in range(2)]
    disable_key = key("disable")

    correlation_id, reply = await send(
        bus, "account.disable", {"account_id": account["id"], "reason": "fraud case 7"}, disable_key
    )

    assert reply["ok"] is True, reply
    assert set(reply["result"]) == {"account", "sessions_ended"}
    assert reply["result"]["sessions_ended"] == 2
    disabled = reply["result"]["account"]
    assert_account(disabled, person)
    assert (disabled["status"], disabled["version"]) == ("disabled", 2)
    events = await events_caused_by(bus, disable_key, 3)
    for event in events:
        assert_event(event, event["type"], disable_key, correlation_id)
        assert_free_of(event, person.password, *tokens)
    assert [e["type"] for e in events] == ["session.ended", "session.ended", "account.disabled"]
    assert {e["data"]["reason"] for e in events[:2]} == {"account_disabled"}
    assert events[2]["data"] == {
        "account_id": account["id"],
        "reason": "fraud case 7",
        "sessions_ended": 2,
    }
    for token in tokens:
        expired = await call_error(bus, "session.verify", {"token": token})
        assert expired["code"] == "session_expired"
    wrong = {"email": person.email, "password": person.password + "x"}
    assert (await call_error(bus, "session.start", wrong, key("s")))["code"] == (
        "invalid_credentials"
    )
    right = await call_error(bus, "session.start", person.credentials(), key("s"))
    assert right["code"] == "account_disabled"

    enable_key = key("enable")
    enabled = await call_ok(bus, "account.enable", {"account_id": account["id"]}, enable_key)
    assert (enabled["account"]["status"], enabled["account"]["version"]) == ("active", 3)
    [event] = await events_caused_by(bus, enable_key, 1)
    assert (event["type"], event["data"]) == ("account.enabled", {"account_id": account["id"]})
    assert (await call_error(bus, "session.verify", {"token": tokens[0]}))["code"] == (
        "session_expired"
    )
    fresh = await sign_in(bus, person)
    await call_ok(bus, "session.verify", {"token": fresh["token"]})


@dataclass
class Verified:
    sent_at: float
    ok: bool
    code: str | None


async def test_no_verify_sent_after_the_disable_was_acknowledged_succeeds(
    bus: Bus, worker: WorkerProcess
) -> None:
    """Verifies of the account's tokens stream in while `account.disable` is sent; every one
    sent after its reply arrived must fail, whichever worker batch serves it."""
    person = Person.new("underload")
    account = await sign_up(bus, person)
    tokens = [(await sign_in(bus, person))["token"] for _ in range(4)]
    loop = asyncio.get_running_loop()
    results: list[Verified] = []
    acked_at: float | None = None
    after_ack_wanted = 400

    def sent_after_ack() -> int:
        return sum(1 for r in results if acked_at is not None and r.sent_at > acked_at)

    async def stream(n: int) -> None:
        turn = n
        while acked_at is None or sent_after_ack() < after_ack_wanted:
            sent_at = loop.time()
            correlation_id = await bus.command("session.verify", {"token": tokens[turn % 4]})
            reply = await bus.reply(correlation_id)
            error = reply.get("error") or {}
            results.append(Verified(sent_at, reply["ok"], error.get("code")))
            turn += 1

    streams = [asyncio.create_task(stream(n)) for n in range(8)]
    try:
        await bus.wait_for(lambda: sum(r.ok for r in results) >= 100, timeout=60)
        disabled = await call_ok(
            bus,
            "account.disable",
            {"account_id": account["id"], "reason": "stream test"},
            key("disable"),
        )
        acked_at = loop.time()
        await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)

    assert disabled["sessions_ended"] == 4
    after = [r for r in results if r.sent_at > acked_at]
    succeeded_after = [r for r in after if r.ok]
    print(  # the number the issue asks for, in the test's output with -s
        f"verifies sent after the disable's reply: {len(after)}, succeeded: "
        f"{len(succeeded_after)}; before it: {sum(r.ok for r in results if r.sent_at <= acked_at)}"
        " succeeded"
    )
    assert len(after) >= after_ack_wanted
    assert succeeded_after == []
    assert {r.code for r in after} == {"session_expired"}


async def test_session_list_shows_live_sessions_with_their_client_a_page_at_a_time(
    bus: Bus,
) -> None:
    person = Person.new("listing")
    account = await sign_up(bus, person)
    agent = f"Phone/{uuid.uuid4().hex[:8]}"
    started = [await sign_in_from(bus, person, "203.0.113.9", agent) for _ in range(3)]
    ended = await sign_in(bus, person)
    await call_ok(bus, "session.end", {"token": ended["token"]}, key("end"))

    correlation_id = await bus.publish("session.list", {"payload": {"account_id": account["id"]}})
    whole = await bus.reply(correlation_id)

    assert whole["ok"] is True, whole
    assert set(whole["result"]) == {"sessions", "next_cursor"}
    assert whole["result"]["next_cursor"] is None
    sessions = whole["result"]["sessions"]
    assert sorted(s["id"] for s in sessions) == sorted(s["session"]["id"] for s in started)
    for info in sessions:
        assert set(info) == SESSION_INFO_FIELDS
        assert (info["account_id"], info["client_ip"], info["user_agent"]) == (
            account["id"],
            "203.0.113.9",
            agent,
        )
        for when in ("created_at", "expires_at", "last_seen_at"):
            assert is_utc_offset_time(info[when])
    assert_free_of(whole, person.password, *(s["token"] for s in started))
    assert [(s["created_at"], s["id"]) for s in sessions] == sorted(
        (s["created_at"], s["id"]) for s in sessions
    )

    pages: list[str] = []
    cursor = None
    for _ in range(3):
        payload: dict[str, Any] = {"account_id": account["id"], "limit": 1}
        if cursor is not None:
            payload["cursor"] = cursor
        page = await call_ok(bus, "session.list", payload)
        pages += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
    assert pages == [s["id"] for s in sessions]
    assert cursor is None


async def test_session_list_refuses_an_unknown_account_and_a_foreign_cursor(bus: Bus) -> None:
    missing = await call_error(bus, "session.list", {"account_id": "acct_" + "0" * 26})
    assert missing["code"] == "not_found"
    account = await sign_up(bus, Person.new("cursor"))
    bad = await call_error(bus, "session.list", {"account_id": account["id"], "cursor": "abc"})
    assert bad["code"] == "validation_failed"
    assert [f["field"] for f in bad["fields"]] == ["payload.cursor"]
    too_many = await call_error(bus, "session.list", {"account_id": account["id"], "limit": 201})
    assert too_many["code"] == "validation_failed"


async def test_session_revoke_ends_one_session_and_names_its_account(bus: Bus) -> None:
    person = Person.new("revoke")
    account = await sign_up(bus, person)
    kept, gone = await sign_in(bus, person), await sign_in(bus, person)
    revoke_key = key("revoke")
    payload = {"session_id": gone["session"]["id"]}

    correlation_id, reply = await send(bus, "session.revoke", payload, revoke_key)

    assert reply["ok"] is True, reply
    assert reply["result"] == {"session_id": gone["session"]["id"], "account_id": account["id"]}
    [event] = await events_caused_by(bus, revoke_key, 1)
    assert_event(event, "session.ended", revoke_key, correlation_id)
    assert event["data"] == {
        "session_id": gone["session"]["id"],
        "account_id": account["id"],
        "reason": "revoked",
    }
    assert (await call_error(bus, "session.verify", {"token": gone["token"]}))["code"] == (
        "session_expired"
    )
    await call_ok(bus, "session.verify", {"token": kept["token"]})
    again = await call_ok(bus, "session.revoke", payload, key("again"))
    assert again == reply["result"]
    unknown = await call_error(bus, "session.revoke", {"session_id": "ses_" + "0" * 32}, key("x"))
    assert unknown["code"] == "not_found"


async def test_the_client_has_a_typed_method_for_each_lifecycle_command(
    amqp_url: str, worker: WorkerProcess
) -> None:
    person = Person.new("typed")
    async with IdentityClient.connect(amqp_url, timeout=15) as client:
        account = (
            await client.create_account(person.email, person.password, person.display_name)
        ).account
        started = await client.start_session(
            person.email, person.password, metadata={"user_agent": "typed/1.0"}
        )
        listed = await client.list_sessions(account.id, limit=10)
        assert [(s.id, s.user_agent, s.client_ip) for s in listed.sessions] == [
            (started.session.id, "typed/1.0", None)
        ]
        assert listed.next_cursor is None
        revoked = await client.revoke_session(started.session.id)
        assert (revoked.session_id, revoked.account_id) == (started.session.id, account.id)
        disabled = await client.disable_account(account.id, "typed test")
        assert (disabled.account.status, disabled.sessions_ended) == ("disabled", 0)
        with pytest.raises(AccountDisabled):
            await client.start_session(person.email, person.password)
        assert (await client.enable_account(account.id)).account.status == "active"
        again = await client.start_session(person.email, person.password)
        deleted = await client.delete_account(account.id)
        assert (deleted.account_id, deleted.sessions_ended) == (account.id, 1)
        with pytest.raises(SessionExpired):
            await client.verify_session(again.token)
        with pytest.raises(NotFound):
            await client.get_account(account.id)


async def test_send_covers_each_lifecycle_command(
    bus: Bus, worker: WorkerProcess, amqp_url: str
) -> None:
    person = Person.new("cli")
    account = await sign_up(bus, person)
    session = (await sign_in(bus, person))["session"]
    account_flag = f"--account-id={account['id']}"

    listed = await cli("send", "session.list", account_flag, "--limit=1", amqp_url=amqp_url)
    assert listed.code == 0, listed.err
    assert [s["id"] for s in listed.json()["result"]["sessions"]] == [session["id"]]
    revoked = await cli(
        "send", "session.revoke", f"--session-id={session['id']}", amqp_url=amqp_url
    )
    assert revoked.code == 0, revoked.err
    assert revoked.json()["result"]["account_id"] == account["id"]
    reason = "--reason=incident 2026-11-22"
    disabled = await cli("send", "account.disable", account_flag, reason, amqp_url=amqp_url)
    assert disabled.code == 0, disabled.err
    assert disabled.json()["result"]["account"]["status"] == "disabled"
    enabled = await cli("send", "account.enable", account_flag, amqp_url=amqp_url)
    assert enabled.json()["result"]["account"]["status"] == "active"
    deleted = await cli("send", "account.delete", account_flag, amqp_url=amqp_url)
    assert deleted.code == 0, deleted.err
    assert deleted.json()["result"] == {"account_id": account["id"], "sessions_ended": 0}
    gone = await cli("send", "account.delete", account_flag, amqp_url=amqp_url)
    assert (gone.code, gone.json()["error"]["code"]) == (1, "not_found")
