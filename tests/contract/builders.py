"""Records with unique ids and emails, so contract tests share one database without clashing."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from stores import AccountRecord, IdempotencyRecord, NewEvent, SessionRecord

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

# An idle cutoff before any session of these tests was seen: none has idled out.
SEEN_BEFORE = T0 - timedelta(days=1)


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def account(**overrides: Any) -> AccountRecord:
    email = unique("user") + "@example.com"
    fields: dict[str, Any] = {
        "id": unique("acct"),
        "email": email,
        "email_canonical": email,
        "display_name": "Ada",
        "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        "created_at": T0,
        "updated_at": T0,
        "version": 1,
    }
    return AccountRecord(**(fields | overrides))


def session(account_id: str, **overrides: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "id": unique("ses"),
        "account_id": account_id,
        "key_id": "k1",
        "created_at": T0,
        "expires_at": T0 + timedelta(days=30),
        "last_seen_at": T0,
    }
    return SessionRecord(**(fields | overrides))


def idempotency(**overrides: Any) -> IdempotencyRecord:
    fields: dict[str, Any] = {
        "key": unique("key"),
        "command": "account.create",
        "fingerprint": "f" * 64,
        "reply": {"ok": True, "result": {"account": {"id": "acct_1", "version": 1}}},
        "created_at": T0,
    }
    return IdempotencyRecord(**(fields | overrides))


def event(**overrides: Any) -> NewEvent:
    event_id = unique("evt")
    fields: dict[str, Any] = {
        "event_id": event_id,
        "type": "account.created",
        "body": b'{"event_id": "' + event_id.encode() + b'"}',
        "created_at": T0,
    }
    return NewEvent(**(fields | overrides))
