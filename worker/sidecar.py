"""The HTTP sidecar: liveness, readiness and Prometheus metrics.

It runs a stdlib `wsgiref` server with one thread per request, itself in a daemon thread, so
it never touches the event loop: a probe still gets an answer while the loop is busy or stuck
(which is when an operator most needs `/metrics`), and a slow scraper cannot stall a command.
It reads only thread-safe state: `HealthState` snapshots and the prometheus registry.

    GET /healthz  200 {"status": "ok"} while the process is alive and its event loop turns;
                  503 {"status": "stalled", "event_loop_silent_s": N} once the loop has been
                  silent for health.LIVE_SILENCE_S
    GET /readyz   200 {"status": "ready"} or 503 {"status": "not_ready", "reasons": [...]}
    GET /metrics  Prometheus text exposition of the worker's registry
    GET /.well-known/jwks.json
                  the public keys access tokens are signed with (RFC 7517), cacheable for
                  JWKS_MAX_AGE_S with an ETag (a conditional GET answers 304); the keys are
                  fixed for the process's life, so a new key shows with the next worker
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from worker.health import HealthState

__all__ = ["HealthState", "Sidecar"]

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
# How long a verifier may cache the keys. A verifier that meets an unknown kid refetches at
# once (rate-limited), so this bounds only how late a *removed* key stops being trusted by a
# cache that never meets a new one; the runbook's rotation waits it out.
JWKS_MAX_AGE_S = 300

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # Request threads must not keep a stopping worker alive.
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints these (mostly clients hanging up early) to stderr, outside the
        # JSON log stream.
        log.debug("sidecar connection error", exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    """Access lines go to the JSON logger at debug level instead of wsgiref's stderr prints."""

    # A client that connects and says nothing must not hold a thread for ever.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(
            "sidecar request", extra={"client": self.client_address[0], "line": format % args}
        )


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [payload]


def _jwks_app(jwks: Mapping[str, Any]) -> WsgiApp:
    body = json.dumps(jwks, sort_keys=True, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    cache = ("Cache-Control", f"public, max-age={JWKS_MAX_AGE_S}")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        asked = environ.get("HTTP_IF_NONE_MATCH", "")
        if etag in (tag.strip() for tag in asked.split(",")) or asked.strip() == "*":
            start_response("304 Not Modified", [("ETag", etag), cache])
            return [b""]
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/jwk-set+json"),
                ("Content-Length", str(len(body))),
                ("ETag", etag),
                cache,
            ],
        )
        return [body]

    return app


def _application(
    registry: CollectorRegistry, health: HealthState, jwks: Mapping[str, Any] | None
) -> WsgiApp:
    metrics_app = make_wsgi_app(registry)
    jwks_app = _jwks_app(jwks) if jwks is not None else None
    routes = {"/healthz", "/readyz", "/metrics"} | ({JWKS_PATH} if jwks_app else set())

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in routes:
            return _json(start_response, "404 Not Found", {"status": "not_found"})
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(start_response, "405 Method Not Allowed", {"status": "method_not_allowed"})
        if path == "/healthz":
            alive, silence = health.liveness()
            if alive:
                return _json(start_response, "200 OK", {"status": "ok"})
            body = {"status": "stalled", "event_loop_silent_s": round(silence)}
            return _json(start_response, "503 Service Unavailable", body)
        if path == "/readyz":
            ready, reasons = health.snapshot()
            if ready:
                return _json(start_response, "200 OK", {"status": "ready"})
            body = {"status": "not_ready", "reasons": reasons}
            return _json(start_response, "503 Service Unavailable", body)
        if path == JWKS_PATH and jwks_app is not None:
            return jwks_app(environ, start_response)
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


class Sidecar:
    """Serves the routes from background threads; `start()` binds, `stop()` closes. The JWKS
    route exists when `jwks` is given."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: HealthState,
        *,
        jwks: Mapping[str, Any] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._app = _application(registry, health, jwks)
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve in a daemon thread; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("sidecar already started")
        server = make_server(
            self._host,
            self._port,
            self._app,
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="identity-sidecar",
            daemon=True,
        )
        self._thread.start()
        port: int = server.server_port
        log.info("sidecar listening", extra={"host": self._host, "port": port})
        return port

    def stop(self) -> None:
        """Stop accepting, close the socket and wait for the serving thread. Blocks briefly
        (one poll interval), so call it from a thread or at the very end of shutdown."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
