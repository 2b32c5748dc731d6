"""brokers.connect_any on the real RabbitMQ: a node that does not answer is passed over, and a
connection that loses its node carries on on the next one, its channels and consumers with it.

The "nodes" here are the machine's broker reached two ways: through a TCP relay of the test's
own (a node that can be made to vanish) and directly. A real three-node cluster, and the
worker on it, is in tests/faults/test_clusters.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.exceptions import ChannelInvalidStateError

import brokers
from brokers import NodeConnection, connect_any
from client import IdentityClient, subscribe
from messages import Event
from tests.integration.scenarios import Person
from tests.support.eventually import eventually
from tests.support.vhosts import rabbitmqctl
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Relay:
    """A TCP relay to the machine's broker on a port of its own, which `vanish()` closes
    with every connection through it, as a node's death would."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def vanish(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay()
    await relay.start()
    try:
        yield relay
    finally:
        with contextlib.suppress(Exception):
            await relay.vanish()


async def round_trip(connection: aio_pika.abc.AbstractRobustConnection, queue_name: str) -> bytes:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        body = uuid.uuid4().bytes
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)
        got = await eventually(lambda: queue.get(fail=False), timeout=10)
        assert got is not None
        await got.ack()
        assert got.body == body
        return got.body
    finally:
        await channel.close()


async def test_a_node_that_does_not_answer_is_passed_over(amqp_vhost: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/{amqp_vhost}"
    live = f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}"

    connection = await connect_any(f"{dead},{live}")
    try:
        assert isinstance(connection, NodeConnection)
        assert connection.url.port == 5672
        await round_trip(connection, f"nodes-{uuid.uuid4().hex}")
    finally:
        await connection.close()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word (a paused node, a half-open
    balancer)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_a_node_that_accepts_and_stays_silent_is_passed_over_after_the_timeout(
    amqp_vhost: str, silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(brokers, "CONNECT_TIMEOUT_S", 1.0)  # the default, shortened
    silent = f"amqp://guest:guest@127.0.0.1:{silent_port}/{amqp_vhost}"
    live = f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}"

    connection = await asyncio.wait_for(connect_any(f"{silent},{live}"), timeout=20)
    try:
        assert connection.url.port == 5672
        await round_trip(connection, f"nodes-{uuid.uuid4().hex}")
    finally:
        await connection.close()


async def test_no_node_answering_raises_the_last_error_at_once() -> None:
    urls = ",".join(f"amqp://guest:guest@127.0.0.1:{closed_port()}/" for _ in range(3))

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(connect_any(urls), timeout=15)


async def test_a_lost_node_is_replaced_by_the_next_and_consumers_come_back(
    amqp_vhost: str, relay: Relay
) -> None:
    through_relay = f"amqp://guest:guest@127.0.0.1:{relay.port}/{amqp_vhost}"
    direct = f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}"
    connection = await connect_any(f"{through_relay},{direct}")
    try:
        assert isinstance(connection, NodeConnection)
        assert (connection.node, connection.url.port) == (0, relay.port)
        channel = await connection.channel()
        name = f"nodes-{uuid.uuid4().hex}"
        queue = await channel.declare_queue(name, durable=True, arguments={"x-expires": 60000})
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            await received.put(message.body)

        await queue.consume(on_message)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), routing_key=name)
        assert await asyncio.wait_for(received.get(), 10) == b"before"

        await relay.vanish()

        await eventually(lambda: connection.node == 1 and connection.connected.is_set(), timeout=30)
        assert connection.url.port == 5672

        # The robust channel and its consumer are restored on the other node (just after the
        # connection reports itself connected: until then the channel refuses to publish).
        async def published() -> bool:
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=name)
            except ChannelInvalidStateError:
                return False
            return True

        await eventually(published, timeout=30)
        assert await asyncio.wait_for(received.get(), 10) == b"after"
    finally:
        await connection.close()


async def test_the_client_and_subscribe_take_a_list_of_nodes(
    amqp_vhost: str, worker: WorkerProcess
) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/{amqp_vhost}"
    nodes = f"{dead},amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}"
    queue = f"test.nodes.{uuid.uuid4().hex[:8]}"
    seen: list[Event] = []

    async def consume() -> None:
        async for event in subscribe(nodes, "account.created", queue=queue):
            seen.append(event)

    task = asyncio.create_task(consume())
    try:
        async with IdentityClient.connect(nodes, timeout=15) as client:
            # The subscriber's queue exists before the account is made, so it gets the event.
            await eventually(lambda: _queue_declared(amqp_vhost, queue), timeout=30)
            ada = Person.new("nodes")
            account = (await client.create_account(ada.email, ada.password, "Ada")).account
        await eventually(
            lambda: (
                ("account.created", account.id)
                in [(e.type, e.data.account.id) for e in seen if e.type == "account.created"]
            ),
            timeout=30,
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _queue_declared(vhost: str, queue: str) -> bool:
    return queue in rabbitmqctl("list_queues", "-q", "-p", vhost, "name").split()
