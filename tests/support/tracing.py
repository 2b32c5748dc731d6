"""Spans recorded in memory: the OpenTelemetry SDK as a test installs it for one block.

The API lets a process set its tracer provider once, for good; a test needs it for the
length of the test only, so that the rest of the suite runs as production runs without an
SDK (no span at all). `recorded_spans()` puts one SDK provider, shared by the whole session,
in the API's global slot and takes it out again (the slot is private to the API: this is the
test-only way around set-once, as the API's own tests do).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
# The test plays the caller: its spans come from this tracer.
CALLER = PROVIDER.get_tracer("identity.tests.caller")


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """The SDK installed for the block; the exporter holds the spans ended within it."""
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = PROVIDER
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        trace._TRACER_PROVIDER = previous
        EXPORTER.clear()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent naming `span`."""
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
