"""Throttling by source over the broker, with real worker processes in production mode: the
three goals of contract v2, section 1 (tests/contract/test_service_trust.py counts them over a
simulated day at the service). The test bus publishes as guest; listed in IDENTITY_GATEWAYS,
its `metadata.client_ip` is the source, otherwise guest itself is."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key
from tests.support.bus import Bus

pytestmark = pytest.mark.integration

WRONG = "an entirely wrong passphrase"
VICTIM_IP = "198.51.100.7"
# Locks start at a minute, so none runs out while a test sends its attempts.
GATEWAY = {"IDENTITY_GATEWAYS": "guest", "IDENTITY_THROTTLE_BASE_DELAY_S": "60"}


async def password_command(bus: Bus, command: str, payload: dict[str, Any], client_ip: str) -> str:
    """Send `command` as a gateway would for a client at `client_ip`: "ok" or the error code."""
    body = {
        "idempotency_key": uuid.uuid4().hex,
        "payload": payload,
        "metadata": {"client_ip": client_ip},
    }
    reply = await bus.reply(await bus.publish(command, body))
    return "ok" if reply["ok"] else str(reply["error"]["code"])


async def sign_in(bus: Bus, email: str, password: str, client_ip: str) -> str:
    return await password_command(
        bus, "session.start", {"email": email, "password": password}, client_ip
    )


async def test_the_victim_signs_in_from_its_address_while_the_attackers_are_locked_out(
    isolated: Isolated,
) -> None:
    isolated.start(**GATEWAY)
    bus = await isolated.bus()
    victim = Person.new("victim")
    await call_ok(bus, "account.create", victim.create_payload(), key("victim"))
    assert await sign_in(bus, victim.email, victim.password, VICTIM_IP) == "ok"

    hammer = [await sign_in(bus, victim.email, WRONG, "203.0.113.1") for _ in range(7)]
    assert hammer == ["invalid_credentials"] * 6 + ["rate_limited"]
    spread = [await sign_in(bus, victim.email, WRONG, f"203.0.113.{n}") for n in range(2, 30)]
    # 20 free failures on the email from every source together, and one more sets the lock.
    assert spread.count("invalid_credentials") == 21 - 6
    assert spread[-1] == "rate_limited"
    # Even the right password waits on a new source: the attacker cannot tell it from a guess.
    assert await sign_in(bus, victim.email, victim.password, "192.0.2.1") == "rate_limited"

    assert await sign_in(bus, victim.email, victim.password, VICTIM_IP) == "ok"


async def test_guesses_on_one_email_are_bounded_however_many_addresses_send_them(
    isolated: Isolated,
) -> None:
    isolated.start(**GATEWAY)
    bus = await isolated.bus()
    victim = Person.new("guessed")
    await call_ok(bus, "account.create", victim.create_payload(), key("guessed"))

    outcomes = [
        await sign_in(bus, victim.email, WRONG, f"10.1.{n // 250}.{n % 250}") for n in range(60)
    ]

    assert outcomes.count("invalid_credentials") == 21
    assert outcomes[21:] == ["rate_limited"] * 39


async def test_one_address_cannot_spray_argon2_work_over_many_emails(isolated: Isolated) -> None:
    isolated.start(
        **GATEWAY,
        IDENTITY_SOURCE_HASH_BURST="5",
        IDENTITY_SOURCE_HASH_RATE_PER_S="0.001",
    )
    bus = await isolated.bus()
    sprayer = "203.0.113.99"
    created = [
        await password_command(bus, "account.create", Person.new("spray").create_payload(), sprayer)
        for _ in range(3)
    ]
    guesses = [await sign_in(bus, Person.new("sprayed").email, WRONG, sprayer) for _ in range(4)]

    assert created == ["ok"] * 3
    assert guesses == ["invalid_credentials"] * 2 + ["rate_limited"] * 2
    refused = await password_command(
        bus, "account.create", Person.new("spray").create_payload(), sprayer
    )
    assert refused == "rate_limited"
    # Another address has its own budget.
    other = await password_command(
        bus, "account.create", Person.new("other").create_payload(), "203.0.113.100"
    )
    assert other == "ok"


async def test_a_caller_that_is_not_a_gateway_is_one_source_whatever_client_ip_it_reports(
    isolated: Isolated,
) -> None:
    # No IDENTITY_GATEWAYS: guest's client_ip is kept for audit only.
    isolated.start(IDENTITY_THROTTLE_BASE_DELAY_S="60")
    bus = await isolated.bus()
    victim = Person.new("spoofed")
    await call_ok(bus, "account.create", victim.create_payload(), key("spoofed"))

    outcomes = [await sign_in(bus, victim.email, WRONG, f"203.0.113.{n}") for n in range(1, 9)]

    assert outcomes == ["invalid_credentials"] * 6 + ["rate_limited"] * 2
