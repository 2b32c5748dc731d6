"""How stored records are shown: the contract's Account, Session and SessionInfo built from
the store's records, the one rule of a live session, and the `session.ended` events of
sessions a command ended. Shared by
every service module, so each shows an account the same way."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from messages import Account, Session, SessionInfo
from messages.events import SessionEnded, SessionEndedData, SessionEndReason
from services.operations import Operation
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


def to_session_info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        id=record.id,
        account_id=record.account_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
        last_seen_at=record.last_seen_at,
        client_ip=record.client_ip,
        user_agent=record.user_agent,
    )


def session_is_live(session: SessionRecord, now: datetime, idle_timeout: timedelta) -> bool:
    """Not ended, not past its absolute lifetime, not idle for `idle_timeout` or longer."""
    return (
        session.ended_at is None
        and now < session.expires_at
        and session.last_seen_at > idle_cutoff(now, idle_timeout)
    )


def idle_cutoff(now: datetime, idle_timeout: timedelta) -> datetime:
    """A session last seen at or before this has idled out. What every command that ends
    sessions passes to the store (`end_session`, `end_all_sessions`), which ends only the live
    ones by the rule of `session_is_live`: one that expired or idled out was over already, and
    is neither counted in `sessions_ended` nor announced by a `session.ended`."""
    return now - idle_timeout


def announce_ended(
    op: Operation, sessions: Sequence[SessionRecord], reason: SessionEndReason, now: datetime
) -> None:
    """One `session.ended` event per session, in the order given."""
    for session in sessions:
        data = SessionEndedData(session_id=session.id, account_id=session.account_id, reason=reason)
        op.emit(SessionEnded, data, now)
