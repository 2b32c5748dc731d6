"""Steps and checks the integration tests share: unique people, contract shapes, event waits.

Everything goes through the broker (a `Bus`); nothing here calls the service directly.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from tests.conftest import _pg_url
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.workers import WorkerProcess

ACCOUNT_ID = re.compile(r"^acct_[0-9a-z]{26}$")
SESSION_ID = re.compile(r"^ses_[0-9a-z]{32}$")
EVENT_ID = re.compile(r"^evt_[0-9a-z]{26}$")
ARGON2_PREFIX = "$argon2"
EVENT_FIELDS = {
    "event_id",
    "type",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "actor",
    "data",
}


def key(tag: str) -> str:
    """A fresh idempotency key, readable in a log."""
    return f"{tag}-{uuid.uuid4().hex}"


def new_password() -> str:
    """A password no other test sends, so finding it anywhere pins the leak on this test."""
    return f"Quartz-{secrets.token_hex(6)}-meadow-lantern"


@dataclass
class Person:
    email: str
    password: str
    display_name: str

    @classmethod
    def new(cls, tag: str = "person") -> Person:
        return cls(f"{tag}-{uuid.uuid4().hex[:12]}@example.com", new_password(), tag.title())

    def create_payload(self) -> dict[str, Any]:
        return {"email": self.email, "password": self.password, "display_name": self.display_name}

    def credentials(self) -> dict[str, Any]:
        return {"email": self.email, "password": self.password}


async def call_ok(
    bus: Bus, command: str, payload: dict[str, Any], idempotency_key: str | None = None
) -> dict[str, Any]:
    """Send a command and return its result, failing on an error reply."""
    reply = await bus.call(command, payload, key=idempotency_key)
    assert reply["ok"] is True, reply
    assert reply["command"] == command
    result: dict[str, Any] = reply["result"]
    return result


async def call_error(
    bus: Bus, command: str, payload: dict[str, Any], idempotency_key: str | None = None
) -> dict[str, Any]:
    """Send a command and return the error of its reply, failing on success."""
    reply = await bus.call(command, payload, key=idempotency_key)
    assert reply["ok"] is False, reply
    assert reply["command"] == command
    assert "result" not in reply
    error: dict[str, Any] = reply["error"]
    return error


async def sign_up(bus: Bus, person: Person) -> dict[str, Any]:
    """Create `person`'s account; returns the Account."""
    account: dict[str, Any] = (
        await call_ok(bus, "account.create", person.create_payload(), key("create"))
    )["account"]
    return account


async def sign_in(bus: Bus, person: Person) -> dict[str, Any]:
    """Start a session for `person`; returns the result (session, token, account)."""
    return await call_ok(bus, "session.start", person.credentials(), key("start"))


def is_utc_offset_time(value: Any) -> bool:
    return isinstance(value, str) and datetime.fromisoformat(value).utcoffset() is not None


def assert_account(account: dict[str, Any], person: Person | None = None) -> None:
    assert set(account) == {
        "id",
        "email",
        "display_name",
        "created_at",
        "updated_at",
        "version",
        "email_verified",
        "status",
        "roles",
    }
    assert account["status"] in ("active", "disabled")
    assert account["roles"] == sorted(set(account["roles"]))
    assert ACCOUNT_ID.match(account["id"])
    assert is_utc_offset_time(account["created_at"])
    assert is_utc_offset_time(account["updated_at"])
    assert isinstance(account["version"], int)
    assert account["version"] >= 1
    if person is not None:
        assert account["email"] == person.email
        assert account["display_name"] == person.display_name


def assert_session(session: dict[str, Any], account_id: str) -> None:
    assert set(session) == {"id", "account_id", "created_at", "expires_at"}
    assert SESSION_ID.match(session["id"])
    assert session["account_id"] == account_id
    assert is_utc_offset_time(session["created_at"])
    assert is_utc_offset_time(session["expires_at"])
    assert datetime.fromisoformat(session["expires_at"]) > datetime.fromisoformat(
        session["created_at"]
    )


def assert_event(
    event: dict[str, Any], event_type: str, causation_id: str, correlation_id: str | None
) -> None:
    """The contract's event envelope, for an event caused by the command with that key."""
    assert set(event) == EVENT_FIELDS
    assert EVENT_ID.match(event["event_id"])
    assert event["type"] == event_type
    assert is_utc_offset_time(event["occurred_at"])
    assert event["causation_id"] == causation_id
    assert event["correlation_id"] == correlation_id
    # Who caused it: the bus's broker user; no `@self` session in these scenarios.
    assert event["actor"] == {"caller": "guest", "session_id": None}
    assert isinstance(event["data"], dict)


def assert_free_of(document: Any, *secrets_sent: str) -> None:
    """No password, token or password hash anywhere in `document`."""
    text = orjson.dumps(document).decode() if not isinstance(document, str) else document
    for secret in secrets_sent:
        assert secret not in text
    assert ARGON2_PREFIX not in text


async def events_caused_by(
    bus: Bus, idempotency_key: str, count: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Wait for `count` distinct events of one command; returns one copy of each, in order of
    arrival (a republished event has the same event_id and is counted once)."""

    def distinct() -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for event in bus.events_caused_by(idempotency_key):
            seen.setdefault(event["event_id"], event)
        return list(seen.values())

    await bus.wait_for(lambda: len(distinct()) >= count, timeout)
    return distinct()


async def send(
    bus: Bus, command: str, payload: dict[str, Any], idempotency_key: str | None
) -> tuple[str, dict[str, Any]]:
    """Send a command and await its reply; returns (correlation id, reply)."""
    correlation_id = await bus.command(command, payload, idempotency_key)
    return correlation_id, await bus.reply(correlation_id)


async def set_connections_allowed(database_url: str, allowed: bool) -> None:
    """Close (terminating its sessions) or reopen one database of the shared server: an
    outage for the workers of that database only."""
    database = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(_pg_url("postgres"))
    try:
        await admin.execute(
            f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
        )
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
    finally:
        await admin.close()


async def wait_for_log(worker: WorkerProcess, text: str, timeout: float = 30.0) -> None:
    """Wait until the worker's log holds `text`."""
    await eventually(lambda: text in worker.log_text(), timeout=timeout, what=f"logged {text!r}")


async def assert_signed_up_once(
    bus: Bus, sent: dict[str, Person], database_url: str, email_like: str
) -> list[str]:
    """Every `account.create` in `sent` (correlation id -> person) answered with its account,
    the same way each time it was answered; one account per person (emails LIKE
    `email_like`) and one `account.created` event each in the outbox. Returns the event ids."""
    for correlation_id, person in sent.items():
        replies = bus.replies[correlation_id]
        assert all(reply == replies[0] for reply in replies), replies
        assert replies[0]["ok"] is True, replies[0]
        assert replies[0]["result"]["account"]["email"] == person.email
    db = await asyncpg.connect(database_url)
    try:
        created = await db.fetchval("SELECT count(*) FROM accounts WHERE email LIKE $1", email_like)
        events = await db.fetch("SELECT event_id FROM outbox WHERE type = 'account.created'")
    finally:
        await db.close()
    assert created == len(sent)
    assert len(events) == len(sent)
    return [row["event_id"] for row in events]
