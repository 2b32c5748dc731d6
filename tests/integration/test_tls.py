"""Encryption in transit, end to end, with real parts: a throwaway CA made here, a RabbitMQ
node with a TLS listener and a PostgreSQL server with `ssl = on`, both started for this module
on their own ports and directories (scripts/rabbit-cluster.sh, scripts/pg-failover.sh).

The worker, the client library, the mail sender and the tools connect with the broker's
certificate verified (and a client certificate presented); a certificate from another CA, or
for another host name, is refused with a clear error, never answered by a plain-text retry;
production refuses plain text to a host that is not loopback. A missing RabbitMQ or
PostgreSQL installation fails these tests (ScriptFailed), it never skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import asyncpg
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity
from yarl import URL

from brokers import connect_any
from client import IdentityClient, subscribe
from courier.app import Courier
from courier.settings import CourierSettings, load_courier_settings
from messages import Event
from tests.integration.scenarios import Person
from tests.support import workers
from tests.support.certs import Issued, issue, make_ca
from tests.support.clusters import TMP, PgFailover, RabbitCluster
from tests.support.eventually import eventually
from tls import TlsFiles, amqp_connect_kwargs, client_context
from worker.bootstrap import CertificateRefused, connect_broker, connect_store
from worker.metrics import create_metrics
from worker.settings import load_settings

pytestmark = pytest.mark.integration

WORKER_ROLE = "identity_tls_worker"
CLIENT_CN = "identity-tls-client"
# What a refused certificate looks like, from Python's ssl module through aiormq or asyncpg.
UNTRUSTED = "CERTIFICATE_VERIFY_FAILED"


@dataclass(frozen=True)
class Stack:
    """The module's broker and database, with TLS, and the files that reach them."""

    rabbit: RabbitCluster
    pg: PgFailover
    ca: Path  # what signed the servers' and the client's certificates
    rogue_ca: Path  # another CA: what a server or client must not be trusted by
    client: Issued  # issued by `ca`
    rogue_client: Issued  # issued by the other CA

    @property
    def amqps(self) -> str:
        return self.rabbit.tls_url(1)

    @property
    def amqp_plain(self) -> str:
        return self.rabbit.url(1)

    def files(self, *, ca: Path | None = None, client: Issued | None = None) -> TlsFiles:
        client = client or self.client
        return TlsFiles(str(ca or self.ca), str(client.cert), str(client.key))

    def dsn(
        self,
        user: str = "postgres",
        *,
        host: str = "127.0.0.1",
        sslmode: str = "verify-full",
        ca: Path | None = None,
        client: Issued | None = None,
    ) -> str:
        client = client or self.client
        query = {
            "sslmode": sslmode,
            "sslrootcert": str(ca or self.ca),
            "sslcert": str(client.cert),
            "sslkey": str(client.key),
        }
        encoded = "&".join(f"{name}={quote(value, safe='/')}" for name, value in query.items())
        return f"postgresql://{user}@{host}:{self.pg.port_a}/postgres?{encoded}"

    def broker_connections(self) -> list[list[str]]:
        """(user, ssl, peer certificate subject, connection name) of every connection."""
        listing = self.rabbit.ctl(
            1, "list_connections", "-q", "--no-table-headers",
            "user", "ssl", "peer_cert_subject", "client_properties",
        )  # fmt: skip
        return [line.split("\t") for line in listing.splitlines() if line.strip()]

    def broker_log(self) -> str:
        logs = (self.rabbit.directory / "n1" / "log").glob("*@localhost.log")
        return "".join(path.read_text(errors="replace") for path in logs)

    def database_log(self) -> str:
        return (self.pg.directory / "a.log").read_text(errors="replace")


def write_pki(directory: Path) -> tuple[Path, Path, Issued, Issued]:
    """The CA (ca.pem) and the servers' certificate (server.pem, server.key) the scripts
    expect in their TLS directory, a client certificate from the same CA, and another CA
    with a client certificate of its own."""
    ca, rogue = make_ca("identity-test-ca"), make_ca("rogue-ca")
    (directory / "ca.pem").write_bytes(ca.pem())
    # For 127.0.0.1 only: "localhost" reaches the same listener under a name it does not hold.
    issue(ca, directory, "server", hosts=("127.0.0.1",))
    client = issue(ca, directory, CLIENT_CN, client=True)
    rogue_client = issue(rogue, directory, "rogue-client", client=True)
    for key in directory.glob("*.key"):
        key.chmod(0o600)  # libpq's rule for a client key; the scripts copy the server's
    return directory / "ca.pem", rogue.write(directory), client, rogue_client


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    directory = TMP / f"identity-tls-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    try:
        ca, rogue_ca, client, rogue_client = write_pki(directory)
        rabbit = RabbitCluster.fresh(nodes=1, tls_dir=directory)
        pg = PgFailover.fresh(standby=False, ssl_dir=directory)
        with ThreadPoolExecutor(2) as pool:
            # Both at once: each mostly waits on its own server's start.
            starts = [pool.submit(rabbit.start), pool.submit(pg.start)]
        try:
            for start in starts:
                start.result()
            built = Stack(rabbit, pg, ca, rogue_ca, client, rogue_client)
            subprocess.run(
                ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port_a), "-U", "postgres",
                 "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                 "-c", f'CREATE ROLE "{WORKER_ROLE}" LOGIN'],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            yield built
        finally:
            with contextlib.suppress(AssertionError):
                rabbit.teardown()
            with contextlib.suppress(AssertionError):
                pg.teardown()
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def tls_worker_env(stack: Stack, **extra: str) -> dict[str, str]:
    """Production mode, broker and database both over verified TLS with a client certificate;
    the worker as a row-only role, the migration as the owner."""
    tls = {
        "IDENTITY_CALLERS": "identity=*",
        "IDENTITY_AMQP_CA_FILE": str(stack.ca),
        "IDENTITY_AMQP_CERT_FILE": str(stack.client.cert),
        "IDENTITY_AMQP_KEY_FILE": str(stack.client.key),
    }
    return workers.worker_env(stack.amqps, stack.dsn(WORKER_ROLE), stack.dsn(), **{**tls, **extra})


@pytest.fixture(scope="module")
def tls_worker(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[workers.WorkerProcess]:
    log = tmp_path_factory.mktemp("tls-worker") / "worker.log"
    process = workers.WorkerProcess(tls_worker_env(stack), log).start()
    try:
        yield process
    finally:
        process.terminate()


async def _queue_exists(stack: Stack, name: str) -> bool:
    tls = amqp_connect_kwargs(stack.amqps, stack.files())
    connection = await aio_pika.connect(stack.amqps, **tls)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, passive=True)
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()


# -- verified TLS end to end ---------------------------------------------------------------


async def test_a_command_goes_end_to_end_over_verified_tls(
    stack: Stack, tls_worker: workers.WorkerProcess
) -> None:
    queue = f"identity.tls-{uuid.uuid4().hex[:8]}"
    seen: list[Event] = []

    async def consume() -> None:
        # The subscriber with a context of its own: CA and client certificate.
        context = client_context(stack.files())
        async for event in subscribe(stack.amqps, "account.created", queue=queue,
                                     ssl_context=context, worker_user="identity"):  # fmt: skip
            seen.append(event)

    consumer = asyncio.create_task(consume())
    try:
        await eventually(lambda: _queue_exists(stack, queue), what=f"queue {queue}")
        ada = Person.new("tls")
        async with IdentityClient.connect(
            stack.amqps, ca_file=str(stack.ca), worker_user="identity"
        ) as client:
            created = await client.create_account(ada.email, ada.password, ada.display_name)
            fetched = await client.get_account(created.account.id)
        assert fetched.account.email == ada.email
        await eventually(
            lambda: any(e.data.account.id == created.account.id for e in seen),
            timeout=15,
            what="account.created through the TLS subscriber",
        )
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    # Every connection to the broker was TLS; the worker's presented its certificate.
    connections = stack.broker_connections()
    assert connections
    assert {ssl for _, ssl, *_ in connections} == {"true"}, connections
    assert any(CLIENT_CN in subject for _, _, subject, *_ in connections), connections
    # And the worker's database connections too, with its client certificate.
    admin = await asyncpg.connect(stack.dsn())
    try:
        rows = await admin.fetch(
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.usename = $1",
            WORKER_ROLE,
        )
    finally:
        await admin.close()
    assert rows
    assert all(row["ssl"] and row["client_dn"] == f"/CN={CLIENT_CN}" for row in rows), rows


async def test_the_mail_sender_connects_over_verified_tls(
    stack: Stack, tls_worker: workers.WorkerProcess
) -> None:
    courier = Courier(courier_settings(stack, stack.ca))
    try:
        # start() returns once connected and the worker's courier queue is found.
        await asyncio.wait_for(courier.start(), 30)
        connections = stack.broker_connections()
        mine = [c for c in connections if "identity-courier" in c[3]]
        assert mine, connections
        assert all(ssl == "true" and CLIENT_CN in subject for _, ssl, subject, _ in mine)
    finally:
        await courier.stop()


def courier_settings(stack: Stack, ca: Path) -> CourierSettings:
    return load_courier_settings(
        {
            "IDENTITY_AMQP_URL": stack.amqps,
            "IDENTITY_AMQP_CA_FILE": str(ca),
            "IDENTITY_AMQP_CERT_FILE": str(stack.client.cert),
            "IDENTITY_AMQP_KEY_FILE": str(stack.client.key),
            # Plain-text SMTP (dev mode) to nowhere: this test is about the broker.
            "IDENTITY_DEV_MODE": "true",
            "IDENTITY_SMTP_URL": "smtp+insecure://127.0.0.1:9",
            "IDENTITY_MAIL_FROM": "Identity <no-reply@example.com>",
            "IDENTITY_HTTP_HOST": "127.0.0.1",
            "IDENTITY_HTTP_PORT": "0",
        }
    )


# -- refused: another CA, another host name, another CA's client ---------------------------


def _refused(caught: pytest.ExceptionInfo[BaseException], *marks: str) -> None:
    text = f"{caught.value!r} {caught.value.__cause__!r}"
    assert any(mark in text for mark in marks), text


async def test_a_broker_certificate_from_another_ca_is_refused_by_everyone(
    stack: Stack, tls_worker: workers.WorkerProcess
) -> None:
    before = stack.broker_connections()
    rogue = tls_worker_env(stack, IDENTITY_AMQP_CA_FILE=str(stack.rogue_ca))
    with pytest.raises(CertificateRefused) as worker_refused:
        await asyncio.wait_for(connect_broker(load_settings(rogue)), 15)
    assert str(worker_refused.value) == (
        "IDENTITY_AMQP_URL: the broker's certificate was refused (self-signed certificate in"
        " certificate chain); check IDENTITY_AMQP_CA_FILE and the host name in the URL"
        " (docs/runbook.md, TLS)"
    )
    # The worker process: the same words, exit status 2, never up.
    started = _run("run", "--no-migrate", env=rogue)
    assert started.returncode == 2, started.stderr
    assert "the broker's certificate was refused" in started.stderr

    with pytest.raises(Exception) as client_refused:  # noqa: PT011
        async with IdentityClient.connect(stack.amqps, ca_file=str(stack.rogue_ca)):
            pass
    _refused(client_refused, UNTRUSTED)

    with pytest.raises(Exception) as subscriber_refused:  # noqa: PT011
        async for _ in subscribe(stack.amqps, queue="identity.never", ca_file=str(stack.rogue_ca)):
            pass
    _refused(subscriber_refused, UNTRUSTED)

    courier = Courier(courier_settings(stack, stack.rogue_ca))
    try:
        with pytest.raises(Exception) as courier_refused:  # noqa: PT011
            await asyncio.wait_for(courier.start(), 15)
        _refused(courier_refused, UNTRUSTED)
    finally:
        await courier.stop()

    # No plain-text fallback: not one connection more than before, TLS or not.
    assert len(stack.broker_connections()) == len(before)


async def test_each_node_of_a_list_is_verified_under_its_own_host_name(stack: Stack) -> None:
    # The certificate is for 127.0.0.1. A first node named "localhost" that does not answer
    # is passed over, and the next is verified as 127.0.0.1, not as the first node's name.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    first = str(URL(stack.amqps).with_host("localhost").with_port(closed))
    connection = await connect_any(
        f"{first},{stack.amqps}", **amqp_connect_kwargs(stack.amqps, stack.files())
    )
    try:
        assert connection.url.host == "127.0.0.1"
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()

    # A node whose name the certificate does not carry is refused, never used in plain text.
    wrong_name = stack.rabbit.tls_url(1, "localhost")
    with pytest.raises(Exception) as refused:  # noqa: PT011
        async with IdentityClient.connect(f"{first},{wrong_name}", ca_file=str(stack.ca)):
            pass
    _refused(refused, "Hostname mismatch")


async def test_the_system_store_does_not_trust_a_private_ca(stack: Stack) -> None:
    # No CA file: the default is the system's trust store, which never heard of this CA.
    with pytest.raises(Exception) as refused:  # noqa: PT011
        async with IdentityClient.connect(stack.amqps):
            pass
    _refused(refused, UNTRUSTED)


async def test_the_host_name_is_checked(stack: Stack) -> None:
    # The certificate is for 127.0.0.1; "localhost" reaches the same listener.
    with pytest.raises(Exception) as broker_refused:  # noqa: PT011
        async with IdentityClient.connect(
            stack.rabbit.tls_url(1, "localhost"), ca_file=str(stack.ca)
        ):
            pass
    _refused(broker_refused, "Hostname mismatch")

    # verify-full checks the name; verify-ca only the chain.
    with pytest.raises(Exception) as database_refused:  # noqa: PT011
        await asyncpg.connect(stack.dsn(host="localhost"))
    _refused(database_refused, "Hostname mismatch")
    chain_only = await asyncpg.connect(stack.dsn(host="localhost", sslmode="verify-ca"))
    await chain_only.close()


async def test_a_database_certificate_from_another_ca_is_refused(stack: Stack) -> None:
    env = tls_worker_env(stack, IDENTITY_DATABASE_URL=stack.dsn(WORKER_ROLE, ca=stack.rogue_ca))
    with pytest.raises(CertificateRefused, match=r"^IDENTITY_DATABASE_URL: the database's"):
        await connect_store(load_settings(env), create_metrics())


async def test_a_client_certificate_from_another_ca_is_refused_by_the_servers(
    stack: Stack,
) -> None:
    # TLS 1.3 checks the client's certificate after the client's side of the handshake: the
    # client sees an alert or just a reset, and the server says why in its log.
    context = client_context(stack.files(client=stack.rogue_client))
    with pytest.raises(Exception) as broker_refused:  # noqa: PT011
        async with IdentityClient.connect(stack.amqps, ssl_context=context):
            pass
    _refused(broker_refused, "UNKNOWN_CA", "reset")
    await eventually(
        lambda: "SERVER ALERT: Fatal - Unknown CA" in stack.broker_log(),
        timeout=10,
        what="the broker's log naming the unknown CA",
    )

    with pytest.raises(Exception) as database_refused:  # noqa: PT011
        await asyncpg.connect(stack.dsn(client=stack.rogue_client))
    _refused(database_refused, "UNKNOWN_CA", "reset")
    await eventually(
        lambda: (
            "could not accept SSL connection: certificate verify failed" in stack.database_log()
        ),
        timeout=10,
        what="the database's log naming the failed verification",
    )


# -- production's rule, through the real entry points --------------------------------------


def _run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(workers.WORKER_BIN), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_the_tools_use_the_tls_settings_and_production_refuses_remote_plain_text(
    stack: Stack, tls_worker: workers.WorkerProcess
) -> None:
    env = tls_worker_env(stack)
    over_tls = _run("dead", "list", env=env)
    assert over_tls.returncode == 0, over_tls.stderr
    # A command and its reply through the client library, over the same verified TLS.
    sent = _run("send", "keys.jwks", env=env)
    assert sent.returncode == 0, sent.stderr
    assert '"keys"' in sent.stdout

    # Plain text on this machine is still allowed, in production.
    loopback = _run("dead", "list", "--amqp-url", stack.amqp_plain, env={
        **env, "IDENTITY_AMQP_CA_FILE": "", "IDENTITY_AMQP_CERT_FILE": "",
        "IDENTITY_AMQP_KEY_FILE": "",
    })  # fmt: skip
    assert loopback.returncode == 0, loopback.stderr

    # 0.0.0.0 reaches this machine's listener, but is no loopback name: a remote host as far
    # as the rule can tell from the URL.
    remote = stack.amqp_plain.replace("@127.0.0.1:", "@0.0.0.0:")
    plain = {**env, "IDENTITY_AMQP_URL": remote, "IDENTITY_AMQP_CA_FILE": "",
             "IDENTITY_AMQP_CERT_FILE": "", "IDENTITY_AMQP_KEY_FILE": ""}  # fmt: skip
    refused = _run("dead", "list", env=plain)
    assert refused.returncode == 2, refused.stderr
    assert "IDENTITY_AMQP_URL: plain-text amqp://" in refused.stderr
    assert "commands carry passwords" in refused.stderr
    assert "identity:identity" not in refused.stderr
    allowed = _run("dead", "list", env={**plain, "IDENTITY_ALLOW_PLAINTEXT": "true"})
    assert allowed.returncode == 0, allowed.stderr


def test_a_production_worker_refuses_remote_plain_text_at_start(stack: Stack) -> None:
    env = tls_worker_env(stack)
    database = stack.dsn(WORKER_ROLE).split("?")[0].replace("@127.0.0.1:", "@0.0.0.0:")
    refused = _run("run", env={**env, "IDENTITY_DATABASE_URL": database})

    assert refused.returncode == 2, refused.stderr
    assert "IDENTITY_DATABASE_URL: a database URL to a host that is not loopback" in (
        refused.stdout + refused.stderr
    )
