"""Workers started with no signing keys configured still accept each other's tokens: they
share a development key kept in the database, and say loudly that production must not."""

from __future__ import annotations

import pytest

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
