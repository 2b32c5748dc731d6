"""W3C trace context across the worker's hops, and its spans (OpenTelemetry).

A command's `traceparent` / `tracestate` AMQP headers travel with everything it causes: its
reply, its events and its courier messages carry headers of the same names and the same trace
id. The events' and mails' context is written with their outbox rows (stores), so a relay that
publishes them later, in another worker or after a restart, still sends it.

Two modes, chosen by the process's tracer provider (`recording()`):

- **No SDK configured** (the API's no-op provider, the default): no span is made at all. The
  caller's headers are validated and passed through unchanged (same span id): a few
  microseconds per command, nothing else.
- **SDK configured** (`IDENTITY_OTLP_TRACES_URL`, or a provider installed before the worker is
  built, as tests do): a span per command, child of the caller's, with the database spans
  (stores.postgres) and the reply's publish span beneath it; each hop's headers name the span
  that sent it, so the trace id stays and the span id moves on.

A malformed `traceparent` (wrong shape, version `ff`, all-zero ids) is ignored, and its
`tracestate` with it: never an error, never a crash. Span attributes name commands, queues
and outcomes, never a payload field, so no secret or personal data reaches a trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pamqp.common import FieldTable

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# W3C: a vendor may cut tracestate at 512 characters; a longer one is not carried at all.
MAX_TRACESTATE = 512
# Version 00 is 55 characters; a later version may append fields, within reason.
MAX_TRACEPARENT = 256

# A tracestate list member (W3C trace context, section 3.3.1), checked here before the
# propagator sees it: the propagator logs a warning quoting any member it refuses, and a log
# line per command that the caller writes is not something to hand out.
_KEY = r"[a-z0-9][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(rf"({_KEY})=(?:{_VALUE})")
MAX_MEMBERS = 32
# W3C trace context, section 3.2: version-trace_id-parent_id-flags, lowercase hex; a later
# version may append fields after a dash.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*", re.S
)
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

# W3C trace context only, whatever global propagator the process may have set.
_W3C = TraceContextTextMapPropagator()
tracer = trace.get_tracer("identity.worker")

Trace = tuple[str | None, str | None]  # (traceparent, tracestate), as stored with a row
NO_TRACE: Trace = (None, None)


def recording() -> bool:
    """Whether an SDK tracer provider is installed: spans are made only then."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _text(value: Any, limit: int) -> str | None:
    if isinstance(value, bytes):  # an AMQP byte string: only ASCII is a W3C header
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > limit:
        return None
    return value


def validated(headers: Mapping[str, Any] | None) -> Trace:
    """A message's trace headers in canonical form (as the propagator would write them), or
    NO_TRACE when it has none or its `traceparent` is malformed. Plain string work, no
    OpenTelemetry object: this is all a command pays when no SDK is installed."""
    if not headers:
        return NO_TRACE
    parent = _text(headers.get(TRACEPARENT), MAX_TRACEPARENT)
    match = _TRACEPARENT.fullmatch(parent) if parent is not None else None
    if match is None:
        return NO_TRACE
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE_ID:
        return NO_TRACE
    if span_id == _ZERO_SPAN_ID:
        return NO_TRACE
    state = _text(headers.get(TRACESTATE), MAX_TRACESTATE)
    return f"00-{trace_id}-{span_id}-{flags}", _canonical_tracestate(state) if state else None


def _canonical_tracestate(state: str) -> str | None:
    """`state` without empty members and blanks around members, if it is a W3C tracestate
    (well-formed members, at most 32, no key twice); else None."""
    members: list[str] = []
    keys: set[str] = set()
    for member in state.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        match = _MEMBER.fullmatch(member)
        if match is None or match.group(1) in keys:
            return None
        keys.add(match.group(1))
        members.append(member)
    return ",".join(members) if 0 < len(members) <= MAX_MEMBERS else None


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The OpenTelemetry context of a message's valid trace headers, else None."""
    parent, state = validated(headers)
    if parent is None:
        return None
    carrier = {TRACEPARENT: parent} if state is None else {TRACEPARENT: parent, TRACESTATE: state}
    return _W3C.extract(carrier)


def current(context: Context | None = None) -> Trace:
    """The trace headers naming the current span (or the span of `context`)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier.get(TRACEPARENT), carrier.get(TRACESTATE)


def headers(value: Trace) -> FieldTable | None:
    """AMQP headers carrying `value`, or None when there is no trace to carry."""
    parent, state = value
    if parent is None:
        return None
    if state:
        return {TRACEPARENT: parent, TRACESTATE: state}
    return {TRACEPARENT: parent}


@contextmanager
def publishing(name: str, stored: Trace, destination: str) -> Iterator[FieldTable | None]:
    """The headers for a message published on behalf of the command whose trace `stored` is
    (an outbox or courier row's): within a publish span, child of it, when spans are
    recorded; else `stored` as it is."""
    if not recording():
        yield headers(stored)
        return
    with tracer.start_as_current_span(
        name,
        context=extract(headers(stored)),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "publish",
            "messaging.destination.name": destination,
        },
    ):
        yield headers(current())


@contextmanager
def consuming(name: str, message_headers: Mapping[str, Any] | None, queue: str) -> Iterator[None]:
    """A span for processing a delivery, child of the span that published it (its valid
    `traceparent`), when spans are recorded; nothing otherwise."""
    if not recording():
        yield
        return
    with tracer.start_as_current_span(
        name,
        context=extract(message_headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
        },
    ):
        yield


class TracingUnavailable(RuntimeError):
    """Spans were asked for, but the SDK and exporter (the `tracing` extra) are missing."""


def configure(endpoint: str, service_name: str) -> None:
    """Record spans and export them in batches over OTLP/HTTP to `endpoint` (for example
    `http://otel-collector:4318/v1/traces`): installs the SDK's tracer provider for the
    process, once, before anything is built. The SDK flushes what is left at exit."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "IDENTITY_OTLP_TRACES_URL needs the OpenTelemetry SDK and OTLP exporter:"
            " install identity-worker[tracing]"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
