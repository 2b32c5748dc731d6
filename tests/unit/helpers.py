"""Small builders shared by the service tests (no fixtures here: those live in conftest)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from messages import CreateAccount, StartSession
from services.codes import show_code
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
