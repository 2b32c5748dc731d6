"""The outbox relay: publishes committed events to `identity.events`, at least once.

Events are written to the outbox table in the transaction of the change they describe, so an
event exists if and only if its change committed. The relay claims the unpublished rows of
whole commands (several workers share the backlog, and a command is held by one relay at a
time), publishes each command's events one after the other with publisher confirms, and the
commands side by side; it marks only the confirmed ones. A command stops at its first event
the broker does not confirm: what follows waits for it, so a command's events reach the
broker in the order they happened. A worker that died between commit and publish leaves rows
behind; any relay picks them up on its next poll. Each row keeps its `event_id`, so a
republished event is recognisable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from messages.topology import CONTENT_TYPE
from stores import OutboxStore, PendingEvent, StoreError
from worker import tracing
from worker.broker import BROKER_FAULTS, publish_confirmed
from worker.metrics import Metrics

log = logging.getLogger("identity.outbox")


class OutboxRelay:
    def __init__(
        self,
        store: OutboxStore,
        channel: AbstractChannel,
        exchange: str,
        metrics: Metrics,
        now: Callable[[], datetime],
        *,
        batch: int = 100,
        poll_s: float = 1.0,
        user_id: str | None = None,
    ) -> None:
        self._store = store
        self._channel = channel  # with publisher confirms
        self._exchange = exchange
        self._metrics = metrics
        self._now = now
        self._batch = batch
        self._poll_s = poll_s
        # The worker's broker user: subscribers tell the worker's events from forgeries by it.
        self._user_id = user_id
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit: publish now rather than at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until cancelled; faults are logged and retried at the next poll."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            self._wakeup.clear()
            try:
                await self.drain()
            except (StoreError, *BROKER_FAULTS) as exc:
                log.warning("outbox relay paused", extra={"error": type(exc).__name__})
                await asyncio.sleep(self._poll_s)

    async def drain(self) -> int:
        """Publish until nothing is left (or what is left is claimed by other relays, or was
        just refused by the broker)."""
        total = 0
        while True:
            published, claimed, full = await self._publish_batch()
            total += published
            if not full or published < claimed:
                return total

    async def _publish_batch(self) -> tuple[int, int, bool]:
        """(events published, events claimed, whether the claim was full: more may wait)."""
        # Up to `batch` commands, and up to `batch` events of each: a password change that
        # ended thousands of sessions goes out in several claims, in order.
        async with self._store.claim_events(self._batch, per_command=self._batch) as batch:
            commands = _by_command(batch.events)
            if not commands:
                return 0, 0, False
            started = time.perf_counter()
            outcomes = await asyncio.gather(*(self._publish_in_order(c) for c in commands))
            confirmed = [seq for seqs, _ in outcomes for seq in seqs]
            batch.mark_published(confirmed)
        self._metrics.outbox_publish_seconds.observe(time.perf_counter() - started)
        self._metrics.outbox_published_total.inc(len(confirmed))
        claimed = sum(len(events) for events in commands)
        failures = [error for _, error in outcomes if error is not None]
        if failures:
            log.warning(
                "events not confirmed; they stay in the outbox",
                extra={
                    "count": claimed - len(confirmed),
                    "commands": len(failures),
                    "error": type(failures[0]).__name__,
                },
            )
        full = len(commands) >= self._batch or any(len(c) >= self._batch for c in commands)
        return len(confirmed), claimed, full

    async def _publish_in_order(
        self, events: list[PendingEvent]
    ) -> tuple[list[int], Exception | None]:
        """Publish one command's events one at a time, each confirmed before the next goes
        out, and stop at the first one that is not: the seqs confirmed (a prefix of the
        command's), and what stopped it. Anything later waits for that one to be published
        first, at a later claim."""
        confirmed: list[int] = []
        for event in events:
            try:
                await self._publish(event)
            except Exception as exc:  # any failure leaves the row for a later claim
                return confirmed, exc
            confirmed.append(event.seq)
        return confirmed, None

    async def _publish(self, event: PendingEvent) -> None:
        stored = (event.traceparent, event.tracestate)
        with tracing.publishing(f"{event.type} publish", stored, self._exchange) as headers:
            properties = Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                message_id=event.event_id,
                message_type=event.type,
                timestamp=event.created_at,
                user_id=self._user_id,
                headers=headers,
            )
            await publish_confirmed(
                self._channel,
                exchange=self._exchange,
                routing_key=event.type,
                body=bytes(event.body),
                properties=properties,
            )

    async def report_backlog(self) -> None:
        count, age = await self._store.outbox_backlog(self._now())
        self._metrics.outbox_backlog.set(count)
        self._metrics.outbox_oldest_age_seconds.set(age)


def _by_command(events: Sequence[PendingEvent]) -> list[list[PendingEvent]]:
    """The claimed events, grouped by command, each group in outbox order."""
    commands: dict[int, list[PendingEvent]] = {}
    for event in events:
        commands.setdefault(event.command_seq, []).append(event)
    return list(commands.values())
