"""The courier: its broker objects, and the relay that hands courier rows to the broker.

Courier rows are written in the transaction of the change they report (stores.codes), so a
mail exists if and only if its change committed. The relay claims rows not relayed yet
(`FOR UPDATE SKIP LOCKED`, shared between workers like the event outbox), unseals a row's code,
publishes it to `identity.courier` with publisher confirms, and marks only the confirmed rows
relayed: that wipes the sealed code from the row. At least once: a worker that died between
the confirm and the mark leaves the row for any relay to publish again, under the same
`message_id`, which is how the mail sender sends one mail per message.

Every courier message is persistent and published with `user_id` = the worker's broker user
(RabbitMQ refuses any other, so the mail sender can trust where it came from), and a code's
message with `expiration` = the code's remaining lifetime: a code nobody sent in time dies in
the queue. A row whose code expired before it could be relayed is marked relayed unsent.

The queue dead-letters (a mail sender's reject, an expired code) to the worker's internal
dead-letter exchange, never straight to `identity.dead`: what lands there holds a code, and
the worker removes it on the way to `identity.dead`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote, urlsplit

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.commands import Basic
from pamqp.common import FieldTable
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import SecretStr

from messages.courier import COURIER_KINDS, CourierMessage
from messages.models import wire_form
from messages.topology import CONTENT_TYPE, COURIER_EXCHANGE, COURIER_QUEUE
from services.codes import CodeKeys, show_code
from stores import CourierStore, PendingMail, StoreError
from worker import tracing
from worker.broker import BROKER_FAULTS, publish_confirmed
from worker.metrics import PREFIX
from worker.topology import BROKER_DEAD_EXCHANGE

log = logging.getLogger("identity.courier")

# The worker's internal dead-letter exchange: only the broker's own dead-lettering feeds it,
# and only the worker's user reads its queue (worker.forwarder redacts on the way to
# identity.dead).
WORKER_DEAD_LETTER_EXCHANGE = BROKER_DEAD_EXCHANGE


def courier_queue_arguments() -> FieldTable:
    """Quorum, for a cluster; dead letters kept until the internal exchange took them."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": WORKER_DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


@dataclass(frozen=True, slots=True)
class CourierTopology:
    exchange: AbstractExchange
    queue: AbstractQueue


async def declare_courier(channel: AbstractChannel) -> CourierTopology:
    """Declare (idempotently) the courier exchange and queue, bound for every kind."""
    exchange = await channel.declare_exchange(
        COURIER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        COURIER_QUEUE, durable=True, arguments=courier_queue_arguments()
    )
    for kind in COURIER_KINDS:
        await queue.bind(exchange, routing_key=kind)
    return CourierTopology(exchange, queue)


def broker_user(amqp_url: str) -> str:
    """The user name of an AMQP URL (RabbitMQ's default, guest, when it names none): the
    `user_id` the broker accepts on this connection's publishes."""
    return unquote(urlsplit(amqp_url).username or "guest")


@dataclass(frozen=True, slots=True)
class CourierRelayMetrics:
    backlog: Gauge
    oldest_age_seconds: Gauge
    relayed_total: Counter
    expired_total: Counter

    @classmethod
    def on(cls, registry: CollectorRegistry) -> CourierRelayMetrics:
        return cls(
            backlog=Gauge(
                PREFIX + "courier_backlog", "Courier rows not relayed yet.", registry=registry
            ),
            oldest_age_seconds=Gauge(
                PREFIX + "courier_oldest_age_seconds",
                "Age of the oldest courier row not relayed yet.",
                registry=registry,
            ),
            relayed_total=Counter(
                PREFIX + "courier_relayed_total",
                "Courier messages published and confirmed, by kind.",
                ["kind"],
                registry=registry,
            ),
            expired_total=Counter(
                PREFIX + "courier_expired_total",
                "Courier rows whose code expired before they could be relayed.",
                registry=registry,
            ),
        )


class CourierRelay:
    def __init__(
        self,
        store: CourierStore,
        channel: AbstractChannel,
        keys: CodeKeys,
        metrics: CourierRelayMetrics,
        now: Callable[[], datetime],
        *,
        user_id: str,
        batch: int = 100,
        poll_s: float = 1.0,
    ) -> None:
        self._store = store
        self._channel = channel  # with publisher confirms
        self._keys = keys
        self._metrics = metrics
        self._now = now
        self._user_id = user_id
        self._batch = batch
        self._poll_s = poll_s
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit: relay now rather than at the next poll."""
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
                log.warning("courier relay paused", extra={"error": type(exc).__name__})
                await asyncio.sleep(self._poll_s)

    async def drain(self) -> int:
        """Relay until nothing is left (or what is left is claimed by other relays)."""
        total = 0
        while True:
            relayed, claimed = await self._relay_batch()
            total += relayed
            if claimed < self._batch or relayed < claimed:
                return total

    async def _relay_batch(self) -> tuple[int, int]:
        async with self._store.claim_mail(self._batch) as batch:
            mails = list(batch.mails)
            if not mails:
                return 0, 0
            now = self._now()
            results = await asyncio.gather(
                *(self._relay(mail, now) for mail in mails), return_exceptions=True
            )
            done = [m.seq for m, r in zip(mails, results, strict=True) if r is None]
            batch.mark_relayed(done)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.warning(
                "courier messages not confirmed; they stay in the courier outbox",
                extra={"count": len(failures), "error": type(failures[0]).__name__},
            )
        return len(done), len(mails)

    async def _relay(self, mail: PendingMail, now: datetime) -> None:
        """Publish `mail` (None once confirmed, or once there is no use in sending it)."""
        expiration = None
        code = None
        if mail.sealed_code is not None and mail.expires_at is not None:
            remaining_ms = int((mail.expires_at - now).total_seconds() * 1000)
            if remaining_ms <= 0:
                self._metrics.expired_total.inc()
                return
            expiration = str(remaining_ms)
            code = SecretStr(show_code(self._keys.unseal(mail.message_id, mail.sealed_code)))
        message = CourierMessage(
            message_id=mail.message_id,
            kind=mail.kind,  # type: ignore[arg-type]  # the store keeps what the service wrote
            to=mail.recipient,
            account_id=mail.account_id,
            display_name=mail.display_name,
            code=code,
            expires_at=mail.expires_at if code is not None else None,
            occurred_at=mail.created_at,
        )
        stored = (mail.traceparent, mail.tracestate)
        with tracing.publishing(f"{mail.kind} publish", stored, COURIER_EXCHANGE) as headers:
            properties = Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                message_id=mail.message_id,
                message_type=mail.kind,
                timestamp=mail.created_at,
                user_id=self._user_id,
                expiration=expiration,
                headers=headers,
            )
            await publish_confirmed(
                self._channel,
                exchange=COURIER_EXCHANGE,
                routing_key=mail.kind,
                body=orjson.dumps(wire_form(message, exclude_none=True)),
                properties=properties,
            )
        self._metrics.relayed_total.labels(mail.kind).inc()

    async def report_backlog(self) -> None:
        count, age = await self._store.mail_backlog(self._now())
        self._metrics.backlog.set(count)
        self._metrics.oldest_age_seconds.set(age)
