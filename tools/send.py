"""`identity-worker send COMMAND --field value ...`: one command, its reply printed as JSON.

The flags come from COMMAND's payload model: field `expected_version` is `--expected-version`,
typed by its annotation (an int field takes an int). A secret field (password, token) given
as `-` is read from a line of standard input, which keeps it out of the process list and the
shell history. The reply is printed whole, `session.start`'s token included: it is the
caller's own.

Exit codes: 0 ok reply; 1 error reply, or the broker could not be reached; 2 bad usage
(unknown command, missing or invalid field, idempotency key or timeout); 3 no reply in time,
or the connection lost once the command could have gone out: it may have taken effect, and
sending it again with the idempotency key printed is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Union, get_args, get_origin

import orjson
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from client import ErrorReply, IdentityClient, ReplyTimeout, Unroutable
from messages import COMMANDS, CommandSpec
from messages.commands import IDEMPOTENCY_KEY_RULE, usable_idempotency_key
from tools.arguments import positive_seconds
from tools.common import (
    BROKER_ERRORS,
    EXIT_FAILED,
    EXIT_NO_REPLY,
    EXIT_OK,
    EXIT_USAGE,
    Broker,
    broker_unreachable,
    resolve_broker,
)

FROM_STDIN = "-"


def run_send(args: argparse.Namespace) -> int:
    spec = COMMANDS.get(args.command)
    if spec is None:
        known = ", ".join(COMMANDS)
        print(
            f"identity-worker send: unknown command {args.command!r}; known: {known}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    options = command_parser(spec).parse_args(args.fields)
    payload = payload_from(spec, options)
    try:
        spec.payload.model_validate(payload)
    except ValidationError as exc:
        # Locations and messages only: the input may be a password.
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or spec.name
            print(f"identity-worker send: {where}: {error['msg']}", file=sys.stderr)
        return EXIT_USAGE
    key = options.idempotency_key
    if key is not None and usable_idempotency_key(key) is None:
        print(
            f"identity-worker send: --idempotency-key must be {IDEMPOTENCY_KEY_RULE}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # A key of our own (rather than the client's) so that a timeout can name it for a retry.
    key = options.idempotency_key or (str(uuid.uuid4()) if spec.changes_state else None)
    broker = resolve_broker(options.amqp_url)
    return asyncio.run(_send(broker, spec.name, payload, key, options.timeout))


def command_parser(spec: CommandSpec) -> argparse.ArgumentParser:
    """The flags of one command: its payload fields, plus the key and connection options."""
    parser = argparse.ArgumentParser(
        prog=f"identity-worker send {spec.name}",
        description=f"{spec.summary} Secret fields given as '-' are read from stdin.",
    )
    for name, field in spec.payload.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=field_type(field.annotation),
            required=field.is_required(),
            metavar=_metavar(field),
        )
    parser.add_argument("--idempotency-key", help="default: a fresh one for state changes")
    parser.add_argument("--amqp-url", help="broker URL (default: IDENTITY_AMQP_URL)")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="seconds per attempt (10)"
    )
    return parser


def field_type(annotation: Any) -> Callable[[str], Any]:
    """How to read a flag's text for a field annotated `annotation` (`X | None` reads as X)."""
    base = _base_type(annotation)
    return base if base in (int, float) else str


def _base_type(annotation: Any) -> Any:
    """`annotation` without `| None` and `Annotated[...]` constraints."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _base_type(members[0]) if len(members) == 1 else str
    if get_origin(annotation) is Annotated:
        return _base_type(get_args(annotation)[0])
    return annotation


def _metavar(field: FieldInfo) -> str:
    if _is_secret(field):
        return "SECRET|-"
    return "N" if field_type(field.annotation) in (int, float) else "TEXT"


def _is_secret(field: FieldInfo) -> bool:
    return _base_type(field.annotation) is SecretStr


def payload_from(spec: CommandSpec, options: argparse.Namespace) -> dict[str, Any]:
    """The payload fields that were given; secrets given as '-' read from stdin, in order."""
    payload: dict[str, Any] = {}
    for name, field in spec.payload.model_fields.items():
        value = getattr(options, name)
        if value is None:
            continue
        if _is_secret(field) and value == FROM_STDIN:
            value = sys.stdin.readline().rstrip("\r\n")
        payload[name] = value
    return payload


async def _send(
    broker: Broker, command: str, payload: dict[str, Any], key: str | None, reply_timeout_s: float
) -> int:
    url = broker.url
    connected = False
    reply = None
    try:
        async with IdentityClient.connect(
            url, timeout=reply_timeout_s, ssl_context=broker.ssl_context()
        ) as client:
            connected = True
            reply = await client.send(command, payload, idempotency_key=key)
    except ReplyTimeout as exc:
        retry = f"; send it again with --idempotency-key {key}" if key else ""
        print(f"identity-worker send: {exc}: it may have taken effect{retry}", file=sys.stderr)
        return EXIT_NO_REPLY
    except Unroutable as exc:
        print(f"identity-worker send: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ErrorReply as exc:
        print_json(error_reply(command, key, exc))
        return EXIT_FAILED
    except BROKER_ERRORS as exc:
        if reply is None and connected and key:
            # The connection dropped after it was up: the command may have gone out.
            print(
                f"identity-worker send: the broker connection was lost"
                f" ({type(exc).__name__}): it may have taken effect;"
                f" send it again with --idempotency-key {key}",
                file=sys.stderr,
            )
            return EXIT_NO_REPLY
        if reply is None:
            return broker_unreachable(url, exc)
        # The reply came; only closing the connection failed.
    print_json(reply.to_wire())
    return EXIT_OK


def error_reply(command: str, key: str | None, exc: ErrorReply) -> dict[str, Any]:
    """The `ok: false` reply the client turned into `exc`, as the contract spells it."""
    error: dict[str, Any] = {
        "code": exc.code.value,
        "message": exc.message,
        "fields": [field.model_dump(mode="json") for field in exc.fields],
    }
    if exc.retry_after_s is not None:
        error["retry_after_s"] = exc.retry_after_s
    return {"ok": False, "command": command, "idempotency_key": key, "error": error}


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
