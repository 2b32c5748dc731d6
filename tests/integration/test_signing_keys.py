"""Modes, end to end. Dev mode: workers started with no keys still accept each other's tokens
(they share keys kept in the database) and say loudly that production must not run so.
Production: no key is ever read from or written to the database."""

from __future__ import annotations

import asyncpg
import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key

pytestmark = pytest.mark.integration

DEV_MODE = {
    "IDENTITY_DEV_MODE": "true",
    "IDENTITY_SIGNING_KEYS": "",
    "IDENTITY_HMAC_KEY": "",
    "IDENTITY_CALLERS": "",
}


async def stored_secrets(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row["name"] for row in await conn.fetch("SELECT name FROM shared_secrets")]
    finally:
        await conn.close()


async def test_a_token_from_one_dev_mode_worker_verifies_on_the_next(isolated: Isolated) -> None:
    first = isolated.start(**DEV_MODE)
    bus = await isolated.bus()
    person = Person.new("devkey")
    await call_ok(bus, "account.create", person.create_payload(), key("devkey"))
    started = await call_ok(bus, "session.start", person.credentials(), key("devkey"))
    token = started["token"]
    assert token.split(".")[1] == "dev"
    assert "IDENTITY_DEV_MODE is true" in first.log_text()
    assert "identity_dev_mode 1.0" in first.metrics()
    assert first.terminate() == 0

    second = isolated.start(**DEV_MODE)
    verified = await call_ok(bus, "session.verify", {"token": token})

    assert verified["session"]["id"] == started["session"]["id"]
    assert second.alive()
    assert sorted(await stored_secrets(isolated.database_url)) == [
        "development-hmac-key",
        "development-signing-key",
    ]


async def test_a_production_worker_keeps_no_key_in_the_database(isolated: Isolated) -> None:
    worker = isolated.start()
    bus = await isolated.bus()
    person = Person.new("prodkey")
    await call_ok(bus, "account.create", person.create_payload(), key("prodkey"))
    await call_ok(bus, "session.start", person.credentials(), key("prodkey"))

    assert "identity_dev_mode 0.0" in worker.metrics()
    assert "IDENTITY_DEV_MODE is true" not in worker.log_text()
    assert await stored_secrets(isolated.database_url) == []
