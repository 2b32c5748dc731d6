"""What trace context and spans cost `session.verify`, against the same worker without them,
in the same run on the same machine.

    .venv/bin/python bench/tracing.py --runs 3 --out bench/results/tracing.json

Each run opens a fresh vhost and database, signs in once, then measures three modes, one
worker process each (`identity-worker run`, default settings), in an order that rotates from
run to run so that no mode always runs first or last:

- **off**: commands without a `traceparent`, no SDK: the ceiling of the run.
- **headers**: every command carries a `traceparent` (the caller has a current span), no SDK
  in the worker: validated and passed on to the reply.
- **spans**: the same commands, every trace sampled by the caller, and the worker records
  spans (`IDENTITY_OTLP_TRACES_URL`, the `tracing` extra): a verify is its command span alone,
  exported in batches over OTLP/HTTP to a sink in this process that answers 200 and keeps
  nothing.
- **sampled**: the same worker (default sampler: follow the caller), and the caller samples
  one trace in ten: nine commands in ten carry a `traceparent` whose sampled flag is off.

Every traced call has a trace id of its own (a caller's requests are separate traces).

    .venv/bin/python bench/tracing.py --micro

measures the pieces in this process instead, CPU per call: checking a command's trace headers
without an SDK (`worker.tracing.validated`), and with the SDK installed the worker's path for a
command whose caller sampled it (its span started, ended and encoded as OTLP protobuf, as the
exporter does) or left it out (no span).

In each mode, after a warm-up, 64 concurrent tasks call `session.verify` for a fixed span; the
worker's CPU per verify (its process only: the cost tracing adds is the worker's) and the
throughput are compared with the ceiling of the same run. Medians over the runs are reported;
the machine is shared, so its busy share over each span is recorded too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvloop
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import CpuMeter, Sandbox, WorkerProcess, git_head, worker_env

from client import IdentityClient
from services.tokens import format_signing_key, new_signing_key

MODES = ("off", "headers", "spans", "sampled")
# The `sampled` mode: the share of its traces the caller samples (the worker follows it).
SAMPLED_SHARE = 0.1
WINDOW = 64
SPAN_S = 8.0
WARM_UP_S = 2.0
GOAL_PCT = 5.0
PASSWORD = "quartz meadow lantern orbit violet"  # noqa: S105 - a bench account


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.exports += 1  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def otlp_sink() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.exports = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def caller_span(traced: bool, share: float = 1.0) -> Iterator[None]:
    """A current span as a traced caller has one (a trace of its own, sampled with probability
    `share`), so the client sends its `traceparent`; nothing when not `traced`."""
    if not traced:
        yield
        return
    sampled = share >= 1.0 or random.random() < share
    context = SpanContext(
        trace_id=random.getrandbits(128) | 1,
        span_id=random.getrandbits(64) | 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    with trace.use_span(NonRecordingSpan(context)):
        yield


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(
    client: IdentityClient, token: str, meter: CpuMeter, traced: bool, share: float
) -> dict[str, Any]:
    done: list[float] = []
    measuring = False
    stop = False

    async def slot() -> None:
        while not stop:
            started = time.perf_counter()
            with caller_span(traced, share):
                await client.verify_session(token)
            if measuring:
                done.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(slot()) for _ in range(WINDOW)]
    await asyncio.sleep(WARM_UP_S)
    span: dict[str, float] = {}
    with meter.span(span):
        measuring = True
        started = time.perf_counter()
        await asyncio.sleep(SPAN_S)
        measuring = False
        wall = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    per_s = len(done) / wall
    return {
        "per_s": round(per_s, 1),
        "worker_cpu_us_per_verify": round(1e6 * span["cpu_worker_cores"] / per_s, 2),
        "p50_ms": round(percentile(done, 0.50) * 1000, 2),
        "p99_ms": round(percentile(done, 0.99) * 1000, 2),
        **span,
    }


async def one_mode(
    sandbox: Sandbox, keys: str, mode: str, sink_url: str, log: Path
) -> dict[str, Any]:
    extra = {"IDENTITY_OTLP_TRACES_URL": sink_url} if mode in ("spans", "sampled") else {}
    worker = WorkerProcess(worker_env(sandbox, keys, **extra), log)
    try:
        worker.start()
        meter = CpuMeter([worker.pid])
        async with IdentityClient.connect(sandbox.amqp_url, timeout=30) as client:
            started = await client.start_session("bench@example.com", PASSWORD)
            token = started.token.get_secret_value()
            with caller_span(mode != "off"):  # the trace reaches the reply: checked once
                reply = await client.send_traced("session.verify", {"token": token})
            if (reply.traceparent is not None) != (mode != "off"):
                raise RuntimeError(f"mode {mode}: the reply's traceparent is {reply.traceparent}")
            share = SAMPLED_SHARE if mode == "sampled" else 1.0
            return await closed_loop(client, token, meter, traced=mode != "off", share=share)
    finally:
        worker.stop()


async def one_run(index: int, sink: ThreadingHTTPServer) -> dict[str, Any]:
    sandbox = Sandbox()
    await sandbox.open()
    keys = format_signing_key(new_signing_key())
    log = Path(tempfile.mkdtemp()) / "worker.log"
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    shift = (index - 1) % len(MODES)
    order = MODES[shift:] + MODES[:shift]
    run: dict[str, Any] = {"run": index, "order": list(order)}
    try:
        setup = WorkerProcess(worker_env(sandbox, keys), log).start()
        try:
            async with IdentityClient.connect(sandbox.amqp_url, timeout=30) as client:
                await client.create_account("bench@example.com", PASSWORD, "Bench")
        finally:
            setup.stop()
        for mode in order:
            exports = sink.exports  # type: ignore[attr-defined]
            run[mode] = await one_mode(sandbox, keys, mode, sink_url, log)
            run[mode]["otlp_exports"] = sink.exports - exports  # type: ignore[attr-defined]
    finally:
        await sandbox.close()
    ceiling = run["off"]
    for mode in MODES[1:]:
        cpu = run[mode]["worker_cpu_us_per_verify"] / ceiling["worker_cpu_us_per_verify"]
        run[f"{mode}_cpu_overhead_pct"] = round(100 * (cpu - 1), 2)
        run[f"{mode}_throughput_ratio"] = round(run[mode]["per_s"] / ceiling["per_s"], 3)
    return run


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(*path: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for part in path:
                value = value[part]
            values.append(float(value))
        return round(statistics.median(values), 3)

    median: dict[str, Any] = {}
    for mode in MODES:
        median[f"{mode}_per_s"] = med(mode, "per_s")
        median[f"{mode}_worker_cpu_us_per_verify"] = med(mode, "worker_cpu_us_per_verify")
        median[f"{mode}_p99_ms"] = med(mode, "p99_ms")
        median[f"{mode}_machine_busy_pct"] = med(mode, "machine_busy_pct")
    for mode in MODES[1:]:
        median[f"{mode}_cpu_overhead_pct"] = med(f"{mode}_cpu_overhead_pct")
        median[f"{mode}_throughput_ratio"] = med(f"{mode}_throughput_ratio")
    return median


def micro(calls: int = 20_000) -> dict[str, float]:
    """CPU per call of the pieces, in this process (see the module docstring)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from worker import tracing
    from worker.processor import _span_attributes

    class Encoding(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    def caller(sampled: bool) -> dict[str, str]:
        flags = "01" if sampled else "00"
        return {"traceparent": f"00-{random.getrandbits(128) | 1:032x}-00f067aa0ba902b7-{flags}"}

    result: dict[str, float] = {}
    headers = caller(True)
    started = time.process_time()
    for _ in range(calls):
        tracing.validated(headers)
    result["validate_headers_us"] = round((time.process_time() - started) / calls * 1e6, 2)
    attributes = _span_attributes("session.verify")
    # The worker's path for a command (worker.processor): checked, then a span, or none.
    for name, sampled in (("command_span_us", True), ("left_out_us", False)):
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
        # A queue for all of them: none dropped, every one encoded.
        provider.add_span_processor(BatchSpanProcessor(Encoding(), max_queue_size=calls))
        trace._TRACER_PROVIDER = provider  # the process's provider, for this measurement only
        messages = [caller(sampled) for _ in range(calls)]
        started = time.process_time()
        for message in messages:
            parent = tracing.validated(message)
            if tracing.left_out(parent):
                continue
            with tracing.CommandSpan("session.verify process", parent, attributes, current=False):
                pass
        provider.force_flush()
        result[name] = round((time.process_time() - started) / calls * 1e6, 2)
        provider.shutdown()
        trace._TRACER_PROVIDER = None
    return result


async def main_async(args: argparse.Namespace) -> int:
    runs = []
    with otlp_sink() as sink:
        for index in range(1, args.runs + 1):
            run = await one_run(index, sink)
            runs.append(run)
            print(json.dumps(run), flush=True)
    median = median_of(runs)
    goals = {
        f"headers: worker CPU per verify +{GOAL_PCT:g}% at most": (
            median["headers_cpu_overhead_pct"] < GOAL_PCT
        ),
        f"spans: worker CPU per verify +{GOAL_PCT:g}% at most": (
            median["spans_cpu_overhead_pct"] < GOAL_PCT
        ),
        f"sampled: worker CPU per verify +{GOAL_PCT:g}% at most": (
            median["sampled_cpu_overhead_pct"] < GOAL_PCT
        ),
    }
    report = {"commit": git_head(), "runs": runs, "median": median, "goals": goals}
    print(json.dumps({"median": median, "goals": goals}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--micro", action="store_true", help="the pieces, in this process")
    args = parser.parse_args()
    if args.micro:
        print(json.dumps(micro(), indent=2))
        return 0
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
