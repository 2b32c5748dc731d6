"""The shipped broker permissions (deploy/rabbitmq/definitions.json) say what the docs say, and
compose uses them. What they allow and refuse on a real broker is tests/security's work."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from messages.topology import (
    COMMANDS_EXCHANGE,
    COMMANDS_EXCHANGE_ARGUMENTS,
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    UNROUTED_EXCHANGE,
)
from worker.callers import CallerPolicy
from worker.topology import BROKER_DEAD_EXCHANGE

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_CONF = ROOT / "deploy" / "rabbitmq" / "compose" / "rabbitmq.conf"
PASSWORDS_SCRIPT = ROOT / "deploy" / "rabbitmq" / "compose" / "dev-passwords.sh"
COMPOSE_CONF_MOUNT = "/etc/rabbitmq/conf.d/20-identity.conf"
CALLERS = ("web-gateway", "admin-tool")


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


def _permission(definitions: dict[str, Any], user: str) -> dict[str, str]:
    [found] = [p for p in definitions["permissions"] if p["user"] == user]
    return {kind: found[kind] for kind in ("configure", "write", "read")}


def _grants(pattern: str, name: str) -> bool:
    # RabbitMQ matches a permission regex anywhere in the name (re:run), as re.search does.
    return pattern != "" and re.search(pattern, name) is not None


def test_no_shipped_user_has_a_password_or_a_tag(definitions: dict[str, Any]) -> None:
    # A published password would work wherever the file is loaded; `impersonator` could forge
    # the user_id the worker authorises by, `administrator` could grant itself anything.
    for user in definitions["users"]:
        assert set(user) == {"name", "tags"}, user
        assert user["tags"] == [], user


def test_every_user_has_permissions_on_the_identity_vhost_only(
    definitions: dict[str, Any],
) -> None:
    users = {user["name"] for user in definitions["users"]}
    assert users == {"identity-worker", *CALLERS, "account-events", "mail-sender"}
    assert {p["user"] for p in definitions["permissions"]} == users
    assert {p["vhost"] for p in definitions["permissions"]} == {"identity"}


@pytest.mark.parametrize("caller", CALLERS)
def test_a_caller_may_publish_commands_and_use_its_own_queues_only(
    definitions: dict[str, Any], caller: str
) -> None:
    allowed = _permission(definitions, caller)

    assert _grants(allowed["write"], COMMANDS_EXCHANGE)
    for name in (EVENTS_EXCHANGE, DEAD_EXCHANGE, "identity.courier", "amq.default", "other.q"):
        assert not _grants(allowed["write"], name), name
    for kind in ("configure", "read"):
        assert _grants(allowed[kind], f"{caller}.replies")
        assert not _grants(allowed[kind], COMMANDS_EXCHANGE)
        assert not _grants(allowed[kind], "identity.worker.v2.fast")
        assert not _grants(allowed[kind], f"x{caller}.replies")


def test_the_subscriber_may_bind_its_own_queues_to_the_events_and_nothing_else(
    definitions: dict[str, Any],
) -> None:
    allowed = _permission(definitions, "account-events")

    assert _grants(allowed["read"], EVENTS_EXCHANGE)
    assert _grants(allowed["write"], "account-events.identity")
    for name in (COMMANDS_EXCHANGE, "identity.courier", DEAD_EXCHANGE):
        assert not _grants(allowed["read"], name), name
        assert not _grants(allowed["write"], name), name


def test_the_mail_sender_reads_the_courier_queue_and_writes_nothing(
    definitions: dict[str, Any],
) -> None:
    # With any write, it could bind a queue it may write (identity.dead, say) to the courier
    # exchange it may read, and copy every code there.
    assert _permission(definitions, "mail-sender") == {
        "configure": "^$",
        "write": "^$",
        "read": r"^identity\.courier$",
    }


def test_the_worker_owns_the_identity_names_and_replies_through_the_default_exchange(
    definitions: dict[str, Any],
) -> None:
    allowed = _permission(definitions, "identity-worker")
    assert _grants(allowed["configure"], "identity.worker.v2.fast")
    assert _grants(allowed["write"], "amq.default")
    assert not _grants(allowed["configure"], "web-gateway.replies")


def test_the_exchanges_are_declared_as_the_worker_declares_them(
    definitions: dict[str, Any],
) -> None:
    exchanges = {e["name"]: e for e in definitions["exchanges"]}
    assert exchanges[COMMANDS_EXCHANGE]["arguments"] == COMMANDS_EXCHANGE_ARGUMENTS
    assert exchanges[COMMANDS_EXCHANGE]["type"] == "direct"
    assert exchanges[UNROUTED_EXCHANGE]["type"] == "fanout"
    assert exchanges[EVENTS_EXCHANGE]["type"] == "topic"
    assert exchanges[DEAD_EXCHANGE]["type"] == "fanout"
    assert exchanges[BROKER_DEAD_EXCHANGE]["internal"] is True
    assert all(e["durable"] and not e["auto_delete"] for e in exchanges.values())


def test_compose_loads_the_definitions_and_runs_the_worker_as_its_user_in_dev_mode() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    broker, worker = compose["services"]["rabbitmq"], compose["services"]["worker"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in broker["volumes"]}
    definitions_path = "/etc/rabbitmq/identity/definitions.json"

    assert mounts[definitions_path] == "./deploy/rabbitmq/definitions.json"
    assert f"load_definitions = {definitions_path}" in COMPOSE_CONF.read_text()
    assert mounts[COMPOSE_CONF_MOUNT] == "./deploy/rabbitmq/compose/rabbitmq.conf"
    environment = worker["environment"]
    assert environment["IDENTITY_DEV_MODE"] == "true"
    assert "IDENTITY_AMQP_URL" not in environment  # built from the generated password
    # ... by the broker's start-up script, into the worker's user's URL file.
    assert environment["IDENTITY_AMQP_URL_FILE"] == "/run/identity-broker/identity-worker.amqp-url"
    assert "amqp://%s:%s@rabbitmq:5672/identity" in PASSWORDS_SCRIPT.read_text()
    policy = CallerPolicy.parse(environment["IDENTITY_CALLERS"])
    assert policy.users == set(CALLERS)


def test_the_compose_password_script_sets_every_shipped_user(definitions: dict[str, Any]) -> None:
    script = PASSWORDS_SCRIPT.read_text()
    listed = re.search(r'^users="([^"]*)"', script, flags=re.MULTILINE)
    assert listed is not None
    assert set(listed.group(1).split()) == {user["name"] for user in definitions["users"]}
    subprocess.run(["sh", "-n", str(PASSWORDS_SCRIPT)], check=True)
