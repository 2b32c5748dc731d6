"""Shared building blocks: the base model, field types, and the Account and Session shapes."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
)


class Model(BaseModel):
    """Frozen, strict, closed: an unknown field is an error, not a surprise."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


def _iso_utc(value: datetime) -> str:
    # One fixed textual form ("+00:00", microseconds) so that a stored reply replays
    # byte for byte and every consumer sees the offset spelled out.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


UtcDatetime = Annotated[AwareDatetime, PlainSerializer(_iso_utc, when_used="json")]


_REVEAL = {"reveal_secrets": True}


def _reveal_if_asked(value: SecretStr, info: SerializationInfo) -> str:
    """Secrets serialise masked unless the caller explicitly asks (`wire_form` does)."""
    context: Any = info.context
    if isinstance(context, dict) and context.get("reveal_secrets"):
        return value.get_secret_value()
    return "**********"


def wire_form(model: BaseModel, *, exclude_none: bool = False) -> dict[str, Any]:
    """`model` as JSON with its secrets revealed: what the one party that needs them gets (a
    command's payload sent to the worker, a result replied to its caller), and what a
    command's keyed fingerprint is made of. Anywhere else (logs, events, stored replies, dead
    letters) a model serialises with its secrets masked or left out."""
    return model.model_dump(mode="json", context=_REVEAL, exclude_none=exclude_none)


def _no_control_chars(value: str) -> str:
    # Control, format (bidi overrides, zero-width joiners...) and unassigned code points make
    # names that render differently from what they are; refuse them at the edge.
    for char in value:
        if unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            raise ValueError("must not contain control, format or invisible characters")
    if value.strip() != value:
        raise ValueError("must not start or end with white space")
    return value


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters a renderer
# shows as nothing. Most are format characters (Cf, refused above); the rest are letters and
# marks that only fill (Hangul fillers U+115F, U+1160, U+3164, U+FFA0; variation selectors;
# U+034F, U+17B4, U+17B5, U+180B-U+180F), which make a name look empty or like another one.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)  # fmt: skip
# Printable characters that draw nothing: a name made of them looks blank.
_BLANK_GLYPHS = frozenset({0x2800})  # BRAILLE PATTERN BLANK
# Combining marks stacked on one character: enough for any script's real names (a base with
# a few diacritics), not for "zalgo" text that spills over the lines around it.
MAX_COMBINING_RUN = 3


def _invisible(char: str) -> bool:
    code = ord(char)
    return code in _BLANK_GLYPHS or any(low <= code <= high for low, high in _DEFAULT_IGNORABLE)


def _displayable(value: str) -> str:
    """A display name shows what it is: nothing invisible, one line, marks kept in check."""
    _no_control_chars(value)
    run = 0
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category in {"Zl", "Zp"}:
            raise ValueError("must not contain line or paragraph separators")
        if _invisible(char):
            raise ValueError("must not contain invisible filler characters")
        run = run + 1 if category in {"Mn", "Me"} else 0
        if run > MAX_COMBINING_RUN:
            raise ValueError(f"must not stack more than {MAX_COMBINING_RUN} combining marks")
        if run and position == 0:
            raise ValueError("must not start with a combining mark")
    return value


Secret = Annotated[SecretStr, PlainSerializer(_reveal_if_asked, when_used="always")]
PasswordField = Annotated[Secret, Field(min_length=1, max_length=1024)]
TokenField = Annotated[Secret, Field(min_length=1, max_length=512)]
# A one-time code as a person types it (`ABCD-EFGH`, any case, spaces and dashes ignored).
CodeField = Annotated[Secret, Field(min_length=1, max_length=64)]
EmailField = Annotated[str, Field(min_length=3, max_length=320)]
DisplayName = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_displayable)]
AccountId = Annotated[str, Field(pattern=r"^acct_[0-9a-z]{26}$")]
SessionId = Annotated[str, Field(pattern=r"^ses_[0-9a-z]{32}$")]
EventId = Annotated[str, Field(pattern=r"^evt_[0-9a-z]{26}$")]
AccountStatus = Literal["active", "disabled"]
RoleName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.:-]{0,63}$")]
# Why an operator disabled an account: free text for people, carried by the event.
DisableReason = Annotated[
    str, Field(min_length=1, max_length=200), AfterValidator(_no_control_chars)
]


class Account(Model):
    """An account as the outside world sees it: never the password hash."""

    id: AccountId
    email: str
    display_name: str
    created_at: UtcDatetime
    updated_at: UtcDatetime
    version: int = Field(ge=1)
    # Contract v2: proven address, operator's stop, and what the account may do. Defaulted, so
    # an account written by v1 (a reply stored before the upgrade, an event still in the
    # outbox or in a subscriber's queue) still reads.
    email_verified: bool = False
    status: AccountStatus = "active"
    roles: list[RoleName] = Field(default_factory=list)


class Session(Model):
    """A session as the outside world sees it: never the token."""

    id: SessionId
    account_id: AccountId
    created_at: UtcDatetime
    expires_at: UtcDatetime


class SessionInfo(Model):
    """A session as `session.list` shows it: when and from where it was opened (as the caller
    of `session.start` reported it), never its token."""

    id: SessionId
    account_id: AccountId
    created_at: UtcDatetime
    expires_at: UtcDatetime
    # Written at most once per touch interval by `session.verify`: approximate by that much.
    last_seen_at: UtcDatetime
    client_ip: str | None = None
    user_agent: str | None = None


def about_account(model: BaseModel) -> str | None:
    """The id of the account a result or an event's data is about: its `account`'s id, its
    `account_id`, or its `session`'s account; None when it names none.

    Erasure finds stored replies and outbox rows by this id (written beside them), so a result
    or an event that holds an account's data names the account in one of these fields. The
    erasure tests walk every stored value, so one that does not is caught."""
    account = getattr(model, "account", None)
    if isinstance(account, Account):
        return account.id
    account_id = getattr(model, "account_id", None)
    if isinstance(account_id, str):
        return account_id
    session = getattr(model, "session", None)
    if isinstance(session, Session):
        return session.account_id
    return None
