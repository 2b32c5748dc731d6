"""Turning a delivery's bytes into a validated command, or into the contract error it earns.

A bad message is an answer, not an exception: every way a body can be wrong ends in a
`Rejected` carrying the error reply (and, where ops should look at it, a dead-letter reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from messages import COMMANDS, CommandEnvelope, ErrorBody, ErrorCode, FieldError
from messages.commands import IDEMPOTENCY_KEY_RULE, usable_idempotency_key
from messages.models import Model
from services.operations import CommandContext
from worker.sources import throttle_source


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    payload: Model
    context: CommandContext


class Rejected(Exception):
    """The message cannot be processed; `error` is the reply, `dead_letter` a reason to
    keep a redacted copy for operators (None when the reply says all there is to say)."""

    def __init__(
        self,
        error: ErrorBody,
        *,
        dead_letter: str | None = None,
        parsed: Any = None,
        idempotency_key: str | None = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.dead_letter = dead_letter
        self.parsed = parsed
        self.idempotency_key = idempotency_key


def decode_command(
    name: str,
    body: bytes,
    correlation_id: str | None,
    caller: str | None = None,
    gateways: frozenset[str] = frozenset(),
    *,
    trace: tuple[str | None, str | None] = (None, None),
) -> Command:
    """Validate routing key, JSON, envelope and payload, in that order. The context's
    throttling source comes from the caller, and from the metadata only for `gateways`;
    `trace` (traceparent, tracestate, validated by the caller) goes with what it causes."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise Rejected(_error(ErrorCode.UNKNOWN_COMMAND, "Unknown command."))
    data = _parse_object(body)
    try:
        envelope = CommandEnvelope.model_validate(data)
    except ValidationError as exc:
        raise _envelope_rejection(exc, data) from None
    if spec.changes_state and envelope.idempotency_key is None:
        raise Rejected(
            _error(ErrorCode.MALFORMED_MESSAGE, "idempotency_key is required for this command."),
            parsed=data,
        )
    try:
        payload = spec.payload.model_validate(envelope.payload)
    except ValidationError as exc:
        raise Rejected(
            _validation_error(exc, "payload"), idempotency_key=envelope.idempotency_key
        ) from None
    context = CommandContext(
        envelope.idempotency_key,
        correlation_id,
        envelope.metadata,
        caller=caller,
        source=throttle_source(caller, envelope.metadata, gateways),
        traceparent=trace[0],
        tracestate=trace[1],
    )
    return Command(name, payload, context)


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)  # also refuses invalid UTF-8 and lone surrogates
    except orjson.JSONDecodeError:
        raise Rejected(
            _error(ErrorCode.MALFORMED_MESSAGE, "The body is not valid UTF-8 JSON."),
            dead_letter="malformed_json",
        ) from None
    if not isinstance(data, dict):
        raise Rejected(
            _error(ErrorCode.MALFORMED_MESSAGE, "The body must be a JSON object."),
            dead_letter="not_an_object",
        )
    return data


def _envelope_rejection(exc: ValidationError, data: dict[str, Any]) -> Rejected:
    if any(error["loc"][:1] == ("idempotency_key",) for error in exc.errors()):
        message = f"idempotency_key must be a string of {IDEMPOTENCY_KEY_RULE}."
        return Rejected(_error(ErrorCode.MALFORMED_MESSAGE, message), parsed=data)
    # A usable key is echoed in the reply even when the rest of the envelope is not valid.
    key = usable_idempotency_key(data.get("idempotency_key"))
    return Rejected(_validation_error(exc, ""), idempotency_key=key)


# A reply's size is bounded whatever the input: a body of thousands of unknown fields gets
# the first few named, each path and message cut short, never an echo of the whole body.
MAX_FIELD_ERRORS = 10
MAX_FIELD_TEXT = 200


def _validation_error(exc: ValidationError, prefix: str) -> ErrorBody:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    fields = [
        FieldError(field=_cut(_path(prefix, error["loc"])), message=_cut(error["msg"]))
        for error in errors[:MAX_FIELD_ERRORS]
    ]
    message = "The command is not valid."
    if len(errors) > MAX_FIELD_ERRORS:
        message = (
            f"The command is not valid: {len(errors)} problems, the first {len(fields)} listed."
        )
    return ErrorBody(code=ErrorCode.VALIDATION_FAILED, message=message, fields=fields)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_TEXT else text[: MAX_FIELD_TEXT - 1] + "…"


def _path(prefix: str, loc: tuple[int | str, ...]) -> str:
    parts = [prefix] if prefix else []
    parts.extend(str(part) for part in loc)
    return ".".join(parts) or "body"


def _error(code: ErrorCode, message: str) -> ErrorBody:
    return ErrorBody(code=code, message=message)
