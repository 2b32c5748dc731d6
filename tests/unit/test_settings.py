"""Settings: defaults that run, errors that name the variable and never echo a secret."""

from __future__ import annotations

import base64
import os

import pytest

from worker.settings import SettingsError, load_settings, redacted_url


def _key(size: int, fill: bytes = b"k") -> str:
    return base64.urlsafe_b64encode(fill * size).decode().rstrip("=")


# Dev mode: the defaults run without any key (production requires them).
DEV = {"IDENTITY_DEV_MODE": "true"}


def test_defaults_load_from_an_environment_that_only_asks_for_dev_mode() -> None:
    settings = load_settings(DEV)

    assert settings.http_port == 8080
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.signing_keys is None
    assert settings.worker_delivery_limit < settings.delivery_limit
    assert settings.effective_hash_workers == (os.cpu_count() or 1)
    assert settings.effective_password_prefetch == 2 * settings.effective_hash_workers


def test_values_come_from_identity_prefixed_variables() -> None:
    settings = load_settings(
        DEV
        | {
            "IDENTITY_HTTP_PORT": "9090",
            "IDENTITY_HASH_WORKERS": "3",
            "IDENTITY_USE_UVLOOP": "false",
        }
    )

    assert settings.http_port == 9090
    assert settings.effective_hash_workers == 3
    assert settings.effective_password_prefetch == 6
    assert settings.use_uvloop is False


def test_blank_variable_keeps_the_default() -> None:
    assert load_settings(DEV | {"IDENTITY_HTTP_PORT": " "}).http_port == 8080


def test_settings_are_frozen() -> None:
    settings = load_settings(DEV)

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
    settings = load_settings(
        DEV | {"IDENTITY_SIGNING_KEYS": f"new:{_key(32, b'n')}, old:{_key(48)}"}
    )

    keys = settings.parsed_signing_keys()
    assert [key.kid for key in keys] == ["new", "old"]
    assert keys[0].secret == b"n" * 32
    assert "nnnn" not in repr(settings)


@pytest.mark.parametrize("limit", ["5", "6"])
def test_worker_delivery_limit_must_stay_below_the_queue_limit(limit: str) -> None:
    with pytest.raises(SettingsError, match="IDENTITY_WORKER_DELIVERY_LIMIT must be below"):
        load_settings({"IDENTITY_DELIVERY_LIMIT": "5", "IDENTITY_WORKER_DELIVERY_LIMIT": limit})


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


def test_production_refuses_to_start_without_jwt_keys_and_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="IDENTITY_JWT_KEYS") as caught:
        load_settings({})
    assert "IDENTITY_DEV_MODE" in str(caught.value)
    production = load_settings({"IDENTITY_JWT_KEYS": f"j1:{_key(32, b'j')}"})
    assert production.dev_mode is False
    assert load_settings(DEV).jwt_keys is None
    # A tool that only reads the broker or database URL runs no worker and needs no keys,
    # but every value it is given is still checked.
    assert load_settings({}, for_worker=False).jwt_keys is None
    with pytest.raises(SettingsError, match="IDENTITY_JWT_KEYS"):
        load_settings({"IDENTITY_JWT_KEYS": "j1:short"}, for_worker=False)


def test_jwt_keys_parse_with_the_signing_key_first_and_access_tokens_have_their_defaults() -> None:
    settings = load_settings({"IDENTITY_JWT_KEYS": f"new:{_key(32, b'n')}, old:{_key(32, b'o')}"})

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
        load_settings({"IDENTITY_JWT_KEYS": raw})

    message = str(caught.value)
    assert message.startswith("IDENTITY_JWT_KEYS: ")
    assert why in message
    assert _key(16, b"s")[:8] not in message
    assert caught.value.__context__ is None


@pytest.mark.parametrize("ttl", ["3601", "9", "0"])
def test_the_access_token_lifetime_stays_within_an_hour(ttl: str) -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_ACCESS_TOKEN_TTL_S: "):
        load_settings(DEV | {"IDENTITY_ACCESS_TOKEN_TTL_S": ttl})
    assert load_settings(DEV | {"IDENTITY_ACCESS_TOKEN_TTL_S": "3600"}).access_token_ttl_s == 3600
