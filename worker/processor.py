"""One delivery, start to finish: guard, decode, run, reply, ack (see worker.policy).

The reply is published with publisher confirms before the delivery is acked (worker.acks, a
few milliseconds later, together with its neighbours): if the worker dies in between, the
broker redelivers and the idempotency record answers the retry with the same reply and no
second effect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace as trace_api
from opentelemetry.trace import Span, SpanKind
from tenacity import RetryCallState

from messages import COMMANDS, ErrorBody, ErrorCode, Reply, Result
from messages.commands import usable_idempotency_key
from messages.models import Model
from messages.topology import CONTENT_TYPE
from services.errors import IdentityError, RateLimitedError
from services.operations import CommandContext
from stores import TransientStoreError
from worker import audit, tracing
from worker.acks import Acknowledger
from worker.authorise import Authoriser
from worker.broker import DeadLetters, ReplySender
from worker.decode import Command, Rejected, decode_command
from worker.metrics import OK, OUTCOMES, UNKNOWN, Metrics, command_label, outcome_label
from worker.policy import RetryPolicy
from worker.rates import MESSAGE as RATE_MESSAGE
from worker.rates import RateGate
from worker.topology import delivery_count

log = logging.getLogger("identity.worker")

Handler = Callable[[Any, CommandContext], Awaitable[Result]]
# Which handler runs a command: keyed by the type of its payload (see worker.handlers).
Handlers = Mapping[type[Model], Handler]


def unhandled(handlers: Handlers) -> list[str]:
    """The commands that `handlers` has no handler for."""
    return [spec.name for spec in COMMANDS.values() if spec.payload not in handlers]


_INTERNAL = ErrorBody(
    code=ErrorCode.INTERNAL_ERROR,
    message="The command could not be processed; retry later with the same idempotency key.",
)


class CommandProcessor:
    def __init__(
        self,
        handlers: Handlers,
        acks: Acknowledger,
        replies: ReplySender,
        dead_letters: DeadLetters,
        metrics: Metrics,
        retry: RetryPolicy,
        *,
        authoriser: Authoriser,
        max_message_bytes: int,
        worker_delivery_limit: int,
        on_committed: Callable[[], None],
        log_queries: bool = False,
        gateways: frozenset[str] = frozenset(),
        rates: RateGate | None = None,
    ) -> None:
        if missing := unhandled(handlers):
            raise ValueError(f"no handler for {', '.join(missing)}")
        self._handlers = handlers
        self._authoriser = authoriser
        self._policy = authoriser.policy
        self._acks = acks
        self._replies = replies
        self._dead = dead_letters
        self._metrics = metrics
        # What is left of the policy after a first, failed try (None: no retries at all).
        self._retry_rest = (
            replace(retry, attempts=retry.attempts - 1) if retry.attempts > 1 else None
        )
        self._max_bytes = max_message_bytes
        self._delivery_limit = worker_delivery_limit
        self._on_committed = on_committed
        self._gateways = gateways
        self._rates = rates
        # Successful queries are most of the traffic and change nothing: the metrics count and
        # time them, and a log line each would add about a sixth to their CPU cost.
        self._quiet_when_ok = (
            frozenset()
            if log_queries
            else frozenset(name for name, spec in COMMANDS.items() if not spec.changes_state)
        )
        # Spans: a query's trace is its command span alone (no database or reply span under
        # it: each recorded span costs the worker tens of µs, BENCHMARKS.md); the attributes
        # of each command's span are built once, here.
        self._queries = frozenset(n for n, spec in COMMANDS.items() if not spec.changes_state)
        self._span_attributes = {name: _span_attributes(name) for name in COMMANDS}
        # Metric children looked up once, not per delivery (labels() takes a lock each time).
        labels = (*COMMANDS, UNKNOWN)
        self._durations = {name: metrics.command_duration_seconds.labels(name) for name in labels}
        self._counts = {
            (name, outcome): metrics.commands_total.labels(name, outcome)
            for name in labels
            for outcome in OUTCOMES
        }

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery; raises only when the broker itself failed us (no ack then)."""
        started = time.perf_counter()
        name = message.routing_key or ""
        caller = tracing.validated(message.headers)
        # No SDK, or a trace the caller left out (and the sampler follows the caller): the
        # caller's trace is passed on as it came, no span made.
        if not tracing.recording() or tracing.left_out(caller):
            await self._handle(message, name, started, caller)
            return
        label = command_label(name)
        attributes = self._span_attributes.get(name) or _span_attributes(name)
        span = tracing.CommandSpan(
            f"{label} process", caller, attributes, current=name not in self._queries
        )
        with span as trace:
            await self._handle(message, name, started, trace, span.span)

    async def _handle(
        self,
        message: AbstractIncomingMessage,
        name: str,
        started: float,
        trace: tracing.Trace,
        span: Span | None = None,
    ) -> None:
        label = command_label(name)
        reply = await self._outcome(message, name, trace)
        if reply is None:  # nowhere it may go: refused and dead-lettered, nothing ran
            await self._acks.ack(message)
            return
        if reply.error is not None and span is not None:
            span.set_attribute("identity.outcome", reply.error.code.value)
        if message.reply_to:
            await self._reply(message, reply, trace)
        # Timed up to the confirmed reply: what the caller waits for, not the ack batching.
        elapsed = time.perf_counter() - started
        await self._acks.ack(message)
        outcome = outcome_label(None if reply.ok or reply.error is None else reply.error.code)
        self._counts[label, outcome].inc()
        self._durations[label].observe(elapsed)
        if outcome == OK and label in self._quiet_when_ok:
            return
        log.info(
            "command",
            extra={
                "command": label,
                "caller": message.user_id,
                "idempotency_key": reply.idempotency_key,
                "correlation_id": _correlation_id(message),
                "outcome": outcome,
                "duration_ms": round(elapsed * 1000, 3),
                "redelivered": bool(message.redelivered),
            },
        )

    async def _reply(
        self, message: AbstractIncomingMessage, reply: Reply, trace: tracing.Trace
    ) -> None:
        """Send the reply with the command's trace (from a publish span of its own, when the
        command's span is recorded and current: a query's, or one the sampler left out, is
        not, and the reply names the command span)."""
        if not tracing.recording() or not trace_api.get_current_span().is_recording():
            await self._replies.send(message, reply, tracing.headers(trace))
            return
        with tracing.tracer.start_as_current_span(
            "reply publish",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "rabbitmq", "messaging.operation.type": "publish"},
            record_exception=False,  # a publish error's text may quote the reply
            set_status_on_exception=False,
        ):
            await self._replies.send(message, reply, tracing.headers(tracing.current()))

    async def _outcome(
        self, message: AbstractIncomingMessage, name: str, trace: tracing.Trace
    ) -> Reply | None:
        """The reply to `message`, or None when it must get none (its `reply_to` is refused)."""
        if (limited := self._over_rate(message, name)) is not None:
            if message.reply_to and not self._policy.allows_reply_to(
                message.user_id, message.reply_to
            ):
                return None  # a flood beyond its rate is not worth a dead letter apiece
            return limited
        refusal = self._guard(message)
        if refusal is not None:
            reason, error = refusal
            await self._dead.publish(message, reason, parsed=None)
            return Reply(ok=False, command=name, error=error)
        if message.reply_to and not self._policy.allows_reply_to(message.user_id, message.reply_to):
            # Answering there would put a message of the worker's into someone else's queue.
            await self._dead.publish(message, "reply_to_refused", parsed=_body_or_none(message))
            return None
        try:
            command = decode_command(
                name,
                message.body,
                _correlation_id(message),
                message.user_id,
                self._gateways,
                trace=trace,
            )
        except Rejected as rejected:
            self._metrics.malformed_messages_total.labels(rejected.error.code.value).inc()
            if rejected.dead_letter is not None:
                await self._dead.publish(message, rejected.dead_letter, parsed=rejected.parsed)
            return Reply(
                ok=False,
                command=name,
                idempotency_key=rejected.idempotency_key,
                error=rejected.error,
            )
        return await self._run(message, command)

    def _over_rate(self, message: AbstractIncomingMessage, name: str) -> Reply | None:
        """The answer to a message beyond its caller's rate (worker.rates), given before any
        other work: before its body is decoded or dead-lettered, anything is authorised,
        looked up, stored or hashed (malformed messages count too). The caller is the broker's
        `user_id`, known without parsing. A redelivery is not charged again: its first
        delivery was. None when it may go on."""
        if self._rates is None or message.redelivered:
            return None
        retry_after_s = self._rates.admit(message.user_id)
        if retry_after_s is None:
            return None
        error = RateLimitedError(retry_after_s, RATE_MESSAGE).to_error_body()
        key = _peek_idempotency_key(message.body, self._max_bytes)
        return Reply(ok=False, command=name, idempotency_key=key, error=error)

    def _guard(self, message: AbstractIncomingMessage) -> tuple[str, ErrorBody] | None:
        """Checks made before a byte of the body is parsed."""
        if len(message.body) > self._max_bytes:
            text = f"The message is larger than {self._max_bytes} bytes."
            return "too_large", ErrorBody(code=ErrorCode.MALFORMED_MESSAGE, message=text)
        if message.content_type != CONTENT_TYPE:
            text = f"content_type must be {CONTENT_TYPE}."
            return "wrong_content_type", ErrorBody(code=ErrorCode.MALFORMED_MESSAGE, message=text)
        if delivery_count(message.headers, redelivered=bool(message.redelivered)) >= (
            self._delivery_limit
        ):
            return "delivery_limit", _INTERNAL
        return None

    async def _run(self, message: AbstractIncomingMessage, command: Command) -> Reply:
        reply = await self._execute(message, command)
        if COMMANDS[command.name].changes_state:
            audit.record(command, reply)  # failures too: a failed sign-in above all
        return reply

    async def _execute(self, message: AbstractIncomingMessage, command: Command) -> Reply:
        key = command.context.idempotency_key
        handler = self._handlers[type(command.payload)]
        try:
            result = await self._attempt(handler, command)
        except IdentityError as error:
            return Reply(
                ok=False, command=command.name, idempotency_key=key, error=error.to_error_body()
            )
        except TransientStoreError:
            log.warning(
                "retries exhausted", extra={"command": command.name, "idempotency_key": key}
            )
            await self._dead.publish(message, "retries_exhausted", parsed=_body_or_none(message))
            return Reply(ok=False, command=command.name, idempotency_key=key, error=_INTERNAL)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception(
                "unexpected error", extra={"command": command.name, "idempotency_key": key}
            )
            await self._dead.publish(message, "unexpected_error", parsed=_body_or_none(message))
            return Reply(ok=False, command=command.name, idempotency_key=key, error=_INTERNAL)
        if COMMANDS[command.name].changes_state:
            self._on_committed()  # its events are in the outbox now: publish without waiting
        return Reply(ok=True, command=command.name, idempotency_key=key, result=result.to_wire())

    async def _attempt(self, handler: Handler, command: Command) -> Result:
        """Run the handler under the retry policy. The first try goes without a tenacity
        controller (building one per delivery cost about 3% of the worker's CPU); only a
        transient fault pays for one, with the attempts that are left."""
        try:
            return await self._authorised(handler, command)
        except TransientStoreError:
            if self._retry_rest is None:
                raise
            self._metrics.retries_total.labels("command").inc()
            log.warning("transient fault, retrying", extra={"attempt": 1})
        async for attempt in self._retry_rest.retrying(self._count_retry):
            with attempt:
                return await self._authorised(handler, command)
        raise AssertionError("unreachable: tenacity re-raises the last fault")

    async def _authorised(self, handler: Handler, command: Command) -> Result:
        """Authorise, then run: a refusal (ForbiddenError) comes before the idempotency
        look-up, so nothing is stored under the key of a command that was not allowed."""
        allowed = await self._authoriser.authorise(command)
        return await handler(allowed.payload, allowed.context)

    def _count_retry(self, state: RetryCallState) -> None:
        self._metrics.retries_total.labels("command").inc()
        log.warning("transient fault, retrying", extra={"attempt": state.attempt_number + 1})


def _correlation_id(message: AbstractIncomingMessage) -> str | None:
    return message.correlation_id or message.message_id


def _body_or_none(message: AbstractIncomingMessage) -> Any:
    try:
        return orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return None


def _span_attributes(name: str) -> dict[str, str]:
    """A command span's attributes: the command's name (the routing key), never a payload
    field. The span's name says which command it is too ("unknown" for one the worker does
    not know); each attribute costs every recorded span a few µs, so there is no fourth."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": command_label(name),  # "unknown" for a caller's text
    }


def _peek_idempotency_key(body: bytes, max_bytes: int) -> str | None:
    """The idempotency key of a body, echoed in a rate-limited reply so that the caller can
    match it to the command it retries: read without validating the rest, None when the
    body is too large, not a JSON object, or its key is not a valid one."""
    if len(body) > max_bytes:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return (
        usable_idempotency_key(parsed.get("idempotency_key")) if isinstance(parsed, dict) else None
    )
