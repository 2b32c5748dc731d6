"""The client library without a broker: a fake channel records what would be published and
answers like a worker would (or stays silent, to exercise timeouts and retries)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from pydantic import SecretStr

import client
from client import IdentityClient, ReplyTimeout, error_for
from client.subscriber import _consume, _SeenIds
from messages import COMMANDS, ErrorBody, ErrorCode, FieldError
from messages.topology import COMMANDS_EXCHANGE, CONTENT_TYPE, DIRECT_REPLY_TO
from tests.support.eventually import eventually

ACCOUNT_ID = "acct_" + "a" * 26
SESSION_ID = "ses_" + "b" * 32
NOW = "2026-11-22T09:00:00.000000+00:00"
ACCOUNT = {
    "id": ACCOUNT_ID,
    "email": "ada@example.com",
    "display_name": "Ada",
    "created_at": NOW,
    "updated_at": NOW,
    "version": 1,
}
SESSION = {"id": SESSION_ID, "account_id": ACCOUNT_ID, "created_at": NOW, "expires_at": NOW}
RESULTS: dict[str, dict[str, Any]] = {
    "account.create": {"account": ACCOUNT},
    "account.get": {"account": ACCOUNT},
    "account.update": {"account": ACCOUNT},
    "account.change_password": {"account": ACCOUNT, "sessions_ended": 2},
    "session.start": {
        "session": SESSION,
        "token": "tok-123",
        "account": ACCOUNT,
        "access_token": "eyJ.access",
        "access_token_expires_at": NOW,
        "refresh_token": "r1.refresh",
    },
    "session.verify": {"session": SESSION, "account": ACCOUNT},
    "session.end": {"session_id": SESSION_ID},
    "session.end_all": {"account_id": ACCOUNT_ID, "sessions_ended": 3},
    "account.recovery.request": {"accepted": True},
    "account.recovery.complete": {"account": ACCOUNT, "sessions_ended": 2},
    "account.verification.request": {"accepted": True},
    "account.verification.confirm": {"account": ACCOUNT},
    "account.disable": {"account": ACCOUNT | {"status": "disabled"}, "sessions_ended": 2},
    "account.enable": {"account": ACCOUNT},
    "account.delete": {"account_id": ACCOUNT_ID, "sessions_ended": 1},
    "session.list": {
        "sessions": [SESSION | {"last_seen_at": NOW, "client_ip": None, "user_agent": "web/4.2"}],
        "next_cursor": None,
    },
    "session.revoke": {"session_id": SESSION_ID, "account_id": ACCOUNT_ID},
    "session.refresh": {
        "session": SESSION,
        "access_token": "eyJ.access-2",
        "access_token_expires_at": NOW,
        "refresh_token": "r1.refresh-2",
    },
    "keys.jwks": {
        "keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "j1", "use": "sig", "alg": "EdDSA"}
        ]
    },
    "account.grant_role": {"account": ACCOUNT | {"roles": ["admin"]}},
    "account.revoke_role": {"account": ACCOUNT},
}
# One valid call per command, through the typed method.
CALLS: dict[str, Callable[[IdentityClient], Any]] = {
    "account.create": lambda c: c.create_account("ada@example.com", "s3cret-pw", "Ada"),
    "account.get": lambda c: c.get_account(ACCOUNT_ID),
    "account.update": lambda c: c.update_account(ACCOUNT_ID, 1, display_name="Ada L."),
    "account.change_password": lambda c: c.change_password(ACCOUNT_ID, "old-pw", "new-pw"),
    "session.start": lambda c: c.start_session("ada@example.com", "s3cret-pw"),
    "session.verify": lambda c: c.verify_session("tok-123"),
    "session.end": lambda c: c.end_session("tok-123"),
    "session.end_all": lambda c: c.end_all_sessions(ACCOUNT_ID),
    "account.recovery.request": lambda c: c.request_recovery("ada@example.com"),
    "account.recovery.complete": lambda c: c.complete_recovery(
        "ada@example.com", "ABCD-EFGH", "new-pw"
    ),
    "account.verification.request": lambda c: c.request_verification(ACCOUNT_ID),
    "account.verification.confirm": lambda c: c.confirm_verification("ada@example.com", "ABCD"),
    "account.disable": lambda c: c.disable_account(ACCOUNT_ID, "abuse report 42"),
    "account.enable": lambda c: c.enable_account(ACCOUNT_ID),
    "account.delete": lambda c: c.delete_account(ACCOUNT_ID),
    "session.list": lambda c: c.list_sessions(ACCOUNT_ID, limit=10),
    "session.revoke": lambda c: c.revoke_session(SESSION_ID),
    "session.refresh": lambda c: c.refresh_session("r1.refresh"),
    "keys.jwks": lambda c: c.get_jwks(),
    "account.grant_role": lambda c: c.grant_role(ACCOUNT_ID, "admin"),
    "account.revoke_role": lambda c: c.revoke_role(ACCOUNT_ID, "admin"),
}

Responder = Callable[[str, dict[str, Any], int], "dict[str, Any] | None"]


def ok(command: str, body: dict[str, Any], attempt: int) -> dict[str, Any] | None:
    key = body.get("idempotency_key")
    return {"ok": True, "command": command, "idempotency_key": key, "result": RESULTS[command]}


def silent(command: str, body: dict[str, Any], attempt: int) -> dict[str, Any] | None:
    return None


def returned(command: str, body: dict[str, Any], attempt: int) -> dict[str, Any] | None:
    """What a mandatory publish that no queue is bound for raises: the broker returned it."""
    back = Basic.Return(312, "NO_ROUTE", COMMANDS_EXCHANGE, command)
    delivered = DeliveredMessage(back, ContentHeader(), b"", None)  # type: ignore[arg-type]
    raise PublishError(delivered, back)


def refusing(command: str, body: dict[str, Any], attempt: int) -> dict[str, Any] | None:
    error = {"code": "not_found", "message": "No such account."}
    return {"ok": False, "command": command, "idempotency_key": None, "error": error}


@dataclass
class Published:
    routing_key: str
    message: aio_pika.Message
    mandatory: bool

    @property
    def body(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.message.body)
        return result


@dataclass
class Incoming:
    body: bytes
    correlation_id: str | None
    user_id: str | None = "identity-worker"


@dataclass
class FakeChannel:
    """Stands in for an aio-pika channel: records publishes, answers through the reply
    consumer like RabbitMQ's direct reply-to would."""

    responder: Responder
    reply_delay: float = 0.0
    published: list[Published] = field(default_factory=list)
    checked: list[tuple[str, bool]] = field(default_factory=list)
    reply_consumer: Any = None
    closed: bool = False
    deliveries: set[asyncio.Task[None]] = field(default_factory=set)
    # Who the replies come from (the broker's user_id on them).
    replier: str | None = "identity-worker"

    async def get_exchange(self, name: str, *, ensure: bool = True) -> FakeChannel:
        self.checked.append((name, ensure))
        return self

    async def get_queue(self, name: str, *, ensure: bool = True) -> FakeChannel:
        assert name == DIRECT_REPLY_TO
        return self

    async def consume(self, callback: Any, *, no_ack: bool) -> str:
        assert no_ack, "direct reply-to must be consumed in no-ack mode"
        self.reply_consumer = callback
        return "ctag"

    async def publish(self, message: aio_pika.Message, routing_key: str, *, mandatory: bool):
        # RabbitMQ refuses a direct reply-to publish when nobody consumes the pseudo-queue.
        assert self.reply_consumer is not None, "consume amq.rabbitmq.reply-to first"
        self.published.append(Published(routing_key, message, mandatory))
        reply = self.responder(routing_key, orjson.loads(message.body), len(self.published))
        if reply is not None:
            asyncio.get_running_loop().call_later(
                self.reply_delay, self._deliver, orjson.dumps(reply), message.correlation_id
            )

    def _deliver(self, body: bytes, correlation_id: str | None) -> None:
        incoming = Incoming(body, correlation_id, self.replier)
        task = asyncio.ensure_future(self.reply_consumer(incoming))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeUrl:
    user: str | None


@dataclass
class FakeConnection:
    channel_: FakeChannel
    on_return_raises: bool = False
    url: FakeUrl = field(default_factory=lambda: FakeUrl("web"))

    async def channel(self, *, on_return_raises: bool = False) -> FakeChannel:
        self.on_return_raises = on_return_raises
        return self.channel_


def make_client(
    responder: Responder = ok,
    *,
    timeout: float = 1.0,
    retries: int = 2,
    reply_delay: float = 0,
    worker_user: str | None = None,
) -> tuple[IdentityClient, FakeChannel]:
    channel = FakeChannel(responder, reply_delay=reply_delay)
    api = IdentityClient(
        FakeConnection(channel),  # type: ignore[arg-type]
        timeout=timeout,
        retries=retries,
        worker_user=worker_user,
    )
    return api, channel


def is_uuid4(value: object) -> bool:
    return isinstance(value, str) and uuid.UUID(value).version == 4


async def test_opening_only_checks_the_command_exchange_and_asks_for_returns() -> None:
    api, channel = make_client()
    async with api:
        # A passive declare: a caller may not declare (or delete) the worker's exchange.
        assert channel.checked == [(COMMANDS_EXCHANGE, True)]
        assert api._connection.on_return_raises is True  # type: ignore[attr-defined]
    assert channel.closed


async def test_every_command_carries_the_connections_user_id() -> None:
    api, channel = make_client()
    async with api:
        await api.get_account(ACCOUNT_ID)
        await api.send("session.verify", {"token": "tok-123"})
    assert [p.message.user_id for p in channel.published] == ["web", "web"]


async def test_the_actor_token_is_sent_to_the_worker_in_clear() -> None:
    api, channel = make_client()
    async with api:
        await api.get_account(ACCOUNT_ID, metadata={"actor_token": "tok-123"})
        await api.end_all_sessions(ACCOUNT_ID, metadata={"actor_token": SecretStr("tok-456")})
    sent = [p.body["metadata"] for p in channel.published]
    assert sent == [{"actor_token": "tok-123"}, {"actor_token": "tok-456"}]


async def test_with_worker_user_a_reply_from_anyone_else_is_dropped() -> None:
    api, channel = make_client(timeout=0.05, retries=1, worker_user="identity-worker")
    channel.replier = "mallory"
    async with api:
        with pytest.raises(ReplyTimeout):
            await api.verify_session("tok-123")
    assert api.dropped_replies == 2  # one forgery per attempt, none taken


async def test_with_worker_user_the_workers_reply_is_taken() -> None:
    api, _ = make_client(worker_user="identity-worker")
    async with api:
        result = await api.get_account(ACCOUNT_ID)
    assert result.account.id == ACCOUNT_ID
    assert api.dropped_replies == 0


async def test_without_worker_user_any_reply_is_taken() -> None:
    api, channel = make_client()
    channel.replier = None
    async with api:
        assert (await api.get_account(ACCOUNT_ID)).account.id == ACCOUNT_ID


async def test_a_command_is_published_persistent_json_with_direct_reply_to() -> None:
    api, channel = make_client()
    async with api:
        result = await api.create_account(
            "ada@example.com", "s3cret-pw", "Ada", metadata={"client_ip": "203.0.113.7"}
        )
    assert result.account.id == ACCOUNT_ID
    (sent,) = channel.published
    assert sent.routing_key == "account.create"
    assert sent.mandatory is True
    assert sent.message.content_type == CONTENT_TYPE
    assert sent.message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert sent.message.reply_to == DIRECT_REPLY_TO
    assert sent.message.correlation_id
    assert sent.message.message_id
    assert sent.body["payload"] == {
        "email": "ada@example.com",
        "password": "s3cret-pw",
        "display_name": "Ada",
    }
    assert sent.body["metadata"] == {"client_ip": "203.0.113.7"}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_account("not-an-account-id"),
        lambda c: c.create_account("ada@example.com", "", "Ada"),
        lambda c: c.create_account("ada@example.com", "pw", " padded "),
        lambda c: c.update_account(ACCOUNT_ID, 1),
        lambda c: c.update_account(ACCOUNT_ID, 0, display_name="Ada"),
        lambda c: c.send("account.get", {"account_id": ACCOUNT_ID, "extra": 1}),
        lambda c: c.end_all_sessions(ACCOUNT_ID, idempotency_key="nul\x00key"),
        lambda c: c.end_all_sessions(ACCOUNT_ID, idempotency_key="k" * 201),
        lambda c: c.disable_account(ACCOUNT_ID, "r" * 201),
        lambda c: c.disable_account(ACCOUNT_ID, ""),
        lambda c: c.list_sessions(ACCOUNT_ID, limit=201),
        lambda c: c.list_sessions(ACCOUNT_ID, limit=0),
        lambda c: c.list_sessions(ACCOUNT_ID, cursor="not a cursor!"),
        lambda c: c.revoke_session("ses_short"),
    ],
)
async def test_an_invalid_payload_fails_locally_before_anything_is_sent(call: Any) -> None:
    api, channel = make_client()
    async with api:
        with pytest.raises(client.InvalidRequest) as raised:
            await call(api)
    assert channel.published == []
    assert raised.value.fields
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.create_account("ada@example.com", "hunter2-" + "x" * 2000, "Ada"),
        lambda c: c.create_account("ada@example.com", "hunter2-pw", None),
        lambda c: c.change_password("nope", "hunter2-old", "hunter2-new"),
        lambda c: c.send("session.start", {"password": "hunter2-pw"}),
        lambda c: c.verify_session(SecretStr("hunter2-" + "t" * 600)),
        lambda c: c.start_session("x", "hunter2-pw", metadata={"actor_token": 1, "z": "hunter2"}),
    ],
)
async def test_a_local_validation_error_never_shows_the_secret_it_refused(call: Any) -> None:
    api, _ = make_client()
    async with api:
        with pytest.raises(client.InvalidRequest) as raised:
            await call(api)
    error = raised.value
    assert "hunter2" not in str(error)
    assert "hunter2" not in repr(error)
    # pydantic's error, which quotes the input, is neither the cause nor the context.
    assert error.__cause__ is None
    assert error.__context__ is None


async def test_an_unknown_command_is_refused_locally() -> None:
    api, channel = make_client()
    async with api:
        with pytest.raises(ValueError, match="unknown command"):
            await api.send("account.erase", {"account_id": ACCOUNT_ID})
    assert channel.published == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_each_typed_method_sends_its_command_and_returns_its_result_model(
    command: str,
) -> None:
    api, channel = make_client()
    async with api:
        result = await CALLS[command](api)
    assert type(result) is COMMANDS[command].result
    assert [p.routing_key for p in channel.published] == [command]


@pytest.mark.parametrize("command", sorted(n for n, s in COMMANDS.items() if s.changes_state))
async def test_state_changing_commands_get_a_fresh_idempotency_key(command: str) -> None:
    api, channel = make_client()
    async with api:
        await CALLS[command](api)
        await CALLS[command](api)
    first, second = (p.body["idempotency_key"] for p in channel.published)
    assert is_uuid4(first)
    assert is_uuid4(second)
    assert first != second


@pytest.mark.parametrize("command", sorted(n for n, s in COMMANDS.items() if not s.changes_state))
async def test_queries_need_no_idempotency_key(command: str) -> None:
    api, channel = make_client()
    async with api:
        await CALLS[command](api)
    assert "idempotency_key" not in channel.published[0].body


async def test_a_given_idempotency_key_is_sent_as_is() -> None:
    api, channel = make_client()
    async with api:
        await api.end_all_sessions(ACCOUNT_ID, idempotency_key="signout-42")
        await api.send("session.verify", {"token": "tok-123"}, idempotency_key="q-1")
    assert [p.body["idempotency_key"] for p in channel.published] == ["signout-42", "q-1"]


async def test_list_sessions_sends_only_what_it_was_given() -> None:
    api, channel = make_client()
    async with api:
        await api.list_sessions(ACCOUNT_ID)
        await api.list_sessions(ACCOUNT_ID, limit=5, cursor="abc_-1")
    first, second = (p.body["payload"] for p in channel.published)
    assert first == {"account_id": ACCOUNT_ID, "limit": 50}
    assert second == {"account_id": ACCOUNT_ID, "limit": 5, "cursor": "abc_-1"}


async def test_update_omits_the_fields_it_does_not_change() -> None:
    api, channel = make_client()
    async with api:
        await api.update_account(ACCOUNT_ID, 3, display_name="Ada L.")
    assert channel.published[0].body["payload"] == {
        "account_id": ACCOUNT_ID,
        "expected_version": 3,
        "display_name": "Ada L.",
    }


async def test_a_retry_after_a_timeout_reuses_the_key_with_fresh_message_ids() -> None:
    def second_attempt_only(command: str, body: dict[str, Any], attempt: int) -> Any:
        return ok(command, body, attempt) if attempt == 2 else None

    api, channel = make_client(second_attempt_only, timeout=0.05, retries=2)
    async with api:
        await api.change_password(ACCOUNT_ID, "old-pw", "new-pw")
    first, second = channel.published
    assert first.message.body == second.message.body
    assert is_uuid4(first.body["idempotency_key"])
    assert first.message.correlation_id != second.message.correlation_id
    assert first.message.message_id != second.message.message_id


async def test_no_reply_at_all_raises_reply_timeout_after_every_attempt() -> None:
    api, channel = make_client(silent, timeout=0.02, retries=2)
    async with api:
        with pytest.raises(ReplyTimeout) as raised:
            await api.end_session("tok-123", idempotency_key="end-1")
    assert raised.value.attempts == 3
    assert raised.value.idempotency_key == "end-1"
    assert len(channel.published) == 3
    assert {p.body["idempotency_key"] for p in channel.published} == {"end-1"}
    assert api._pending == {}


async def test_a_late_reply_to_an_earlier_attempt_completes_the_call() -> None:
    def first_attempt_only(command: str, body: dict[str, Any], attempt: int) -> Any:
        return ok(command, body, attempt) if attempt == 1 else None

    api, channel = make_client(first_attempt_only, timeout=0.05, retries=3, reply_delay=0.07)
    async with api:
        result = await api.end_all_sessions(ACCOUNT_ID)
    assert result.sessions_ended == 3
    assert len(channel.published) == 2


async def test_the_session_token_comes_back_as_a_secret() -> None:
    api, _ = make_client()
    async with api:
        result = await api.start_session("ada@example.com", SecretStr("s3cret-pw"))
    assert isinstance(result.token, SecretStr)
    assert result.token.get_secret_value() == "tok-123"
    assert "tok-123" not in repr(result)
    assert result.access_token.get_secret_value() == "eyJ.access"
    assert result.refresh_token.get_secret_value() == "r1.refresh"
    assert "eyJ.access" not in repr(result)
    assert "r1.refresh" not in repr(result)


async def test_a_refresh_keeps_one_idempotency_key_across_calls_that_got_no_reply() -> None:
    """A refresh retried under a fresh key would present a used-up refresh token, which the
    worker takes for theft: every attempt goes under the first attempt's key."""

    def answers_the_fifth(command: str, body: dict[str, Any], attempt: int) -> Any:
        return ok(command, body, attempt) if attempt == 5 else None

    api, channel = make_client(answers_the_fifth, timeout=0.02, retries=1)
    async with api:
        result = await api.refresh_session("r1.refresh", attempts=3)
    assert result.refresh_token.get_secret_value() == "r1.refresh-2"
    assert len(channel.published) == 5
    keys = {p.body["idempotency_key"] for p in channel.published}
    assert len(keys) == 1
    assert is_uuid4(keys.pop())

    api, channel = make_client(silent, timeout=0.02, retries=0)
    async with api:
        with pytest.raises(ReplyTimeout) as raised:
            await api.refresh_session("r1.refresh", attempts=2, idempotency_key="refresh-1")
    assert raised.value.idempotency_key == "refresh-1"
    assert [p.body["idempotency_key"] for p in channel.published] == ["refresh-1"] * 2


async def test_sending_on_a_client_that_is_not_open_is_an_error() -> None:
    api, channel = make_client()
    with pytest.raises(RuntimeError, match="not open"):
        await api.get_account(ACCOUNT_ID)
    assert channel.published == []


async def test_closing_the_client_fails_a_call_still_waiting() -> None:
    api, channel = make_client(silent, timeout=5.0)
    await api.open()
    call = asyncio.ensure_future(api.get_account(ACCOUNT_ID))
    await eventually(lambda: channel.published, timeout=10, what="the command sent")
    await api.close()
    with pytest.raises(RuntimeError, match="closed before the reply"):
        await call


EXPECTED_ERRORS = {
    ErrorCode.MALFORMED_MESSAGE: client.MalformedMessage,
    ErrorCode.UNKNOWN_COMMAND: client.UnknownCommand,
    ErrorCode.VALIDATION_FAILED: client.ValidationFailed,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: client.IdempotencyKeyReused,
    ErrorCode.EMAIL_TAKEN: client.EmailTaken,
    ErrorCode.INVALID_CREDENTIALS: client.InvalidCredentials,
    ErrorCode.RATE_LIMITED: client.RateLimited,
    ErrorCode.INVALID_TOKEN: client.InvalidToken,
    ErrorCode.SESSION_EXPIRED: client.SessionExpired,
    ErrorCode.NOT_FOUND: client.NotFound,
    ErrorCode.VERSION_CONFLICT: client.VersionConflict,
    ErrorCode.INTERNAL_ERROR: client.InternalError,
    ErrorCode.FORBIDDEN: client.Forbidden,
    ErrorCode.INVALID_CODE: client.InvalidCode,
    ErrorCode.EMAIL_NOT_VERIFIED: client.EmailNotVerified,
    ErrorCode.ACCOUNT_DISABLED: client.AccountDisabled,
}


def test_every_error_code_has_its_own_error_class() -> None:
    assert set(EXPECTED_ERRORS) == set(ErrorCode)
    assert len(set(EXPECTED_ERRORS.values())) == len(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
async def test_an_error_reply_raises_the_error_of_its_code(code: ErrorCode) -> None:
    error = {"code": code.value, "message": "Nope."}

    def failing(command: str, body: dict[str, Any], attempt: int) -> dict[str, Any]:
        return {"ok": False, "command": command, "idempotency_key": None, "error": error}

    api, _ = make_client(failing)
    async with api:
        with pytest.raises(client.ErrorReply) as raised:
            await api.get_account(ACCOUNT_ID)
    assert type(raised.value) is EXPECTED_ERRORS[code]
    assert raised.value.code is code
    assert raised.value.message == "Nope."


def test_errors_come_in_two_families_under_one_base() -> None:
    replies = set(EXPECTED_ERRORS.values())
    transport = {client.ReplyTimeout, client.Unroutable, client.NotDeployed}
    for cls in replies | transport:
        assert issubclass(cls, client.IdentityClientError), cls
    for cls in replies:
        assert issubclass(cls, client.ErrorReply), cls
        assert not issubclass(cls, client.TransportError), cls
    for cls in transport:
        assert issubclass(cls, client.TransportError), cls
        assert not issubclass(cls, client.ErrorReply), cls


@pytest.mark.parametrize(
    ("responder", "family", "raised"),
    [
        (refusing, "error reply", client.NotFound),
        (silent, "transport", client.ReplyTimeout),
        (returned, "transport", client.Unroutable),
    ],
    ids=["worker-said-no", "no-reply", "no-queue"],
)
async def test_a_caller_tells_the_worker_saying_no_from_the_broker_failing(
    responder: Responder, family: str, raised: type[client.IdentityClientError]
) -> None:
    caught: tuple[str, Exception | None] = ("nothing", None)
    api, _ = make_client(responder, timeout=0.02, retries=0)
    async with api:
        try:
            await api.get_account(ACCOUNT_ID)
        except client.TransportError as exc:
            caught = ("transport", exc)
        except client.ErrorReply as exc:
            caught = ("error reply", exc)
    assert caught[0] == family
    assert type(caught[1]) is raised


async def test_a_transport_error_names_its_command() -> None:
    api, channel = make_client(returned)
    async with api:
        with pytest.raises(client.Unroutable) as raised:
            await api.end_all_sessions(ACCOUNT_ID)
    assert raised.value.command == "session.end_all"
    assert str(raised.value) == "no queue is bound for session.end_all: is the worker running?"
    assert len(channel.published) == 1


def test_error_details_are_kept() -> None:
    limited = error_for(ErrorBody(code=ErrorCode.RATE_LIMITED, message="Slow.", retry_after_s=30))
    invalid = error_for(
        ErrorBody(
            code=ErrorCode.VALIDATION_FAILED,
            message="Bad.",
            fields=[FieldError(field="payload.email", message="not an email")],
        )
    )
    assert isinstance(limited, client.RateLimited)
    assert limited.retry_after_s == 30
    assert [(f.field, f.message) for f in invalid.fields] == [("payload.email", "not an email")]
    assert "payload.email: not an email" in str(invalid)


@dataclass
class FakeDelivery:
    body: bytes
    acked: bool = False
    rejected: bool = False
    channel_closed: bool = False
    user_id: str | None = "identity-worker"
    routing_key: str = "session.ended"

    async def ack(self) -> None:
        if self.channel_closed:
            raise ChannelInvalidStateError("<Channel: 1> closed")
        self.acked = True

    async def reject(self, requeue: bool = False) -> None:
        assert requeue is False
        if self.channel_closed:
            raise ChannelInvalidStateError("<Channel: 1> closed")
        self.rejected = True


class FakeEventQueue:
    def __init__(self, deliveries: list[FakeDelivery]) -> None:
        self.deliveries = deliveries

    def iterator(self) -> FakeEventQueue:
        return self

    async def __aenter__(self) -> FakeEventQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def __aiter__(self) -> Any:
        for delivery in self.deliveries:
            yield delivery


def event_body(n: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"evt_{n:026d}",
            "type": "session.ended",
            "occurred_at": NOW,
            "data": {"session_id": SESSION_ID, "account_id": ACCOUNT_ID, "reason": "sign_out"},
        }
    )


async def test_an_event_is_acked_only_when_the_consumer_asks_for_the_next() -> None:
    first, second = FakeDelivery(event_body(1)), FakeDelivery(event_body(2))
    events = _consume(FakeEventQueue([first, second]), _SeenIds(10))  # type: ignore[arg-type]
    assert (await anext(events)).event_id == f"evt_{1:026d}"
    assert not first.acked
    await anext(events)
    assert first.acked
    assert not second.acked
    await events.aclose()
    assert not second.acked


async def test_repeated_events_are_dropped_and_bad_ones_rejected() -> None:
    deliveries = [
        FakeDelivery(event_body(1)),
        FakeDelivery(b"not json"),
        FakeDelivery(event_body(1)),
        FakeDelivery(event_body(2)),
    ]
    events = _consume(FakeEventQueue(deliveries), _SeenIds(10))  # type: ignore[arg-type]
    seen = [event.event_id async for event in events]
    assert seen == [f"evt_{1:026d}", f"evt_{2:026d}"]
    assert deliveries[1].rejected
    assert deliveries[2].acked


async def test_a_lost_channel_does_not_end_the_subscription() -> None:
    # The robust connection restores the channel; the broker redelivers what was not acked.
    deliveries = [
        FakeDelivery(event_body(1), channel_closed=True),
        FakeDelivery(b"not json", channel_closed=True),
        FakeDelivery(event_body(1)),  # the redelivery, on the restored channel
        FakeDelivery(event_body(2)),
    ]
    events = _consume(FakeEventQueue(deliveries), _SeenIds(10))  # type: ignore[arg-type]
    seen = [event.event_id async for event in events]
    assert seen == [f"evt_{1:026d}", f"evt_{2:026d}"]
    assert deliveries[2].acked  # dropped as a repeat, and acked
    assert deliveries[3].acked


async def test_with_worker_user_a_forged_event_is_acked_and_dropped() -> None:
    forged = FakeDelivery(event_body(1), user_id="mallory")
    unsigned = FakeDelivery(event_body(2), user_id=None)
    real = FakeDelivery(event_body(3))
    queue = FakeEventQueue([forged, unsigned, real])
    events = _consume(queue, _SeenIds(10), "identity-worker")  # type: ignore[arg-type]

    seen = [event.event_id async for event in events]

    assert seen == [f"evt_{3:026d}"]
    assert forged.acked
    assert unsigned.acked  # dropped for good, not left to come back


async def test_without_worker_user_every_event_that_parses_is_yielded() -> None:
    deliveries = [FakeDelivery(event_body(1), user_id="mallory"), FakeDelivery(event_body(2))]
    events = _consume(FakeEventQueue(deliveries), _SeenIds(10))  # type: ignore[arg-type]
    assert len([event async for event in events]) == 2


def test_the_dedupe_window_forgets_the_oldest_id() -> None:
    window = _SeenIds(2)
    for event_id in ("a", "b", "a", "c"):
        window.add(event_id)
    assert "a" in window
    assert "c" in window
    assert "b" not in window
