"""Several addresses of one RabbitMQ cluster: connect to one node, move to another when it is lost.

`IDENTITY_AMQP_URL` (and every URL the client library, the mail sender and the tools take) may
name the nodes of one cluster, separated by commas:

    amqp://identity:secret@rabbit-1:5672/identity,amqp://identity:secret@rabbit-2:5672/identity

aio-pika's robust connection reconnects to the one URL it was given. `connect_any` gives it
all of them: the first node that answers is used, and each time the connection is lost, or an
attempt to reconnect fails, the next attempt goes to the next node in the list (round robin).
A lost connection is retried at once on the next node; a failed attempt waits aio-pika's
`reconnect_interval` (5 s unless the URL says otherwise) before the next.

The URLs differ only in host and port: the first URL's scheme, user, password, virtual host
and options apply to every node (the worker's settings refuse a list where they differ).
A comma inside a password must be written `%2C`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

__all__ = ["NodeConnection", "check_urls", "connect_any", "split_urls", "url_differences"]

SCHEMES = ("amqp", "amqps")


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The node URLs of `urls` (one URL, several separated by commas, or a list of them),
    blanks around each dropped; ValueError when there is none."""
    parts = urls.split(",") if isinstance(urls, str) else [p for u in urls for p in u.split(",")]
    nodes = [part.strip() for part in parts if part.strip()]
    if not nodes:
        raise ValueError("no broker URL")
    return nodes


def url_differences(urls: Sequence[str]) -> list[str]:
    """What in `urls` other than host and port differs from the first URL (scheme, user,
    password, virtual host, options): the names only, never the values; empty when the URLs
    are nodes of one cluster as `connect_any` uses them."""
    first, *others = [urlsplit(url) for url in urls]
    differing: list[str] = []
    for what in ("scheme", "username", "password", "path", "query"):
        if any(getattr(other, what) != getattr(first, what) for other in others):
            differing.append("virtual host" if what == "path" else what)
    return differing


def check_urls(urls: str) -> list[str]:
    """The node URLs of `urls`, checked as the settings check them (ValueError naming what is
    wrong, never a value): AMQP URLs, each with a host, differing only in host and port."""
    nodes = split_urls(urls)
    for url in nodes:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            raise ValueError("must be a URL with scheme amqp or amqps") from None
        if parts.scheme not in SCHEMES:
            raise ValueError("must be a URL with scheme amqp or amqps")
        if not host and len(nodes) > 1:
            raise ValueError("every URL of a list of nodes must name its host")
    if differing := url_differences(nodes):
        raise ValueError(
            "the URLs of a cluster's nodes may differ only in host and port;"
            f" these differ: {', '.join(differing)}"
        )
    return nodes


class NodeConnection(aio_pika.RobustConnection):
    """A robust connection that moves to the next node of its cluster whenever its connection
    is lost or an attempt to connect fails; with one node, aio-pika's own behaviour.

    It is also closed by a cancelled connect: aio-pika's reconnect task treats a cancelled
    attempt as a failed one and keeps reconnecting, refusing cancellation itself until the
    connection is closed, so a stop during start-up (broker slow or unreachable) would leave a
    task that asyncio.run waits for, and the process would never exit."""

    # The (host, port) of every node, the one to try first first; set by `connect_any` on a
    # subclass of its own, since aio-pika builds the connection from its class and one URL.
    NODES: ClassVar[tuple[tuple[str, int], ...]] = ()

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop=loop, **kwargs)
        base = self.url
        others = self.NODES[1:]
        self._nodes = [base, *(base.with_host(host).with_port(port) for host, port in others)]
        self._current = 0

    @property
    def node(self) -> int:
        """The node used now (or tried next): its index in the order this connection tries
        them, the node it first connected to being 0."""
        return self._current

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Called both when an open connection is lost and when an attempt fails.
        if not self._close_called and len(self._nodes) > 1:
            self._current = (self._current + 1) % len(self._nodes)
            self.url = self._nodes[self._current]
        await super()._on_connection_close(closing)

    async def connect(self, timeout: aiormq.abc.TimeoutType = None) -> None:  # noqa: ASYNC109
        try:
            await super().connect(timeout)
        except asyncio.CancelledError:
            await self.close()
            raise


def _node(url: str) -> tuple[str, int]:
    parts = URL(url)
    if parts.host is None:
        raise ValueError("a broker URL without a host")
    return parts.host, parts.port or (5671 if parts.scheme == "amqps" else 5672)


def _on_nodes(urls: list[str]) -> type[NodeConnection]:
    class OnNodes(NodeConnection):
        NODES = tuple(_node(url) for url in urls)

    return OnNodes


# How long one node may take to accept a connection (TCP, TLS and the AMQP handshake) before
# the next is tried: without a deadline a node that accepts and stays silent (a paused VM, a
# half-open balancer) would hold the connection on it for good.
CONNECT_TIMEOUT_S = 10.0


async def connect_any(urls: str | Sequence[str], **kwargs: Any) -> AbstractRobustConnection:
    """A robust connection to the first node of `urls` that answers (see the module's
    docstring); `kwargs` go to aio_pika.connect_robust as they are (ssl_context...), with a
    `timeout` of CONNECT_TIMEOUT_S per node unless given. The URLs are checked as the
    settings check them (ValueError). When no node answers: a refused certificate if any node
    refused one (the error an operator can act on), else the last node's error."""
    nodes = check_urls(",".join(split_urls(urls)))
    kwargs.setdefault("timeout", CONNECT_TIMEOUT_S)
    if len(nodes) == 1:  # the URL as given, as aio-pika takes it (a host may be left out)
        one: AbstractRobustConnection = await aio_pika.connect_robust(
            nodes[0], connection_class=NodeConnection, **kwargs
        )
        return one
    failures: list[BaseException] = []
    for start in range(len(nodes)):
        order = nodes[start:] + nodes[:start]
        host, port = _node(order[0])
        # Node `start`'s host and port with the first URL's user, password, vhost and options.
        first = URL(nodes[0]).with_host(host).with_port(port)
        try:
            connection: AbstractRobustConnection = await aio_pika.connect_robust(
                first, connection_class=_on_nodes(order), **kwargs
            )
        except CONNECTION_EXCEPTIONS as exc:
            failures.append(exc)
            continue
        return connection
    raise next((exc for exc in failures if _certificate_refused(exc)), failures[-1])


def _certificate_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # a chain, not a cycle
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
