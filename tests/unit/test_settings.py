"""Settings: defaults that run, errors that name the variable and never echo a secret;
production only with keys and a caller policy of its own."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.tokens import format_signing_key, new_signing_key
from worker.settings import Settings, SettingsError, load_settings, redacted_url

DEV = {"IDENTITY_DEV_MODE": "true"}
PRODUCTION = {
    "IDENTITY_SIGNING_KEYS": format_signing_key(new_signing_key()),
    "IDENTITY_HMAC_KEY": new_hmac_key(),
    "IDENTITY_CALLERS": "web=session.start",
    "IDENTITY_JWT_KEYS": format_jwt_key(new_jwt_key()),
}
# Published in this repository once (compose.yaml, until contract v2), so refused.
COMPOSE_KEY = "dev-compose:ZGV2ZWxvcG1lbnQtb25seS1rZXktZG8tbm90LXVzZS1pbi1wcm9k"


def _key(size: int, fill: bytes = b"k") -> str:
    return base64.urlsafe_b64encode(fill * size).decode().rstrip("=")


def dev(env: Mapping[str, str] | None = None) -> Settings:
    return load_settings({**DEV, **(env or {})})


def test_defaults_load_from_an_empty_environment_in_dev_mode() -> None:
    settings = dev()

    assert settings.http_port == 8080
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.signing_keys is None
    assert settings.worker_delivery_limit < settings.delivery_limit
    assert settings.effective_hash_workers == (os.cpu_count() or 1)
    assert settings.effective_password_prefetch == 2 * settings.effective_hash_workers


def test_values_come_from_identity_prefixed_variables() -> None:
    settings = dev(
        {"IDENTITY_HTTP_PORT": "9090", "IDENTITY_HASH_WORKERS": "3", "IDENTITY_USE_UVLOOP": "false"}
    )

    assert settings.http_port == 9090
    assert settings.effective_hash_workers == 3
    assert settings.effective_password_prefetch == 6
    assert settings.use_uvloop is False


def test_blank_variable_keeps_the_default() -> None:
    assert dev({"IDENTITY_HTTP_PORT": " "}).http_port == 8080


def test_settings_are_frozen() -> None:
    settings = dev()

    with pytest.raises(ValueError, match="frozen"):
        settings.http_port = 1  # type: ignore[misc]


@pytest.mark.parametrize("port", ["eighty", "-1", "65536"])
def test_bad_port_names_its_variable(port: str) -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_HTTP_PORT: "):
        load_settings({"IDENTITY_HTTP_PORT": port})


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"IDENTITY_HTTP_PORT": "x", "IDENTITY_FAST_PREFETCH": "0"})

    assert "IDENTITY_HTTP_PORT" in str(caught.value)
    assert "IDENTITY_FAST_PREFETCH" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (f"k1:{_key(16, b's')}", "at least 32 bytes"),
        (f":{_key(32, b's')}", "key id is not valid"),
        (f"Key.1:{_key(32, b's')}", "key id is not valid"),
        (_key(32, b"s"), "kid:base64url"),
        (f"k1:{_key(32, b's')}+/", "not base64url"),
        (f"k1:{_key(32, b's')},k1:{_key(32, b't')}", "listed twice"),
    ],
)
def test_bad_signing_keys_are_rejected_without_echoing_them(raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"IDENTITY_SIGNING_KEYS": raw})

    message = str(caught.value)
    assert message.startswith("IDENTITY_SIGNING_KEYS: ")
    assert why in message
    assert _key(16, b"s")[:8] not in message
    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None


def test_good_signing_keys_parse_with_the_signing_key_first() -> None:
    settings = dev({"IDENTITY_SIGNING_KEYS": f"new:{_key(32, b'n')}, old:{_key(48)}"})

    keys = settings.parsed_signing_keys()
    assert [key.kid for key in keys] == ["new", "old"]
    assert keys[0].secret == b"n" * 32
    assert "nnnn" not in repr(settings)


@pytest.mark.parametrize("limit", ["5", "6"])
def test_worker_delivery_limit_must_stay_below_the_queue_limit(limit: str) -> None:
    with pytest.raises(SettingsError, match="IDENTITY_WORKER_DELIVERY_LIMIT must be below"):
        load_settings({"IDENTITY_DELIVERY_LIMIT": "5", "IDENTITY_WORKER_DELIVERY_LIMIT": limit})


def test_throttle_counters_outlive_the_longest_lock() -> None:
    # The purge deletes counters untouched for RESET_AFTER_S; one that held a longer lock
    # would take the lock with it, and the next guess would be free.
    lock = "IDENTITY_THROTTLE_MAX_DELAY_S must be at most IDENTITY_THROTTLE_RESET_AFTER_S"
    with pytest.raises(SettingsError, match=lock):
        load_settings({"IDENTITY_THROTTLE_RESET_AFTER_S": "600"})  # below the 900 s default
    with pytest.raises(SettingsError, match=lock):
        load_settings(
            {"IDENTITY_THROTTLE_MAX_DELAY_S": "7200", "IDENTITY_THROTTLE_RESET_AFTER_S": "3600"}
        )
    equal = {"IDENTITY_THROTTLE_MAX_DELAY_S": "600", "IDENTITY_THROTTLE_RESET_AFTER_S": "600"}
    assert dev(equal).throttle_reset_after_s == 600


def test_idempotency_retention_below_a_day_is_rejected() -> None:
    with pytest.raises(SettingsError, match="IDENTITY_IDEMPOTENCY_RETENTION_S"):
        load_settings({"IDENTITY_IDEMPOTENCY_RETENTION_S": "3600"})


def test_bad_url_is_rejected_without_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"IDENTITY_DATABASE_URL": "mysql://app:hunter2hunter2@db/identity"})

    assert str(caught.value).startswith("IDENTITY_DATABASE_URL: ")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("postgresql://postgres@db/identity", "postgresql://postgres@db/identity"),
        ("postgresql://app@db/identity?password=pw1&sslmode=require", "password=***"),
    ],
)
def test_redacted_url_masks_the_password(url: str, shown: str) -> None:
    assert shown in redacted_url(url)
    assert "pw1" not in redacted_url(url)


def test_production_is_the_default_and_names_every_missing_variable_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({})

    message = str(caught.value)
    for name in (
        "IDENTITY_SIGNING_KEYS",
        "IDENTITY_CALLERS",
        "IDENTITY_HMAC_KEY",
        "IDENTITY_JWT_KEYS",
    ):
        assert name in message


@pytest.mark.parametrize("missing", sorted(PRODUCTION))
def test_production_refuses_to_start_without_each_of_its_variables(missing: str) -> None:
    env = {name: value for name, value in PRODUCTION.items() if name != missing}
    with pytest.raises(SettingsError, match=missing):
        load_settings(env)


def test_production_starts_with_its_keys_and_a_policy() -> None:
    settings = load_settings(PRODUCTION)

    assert settings.dev_mode is False
    assert settings.parsed_hmac_key() is not None


def test_the_worker_exits_2_naming_the_missing_variables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("identity-worker")), "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    for name in (
        "IDENTITY_SIGNING_KEYS",
        "IDENTITY_CALLERS",
        "IDENTITY_HMAC_KEY",
        "IDENTITY_JWT_KEYS",
    ):
        assert name in done.stderr


def test_a_signing_key_published_in_the_repository_is_refused_in_production() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**PRODUCTION, "IDENTITY_SIGNING_KEYS": COMPOSE_KEY})

    assert "IDENTITY_SIGNING_KEYS" in str(caught.value)
    assert "published" in str(caught.value)
    assert COMPOSE_KEY.partition(":")[2][:8] not in str(caught.value)


def test_a_published_key_is_refused_whatever_its_kid_or_padding() -> None:
    secret = COMPOSE_KEY.partition(":")[2]
    with pytest.raises(SettingsError, match="published"):
        load_settings({**PRODUCTION, "IDENTITY_SIGNING_KEYS": f"mine:{secret}="})
    with pytest.raises(SettingsError, match="IDENTITY_HMAC_KEY"):
        load_settings({**PRODUCTION, "IDENTITY_HMAC_KEY": secret})


def test_dev_mode_accepts_a_published_key_and_no_keys_at_all() -> None:
    assert dev({"IDENTITY_SIGNING_KEYS": COMPOSE_KEY}).dev_mode is True
    assert dev().signing_keys is None


def test_production_needs_jwt_keys_and_tools_do_not() -> None:
    without = {k: v for k, v in PRODUCTION.items() if k != "IDENTITY_JWT_KEYS"}
    with pytest.raises(SettingsError, match="IDENTITY_JWT_KEYS") as caught:
        load_settings(without)
    assert "keys jwt" in str(caught.value)
    assert dev().jwt_keys is None
    # A tool that only reads the broker or database URL runs no worker and needs no keys,
    # but every value it is given is still checked.
    assert load_settings({}, keys_needed=False).jwt_keys is None
    with pytest.raises(SettingsError, match="IDENTITY_JWT_KEYS"):
        load_settings({"IDENTITY_JWT_KEYS": "j1:short"}, keys_needed=False)


def test_jwt_keys_parse_with_the_signing_key_first_and_access_tokens_have_their_defaults() -> None:
    given = f"new:{_key(32, b'n')}, old:{_key(32, b'o')}"
    settings = load_settings({**PRODUCTION, "IDENTITY_JWT_KEYS": given})

    keys = settings.parsed_jwt_keys()
    assert [key.kid for key in keys] == ["new", "old"]
    assert keys[0].seed == b"n" * 32
    assert "nnnn" not in repr(settings)
    assert "nnnn" not in repr(keys)
    assert settings.access_token_ttl_s == 600
    assert settings.issuer == "identity-worker"
    assert settings.refresh_reuse_grace_s == 10


@pytest.mark.parametrize(
    ("raw", "why"),
    [(_key(16, b"h"), "at least 32 bytes"), (_key(32, b"h") + "+/", "base64url")],
)
def test_a_bad_hmac_key_is_rejected_without_echoing_it(raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        dev({"IDENTITY_HMAC_KEY": raw})

    assert str(caught.value).startswith("IDENTITY_HMAC_KEY: ")
    assert why in str(caught.value)
    assert raw[:8] not in str(caught.value)


def test_gateways_are_a_comma_separated_list_of_broker_users() -> None:
    settings = dev({"IDENTITY_GATEWAYS": " web, edge ,,"})

    assert settings.gateway_users == frozenset({"web", "edge"})


def test_hmac_keys_are_random() -> None:
    assert new_hmac_key() != new_hmac_key()
    assert len(base64.urlsafe_b64decode(new_hmac_key() + "=")) == 32


def test_migrations_need_no_keys_and_grant_the_workers_role() -> None:
    env = {
        "IDENTITY_DATABASE_URL": "postgresql://identity_worker@db/identity?sslmode=verify-full",
        "IDENTITY_MIGRATION_DATABASE_URL": (
            "postgresql://identity_owner:pw@db/identity?sslmode=verify-full"
        ),
    }
    settings = load_settings(env, keys_needed=False)

    assert settings.worker_role == "identity_worker"
    assert settings.migration_dsn.startswith("postgresql://identity_owner:")
    alone = load_settings(
        {"IDENTITY_DATABASE_URL": env["IDENTITY_DATABASE_URL"]}, keys_needed=False
    )
    assert alone.worker_role is None
    assert alone.migration_dsn == env["IDENTITY_DATABASE_URL"]
    with pytest.raises(SettingsError, match="IDENTITY_HMAC_KEY"):
        load_settings(env)  # the worker itself still needs its keys


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (f"j1:{_key(16, b's')}", "must be 32 bytes"),
        (f"j1:{_key(48, b's')}", "must be 32 bytes"),
        (f"J 1:{_key(32, b's')}", "key id is not valid"),
        (_key(32, b"s"), "kid:base64url-seed"),
        (f"j1:{_key(32, b's')}+/", "not base64url"),
        (f"j1:{_key(32, b's')},j1:{_key(32, b't')}", "listed twice"),
    ],
)
def test_bad_jwt_keys_are_rejected_without_echoing_them(raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        dev({"IDENTITY_JWT_KEYS": raw})

    message = str(caught.value)
    assert message.startswith("IDENTITY_JWT_KEYS: ")
    assert why in message
    assert _key(16, b"s")[:8] not in message
    assert caught.value.__context__ is None


@pytest.mark.parametrize("ttl", ["3601", "9", "0"])
def test_the_access_token_lifetime_stays_within_an_hour(ttl: str) -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_ACCESS_TOKEN_TTL_S: "):
        dev({"IDENTITY_ACCESS_TOKEN_TTL_S": ttl})
    assert dev({"IDENTITY_ACCESS_TOKEN_TTL_S": "3600"}).access_token_ttl_s == 3600


def test_the_trace_sample_ratio_is_a_share_of_one() -> None:
    assert dev().traces_sample_ratio == 1.0
    assert dev({"IDENTITY_TRACES_SAMPLE_RATIO": "0.01"}).traces_sample_ratio == 0.01
    with pytest.raises(SettingsError, match=r"^IDENTITY_TRACES_SAMPLE_RATIO: "):
        dev({"IDENTITY_TRACES_SAMPLE_RATIO": "1.5"})
