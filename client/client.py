"""`IdentityClient`: typed request/reply over RabbitMQ's direct reply-to.

One channel per client. Before the first publish the client consumes the pseudo-queue
`amq.rabbitmq.reply-to` on that channel in no-ack mode (RabbitMQ refuses a publish with that
`reply_to` otherwise), and matches each reply to its request by `correlation_id`.

A call that gets no reply within `timeout` is published again, up to `retries` times, with a
fresh `correlation_id`/`message_id` but the SAME idempotency key, so the worker treats it as
the same operation. A reply to any attempt of a call completes the call.

Who is who: every command is published with `user_id` = the connection's broker user (the
worker authorises by it; RabbitMQ refuses a `user_id` that is not the connection's own), and,
given `worker_user`, a reply is accepted only if its `user_id` is the worker's broker user
(anything else is a neighbour's forgery: dropped, logged and counted in `dropped_replies`).
The client declares nothing: it checks that `identity.commands` exists with a passive
declare, which needs no permission, so a caller needs write on `identity.commands` and
nothing else of the identity service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import PublishError
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import SecretStr

from brokers import connect_any
from client._wire import (
    MetadataArg,
    ResultT,
    build_request,
    payload_of,
    read_reply,
    read_result,
    validated,
)
from client.errors import NotDeployed, ReplyTimeout, TransportError, Unroutable
from messages import (
    AcceptedResult,
    AccountResult,
    ChangePassword,
    ChangePasswordResult,
    CompleteRecovery,
    ConfirmVerification,
    CreateAccount,
    DeleteAccount,
    DeleteAccountResult,
    DisableAccount,
    DisableAccountResult,
    EnableAccount,
    EndAllSessions,
    EndAllSessionsResult,
    EndSession,
    EndSessionResult,
    GetAccount,
    GetJwks,
    GrantRole,
    JwksResult,
    ListSessions,
    ListSessionsResult,
    RecoveryResult,
    RefreshSession,
    RefreshSessionResult,
    Reply,
    RequestRecovery,
    RequestVerification,
    RevokeRole,
    RevokeSession,
    RevokeSessionResult,
    StartSession,
    StartSessionResult,
    UpdateAccount,
    VerifySession,
    VerifySessionResult,
    spec_of,
)
from messages.models import Model
from messages.topology import COMMANDS_EXCHANGE, CONTENT_TYPE, DIRECT_REPLY_TO
from tls import TlsFiles, amqp_connect_kwargs

log = logging.getLogger(__name__)

# W3C trace context only: the worker reads `traceparent` / `tracestate` and nothing else.
_W3C = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class TracedReply:
    """A reply and the W3C trace context it came with (None when the command carried none):
    the worker answers in the trace of the command (see `IdentityClient.send_traced`)."""

    reply: Reply
    traceparent: str | None
    tracestate: str | None


def _trace_headers() -> dict[str, Any] | None:
    """The `traceparent` (and `tracestate`) of the caller's current OpenTelemetry span, if
    it has one; None otherwise (no SDK, or no span)."""
    carrier: dict[str, Any] = {}
    _W3C.inject(carrier)
    return carrier or None


def _header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    value = (headers or {}).get(name)
    return value if isinstance(value, str) else None


# Secrets may be given as plain strings; the payload models validate them into SecretStr.
SecretArg = str | SecretStr


class IdentityClient:
    """Send commands to the identity worker and get typed results or typed errors.

    Use `async with IdentityClient.connect(url) as client:`, or `async with
    IdentityClient(connection) as client:` on a connection the caller owns.

    `worker_user` is the identity worker's broker user (the user of its IDENTITY_AMQP_URL).
    Give it: a reply is then accepted only if RabbitMQ vouches that the worker published it
    (its `user_id`), and a neighbour on the broker cannot answer in the worker's name. Without
    it, any reply with the right `correlation_id` is taken.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        worker_user: str | None = None,
    ) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self._connection = connection
        self._timeout = timeout
        self._retries = retries
        self._worker_user = worker_user
        self._user_id = connection_user(connection)
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        # Replies dropped because someone other than the worker's user published them.
        self.dropped_replies = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        amqp_url: str,
        *,
        # The client's per-reply wait, not a deadline on this call.
        timeout: float = 10.0,  # noqa: ASYNC109
        retries: int = 2,
        worker_user: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
    ) -> AsyncIterator[IdentityClient]:
        """Open a robust connection, yield a ready client, close both on exit.

        An `amqps://` URL verifies the broker's certificate and host name: against `ca_file`
        (PEM) when given, else the system's trust store; or with `ssl_context`, as built (a
        client certificate loaded, say). Either with an `amqp://` URL is a ValueError: TLS
        would silently not happen. `amqp_url` may name the nodes of one cluster, separated by
        commas: the connection moves to the next node when it loses one (brokers.connect_any)."""
        tls = amqp_connect_kwargs(amqp_url, TlsFiles(ca_file=ca_file), context=ssl_context)
        connection = await connect_any(amqp_url, **tls)
        try:
            async with cls(
                connection, timeout=timeout, retries=retries, worker_user=worker_user
            ) as client:
                yield client
        finally:
            await connection.close()

    async def __aenter__(self) -> IdentityClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        # An unroutable command (no worker queue bound yet) must fail the call now rather
        # than wait for a reply that cannot come.
        channel = await self._connection.channel(on_return_raises=True)
        # Passive: the exchange is the worker's (or the deployment's definitions'), and a
        # caller has no permission to declare, let alone delete, it.
        try:
            self._exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            await channel.close()
            raise NotDeployed(COMMANDS_EXCHANGE) from None
        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(self._on_reply, no_ack=True)
        self._channel = channel

    async def close(self) -> None:
        channel, self._channel, self._exchange = self._channel, None, None
        for future in self._pending.values():
            # A caller still waiting gets an error of its own, not a CancelledError it
            # never asked for.
            if not future.done():
                future.set_exception(RuntimeError("the client was closed before the reply"))
        self._pending.clear()
        if channel is not None:
            await channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if self._worker_user is not None and message.user_id != self._worker_user:
            self.dropped_replies += 1
            log.warning(
                "dropped a reply the identity worker did not publish",
                extra={"user_id": message.user_id, "correlation_id": message.correlation_id},
            )
            return
        future = self._pending.get(message.correlation_id or "")
        # A second reply (to an earlier attempt) or one for a closed client is dropped.
        if future is not None and not future.done():
            future.set_result(message)

    async def send(
        self,
        command: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> Reply:
        """Send any command; return its `ok: true` reply or raise its typed `ErrorReply`.

        Raises `InvalidRequest` before sending when the payload or the idempotency key
        breaks the contract; a `TransportError` when the broker returned the command
        (`Unroutable`) or no attempt got a reply (`ReplyTimeout`).
        """
        return await self._send(payload_of(command, payload), idempotency_key, metadata)

    async def send_traced(
        self,
        command: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> TracedReply:
        """`send`, and the trace context of the reply. Every command carries the caller's
        current OpenTelemetry span as `traceparent` when there is one; the reply comes back
        in the same trace (the worker's own span, when it records spans)."""
        body, key = build_request(payload_of(command, payload), idempotency_key, metadata)
        message = await self._request(command, body, key)
        reply = read_reply(message.body)
        return TracedReply(
            reply, _header(message.headers, "traceparent"), _header(message.headers, "tracestate")
        )

    async def _send(
        self, payload: Model, idempotency_key: str | None, metadata: MetadataArg
    ) -> Reply:
        body, key = build_request(payload, idempotency_key, metadata)
        return read_reply((await self._request(spec_of(type(payload)).name, body, key)).body)

    async def _request(self, command: str, body: bytes, key: str | None) -> AbstractIncomingMessage:
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        correlation_ids: list[str] = []
        try:
            for _ in range(self._retries + 1):
                correlation_id = uuid.uuid4().hex
                correlation_ids.append(correlation_id)
                self._pending[correlation_id] = future
                await self._publish(command, body, correlation_id)
                try:
                    # Shielded: a timed-out wait must not cancel the future that a reply
                    # to this attempt may still complete during the next one.
                    return await asyncio.wait_for(asyncio.shield(future), self._timeout)
                except TimeoutError:
                    continue
            raise ReplyTimeout(command, key, len(correlation_ids))
        finally:
            for correlation_id in correlation_ids:
                self._pending.pop(correlation_id, None)

    async def _publish(self, command: str, body: bytes, correlation_id: str) -> None:
        if self._exchange is None:
            raise RuntimeError("the client is not open: use `async with`")
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            reply_to=DIRECT_REPLY_TO,
            user_id=self._user_id,
            headers=_trace_headers(),
        )
        try:
            await self._exchange.publish(message, routing_key=command, mandatory=True)
        except PublishError as exc:
            raise Unroutable(command) from exc

    async def _call(
        self,
        result_type: type[ResultT],
        payload: Model,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> ResultT:
        return read_result(await self._send(payload, idempotency_key, metadata), result_type)

    async def create_account(
        self,
        email: str,
        password: SecretArg,
        display_name: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        payload = validated(
            CreateAccount, {"email": email, "password": password, "display_name": display_name}
        )
        return await self._call(AccountResult, payload, idempotency_key, metadata)

    async def get_account(self, account_id: str, *, metadata: MetadataArg = None) -> AccountResult:
        payload = validated(GetAccount, {"account_id": account_id})
        return await self._call(AccountResult, payload, None, metadata)

    async def update_account(
        self,
        account_id: str,
        expected_version: int,
        *,
        email: str | None = None,
        display_name: str | None = None,
        current_password: SecretArg | None = None,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        payload = validated(
            UpdateAccount,
            {
                "account_id": account_id,
                "expected_version": expected_version,
                "email": email,
                "display_name": display_name,
                "current_password": current_password,
            },
        )
        return await self._call(AccountResult, payload, idempotency_key, metadata)

    async def change_password(
        self,
        account_id: str,
        current_password: SecretArg,
        new_password: SecretArg,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> ChangePasswordResult:
        payload = validated(
            ChangePassword,
            {
                "account_id": account_id,
                "current_password": current_password,
                "new_password": new_password,
            },
        )
        return await self._call(ChangePasswordResult, payload, idempotency_key, metadata)

    async def start_session(
        self,
        email: str,
        password: SecretArg,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> StartSessionResult:
        payload = validated(StartSession, {"email": email, "password": password})
        return await self._call(StartSessionResult, payload, idempotency_key, metadata)

    async def verify_session(
        self, token: SecretArg, *, metadata: MetadataArg = None
    ) -> VerifySessionResult:
        payload = validated(VerifySession, {"token": token})
        return await self._call(VerifySessionResult, payload, None, metadata)

    async def end_session(
        self,
        token: SecretArg,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> EndSessionResult:
        payload = validated(EndSession, {"token": token})
        return await self._call(EndSessionResult, payload, idempotency_key, metadata)

    async def end_all_sessions(
        self,
        account_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> EndAllSessionsResult:
        """Sign the account out everywhere. A caller granted this `@self` shows a session
        token of the account: `metadata={"actor_token": token}` (so for get_account and
        update_account)."""
        payload = validated(EndAllSessions, {"account_id": account_id})
        return await self._call(EndAllSessionsResult, payload, idempotency_key, metadata)

    async def disable_account(
        self,
        account_id: str,
        reason: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> DisableAccountResult:
        """Stop the account now: its live sessions end, sign-in answers `account_disabled`."""
        payload = validated(DisableAccount, {"account_id": account_id, "reason": reason})
        return await self._call(DisableAccountResult, payload, idempotency_key, metadata)

    async def enable_account(
        self,
        account_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        payload = validated(EnableAccount, {"account_id": account_id})
        return await self._call(AccountResult, payload, idempotency_key, metadata)

    async def delete_account(
        self,
        account_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> DeleteAccountResult:
        """Erase the account (irreversible): see the contract's "Erasure"."""
        payload = validated(DeleteAccount, {"account_id": account_id})
        return await self._call(DeleteAccountResult, payload, idempotency_key, metadata)

    async def list_sessions(
        self,
        account_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        metadata: MetadataArg = None,
    ) -> ListSessionsResult:
        """One page of the account's live sessions; pass `next_cursor` back for the next."""
        fields: dict[str, Any] = {"account_id": account_id, "cursor": cursor}
        if limit is not None:
            fields["limit"] = limit
        payload = validated(ListSessions, fields)
        return await self._call(ListSessionsResult, payload, None, metadata)

    async def revoke_session(
        self,
        session_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> RevokeSessionResult:
        payload = validated(RevokeSession, {"session_id": session_id})
        return await self._call(RevokeSessionResult, payload, idempotency_key, metadata)

    # -- recovery and verification (contract v2) --------------------------------------------

    async def request_recovery(
        self,
        email: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AcceptedResult:
        """Ask for a recovery code to be mailed. Always accepted: whether the email has an
        account is not told, here or anywhere."""
        payload = validated(RequestRecovery, {"email": email})
        return await self._call(AcceptedResult, payload, idempotency_key, metadata)

    async def complete_recovery(
        self,
        email: str,
        code: SecretArg,
        new_password: SecretArg,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> RecoveryResult:
        """Set a new password with the mailed code; every live session of the account ends.
        Raises `InvalidCode` (wrong, expired, used, voided, unknown email), `RateLimited`,
        `ValidationFailed` (the new password)."""
        payload = validated(
            CompleteRecovery, {"email": email, "code": code, "new_password": new_password}
        )
        return await self._call(RecoveryResult, payload, idempotency_key, metadata)

    async def request_verification(
        self,
        account_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AcceptedResult:
        """Mail a new verification code to the account's address (`NotFound` if no such
        account)."""
        payload = validated(RequestVerification, {"account_id": account_id})
        return await self._call(AcceptedResult, payload, idempotency_key, metadata)

    async def confirm_verification(
        self,
        email: str,
        code: SecretArg,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        """Prove the address with the mailed code (`InvalidCode`, `RateLimited`)."""
        payload = validated(ConfirmVerification, {"email": email, "code": code})
        return await self._call(AccountResult, payload, idempotency_key, metadata)

    async def refresh_session(
        self,
        refresh_token: SecretArg,
        *,
        idempotency_key: str | None = None,
        attempts: int = 3,
        metadata: MetadataArg = None,
    ) -> RefreshSessionResult:
        """New access and refresh tokens for `refresh_token`, which is used up.

        Every attempt (the client's own re-publishes, and up to `attempts` calls after a
        `TransportError`) goes under ONE idempotency key: a retry of a refresh whose reply was
        lost gets that reply again. Under a fresh key it would present a used-up token,
        which the worker takes for theft and answers by ending the session. After the last
        attempt the `ReplyTimeout` carries the key (`.idempotency_key`): pass it back in to
        try again later.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        key = idempotency_key or str(uuid.uuid4())
        payload = validated(RefreshSession, {"refresh_token": refresh_token})
        for attempt in range(1, attempts + 1):
            try:
                return await self._call(RefreshSessionResult, payload, key, metadata)
            except TransportError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get_jwks(self) -> JwksResult:
        """The public keys access tokens are signed with (`keys.jwks`)."""
        return await self._call(JwksResult, GetJwks())

    async def grant_role(
        self,
        account_id: str,
        role: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        payload = validated(GrantRole, {"account_id": account_id, "role": role})
        return await self._call(AccountResult, payload, idempotency_key, metadata)

    async def revoke_role(
        self,
        account_id: str,
        role: str,
        *,
        idempotency_key: str | None = None,
        metadata: MetadataArg = None,
    ) -> AccountResult:
        payload = validated(RevokeRole, {"account_id": account_id, "role": role})
        return await self._call(AccountResult, payload, idempotency_key, metadata)


def connection_user(connection: AbstractConnection) -> str | None:
    """The broker user `connection` logged in as (aio-pika's default, guest, when its URL
    names none); None when it cannot tell (a connection without a URL)."""
    url = getattr(connection, "url", None)
    if url is None:
        return None
    user = getattr(url, "user", None)
    return str(user) if user else "guest"
