"""A web service behind the identity worker: every request is verified in this process (no
broker round trip), and an expired access token is traded for a new one with the refresh
token. A plain ASGI app with no framework; run it with any ASGI server:

    IDENTITY_AMQP_URL=amqp://guest:guest@localhost/ uvicorn docs.examples.python_web_service:app

    GET  /me        Authorization: Bearer <access token>  -> who you are, or 401
    POST /refresh   body: the refresh token               -> a new access and refresh token
    GET  /admin     as /me, and only for the `admin` role; asks the worker (session.verify
                    with the session token in X-Session-Token): no revocation delay here
"""

from __future__ import annotations

import json
import os
from typing import Any

from client import (
    AccessTokenExpired,
    AccessTokenVerifier,
    IdentityClient,
    InvalidAccessToken,
    InvalidToken,
    SessionExpired,
)

AMQP_URL = os.environ.get("IDENTITY_AMQP_URL", "amqp://guest:guest@localhost/")
JWKS_URL = os.environ.get("IDENTITY_JWKS_URL", "http://localhost:8080/.well-known/jwks.json")

verifier = AccessTokenVerifier.over_http(JWKS_URL)  # keys fetched once, again on a new kid
identity: IdentityClient | None = None  # opened at start-up (see `lifespan` below)


async def respond(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def header(scope: dict[str, Any], name: bytes) -> str:
    return next((v.decode() for k, v in scope["headers"] if k == name), "")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global identity
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                identity = IdentityClient(await connect(AMQP_URL))
                await identity.open()
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    else:
        assert identity is not None
        status, body = await handle(identity, scope, receive)
        await respond(send, status, body)


async def handle(
    identity: IdentityClient, scope: dict[str, Any], receive: Any
) -> tuple[int, dict[str, Any]]:
    path = scope["path"]
    if path == "/refresh" and scope["method"] == "POST":
        refresh_token = (await receive())["body"].decode().strip()
        try:
            # One idempotency key for all its retries: the same refresh token under a new
            # key would look stolen, and the worker would end the session.
            fresh = await identity.refresh_session(refresh_token)
        except (InvalidToken, SessionExpired):
            return 401, {"error": "sign in again"}
        return 200, {
            "access_token": fresh.access_token.get_secret_value(),
            "expires_at": fresh.access_token_expires_at.isoformat(),
            "refresh_token": fresh.refresh_token.get_secret_value(),
        }

    # Every other route: verify the access token here, per request.
    token = header(scope, b"authorization").removeprefix("Bearer ")
    try:
        claims = await verifier.verify_access_token(token)
    except AccessTokenExpired:
        return 401, {"error": "expired: POST /refresh"}
    except InvalidAccessToken:
        return 401, {"error": "not signed in"}

    if path == "/me":
        return 200, {"account_id": claims.account_id, "roles": list(claims.roles)}
    if path == "/admin" and claims.has_role("admin"):
        # Sensitive: ask the worker for the session's state now (a sign-out a second ago
        # counts), instead of trusting a token that may be minutes old.
        try:
            await identity.verify_session(header(scope, b"x-session-token"))
        except (InvalidToken, SessionExpired):
            return 401, {"error": "not signed in"}
        return 200, {"admin": True}
    return 404, {"error": "not found"}


async def connect(url: str) -> Any:
    import aio_pika

    return await aio_pika.connect_robust(url)
