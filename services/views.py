"""Stored records as the contract shows them, and the one rule of a live session: shared by
the service's modules (accounts and sessions, refresh tokens, roles)."""

from __future__ import annotations

from datetime import datetime, timedelta

from messages import Account, Session
from stores import AccountRecord, SessionRecord


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


def session_is_live(session: SessionRecord, now: datetime, idle_timeout: timedelta) -> bool:
    """Not ended, not past its absolute lifetime, not idle for `idle_timeout` or longer."""
    return (
        session.ended_at is None
        and now < session.expires_at
        and now - session.last_seen_at < idle_timeout
    )
