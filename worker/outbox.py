"""The outbox relay: publishes committed events to `identity.events`, at least once.

Events are written to the outbox table in the transaction of the change they describe, so an
event exists if and only if its change committed. The relay claims unpublished rows
(`FOR UPDATE SKIP LOCKED`, so several workers share the backlog without trampling each
other), publishes them with publisher confirms and marks only the confirmed ones. A worker
that died between commit and publish leaves rows behind; any relay picks them up on its
next poll. Each row keeps its `event_id`, so a republished event is recognisable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from messages.topology import CONTENT_TYPE
from stores import OutboxStore, PendingEvent, StoreError
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
        """Publish until nothing is left (or what is left is claimed by other relays)."""
        total = 0
        while True:
            published, claimed = await self._publish_batch()
            total += published
            if claimed < self._batch or published < claimed:
                return total

    async def _publish_batch(self) -> tuple[int, int]:
        async with self._store.claim_events(self._batch) as batch:
            events = list(batch.events)
            if not events:
                return 0, 0
            started = time.perf_counter()
            results = await asyncio.gather(
                *(self._publish(event) for event in events), return_exceptions=True
            )
            confirmed = [e.seq for e, r in zip(events, results, strict=True) if r is None]
            batch.mark_published(confirmed)
        self._metrics.outbox_publish_seconds.observe(time.perf_counter() - started)
        self._metrics.outbox_published_total.inc(len(confirmed))
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.warning(
                "events not confirmed; they stay in the outbox",
                extra={"count": len(failures), "error": type(failures[0]).__name__},
            )
        return len(confirmed), len(events)

    async def _publish(self, event: PendingEvent) -> None:
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
            message_id=event.event_id,
            message_type=event.type,
            timestamp=event.created_at,
            user_id=self._user_id,
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
