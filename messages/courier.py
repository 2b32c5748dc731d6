"""The courier message: what the worker hands the mail sender on `identity.courier`.

The only message of the service that carries a one-time code, and the only place a code
travels outside the database: never in a reply, an event, a log, a metric or a dead letter.
The code is a `Secret`, so the model prints and logs masked; `wire_form` reveals it for the
one publish that needs it, and `parse_courier_message` reads it back on the mail sender's
side.
"""

from __future__ import annotations

from typing import Literal

from messages.models import AccountId, CodeField, Model, UtcDatetime

CourierKind = Literal[
    "verification_code",
    "recovery_code",
    "email_changed_notice",
    "password_changed_notice",
]
COURIER_KINDS: tuple[str, ...] = (
    "verification_code",
    "recovery_code",
    "email_changed_notice",
    "password_changed_notice",
)
# Kinds that carry a code (and `expires_at`); the notices carry neither.
CODE_KINDS = frozenset({"verification_code", "recovery_code"})


class CourierMessage(Model):
    """One mail to send. `message_id` is stable: a redelivered or re-relayed message keeps
    it, so the mail sender sends one mail per `message_id`."""

    message_id: str
    kind: CourierKind
    to: str
    account_id: AccountId
    display_name: str
    # Shown to the person as `ABCD-EFGH`; present exactly for the kinds in CODE_KINDS.
    code: CodeField | None = None
    expires_at: UtcDatetime | None = None
    occurred_at: UtcDatetime


def parse_courier_message(body: bytes | str) -> CourierMessage:
    """Read one courier message as published on `identity.courier` (times as JSON text)."""
    return CourierMessage.model_validate_json(body, strict=False)
