"""The audit trail (worker.audit): a line for every state change and every failed sign-in,
with who, from where, on which account, how it ended and in which trace, and never a secret
or an email address. The worker's pipeline in this process, on both brokers."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.bus import Bus
from worker.audit import configure_audit, log

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _audit_lines(caplog: pytest.LogCaptureFixture, correlation_id: str) -> list[dict[str, Any]]:
    return [
        {key: getattr(record, key, None) for key in _FIELDS} | {"text": caplog.text}
        for record in caplog.records
        if record.name == "identity.audit"
        and getattr(record, "correlation_id", None) == correlation_id
    ]


_FIELDS = (
    "command",
    "caller",
    "client_ip",
    "account_id",
    "outcome",
    "correlation_id",
    "trace_id",
)


def _account() -> dict[str, Any]:
    return {
        "email": f"audit-{uuid.uuid4().hex[:12]}@example.com",
        "password": f"Lantern-{uuid.uuid4().hex[:12]}-harbour",
        "display_name": "Ada Audit",
    }


async def test_a_state_change_is_audited_with_who_where_what_and_trace(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="identity.audit")
    account = _account()
    correlation_id = await bus.publish(
        "account.create",
        {
            "idempotency_key": uuid.uuid4().hex,
            "payload": account,
            "metadata": {"client_ip": "203.0.113.7", "user_agent": "tests"},
        },
        headers={"traceparent": PARENT},
    )
    reply = await bus.reply(correlation_id)
    assert reply["ok"] is True, reply

    (line,) = _audit_lines(caplog, correlation_id)
    assert line["command"] == "account.create"
    assert line["caller"] == bus.user_id
    assert line["client_ip"] == "203.0.113.7"
    assert line["account_id"] == reply["result"]["account"]["id"]
    assert line["outcome"] == "ok"
    assert line["trace_id"] == PARENT.split("-")[1]
    assert account["password"] not in line["text"]
    assert account["email"] not in line["text"]
    assert account["display_name"] not in line["text"]


async def test_a_failed_sign_in_is_audited_without_the_password_or_email(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="identity.audit")
    account = _account()
    assert (await bus.call("account.create", account))["ok"] is True
    wrong = f"Wrong-{uuid.uuid4().hex}"
    correlation_id = await bus.command(
        "session.start",
        {"email": account["email"], "password": wrong},
        key=uuid.uuid4().hex,
    )
    reply = await bus.reply(correlation_id)
    assert reply["ok"] is False

    (line,) = _audit_lines(caplog, correlation_id)
    assert line["command"] == "session.start"
    assert line["outcome"] == "invalid_credentials"
    assert line["caller"] == bus.user_id
    assert line["account_id"] is None
    assert line["trace_id"] is None
    for secret in (wrong, account["password"], account["email"]):
        assert secret not in line["text"]


async def test_a_query_is_not_audited(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="identity.audit")
    correlation_id = await bus.command("account.get", {"account_id": "acct_" + "0" * 26})
    await bus.reply(correlation_id)
    assert _audit_lines(caplog, correlation_id) == []


def test_the_trail_goes_to_its_own_file_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    configure_audit(str(path))
    try:
        log.info("audit", extra={"command": "account.create", "outcome": "ok", "password": "x"})
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
        log.propagate = True
    (line,) = [orjson.loads(text) for text in path.read_text().splitlines()]
    assert line["logger"] == "identity.audit"
    assert (line["command"], line["outcome"]) == ("account.create", "ok")
    assert line["password"] == "[redacted]"
    assert "ts" in line
