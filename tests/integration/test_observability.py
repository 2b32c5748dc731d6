"""What an operator sees of the worker: Prometheus metrics on the sidecar, and one JSON log
line per command (successful queries only when IDENTITY_LOG_QUERIES is set), with nothing
secret in either."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, assert_free_of, key, send
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration

Labels = dict[str, str]


def _samples(worker: WorkerProcess) -> dict[str, list[tuple[Labels, float]]]:
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(worker: WorkerProcess, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (0 if none yet)."""
    return sum(
        value
        for series, value in _samples(worker).get(name, [])
        if all(series.get(k) == v for k, v in labels.items())
    )


def _command_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    return worker.log_entries("command")


async def test_metrics_count_commands_by_outcome_and_time_them(
    bus: Bus, worker: WorkerProcess
) -> None:
    created = _value(worker, "identity_commands_total", command="account.create", outcome="ok")
    missing = _value(worker, "identity_commands_total", command="account.get", outcome="not_found")
    timed = _value(worker, "identity_command_duration_seconds_count", command="account.create")

    await send(bus, "account.create", Person.new("metrics").create_payload(), key("m"))
    await send(bus, "account.get", {"account_id": "acct_" + "1" * 26}, None)

    def counted() -> bool:
        return (
            _value(worker, "identity_commands_total", command="account.create", outcome="ok")
            == created + 1
            and _value(
                worker, "identity_commands_total", command="account.get", outcome="not_found"
            )
            == missing + 1
        )

    await eventually(counted)
    await eventually(
        lambda: (
            _value(worker, "identity_command_duration_seconds_count", command="account.create")
            == timed + 1
        )
    )
    buckets = [
        labels["le"]
        for labels, _ in _samples(worker)["identity_command_duration_seconds_bucket"]
        if labels["command"] == "account.create"
    ]
    assert "+Inf" in buckets
    assert len(buckets) > 5


async def test_a_malformed_message_is_counted_under_its_own_outcome(
    bus: Bus, worker: WorkerProcess
) -> None:
    before = _value(worker, "identity_malformed_messages_total", reason="malformed_message")

    await bus.reply(await bus.publish("account.get", b"not json"))

    await eventually(
        lambda: (
            _value(worker, "identity_malformed_messages_total", reason="malformed_message")
            == before + 1
        )
    )


async def test_metrics_count_a_replayed_duplicate(bus: Bus, worker: WorkerProcess) -> None:
    payload = Person.new("replaymetric").create_payload()
    dup_key = key("replaymetric")
    await send(bus, "account.create", payload, dup_key)
    before = _value(worker, "identity_idempotent_replays_total", command="account.create")

    await send(bus, "account.create", payload, dup_key)

    await eventually(
        lambda: (
            _value(worker, "identity_idempotent_replays_total", command="account.create")
            == before + 1
        )
    )


async def test_metrics_report_the_dependencies_up_and_the_outbox_drained(
    worker: WorkerProcess,
) -> None:
    assert _value(worker, "identity_ready") == 1
    assert _value(worker, "identity_broker_connected") == 1
    assert _value(worker, "identity_database_up") == 1
    assert "identity_outbox_backlog" in _samples(worker)


@pytest.mark.parametrize("log_queries", [False, True], ids=["default", "log_queries"])
async def test_each_command_is_logged_once_with_its_outcome_and_never_a_secret(
    isolated: Isolated, log_queries: bool
) -> None:
    worker = isolated.start(IDENTITY_LOG_QUERIES=str(log_queries).lower())
    bus = await isolated.bus()
    person = Person.new("logged")
    new_password = f"{person.password}-next"

    sent: dict[str, tuple[str, str | None]] = {}  # correlation id -> (command, key)
    quiet: set[str] = set()  # successful queries: logged only when asked for

    async def run(command: str, payload: dict[str, Any], k: str | None) -> dict[str, Any]:
        correlation_id, reply = await send(bus, command, payload, k)
        sent[correlation_id] = (command, k)
        if reply["ok"] and command in ("session.verify", "account.get"):
            quiet.add(correlation_id)
        return reply

    created = await run("account.create", person.create_payload(), key("log-create"))
    account_id = created["result"]["account"]["id"]
    started = await run("session.start", person.credentials(), key("log-start"))
    token = started["result"]["token"]
    await run("session.verify", {"token": token}, None)
    await run("account.get", {"account_id": account_id}, None)
    await run("account.get", {"account_id": "acct_" + "1" * 26}, None)  # not_found
    wrong = {"email": person.email, "password": f"{person.password}-wrong"}
    await run("session.start", wrong, key("log-wrong"))
    change = {
        "account_id": account_id,
        "current_password": person.password,
        "new_password": new_password,
    }
    await run("account.change_password", change, key("log-change"))
    await run("session.end", {"token": token}, key("log-end"))
    await run("session.verify", {"token": token}, None)  # session_expired
    expected = {cid: sent[cid] for cid in sent if log_queries or cid not in quiet}
    assert len(quiet) == 2
    await eventually(lambda: len(_command_lines(worker)) >= len(expected))

    lines = {line["correlation_id"]: line for line in _command_lines(worker)}
    assert len(_command_lines(worker)) == len(expected)
    assert set(lines) == set(expected)
    for correlation_id, (command, idempotency_key) in expected.items():
        line = lines[correlation_id]
        assert line["command"] == command
        assert line["idempotency_key"] == idempotency_key
        assert isinstance(line["duration_ms"], float | int)
        assert line["duration_ms"] >= 0
    outcomes = [lines[cid]["outcome"] for cid in expected]
    assert outcomes == [
        "ok",
        "ok",
        *(["ok", "ok"] if log_queries else []),
        "not_found",
        "invalid_credentials",
        "ok",
        "ok",
        "session_expired",
    ]
    # Every command is counted, logged or not.
    for command in ("session.verify", "account.get"):
        assert _value(worker, "identity_commands_total", command=command, outcome="ok") == 1
    assert_free_of(worker.log_text(), person.password, new_password, wrong["password"], token)
