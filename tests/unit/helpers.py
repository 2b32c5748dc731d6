"""Small builders shared by the service tests (no fixtures here: those live in conftest)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from messages import CreateAccount, StartSession
from services.keys import HmacKey
from services.operations import CommandContext
from stores import IdentityStore, MemoryIdentityStore
from tests.support.factory import TEST_HMAC_KEY

PASSWORD = "correct horse battery staple"


def ctx(key: str | None = None, source: str = "caller:web") -> CommandContext:
    return CommandContext(
        idempotency_key=key or str(uuid.uuid4()), correlation_id="corr-1", source=source
    )


def failures(store: MemoryIdentityStore, email: str, source: str = "caller:web") -> tuple[int, int]:
    """(failures of `source` on `email`, failures of `email` from every source), as counted
    now, read from the memory store's tables (tags made with the tests' HMAC key)."""
    key = HmacKey(TEST_HMAC_KEY)
    email_tag, source_tag = key.email_tag(email), key.source_tag(source)
    pair = store._tables.pairs.get((email_tag, source_tag))
    counter = store._tables.email_counters.get(email_tag)
    return (0 if pair is None else pair.failures, 0 if counter is None else counter.failures)


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
