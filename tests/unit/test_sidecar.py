"""The HTTP sidecar and the readiness probe that feeds it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.eventually import eventually, eventually_sync
from worker.health import (
    LIVE_SILENCE_S,
    READY_SILENCE_S,
    HealthState,
    export_readiness,
    probe_once,
    run_heartbeat,
    run_readiness_probe,
)
from worker.metrics import Metrics, command_label, create_metrics, outcome_label
from worker.sidecar import Sidecar


@pytest.fixture
def health() -> HealthState:
    return HealthState()


@pytest.fixture
def metrics(health: HealthState) -> Metrics:
    metrics = create_metrics()
    export_readiness(health, metrics)  # as the worker does
    return metrics


@pytest.fixture
def base_url(metrics: Metrics, health: HealthState) -> Iterator[str]:
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health)
    port = sidecar.start()
    yield f"http://127.0.0.1:{port}"
    sidecar.stop()


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - a local test URL
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = _get(url)
    return status, json.loads(body)


def _healthy(health: HealthState) -> None:
    health.set_broker(True)
    health.set_database(True)


async def _ok() -> None:
    return None


async def _refused() -> None:
    raise ConnectionRefusedError("cannot reach amqp://guest:s3cr3t@broker:5672/")


async def _hangs() -> None:
    await asyncio.Event().wait()  # never answers


def test_healthz_answers_while_the_process_lives(base_url: str) -> None:
    assert _get_json(f"{base_url}/healthz") == (200, {"status": "ok"})


def test_not_ready_until_both_sides_have_been_seen(base_url: str) -> None:
    status, body = _get_json(f"{base_url}/readyz")

    assert status == 503
    assert body["status"] == "not_ready"
    assert body["reasons"] == ["broker: not checked yet", "database: not checked yet"]


def test_readiness_follows_the_health_state(base_url: str, health: HealthState) -> None:
    _healthy(health)
    assert _get_json(f"{base_url}/readyz") == (200, {"status": "ready"})

    health.set_database(False, "no answer within 2s")
    assert _get_json(f"{base_url}/readyz") == (
        503,
        {"status": "not_ready", "reasons": ["database: no answer within 2s"]},
    )

    health.set_database(True)
    health.set_draining(True)
    assert _get_json(f"{base_url}/readyz") == (
        503,
        {"status": "not_ready", "reasons": ["draining"]},
    )


def test_metrics_expose_the_worker_registry(base_url: str, metrics: Metrics) -> None:
    metrics.commands_total.labels("account.get", "ok").inc()

    status, text = _get(f"{base_url}/metrics")

    assert status == 200
    assert 'identity_commands_total{command="account.get",outcome="ok"} 1.0' in text
    assert "process_resident_memory_bytes" in text or "python_info" in text


def test_other_paths_and_methods_are_refused(base_url: str) -> None:
    assert _get(f"{base_url}/")[0] == 404
    assert _get(f"{base_url}/metrics/../admin")[0] == 404
    assert _get(f"{base_url}/healthz", method="POST")[0] == 405


async def test_the_sidecar_answers_while_the_event_loop_is_blocked(
    base_url: str, health: HealthState
) -> None:
    _healthy(health)

    # This coroutine holds the loop for the whole request; the callback proves the loop made
    # no progress meanwhile, so the answer came from the sidecar's own threads.
    loop_ran: list[bool] = []
    asyncio.get_running_loop().call_soon(loop_ran.append, True)
    status, _ = _get(f"{base_url}/readyz")

    assert status == 200
    assert loop_ran == []
    await asyncio.sleep(0)
    assert loop_ran == [True]


def _slow_clients(port: int, count: int) -> list[socket.socket]:
    """`count` connections that send half a request and then nothing (slowloris)."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        clients.append(client)
    return clients


def _closed_by_server(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_400_slow_clients_get_no_thread_and_do_not_keep_a_probe_out(
    metrics: Metrics, health: HealthState
) -> None:
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health, max_connections=64)
    port = sidecar.start()
    threads_before = threading.active_count()
    clients = _slow_clients(port, 400)
    try:
        threads_during = threading.active_count()
        started = time.monotonic()
        assert _get_json(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        answered_in = time.monotonic() - started

        assert threads_during == threads_before  # one serving thread, whatever the clients
        assert answered_in < 2.0
        # The cap holds: the oldest idle connections are closed to make room, once the
        # listening socket's backlog has been taken in.
        open_ = set(clients)

        def within_the_cap() -> bool:
            open_.difference_update([c for c in open_ if _closed_by_server(c)])
            return len(open_) <= 64

        eventually_sync(within_the_cap, timeout=10, what="at most 64 connections open")
    finally:
        for client in clients:
            client.close()
        sidecar.stop()


def test_a_request_not_sent_in_time_is_cut_off(metrics: Metrics, health: HealthState) -> None:
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health, request_timeout_s=0.2)
    port = sidecar.start()
    try:
        [client] = _slow_clients(port, 1)
        client.settimeout(5)
        assert client.recv(1) == b""  # closed after the deadline, not answered, not held
        client.close()
    finally:
        sidecar.stop()


def test_a_request_that_is_not_http_is_refused(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"HELLO\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 400")


def test_stop_releases_the_port(metrics: Metrics, health: HealthState) -> None:
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health)
    port = sidecar.start()
    sidecar.stop()

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_metric_labels_only_take_known_values() -> None:
    assert command_label("session.verify") == "session.verify"
    assert command_label("drop table accounts;") == "unknown"
    assert command_label(None) == "unknown"
    assert outcome_label(None) == "ok"
    assert outcome_label("email_taken") == "email_taken"
    assert outcome_label("anything a caller typed") == "unknown"


def test_metrics_are_fresh_per_registry() -> None:
    first, second = create_metrics(), create_metrics()
    first.outbox_backlog.set(7)

    assert second.registry.get_sample_value("identity_outbox_backlog") == 0
    assert first.registry.get_sample_value("identity_outbox_backlog") == 7


async def test_probe_marks_a_failing_side_down_without_its_secrets(
    health: HealthState, metrics: Metrics
) -> None:
    ready = await probe_once(
        health, metrics, check_broker=_refused, check_database=_hangs, timeout_s=0.05
    )

    assert ready is False
    _, reasons = health.snapshot()
    assert reasons == [
        "broker: check failed (ConnectionRefusedError)",
        "database: no answer within 0.05s",
    ]
    assert "s3cr3t" not in " ".join(reasons)
    assert metrics.registry.get_sample_value("identity_broker_connected") == 0
    assert metrics.registry.get_sample_value("identity_database_up") == 0
    assert metrics.registry.get_sample_value("identity_ready") == 0


async def test_probe_loop_brings_the_worker_up_and_stops_when_cancelled(
    health: HealthState, metrics: Metrics
) -> None:
    probe = asyncio.create_task(
        run_readiness_probe(
            health, metrics, check_broker=_ok, check_database=_ok, interval_s=0.01, timeout_s=1
        )
    )
    await eventually(lambda: health.snapshot()[0], timeout=10, what="ready")

    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert health.snapshot() == (True, [])
    assert metrics.registry.get_sample_value("identity_ready") == 1
    assert metrics.registry.get_sample_value("identity_broker_connected") == 1


async def test_a_draining_worker_stays_not_ready_even_when_both_answer(
    health: HealthState, metrics: Metrics
) -> None:
    health.set_draining(True)

    ready = await probe_once(health, metrics, check_broker=_ok, check_database=_ok, timeout_s=1)

    assert ready is False
    assert metrics.registry.get_sample_value("identity_ready") == 0


class _Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_event_loop_is_first_not_ready_then_not_alive(metrics: Metrics) -> None:
    clock = _Clock()
    health = HealthState(clock=clock)
    _healthy(health)
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health)
    url = f"http://127.0.0.1:{sidecar.start()}"
    try:
        # Starting up: no heartbeat yet, and that is no silence.
        clock.now += 3600
        assert _get_json(f"{url}/healthz") == (200, {"status": "ok"})
        health.beat()
        clock.now += READY_SILENCE_S - 1
        assert _get_json(f"{url}/readyz") == (200, {"status": "ready"})

        clock.now += 2  # 11 s without a beat: routed away from, not yet restarted
        status, body = _get_json(f"{url}/readyz")
        assert status == 503
        assert body["reasons"] == ["event loop: no heartbeat for 11s"]
        assert _get_json(f"{url}/healthz") == (200, {"status": "ok"})

        clock.now += LIVE_SILENCE_S  # 41 s: wedged
        assert _get_json(f"{url}/healthz") == (
            503,
            {"status": "stalled", "event_loop_silent_s": 41},
        )

        health.beat()  # it turns again
        assert _get_json(f"{url}/healthz") == (200, {"status": "ok"})
        assert _get_json(f"{url}/readyz") == (200, {"status": "ready"})
    finally:
        sidecar.stop()


class _CountedHealth(HealthState):
    """Counts the heartbeats it was given."""

    beats = 0

    def beat(self) -> None:
        super().beat()
        self.beats += 1


async def test_the_heartbeat_task_beats_until_cancelled() -> None:
    clock = _Clock()
    health = _CountedHealth(clock=clock)
    beating = asyncio.create_task(run_heartbeat(health, every_s=0.01))
    await eventually(lambda: health.beats, timeout=10, what="a first beat")
    clock.now += LIVE_SILENCE_S + 5
    beats = health.beats
    await eventually(lambda: health.beats > beats, timeout=10, what="a beat at the new time")
    assert health.liveness() == (True, 0.0)

    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)
    clock.now += LIVE_SILENCE_S
    assert health.liveness() == (False, LIVE_SILENCE_S)


def test_the_ready_gauge_reads_the_state_when_scraped(metrics: Metrics) -> None:
    clock = _Clock()
    health = HealthState(clock=clock)
    export_readiness(health, metrics)
    _healthy(health)
    health.beat()
    assert metrics.registry.get_sample_value("identity_ready") == 1
    clock.now += READY_SILENCE_S  # nothing ran on the loop to set it: the scrape still sees it
    assert metrics.registry.get_sample_value("identity_ready") == 0


def test_the_jwks_is_served_cacheable_with_an_etag_and_a_conditional_get_answers_304(
    metrics: Metrics, health: HealthState
) -> None:
    from services.access_tokens import AccessTokenSigner
    from tests.support.factory import TEST_JWT_KEYS
    from worker.sidecar import JWKS_MAX_AGE_S, JWKS_PATH

    jwks = AccessTokenSigner(TEST_JWT_KEYS).jwks()
    sidecar = Sidecar("127.0.0.1", 0, metrics.registry, health, jwks=jwks)
    url = f"http://127.0.0.1:{sidecar.start()}{JWKS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read()) == jwks
            assert response.headers["Content-Type"] == "application/jwk-set+json"
            assert response.headers["Cache-Control"] == f"public, max-age={JWKS_MAX_AGE_S}"
            etag = response.headers["ETag"]
        assert etag.startswith('"')
        assert etag.endswith('"')
        again = urllib.request.Request(url, headers={"If-None-Match": etag})
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            urllib.request.urlopen(again, timeout=5)  # noqa: S310
        assert not_modified.value.code == 304
        assert not_modified.value.headers["ETag"] == etag
        stale = urllib.request.Request(url, headers={"If-None-Match": '"other"'})
        with urllib.request.urlopen(stale, timeout=5) as response:  # noqa: S310
            assert response.status == 200
        assert _get(url, method="POST")[0] == 405
    finally:
        sidecar.stop()


def test_without_keys_the_sidecar_has_no_jwks_route(base_url: str) -> None:
    assert _get(base_url + "/.well-known/jwks.json")[0] == 404
