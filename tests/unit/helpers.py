"""Small builders shared by the service tests (no fixtures here: those live in conftest)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from messages import CreateAccount, StartSession, VerifySession
from services.clock import FakeClock
from services.codes import show_code
from services.errors import SessionExpiredError
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


async def take_mail(store: IdentityStore, service: Any) -> list[dict[str, Any]]:
    """The courier rows committed since the last call, as the relay would publish them (the
    code unsealed and shown), marked relayed: what a mail sender would have received."""
    keys = service._codes.keys
    async with store.claim_mail(10_000) as batch:
        mails = list(batch.mails)
        batch.mark_relayed([mail.seq for mail in mails])
    return [
        {
            "kind": mail.kind,
            "to": mail.recipient,
            "account_id": mail.account_id,
            "code": None
            if mail.sealed_code is None
            else show_code(keys.unseal(mail.message_id, mail.sealed_code)),
        }
        for mail in mails
    ]


async def sessions_live_idle_and_expired(
    service: Any, clock: FakeClock
) -> tuple[str, dict[str, str]]:
    """An account with three sessions, as the clock now stands: one that expired (past its
    lifetime), one that idled out, and one live; its id and the sessions' tokens by state."""

    def verify(token: str) -> VerifySession:
        return VerifySession.model_validate({"token": token})

    account = (await service.create_account(create_cmd(), ctx())).account
    tokens = {}
    tokens["expired"] = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    for _ in range(49):  # used every 29 minutes: it never idles, and outlives its 24 h
        clock.advance(minutes=29)
        await service.verify_session(verify(tokens["expired"]))
    tokens["idle"] = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    clock.advance(minutes=31)
    tokens["live"] = (await service.start_session(start_cmd(), ctx())).token.get_secret_value()
    for state, token in tokens.items():
        if state != "live":
            with pytest.raises(SessionExpiredError):
                await service.verify_session(verify(token))
    return account.id, tokens


def session_id(token: str) -> str:
    """The session id a session token names (`v1.<kid>.<session id>.<mac>`)."""
    return token.split(".")[2]


def ended_session_ids(events: list[dict[str, Any]]) -> list[str]:
    """The session ids of the `session.ended` events among `events`, in order."""
    return [e["data"]["session_id"] for e in events if e["type"] == "session.ended"]
