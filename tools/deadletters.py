"""Reading `identity.dead` without losing anything: what a dead letter says, and whether it
can be sent again.

Dead letters are taken with basic.get and held unacked until the tool is done: a held message
is not handed out again, so one pass sees each message once and stops when the queue has no
more, and whatever is not removed on purpose goes back with a requeueing nack (or by itself
if the connection drops). On the quorum queue a requeue only bumps `x-delivery-count`;
`identity.dead` has no delivery limit, so listing never drops or moves a copy.

Two kinds of message can be there: the worker's redacted records (`messages.DeadLetterRecord`,
written by `worker.broker.DeadLetters`), and, should the broker's own delivery-limit backstop
ever fire first, raw command bodies. The second kind is shown by its headers only and never
re-sent: its body may hold a password.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from messages import COMMANDS, CommandEnvelope, DeadLetterRecord, parse_dead_letter
from worker.logs import shows_a_mask


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of `identity.dead`, still unacked on the tool's channel."""

    message: AbstractIncomingMessage
    # The worker's record, or None for anything else (never parsed further: not ours).
    record: DeadLetterRecord | None

    @classmethod
    def read(cls, message: AbstractIncomingMessage) -> DeadLetter:
        try:
            return cls(message, parse_dead_letter(message.body))
        except ValidationError:
            return cls(message, None)

    @property
    def reason(self) -> str:
        if self.record is None:
            return "broker:" + _text((self.message.headers or {}).get("x-first-death-reason"))
        return self.record.reason

    @property
    def command(self) -> str:
        if self.record is None:
            return self.message.routing_key or "-"
        return self.record.command or "-"

    @property
    def when(self) -> str:
        # ISO 8601 in UTC; seconds are enough to find the matching log lines.
        if self.record is None:
            return "-"
        return self.record.dead_lettered_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")

    @property
    def body(self) -> dict[str, Any] | None:
        return None if self.record is None else self.record.body

    def ids(self) -> str:
        message_id = correlation_id = None
        if self.record is not None:
            message_id, correlation_id = self.record.message_id, self.record.correlation_id
        key = (self.body or {}).get("idempotency_key")
        return (
            f"message_id={_text(message_id)} "
            f"correlation_id={_text(correlation_id)} idempotency_key={key or '-'}"
        )

    def unsendable(self) -> str | None:
        """Why this dead letter cannot be sent again as it is, or None when it can."""
        if self.record is None:
            return "not a worker record: its raw body may hold secrets"
        body = self.body
        if body is None:
            return "no body kept (not JSON, too large, wrong content type or never read)"
        if self.record.redacted or _redacted(body):
            return "secrets were redacted: the caller has to send it again"
        spec = COMMANDS.get(self.command)
        if spec is None:
            return "not a command of the contract"
        try:
            envelope = CommandEnvelope.model_validate(body)
            spec.payload.model_validate(envelope.payload)
        except ValidationError:
            return "the body does not validate"
        if spec.changes_state and envelope.idempotency_key is None:
            return "no idempotency key"
        return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "-" if value is None else str(value)


def _redacted(value: object) -> bool:
    """Whether `redact()` masked anything in `value`: a masked secret, token or URL password.
    Dead letters say so themselves (`redacted`); this reads the ones written before they did."""
    if isinstance(value, str):
        return shows_a_mask(value)
    if isinstance(value, dict):
        return any(_redacted(item) for item in value.values())
    if isinstance(value, list):
        return any(_redacted(item) for item in value)
    return False


async def take(
    queue: AbstractQueue, limit: int, wanted: Callable[[DeadLetter], bool]
) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Up to `limit` wanted dead letters, and the unwanted ones passed over, all held unacked.

    Stops at `limit` or when the queue has nothing more to hand out, so a copy that a
    republished command adds meanwhile is not picked up by the same pass.
    """
    selected: list[DeadLetter] = []
    passed_over: list[DeadLetter] = []
    while len(selected) < limit:
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            break
        letter = DeadLetter.read(message)
        (selected if wanted(letter) else passed_over).append(letter)
        _progress(len(selected) + len(passed_over))
    _progress(None)
    return selected, passed_over


def _progress(read: int | None) -> None:
    # Only on a terminal: a pipe or a log file gets the result, not a counter.
    if not sys.stderr.isatty():
        return
    if read is None:
        sys.stderr.write("\r\033[K")
    elif read % 50 == 0:
        sys.stderr.write(f"\rread {read} dead letters ...")
    sys.stderr.flush()


async def put_back(letters: list[DeadLetter]) -> None:
    """Return held dead letters to the queue, in the order they were taken."""
    for letter in letters:
        await letter.message.nack(requeue=True)
