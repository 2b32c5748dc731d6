"""Request bodies and replies as bytes: built and read with the `messages` models, no I/O."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from client.errors import InternalError, InvalidRequest, error_for
from messages import COMMANDS, CommandEnvelope, FieldError, Metadata, Reply, spec_of
from messages.models import Model, wire_form

ResultT = TypeVar("ResultT", bound=BaseModel)
ModelT = TypeVar("ModelT", bound=BaseModel)
MetadataArg = Metadata | Mapping[str, Any] | None


def validated(model: type[ModelT], data: Mapping[str, Any], where: str = "payload") -> ModelT:
    """`data` as `model`, or `InvalidRequest` naming each field and problem. pydantic's own
    ValidationError quotes the input it refused (a password, a token) in its text, so it never
    leaves this function, not even as the cause."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            FieldError(
                field=".".join(part for part in (where, *map(str, error["loc"])) if part),
                message=error["msg"],
            )
            for error in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
    raise InvalidRequest(problems)


def payload_of(command: str, payload: Mapping[str, Any]) -> Model:
    """`payload` as the model of `command`'s payload. Raises ValueError for an unknown
    command and `InvalidRequest` for a payload the contract rejects."""
    spec = COMMANDS.get(command)
    if spec is None:
        raise ValueError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    return validated(spec.payload, payload)


def build_request(
    payload: Model, idempotency_key: str | None, metadata: MetadataArg
) -> tuple[bytes, str | None]:
    """The JSON body of the command whose payload is `payload`, and the idempotency key it
    carries.

    Raises `InvalidRequest` for a key or metadata the contract rejects, before anything is
    sent. A state-changing command without a key gets a fresh one: the caller retries under
    it, which is what makes a retry safe.
    """
    if idempotency_key is None and spec_of(type(payload)).changes_state:
        idempotency_key = str(uuid.uuid4())
    if isinstance(metadata, Mapping):
        metadata = validated(Metadata, metadata, "metadata")
    envelope = validated(
        CommandEnvelope,
        {
            "idempotency_key": idempotency_key,
            # The worker needs the real password/token; the models mask secrets unless asked.
            "payload": wire_form(payload, exclude_none=True),
            "metadata": metadata,
        },
        "",
    )
    # wire_form: the worker needs metadata.actor_token revealed as much as the payload's.
    return orjson.dumps(wire_form(envelope, exclude_none=True)), idempotency_key


def read_reply(body: bytes) -> Reply:
    """The reply of an `ok: true` answer; raises the typed error of an `ok: false` one."""
    reply = Reply.model_validate_json(body)
    if reply.ok:
        return reply
    if reply.error is None:
        raise InternalError("the reply has ok: false but no error")
    raise error_for(reply.error)


def read_result(reply: Reply, result_type: type[ResultT]) -> ResultT:
    """The typed result. Through JSON, because the strict models read times and enums from
    JSON text but not from the Python values of an already-decoded object."""
    return result_type.model_validate_json(orjson.dumps(reply.result or {}))
