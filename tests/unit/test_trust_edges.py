"""The trust decisions made at the edge and at start: the throttling source, where keys come
from in each mode, keyed tags in the audit log, fingerprints of before the HMAC key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

import orjson
import pytest

import worker.app
from messages import Metadata, StartSession, fingerprint_material
from services.errors import InvalidCredentialsError
from services.identity import IdentityService
from services.keys import FINGERPRINT_PREFIX, HmacKey
from stores import MemoryIdentityStore
from tests.support.eventually import eventually
from tests.support.factory import TEST_HMAC_KEY, TEST_KEYS
from tests.support.memory_broker import MemoryBroker
from tests.support.pipeline import Broker, running_worker, worker_settings
from tests.unit.helpers import PASSWORD, create_cmd, ctx, start_cmd
from worker.bootstrap import DEV_HMAC_KEY_NAME, DEV_KEY_NAME, build, worker_keys
from worker.decode import decode_command
from worker.sources import client_address, throttle_source

GATEWAYS = frozenset({"web"})


# The source of a password attempt


@pytest.mark.parametrize(
    ("caller", "client_ip", "source"),
    [
        ("web", "203.0.113.7", "ip:203.0.113.7"),
        ("web", " 203.0.113.7 ", "ip:203.0.113.7"),
        ("web", "::ffff:203.0.113.7", "ip:203.0.113.7"),
        ("web", "2001:db8:1:2:3:4:5:6", "ip:2001:db8:1:2::/64"),
        ("web", "2001:db8:1:2:ffff::1", "ip:2001:db8:1:2::/64"),
        ("web", "not an address", "caller:web"),
        ("web", None, "caller:web"),
        ("billing", "203.0.113.7", "caller:billing"),  # not a gateway: kept, never trusted
        (None, "203.0.113.7", "caller:-"),
    ],
)
def test_the_source_is_a_gateways_client_else_the_caller(
    caller: str | None, client_ip: str | None, source: str
) -> None:
    metadata = Metadata(client_ip=client_ip)
    assert throttle_source(caller, metadata, GATEWAYS) == source


def test_a_caller_that_is_not_a_gateway_cannot_pick_its_source() -> None:
    sources = {
        throttle_source("billing", Metadata(client_ip=f"198.51.100.{n}"), GATEWAYS)
        for n in range(50)
    }
    assert sources == {"caller:billing"}


def test_one_ipv6_subscriber_block_is_one_source() -> None:
    assert len({client_address(f"2001:db8::{n:x}") for n in range(1000)}) == 1


def test_decode_puts_the_source_into_the_context() -> None:
    body = orjson.dumps(
        {
            "idempotency_key": "k1",
            "payload": {"email": "ada@example.com", "password": PASSWORD},
            "metadata": {"client_ip": "203.0.113.9"},
        }
    )
    from_gateway = decode_command("session.start", body, None, "web", GATEWAYS)
    from_other = decode_command("session.start", body, None, "billing", GATEWAYS)

    assert from_gateway.context.source == "ip:203.0.113.9"
    assert from_other.context.source == "caller:billing"
    assert from_other.context.metadata is not None
    assert from_other.context.metadata.client_ip == "203.0.113.9"  # kept for audit


# Keys: production reads none from the database, dev mode shares them through it


class NoSecrets(MemoryIdentityStore):
    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        raise AssertionError(f"production asked the database for {name}")


async def test_production_never_reads_or_writes_a_key_in_the_database() -> None:
    store = NoSecrets()
    keys = await worker_keys(worker_settings("amqp://memory.invalid/"), store)
    assert keys.signing
    assert len(keys.hmac) >= 32

    connection = MemoryBroker().connect()
    parts = await build(
        worker_settings("amqp://memory.invalid/"), store=store, connection=connection
    )
    try:
        assert parts.settings.dev_mode is False
        assert parts.metrics.dev_mode._value.get() == 0
    finally:
        await connection.close()
        parts.passwords.close()
        await store.close()
    assert store._tables.secrets == {}


async def test_dev_mode_makes_its_keys_once_and_shares_them_through_the_database(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryIdentityStore()
    settings = worker_settings(
        "amqp://memory.invalid/", dev_mode=True, signing_keys=None, hmac_key=None, callers=None
    )
    first = await worker_keys(settings, store)
    second = await worker_keys(settings, store)

    assert [k.secret for k in first.signing] == [k.secret for k in second.signing]
    assert first.hmac == second.hmac
    assert set(store._tables.secrets) == {DEV_KEY_NAME, DEV_HMAC_KEY_NAME}

    connection = MemoryBroker().connect()
    with caplog.at_level(logging.WARNING, logger="identity.worker"):
        parts = await build(settings, store=store, connection=connection)
    try:
        assert parts.metrics.dev_mode._value.get() == 1
        assert any("IDENTITY_DEV_MODE is true" in r.getMessage() for r in caplog.records)
    finally:
        await connection.close()
        parts.passwords.close()
        await store.close()


# Keyed tags and fingerprints


async def test_the_audit_log_tags_emails_with_the_hmac_key_not_a_plain_hash(
    service: IdentityService, caplog: pytest.LogCaptureFixture
) -> None:
    await service.create_account(create_cmd(), ctx())
    with (
        caplog.at_level(logging.INFO, logger="identity.audit"),
        pytest.raises(InvalidCredentialsError),
    ):
        await service.start_session(start_cmd(password="a wrong passphrase"), ctx())
    tags = [getattr(r, "email_tag", None) for r in caplog.records]
    tag = next(t for t in tags if t)

    assert tag == HmacKey(TEST_HMAC_KEY).audit_tag("ada@example.com")
    assert tag != hashlib.sha256(b"ada@example.com").hexdigest()[:16]
    assert tag != HmacKey(secrets.token_bytes(32)).audit_tag("ada@example.com")


def test_each_purpose_has_its_own_subkey() -> None:
    key = HmacKey(secrets.token_bytes(32))
    email = "ada@example.com"
    assert key.email_tag(email) != key.source_tag(email)
    assert key.email_tag(email).hex()[:16] != key.audit_tag(email)
    assert key.fingerprint(email.encode()).startswith(FINGERPRINT_PREFIX)
    assert "redacted" in repr(key)


async def test_a_record_fingerprinted_under_a_signing_key_replays_while_that_key_is_configured(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    """Records written before the HMAC key existed (`<kid>:<hex>`) keep matching."""
    await service.create_account(create_cmd(), ctx())
    context = ctx()
    started = await service.start_session(start_cmd(), context)
    key = context.idempotency_key
    assert key is not None
    record = store._tables.idempotency[key]
    assert record.fingerprint.startswith(FINGERPRINT_PREFIX)
    material = fingerprint_material(
        StartSession.model_validate({"email": "ada@example.com", "password": PASSWORD})
    )
    signing = TEST_KEYS[0]
    subkey = hmac.digest(signing.secret, b"identity-worker/idempotency-fingerprint", "sha256")
    legacy = f"{signing.kid}:{hmac.digest(subkey, material, 'sha256').hex()}"
    store._tables.idempotency[key] = type(record)(
        record.key, record.command, legacy, record.reply, record.created_at
    )

    replayed = await service.start_session(start_cmd(), context)
    assert replayed.session == started.session


async def test_dev_mode_repeats_its_warning_while_the_worker_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker.app, "DEV_MODE_REMINDER_S", 0.01)
    with caplog.at_level(logging.WARNING, logger="identity.worker"):
        async with running_worker(
            Broker.in_memory(), dev_mode=True, signing_keys=None, hmac_key=None, callers=None
        ):

            def warnings() -> int:
                return sum("IDENTITY_DEV_MODE is true" in r.getMessage() for r in caplog.records)

            await eventually(lambda: warnings() >= 3, what="the dev-mode reminder")
