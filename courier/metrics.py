"""The mail sender's Prometheus metrics (`identity_courier_*`), on a registry of its own.

Served by the same sidecar as the worker's. Labels come from closed sets: the four kinds (or
"unknown" for a message that did not parse) and the fixed reasons below; never an address,
a message id or a server's reply text.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from courier.smtp import PERMANENT_REASONS, TRANSIENT_REASONS
from messages.courier import COURIER_KINDS

PREFIX = "identity_courier_"
UNKNOWN_KIND = "unknown"

# Why a delivery ended without a mail. Dead-lettered: the permanent SMTP verdicts and
# `invalid_message`, `untrusted_publisher`, `render_failed`. Acked unsent: `expired`. Handed
# back to the queue for another try: `retry_deadline`.
FAILURE_REASONS = (
    *PERMANENT_REASONS,
    "invalid_message",
    "untrusted_publisher",
    "render_failed",
    "expired",
    "retry_deadline",
)
RETRY_REASONS = TRANSIENT_REASONS
# From a mail's delivery to the SMTP server's "250", retries included: seconds normally, up
# to the retry deadline (minutes) in an outage.
SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def kind_label(kind: str | None) -> str:
    return kind if kind in COURIER_KINDS else UNKNOWN_KIND


@dataclass(frozen=True, slots=True)
class CourierMetrics:
    """Attribute `x` is exported as `identity_courier_x`."""

    registry: CollectorRegistry
    sent_total: Counter
    failed_total: Counter
    duplicates_total: Counter
    retries_total: Counter
    send_seconds: Histogram
    in_flight: Gauge
    queue_messages: Gauge
    broker_connected: Gauge
    smtp_up: Gauge
    ready: Gauge


def create_courier_metrics() -> CourierMetrics:
    """A fresh registry with every metric, plus process and platform info."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)

    def counter(name: str, doc: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=registry)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, registry=registry)

    metrics = CourierMetrics(
        registry=registry,
        sent_total=counter("sent_total", "Mails the SMTP server accepted.", "kind"),
        failed_total=counter(
            "failed_total",
            "Courier messages that ended without a mail, by reason (dead-lettered, expired,"
            " or handed back after the retry deadline).",
            "kind",
            "reason",
        ),
        duplicates_total=counter(
            "duplicates_total",
            "Redeliveries of a message_id this process had already sent: acked, not sent.",
            "kind",
        ),
        retries_total=counter(
            "retries_total", "SMTP tries that failed transiently and were retried.", "reason"
        ),
        send_seconds=Histogram(
            PREFIX + "send_seconds",
            "From delivery to the SMTP server's acceptance, retries included.",
            ("kind",),
            registry=registry,
            buckets=SEND_BUCKETS,
        ),
        in_flight=gauge("in_flight", "Courier messages being handled."),
        queue_messages=gauge(
            "queue_messages", "Messages waiting in identity.courier (ready, not yet delivered)."
        ),
        broker_connected=gauge("broker_connected", "1 while the broker answers, else 0."),
        smtp_up=gauge("smtp_up", "1 while the SMTP server was reached recently, else 0."),
        ready=gauge("ready", "1 while /readyz would answer 200, else 0."),
    )
    # Every series exists from the start, so rates and alerts see zeros, not gaps.
    for kind in COURIER_KINDS:
        metrics.sent_total.labels(kind)
        metrics.duplicates_total.labels(kind)
    for reason in RETRY_REASONS:
        metrics.retries_total.labels(reason)
    return metrics
