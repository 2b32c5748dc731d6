"""The composition root: the one place that builds the pool, the broker connection, the hasher,
the clock and the service, and wires them together. Nothing connects at import time; tests call
`build` with their own settings and, where they want them, their own clock, store and broker
connection (the in-memory ones)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from brokers import connect_any
from messages import GetJwks
from services.access_tokens import JwtKey
from services.clock import Clock, SystemClock
from services.codes import CodeKeys, CodePolicy
from services.factory import ServiceConfig, make_identity_service
from services.identity import IdentityService, SessionPolicy
from services.keys import HmacKey
from services.passwords import HashingPool, PasswordPolicy
from services.refresh import TokenPolicy
from services.tokens import SigningKey, parse_signing_keys
from stores import (
    HashBudget,
    IdentityStore,
    SecretStore,
    ServiceStore,
    ThrottleRules,
    ThrottleSchedule,
)
from stores.postgres import PostgresIdentityStore
from tls import refused_certificate
from worker.acks import Acknowledger
from worker.authorise import Authoriser
from worker.broker import DeadLetters, ReplySender
from worker.courier_relay import CourierRelay, CourierRelayMetrics, declare_courier
from worker.forwarder import DeadLetterForwarder
from worker.handlers import handler_table
from worker.metrics import Metrics, create_metrics, observer
from worker.outbox import OutboxRelay
from worker.policy import RetryPolicy
from worker.processor import CommandProcessor
from worker.rates import RateGate
from worker.settings import Settings, SettingsError
from worker.topology import Topology, declare_topology

# How long a failed start waits for each thing it opened to close.
CLOSE_TIMEOUT_S = 2.0

log = logging.getLogger("identity.worker")

DEV_KEY_NAME = "development-signing-key"
DEV_KEY_ID = "dev"
DEV_HMAC_KEY_NAME = "development-hmac-key"
DEV_JWT_KEY_NAME = "development-jwt-key"
DEV_JWT_KEY_ID = "dev-jwt"


@dataclass(kw_only=True)
class Components:
    """Everything `build` made; the Worker owns their lifecycle."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    store: IdentityStore
    passwords: HashingPool
    service: IdentityService
    hmac_key: HmacKey
    connection: AbstractRobustConnection
    fast_channel: AbstractRobustChannel
    password_channel: AbstractRobustChannel
    publish_channel: AbstractRobustChannel
    dead_channel: AbstractRobustChannel
    topology: Topology
    processor: CommandProcessor
    forwarder: DeadLetterForwarder
    relay: OutboxRelay
    courier: CourierRelay
    acks: Acknowledger
    # The JWKS the sidecar publishes: the public halves of the access-token keys.
    jwks: dict[str, Any]


@dataclass(frozen=True, repr=False)
class WorkerKeys:
    signing: list[SigningKey]
    hmac: bytes
    jwt: list[JwtKey]  # access tokens' (Ed25519), the signing one first


async def worker_keys(settings: Settings, store: SecretStore) -> WorkerKeys:
    """The configured keys. In production (settings guarantee they are configured) nothing
    else: no key is ever read from or written to the database. In dev mode, what is not
    configured is generated once and shared through the database, so that several local
    workers accept each other's tokens and agree on fingerprints without configuration."""
    if not settings.dev_mode:
        hmac_key = settings.parsed_hmac_key()
        jwt = settings.parsed_jwt_keys()
        if hmac_key is None or not jwt:  # unreachable: the settings refuse production so
            raise ValueError("production needs IDENTITY_HMAC_KEY and IDENTITY_JWT_KEYS")
        return WorkerKeys(settings.parsed_signing_keys(), hmac_key, jwt)
    signing = settings.parsed_signing_keys()
    if not signing:
        secret = await store.shared_secret(DEV_KEY_NAME, secrets.token_bytes(32))
        encoded = base64.urlsafe_b64encode(secret).decode().rstrip("=")
        signing = parse_signing_keys(f"{DEV_KEY_ID}:{encoded}")
    hmac_key = settings.parsed_hmac_key()
    if hmac_key is None:
        hmac_key = await store.shared_secret(DEV_HMAC_KEY_NAME, secrets.token_bytes(32))
    jwt = settings.parsed_jwt_keys()
    if not jwt:
        seed = await store.shared_secret(DEV_JWT_KEY_NAME, secrets.token_bytes(32))
        jwt = [JwtKey(DEV_JWT_KEY_ID, seed)]
    return WorkerKeys(signing, hmac_key, jwt)


DEV_MODE_WARNING = (
    "IDENTITY_DEV_MODE is true: keys not configured are kept in the database, any broker user"
    " may send any command unless IDENTITY_CALLERS is set, and keys published with the code"
    " are accepted. Never run this in production."
)


# Broker dead letters in flight at once: they are rare, and each is small work.
DEAD_LETTER_PREFETCH = 16

# The hashing threads' nice value: see services.passwords (cheap commands come first).
HASHING_NICENESS = 10


def service_config(settings: Settings) -> ServiceConfig:
    """What the service is built from, as the settings say."""
    return ServiceConfig(
        argon2_time_cost=settings.argon2_time_cost,
        argon2_memory_kib=settings.argon2_memory_kib,
        argon2_parallelism=settings.argon2_parallelism,
        hash_workers=settings.effective_hash_workers,
        passwords=PasswordPolicy(
            min_length=settings.password_min_length,
            max_length=settings.password_max_length,
            max_bytes=settings.password_max_bytes,
        ),
        sessions=SessionPolicy.from_seconds(
            settings.session_lifetime_s,
            settings.session_idle_timeout_s,
            settings.session_touch_interval_s,
            settings.max_sessions_per_account,
        ),
        throttle=throttle_rules(settings),
        budget=HashBudget(
            rate_per_s=settings.source_hash_rate_per_s, burst=settings.source_hash_burst
        ),
        codes=code_policy(settings),
        tokens=TokenPolicy(
            issuer=settings.issuer,
            access_ttl=timedelta(seconds=settings.access_token_ttl_s),
            reuse_grace=timedelta(seconds=settings.refresh_reuse_grace_s),
        ),
    )


def code_policy(settings: Settings) -> CodePolicy:
    return CodePolicy(
        lifetime=timedelta(seconds=settings.code_lifetime_s),
        max_attempts=settings.code_max_attempts,
        window=timedelta(seconds=settings.code_throttle_window_s),
        requests_per_email=settings.code_requests_per_email,
        requests_per_source=settings.code_requests_per_source,
        attempts_per_email=settings.code_attempts_per_email,
        attempts_per_source=settings.code_attempts_per_source,
        send_verification_on_create=settings.send_verification_on_create,
        require_verified_email=settings.require_verified_email,
    )


def throttle_rules(settings: Settings) -> ThrottleRules:
    def schedule(free_failures: int) -> ThrottleSchedule:
        return ThrottleSchedule(
            free_failures=free_failures,
            base_delay_s=settings.throttle_base_delay_s,
            max_delay_s=settings.throttle_max_delay_s,
            reset_after_s=settings.throttle_reset_after_s,
        )

    return ThrottleRules(
        pair=schedule(settings.throttle_free_failures),
        email=schedule(settings.throttle_email_free_failures),
        known_source_s=settings.throttle_known_source_s,
    )


def build_service(
    settings: Settings,
    store: ServiceStore,
    keys: WorkerKeys,
    clock: Clock,
    metrics: Metrics,
) -> tuple[IdentityService, HashingPool]:
    return make_identity_service(
        store,
        service_config(settings),
        keys=keys.signing,
        hmac_key=keys.hmac,
        jwt_keys=keys.jwt,
        clock=clock,
        on_hash_timing=observer(metrics.hash_seconds),
        hashing_niceness=HASHING_NICENESS,
        on_replay=lambda command: metrics.idempotent_replays_total.labels(command).inc(),
    )


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    store: IdentityStore | None = None,
    connection: AbstractRobustConnection | None = None,
) -> Components:
    """The worker's parts, wired. The adapters default to the real ones, made from `settings`:
    a PostgreSQL pool and a robust RabbitMQ connection. A test passes its own (the in-memory
    store, an in-memory broker's connection); the channels are opened on whichever connection
    it is. What is passed in belongs to the parts from then on: the worker's stop closes it,
    and so does a build that fails."""
    clock = clock or SystemClock()
    metrics = create_metrics()
    if store is None:
        store = await connect_store(settings, metrics)
    passwords: HashingPool | None = None
    try:
        if isinstance(store, PostgresIdentityStore):
            await check_database_role(settings, store)
        metrics.dev_mode.set(1 if settings.dev_mode else 0)
        if settings.dev_mode:
            log.warning(DEV_MODE_WARNING)
        keys = await worker_keys(settings, store)
        hmac_key = HmacKey(keys.hmac)
        # Counters of the previous schema name emails in plain text: re-key them now.
        await store.adopt_legacy_throttle(hmac_key.email_tag)
        service, pool = build_service(settings, store, keys, clock, metrics)
        passwords = pool
        metrics.hash_pool_pending.set_function(lambda: pool.pending)
        await pool.start()
        if connection is None:
            connection = await connect_broker(settings)
        return await _assemble(
            settings,
            clock,
            metrics,
            store,
            service,
            hmac_key,
            pool,
            connection,
            CodeKeys(keys.hmac),
        )
    except BaseException:
        # A failed or cancelled start (SIGTERM) closes what it opened: a robust connection
        # left open keeps reconnecting, and its task would keep the process from exiting.
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
        if passwords is not None:
            passwords.close()
        await store.close(force_after_s=CLOSE_TIMEOUT_S)
        raise


class DatabaseRoleRefused(SettingsError):
    """The worker's database role could change the schema: production does not run so."""


async def check_database_role(settings: Settings, store: PostgresIdentityStore) -> None:
    """Least privilege: the worker's role reads and writes rows, nothing more. A superuser,
    or a role that owns the tables (and so may alter or drop them), is refused in production
    and warned about in dev mode; one that may create objects in the schema is warned about
    (PostgreSQL before 15 grants that to every role unless revoked)."""
    powers = await store.role_powers()
    if powers.superuser or powers.owns_tables:
        what = "a superuser" if powers.superuser else "the owner of the tables"
        message = (
            f"IDENTITY_DATABASE_URL: the worker's role is {what}, which may change the schema;"
            " run the worker as a role with row access only and migrate as the owner"
            " (IDENTITY_MIGRATION_DATABASE_URL; docs/runbook.md, database roles)"
        )
        if not settings.dev_mode:
            raise DatabaseRoleRefused(message)
        log.warning(message)
    elif powers.creates:
        log.warning(
            "the worker's database role may create objects in the schema:"
            " REVOKE CREATE ON SCHEMA public FROM it (docs/runbook.md, database roles)"
        )


class CertificateRefused(SettingsError):
    """A server's TLS certificate failed verification at start: the settings (CA file, host
    name in the URL) and the server's certificate disagree. Never retried in plain text."""


async def connect_store(settings: Settings, metrics: Metrics) -> IdentityStore:
    """The production store: a PostgreSQL pool whose queries are timed in `metrics`."""
    try:
        return await PostgresIdentityStore.connect(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            observe=observer(metrics.db_query_seconds),
        )
    except Exception as exc:
        if (why := refused_certificate(exc)) is None:
            raise
        raise CertificateRefused(
            f"IDENTITY_DATABASE_URL: the database's certificate was refused ({why});"
            " check sslrootcert and the host name in the URL (docs/runbook.md, TLS)"
        ) from None


async def connect_broker(settings: Settings) -> AbstractRobustConnection:
    """The production broker connection: robust (it reconnects, to the next node of a cluster
    when IDENTITY_AMQP_URL names several), closed by a cancelled connect (see
    brokers.NodeConnection), over verified TLS for an amqps:// URL."""
    try:
        connection = await connect_any(
            settings.amqp_url.get_secret_value(),
            **settings.amqp_connect_kwargs(),  # amqps://: the broker's certificate verified
        )
    except Exception as exc:
        if (why := refused_certificate(exc)) is None:
            raise
        raise CertificateRefused(
            f"IDENTITY_AMQP_URL: the broker's certificate was refused ({why});"
            " check IDENTITY_AMQP_CA_FILE and the host name in the URL (docs/runbook.md, TLS)"
        ) from None
    return connection


async def _assemble(
    settings: Settings,
    clock: Clock,
    metrics: Metrics,
    store: IdentityStore,
    service: IdentityService,
    hmac_key: HmacKey,
    passwords: HashingPool,
    connection: AbstractRobustConnection,
    code_keys: CodeKeys,
) -> Components:
    fast_channel = await connection.channel()
    await fast_channel.set_qos(prefetch_count=settings.fast_prefetch)
    password_channel = await connection.channel()
    await password_channel.set_qos(prefetch_count=settings.effective_password_prefetch)
    publish_channel = await connection.channel(publisher_confirms=True)
    dead_channel = await connection.channel()
    await dead_channel.set_qos(prefetch_count=DEAD_LETTER_PREFETCH)
    topology = await declare_topology(publish_channel, delivery_limit=settings.delivery_limit)
    # Everything the worker publishes carries its broker user, which RabbitMQ vouches for.
    user_id = settings.broker_user
    relay = OutboxRelay(
        store,
        publish_channel,
        topology.events_exchange.name,
        metrics,
        clock.now,
        batch=settings.outbox_batch,
        poll_s=settings.outbox_poll_s,
        user_id=user_id,
    )
    await declare_courier(publish_channel)
    courier = CourierRelay(
        store,
        publish_channel,
        code_keys,
        CourierRelayMetrics.on(metrics.registry),
        clock.now,
        user_id=user_id,
        batch=settings.courier_batch,
        poll_s=settings.outbox_poll_s,
    )

    def committed() -> None:  # its events and courier rows are in: publish without waiting
        relay.wake()
        courier.wake()

    acks = Acknowledger()
    dead_letters = DeadLetters(
        publish_channel, topology.dead_exchange.name, metrics, clock, user_id=user_id
    )
    processor = CommandProcessor(
        handler_table(service),
        acks,
        ReplySender(publish_channel, metrics, user_id=user_id),
        dead_letters,
        metrics,
        RetryPolicy(settings.retry_attempts, settings.retry_max_delay_s),
        authoriser=Authoriser(
            settings.caller_policy(), service.acting_session, service.session_account, metrics
        ),
        max_message_bytes=settings.max_message_bytes,
        worker_delivery_limit=settings.worker_delivery_limit,
        on_committed=committed,
        log_queries=settings.log_queries,
        gateways=settings.gateway_users,
        rates=RateGate(
            settings.parsed_caller_rates(),
            metrics.caller_commands_total,
            known=settings.caller_policy().users,
        ),
    )
    forwarder = DeadLetterForwarder(
        dead_letters,
        acks,
        max_message_bytes=settings.max_message_bytes,
        worker_delivery_limit=settings.worker_delivery_limit,
    )
    return Components(
        settings=settings,
        clock=clock,
        metrics=metrics,
        store=store,
        passwords=passwords,
        service=service,
        hmac_key=hmac_key,
        connection=connection,
        fast_channel=fast_channel,
        password_channel=password_channel,
        publish_channel=publish_channel,
        dead_channel=dead_channel,
        topology=topology,
        processor=processor,
        forwarder=forwarder,
        relay=relay,
        courier=courier,
        acks=acks,
        jwks=(await service.tokens.jwks(GetJwks())).to_wire(),
    )
