"""Spans with the OpenTelemetry SDK installed (in memory): a caller's command is traced through
the worker (command span, database spans: one per transaction, publish spans) to its events
and to the mail sender, in one trace, with no secret or personal data in any span. Real
RabbitMQ (a vhost of this module's own), real PostgreSQL (a database of the test's own, so
that no other worker's relay publishes its outbox), the worker and the mail sender in this
process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from client import IdentityClient
from stores import PostgresIdentityStore
from tests.conftest import migrated_database, worker_role
from tests.integration.test_courier import running_courier
from tests.support.bus import Bus
from tests.support.eventually import eventually
from tests.support.pipeline import Broker, running_worker
from tests.support.smtp import SmtpServer
from tests.support.tracing import CALLER, named, traceparent

pytestmark = pytest.mark.integration


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A migrated database of the test's own, as the worker's row-only role sees it."""
    async with migrated_database() as owner, worker_role(owner) as dsn:
        yield dsn


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


def _one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, (name, sorted(span.name for span in spans))
    return found[0]


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


def _id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


async def test_a_command_is_one_trace_from_the_caller_to_the_mail(
    spans: InMemorySpanExporter, private_amqp_url: str, database: str, smtp: SmtpServer
) -> None:
    tag = uuid.uuid4().hex[:12]
    email, password = f"traced-{tag}@example.com", f"Lantern-{uuid.uuid4().hex[:12]}-harbour"
    store = await PostgresIdentityStore.connect(database)
    async with running_worker(Broker.rabbitmq(private_amqp_url), store=store):
        bus = await Bus.open(private_amqp_url)
        try:
            async with (
                running_courier(private_amqp_url, smtp.url()),
                IdentityClient.connect(private_amqp_url, timeout=30) as client,
            ):
                with CALLER.start_as_current_span("caller", kind=SpanKind.CLIENT) as caller:
                    traced = await client.send_traced(
                        "account.create",
                        {"email": email, "password": password, "display_name": "Ada"},
                    )
                account_id = traced.reply.result["account"]["id"]  # type: ignore[index]
                created = await eventually(
                    lambda: [e for e in bus.events_of("account.created") if account_id in str(e)],
                    what="account.created",
                )
                await eventually(lambda: smtp.mails(), what="the verification mail")
                await eventually(
                    lambda: named(spans.get_finished_spans(), "verification_code send"),
                    what="the mail sender's span",
                )
        finally:
            await bus.close()

    finished = spans.get_finished_spans()
    caller_context = caller.get_span_context()
    command = _one(finished, "account.create process")
    reply = _one(finished, "reply publish")
    event = _one(finished, "account.created publish")
    mail_publish = _one(finished, "verification_code publish")
    mail_send = _one(finished, "verification_code send")
    database_spans = [span for span in finished if span.name.startswith("db ")]

    # One trace, from the caller's span down.
    worker_spans = [command, reply, event, mail_publish, mail_send, *database_spans]
    assert {span.get_span_context().trace_id for span in worker_spans} == {  # type: ignore[union-attr]
        caller_context.trace_id
    }
    assert command.kind == SpanKind.CONSUMER
    assert _parent_of(command) == caller_context.span_id
    assert database_spans
    assert {_parent_of(span) for span in database_spans} == {_id(command)}
    # The unit of work is one span, listing its statements.
    transaction = _one(finished, "db transaction")
    assert transaction.attributes is not None
    operations = transaction.attributes["identity.db.operations"]
    assert "uow.record_outcome" in operations  # type: ignore[operator]
    assert "commit" in operations  # type: ignore[operator]
    assert not [span for span in database_spans if span.name.startswith("db uow.")]
    assert _parent_of(reply) == _id(command)
    assert _parent_of(event) == _id(command)
    assert _parent_of(mail_publish) == _id(command)
    assert _parent_of(mail_send) == _id(mail_publish)

    # Each hop's headers name the span that sent it.
    assert traced.traceparent == traceparent(reply)
    assert bus.event_headers[created[0]["event_id"]]["traceparent"] == traceparent(event)

    # No password, address, code or token in any span.
    attributes = orjson.dumps(
        [dict(span.attributes or {}) | {"name": span.name} for span in finished]
    ).decode()
    assert password not in attributes
    assert email not in attributes
    assert "@" not in attributes
    mail_text = smtp.mails()[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    codes = [word for word in mail_text.split() if len(word) == 9 and word[4] == "-"]
    assert codes
    assert all(code not in attributes for code in codes)


async def test_without_the_sdk_no_span_is_made_and_the_trace_passes_through(
    private_amqp_url: str,
) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_worker(Broker.rabbitmq(private_amqp_url)):
        bus = await Bus.open(private_amqp_url)
        try:
            correlation_id = await bus.publish(
                "account.get",
                {"payload": {"account_id": "acct_" + "0" * 26}},
                headers={"traceparent": parent},
            )
            await bus.reply(correlation_id)
        finally:
            await bus.close()
    assert bus.reply_headers[correlation_id] == {"traceparent": parent}


async def test_a_query_is_its_command_span_alone_and_its_reply_names_it(
    spans: InMemorySpanExporter, private_amqp_url: str
) -> None:
    sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_worker(Broker.rabbitmq(private_amqp_url)):
        bus = await Bus.open(private_amqp_url)
        try:
            correlation_id = await bus.publish(
                "account.get",
                {"payload": {"account_id": "acct_" + "0" * 26}},
                headers={"traceparent": sampled},
            )
            await bus.reply(correlation_id)
        finally:
            await bus.close()
    (command,) = spans.get_finished_spans()
    assert command.name == "account.get process"
    assert f"{_parent_of(command):016x}" == sampled.split("-")[2]
    assert command.attributes is not None
    assert command.attributes["identity.outcome"] == "not_found"
    assert bus.reply_headers[correlation_id] == {"traceparent": traceparent(command)}


async def test_a_trace_the_caller_left_out_makes_no_span_and_passes_through(
    spans: InMemorySpanExporter, private_amqp_url: str
) -> None:
    unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    async with running_worker(Broker.rabbitmq(private_amqp_url)):
        bus = await Bus.open(private_amqp_url)
        try:
            correlation_id = await bus.publish(
                "account.get",
                {"payload": {"account_id": "acct_" + "0" * 26}},
                headers={"traceparent": unsampled},
            )
            await bus.reply(correlation_id)
        finally:
            await bus.close()
    assert spans.get_finished_spans() == ()
    assert bus.reply_headers[correlation_id] == {"traceparent": unsampled}
