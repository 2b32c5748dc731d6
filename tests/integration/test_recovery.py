"""Recovery and verification through the broker, with a consumer on `identity.courier` that
reads what the mail sender would: codes delivered only there, used once, and nowhere else
(tables, logs, events, replies, metrics, dead letters)."""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from messages.courier import parse_courier_message
from messages.topology import COURIER_QUEUE
from tests.integration.conftest import Isolated
from tests.support.bus import Bus
from tests.support.eventually import eventually

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase for ada"
# Limits out of the way of tests that make many requests from one source.
ROOMY = {
    "IDENTITY_CODE_REQUESTS_PER_SOURCE": "100000",
    "IDENTITY_CODE_ATTEMPTS_PER_SOURCE": "100000",
}


@dataclass
class MailSender:
    """Reads identity.courier as the mail sender would (acks what it read)."""

    connection: AbstractRobustConnection
    received: list[AbstractIncomingMessage] = field(default_factory=list)

    @classmethod
    async def attach(cls, amqp_url: str) -> MailSender:
        connection = await aio_pika.connect_robust(amqp_url)
        sender = cls(connection)
        channel = await connection.channel()
        queue = await channel.declare_queue(COURIER_QUEUE, passive=True)
        await queue.consume(sender._on_message)
        return sender

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.received.append(message)
        await message.ack()

    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(m.body) for m in self.received]

    async def mail_to(self, address: str, kind: str, count: int = 1) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            mails = [b for b in self.bodies() if b["to"] == address and b["kind"] == kind]
            return mails if len(mails) >= count else []

        return await eventually(found, what=f"{count} {kind} mail(s) to {address}")

    async def close(self) -> None:
        await self.connection.close()


@pytest.fixture
async def place(isolated: Isolated) -> AsyncIterator[tuple[Isolated, Bus, MailSender]]:
    isolated.start(**ROOMY)
    bus = await isolated.bus()
    sender = await MailSender.attach(isolated.amqp_url)
    try:
        yield isolated, bus, sender
    finally:
        await sender.close()


async def ok(bus: Bus, command: str, payload: dict[str, Any]) -> dict[str, Any]:
    reply = await bus.call(command, payload, key=uuid.uuid4().hex)
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


async def sign_up(bus: Bus, email: str) -> dict[str, Any]:
    payload = {"email": email, "password": PASSWORD, "display_name": "Ada"}
    account: dict[str, Any] = (await ok(bus, "account.create", payload))["account"]
    return account


def new_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


async def test_a_recovery_code_resets_the_password_and_ends_every_session(
    place: tuple[Isolated, Bus, MailSender],
) -> None:
    _, bus, sender = place
    email = new_email("recover")
    account = await sign_up(bus, email)
    tokens = [
        (await ok(bus, "session.start", {"email": email, "password": PASSWORD}))["token"]
        for _ in range(2)
    ]

    answer = await ok(bus, "account.recovery.request", {"email": email})

    assert answer == {"accepted": True}
    [mail] = await sender.mail_to(email, "recovery_code")
    message = next(m for m in sender.received if orjson.loads(m.body) == mail)
    assert message.user_id == "guest"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == mail["message_id"]
    assert message.type == "recovery_code"
    assert 0 < int(message.expiration or 0) <= 900_000
    courier = parse_courier_message(message.body)
    assert courier.account_id == account["id"]
    assert courier.display_name == "Ada"
    assert courier.expires_at is not None
    code = mail["code"]
    result = await ok(
        bus,
        "account.recovery.complete",
        {"email": email, "code": code.lower(), "new_password": NEW_PASSWORD},
    )
    assert result["sessions_ended"] == 2
    assert result["account"]["email_verified"] is True
    for token in tokens:
        reply = await bus.call("session.verify", {"token": token})
        assert reply["error"]["code"] == "session_expired"
    old = await bus.call("session.start", {"email": email, "password": PASSWORD})
    assert old["error"]["code"] == "invalid_credentials"
    assert await ok(bus, "session.start", {"email": email, "password": NEW_PASSWORD})
    again = await bus.call(
        "account.recovery.complete", {"email": email, "code": code, "new_password": PASSWORD}
    )
    assert again["error"]["code"] == "invalid_code"
    await sender.mail_to(email, "password_changed_notice")
    await eventually(
        lambda: (
            {"account.recovery_requested", "account.password_reset"}
            <= {e["type"] for e in bus.events}
        ),
        what="the recovery events",
    )
    reasons = {e["data"]["reason"] for e in bus.events_of("session.ended")}
    assert reasons == {"password_reset"}


async def test_an_unknown_email_gets_the_same_reply_and_no_mail(
    place: tuple[Isolated, Bus, MailSender],
) -> None:
    _, bus, sender = place
    known = new_email("known")
    await sign_up(bus, known)
    await sender.mail_to(known, "verification_code")
    unknown = new_email("unknown")

    unknown_reply = await bus.call("account.recovery.request", {"email": unknown}, key="k-u")
    known_reply = await bus.call("account.recovery.request", {"email": known}, key="k-k")

    assert {**unknown_reply, "idempotency_key": None} == {**known_reply, "idempotency_key": None}
    # Mails are relayed in commit order: once the known one's arrived, the unknown one's would
    # have, had there been one.
    await sender.mail_to(known, "recovery_code")
    assert [b["to"] for b in sender.bodies()] == [known, known]
    assert not [e for e in bus.events if e.get("causation_id") == "k-u"]


async def test_a_mailed_verification_code_confirms_the_address(
    place: tuple[Isolated, Bus, MailSender],
) -> None:
    _, bus, sender = place
    email = new_email("verify")
    account = await sign_up(bus, email)
    assert account["email_verified"] is False
    [mail] = await sender.mail_to(email, "verification_code")
    assert mail["account_id"] == account["id"]

    result = await ok(bus, "account.verification.confirm", {"email": email, "code": mail["code"]})

    assert result["account"]["email_verified"] is True
    await ok(bus, "account.verification.request", {"account_id": account["id"]})
    fetched = await ok(bus, "account.get", {"account_id": account["id"]})
    assert fetched["account"]["email_verified"] is True
    await eventually(lambda: bus.events_of("account.email_verified"), what="account.email_verified")


async def test_known_and_unknown_recovery_requests_take_the_same_time(
    isolated: Isolated,
) -> None:
    """The median of many requests for a known email (a code issued every time) is within
    20% of the median for unknown emails, on PostgreSQL, through the broker."""
    isolated.start(**ROOMY, IDENTITY_CODE_REQUESTS_PER_EMAIL="100000")
    bus = await isolated.bus()
    known = new_email("timed")
    await sign_up(bus, known)
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    # Shuffled, so that the work a request leaves behind (the relays publishing a known
    # email's mail and event) falls on the requests of both kinds alike.
    plan = ["known", "unknown"] * 200
    random.shuffle(plan)
    for round_, kind in enumerate(plan):
        email = known if kind == "known" else new_email("nobody")
        started = time.perf_counter()
        reply = await bus.call("account.recovery.request", {"email": email})
        elapsed = time.perf_counter() - started
        assert reply["ok"] is True
        if round_ >= 20:  # the first rounds warm up connections and statement caches
            timings[kind].append(elapsed)
    known_ms = statistics.median(timings["known"]) * 1000
    unknown_ms = statistics.median(timings["unknown"]) * 1000
    print(f"recovery.request median: known {known_ms:.2f} ms, unknown {unknown_ms:.2f} ms")
    assert abs(known_ms - unknown_ms) <= 0.2 * min(known_ms, unknown_ms)


async def test_after_relay_no_code_is_anywhere_but_the_courier_queue(
    place: tuple[Isolated, Bus, MailSender],
) -> None:
    isolated, bus, sender = place
    email = new_email("scan")
    account = await sign_up(bus, email)
    await ok(bus, "account.recovery.request", {"email": email})
    await ok(bus, "account.verification.request", {"account_id": account["id"]})
    await sender.mail_to(email, "recovery_code")
    verification = await sender.mail_to(email, "verification_code", 2)
    recovery = (await sender.mail_to(email, "recovery_code"))[0]["code"]
    await ok(
        bus,
        "account.recovery.complete",
        {"email": email, "code": recovery, "new_password": NEW_PASSWORD},
    )
    await ok(
        bus, "account.verification.confirm", {"email": email, "code": verification[-1]["code"]}
    )
    bad = await bus.call(
        "account.recovery.complete", {"email": email, "code": recovery, "new_password": "x"}
    )
    assert bad["ok"] is False
    await sender.mail_to(email, "password_changed_notice")
    codes = [b["code"] for b in sender.bodies() if b.get("code")]
    assert len(codes) == 3  # verification on sign-up, recovery, verification again
    forms = {form for code in codes for form in (code, code.replace("-", ""))}

    worker = isolated.workers[0]
    await eventually(
        lambda: "identity_courier_backlog 0.0" in worker.metrics(), what="an empty courier backlog"
    )
    found = await _scan_database(isolated.database_url, forms)
    assert found == [], found
    # The same scan finds what is there: the address, in the accounts table.
    assert "accounts.email" in await _scan_database(isolated.database_url, {email})
    for place_name, text in (
        ("log", worker.log_text()),
        ("metrics", worker.metrics()),
        ("events", orjson.dumps(bus.events).decode()),
        ("replies", orjson.dumps(bus.replies).decode()),
        ("dead letters", orjson.dumps(bus.dead).decode()),
    ):
        assert not [form for form in forms if form in text], place_name
    assert bus.events  # the scan looked at something


async def _scan_database(dsn: str, forms: set[str]) -> list[str]:
    """Every text, json/jsonb and bytea column of every table, searched for the codes."""
    connection = await asyncpg.connect(dsn)
    try:
        columns = await connection.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type IN"
            " ('text', 'character varying', 'json', 'jsonb', 'bytea', 'ARRAY')"
        )
        assert {(c["table_name"], c["column_name"]) for c in columns} >= {
            ("courier_outbox", "sealed_code"),
            ("one_time_codes", "mac"),
            ("idempotency", "reply"),
            ("outbox", "body"),
        }
        found = []
        for column in columns:
            table, name = column["table_name"], column["column_name"]
            rows = await connection.fetch(f'SELECT "{name}"::text AS v FROM "{table}"')
            raw = (
                await connection.fetch(f'SELECT "{name}" AS v FROM "{table}"')
                if column["data_type"] == "bytea"
                else []
            )
            texts = [str(r["v"]) for r in rows] + [
                bytes(r["v"]).decode("latin-1") for r in raw if r["v"] is not None
            ]
            found += [f"{table}.{name}" for text in texts for form in forms if form in text]
        return found
    finally:
        await connection.close()
