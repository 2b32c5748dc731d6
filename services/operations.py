"""Idempotent operations: look a key up, replay its stored reply, or record a new one.

Every state-changing command runs as an `Operation`. Its idempotency record (key, keyed
fingerprint of command + payload, the reply without secrets) and the outbox rows of its
events are written in the same unit of work as the state change, so that a command takes
effect, is remembered and announces itself all at once or not at all. Record and events go
in one write (`UnitOfWork.record_outcome`): one database round trip, not two.

Business errors are stored as replies too, so a retry of a failed command gets the same
answer without redoing the work. Two deliveries of one key racing to commit are settled by
the store's unique constraint: the loser rolls back, reads the winner's record and replays it.

What a stored reply holds, and which secrets it leaves out, the models decide
(`messages.StoredReply`, `Result.to_stored`); this module never looks inside one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from messages import Metadata, Result, StoredReply, fingerprint_material, spec_of
from messages.events import Actor, AnyEvent
from messages.models import Model, about_account
from services.clock import Clock
from services.errors import IdempotencyKeyReusedError, IdentityError, error_from_body
from services.ids import new_event_id
from services.keys import Fingerprints
from stores import (
    CommandStore,
    DuplicateKeyError,
    IdempotencyRecord,
    NewEvent,
    TransientStoreError,
    UnitOfWork,
)

R = TypeVar("R", bound=Result)

# Gives back what a stored result left out (its secret fields): the stored result and the
# facts its secrets were derived from (`StoredReply.derive`, None if none were kept) in, the
# whole result out.
Restore = Callable[[Mapping[str, Any], Mapping[str, Any] | None], Awaitable[R]]


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Where a command came from: its idempotency key, correlation id and caller metadata."""

    idempotency_key: str | None = None
    correlation_id: str | None = None
    metadata: Metadata | None = None
    # The broker-validated AMQP `user_id` of the publisher (None when it set none).
    caller: str | None = None
    # Where password attempts are counted from (decided at the edge: a gateway's reported
    # client address, else the caller); the service treats it as an opaque name.
    source: str = "caller:-"
    # The session that proved an `@self` grant, when one did.
    actor_session_id: str | None = None
    # The W3C trace context to carry to what the command causes (validated at the edge, and
    # opaque here): written with its outbox and courier rows, published as their headers.
    traceparent: str | None = None
    tracestate: str | None = None


NO_CONTEXT = CommandContext()


@dataclass(slots=True)
class Operation:
    """One state-changing command on its way to a single commit."""

    command: str
    material: bytes
    context: CommandContext
    events: list[NewEvent] = field(default_factory=list)
    # Undo work done outside the transaction (a reserved password attempt) when the operation
    # turns out to be a duplicate of one that already committed. Registered only once the
    # work was done, so a duplicate undoes what it did and nothing else.
    compensations: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Set once the outcome (a result, or an error that changed state) is written in the
    # operation's unit of work: an error raised after that is not remembered a second time.
    recorded: bool = False

    @property
    def key(self) -> str | None:
        return self.context.idempotency_key

    def emit(self, make: Callable[..., AnyEvent], data: Model, now: datetime) -> None:
        """Queue an event; it is written to the outbox with the change."""
        event = make(
            event_id=new_event_id(now),
            occurred_at=now,
            correlation_id=self.context.correlation_id,
            causation_id=self.key,
            actor=Actor(caller=self.context.caller, session_id=self.context.actor_session_id),
            data=data,
        )
        body = event.model_dump_json().encode()
        about = about_account(data)
        context = self.context
        self.events.append(
            NewEvent(
                event.event_id,
                event.type,
                body,
                now,
                account_id=about,
                traceparent=context.traceparent,
                tracestate=context.tracestate,
            )
        )


class OperationRunner:
    """Runs operations against one store; fingerprints are keyed with the HMAC key (so they
    survive signing-key rotation, see services.keys)."""

    def __init__(
        self,
        store: CommandStore,
        fingerprints: Fingerprints,
        clock: Clock,
        on_replay: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._fingerprints = fingerprints
        self._clock = clock
        self._on_replay = on_replay

    def begin(self, payload: Model, context: CommandContext) -> Operation:
        """The operation of the command whose payload is `payload`."""
        command = spec_of(type(payload)).name
        return Operation(command, fingerprint_material(payload), context)

    def record_of(self, op: Operation, result: Result) -> IdempotencyRecord | None:
        """The idempotency record of `op` answered with `result`, for a store method that
        writes it together with the change in one statement (None when `op` has no key)."""
        return self._record(op, StoredReply.of_result(result))

    async def finish(
        self,
        uow: UnitOfWork,
        op: Operation,
        result: Result,
        derive: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the events and the idempotency record in the caller's unit of work.
        `derive`: the facts a replay derives the result's secrets from (no secret itself)."""
        record = self._record(op, StoredReply.of_result(result, derive), about_account(result))
        await uow.record_outcome(op.events, record)
        op.recorded = True

    async def fail(self, uow: UnitOfWork, op: Operation, error: IdentityError) -> None:
        """Write the events and `error` as the key's reply in the caller's unit of work: for
        the rare error that changes state too (a reused refresh token ends its session). The
        caller raises `error` once the unit has committed."""
        record = self._record(op, StoredReply.of_error(error.to_error_body()))
        await uow.record_outcome(op.events, record)
        op.recorded = True

    async def execute(
        self,
        op: Operation,
        result_type: type[R],
        run: Callable[[Operation], Awaitable[R]],
        restore: Restore[R] | None = None,
    ) -> R:
        """Replay a known key, or run the operation once and record its outcome.

        A result with secret fields needs `restore`, which derives them again (a session's
        token) for a replay.
        """
        known = await self._lookup(op)
        if known is not None:
            return await self._replay(known, result_type, restore)
        try:
            try:
                return await run(op)
            except IdentityError as error:
                if op.key is not None and not op.recorded:
                    await self._remember_failure(op, error)
                raise
        except DuplicateKeyError:
            for compensate in op.compensations:
                await compensate()
            winner = await self._lookup(op)
            if winner is None:  # the winner's record vanished: let the worker retry
                raise TransientStoreError("idempotency record not readable yet") from None
            return await self._replay(winner, result_type, restore)

    async def _lookup(self, op: Operation) -> IdempotencyRecord | None:
        if op.key is None:
            return None
        record = await self._store.get_idempotency(op.key)
        if record is None:
            return None
        same = record.command == op.command and self._fingerprints.matches(
            op.material, record.fingerprint
        )
        if not same:
            raise IdempotencyKeyReusedError()
        return record

    async def _replay(
        self,
        record: IdempotencyRecord,
        result_type: type[R],
        restore: Restore[R] | None,
    ) -> R:
        if self._on_replay is not None:
            self._on_replay(record.command)
        reply = StoredReply.from_json(record.reply)
        if reply.error is not None:
            raise error_from_body(reply.error)
        stored = reply.result or {}
        if restore is not None:
            return await restore(stored, reply.derive)
        return result_type.from_stored(stored)

    async def _remember_failure(self, op: Operation, error: IdentityError) -> None:
        """Store the error as the key's reply; a failed command emits no events."""
        record = self._record(op, StoredReply.of_error(error.to_error_body()))
        async with self._store.unit_of_work() as uow:
            await uow.record_outcome((), record)

    def _record(
        self, op: Operation, reply: StoredReply, account_id: str | None = None
    ) -> IdempotencyRecord | None:
        """The idempotency record of `op` with `reply` (about `account_id`, which erasure
        finds it by); None if it has no key. An error reply holds no account's data."""
        if op.key is None:
            return None
        return IdempotencyRecord(
            key=op.key,
            command=op.command,
            fingerprint=self._fingerprints.of(op.material),
            reply=reply.to_json(),
            created_at=self._clock.now(),
            account_id=account_id,
        )
