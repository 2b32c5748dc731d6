"""What the broker dead-lettered itself, redacted on its way to `identity.dead`.

A quorum queue dead-letters a message that exceeded its delivery limit, expired (a publisher's
`expiration`) or was rejected without requeue, and it does so with the raw body: a
`session.start` there holds a password in clear. The worker's queues (and the courier's) send
those to the internal exchange `identity.worker.dlx`, whose queue only the worker's broker user
may read; this forwarder takes each one, redacts it like every dead letter of the worker's own,
and publishes the record to `identity.dead` with the broker's reason.

The reason is `x-death[0].reason`: the broker prepends its own entry to `x-death` on every
dead-lettering, so the first entry is the broker's, while `x-first-death-*` and anything
further down can be a publisher's forgery (and the queue is fed by dead-lettering alone, the
exchange being internal). Its `x-delivery-count` is the publisher's, never read. Nobody is
answered: the caller gave up (expired) or the command kept failing (delivery limit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from worker.acks import Acknowledger
from worker.broker import DeadLetters
from worker.topology import delivery_count

log = logging.getLogger("identity.worker")

# The broker's reasons, kept as they are; anything else is reported as "dead_lettered".
BROKER_REASONS = frozenset({"delivery_limit", "expired", "rejected", "maxlen"})
UNKNOWN_REASON = "dead_lettered"


def broker_reason(headers: Mapping[str, Any] | None) -> str:
    """Why the broker dead-lettered a message: its own, latest entry in `x-death`."""
    deaths = (headers or {}).get("x-death")
    if isinstance(deaths, Sequence) and deaths and isinstance(deaths[0], Mapping):
        reason = deaths[0].get("reason")
        if isinstance(reason, str) and reason in BROKER_REASONS:
            return reason
    return UNKNOWN_REASON


class DeadLetterForwarder:
    """Consumes the internal dead-letter queue: redact, publish to `identity.dead`, ack."""

    def __init__(
        self,
        dead_letters: DeadLetters,
        acks: Acknowledger,
        *,
        max_message_bytes: int,
        worker_delivery_limit: int,
    ) -> None:
        self._dead = dead_letters
        self._acks = acks
        self._max_bytes = max_message_bytes
        self._delivery_limit = worker_delivery_limit

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Forward one dead letter; raises only when the broker failed us (no ack then)."""
        reason = broker_reason(message.headers)
        await self._dead.publish(message, reason, parsed=self._parsed(message))
        await self._acks.ack(message)

    def _parsed(self, message: AbstractIncomingMessage) -> Any:
        """The body to keep (redacted), or None to keep only its size: a body too large to
        read, or one that made earlier tries fail (a redelivery past the worker's limit)."""
        earlier = delivery_count(message.headers, redelivered=bool(message.redelivered))
        if len(message.body) > self._max_bytes or earlier >= self._delivery_limit:
            return None
        try:
            return orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return None
