"""Publishing replies and redacted dead letters, with publisher confirms and bounded retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldTable
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from messages import DeadLetterRecord, Reply
from messages.topology import CONTENT_TYPE, DIRECT_REPLY_TO
from services.clock import Clock
from worker.logs import redact
from worker.metrics import Metrics
from worker.topology import delivery_count

log = logging.getLogger("identity.worker")

# What a broker hiccup looks like from aio-pika: the robust connection reconnects underneath,
# so the same publish is tried again after a pause.
BROKER_FAULTS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,  # "Channel closed" while the robust channel is being restored
)

# The broker's answers to a publish that are not faults: a nack (DeliveryError: a queue
# refused the message, e.g. a full one with `x-overflow: reject-publish`) and a return
# (PublishError, a DeliveryError: a mandatory message no queue took).
BROKER_REFUSALS = (aiormq.exceptions.DeliveryError,)

# How long one publish may take (connection, channel and confirm) before it counts as a
# broker fault.
PUBLISH_TIMEOUT_S = 10.0


def broker_retrying(metrics: Metrics, operation: str, deadline_s: float) -> AsyncRetrying:
    def count(state: RetryCallState) -> None:
        metrics.retries_total.labels(operation).inc()

    return AsyncRetrying(
        # A nack or a return is the broker's answer, not a fault: sending again gets the same.
        retry=retry_if_exception_type(BROKER_FAULTS) & retry_if_not_exception_type(BROKER_REFUSALS),
        stop=stop_after_delay(deadline_s),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
        before_sleep=count,
        reraise=True,
    )


async def publish_confirmed(
    channel: AbstractChannel,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: Basic.Properties,
    mandatory: bool = False,
) -> None:
    """Publish on the channel (which must have publisher confirms) and wait for the broker's
    ack; a nack raises aiormq's DeliveryError, a return of a `mandatory` message its
    PublishError, a broker fault one of BROKER_FAULTS.

    Every publish of the worker (replies, events, dead letters) goes to aiormq, the protocol
    layer under aio-pika, on the robust channel's current connection: aio-pika's
    Exchange.publish does the same through a Message object and cost about 40 us more CPU per
    publish (see BENCHMARKS.md). Events and dead letters are not mandatory: an event nobody
    subscribes to is dropped by the broker, which is what the aio-pika path did too.
    """
    # The deadline covers waiting for a reconnecting channel too: a robust channel's
    # underlay is only handed out once the connection is back, however long that takes.
    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
        underlay = await channel.get_underlay_channel()
        confirmation = await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
        )
    # A channel without `on_return_raises` answers a return with the returned message.
    if isinstance(confirmation, DeliveredMessage) and isinstance(
        confirmation.delivery, Basic.Return
    ):
        raise aiormq.exceptions.PublishError(confirmation, confirmation.delivery)


class ReplySender:
    """Sends at most one reply per delivery to its `reply_to`, via the default exchange.

    Replies carry the worker's broker user as `user_id` (RabbitMQ vouches for it), so a
    caller can tell them from a neighbour's forgery. A reply the broker refuses (a full queue
    nacks it) or returns (a named queue that does not exist) is final: the command's effect
    stands, the loss is counted in `identity_replies_lost_total{reason}`, and the delivery is
    acked. Sending it again would get the same answer, and retrying for the whole deadline is
    how one hostile reply queue stalls a worker. Broker faults (a lost connection) are still
    retried until the deadline.

    A reply to a named queue is `mandatory`, so a missing queue is noticed; a direct reply-to
    one is not: RabbitMQ 3.10 returns every mandatory publish to a direct reply-to address,
    delivered or not, and one whose caller has gone is acked and dropped either way.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        metrics: Metrics,
        deadline_s: float = 30.0,
        *,
        user_id: str | None = None,
    ):
        self._channel = channel
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._user_id = user_id

    async def send(
        self,
        request: AbstractIncomingMessage,
        reply: Reply,
        headers: FieldTable | None = None,
    ) -> None:
        """Send `reply` to the request's `reply_to`, with `headers` (its trace context)."""
        assert request.reply_to is not None
        direct = request.reply_to.startswith(DIRECT_REPLY_TO)
        # Direct reply-to is transient by nature; a named reply queue gets a persistent reply.
        mode = (
            aio_pika.DeliveryMode.NOT_PERSISTENT.value
            if direct
            else aio_pika.DeliveryMode.PERSISTENT.value
        )
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            correlation_id=request.correlation_id or request.message_id,
            delivery_mode=mode,
            user_id=self._user_id,
            headers=headers,
        )
        body = orjson.dumps(reply.to_wire())
        try:
            await self._send(request.reply_to, body, properties, mandatory=not direct)
        except aiormq.exceptions.PublishError:
            self._lost(request, "returned")
        except aiormq.exceptions.DeliveryError:
            self._lost(request, "nacked")

    async def _send(
        self, queue: str, body: bytes, properties: Basic.Properties, *, mandatory: bool
    ) -> None:
        # The first try goes without a retry controller: building one per reply cost about 3%
        # of the worker's CPU, and nearly every reply needs only the one try.
        try:
            await self._publish(queue, body, properties, mandatory)
            return
        except BROKER_REFUSALS:
            raise
        except BROKER_FAULTS:
            self._metrics.retries_total.labels("reply").inc()
        async for attempt in broker_retrying(self._metrics, "reply", self._deadline_s):
            with attempt:
                await self._publish(queue, body, properties, mandatory)

    async def _publish(
        self, queue: str, body: bytes, properties: Basic.Properties, mandatory: bool
    ) -> None:
        await publish_confirmed(
            self._channel,
            exchange="",
            routing_key=queue,
            body=body,
            properties=properties,
            mandatory=mandatory,
        )

    def _lost(self, request: AbstractIncomingMessage, reason: str) -> None:
        self._metrics.replies_lost_total.labels(reason).inc()
        log.warning(
            "reply lost",
            extra={
                "reason": reason,
                "command": request.routing_key,
                "caller": request.user_id,
                "correlation_id": request.correlation_id,
            },
        )


class DeadLetters:
    """Copies of what could not be processed, for operators: never a password or token.

    A body that parsed as a JSON object is kept with every secret field redacted. Anything
    else keeps only its size: a body that did not parse cannot be redacted reliably, a list or
    a bare value has no field names to tell a secret by, and an object nested deeper than the
    record allows (`messages.deadletters.MAX_BODY_DEPTH`) is not copied at all.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: str,
        metrics: Metrics,
        clock: Clock,
        deadline_s: float = 30.0,
        *,
        user_id: str | None = None,
    ):
        self._channel = channel  # with publisher confirms
        self._exchange = exchange
        self._metrics = metrics
        self._clock = clock
        self._deadline_s = deadline_s
        self._user_id = user_id

    async def publish(self, message: AbstractIncomingMessage, reason: str, parsed: Any) -> None:
        record = self._record(message, reason, parsed)
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
            headers={"x-identity-reason": reason},
            message_id=message.message_id,
            user_id=self._user_id,
        )
        body = record.model_dump_json().encode()
        async for attempt in broker_retrying(self._metrics, "dead_letter", self._deadline_s):
            with attempt:
                await publish_confirmed(
                    self._channel,
                    exchange=self._exchange,
                    routing_key=reason,
                    body=body,
                    properties=properties,
                )
        self._metrics.dead_letters_total.labels(reason).inc()
        log.warning(
            "dead-lettered",
            extra={"reason": reason, "command": message.routing_key, "caller": message.user_id},
        )

    def _record(
        self, message: AbstractIncomingMessage, reason: str, parsed: Any
    ) -> DeadLetterRecord:
        """The record of `message`, with its body redacted where it can be kept."""
        if isinstance(parsed, Mapping):
            try:
                kept = redact(parsed)
                # Whether redaction changed anything in the kept body: such a body is not what
                # was sent, and `identity-worker dead republish` must not send it again.
                return self._about(message, reason, body=kept, redacted=kept != parsed)
            except (RecursionError, ValidationError):
                pass  # nested too deep to copy: only its size is kept
        return self._about(message, reason)

    def _about(
        self,
        message: AbstractIncomingMessage,
        reason: str,
        body: dict[str, Any] | None = None,
        redacted: bool = False,
    ) -> DeadLetterRecord:
        return DeadLetterRecord(
            reason=reason,
            command=message.routing_key,
            dead_lettered_at=self._clock.now(),
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
            delivery_count=delivery_count(message.headers, redelivered=bool(message.redelivered)),
            body_bytes=len(message.body),
            body=body,
            redacted=redacted,
        )
