"""Access and refresh tokens end to end, through the broker only: a sign-in's tokens verify
in the caller's process against the worker's JWKS (fetched over the broker and over HTTP from
the sidecar), a refresh rotates them, roles reach the tokens issued after a change, a reused
refresh token ends its session, and no access or refresh token is ever found in the worker's
logs, events, stored replies, dead letters or metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from client import AccessTokenVerifier, IdentityClient
from client.errors import InvalidToken, SessionExpired
from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, assert_free_of, key
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.workers import TEST_JWT_KEYS, WorkerProcess

pytestmark = pytest.mark.integration


def secret_parts(token: str) -> list[str]:
    """The token, and its parts that are secret: a JWT's claims and signature, a refresh
    token's MAC (the session id and generation inside it are not secrets)."""
    parts = token.split(".")
    return [token, *(parts[1:] if token.startswith("eyJ") else parts[-1:])]


@pytest.fixture
async def place(isolated: Isolated) -> AsyncIterator[tuple[WorkerProcess, Bus, IdentityClient]]:
    # No reuse grace: a used refresh token that comes back is theft at once.
    worker = isolated.start(IDENTITY_REFRESH_REUSE_GRACE_S="0")
    bus = await isolated.bus()
    async with IdentityClient.connect(isolated.amqp_url, timeout=15) as client:
        yield worker, bus, client


async def test_sign_in_refresh_and_verify_locally_over_the_broker_and_over_http(
    place: tuple[WorkerProcess, Bus, IdentityClient], isolated: Isolated
) -> None:
    worker, bus, client = place
    ada = Person.new("tokens")
    account = (await client.create_account(ada.email, ada.password, ada.display_name)).account
    started = await client.start_session(ada.email, ada.password)
    access = started.access_token.get_secret_value()

    over_broker = AccessTokenVerifier.over_broker(client)
    jwks_url = f"http://127.0.0.1:{worker.port}/.well-known/jwks.json"
    over_http = AccessTokenVerifier.over_http(jwks_url)
    for verifier in (over_broker, over_http):
        claims = await verifier.verify_access_token(access)
        assert claims.account_id == account.id
        assert claims.session_id == started.session.id
        assert claims.roles == ()
    assert int(started.access_token_expires_at.timestamp()) == claims.expires_at
    assert over_broker.kids == over_http.kids == (TEST_JWT_KEYS.partition(":")[0],)
    status, body = worker.http_get("/.well-known/jwks.json")
    assert status == 200
    assert orjson.loads(body) == (await client.get_jwks()).model_dump(mode="json")

    await client.grant_role(account.id, "admin")
    assert (await client.verify_session(started.token)).account.roles == ["admin"]
    refreshed = await client.refresh_session(started.refresh_token)
    assert refreshed.session.id == started.session.id
    new_claims = await over_broker.verify_access_token(refreshed.access_token.get_secret_value())
    assert new_claims.roles == ("admin",)
    again = await client.refresh_session(refreshed.refresh_token)
    assert again.refresh_token.get_secret_value() != refreshed.refresh_token.get_secret_value()

    # The thief's copy: used up, so presenting it again ends the session for everyone.
    with pytest.raises(InvalidToken):
        await client.refresh_session(refreshed.refresh_token)
    with pytest.raises(SessionExpired):
        await client.refresh_session(again.refresh_token)
    with pytest.raises(SessionExpired):
        await client.verify_session(started.token)
    await bus.wait_for(lambda: bool(bus.events_of("session.ended")))
    [ended] = bus.events_of("session.ended")
    assert ended["data"] == {
        "session_id": started.session.id,
        "account_id": account.id,
        "reason": "refresh_token_reused",
    }
    await bus.wait_for(lambda: bool(bus.events_of("account.roles_changed")))
    assert bus.events_of("account.roles_changed")[0]["data"] == {
        "account_id": account.id,
        "roles": ["admin"],
    }


async def test_no_access_or_refresh_token_in_logs_events_stored_replies_dead_letters_or_metrics(
    place: tuple[WorkerProcess, Bus, IdentityClient], isolated: Isolated
) -> None:
    worker, bus, client = place
    ada = Person.new("no-leak")
    await client.create_account(ada.email, ada.password, ada.display_name)
    signed_in = await bus.call("session.start", ada.credentials(), key("leak-start"))
    assert signed_in["ok"], signed_in
    tokens = [signed_in["result"]["access_token"], signed_in["result"]["refresh_token"]]
    refresh = {"refresh_token": tokens[1]}
    refresh_key = key("leak-refresh")
    refreshed = await bus.call("session.refresh", refresh, refresh_key)
    assert refreshed["ok"], refreshed
    tokens += [refreshed["result"]["access_token"], refreshed["result"]["refresh_token"]]
    replayed = await bus.call("session.refresh", refresh, refresh_key)
    assert replayed["result"] == refreshed["result"]  # the same tokens, derived again
    reused = await bus.call("session.refresh", refresh, key("leak-reuse"))
    assert reused["error"]["code"] == "invalid_token"
    # Messages the worker cannot take, carrying tokens: dead-lettered, and redacted.
    for token in tokens:
        body = {"idempotency_key": key("leak-dead"), "payload": {"refresh_token": token}}
        await bus.publish("session.refresh", orjson.dumps(body), content_type="text/plain")
        await bus.publish("session.refresh", orjson.dumps([body]))
        await bus.publish("session.verify", b'{"payload": {"token": "' + token.encode())
    await bus.wait_for(lambda: len(bus.dead) >= 3 * len(tokens))
    await bus.wait_for(lambda: bool(bus.events_of("session.ended")))
    await eventually(lambda: "dead-lettered" in worker.log_text())

    for token in tokens:
        for part in secret_parts(token):
            assert_free_of(worker.log_text(), part)
            assert_free_of(bus.events, part)
            assert_free_of(bus.dead, part)
            assert_free_of(worker.metrics(), part)
    connection = await asyncpg.connect(isolated.database_url)
    try:
        stored = [row["reply"] for row in await connection.fetch("SELECT reply FROM idempotency")]
        outbox = [bytes(row["body"]) for row in await connection.fetch("SELECT body FROM outbox")]
        sessions = [dict(row) for row in await connection.fetch("SELECT * FROM sessions")]
    finally:
        await connection.close()
    assert len(stored) >= 4
    for token in tokens:
        for part in secret_parts(token):
            assert_free_of(stored, part)
            assert_free_of([body.decode() for body in outbox], part)
            assert_free_of(sessions, part)
