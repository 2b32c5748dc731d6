"""Authorising a decoded command against the caller policy, before anything is looked up.

It runs after decoding and before the idempotency look-up: a `forbidden` command stores
nothing under its key, so the same key sent later by an allowed caller works, and a neighbour
cannot poison another caller's key. An `@self` grant is proven by `metadata.actor_token`: a
live session token (checked as `session.verify` checks one) of the very account the command
acts on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from pydantic import SecretStr

from messages import COMMANDS, Session
from messages.commands import ActsOn
from services.errors import ForbiddenError, InvalidTokenError, SessionExpiredError
from worker.callers import Access, CallerPolicy
from worker.decode import Command
from worker.metrics import Metrics, command_label

log = logging.getLogger("identity.worker")

# Checks a session token as session.verify does (InvalidTokenError, SessionExpiredError).
ProveSession = Callable[[SecretStr], Awaitable[Session]]
# The account a session belongs to (None: no such session).
SessionAccount = Callable[[str], Awaitable[str | None]]


class Authoriser:
    """Allows a command, returning it (with the acting session of an `@self` proof), or
    raises ForbiddenError; counts and logs every refusal with the caller."""

    def __init__(
        self,
        policy: CallerPolicy,
        prove: ProveSession,
        session_account: SessionAccount,
        metrics: Metrics,
    ) -> None:
        self.policy = policy
        self._prove = prove
        self._session_account = session_account
        self._metrics = metrics

    async def authorise(self, command: Command) -> Command:
        caller = command.context.caller
        access = self.policy.access(caller, command.name)
        if access is Access.ALLOWED:
            return command
        if access is Access.DENIED:
            reason = "no_user_id" if caller is None else "not_granted"
            raise self._refuse(command, reason)
        metadata = command.context.metadata
        token = metadata.actor_token if metadata is not None else None
        if token is None:
            raise self._refuse(command, "no_actor_token")
        try:
            session = await self._prove(token)
        except (InvalidTokenError, SessionExpiredError):
            raise self._refuse(command, "actor_token_not_live") from None
        if session.account_id != await self._target(command):
            raise self._refuse(command, "not_own_account")
        context = replace(command.context, actor_session_id=session.id)
        return replace(command, context=context)

    async def _target(self, command: Command) -> str | None:
        """The account the command acts on: named in its payload, or the account of the
        session it names (looked up; None when there is no such session, which no proof
        matches)."""
        spec = COMMANDS[command.name]
        if spec.acts_on is ActsOn.SESSION_ACCOUNT:
            session_id = spec.target_session(command.payload)
            return None if session_id is None else await self._session_account(session_id)
        return spec.target_account(command.payload)

    def _refuse(self, command: Command, reason: str) -> ForbiddenError:
        caller = command.context.caller
        self._metrics.forbidden_total.labels(
            self.policy.label(caller), command_label(command.name)
        ).inc()
        log.warning(
            "forbidden",
            extra={
                "caller": caller,
                "command": command.name,
                "reason": reason,
                "idempotency_key": command.context.idempotency_key,
                "correlation_id": command.context.correlation_id,
            },
        )
        return ForbiddenError()
