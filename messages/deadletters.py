"""The dead-letter record: what the worker publishes to `identity.dead` about a message it
could not process, for operators and the `dead` tools. Never a password or a token: the
worker redacts `body` before it builds the record.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from messages.models import Model, UtcDatetime

# How deep a kept body may nest: well inside what pydantic reads (about 200 levels) and
# writes (about 250), so whatever the worker writes, the tools read back. Command bodies nest
# three levels.
MAX_BODY_DEPTH = 64


def _depth(value: object) -> int:
    """How many objects and arrays nest in `value`, without recursing (no stack to exhaust)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in item)
    return deepest


def _shallow(body: dict[str, Any] | None) -> dict[str, Any] | None:
    if body is not None and _depth(body) > MAX_BODY_DEPTH:
        raise ValueError(f"nests deeper than {MAX_BODY_DEPTH} levels")
    return body


class DeadLetterRecord(Model):
    """One dead letter, as the worker writes it (JSON, routing key = `reason`)."""

    reason: str = Field(
        description="Why the message is here. The worker gave up on it: too_large, "
        "wrong_content_type, delivery_limit, malformed_json, not_an_object, "
        "retries_exhausted, unexpected_error, or reply_to_refused (its reply_to is not the "
        "caller's, so nothing ran). Or the broker dead-lettered it and the worker redacted "
        "it: delivery_limit, expired, rejected, maxlen (dead_lettered if the broker gave no "
        "known reason)."
    )
    command: str | None = Field(description="The routing key the message came with.")
    dead_lettered_at: UtcDatetime
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = None
    delivery_count: int = Field(
        ge=0,
        description="The quorum queue's `x-delivery-count` when the worker gave up (0 on a "
        "first delivery, and for what the broker dead-lettered).",
    )
    body_bytes: int = Field(ge=0, description="The size of the body as it arrived.")
    body: Annotated[dict[str, Any] | None, AfterValidator(_shallow)] = Field(
        default=None,
        description="The body with every secret masked, when it was a JSON object that could "
        "be copied; else null and only its size is kept.",
    )
    redacted: bool = Field(
        default=False,
        description="Whether masking changed anything in `body`: such a body is not what was "
        "sent, and is never sent again.",
    )


def parse_dead_letter(data: bytes | str) -> DeadLetterRecord:
    """The record in a message of `identity.dead`; pydantic's `ValidationError` when the
    message is not one (for instance a raw command that the broker dead-lettered itself)."""
    return DeadLetterRecord.model_validate_json(data)
