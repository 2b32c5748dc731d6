"""publish_confirmed: one deadline for the whole publish, reconnection included; and what a
dead letter keeps of the body it copies, as a record the tools read back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pamqp.commands import Basic

from messages import DeadLetterRecord, parse_dead_letter
from messages.deadletters import MAX_BODY_DEPTH
from services.clock import FakeClock
from tools.deadletters import DeadLetter
from worker import broker
from worker.broker import BROKER_FAULTS, DeadLetters, publish_confirmed
from worker.logs import REDACTED
from worker.metrics import create_metrics


class Reconnecting:
    """A robust channel whose connection never comes back: its underlay is never handed out."""

    async def get_underlay_channel(self) -> Any:
        await asyncio.Event().wait()


class Recording:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def get_underlay_channel(self) -> Recording:
        return self

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


async def test_waiting_for_a_reconnect_counts_against_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker, "PUBLISH_TIMEOUT_S", 0.05)
    publish = publish_confirmed(
        Reconnecting(),  # type: ignore[arg-type]
        exchange="",
        routing_key="q",
        body=b"{}",
        properties=Basic.Properties(),
    )

    async with asyncio.timeout(5) as outer:  # a backstop: the publish's deadline comes first
        with pytest.raises(BROKER_FAULTS):
            await publish
    assert not outer.expired()


async def test_it_publishes_on_the_current_underlying_channel() -> None:
    channel = Recording()
    properties = Basic.Properties(content_type="application/json")

    await publish_confirmed(
        channel,  # type: ignore[arg-type]
        exchange="identity.events",
        routing_key="account.created",
        body=b"{}",
        properties=properties,
    )

    assert channel.published == [
        {
            "body": b"{}",
            "exchange": "identity.events",
            "routing_key": "account.created",
            "properties": properties,
            "mandatory": False,
        }
    ]


# -- DeadLetters: what a dead letter keeps of the body -----------------------------------------


def _delivery(body: bytes) -> Any:
    return SimpleNamespace(
        routing_key="session.start",
        message_id="m-1",
        correlation_id="c-1",
        reply_to="amq.rabbitmq.reply-to",
        content_type="application/json",
        headers={},
        body=body,
        redelivered=False,
        user_id="web",
    )


DEAD_LETTERED_AT = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


async def _publish(parsed: Any, body: bytes) -> tuple[dict[str, Any], bytes]:
    channel = Recording()
    clock = FakeClock(DEAD_LETTERED_AT)
    dead = DeadLetters(channel, "identity.dead", create_metrics(), clock)  # type: ignore[arg-type]
    await dead.publish(_delivery(body), "not_an_object", parsed)
    [published] = channel.published
    return published, published["body"]


async def _dead_letter(parsed: Any, body: bytes = b"{}") -> dict[str, Any]:
    published, written = await _publish(parsed, body)
    assert published["routing_key"] == "not_an_object"
    record: dict[str, Any] = orjson.loads(written)
    assert record["reason"] == "not_an_object"
    assert record["body_bytes"] == len(body)
    return record


async def test_a_dead_letter_is_the_record_the_tools_read_back() -> None:
    parsed = {"idempotency_key": "key-1", "payload": {"password": "hunter2"}}
    _, written = await _publish(parsed, orjson.dumps(parsed))
    assert orjson.loads(written) == {
        "reason": "not_an_object",
        "command": "session.start",
        "dead_lettered_at": "2026-11-22T09:00:00.000000+00:00",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "reply_to": "amq.rabbitmq.reply-to",
        "content_type": "application/json",
        "delivery_count": 0,
        "body_bytes": len(orjson.dumps(parsed)),
        "body": {"idempotency_key": "key-1", "payload": {"password": REDACTED}},
        "redacted": True,
    }
    record = parse_dead_letter(written)
    assert record.dead_lettered_at == DEAD_LETTERED_AT  # the injected clock, not the wall's
    assert record.body == {"idempotency_key": "key-1", "payload": {"password": REDACTED}}


async def test_an_object_body_is_kept_with_its_secrets_masked() -> None:
    record = await _dead_letter({"payload": {"email": "a@example.com", "password": "hunter2"}})
    assert record["body"] == {"payload": {"email": "a@example.com", "password": REDACTED}}


@pytest.mark.parametrize(
    "parsed",
    [["a@example.com", "hunter2"], "hunter2", 12345, [{"password": "hunter2"}]],
    ids=["list", "string", "number", "list-of-objects"],
)
async def test_a_body_that_is_not_an_object_keeps_only_its_size(parsed: Any) -> None:
    record = await _dead_letter(parsed, orjson.dumps(parsed))
    assert record["body"] is None
    assert "hunter2" not in orjson.dumps(record).decode()


def _nested(depth: int) -> str:
    """A JSON object whose arrays and objects nest `depth` levels."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("depth", [MAX_BODY_DEPTH + 1, 300, 1020])
async def test_an_object_nested_too_deep_to_copy_keeps_only_its_size(depth: int) -> None:
    # Past the record's limit the body is not kept, so the tools can read every record; at
    # 1,020 levels (orjson reads up to 1,024) redacting alone goes past Python's recursion
    # limit. Either way the dead letter must still go out.
    text = _nested(depth)
    record = await _dead_letter(orjson.loads(text), text.encode())
    assert record["body"] is None


async def test_a_body_as_deep_as_the_record_allows_is_kept_and_reads_back() -> None:
    text = _nested(MAX_BODY_DEPTH)
    _, written = await _publish(orjson.loads(text), text.encode())
    assert parse_dead_letter(written).body == orjson.loads(text)


# -- what `dead republish` may send again -----------------------------------------------------


def _command(display_name: str) -> dict[str, Any]:
    return {
        "idempotency_key": "key-1",
        "payload": {
            "account_id": "acct_01jd3m8f2q9v7x4k6t5r0w2y8z",
            "expected_version": 1,
            "display_name": display_name,
        },
    }


async def test_a_dead_letter_says_whether_redaction_changed_its_body() -> None:
    clean = await _dead_letter(_command("Ada"))
    masked = await _dead_letter(_command("ftp://bob:hunter2@files.example.com"))
    assert clean["redacted"] is False
    assert masked["redacted"] is True
    assert masked["body"]["payload"]["display_name"] == "ftp://bob:***@files.example.com"


def _record(body: dict[str, Any], **fields: Any) -> bytes:
    record = {
        "reason": "unexpected_error",
        "command": "account.update",
        "dead_lettered_at": "2026-11-22T09:00:00+00:00",
        "delivery_count": 1,
        "body_bytes": 100,
        "body": body,
        **fields,
    }
    return orjson.dumps(record)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "written-before-the-mark"])
def test_a_body_with_a_masked_url_password_is_not_republished(marked: bool) -> None:
    masked = _command("ftp://bob:***@files.example.com")
    written = _record(masked, redacted=True) if marked else _record(masked)
    letter = DeadLetter.read(_delivery(written))
    assert letter.record is not None
    assert letter.unsendable() == "secrets were redacted: the caller has to send it again"

    clean = DeadLetter.read(_delivery(_record(_command("Ada"), redacted=False)))
    assert clean.unsendable() is None


def test_the_tools_read_a_record_and_tell_a_raw_body_from_it() -> None:
    letter = DeadLetter.read(_delivery(_record(_command("Ada"), message_id="m-9")))
    assert isinstance(letter.record, DeadLetterRecord)
    assert (letter.reason, letter.command, letter.when) == (
        "unexpected_error",
        "account.update",
        "2026-11-22T09:00:00",
    )
    assert letter.ids() == "message_id=m-9 correlation_id=- idempotency_key=key-1"

    raw = DeadLetter.read(_delivery(orjson.dumps(_command("Ada"))))
    assert raw.record is None
    assert raw.reason == "broker:-"
    assert raw.unsendable() == "not a worker record: its raw body may hold secrets"
