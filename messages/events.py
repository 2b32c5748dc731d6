"""Domain events published to `identity.events` (routing key = type)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from messages.models import (
    Account,
    AccountId,
    EventId,
    Model,
    RoleName,
    Session,
    SessionId,
    UtcDatetime,
)

SessionEndReason = Literal[
    "sign_out",
    "sign_out_everywhere",
    "password_changed",
    # Contract v2.
    "password_reset",
    "account_disabled",
    "account_deleted",
    "revoked",
    "refresh_token_reused",
    "session_limit",
]


class AccountCreatedData(Model):
    account: Account


class AccountUpdatedData(Model):
    account: Account
    changed: list[str]


class AccountPasswordChangedData(Model):
    account_id: AccountId
    sessions_ended: int = Field(ge=0)


class AccountRolesChangedData(Model):
    account_id: AccountId
    roles: list[RoleName]  # all of them, sorted: what the account holds now


class SessionStartedData(Model):
    session: Session


class SessionEndedData(Model):
    session_id: SessionId
    account_id: AccountId
    reason: SessionEndReason


class AccountDisabledData(Model):
    account_id: AccountId
    reason: str
    sessions_ended: int = Field(ge=0)


class AccountEnabledData(Model):
    account_id: AccountId


class AccountDeletedData(Model):
    """Nothing but the id: the account was erased, and so is what the event could say."""

    account_id: AccountId


class AccountRecoveryRequestedData(Model):
    account_id: AccountId


class AccountPasswordResetData(Model):
    account_id: AccountId
    sessions_ended: int = Field(ge=0)


class AccountEmailVerifiedData(Model):
    account_id: AccountId


class Actor(Model):
    """Who caused an event: the broker user that sent the command (`caller`) and, when the
    command proved an `@self` grant with a session, that session. Names of services and
    opaque ids, never the end user's personal data."""

    caller: str | None = None
    session_id: SessionId | None = None


class _EventBase(Model):
    event_id: EventId
    occurred_at: UtcDatetime
    correlation_id: str | None = None
    causation_id: str | None = None
    # Contract v2, section 5. Defaulted (both null) so an event published before it parses.
    actor: Actor = Field(default_factory=Actor)


class AccountCreated(_EventBase):
    type: Literal["account.created"] = "account.created"
    data: AccountCreatedData


class AccountUpdated(_EventBase):
    type: Literal["account.updated"] = "account.updated"
    data: AccountUpdatedData


class AccountPasswordChanged(_EventBase):
    type: Literal["account.password_changed"] = "account.password_changed"
    data: AccountPasswordChangedData


class AccountRolesChanged(_EventBase):
    type: Literal["account.roles_changed"] = "account.roles_changed"
    data: AccountRolesChangedData


class SessionStarted(_EventBase):
    type: Literal["session.started"] = "session.started"
    data: SessionStartedData


class SessionEnded(_EventBase):
    type: Literal["session.ended"] = "session.ended"
    data: SessionEndedData


class AccountDisabled(_EventBase):
    type: Literal["account.disabled"] = "account.disabled"
    data: AccountDisabledData


class AccountEnabled(_EventBase):
    type: Literal["account.enabled"] = "account.enabled"
    data: AccountEnabledData


class AccountDeleted(_EventBase):
    type: Literal["account.deleted"] = "account.deleted"
    data: AccountDeletedData


class AccountRecoveryRequested(_EventBase):
    type: Literal["account.recovery_requested"] = "account.recovery_requested"
    data: AccountRecoveryRequestedData


class AccountPasswordReset(_EventBase):
    type: Literal["account.password_reset"] = "account.password_reset"
    data: AccountPasswordResetData


class AccountEmailVerified(_EventBase):
    type: Literal["account.email_verified"] = "account.email_verified"
    data: AccountEmailVerifiedData


AnyEvent = (
    AccountCreated
    | AccountUpdated
    | AccountPasswordChanged
    | SessionStarted
    | SessionEnded
    | AccountDisabled
    | AccountEnabled
    | AccountDeleted
    | AccountRecoveryRequested
    | AccountPasswordReset
    | AccountEmailVerified
    | AccountRolesChanged
)

Event = Annotated[AnyEvent, Field(discriminator="type")]

EVENT_TYPES: dict[str, type[_EventBase]] = {
    "account.created": AccountCreated,
    "account.updated": AccountUpdated,
    "account.password_changed": AccountPasswordChanged,
    "account.roles_changed": AccountRolesChanged,
    "session.started": SessionStarted,
    "session.ended": SessionEnded,
    "account.disabled": AccountDisabled,
    "account.enabled": AccountEnabled,
    "account.deleted": AccountDeleted,
    "account.recovery_requested": AccountRecoveryRequested,
    "account.password_reset": AccountPasswordReset,
    "account.email_verified": AccountEmailVerified,
}

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(body: bytes | str) -> Event:
    """Parse and validate one event body as published on `identity.events`."""
    return _EVENT_ADAPTER.validate_json(body)
