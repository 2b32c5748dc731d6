"""The HTTP sidecar: liveness, readiness and Prometheus metrics.

It serves from one daemon thread running an event loop of its own, never the worker's: a
probe still gets an answer while the worker's loop is busy or stuck (which is when an
operator most needs `/metrics`), and a slow scraper cannot stall a command. It reads only
thread-safe state: `HealthState` snapshots and the prometheus registry.

Slow or idle clients cost no thread and cannot crowd the probes out: one request per
connection (`Connection: close`), read and answered within `REQUEST_TIMEOUT_S`, at most
`MAX_CONNECTIONS` open at once (each is a file descriptor of the worker's process, which
its broker and database connections need too). A connection beyond the cap closes the oldest
one still sending its request, so a crowd of clients that connect and say nothing
(slowloris) is churned through while a prober that sends its request at once is answered.

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

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

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

# Connections open at once; one more closes the oldest still sending its request.
MAX_CONNECTIONS = 64
# From accepting a connection to the last byte of its answer.
REQUEST_TIMEOUT_S = 5.0
# The request line and headers together; a probe's are a few hundred bytes.
MAX_REQUEST_BYTES = 8192


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
    """Serves the routes from a thread of its own; `start()` binds, `stop()` closes. The JWKS
    route exists when `jwks` is given."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: HealthState,
        *,
        jwks: Mapping[str, Any] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._host = host
        self._port = port
        self._app = _application(registry, health, jwks)
        self._max_connections = max_connections
        self._timeout_s = request_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # Open connections, oldest first, and whether each is still reading its request.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> int:
        """Bind and serve in a daemon thread; returns the bound port (useful with port 0)."""
        if self._thread is not None:
            raise RuntimeError("sidecar already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=128)
        sock.setblocking(False)
        port: int = sock.getsockname()[1]
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sock, started), name="identity-sidecar", daemon=True
        )
        self._thread.start()
        started.wait(timeout=5)
        log.info("sidecar listening", extra={"host": self._host, "port": port})
        return port

    def stop(self) -> None:
        """Stop accepting, close every connection and the socket, and wait for the thread.
        Blocks briefly, so call it from a thread or at the very end of shutdown."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        self._thread = None
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=5)

    def _run(self, sock: socket.socket, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock, started))
        finally:
            loop.close()

    async def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, sock=sock, limit=MAX_REQUEST_BYTES)
        started.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            if self._handlers:  # each ends at once: its reader saw the connection go
                await asyncio.wait(set(self._handlers), timeout=1.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        if len(self._open) >= self._max_connections and not self._evict_oldest_reader():
            writer.transport.abort()  # every slot is answering: this one gets nothing
            return
        self._open[writer] = True
        try:
            async with asyncio.timeout(self._timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                self._open[writer] = False
                writer.write(self._answer(head, writer.get_extra_info("peername")))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.transport.abort()  # too slow, hung up, too much, or evicted: no answer
        finally:
            self._open.pop(writer, None)

    def _evict_oldest_reader(self) -> bool:
        """Close the oldest connection still sending its request (its reader sees the end);
        False if every open connection is being answered."""
        for writer, reading in self._open.items():
            if reading:
                del self._open[writer]
                writer.transport.abort()
                return True
        return False

    def _answer(self, head: bytes, peer: Any) -> bytes:
        """The whole HTTP response to the request whose line and headers are `head`."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", [], b"")
        method, target, _ = parts
        path, _, query = target.partition("?")
        environ: Environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self._host,
            "SERVER_PORT": str(self._port),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.input": io.BytesIO(),
            "wsgi.url_scheme": "http",
        }
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        answered: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            answered[:] = [status, headers]

        chunks = self._app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        status, headers = answered
        log.debug("sidecar request", extra={"client": peer and peer[0], "line": lines[0]})
        return _response(status, headers, body)


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
    fields = [*kept, ("Content-Length", str(len(body))), ("Connection", "close")]
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
