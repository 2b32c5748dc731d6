"""A database outage while commands arrive: they are retried with back-off and answered once
the database is back, or, when the retries run out first, answered `internal_error` with a
redacted dead letter. Never a bug report for what is an outage.

The outage is one worker's own database refusing connections (ALLOW_CONNECTIONS false, its
sessions terminated), so the shared PostgreSQL keeps serving everyone else.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Isolated
from tests.integration.scenarios import (
    Person,
    assert_free_of,
    key,
    set_connections_allowed,
    wait_for_log,
)

pytestmark = pytest.mark.integration


async def test_commands_sent_during_a_database_outage_are_retried_and_answered_after_it(
    isolated: Isolated,
) -> None:
    # Attempts enough that the back-off outlasts the outage by far (it is capped at 60 s).
    worker = isolated.start(IDENTITY_RETRY_ATTEMPTS="30", IDENTITY_RETRY_MAX_DELAY_S="1")
    bus = await isolated.bus()
    person = Person.new("outage")

    await set_connections_allowed(isolated.database_url, False)
    try:
        correlation_id = await bus.command("account.create", person.create_payload(), key("outage"))
        await wait_for_log(worker, "transient fault, retrying")
    finally:
        await set_connections_allowed(isolated.database_url, True)
    reply = await bus.reply(correlation_id, timeout=60)

    assert reply["ok"] is True, reply
    assert reply["result"]["account"]["email"] == person.email
    assert "unexpected error" not in worker.log_text()


async def test_a_command_whose_retries_run_out_gets_internal_error_and_a_redacted_dead_letter(
    isolated: Isolated,
) -> None:
    worker = isolated.start(IDENTITY_RETRY_ATTEMPTS="2")
    bus = await isolated.bus()
    person = Person.new("exhausted")

    await set_connections_allowed(isolated.database_url, False)
    try:
        correlation_id = await bus.command(
            "account.create", person.create_payload(), key("exhausted")
        )
        reply = await bus.reply(correlation_id, timeout=60)
    finally:
        await set_connections_allowed(isolated.database_url, True)

    assert reply["ok"] is False
    assert reply["error"]["code"] == "internal_error"
    await bus.wait_for(lambda: any(d["correlation_id"] == correlation_id for d in bus.dead))
    [dead] = [d for d in bus.dead if d["correlation_id"] == correlation_id]
    assert dead["reason"] == "retries_exhausted"
    assert dead["body"]["payload"]["password"] == "[redacted]"
    assert dead["body"]["payload"]["email"] == person.email
    assert_free_of(dead, person.password)
    assert_free_of(worker.log_text(), person.password)
    # The same command, sent again once the database is back, goes through.
    again = await bus.call("account.create", person.create_payload(), key("exhausted-again"))
    assert again["ok"] is True, again
