"""Modes, end to end. Dev mode: workers started with no keys still accept each other's tokens
(they share keys kept in the database: the access-token key too) and say loudly that
production must not run so. Production: no key is ever read from or written to the database,
and a worker without its access-token keys does not start."""

from __future__ import annotations

import asyncpg
import pytest

from client import AccessTokenVerifier
from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key

pytestmark = pytest.mark.integration

DEV_MODE = {
    "IDENTITY_DEV_MODE": "true",
    "IDENTITY_SIGNING_KEYS": "",
    "IDENTITY_HMAC_KEY": "",
    "IDENTITY_CALLERS": "",
    "IDENTITY_JWT_KEYS": "",
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
        "development-jwt-key",
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


async def test_dev_mode_workers_share_one_access_token_key_and_production_refuses_to_start(
    isolated: Isolated,
) -> None:
    first = isolated.start(**DEV_MODE)
    second = isolated.start(**DEV_MODE)
    status, body = first.http_get("/.well-known/jwks.json")
    assert status == 200
    assert second.http_get("/.well-known/jwks.json") == (status, body)
    assert '"kid":"dev-jwt"' in body
    assert "development-jwt-key" in await stored_secrets(isolated.database_url)
    bus = await isolated.bus()
    person = Person.new("devjwt")
    await call_ok(bus, "account.create", person.create_payload(), key("devjwt"))
    started = await call_ok(bus, "session.start", person.credentials(), key("devjwt"))
    verifier = AccessTokenVerifier.over_http(
        f"http://127.0.0.1:{second.port}/.well-known/jwks.json"
    )
    claims = await verifier.verify_access_token(started["access_token"])
    assert claims.session_id == started["session"]["id"]

    production = isolated.worker(IDENTITY_JWT_KEYS="")
    with pytest.raises(AssertionError, match=r"worker exited \(2\)"):
        production.start(ready_timeout=30)
    assert "IDENTITY_JWT_KEYS" in production.log_text()
