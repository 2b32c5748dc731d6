"""The mail sender: consumes `identity.courier`, sends one mail per message over SMTP.

It only reads. The worker declares the exchange, the queue and its dead-lettering; the mail
sender declares nothing (a passive declare, which needs no permission, finds the queue, and
it waits, not ready, until the worker has made it) and publishes nothing: its broker user
may read `identity.courier` and do nothing else. Every delivery ends one of three ways:

- **ack**: the SMTP server accepted the mail; or the message expired (a code past its
  `expires_at` is never sent); or this process already sent that `message_id`.
- **reject, requeue=false**: the message cannot be sent, ever (not a courier message, not
  from the worker's user, a template that fails on it, a 5xx reply or a refused recipient).
  The broker dead-letters it to the worker's internal dead-letter exchange, and the worker
  redacts it (the code removed) on the way to `identity.dead`.
- **nack, requeue=true**: transient SMTP failures (4xx, connection refused or reset,
  timeouts, TLS or login failures) are retried here with exponential back-off and jitter,
  the message unacked meanwhile; after `IDENTITY_SMTP_RETRY_DEADLINE_S` it is handed back to
  the queue, where another instance, whose path to its SMTP server may work, can take it.
  Handing it back also keeps the unacked time far below RabbitMQ's consumer timeout (30
  minutes by default, after which the broker closes the channel), and lets the queue's
  delivery limit bound how often a message goes round before it is dead-lettered.

One mail per `message_id`, as far as SMTP allows: a process remembers the ids it sent (the
last `IDENTITY_COURIER_DEDUPE_WINDOW`), so a redelivery to it sends nothing, and the mail's
Message-ID is derived from the id, so the rare second mail (a crash between the server's
"250" and the broker's ack, then a redelivery to another process) carries the same
Message-ID, on which receivers dedupe. At least once, deduplicated by Message-ID: a message
is never lost to a crash, and a duplicate needs a crash in that window.

Stopping (SIGTERM, SIGINT) drains like the worker: readiness goes 503, the consumer is
cancelled, sends in flight get `IDENTITY_SHUTDOWN_GRACE_S` to finish (one waiting out a
back-off is handed back at once), anything left is cancelled and returned unacked, then
SMTP connections, channels and the connection close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from brokers import connect_any
from courier.mail import AddressTagger, InvalidRecipient, build_mail
from courier.metrics import CourierMetrics, create_courier_metrics, kind_label
from courier.render import MailRenderer, TemplateProblem
from courier.settings import CourierSettings
from courier.smtp import SmtpFailure, SmtpPool
from messages.courier import CourierMessage, parse_courier_message
from messages.topology import COURIER_QUEUE
from worker import tracing
from worker.health import BROKER, HealthState, run_heartbeat
from worker.settings import redacted_url
from worker.sidecar import Sidecar

log = logging.getLogger("identity.courier")

SMTP = "smtp"
# Courier messages are a few hundred bytes; anything this large is not one.
MAX_BODY_BYTES = 64 * 1024
# Transient verdicts that say the server cannot be used at all (not ready), as opposed to a
# 4xx reply from a server that answers.
UNREACHABLE = frozenset({"connection", "timeout", "tls", "auth"})
CANCEL_CONSUMER_S = 5.0
CLOSE_EACH_S = 2.0
PROBE_TIMEOUT_S = 5.0
SMTP_RECHECK_DOWN_S = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class RecentIds:
    """The last `size` message ids this process sent, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class _Refused(Exception):
    """The delivery is no message this process may send: dead-letter it."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


class _StopWhen(stop_base):
    """tenacity: stop retrying once `condition()` holds."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self._condition = condition

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._condition()


class _Draining(Exception):
    """The process is stopping: hand the message back rather than try again."""


class _Expired(Exception):
    """The code expired while the send was being retried."""


def frames_only(exc: BaseException) -> str:
    """A traceback with every frame but no exception message: messages of SMTP and address
    errors quote addresses, and a log must not."""
    stack = traceback.extract_tb(exc.__traceback__)
    return "".join(traceback.format_list(stack)) + type(exc).__name__


class Courier:
    """One mail sender process: consumer, SMTP pool, probes and sidecar."""

    def __init__(
        self,
        settings: CourierSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        metrics: CourierMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or create_courier_metrics()
        self.health = HealthState(dependencies=(BROKER, SMTP))
        self.metrics.ready.set_function(lambda: float(self.health.snapshot()[0]))
        self.sidecar = Sidecar(
            settings.http_host, settings.http_port, self.metrics.registry, self.health
        )
        self.sender = settings.sender()
        self.renderer = MailRenderer(
            service_name=self.sender.display_name or self.sender.domain,
            override_dir=settings.mail_templates_dir,
        )
        target = settings.smtp_target()
        self.pool = SmtpPool(
            target,
            tls_context=settings.tls_context() if target.security != "none" else None,
            timeout_s=settings.smtp_timeout_s,
            size=settings.smtp_connections,
        )
        self.tagger = AddressTagger(settings.tag_key())
        self.sent_ids = RecentIds(settings.courier_dedupe_window)
        self.http_port = 0
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._probe_channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._draining = asyncio.Event()
        self._smtp_ok_at: float | None = None
        self._smtp_is_down = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Templates checked, sidecar up, broker connected, then consume once the queue
        exists. Raises TemplateProblem before anything opens if a template is broken."""
        self.renderer.check(self.clock())
        # At DEBUG, aiormq dumps whole frames, message bodies (codes) included: whatever
        # IDENTITY_LOG_LEVEL says, the protocol libraries log from INFO up.
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
        self.http_port = self.sidecar.start()
        self._heartbeat = asyncio.create_task(run_heartbeat(self.health), name="heartbeat")
        url = self.settings.amqp_url.get_secret_value()
        self.connection = await connect_any(
            url,
            client_properties={"connection_name": "identity-courier"},
            **self.settings.amqp_connect_kwargs(),
        )
        self.connection.close_callbacks.add(self._broker_lost)
        self._tasks.append(asyncio.create_task(self._probe_smtp(), name="smtp-probe"))
        await self._wait_for_queue()
        self._probe_channel = await self.connection.channel()
        self._tasks.append(asyncio.create_task(self._probe_broker(), name="broker-probe"))
        channel = self._channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.settings.courier_prefetch)
        # Passive (ensure=True): declares nothing, so it needs no configure permission, and
        # the robust channel restores it the same way after a reconnect.
        self._queue = await channel.get_queue(COURIER_QUEUE, ensure=True)
        self._consumer_tag = await self._queue.consume(self._on_message)
        target = self.pool.target
        log.info(
            "identity courier started",
            extra={
                "amqp": redacted_url(url),
                "smtp": target.describe(),
                "smtp_user": target.username,
                "http_port": self.http_port,
                "queue": COURIER_QUEUE,
                "prefetch": self.settings.courier_prefetch,
                "smtp_connections": self.settings.smtp_connections,
                "templates_overridden": self.renderer.overridden(),
                "dev_mode": self.settings.dev_mode,
            },
        )

    async def _wait_for_queue(self) -> None:
        """Until the worker has declared `identity.courier` (a passive declare per try, on a
        channel of its own: a missing queue closes the channel)."""
        assert self.connection is not None
        warned = False
        while True:
            channel = await self.connection.channel()
            try:
                await channel.declare_queue(COURIER_QUEUE, passive=True)
                return
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.health.set(BROKER, False, f"queue {COURIER_QUEUE} not declared yet")
                if not warned:
                    log.warning(
                        "waiting for the worker to declare the courier queue",
                        extra={"queue": COURIER_QUEUE},
                    )
                    warned = True
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
            await asyncio.sleep(self.settings.readiness_probe_s)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self.start()
        await self.serve()

    async def serve(self) -> None:
        """After `start()`: send until SIGTERM or SIGINT (or `request_stop()`), then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        log.info("stopping: draining in-flight mails", extra={"in_flight": len(self._in_flight)})
        self.health.set_draining(True)
        self._draining.set()
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), CANCEL_CONSUMER_S)
        if self._in_flight:
            grace = self.settings.shutdown_grace_s
            _, late = await asyncio.wait(set(self._in_flight), timeout=grace)
            if late:
                # Unacked: the broker hands them to another instance (or to this one later).
                log.warning("grace period over: cancelling sends", extra={"count": len(late)})
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=CANCEL_CONSUMER_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(), CLOSE_EACH_S)
        for closing in (self._channel, self._probe_channel, self.connection):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closing.close(), CLOSE_EACH_S)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self.sidecar.stop()
        log.info("identity courier stopped")

    # -- one delivery ----------------------------------------------------------------------

    async def _on_message(self, delivery: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self.metrics.in_flight.inc()
        try:
            if self._draining.is_set():
                # Delivered but not started when the stop began: straight back to the queue.
                await self._settle(delivery, "nack")
                return
            # The trace of the command that caused the mail goes on here (worker.tracing).
            kind = kind_label(delivery.routing_key)
            with tracing.consuming(f"{kind} send", delivery.headers, COURIER_QUEUE):
                await self._handle(delivery)
        except asyncio.CancelledError:
            raise  # unacked: the broker redelivers it
        except Exception as exc:
            log.error(
                "unexpected error; the message goes back to the queue",
                extra={"exc_type": type(exc).__name__, "frames": frames_only(exc)},
            )
            await self._settle(delivery, "nack")
        finally:
            self.metrics.in_flight.dec()
            self._in_flight.discard(task)

    def _parse(self, delivery: AbstractIncomingMessage) -> CourierMessage:
        if len(delivery.body) > MAX_BODY_BYTES:
            raise _Refused("invalid_message", problem="too large", body_bytes=len(delivery.body))
        expected = self.settings.worker_user
        if expected is not None and delivery.user_id != expected:
            raise _Refused("untrusted_publisher", user_id=delivery.user_id)
        try:
            return parse_courier_message(delivery.body)
        except ValidationError as exc:
            # Where and what kind of problem, never the input (it may hold the code).
            problems = [
                {"loc": ".".join(str(part) for part in error["loc"]), "type": error["type"]}
                for error in exc.errors(include_input=False, include_url=False)
            ]
            raise _Refused("invalid_message", problems=problems[:10]) from None

    async def _handle(self, delivery: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        try:
            message = self._parse(delivery)
        except _Refused as refused:
            kind = kind_label(delivery.routing_key)
            self.metrics.failed_total.labels(kind, refused.reason).inc()
            log.warning(
                "courier message refused: dead-lettered unsent",
                extra={
                    "reason": refused.reason,
                    "kind": kind,
                    "message_id": delivery.message_id,
                    **refused.fields,
                },
            )
            await self._settle(delivery, "reject")
            return
        # Another delivery of the same id is being sent right now: wait for its outcome.
        while (pending := self._pending.get(message.message_id)) is not None:
            await asyncio.shield(pending)
        if message.message_id in self.sent_ids:
            self.metrics.duplicates_total.labels(message.kind).inc()
            log.info(
                "already sent: acked without a second mail", extra=self._fields(message, delivery)
            )
            await self._settle(delivery, "ack")
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[message.message_id] = done
        try:
            await self._send(message, delivery, started)
        finally:
            del self._pending[message.message_id]
            done.set_result(None)

    def _fields(self, message: CourierMessage, delivery: AbstractIncomingMessage) -> dict[str, Any]:
        """What a log line may say about a message: never the code, never the address."""
        return {
            "message_id": message.message_id,
            "kind": message.kind,
            "account_id": message.account_id,
            "to_domain": self.tagger.domain(message.to),
            "to_tag": self.tagger.tag(message.to),
            "redelivered": delivery.redelivered,
        }

    def _expired(self, message: CourierMessage) -> bool:
        return message.expires_at is not None and message.expires_at <= self.clock()

    async def _send(
        self, message: CourierMessage, delivery: AbstractIncomingMessage, started: float
    ) -> None:
        fields = self._fields(message, delivery)
        if self._expired(message):
            await self._give_up(delivery, message, "expired", "ack", fields)
            return
        try:
            outgoing = build_mail(message, self.renderer.render(message, self.clock()), self.sender)
        except TemplateProblem as problem:
            fields["problem"] = str(problem)  # names the template, never the values
            await self._give_up(delivery, message, "render_failed", "reject", fields)
            return
        except InvalidRecipient:
            await self._give_up(delivery, message, "invalid_recipient", "reject", fields)
            return
        s = self.settings
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_any(
                stop_after_delay(s.smtp_retry_deadline_s),
                _StopWhen(lambda: self._draining.is_set() or self._expired(message)),
            ),
            wait=wait_random_exponential(
                multiplier=s.smtp_retry_initial_delay_s, max=s.smtp_retry_max_delay_s
            ),
            retry=retry_if_exception(lambda exc: isinstance(exc, SmtpFailure) and exc.transient),
            before_sleep=self._before_retry(fields),
            sleep=self._back_off,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if self._draining.is_set():
                        raise _Draining
                    if self._expired(message):
                        raise _Expired
                    await self.pool.send(outgoing)
        except (_Draining, _Expired, SmtpFailure) as failure:
            fields["attempts"] = attempts
            await self._failed(delivery, message, failure, fields)
            return
        # Remembered before the ack: a redelivery racing the ack must find it.
        self.sent_ids.add(message.message_id)
        self._smtp_reached()
        await self._settle(delivery, "ack")
        elapsed = time.monotonic() - started
        self.metrics.sent_total.labels(message.kind).inc()
        self.metrics.send_seconds.labels(message.kind).observe(elapsed)
        log.info(
            "mail sent",
            extra={**fields, "attempts": attempts, "duration_ms": round(elapsed * 1000, 1)},
        )

    async def _failed(
        self,
        delivery: AbstractIncomingMessage,
        message: CourierMessage,
        failure: Exception,
        fields: dict[str, Any],
    ) -> None:
        if isinstance(failure, SmtpFailure) and not failure.transient:
            self._smtp_reached()  # it answered, with a refusal
            fields.update(smtp_code=failure.code)
            await self._give_up(delivery, message, failure.reason, "reject", fields)
        elif isinstance(failure, _Expired) or self._expired(message):
            await self._give_up(delivery, message, "expired", "ack", fields)
        elif isinstance(failure, _Draining) or self._draining.is_set():
            log.info("stopping: handed back to the queue unsent", extra=fields)
            await self._settle(delivery, "nack")
        else:
            if isinstance(failure, SmtpFailure):
                fields.update(last_error=failure.reason, smtp_code=failure.code)
            await self._give_up(delivery, message, "retry_deadline", "nack", fields)

    async def _give_up(
        self,
        delivery: AbstractIncomingMessage,
        message: CourierMessage,
        reason: str,
        how: str,
        fields: dict[str, Any],
    ) -> None:
        self.metrics.failed_total.labels(message.kind, reason).inc()
        what = {
            "ack": "not sent: acked",
            "reject": "not sent: dead-lettered",
            "nack": "not sent yet: handed back to the queue",
        }[how]
        log.warning(f"mail {what}", extra={**fields, "reason": reason})
        await self._settle(delivery, how)

    def _before_retry(self, fields: dict[str, Any]) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome is not None else None
            if not isinstance(failure, SmtpFailure):
                return
            self.metrics.retries_total.labels(failure.reason).inc()
            if failure.reason in UNREACHABLE:
                self._smtp_unreachable(failure.reason)
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.log(
                logging.INFO if state.attempt_number == 1 else logging.DEBUG,
                "smtp try failed: retrying",
                extra={
                    **fields,
                    "reason": failure.reason,
                    "smtp_code": failure.code,
                    "attempt": state.attempt_number,
                    "retry_in_s": round(delay, 2),
                },
            )

        return before_sleep

    async def _back_off(self, seconds: float) -> None:
        """tenacity's sleep, cut short when the process starts stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), seconds)

    async def _settle(self, delivery: AbstractIncomingMessage, how: str) -> None:
        """Ack, reject (dead-letter) or nack (requeue). If the channel is gone, the broker
        redelivers the message anyway, and a sent id is remembered: nothing more to do."""
        try:
            if how == "ack":
                await delivery.ack()
            elif how == "reject":
                await delivery.reject(requeue=False)
            else:
                await delivery.nack(requeue=True)
        except Exception as exc:
            log.warning(
                "could not settle the delivery; the broker will redeliver it",
                extra={"settle": how, "error": type(exc).__name__},
            )

    # -- readiness -------------------------------------------------------------------------

    def _smtp_reached(self) -> None:
        self._smtp_ok_at = time.monotonic()
        self._smtp_is_down = False
        was_ready = self.health.snapshot()[0]
        self.health.set(SMTP, True)
        self.metrics.smtp_up.set(1)
        self._log_readiness(was_ready)

    def _smtp_unreachable(self, reason: str) -> None:
        self._smtp_is_down = True
        was_ready = self.health.snapshot()[0]
        self.health.set(SMTP, False, reason)
        self.metrics.smtp_up.set(0)
        self._log_readiness(was_ready)

    def _log_readiness(self, was_ready: bool) -> None:
        ready, reasons = self.health.snapshot()
        if ready != was_ready:
            log.log(
                logging.INFO if ready else logging.WARNING,
                "readiness changed",
                extra={"ready": ready, "reasons": reasons},
            )

    async def _probe_smtp(self) -> None:
        """Check the SMTP server when no mail went out for `IDENTITY_SMTP_PROBE_S` (every
        few seconds while it is down): ready means it was reached recently."""
        s = self.settings
        while True:
            last = self._smtp_ok_at
            if last is None or self._smtp_is_down or time.monotonic() - last >= s.smtp_probe_s:
                try:
                    await asyncio.wait_for(self.pool.probe(), s.smtp_timeout_s + PROBE_TIMEOUT_S)
                except SmtpFailure as failure:
                    self._smtp_unreachable(failure.reason)
                except TimeoutError:
                    self._smtp_unreachable("timeout")
                else:
                    self._smtp_reached()
            if self._smtp_is_down or self._smtp_ok_at is None:
                wait = min(SMTP_RECHECK_DOWN_S, s.smtp_probe_s)
            else:
                wait = s.smtp_probe_s - (time.monotonic() - self._smtp_ok_at)
            await asyncio.sleep(max(0.05, wait))

    def _broker_lost(self, *_: object) -> None:
        if not self._draining.is_set():
            log.warning("broker connection lost: not ready until it is restored")
        self.health.broker_lost()
        self.metrics.broker_connected.set(0)

    async def _probe_broker(self) -> None:
        """Every `IDENTITY_READINESS_PROBE_S`: the connection is up, the queue exists (its
        depth is the backlog gauge) and this process consumes it."""
        while True:
            was_ready = self.health.snapshot()[0]
            losses = self.health.broker_losses()
            reason = await self._broker_problem()
            if reason is None and self.health.broker_losses() != losses:
                reason = "connection lost"
            self.health.set(BROKER, reason is None, reason)
            self.metrics.broker_connected.set(reason is None)
            self._log_readiness(was_ready)
            await asyncio.sleep(self.settings.readiness_probe_s)

    async def _broker_problem(self) -> str | None:
        connection, channel = self.connection, self._probe_channel
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return "connection is down"
        if channel is None or channel.is_closed:
            return "probe channel reopening"
        try:
            queue = await asyncio.wait_for(
                channel.declare_queue(COURIER_QUEUE, passive=True), PROBE_TIMEOUT_S
            )
        except aiormq.exceptions.ChannelNotFoundEntity:
            return f"queue {COURIER_QUEUE} not found"
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT_S:g}s"
        except Exception as exc:
            return f"check failed ({type(exc).__name__})"
        count = queue.declaration_result.message_count
        if count is not None:
            self.metrics.queue_messages.set(count)
        if self._consumer_tag is None:
            return "not consuming yet"
        return None
