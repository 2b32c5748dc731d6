"""What every service module shows of accounts and sessions: the records as the contract
shapes them, the words a password must not be built from, and the `session.ended` events of
sessions a command ended."""

from __future__ import annotations

from datetime import datetime

from messages import Account, Session
from messages.events import SessionEnded, SessionEndedData, SessionEndReason
from services.operations import Operation
from stores import AccountRecord, SessionRecord

SERVICE_NAME = "identity"


def to_account(record: AccountRecord) -> Account:
    return Account(
        id=record.id,
        email=record.email,
        display_name=record.display_name,
        created_at=record.created_at,
        updated_at=record.updated_at,
        version=record.version,
        email_verified=record.email_verified,
        status="disabled" if record.status == "disabled" else "active",
        roles=sorted(record.roles),
    )


def to_session(record: SessionRecord) -> Session:
    return Session(
        id=record.id,
        account_id=record.account_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
    )


def context_words(email_canonical: str, display_name: str) -> list[str]:
    """Words a password must not be built from: who the account is, and what this is."""
    local, _, domain = email_canonical.partition("@")
    return [local, domain.split(".")[0], display_name, SERVICE_NAME]


def emit_ended(
    op: Operation, sessions: list[SessionRecord], reason: SessionEndReason, now: datetime
) -> None:
    """Queue a `session.ended` event for each of `sessions`."""
    for session in sessions:
        data = SessionEndedData(session_id=session.id, account_id=session.account_id, reason=reason)
        op.emit(SessionEnded, data, now)
