"""W3C trace context at the worker's edge (worker.tracing): what a command's headers become on
what it causes, and what is ignored. No SDK here, except where a test asks for `spans`."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker import tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def test_a_valid_traceparent_and_tracestate_pass_through_unchanged() -> None:
    assert tracing.validated({"traceparent": PARENT, "tracestate": STATE}) == (PARENT, STATE)
    assert tracing.headers((PARENT, STATE)) == {"traceparent": PARENT, "tracestate": STATE}


def test_without_an_sdk_no_span_is_recorded() -> None:
    assert not tracing.recording()


@pytest.mark.parametrize(
    "value",
    [
        PARENT.upper(),  # hex is lowercase
        "ff" + PARENT[2:],  # version ff is invalid
        f"00-{'0' * 32}-b7ad6b7169203331-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero span id
        PARENT + "-extra",  # version 00 has exactly four fields
        PARENT[:-1],
        "",
        "not a traceparent",
        "00-" + "a" * 5000,
        12,
        None,
        ["00", TRACE_ID],
        b"\xff\xfe",
    ],
)
def test_a_malformed_traceparent_is_ignored_with_its_tracestate(value: Any) -> None:
    assert tracing.validated({"traceparent": value, "tracestate": STATE}) == tracing.NO_TRACE
    assert tracing.headers(tracing.NO_TRACE) is None


def test_no_headers_means_no_trace() -> None:
    assert tracing.validated(None) == tracing.NO_TRACE
    assert tracing.validated({}) == tracing.NO_TRACE
    assert tracing.validated({"tracestate": STATE}) == tracing.NO_TRACE


def test_a_byte_string_traceparent_is_read_as_ascii() -> None:
    assert tracing.validated({"traceparent": PARENT.encode()}) == (PARENT, None)


@pytest.mark.parametrize(
    "state",
    [
        "not a valid==state",
        "a=1,a=2",  # a key twice
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
        "k=" + "v" * 600,  # longer than 512 characters
        "UPPER=1",
        "k=va=lue",
        "1abc=x",  # a simple key starts with a letter (only a tenant may start with a digit)
    ],
)
def test_a_malformed_tracestate_is_dropped_and_the_traceparent_kept(
    state: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert tracing.validated({"traceparent": PARENT, "tracestate": state}) == (PARENT, None)
    # Nothing the caller wrote ends up in a log line.
    assert not caplog.records


def test_a_tenants_key_may_start_with_a_digit() -> None:
    state = "1tenant@vendor=x,rojo=00f067aa0ba902b7"
    assert tracing.validated({"traceparent": PARENT, "tracestate": state}) == (PARENT, state)


def test_a_failed_publish_or_delivery_span_keeps_the_type_not_the_text(
    spans: InMemorySpanExporter,
) -> None:
    secret = "alice@example.com code 123456"
    with (
        pytest.raises(ValueError, match="alice"),
        tracing.publishing("mail publish", (PARENT, STATE), "identity.courier"),
    ):
        raise ValueError(secret)
    with (
        pytest.raises(RuntimeError, match="alice"),
        tracing.consuming("mail send", {"traceparent": PARENT}, "identity.courier"),
    ):
        raise RuntimeError(secret)
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    for span in finished:
        assert span.attributes is not None
        assert span.attributes["error.type"] in {"ValueError", "RuntimeError"}
        assert span.status.description is None
        assert not span.events  # no exception event, with its message and stack trace
        assert secret not in repr(span.to_json())


def test_a_later_version_is_carried_on_as_version_00() -> None:
    future = "01" + PARENT[2:] + "-more-fields"
    assert tracing.validated({"traceparent": future}) == (PARENT, None)


def test_with_the_sdk_a_publish_gets_a_span_of_its_own_in_the_same_trace(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.publishing("account.created publish", (PARENT, STATE), "identity.events") as sent:
        pass
    assert sent is not None
    (span,) = spans.get_finished_spans()
    context = span.get_span_context()
    assert context is not None
    assert sent["traceparent"].startswith(f"00-{TRACE_ID}-{context.span_id:016x}-")
    assert sent["traceparent"] != PARENT
    assert sent["tracestate"] == STATE
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT.split("-")[2]


def test_without_the_sdk_a_publish_sends_the_stored_trace_as_it_is() -> None:
    with tracing.publishing("account.created publish", (PARENT, None), "identity.events") as sent:
        pass
    assert sent == {"traceparent": PARENT}


def test_the_client_sends_the_callers_current_span_and_nothing_without_one() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from client.client import _trace_headers

    assert _trace_headers() is None
    context = SpanContext(
        int(TRACE_ID, 16), 0xB7AD6B7169203331, is_remote=False, trace_flags=TraceFlags(1)
    )
    with trace.use_span(NonRecordingSpan(context)):
        assert _trace_headers() == {"traceparent": PARENT}


def test_a_command_span_is_the_callers_child_and_its_headers_name_it(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.CommandSpan("session.verify process", (PARENT, STATE), {}) as sent:
        # What the propagator writes for the current span: the same headers.
        assert tracing.current() == sent
    (span,) = spans.get_finished_spans()
    context = span.get_span_context()
    assert context is not None
    assert sent == (f"00-{TRACE_ID}-{context.span_id:016x}-01", STATE)
    assert span.parent is not None
    assert span.parent.is_remote
    assert f"{span.parent.span_id:016x}" == PARENT.split("-")[2]


def test_a_command_span_left_out_of_the_context_has_no_children(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.CommandSpan("account.get process", (PARENT, None), {}, current=False) as sent:
        assert tracing.current() == tracing.NO_TRACE
        with tracing.publishing("reply publish", tracing.NO_TRACE, "amq.direct"):
            pass
    names = sorted(span.name for span in spans.get_finished_spans())
    assert names == ["account.get process", "reply publish"]
    reply = next(span for span in spans.get_finished_spans() if span.name == "reply publish")
    assert reply.parent is None  # a root of its own: nothing inside joined the command's trace
    assert sent[0] is not None
    assert sent[0].startswith(f"00-{TRACE_ID}-")


def test_a_trace_the_caller_left_out_gets_no_span(spans: InMemorySpanExporter) -> None:
    unsampled = f"00-{TRACE_ID}-b7ad6b7169203331-00"
    assert tracing.left_out((unsampled, None))
    assert not tracing.left_out((PARENT, None))
    assert not tracing.left_out(tracing.NO_TRACE)
    with tracing.publishing("account.created publish", (unsampled, STATE), "x") as sent:
        pass
    assert sent == {"traceparent": unsampled, "tracestate": STATE}
    assert spans.get_finished_spans() == ()


def test_a_command_span_records_the_failure_that_ends_it(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ConnectionError), tracing.CommandSpan("x process", (PARENT, None), {}):
        raise ConnectionError("broker gone")
    (span,) = spans.get_finished_spans()
    assert span.attributes == {"error.type": "ConnectionError"}
    assert not span.status.is_ok


def test_a_sampler_that_does_not_follow_the_caller_still_decides() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    unsampled = f"00-{TRACE_ID}-b7ad6b7169203331-00"
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = TracerProvider(sampler=ALWAYS_ON)
    try:
        assert not tracing.left_out((unsampled, None))
    finally:
        trace._TRACER_PROVIDER = previous
