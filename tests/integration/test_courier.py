"""The mail sender against a real RabbitMQ and a real SMTP server (aiosmtpd, in this process).

The tests of this module share a vhost of their own; each starts with the courier topology
declared afresh as the worker declares it: exchange `identity.courier` (direct), quorum queue
`identity.courier` bound by kind, and a dead-letter exchange and queue standing in for the
worker's internal ones (the worker redacts what arrives there on its way to `identity.dead`;
here the test reads it raw, to see exactly what the broker dead-lettered). The mail sender
runs in this process (`Courier`), except in the tests of the command itself, which start
`identity-worker courier`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from pydantic import SecretStr

from courier.app import Courier
from courier.settings import load_courier_settings
from messages.courier import CourierMessage
from messages.models import wire_form
from messages.topology import COURIER_EXCHANGE, COURIER_QUEUE
from tests.support.certs import make_ca, server_context
from tests.support.eventually import eventually, eventually_sync
from tests.support.smtp import Received, SmtpServer
from tests.support.vhosts import BROKER, fresh_vhost, rabbitmqctl
from tests.support.workers import ROOT, WORKER_BIN, free_port
from worker.logs import JsonFormatter

pytestmark = [
    pytest.mark.integration,
    # The plain-text servers that test a login ask for AUTH without TLS, on purpose.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

# Stand-ins for the worker's internal dead-letter exchange and queue.
DLX = "identity.test.courier-dlx"
DLQ = "identity.test.courier-dlq"
KINDS = ("verification_code", "recovery_code", "email_changed_notice", "password_changed_notice")
SENDER = "Identity <no-reply@identity.test>"
ACCOUNT = "acct_01jd3m8f2q9v7x4k6t5r0w2y8z"
CODE = "K7PQ2M9X"  # shown in mails as K7PQ-2M9X
SHOWN_CODE = "K7PQ-2M9X"


# -- the broker side ---------------------------------------------------------------------------


async def declare_courier_topology(channel: AbstractChannel) -> AbstractExchange:
    """What the worker declares for the courier (contract v2, section 2)."""
    dead = await channel.declare_exchange(
        DLX, aio_pika.ExchangeType.FANOUT, durable=True, internal=True
    )
    dead_queue = await channel.declare_queue(
        DLQ, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead, routing_key="")
    exchange = await channel.declare_exchange(
        COURIER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        COURIER_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 5,
            "x-dead-letter-exchange": DLX,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for kind in KINDS:
        await queue.bind(exchange, routing_key=kind)
    return exchange


def courier_message(**fields: Any) -> CourierMessage:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "message_id": f"cmsg_{secrets.token_hex(8)}",
        "kind": "verification_code",
        "to": "ada@example.com",
        "account_id": ACCOUNT,
        "display_name": "Ada",
        "code": SecretStr(CODE),
        "expires_at": now + timedelta(minutes=15),
        "occurred_at": now,
    }
    values.update(fields)
    return CourierMessage(**values)


class Broker:
    """The test's side of the vhost: publishes as the worker would, reads the queues."""

    def __init__(self, url: str, connection: aio_pika.abc.AbstractConnection) -> None:
        self.url = url
        self.connection = connection
        self.channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None

    async def declare(self) -> None:
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await declare_courier_topology(self.channel)

    async def publish(self, message: CourierMessage, *, body: bytes | None = None) -> None:
        assert self.exchange is not None
        expiration = None
        if message.expires_at is not None:
            left = (message.expires_at - datetime.now(UTC)).total_seconds()
            expiration = timedelta(seconds=max(left, 0.001))
        await self.exchange.publish(
            aio_pika.Message(
                body if body is not None else orjson.dumps(wire_form(message)),
                message_id=message.message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id="guest",
                expiration=expiration,
            ),
            routing_key=message.kind,
        )

    async def depth(self, name: str = COURIER_QUEUE) -> int:
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            count = queue.declaration_result.message_count
            return int(count or 0)
        finally:
            await channel.close()

    async def dead_letters(self) -> list[AbstractIncomingMessage]:
        """Everything in the stand-in dead-letter queue, removed from it."""
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(DLQ, passive=True)
            taken = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
            return taken
        finally:
            await channel.close()


@pytest.fixture(scope="module")
def courier_vhost() -> Iterator[str]:
    with fresh_vhost() as vhost:
        yield vhost


@pytest.fixture
async def broker(courier_vhost: str) -> AsyncIterator[Broker]:
    """The module's vhost, emptied of what an earlier test left: no courier queue yet."""
    url = f"{BROKER}/{courier_vhost}"
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel()
        for queue in (COURIER_QUEUE, DLQ):
            await channel.queue_delete(queue)
        await channel.close()
        yield Broker(url, connection)
    finally:
        await connection.close()


@pytest.fixture
async def topology(broker: Broker) -> Broker:
    await broker.declare()
    return broker


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- the mail sender under test ----------------------------------------------------------------

FAST = {
    "IDENTITY_DEV_MODE": "true",
    "IDENTITY_MAIL_FROM": SENDER,
    "IDENTITY_HTTP_HOST": "127.0.0.1",
    "IDENTITY_HTTP_PORT": "0",
    "IDENTITY_READINESS_PROBE_S": "0.2",
    "IDENTITY_SMTP_PROBE_S": "0.5",
    "IDENTITY_SMTP_TIMEOUT_S": "5",
    "IDENTITY_SMTP_RETRY_INITIAL_DELAY_S": "0.05",
    "IDENTITY_SMTP_RETRY_MAX_DELAY_S": "0.3",
    "IDENTITY_SHUTDOWN_GRACE_S": "5",
}


@asynccontextmanager
async def running_courier(amqp_url: str, smtp_url: str, **env: str) -> AsyncIterator[Courier]:
    settings = load_courier_settings(
        {**FAST, "IDENTITY_AMQP_URL": amqp_url, "IDENTITY_SMTP_URL": smtp_url, **env}
    )
    courier = Courier(settings)
    try:
        await courier.start()
        yield courier
    finally:
        await courier.stop()


def sample(courier: Courier, name: str, **labels: str) -> float:
    value = courier.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def wait_for_mails(smtp: SmtpServer, count: int, timeout: float = 30.0) -> list[Received]:
    return await eventually(
        lambda: len(smtp.mails()) >= count and smtp.mails(),
        timeout=timeout,
        what=lambda: f"{count} mail(s) (got {len(smtp.mails())})",
    )


class CapturedLogs(logging.Handler):
    """Every log record of this process as the JSON line the mail sender would write,
    except aiosmtpd's own (the test SMTP server logs addresses; it is not under test)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("mail.log"):
            self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def captured_logs() -> Iterator[CapturedLogs]:
    handler = CapturedLogs()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def assert_no_secret_in(text: str, *addresses: str) -> None:
    for secret in (CODE, SHOWN_CODE, CODE.lower(), *addresses):
        assert secret not in text, f"{secret!r} was logged"


# -- mails as they arrive ----------------------------------------------------------------------


async def test_a_code_arrives_as_one_mail_with_both_parts_and_a_derived_message_id(
    topology: Broker, smtp: SmtpServer
) -> None:
    message = courier_message(kind="recovery_code")
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(message)
        (mail,) = await wait_for_mails(smtp, 1)
        await eventually(
            lambda: sample(courier, "identity_courier_sent_total", kind="recovery_code") == 1
        )

    assert mail.mail_from == "no-reply@identity.test"
    assert mail.rcpt_tos == ["ada@example.com"]
    parsed = mail.message
    assert parsed["To"] == "ada@example.com"
    assert parsed["From"] == SENDER
    assert parsed["Message-ID"] == f"<{message.message_id}.courier@identity.test>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed.get_content_type() == "multipart/alternative"
    assert "recovery code" in parsed["Subject"]
    assert CODE not in parsed["Subject"]
    assert SHOWN_CODE not in parsed["Subject"]
    text, html = mail.part("text/plain"), mail.part("text/html")
    assert SHOWN_CODE in text
    assert SHOWN_CODE in html
    expiry = message.expires_at
    assert expiry is not None
    assert expiry.strftime("%Y-%m-%d %H:%M UTC") in text
    assert await topology.depth() == 0  # acked
    assert await topology.dead_letters() == []


async def test_every_kind_is_sent_with_its_own_text(topology: Broker, smtp: SmtpServer) -> None:
    notices = {"email_changed_notice", "password_changed_notice"}
    messages = [
        courier_message(kind=kind)
        if kind not in notices
        else courier_message(kind=kind, code=None, expires_at=None)
        for kind in KINDS
    ]
    async with running_courier(topology.url, smtp.url()):
        for message in messages:
            await topology.publish(message)
        mails = await wait_for_mails(smtp, len(KINDS))

    subjects = {mail.message["Message-ID"]: mail.message["Subject"] for mail in mails}
    assert len(set(subjects.values())) == len(KINDS)
    for mail in mails:
        is_notice = "changed" in mail.message["Subject"]
        assert (SHOWN_CODE in mail.part("text/plain")) is not is_notice


async def test_a_display_name_arrives_escaped_in_html_and_as_written_in_text(
    topology: Broker, smtp: SmtpServer
) -> None:
    name = "<script>alert('x')</script> & Co"
    async with running_courier(topology.url, smtp.url()):
        await topology.publish(courier_message(display_name=name))
        (mail,) = await wait_for_mails(smtp, 1)

    html = mail.part("text/html")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; Co" in html
    assert f"Hello {name}," in mail.part("text/plain")


async def test_templates_in_the_override_directory_replace_the_shipped_ones(
    topology: Broker, smtp: SmtpServer, tmp_path: Path
) -> None:
    (tmp_path / "verification_code.subject.txt").write_text("Your code for Example Corp\n")
    (tmp_path / "verification_code.html").write_text(
        "<p>Dear {{ display_name }}, your Example Corp code is <b>{{ code }}</b>.</p>\n"
    )
    async with running_courier(
        topology.url, smtp.url(), IDENTITY_MAIL_TEMPLATES_DIR=str(tmp_path)
    ) as courier:
        assert courier.renderer.overridden() == [
            "verification_code.subject.txt",
            "verification_code.html",
        ]
        await topology.publish(courier_message(display_name="<i>Ada</i>"))
        (mail,) = await wait_for_mails(smtp, 1)

    assert mail.message["Subject"] == "Your code for Example Corp"
    assert mail.part("text/html").strip() == (
        f"<p>Dear &lt;i&gt;Ada&lt;/i&gt;, your Example Corp code is <b>{SHOWN_CODE}</b>.</p>"
    )
    assert "Enter this code to confirm" in mail.part("text/plain")  # the shipped text part


# -- one mail per message_id -------------------------------------------------------------------


async def test_a_redelivered_message_id_sends_no_second_mail(
    topology: Broker, smtp: SmtpServer
) -> None:
    message = courier_message()
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(message)
        await wait_for_mails(smtp, 1)
        await topology.publish(message)  # the relay published it again
        await eventually(
            lambda: sample(courier, "identity_courier_duplicates_total", kind=message.kind) == 1,
            what="the second copy counted as a duplicate",
        )

    assert await topology.depth() == 0

    assert len(smtp.mails()) == 1
    assert sample(courier, "identity_courier_sent_total", kind=message.kind) == 1


async def test_copies_of_one_message_id_in_flight_at_once_send_one_mail(
    topology: Broker, smtp: SmtpServer
) -> None:
    message = courier_message()
    smtp.recorder.data_replies.extend(["451 4.3.0 slow down"] * 3)  # keep the first busy
    async with running_courier(topology.url, smtp.url()) as courier:
        for _ in range(3):
            await topology.publish(message)
        await eventually(
            lambda: sample(courier, "identity_courier_duplicates_total", kind=message.kind) == 2,
            what="two copies counted as duplicates",
        )
    assert len(smtp.mails()) == 1


# -- failures ----------------------------------------------------------------------------------


async def test_smtp_down_for_a_while_then_up_delivers_every_mail_exactly_once(
    topology: Broker,
) -> None:
    # Not started: connections are refused. Each message goes back to the queue every 2 s
    # (the deadline); the queue's delivery limit (5) would dead-letter one after about 10 s,
    # well after the server is up.
    server = SmtpServer()
    messages = [courier_message(to=f"user{i}@example.com") for i in range(20)]
    async with running_courier(
        topology.url, server.url(), IDENTITY_SMTP_RETRY_DEADLINE_S="2"
    ) as courier:
        for message in messages:
            await topology.publish(message)
        # Retried, then handed back to the queue after the deadline and taken again.
        await eventually(
            lambda: (
                sample(courier, "identity_courier_retries_total", reason="connection") >= 20
                and sample(
                    courier,
                    "identity_courier_failed_total",
                    kind="verification_code",
                    reason="retry_deadline",
                )
                >= 1
            ),
            what="retries and a hand-back while the server is down",
        )
        assert not courier.health.snapshot()[0]
        assert "smtp: connection" in courier.health.snapshot()[1]
        server.start()
        try:
            mails = await wait_for_mails(server, len(messages), timeout=60)
            await eventually(lambda: courier.health.snapshot()[0], what="ready again")
            await eventually(
                lambda: (
                    sample(courier, "identity_courier_sent_total", kind="verification_code") == 20
                )
            )
        finally:
            server.stop()

    ids = sorted(mail.message["Message-ID"] for mail in mails)
    assert ids == sorted(f"<{m.message_id}.courier@identity.test>" for m in messages)
    assert len(server.mails()) == len(messages)  # exactly once each
    assert await topology.depth() == 0
    assert await topology.dead_letters() == []


async def test_a_4xx_reply_is_retried_and_the_mail_sent_once(
    topology: Broker, smtp: SmtpServer
) -> None:
    smtp.recorder.data_replies.extend(["451 4.3.0 try again later"] * 2)
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(courier_message())
        await wait_for_mails(smtp, 1)
        await eventually(
            lambda: sample(courier, "identity_courier_sent_total", kind="verification_code") == 1
        )
        assert sample(courier, "identity_courier_retries_total", reason="smtp_4xx") == 2
        # The server answered (with 4xx): it is reachable, so the sender is ready.
        await eventually(lambda: courier.health.snapshot()[0], what="ready")
        assert sample(courier, "identity_courier_smtp_up") == 1
    assert len(smtp.mails()) == 1


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("rcpt", "recipient_refused"),
        ("data", "rejected"),
    ],
)
async def test_a_5xx_dead_letters_the_message_and_logs_neither_code_nor_address(
    topology: Broker, smtp: SmtpServer, captured_logs: CapturedLogs, refusal: str, reason: str
) -> None:
    victim = "nobody@example.com"
    if refusal == "rcpt":
        smtp.recorder.refuse_rcpt[victim] = f"550 5.1.1 <{victim}>: no such mailbox"
    else:
        smtp.recorder.data_replies.append("554 5.7.1 refused by policy")
    bad = courier_message(to=victim, kind="recovery_code")
    good = courier_message(to="ada@example.com")
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(bad)
        await eventually(
            lambda: (
                sample(
                    courier, "identity_courier_failed_total", kind="recovery_code", reason=reason
                )
                == 1
            ),
            what=f"a failure with reason {reason}",
        )
        await topology.publish(good)
        await wait_for_mails(smtp, 1)

    (dead,) = await eventually(topology.dead_letters, what="the dead letter")
    assert dead.message_id == bad.message_id
    death = dead.headers["x-death"][0]  # type: ignore[index]
    assert death["reason"] == "rejected"  # rejected by the consumer, not requeued
    assert death["queue"] == COURIER_QUEUE
    assert await topology.depth() == 0
    assert [mail.rcpt_tos for mail in smtp.mails()] == [["ada@example.com"]]
    logged = captured_logs.text()
    assert bad.message_id in logged  # the failure was logged ...
    assert_no_secret_in(logged, victim, "ada@example.com")  # ... without code or address


async def test_an_expired_code_is_never_sent(topology: Broker, smtp: SmtpServer) -> None:
    now = datetime.now(UTC)
    expired = courier_message(
        expires_at=now - timedelta(seconds=1), occurred_at=now - timedelta(minutes=15)
    )
    async with running_courier(topology.url, smtp.url()) as courier:
        # Published without an AMQP expiration, so the broker does not drop it first: the mail
        # sender itself must see that the code is past its time.
        assert topology.exchange is not None
        await topology.exchange.publish(
            aio_pika.Message(orjson.dumps(wire_form(expired)), message_id=expired.message_id),
            routing_key=expired.kind,
        )
        await eventually(
            lambda: (
                sample(
                    courier, "identity_courier_failed_total", kind=expired.kind, reason="expired"
                )
                == 1
            ),
            what="the expired message counted",
        )
        await topology.publish(courier_message())  # a live one still goes out
        await wait_for_mails(smtp, 1)

    assert len(smtp.mails()) == 1
    assert await topology.depth() == 0
    assert await topology.dead_letters() == []  # acked: an expired code is no operator's work


async def test_what_is_not_a_courier_message_is_dead_lettered_unsent(
    topology: Broker, smtp: SmtpServer, captured_logs: CapturedLogs
) -> None:
    leaky = courier_message()
    body = orjson.dumps({**wire_form(leaky), "extra": "field"})
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(leaky, body=body)
        await topology.publish(courier_message(), body=b"not json")
        await eventually(
            lambda: (
                sample(
                    courier,
                    "identity_courier_failed_total",
                    kind="verification_code",
                    reason="invalid_message",
                )
                == 2
            )
        )
    assert smtp.mails() == []
    assert len(await eventually(topology.dead_letters)) == 2
    assert_no_secret_in(captured_logs.text(), "ada@example.com")


async def test_a_message_from_another_broker_user_is_dead_lettered_unsent(
    topology: Broker, smtp: SmtpServer
) -> None:
    async with running_courier(
        topology.url, smtp.url(), IDENTITY_WORKER_USER="identity-worker"
    ) as courier:
        await topology.publish(courier_message())  # user_id guest, not the worker's
        await eventually(
            lambda: (
                sample(
                    courier,
                    "identity_courier_failed_total",
                    kind="verification_code",
                    reason="untrusted_publisher",
                )
                == 1
            )
        )
    assert smtp.mails() == []
    assert len(await eventually(topology.dead_letters)) == 1


# -- TLS ---------------------------------------------------------------------------------------

CREDENTIALS = ("mailer", "s3cret-Pa55")


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_tls_with_a_throwaway_ca_and_authentication_from_the_url(
    topology: Broker, tmp_path: Path, scheme: str
) -> None:
    ca = make_ca("test-ca")
    server = SmtpServer(
        tls=server_context(ca, tmp_path), implicit_tls=scheme == "smtps", credentials=CREDENTIALS
    ).start()
    try:
        async with running_courier(
            topology.url,
            server.url(scheme, CREDENTIALS),
            IDENTITY_SMTP_CA_FILE=str(ca.write(tmp_path)),
            IDENTITY_DEV_MODE="false",
        ) as courier:
            await topology.publish(courier_message())
            (mail,) = await wait_for_mails(server, 1)
            await eventually(lambda: courier.health.snapshot()[0], what="ready")
    finally:
        server.stop()
    assert SHOWN_CODE in mail.part("text/plain")


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_a_certificate_from_another_ca_is_refused_and_nothing_is_sent(
    topology: Broker, tmp_path: Path, scheme: str
) -> None:
    trusted, other = make_ca("trusted-ca"), make_ca("other-ca")
    server = SmtpServer(
        tls=server_context(other, tmp_path), implicit_tls=scheme == "smtps", credentials=CREDENTIALS
    ).start()
    try:
        async with running_courier(
            topology.url,
            server.url(scheme, CREDENTIALS),
            IDENTITY_SMTP_CA_FILE=str(trusted.write(tmp_path)),
        ) as courier:
            await topology.publish(courier_message())
            await eventually(
                lambda: sample(courier, "identity_courier_retries_total", reason="tls") >= 1,
                what="a TLS failure, retried",
            )
            assert "smtp: tls" in courier.health.snapshot()[1]
    finally:
        server.stop()
    assert server.mails() == []
    assert await eventually(topology.depth) == 1  # handed back at the stop, still to send


async def test_smtp_url_requires_starttls_and_never_falls_back_to_plain_text(
    topology: Broker,
) -> None:
    server = SmtpServer(credentials=CREDENTIALS).start()  # no STARTTLS offered at all
    try:
        async with running_courier(topology.url, server.url("smtp", CREDENTIALS)) as courier:
            await topology.publish(courier_message())
            await eventually(
                lambda: sample(courier, "identity_courier_retries_total", reason="tls") >= 1
            )
    finally:
        server.stop()
    assert server.mails() == []


async def test_a_wrong_smtp_password_keeps_the_message_and_says_why(topology: Broker) -> None:
    server = SmtpServer(credentials=CREDENTIALS).start()
    try:
        async with running_courier(
            topology.url, server.url("smtp+insecure", ("mailer", "wrong"))
        ) as courier:
            await topology.publish(courier_message())
            await eventually(
                lambda: sample(courier, "identity_courier_retries_total", reason="auth") >= 1
            )
            assert "smtp: auth" in courier.health.snapshot()[1]
    finally:
        server.stop()
    assert server.mails() == []
    assert await eventually(topology.depth) == 1


# -- the broker side of the mail sender --------------------------------------------------------


async def test_it_waits_for_the_worker_to_declare_the_queue(
    broker: Broker, smtp: SmtpServer
) -> None:
    settings = load_courier_settings(
        {**FAST, "IDENTITY_AMQP_URL": broker.url, "IDENTITY_SMTP_URL": smtp.url()}
    )
    courier = Courier(settings)
    starting = asyncio.create_task(courier.start())
    try:
        await eventually(
            lambda: (
                f"broker: queue {COURIER_QUEUE} not declared yet" in courier.health.snapshot()[1]
            ),
            what="not ready: no queue yet",
        )
        assert not starting.done()
        await broker.declare()  # the worker starts
        await starting
        await broker.publish(courier_message())
        await wait_for_mails(smtp, 1)
        await eventually(lambda: courier.health.snapshot()[0], what="ready")
        assert sample(courier, "identity_courier_broker_connected") == 1
    finally:
        if not starting.done():
            starting.cancel()
        await courier.stop()


async def test_a_broker_user_that_may_only_read_the_queue_is_enough(
    topology: Broker, smtp: SmtpServer
) -> None:
    """The mail sender's broker user has no configure and no write permission (a
    write grant would let it bind identity.dead to identity.courier and copy codes there)."""
    user, password = f"identity-test-mailer-{secrets.token_hex(3)}", secrets.token_hex(12)
    vhost = topology.url.rpartition("/")[2]
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, "^$", "^$", r"^identity\.courier$")
        smtp.recorder.refuse_rcpt["gone@example.com"] = "550 5.1.1 no such mailbox"
        mailer_url = f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}"
        async with running_courier(mailer_url, smtp.url()) as courier:
            await topology.publish(courier_message(to="gone@example.com"))
            await topology.publish(courier_message())
            await wait_for_mails(smtp, 1)
            await eventually(
                lambda: (
                    sample(
                        courier,
                        "identity_courier_failed_total",
                        kind="verification_code",
                        reason="recipient_refused",
                    )
                    == 1
                )
            )
            await eventually(lambda: courier.health.snapshot()[0], what="ready")
        assert len(await eventually(topology.dead_letters)) == 1  # a reject needs no write
    finally:
        rabbitmqctl("delete_user", user)


async def test_a_send_in_flight_at_the_stop_finishes_and_is_acked(
    topology: Broker, smtp: SmtpServer
) -> None:
    smtp.recorder.data_delay_s = 1.0
    async with running_courier(topology.url, smtp.url()) as courier:
        await topology.publish(courier_message())
        await eventually(smtp.recorder.data_started.is_set, what="the mail's DATA under way")
    # Leaving the block stopped the mail sender while the server was still taking the mail.
    assert len(smtp.mails()) == 1
    assert sample(courier, "identity_courier_sent_total", kind="verification_code") == 1
    assert await topology.depth() == 0


# -- identity-worker courier, the process --------------------------------------------------------


class CourierProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**env, "IDENTITY_HTTP_PORT": str(self.port)}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CourierProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(WORKER_BIN), "courier"], env=self.env, cwd=ROOT, stdout=log, stderr=log
            )
        return self

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"courier exited {self.process.returncode}:\n{self.log()}")
            return self.get("/readyz")[0] == 200

        eventually_sync(ready, timeout=60, every=0.1, what=lambda: f"ready:\n{self.log()}")

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def process_env(amqp_url: str, smtp_url: str, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    env.update(FAST, IDENTITY_AMQP_URL=amqp_url, IDENTITY_SMTP_URL=smtp_url, **extra)
    return env


async def test_the_command_sends_serves_its_sidecar_and_drains_on_sigterm(
    topology: Broker, smtp: SmtpServer, tmp_path: Path
) -> None:
    process = CourierProcess(
        process_env(topology.url, smtp.url(), IDENTITY_SHUTDOWN_GRACE_S="20"),
        tmp_path / "courier.log",
    ).start()
    try:
        await asyncio.to_thread(process.wait_ready)
        await topology.publish(courier_message())
        await wait_for_mails(smtp, 1)
        assert process.get("/healthz")[0] == 200
        metrics = process.get("/metrics")[1]
        assert 'identity_courier_sent_total{kind="verification_code"} 1.0' in metrics
        assert "identity_courier_queue_messages" in metrics
        # One more that cannot be sent: the stop hands it back at once, not after the grace.
        smtp.recorder.data_replies.extend(["451 4.3.0 later"] * 1000)
        await topology.publish(courier_message())
        await eventually(
            lambda: (
                'identity_courier_retries_total{reason="smtp_4xx"} 0.0'
                not in process.get("/metrics")[1]
            ),
            what="the second mail being retried",
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        code = await asyncio.to_thread(process.terminate)
        took = loop.time() - started
    finally:
        if process.process is not None and process.process.poll() is None:
            process.process.kill()
    assert code == 0, process.log()
    assert took < 20, f"the stop waited out the grace period ({took:.1f}s)"
    assert "identity courier stopped" in process.log()
    assert await eventually(topology.depth) == 1  # the unsent one is back in the queue
    assert_no_secret_in(process.log(), "ada@example.com")


def test_the_command_refuses_bad_settings_naming_the_variable(tmp_path: Path) -> None:
    env = process_env(
        "amqp://guest:guest@127.0.0.1:5672/",
        "smtp+insecure://user:leaked-pw@127.0.0.1:1025",
        IDENTITY_DEV_MODE="false",
    )
    done = subprocess.run(
        [str(WORKER_BIN), "courier"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "IDENTITY_SMTP_URL" in done.stderr
    assert "IDENTITY_DEV_MODE" in done.stderr
    assert "leaked-pw" not in done.stderr + done.stdout


def test_the_command_refuses_a_broken_template_override_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "recovery_code.txt").write_text("Your code: {{ cod }}\n")  # a typo
    env = process_env(
        "amqp://guest:guest@127.0.0.1:5672/",
        "smtp+insecure://127.0.0.1:1025",
        IDENTITY_MAIL_TEMPLATES_DIR=str(tmp_path),
    )
    done = subprocess.run(
        [str(WORKER_BIN), "courier"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "recovery_code.txt" in done.stdout
    assert "'cod' is undefined" in done.stdout
