"""Small builders shared by the service tests (no fixtures here: those live in conftest)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from messages import CreateAccount, StartSession
from services.operations import CommandContext
from stores import IdentityStore

PASSWORD = "correct horse battery staple"


def ctx(key: str | None = None) -> CommandContext:
    return CommandContext(idempotency_key=key or str(uuid.uuid4()), correlation_id="corr-1")


def create_cmd(email: str = "Ada@Example.com", password: str = PASSWORD) -> CreateAccount:
    return CreateAccount.model_validate(
        {"email": email, "password": password, "display_name": "Ada Lovelace"}
    )


def start_cmd(email: str = "ada@example.com", password: str = PASSWORD) -> StartSession:
    return StartSession.model_validate({"email": email, "password": password})


async def pending_events(store: IdentityStore) -> list[dict[str, Any]]:
    """Committed, unpublished events, oldest first (reading them does not publish them)."""
    async with store.claim_events(10_000) as batch:
        return [orjson.loads(event.body) for event in batch.events]
