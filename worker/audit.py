"""The audit trail: one JSON line per state-changing command, whatever its outcome.

Every command that changes state (or tries to: a failed sign-in, a refused `forbidden`
command, a wrong code) is written to the logger `identity.audit`, apart from the operational
log: to stderr by default, or appended to the file `IDENTITY_AUDIT_LOG` (reopened when log
rotation moves it). The services' own audit lines go the same way (`authn_login_fail` and
`authn_login_lock` with the reason and a keyed `email_tag`, `account_erased`). A command's
line (`"event": "command_audit"`) holds:

    ts              when the worker answered (ISO 8601, UTC)
    command         the command name
    caller          the broker user that sent it (RabbitMQ vouches for it)
    client_ip       the client address the caller declared in `metadata.client_ip` (trusted
                    for throttling only from a gateway, see worker.sources; kept as declared)
    account_id      the account acted on, when the payload or the reply names one
    outcome         `ok`, or the error code of the reply
    correlation_id  the command's correlation id
    trace_id        the W3C trace id the command carried, if any

Never a password, token, code, key, email address or display name: an account is named by
its id, which is not personal data once the account is erased. A failed sign-in therefore
names no account (the email it tried is not written); its caller, client address and time
are what an investigation correlates. Retention: docs/runbook.md, "Audit trail".
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Mapping
from typing import Any

from messages import Reply
from worker.decode import Command
from worker.logs import JsonFormatter

log = logging.getLogger("identity.audit")


def configure_audit(path: str | None = None) -> None:
    """Write the audit trail as JSON lines to `path` (appended; reopened if rotated away) or,
    without one, to stderr; never mixed into the operational log on stdout."""
    for previous in list(log.handlers):
        log.removeHandler(previous)
        previous.close()
    handler: logging.Handler = (
        logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        if path
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def record(command: Command, reply: Reply) -> None:
    """Write the audit line of `command`, answered with `reply`."""
    context = command.context
    metadata = context.metadata
    log.info(
        "command_audit",
        extra={
            "event": "command_audit",
            "command": command.name,
            "caller": context.caller,
            "client_ip": metadata.client_ip if metadata is not None else None,
            "account_id": _account_of(command, reply),
            "outcome": "ok" if reply.error is None else reply.error.code.value,
            "correlation_id": context.correlation_id,
            "trace_id": context.traceparent[3:35] if context.traceparent else None,
        },
    )


def _account_of(command: Command, reply: Reply) -> str | None:
    """The account the command acted on: named by its payload, else by its result."""
    named = getattr(command.payload, "account_id", None)
    if isinstance(named, str):
        return named
    result: Mapping[str, Any] = reply.result or {}
    account, session = result.get("account"), result.get("session")
    for found in (
        result.get("account_id"),
        account.get("id") if isinstance(account, Mapping) else None,
        session.get("account_id") if isinstance(session, Mapping) else None,
    ):
        if isinstance(found, str):
            return found
    return None
