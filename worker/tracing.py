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
  built, as tests do): a span per command the caller sampled, child of the caller's. A state
  change has its database spans (stores.postgres) and its publish spans (reply, events,
  courier messages) beneath it; a query (`session.verify`, `account.get`, ...) is its command
  span alone, and its reply names that span. Each hop's headers name the span that sent it,
  so the trace id stays and the span id moves on. A trace the caller left out (sampled flag
  off) is passed on as without an SDK: no span, not even one the sampler drops.

Why so few spans: each recorded span costs the worker's process some 45 µs of CPU (the SDK's
span object, its attributes, the batch processor and the OTLP encoding on the exporter's
thread, which shares the GIL), against some 500 µs for a whole `session.verify`
(BENCHMARKS.md, "Trace context and spans").

A malformed `traceparent` (wrong shape, version `ff`, all-zero ids) is ignored, and its
`tracestate` with it: never an error, never a crash. Span attributes name commands, queues
and outcomes, never a payload field, so no secret or personal data reaches a trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from functools import lru_cache
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
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
# A simple key starts with a letter; only a multi-tenant key's tenant may start with a digit.
_KEY = r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
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


@lru_cache(maxsize=4)
def _sdk(provider: trace.TracerProvider) -> tuple[trace.Tracer, bool]:
    """The provider's own tracer (not the API's proxy, one indirection less per span), and
    whether its sampler follows the caller's sampled flag (the SDK's default, and
    `configure`'s)."""
    tracer = provider.get_tracer("identity.worker")
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError:  # a provider of another make: its sampler is its own business
        return tracer, False
    return tracer, isinstance(getattr(provider, "sampler", None), ParentBased)


def left_out(value: Trace) -> bool:
    """Whether the caller chose not to sample the trace `value` continues, and the sampler
    follows the caller: then no span would be recorded, and none is started at all (an SDK
    span the sampler drops still costs a span id, a context and the headers written anew)."""
    parent = value[0]
    if parent is None or int(parent[53:55], 16) & TraceFlags.SAMPLED:
        return False
    return _sdk(trace.get_tracer_provider())[1]


def _parent(value: Trace) -> Context | None:
    """The context of the remote span that `validated` headers name (as the propagator would
    extract it, without parsing them a second time)."""
    parent, state = value
    if parent is None:
        return None
    remote = SpanContext(
        trace_id=int(parent[3:35], 16),
        span_id=int(parent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(parent[53:55], 16)),
        trace_state=TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


def of_span(span: Span) -> Trace:
    """The trace headers naming `span` (what `current()` gives while it is current)."""
    context = span.get_span_context()
    if not context.is_valid:
        return NO_TRACE
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    state = context.trace_state
    return parent, (state.to_header() or None) if state else None


class CommandSpan:
    """A span for one command, child of the caller's (`validated` headers), as a plain class
    rather than `start_as_current_span`'s generator: it wraps every traced command.

    `current=False` leaves the span out of the context: what runs inside makes no child span
    (a query's trace is its command span alone, see BENCHMARKS.md).
    """

    __slots__ = ("_attributes", "_current", "_kind", "_name", "_parent", "_token", "span")

    def __init__(
        self, name: str, parent: Trace, attributes: Attributes, *, current: bool = True
    ) -> None:
        self._name = name
        self._parent = parent
        self._attributes = attributes
        self._current = current
        self._token: Token[Context] | None = None
        self.span: Span | None = None

    def __enter__(self) -> Trace:
        tracer = _sdk(trace.get_tracer_provider())[0]
        span = tracer.start_span(
            self._name,
            context=_parent(self._parent),
            kind=SpanKind.CONSUMER,
            attributes=self._attributes,
        )
        self.span = span
        if self._current:
            self._token = context_api.attach(trace.set_span_in_context(span))
        return of_span(span)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        span = self.span
        assert span is not None
        if exc_type is not None and span.is_recording():
            span.set_attribute("error.type", exc_type.__name__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        if self._token is not None:
            context_api.detach(self._token)


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
    if not recording() or left_out(stored):
        yield headers(stored)
        return
    with (
        tracer.start_as_current_span(
            name,
            context=extract(headers(stored)),
            kind=SpanKind.PRODUCER,
            # An exception's text may quote an address or a body: its type is all a span gets.
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": destination,
            },
        ) as span,
        _failure_by_type(span),
    ):
        yield headers(current())


@contextmanager
def consuming(name: str, message_headers: Mapping[str, Any] | None, queue: str) -> Iterator[None]:
    """A span for processing a delivery, child of the span that published it (its valid
    `traceparent`), when spans are recorded; nothing otherwise."""
    if not recording() or left_out(validated(message_headers)):
        yield
        return
    with (
        tracer.start_as_current_span(
            name,
            context=extract(headers(validated(message_headers))),
            kind=SpanKind.CONSUMER,
            # An exception's text may quote an address or a body: its type is all a span gets.
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": queue,
            },
        ) as span,
        _failure_by_type(span),
    ):
        yield


@contextmanager
def _failure_by_type(span: Span) -> Iterator[None]:
    """Mark `span` failed by the type of what escapes it, never its message."""
    try:
        yield
    except BaseException as exc:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR))
        raise


class TracingUnavailable(RuntimeError):
    """Spans were asked for, but the SDK and exporter (the `tracing` extra) are missing."""


def configure(endpoint: str, service_name: str, sample_ratio: float = 1.0) -> None:
    """Record spans and export them in batches over OTLP/HTTP to `endpoint` (for example
    `http://otel-collector:4318/v1/traces`): installs the SDK's tracer provider for the
    process, once, before anything is built. The SDK flushes what is left at exit.

    Sampling follows the caller: a command whose `traceparent` is sampled is recorded, one
    whose caller left it out is not (and costs no span at all, `left_out`). A command without
    a trace starts one, kept with probability `sample_ratio` (decided on the trace id, so
    every process sampling by the same ratio keeps the same traces). The batch processor
    encodes and sends on a thread of its own; it shares the process's CPU and GIL, which is
    why the share recorded is what sets the cost (BENCHMARKS.md)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingUnavailable(
            "IDENTITY_OTLP_TRACES_URL needs the OpenTelemetry SDK and OTLP exporter:"
            " install identity-worker[tracing]"
        ) from exc
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
