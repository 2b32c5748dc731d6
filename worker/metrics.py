"""Every Prometheus metric of the worker, on one registry that `create_metrics()` builds.

Nothing is registered at import time: the composition root creates one `Metrics` and hands it
to whoever records, and each test can make a fresh one. Label values are drawn from closed sets
(command names, error codes, fixed reasons) so that a hostile routing key cannot blow up the
series count or smuggle text into the metrics; `command_label()` and `outcome_label()` are the
gate for values that come from messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from messages.commands import COMMANDS
from messages.replies import ErrorCode

PREFIX = "identity_"
UNKNOWN = "unknown"
OK = "ok"

# 1 ms (a cached verify) to 10 s (argon2 behind a queue of other hashes, or a retried query).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Argon2 at the default cost takes tens to hundreds of ms; a saturated pool adds more.
HASH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Every value `outcome_label()` can return, in a fixed order.
OUTCOMES = (OK, *(code.value for code in ErrorCode), UNKNOWN)
_KNOWN_OUTCOMES = frozenset(OUTCOMES)


def command_label(name: str | None) -> str:
    """`name` if it is a command of the contract, else "unknown"."""
    return name if name is not None and name in COMMANDS else UNKNOWN


def outcome_label(code: str | None) -> str:
    """ "ok" for success (None), the error code if it is one of the contract's, else "unknown"."""
    if code is None:
        return OK
    return code if code in _KNOWN_OUTCOMES else UNKNOWN


def observer(histogram: Histogram) -> Callable[[str, float], None]:
    """`observe(label, seconds)` on a one-label histogram, each child looked up once. For
    labels drawn from the code (operation names), never from messages."""
    children: dict[str, Histogram] = {}

    def observe(label: str, seconds: float) -> None:
        child = children.get(label)
        if child is None:
            child = children[label] = histogram.labels(label)
        child.observe(seconds)

    return observe


@dataclass(frozen=True, slots=True)
class Metrics:
    """The worker's metrics; attribute `x` is exported as `identity_x`."""

    registry: CollectorRegistry
    commands_total: Counter
    command_duration_seconds: Histogram
    commands_in_flight: Gauge
    idempotent_replays_total: Counter
    dead_letters_total: Counter
    retries_total: Counter
    malformed_messages_total: Counter
    forbidden_total: Counter
    caller_commands_total: Counter
    replies_lost_total: Counter
    outbox_backlog: Gauge
    outbox_oldest_age_seconds: Gauge
    outbox_published_total: Counter
    outbox_publish_seconds: Histogram
    hash_pool_pending: Gauge
    hash_seconds: Histogram
    db_query_seconds: Histogram
    broker_connected: Gauge
    database_up: Gauge
    ready: Gauge
    dev_mode: Gauge


def create_metrics() -> Metrics:
    """A fresh registry with every metric, plus process (CPU, memory, fds) and platform info."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)

    def counter(name: str, doc: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=registry)

    def gauge(name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=registry)

    def histogram(
        name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)

    return Metrics(
        registry=registry,
        commands_total=counter(
            "commands_total",
            "Commands answered, by outcome (ok or error code).",
            "command",
            "outcome",
        ),
        command_duration_seconds=histogram(
            "command_duration_seconds",
            "Time from delivery to the confirmed reply.",
            ("command",),
            LATENCY_BUCKETS,
        ),
        commands_in_flight=gauge("commands_in_flight", "Deliveries being handled.", "queue"),
        idempotent_replays_total=counter(
            "idempotent_replays_total", "Deliveries answered from a stored reply.", "command"
        ),
        dead_letters_total=counter(
            "dead_letters_total", "Redacted copies published to identity.dead.", "reason"
        ),
        retries_total=counter("retries_total", "Retries after a transient fault.", "operation"),
        malformed_messages_total=counter(
            "malformed_messages_total", "Deliveries rejected before dispatch.", "reason"
        ),
        forbidden_total=counter(
            "forbidden_total",
            "Commands refused by the caller policy, by caller (a user the policy names, or "
            "other) and command.",
            "caller",
            "command",
        ),
        caller_commands_total=counter(
            "caller_commands_total",
            "Decoded commands by caller (a user the caller policy or IDENTITY_CALLER_RATES "
            "names, or other) and decision (admitted, or rate_limited by the caller's rate).",
            "caller",
            "decision",
        ),
        replies_lost_total=counter(
            "replies_lost_total",
            "Replies the broker refused (nacked) or returned: final, never retried.",
            "reason",
        ),
        outbox_backlog=gauge("outbox_backlog", "Outbox rows not yet published."),
        outbox_oldest_age_seconds=gauge(
            "outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row."
        ),
        outbox_published_total=counter("outbox_published_total", "Events published and confirmed."),
        outbox_publish_seconds=histogram(
            "outbox_publish_seconds",
            "Time to publish and mark one outbox batch.",
            (),
            LATENCY_BUCKETS,
        ),
        hash_pool_pending=gauge("hash_pool_pending", "Password hashes queued or running."),
        hash_seconds=histogram(
            "hash_seconds", "Argon2 time, queueing included.", ("operation",), HASH_BUCKETS
        ),
        db_query_seconds=histogram(
            "db_query_seconds", "Database operation time.", ("operation",), LATENCY_BUCKETS
        ),
        broker_connected=gauge("broker_connected", "1 while the broker answers, else 0."),
        database_up=gauge("database_up", "1 while the database answers, else 0."),
        ready=gauge("ready", "1 while /readyz would answer 200, else 0."),
        dev_mode=gauge("dev_mode", "1 when IDENTITY_DEV_MODE is true (never in production)."),
    )
