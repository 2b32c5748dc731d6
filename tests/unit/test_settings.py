"""Settings: defaults that run, errors that name the variable and never echo a secret."""

from __future__ import annotations

import base64
import os

import pytest

from worker.settings import SettingsError, load_settings, redacted_url


def _key(size: int, fill: bytes = b"k") -> str:
    return base64.urlsafe_b64encode(fill * size).decode().rstrip("=")


def test_defaults_load_from_an_empty_environment() -> None:
    settings = load_settings({})

    assert settings.http_port == 8080
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.signing_keys is None
    assert settings.worker_delivery_limit < settings.delivery_limit
    assert settings.effective_hash_workers == (os.cpu_count() or 1)
    assert settings.effective_password_prefetch == 2 * settings.effective_hash_workers


def test_values_come_from_identity_prefixed_variables() -> None:
    settings = load_settings(
        {"IDENTITY_HTTP_PORT": "9090", "IDENTITY_HASH_WORKERS": "3", "IDENTITY_USE_UVLOOP": "false"}
    )

    assert settings.http_port == 9090
    assert settings.effective_hash_workers == 3
    assert settings.effective_password_prefetch == 6
    assert settings.use_uvloop is False


def test_blank_variable_keeps_the_default() -> None:
    assert load_settings({"IDENTITY_HTTP_PORT": " "}).http_port == 8080


def test_settings_are_frozen() -> None:
    settings = load_settings({})

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
    settings = load_settings({"IDENTITY_SIGNING_KEYS": f"new:{_key(32, b'n')}, old:{_key(48)}"})

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
    assert load_settings(equal).throttle_reset_after_s == 600


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
