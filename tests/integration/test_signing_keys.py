"""Workers started with no signing keys configured still accept each other's tokens: they
share a development key kept in the database, and say loudly that production must not. In
dev mode the same goes for the access-token key; production refuses to start without one."""

from __future__ import annotations

import pytest

from client import AccessTokenVerifier
from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key

pytestmark = pytest.mark.integration


async def test_a_token_from_one_unconfigured_worker_verifies_on_the_next(
    isolated: Isolated,
) -> None:
    first = isolated.start(IDENTITY_SIGNING_KEYS="")
    bus = await isolated.bus()
    person = Person.new("devkey")
    await call_ok(bus, "account.create", person.create_payload(), key("devkey"))
    started = await call_ok(bus, "session.start", person.credentials(), key("devkey"))
    token = started["token"]
    assert token.split(".")[1] == "dev"
    assert "IDENTITY_SIGNING_KEYS is not set" in first.log_text()
    assert first.terminate() == 0

    second = isolated.start(IDENTITY_SIGNING_KEYS="")
    verified = await call_ok(bus, "session.verify", {"token": token})

    assert verified["session"]["id"] == started["session"]["id"]
    assert second.alive()


async def test_dev_mode_workers_share_one_access_token_key_and_production_refuses_to_start(
    isolated: Isolated,
) -> None:
    first = isolated.start(IDENTITY_DEV_MODE="true", IDENTITY_JWT_KEYS="")
    second = isolated.start(IDENTITY_DEV_MODE="true", IDENTITY_JWT_KEYS="")
    status, body = first.http_get("/.well-known/jwks.json")
    assert status == 200
    assert second.http_get("/.well-known/jwks.json") == (status, body)
    assert '"kid":"dev-jwt"' in body
    for worker in (first, second):
        assert "IDENTITY_JWT_KEYS is not set" in worker.log_text()
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
    assert "needs IDENTITY_JWT_KEYS" in production.log_text()
