"""The courier message: what the worker hands the mail sender through `identity.courier`.

Contract v2, section 2. The only place a one-time code travels outside the database. The
worker writes it through its outbox and publishes it to exchange `identity.courier` (routing
key = `kind`), persistent, with its own `user_id` and `expiration` = the code's remaining
lifetime; the mail sender reads it from the quorum queue of the same name. At least once:
`message_id` is stable across republishing, so the mail sender sends one mail per id.

`code` is a `Secret`: it prints masked, and only `wire_form()` (the relay's publish) reveals it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator

from messages.models import AccountId, DisplayName, Model, Secret, UtcDatetime, _no_control_chars

CourierKind = Literal[
    "verification_code",  # to the address to prove: the code that confirms it
    "recovery_code",  # to the account's address: the code that sets a new password
    "email_changed_notice",  # to the OLD address after an email change
    "password_changed_notice",  # the password was changed or reset
]
COURIER_KINDS: tuple[CourierKind, ...] = (
    "verification_code",
    "recovery_code",
    "email_changed_notice",
    "password_changed_notice",
)
# The kinds that carry a code, and so an expiry; the notices carry neither a code nor a secret.
CODE_KINDS: frozenset[str] = frozenset({"verification_code", "recovery_code"})

# Letters, digits and dashes (the worker may send `ABCDEFGH` or `ABCD-EFGH`; the mail shows
# it grouped by four). At least 40 bits is the worker's rule; this only bounds the shape.
_CODE = re.compile(r"[0-9A-Za-z](?:-?[0-9A-Za-z]){3,63}")
# One mailbox, no display name, nothing that could end a header line or add a second address.
_ADDRESS = re.compile(r"[^@\s,;<>()\"]+@[^@\s,;<>()\"\[\]]+")


def _code_shape(value: SecretStr) -> SecretStr:
    # The message never quotes the value: a validation error is logged.
    if not _CODE.fullmatch(value.get_secret_value()):
        raise ValueError("must be 4 to 64 letters or digits, single dashes between them")
    return value


def _one_address(value: str) -> str:
    if not _ADDRESS.fullmatch(value):
        raise ValueError("must be one address, local@domain, without a display name")
    return value


# Safe as the left part of a Message-ID (RFC 5322 dot-atom text) and as a log field.
CourierMessageId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
CourierAddress = Annotated[
    str,
    Field(min_length=3, max_length=320),
    AfterValidator(_no_control_chars),
    AfterValidator(_one_address),
]
CourierCode = Annotated[Secret, AfterValidator(_code_shape)]


class CourierMessage(Model):
    """One mail to send: `{"message_id", "kind", "to", "account_id", "display_name", "code"?,
    "expires_at"?, "occurred_at"}`. Code kinds carry `code` and `expires_at`; notices carry no
    code (and may carry `expires_at`, after which they are not sent either)."""

    message_id: CourierMessageId = Field(
        description="Stable across republishing: one mail per message_id."
    )
    kind: CourierKind
    to: CourierAddress = Field(description="The recipient's address, as the account holds it.")
    account_id: AccountId
    display_name: DisplayName
    code: CourierCode | None = Field(
        default=None, description="The one-time code (code kinds only). Never logged."
    )
    expires_at: UtcDatetime | None = Field(
        default=None, description="When the code stops working; not sent after it."
    )
    occurred_at: UtcDatetime

    @model_validator(mode="after")
    def _code_matches_kind(self) -> CourierMessage:
        if self.kind in CODE_KINDS:
            if self.code is None or self.expires_at is None:
                raise ValueError(f"a {self.kind} message needs code and expires_at")
        elif self.code is not None:
            raise ValueError(f"a {self.kind} message carries no code")
        return self


def parse_courier_message(data: bytes | str) -> CourierMessage:
    """The message in a delivery of `identity.courier`; pydantic's `ValidationError` when it
    is not one. Log only the error's locations and types: its inputs may hold the code."""
    return CourierMessage.model_validate_json(data)
