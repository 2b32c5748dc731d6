"""The running worker: consumers, outbox relay, housekeeping, sidecar, and an orderly stop.

Stopping (SIGTERM or SIGINT): readiness goes 503, both consumers are cancelled so no new
deliveries arrive, in-flight deliveries get `shutdown_grace_s` to finish, the outbox is
flushed once, then channels, connection, pool and hashing threads close in that order.
Anything not acked by then is returned to its queue by the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import asdict
from datetime import timedelta
from functools import partial

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from services.passwords import huge_pages_settings
from worker.bootstrap import DEV_MODE_WARNING, Components
from worker.health import HealthState, export_readiness, run_heartbeat, run_readiness_probe
from worker.settings import Settings, redacted_url
from worker.sidecar import Sidecar
from worker.topology import BROKER_DEAD_QUEUE, FAST_QUEUE, PASSWORD_QUEUE
from worker.upgrade import V1Retirement

log = logging.getLogger("identity.worker")

HOUSEKEEPING_S = 5.0
PURGE_EVERY_S = 600.0
# Dev mode says so at start (worker.bootstrap) and again this often, so that a worker left
# running in dev mode cannot go unnoticed in its logs.
DEV_MODE_REMINDER_S = 600.0
# The bounds of a stop's steps besides the grace period: consumers cancelled, then commands
# that outlived the grace, the outbox flushed once, the v1 queues' channels (all at once),
# four channels, the connection and the pool closed. A stop takes at most
# IDENTITY_SHUTDOWN_GRACE_S + STOP_STEPS_S, and the hash a thread may still be running (a
# fraction of a second).
CANCEL_CONSUMERS_S = 5.0
FLUSH_OUTBOX_S = 5.0
CLOSE_EACH_S = 2.0
STOP_STEPS_S = 2 * CANCEL_CONSUMERS_S + FLUSH_OUTBOX_S + 7 * CLOSE_EACH_S


class Worker:
    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self.health = HealthState()
        self.sidecar = Sidecar(
            parts.settings.http_host,
            parts.settings.http_port,
            parts.metrics.registry,
            self.health,
            jwks=parts.jwks,
        )
        export_readiness(self.health, parts.metrics)
        self.http_port = 0
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._draining = False
        # However large the prefetch, at most this many deliveries per queue are decoded and
        # worked on at once; the others wait as raw messages, which keeps memory bounded.
        cap = parts.settings.max_concurrent_commands
        self._slots = {
            PASSWORD_QUEUE: asyncio.Semaphore(min(cap, parts.settings.effective_password_prefetch)),
            FAST_QUEUE: asyncio.Semaphore(min(cap, parts.settings.fast_prefetch)),
        }
        self._in_flight_gauges = {
            queue: parts.metrics.commands_in_flight.labels(queue) for queue in self._slots
        }
        self._retirement = V1Retirement(
            parts.connection, self._on_message, prefetch=parts.settings.fast_prefetch
        )

    async def start(self) -> None:
        settings = self.parts.settings
        self.http_port = self.sidecar.start()
        # Beats until the very end of the shutdown: a long drain is not a wedged loop.
        self._heartbeat = asyncio.create_task(run_heartbeat(self.health), name="heartbeat")
        self._tasks = [
            asyncio.create_task(self.parts.relay.run(), name="outbox-relay"),
            asyncio.create_task(self.parts.courier.run(), name="courier-relay"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        if settings.dev_mode:
            self._tasks.append(asyncio.create_task(self._remind_dev_mode(), name="dev-mode"))
        await self._consume(self.parts.password_channel, PASSWORD_QUEUE)
        await self._consume(self.parts.fast_channel, FAST_QUEUE)
        await self._consume_dead_letters()
        # A worker of the previous version may have left commands in its queues.
        self._tasks.append(asyncio.create_task(self._retirement.run(), name="v1-retirement"))
        # Only now can a probe's success mean ready: both consumers exist.
        self._tasks.append(asyncio.create_task(self._probe(), name="readiness-probe"))
        # What exists now (modules, models, pools, connections) lives as long as the worker:
        # move it out of the collector's sight so full collections stop walking it.
        gc.freeze()
        log.info(
            "identity worker started",
            extra={
                "amqp": redacted_url(settings.amqp_url.get_secret_value()),
                "database": redacted_url(settings.database_url.get_secret_value()),
                "http_port": self.http_port,
                "queues": [PASSWORD_QUEUE, FAST_QUEUE, BROKER_DEAD_QUEUE],
                **huge_pages_settings(),  # argon2's memory on huge pages or not
            },
        )

    async def _consume(self, channel: AbstractRobustChannel, name: str) -> None:
        queue = await channel.get_queue(name, ensure=True)
        tag = await queue.consume(partial(self._on_message, name))
        self._consumers.append((queue, tag))

    async def _consume_dead_letters(self) -> None:
        queue = await self.parts.dead_channel.get_queue(BROKER_DEAD_QUEUE, ensure=True)
        tag = await queue.consume(self._on_dead_letter)
        self._consumers.append((queue, tag))

    async def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            if self._draining:
                await self.parts.acks.nack(message, requeue=True)
                return
            await self.parts.forwarder.handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dead letter not forwarded; it will be redelivered")
            with contextlib.suppress(Exception):
                await self.parts.acks.nack(message, requeue=True)
        finally:
            self._in_flight.discard(task)

    async def _on_message(self, queue: str, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            async with self._slots[queue]:
                if self._draining:
                    # Delivered but not started when the stop began: hand it straight back
                    # rather than make it wait out the grace period.
                    await self.parts.acks.nack(message, requeue=True)
                    return
                await self._handle(queue, message)
        finally:
            self._in_flight.discard(task)

    async def _handle(self, queue: str, message: AbstractIncomingMessage) -> None:
        gauge = self._in_flight_gauges[queue]
        gauge.inc()
        try:
            await self.parts.processor.handle(message)
        except asyncio.CancelledError:
            raise  # the channel closed under us: the broker requeues the delivery
        except Exception:
            log.exception("delivery not acknowledged; it will be redelivered")
            with contextlib.suppress(Exception):
                await self.parts.acks.nack(message, requeue=True)
        finally:
            gauge.dec()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        settings: Settings = self.parts.settings
        log.info("stopping: draining in-flight commands", extra={"in_flight": len(self._in_flight)})
        self.health.set_draining(True)
        self._draining = True
        # Every step is bounded, so a stop takes at most the grace period plus STOP_STEPS_S
        # (cancelling consumers, the outbox flush, closing): give the orchestrator more.
        await asyncio.gather(
            *(
                asyncio.wait_for(queue.cancel(tag), timeout=CANCEL_CONSUMERS_S)
                for queue, tag in self._consumers
            ),
            self._retirement.cancel(),  # the v1 queues' consumers, bounded the same
            return_exceptions=True,
        )
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=settings.shutdown_grace_s)
            if late:
                # Unacked, so the broker redelivers them; one that committed is answered from
                # its stored reply then.
                log.warning("grace period over: cancelling commands", extra={"count": len(late)})
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=CANCEL_CONSUMERS_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Both outboxes at once, within the one bound: whatever is left is published by the
        # next relay to run.
        flushes = {"outbox": self.parts.relay.drain(), "courier outbox": self.parts.courier.drain()}
        done = await asyncio.gather(
            *(asyncio.wait_for(flush, timeout=FLUSH_OUTBOX_S) for flush in flushes.values()),
            return_exceptions=True,
        )
        for name, outcome in zip(flushes, done, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(f"{name} not flushed", extra={"error": type(outcome).__name__})
            else:
                log.info(f"{name} flushed", extra={"published": outcome})
        await self._close()
        log.info("identity worker stopped")

    async def _close(self) -> None:
        parts = self.parts
        await self._retirement.close()
        for closing in (
            parts.fast_channel.close(),
            parts.password_channel.close(),
            parts.dead_channel.close(),
            parts.publish_channel.close(),
            parts.connection.close(),
        ):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closing, timeout=CLOSE_EACH_S)
        await parts.store.close(force_after_s=CLOSE_EACH_S)
        parts.passwords.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self.sidecar.stop()

    async def _housekeeping(self) -> None:
        since_purge = PURGE_EVERY_S
        while True:
            with contextlib.suppress(Exception):
                await self.parts.relay.report_backlog()
            with contextlib.suppress(Exception):
                await self.parts.courier.report_backlog()
            if since_purge >= PURGE_EVERY_S:
                since_purge = 0.0
                with contextlib.suppress(Exception):
                    await self._purge()
            await asyncio.sleep(HOUSEKEEPING_S)
            since_purge += HOUSEKEEPING_S

    async def _remind_dev_mode(self) -> None:
        while True:
            await asyncio.sleep(DEV_MODE_REMINDER_S)
            log.warning(DEV_MODE_WARNING)

    async def _purge(self) -> None:
        s = self.parts.settings
        now = self.parts.clock.now()
        # Rows a worker of the previous version wrote during a rolling upgrade.
        await self.parts.store.adopt_legacy_throttle(self.parts.hmac_key.email_tag)
        counts = await self.parts.store.purge(
            idempotency_before=now - timedelta(seconds=s.idempotency_retention_s),
            outbox_before=now - timedelta(seconds=s.outbox_retention_s),
            throttle_before=now - timedelta(seconds=s.throttle_reset_after_s),
            sessions_before=now - timedelta(seconds=s.session_lifetime_s),
            known_sources_before=now - timedelta(seconds=s.throttle_known_source_s),
            # An untouched bucket is full after burst / rate: the same as no row.
            budgets_before=now - timedelta(seconds=s.source_hash_burst / s.source_hash_rate_per_s),
        )
        log.info("purged expired rows", extra={"purged": asdict(counts)})
        codes = await self.parts.store.purge_codes(
            codes_before=now,
            mail_before=now - timedelta(seconds=s.outbox_retention_s),
            throttle_before=now - timedelta(seconds=s.code_throttle_window_s),
        )
        log.info("purged expired codes", extra={"purged": asdict(codes)})

    def _broker_lost(self, *_: object) -> None:
        """The connection dropped: unready now, not at the next probe. The robust connection
        often comes back within one probe interval, and an outage no probe saw would never
        show on /readyz; the probe marks the broker up again once it is reconnected."""
        if not self._draining:  # closing it ourselves on the way out is no loss
            log.warning("broker connection lost: not ready until it is restored")
        self.health.broker_lost()
        self.parts.metrics.broker_connected.set(0)

    async def _probe(self) -> None:
        connection = self.parts.connection
        connection.close_callbacks.add(self._broker_lost)

        async def broker() -> None:
            if connection.is_closed or not connection.connected.is_set():
                raise ConnectionError("broker connection is down")

        await run_readiness_probe(
            self.health,
            self.parts.metrics,
            check_broker=broker,
            check_database=self.parts.store.ping,
            interval_s=self.parts.settings.readiness_probe_s,
        )
