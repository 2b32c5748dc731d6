"""The AsyncAPI 3.0 document of the contract, generated from the message models.

Every schema comes from `model_json_schema` of the models in this package (their `$defs` are
lifted into `components/schemas`); this module only arranges them into channels, operations
and messages. The output is deterministic (sorted keys, stable lists) so that the committed
`docs/asyncapi.json` can be compared with a fresh rendering in a test.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from messages.commands import COMMANDS, ActsOn, CommandEnvelope, CommandSpec
from messages.courier import COURIER_KINDS, CourierMessage
from messages.deadletters import DeadLetterRecord
from messages.events import EVENT_TYPES
from messages.replies import ErrorBody, ErrorCode, Reply
from messages.topology import (
    COMMANDS_EXCHANGE,
    CONTENT_TYPE,
    COURIER_EXCHANGE,
    COURIER_QUEUE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
)

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"
_AMQP = "0.3.0"  # AMQP bindings version
_SCHEMAS = "#/components/schemas/"
_PERSISTENT = 2

ERROR_CODE_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED_MESSAGE: "Not JSON, not an object, or no usable idempotency key.",
    ErrorCode.UNKNOWN_COMMAND: "The routing key names no command of this contract.",
    ErrorCode.VALIDATION_FAILED: "A field is missing or wrong; `fields` says which and why.",
    ErrorCode.IDEMPOTENCY_KEY_REUSED: "The key was used for a different command or payload.",
    ErrorCode.EMAIL_TAKEN: "Another account has this email (letter case ignored).",
    ErrorCode.INVALID_CREDENTIALS: "Unknown email or wrong password (not told apart).",
    ErrorCode.RATE_LIMITED: "Too many failed attempts; wait `retry_after_s` seconds.",
    ErrorCode.INVALID_TOKEN: "The session or refresh token is not one this service issued, "
    "or the refresh token was used already (which ends its session).",
    ErrorCode.SESSION_EXPIRED: "The session has ended or expired; sign in again.",
    ErrorCode.NOT_FOUND: "No such account (or session, for `session.revoke`); erased ones too.",
    ErrorCode.VERSION_CONFLICT: "`expected_version` is not the account's current version.",
    ErrorCode.INTERNAL_ERROR: "The worker could not process the command after its retries.",
    ErrorCode.FORBIDDEN: "The caller (AMQP `user_id`) may not send this command; nothing ran.",
    ErrorCode.INVALID_CODE: "The one-time code is wrong, expired, used or voided.",
    ErrorCode.EMAIL_NOT_VERIFIED: "Right password, but the email address is not verified yet.",
    ErrorCode.ACCOUNT_DISABLED: "Right password, but an operator disabled the account.",
}

EVENT_SUMMARIES: dict[str, str] = {
    "account.created": "An account was created.",
    "account.updated": "The email and/or display name changed; `changed` lists which.",
    "account.password_changed": "The password changed and the account's live sessions ended.",
    "account.roles_changed": "A role was granted or revoked; `roles` is the whole new set.",
    "session.started": "Someone signed in (never carries the token).",
    "session.ended": "A session ended; `reason` says why (sign-out, a reused refresh token, ...).",
    "account.disabled": "An operator disabled the account; its live sessions ended.",
    "account.enabled": "A disabled account was enabled: it may sign in again.",
    "account.deleted": "The account was erased: delete what you keep about it.",
    "account.recovery_requested": "A recovery code was mailed to an account (never the code).",
    "account.password_reset": "A password was set with a recovery code; every live session ended.",
    "account.email_verified": "The account's email address was proven with a mailed code.",
}

_DESCRIPTION = (
    "Commands in with request/reply, domain events out, over RabbitMQ (AMQP 0-9-1). "
    "Generated from the message models; the contract explained with examples, error "
    "handling, idempotency and delivery semantics is in docs/contract.md.\n\n"
    "Trust: every command is authorised by its AMQP `user_id` (RabbitMQ refuses a "
    "`user_id` that is not the publishing connection's user) against the worker's caller "
    "policy (IDENTITY_CALLERS); a command the policy does not grant is answered `forbidden` "
    "and nothing runs. A grant `@self` lets a caller act only on the account whose live "
    "session token it sends as `metadata.actor_token`. Replies, events and dead letters are "
    "published with `user_id` = the worker's broker user: a consumer that knows that user "
    "drops anything else as a forgery. Callers need no permission on the identity exchanges "
    "but write on `identity.commands` (check them with passive declares)."
)


_CORRELATION_IDS = {
    "request": {
        "description": "AMQP property; the reply echoes the command's `correlation_id`, "
        "or its `message_id` when it had none.",
        "location": "$message.header#/correlation_id",
    },
    "event": {
        "description": "The `correlation_id` of the command that caused the event.",
        "location": "$message.payload#/correlation_id",
    },
}
_REPLY_ADDRESSES = {
    "replyTo": {
        "description": "AMQP property `reply_to` of the command.",
        "location": "$message.header#/reply_to",
    }
}
_SERVERS = {
    "rabbitmq": {
        "host": "localhost:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "description": "The RabbitMQ broker the worker is attached to.",
    }
}


def _camel(name: str) -> str:
    """`account.change_password` -> `AccountChangePassword`."""
    return "".join(part.capitalize() for part in name.replace("_", ".").split("."))


def _lower_camel(name: str) -> str:
    camel = _camel(name)
    return camel[0].lower() + camel[1:]


def _model_schemas() -> dict[str, Any]:
    """All model schemas in one namespace, with refs pointing into `components/schemas`."""
    # Validation mode describes what a conforming producer must send; it keeps
    # `format: date-time` that the serialiser's plain-string output would lose.
    mode: JsonSchemaMode = "validation"
    models: list[type[BaseModel]] = [
        CommandEnvelope,
        Reply,
        ErrorBody,
        DeadLetterRecord,
        CourierMessage,
    ]
    for spec in COMMANDS.values():
        models += [spec.payload, spec.result]
    models += list(EVENT_TYPES.values())
    _, top = models_json_schema([(m, mode) for m in models], ref_template=_SCHEMAS + "{model}")
    schemas: dict[str, Any] = top["$defs"]
    schemas["ErrorCode"]["description"] = "\n".join(
        f"- `{code.value}`: {meaning}" for code, meaning in ERROR_CODE_MEANINGS.items()
    )
    for event_model in EVENT_TYPES.values():
        # `type` has a default in the model, but it is the union's discriminator: every event
        # on the wire carries it, and `parse_event` needs it.
        required = schemas[event_model.__name__]["required"]
        if "type" not in required:
            required.insert(0, "type")
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMAS + name}


def _command_envelope(spec: CommandSpec, envelope: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(envelope)
    schema["title"] = f"{spec.name} command"
    schema["description"] = spec.summary
    schema["properties"]["payload"] = _ref(spec.payload.__name__)
    if spec.changes_state:
        key = schema["properties"]["idempotency_key"]
        key_string = next(b for b in key.pop("anyOf") if b.get("type") == "string")
        key.pop("default", None)
        key.update(key_string)
        key["description"] = "Required: the same key with the same payload is one operation."
        schema["required"] = ["idempotency_key", *schema["required"]]
    return schema


def _reply_envelope(reply: dict[str, Any], ok: bool, command: str | None) -> dict[str, Any]:
    schema = copy.deepcopy(reply)
    props = schema["properties"]
    props["ok"]["const"] = ok
    if ok:
        props["result"] = _ref(COMMANDS[str(command)].result.__name__)
        props["command"]["const"] = command
        del props["error"]
        schema["title"] = f"{command} reply (success)"
    else:
        props["error"] = _ref(ErrorBody.__name__)
        del props["result"]
        schema["title"] = "Reply (failure)"
    # The reply writer always emits these four keys (`idempotency_key` may be null).
    schema["required"] = ["ok", "command", "idempotency_key", "result" if ok else "error"]
    return schema


def _all_schemas() -> dict[str, Any]:
    schemas = _model_schemas()
    envelope, reply = schemas.pop("CommandEnvelope"), schemas.pop("Reply")
    extra: dict[str, Any] = {"ErrorReply": _reply_envelope(reply, False, None)}
    for spec in COMMANDS.values():
        extra[_camel(spec.name) + "Command"] = _command_envelope(spec, envelope)
        extra[_camel(spec.name) + "Reply"] = _reply_envelope(reply, True, spec.name)
    clash = schemas.keys() & extra.keys()
    if clash:
        raise RuntimeError(f"schema names clash: {sorted(clash)}")
    return schemas | extra


def _exchange_binding(name: str, kind: str) -> dict[str, Any]:
    exchange = {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"}
    return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": _AMQP}}


def _channel(address: str | None, message_ids: list[str], **extra: Any) -> dict[str, Any]:
    messages = {m: {"$ref": f"#/components/messages/{m}"} for m in message_ids}
    return {"address": address, "messages": messages, **extra}


# Every message may carry the W3C trace context of the command it belongs to (contract v2,
# section 5): a command's is the caller's, and what the command causes carries the same trace.
_TRACE_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": (
        "W3C trace context. On a command: optional, the caller's (a malformed one is ignored). "
        "On a reply, event or courier message: the command's, with the same trace id."
    ),
    "properties": {
        "traceparent": {
            "type": "string",
            "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
            "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        },
        "tracestate": {"type": "string", "maxLength": 512},
    },
}


def _message(name: str, title: str, summary: str, payload: Any, where: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": CONTENT_TYPE,
        "headers": _TRACE_HEADERS,
        "payload": payload,
        "correlationId": {"$ref": f"#/components/correlationIds/{where}"},
    }


def _authorised(spec: CommandSpec) -> str:
    """Who may send the command: what the caller policy checks for it."""
    text = (
        "Authorised by the AMQP `user_id` against the caller policy; without a grant the "
        "reply is `forbidden` and nothing runs (nothing is stored under the idempotency key)."
    )
    if spec.allows_self_grant:
        target = (
            "the account of `payload.session_id`"
            if spec.acts_on is ActsOn.SESSION_ACCOUNT
            else f"`{spec.acts_on.value}`"
        )
        text += (
            f" It acts on {target}: a caller granted `{spec.name}@self` must send "
            "`metadata.actor_token`, a live session token of that very account."
        )
    return text


def _operation(action: str, channel: str, message: str, summary: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
    }


class _Builder:
    """Accumulates channels, operations and messages; one method per part of the contract."""

    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}

    def commands(self) -> None:
        for spec in COMMANDS.values():
            self._command(spec)
        self.channels["reply"] = _channel(
            None,
            [_lower_camel(name) + "Reply" for name in COMMANDS],
            title="Replies",
            description=(
                "The queue named by the command's `reply_to`, reached through the default "
                f"exchange: `{DIRECT_REPLY_TO}`, or a queue whose name starts with the "
                "caller's broker user and a dot (`web.replies`); with no caller policy "
                "(development) any queue whose name does not start with `identity.`. A "
                "command with any other `reply_to` is not run, gets no reply, and is "
                "dead-lettered (reason `reply_to_refused`). At most one reply per delivery "
                "that has a `reply_to`, published with `user_id` = the worker's broker user; "
                "a reply the broker refuses (a full queue) or returns (no such queue) is "
                "lost, never retried."
            ),
            bindings=_exchange_binding("", "default"),
        )

    def _command(self, spec: CommandSpec) -> None:
        channel, name = _lower_camel(spec.name), _camel(spec.name)
        command_id, reply_id = channel + "Command", channel + "Reply"
        self.messages[command_id] = _message(
            spec.name, f"{spec.name} command", spec.summary, _ref(name + "Command"), "request"
        )
        self.messages[command_id]["description"] = _authorised(spec)
        self.messages[reply_id] = _message(
            f"{spec.name}.reply",
            f"{spec.name} reply",
            f"`result` is {spec.result.__name__} on success, `error` an ErrorBody if not.",
            {"oneOf": [_ref(name + "Reply"), _ref("ErrorReply")]},
            "request",
        )
        self.channels[channel] = _channel(
            spec.name,
            [command_id],
            title=spec.name,
            description=f"Routing key `{spec.name}` on `{COMMANDS_EXCHANGE}`.",
            bindings=_exchange_binding(COMMANDS_EXCHANGE, "direct"),
        )
        operation = _operation("send", channel, command_id, spec.summary)
        amqp = {"deliveryMode": _PERSISTENT, "mandatory": True, "bindingVersion": _AMQP}
        operation["bindings"] = {"amqp": amqp}
        operation["reply"] = {
            "address": {"$ref": "#/components/replyAddresses/replyTo"},
            "channel": {"$ref": "#/channels/reply"},
            "messages": [{"$ref": f"#/channels/reply/messages/{reply_id}"}],
        }
        self.operations["send" + name] = operation

    def events(self) -> None:
        for event_type, model in EVENT_TYPES.items():
            channel, message_id = _lower_camel(event_type), _lower_camel(event_type) + "Event"
            summary = EVENT_SUMMARIES[event_type]
            self.messages[message_id] = _message(
                event_type, event_type, summary, _ref(model.__name__), "event"
            )
            self.channels[channel] = _channel(
                event_type,
                [message_id],
                title=event_type,
                description=f"Routing key `{event_type}` on `{EVENTS_EXCHANGE}` (topic).",
                bindings=_exchange_binding(EVENTS_EXCHANGE, "topic"),
            )
            operation = _operation("receive", channel, message_id, summary)
            operation["bindings"] = {"amqp": {"ack": True, "bindingVersion": _AMQP}}
            self.operations["receive" + _camel(event_type)] = operation

    def dead_letters(self) -> None:
        summary = "Redacted copy of a message the worker could not process (for operators)."
        self.messages["deadLetter"] = {
            "name": "dead-letter",
            "title": "Dead letter",
            "summary": summary,
            "description": (
                "The worker's record of the message, routed by `reason`: its envelope, its "
                "size, and its body with every secret masked when it was a JSON object. "
                "What the broker dead-letters itself (a command past its queue's delivery "
                "limit, expired, or rejected) goes first to an internal exchange only the "
                "worker reads, and arrives here as the same redacted record, with the "
                "broker's reason. Nothing raw ever reaches this queue. Published with "
                "`user_id` = the worker's broker user."
            ),
            "contentType": CONTENT_TYPE,
            "payload": _ref(DeadLetterRecord.__name__),
        }
        queue = {"name": DEAD_QUEUE, "durable": True, "exclusive": False, "autoDelete": False}
        self.channels["deadLetters"] = _channel(
            DEAD_QUEUE,
            ["deadLetter"],
            title=DEAD_QUEUE,
            description=f"Durable queue `{DEAD_QUEUE}`, bound to exchange `{DEAD_EXCHANGE}`.",
            bindings={
                "amqp": {"is": "queue", "queue": queue | {"vhost": "/"}, "bindingVersion": _AMQP}
            },
        )
        self.operations["receiveDeadLetter"] = _operation(
            "receive", "deadLetters", "deadLetter", summary
        )

    def courier(self) -> None:
        summary = "A mail for the mail sender: a one-time code or a notice."
        self.messages["courierMessage"] = {
            "name": "courier",
            "title": "Courier message",
            "summary": summary,
            "description": (
                "The only message that carries a one-time code (`code`, shown `ABCD-EFGH`, "
                "with `expires_at`, for kinds `verification_code` and `recovery_code`; "
                "the notices carry neither). Persistent, published with the worker's "
                "`user_id`, AMQP `expiration` = the code's remaining lifetime in ms, "
                "`message_id` and `type` = the body's `message_id` and `kind`. At least once: "
                "send one mail per `message_id`. Only the mail sender's broker user may read "
                "the queue; it rejects (requeue=false) what it cannot send, and the worker "
                "dead-letters a copy without the code."
            ),
            "contentType": CONTENT_TYPE,
            "headers": _TRACE_HEADERS,
            "payload": _ref(CourierMessage.__name__),
        }
        queue = {"name": COURIER_QUEUE, "durable": True, "exclusive": False, "autoDelete": False}
        kinds = ", ".join(f"`{kind}`" for kind in COURIER_KINDS)
        self.channels["courier"] = _channel(
            COURIER_QUEUE,
            ["courierMessage"],
            title=COURIER_QUEUE,
            description=(
                f"Quorum queue `{COURIER_QUEUE}`, bound to the direct exchange "
                f"`{COURIER_EXCHANGE}` with each kind as routing key: {kinds}."
            ),
            bindings={
                "amqp": {"is": "queue", "queue": queue | {"vhost": "/"}, "bindingVersion": _AMQP}
            },
        )
        operation = _operation("receive", "courier", "courierMessage", summary)
        operation["bindings"] = {"amqp": {"ack": True, "bindingVersion": _AMQP}}
        self.operations["receiveCourierMessage"] = operation


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of contract v1 as a JSON-compatible dict."""
    builder = _Builder()
    builder.commands()
    builder.events()
    builder.dead_letters()
    builder.courier()
    # Deep-copied so that a caller editing the result cannot change the module's constants.
    return copy.deepcopy(
        {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": "Identity worker",
                "version": CONTRACT_VERSION,
                "description": _DESCRIPTION,
            },
            "defaultContentType": CONTENT_TYPE,
            "servers": _SERVERS,
            "channels": builder.channels,
            "operations": builder.operations,
            "components": {
                "schemas": _all_schemas(),
                "messages": builder.messages,
                "correlationIds": _CORRELATION_IDS,
                "replyAddresses": _REPLY_ADDRESSES,
            },
        }
    )


def render_asyncapi() -> str:
    """The document as JSON text: sorted keys, two-space indent, final newline."""
    return json.dumps(build_asyncapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
