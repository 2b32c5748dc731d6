"""Readiness: what the event loop learns about its dependencies, for the HTTP sidecar to report.

`HealthState` is the only thing the two sides share. The event loop writes it (the probe task
below, the heartbeat, and the lifecycle code when draining starts); the sidecar's threads read
it. A lock makes each read a consistent snapshot. The worker starts *not ready* until the first
probe has seen both the broker and the database answer, so an orchestrator never routes to a
worker that has not yet connected.

Because the sidecar answers from its own threads, it would go on reporting the last state of a
loop that has stopped turning (a blocking call, a deadlock). The loop therefore marks a
heartbeat every second: silent for `READY_SILENCE_S` the worker is not ready, silent for
`LIVE_SILENCE_S` it is not alive either, so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from worker.metrics import Metrics

log = logging.getLogger(__name__)

NOT_CHECKED = "not checked yet"
BROKER = "broker"
DATABASE = "database"
HEARTBEAT_S = 1.0
READY_SILENCE_S = 10.0
LIVE_SILENCE_S = 30.0


class HealthState:
    """Thread-safe readiness flags (one per dependency, draining) and the loop's heartbeat.

    The worker depends on the broker and the database; another process that serves the same
    sidecar (the mail sender: the broker and its SMTP server) names its own dependencies.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        dependencies: tuple[str, ...] = (BROKER, DATABASE),
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        # None means "answers", else why not; in the order given, for the reasons' order.
        self._down: dict[str, str | None] = dict.fromkeys(dependencies, NOT_CHECKED)
        self._draining = False
        self._broker_losses = 0
        self._last_beat: float | None = None  # None until the loop first beats

    def beat(self) -> None:
        """Called by the event loop every `HEARTBEAT_S`: it is still turning."""
        with self._lock:
            self._last_beat = self._clock()

    def _silence(self) -> float:
        """Seconds since the loop's last heartbeat; 0 before the first (starting up)."""
        return 0.0 if self._last_beat is None else self._clock() - self._last_beat

    def liveness(self) -> tuple[bool, float]:
        """(alive, seconds the loop has been silent): alive unless silent `LIVE_SILENCE_S`."""
        with self._lock:
            silence = self._silence()
        return silence < LIVE_SILENCE_S, silence

    def broker_lost(self, reason: str = "connection lost") -> None:
        """Called the moment the broker connection drops, between probes."""
        with self._lock:
            self._broker_losses += 1
            self._down[BROKER] = reason

    def broker_losses(self) -> int:
        """How many times `broker_lost` was called: a probe whose check began before the
        latest loss must not report the broker up on the strength of that stale check."""
        with self._lock:
            return self._broker_losses

    def set(self, dependency: str, ok: bool, reason: str | None = None) -> None:
        """Record whether `dependency` (one given at construction) answered; `reason` says
        why not (no secrets)."""
        with self._lock:
            if dependency not in self._down:
                raise KeyError(dependency)
            self._down[dependency] = None if ok else (reason or "down")

    def set_broker(self, ok: bool, reason: str | None = None) -> None:
        """Record whether the broker answered; `reason` says why not (no secrets)."""
        self.set(BROKER, ok, reason)

    def set_database(self, ok: bool, reason: str | None = None) -> None:
        """Record whether the database answered; `reason` says why not (no secrets)."""
        self.set(DATABASE, ok, reason)

    def set_draining(self, draining: bool) -> None:
        """Draining workers finish in-flight work but must get no new traffic."""
        with self._lock:
            self._draining = draining

    def snapshot(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not): ready iff every dependency answers, the loop is turning
        and the process is not draining."""
        with self._lock:
            reasons = [
                f"{dependency}: {reason}"
                for dependency, reason in self._down.items()
                if reason is not None
            ]
            silence = self._silence()
            if silence >= READY_SILENCE_S:
                reasons.append(f"event loop: no heartbeat for {silence:.0f}s")
            if self._draining:
                reasons.append("draining")
        return not reasons, reasons


def export_readiness(health: HealthState, metrics: Metrics) -> None:
    """Make `identity_ready` read `health` when scraped, as /readyz does: a value set by the
    probe would stay 1 while the loop that runs the probe is stuck."""
    metrics.ready.set_function(lambda: float(health.snapshot()[0]))


async def run_heartbeat(health: HealthState, every_s: float = HEARTBEAT_S) -> None:
    """Mark the heartbeat every `every_s` until cancelled."""
    while True:
        health.beat()
        await asyncio.sleep(every_s)


async def check_failure(check: Callable[[], Awaitable[None]], timeout_s: float) -> str | None:
    """None if `check` completes in time, else a short reason. Only the exception's type goes
    into it: messages of connection errors can quote a URL, and a URL can hold a password."""
    try:
        await asyncio.wait_for(check(), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except Exception as exc:
        return f"check failed ({type(exc).__name__})"
    return None


async def probe_once(
    health: HealthState,
    metrics: Metrics,
    *,
    check_broker: Callable[[], Awaitable[None]],
    check_database: Callable[[], Awaitable[None]],
    timeout_s: float,
) -> bool:
    """Check both sides concurrently, record the outcome, and return whether the worker is ready."""
    was_ready, _ = health.snapshot()
    losses = health.broker_losses()
    broker, database = await asyncio.gather(
        check_failure(check_broker, timeout_s), check_failure(check_database, timeout_s)
    )
    if health.broker_losses() != losses:
        broker = broker or "connection lost"  # lost while the checks ran: not up yet
    health.set_broker(broker is None, broker)
    health.set_database(database is None, database)
    metrics.broker_connected.set(broker is None)
    metrics.database_up.set(database is None)
    ready, reasons = health.snapshot()  # identity_ready reads it too (export_readiness)
    if ready != was_ready:
        log.log(
            logging.INFO if ready else logging.WARNING,
            "readiness changed",
            extra={"ready": ready, "reasons": reasons},
        )
    return ready


async def run_readiness_probe(
    health: HealthState,
    metrics: Metrics,
    *,
    check_broker: Callable[[], Awaitable[None]],
    check_database: Callable[[], Awaitable[None]],
    interval_s: float,
    timeout_s: float = 2.0,
) -> None:
    """Probe every `interval_s` until cancelled. A check that raises or exceeds `timeout_s`
    marks its side down; it never ends the loop."""
    while True:
        await probe_once(
            health,
            metrics,
            check_broker=check_broker,
            check_database=check_database,
            timeout_s=timeout_s,
        )
        await asyncio.sleep(interval_s)
