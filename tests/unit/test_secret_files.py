"""Secrets from files (contract v2, section 5): every secret setting `IDENTITY_X` of the worker
and of the mail sender may come from the file `IDENTITY_X_FILE` names, through one reader."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from courier.settings import CourierSettings, load_courier_settings
from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.tokens import format_signing_key, new_signing_key
from worker.settings import (
    MAX_SECRET_FILE_BYTES,
    Settings,
    SettingsError,
    env_name,
    load_settings,
    secret_fields,
)

SIGNING_KEYS = format_signing_key(new_signing_key())
HMAC_KEY = new_hmac_key()
JWT_KEYS = format_jwt_key(new_jwt_key())
# A valid value of every secret setting, and how the loaded settings show it. The URLs are
# encrypted: production refuses plain text to hosts that are not loopback.
WORKER_SECRETS = {
    "amqp_url": "amqps://identity-worker:s3cret-amqp@rabbit:5671/identity",
    "database_url": "postgresql://identity_worker:s3cret-db@db:5432/identity?sslmode=verify-full",
    "migration_database_url": (
        "postgresql://identity_owner:s3cret-owner@db:5432/identity?sslmode=verify-full"
    ),
    "signing_keys": SIGNING_KEYS,
    "hmac_key": HMAC_KEY,
    "jwt_keys": JWT_KEYS,
}
TAG_KEY = base64.urlsafe_b64encode(b"t" * 32).decode().rstrip("=")
COURIER_SECRETS = {
    "amqp_url": "amqps://mail-sender:s3cret-amqp@rabbit:5671/identity",
    "smtp_url": "smtp://mailer:s3cret-smtp@smtp.example.com:587",
    "courier_tag_key": TAG_KEY,
}
PRODUCTION = {
    "IDENTITY_SIGNING_KEYS": SIGNING_KEYS,
    "IDENTITY_HMAC_KEY": HMAC_KEY,
    "IDENTITY_JWT_KEYS": JWT_KEYS,
    "IDENTITY_CALLERS": "web=session.start",
}
COURIER_BASE = {"IDENTITY_MAIL_FROM": "Identity <no-reply@example.com>"}


def secret_file(tmp_path: Path, content: str | bytes, name: str = "secret") -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return str(path)


def shown(value: object) -> str:
    """A loaded secret's value (SecretStr)."""
    return str(value.get_secret_value())  # type: ignore[attr-defined]


def test_the_secret_settings_are_every_secret_field_and_only_those() -> None:
    """A new SecretStr setting takes part on its own; this list says what is covered."""
    assert set(secret_fields(Settings)) == set(WORKER_SECRETS)
    assert set(secret_fields(CourierSettings)) == set(COURIER_SECRETS)


@pytest.mark.parametrize("cls", [Settings, CourierSettings])
def test_no_secret_files_variable_is_also_a_setting_of_its_own(cls: type) -> None:
    """IDENTITY_SMTP_CA_FILE is a setting (a CA bundle's path): no `<secret>_FILE` may be one."""
    fields = set(cls.model_fields)
    assert not {f"{name}_file" for name in secret_fields(cls)} & fields


@pytest.mark.parametrize("field", sorted(WORKER_SECRETS))
def test_each_worker_secret_may_come_from_a_file(tmp_path: Path, field: str) -> None:
    value = WORKER_SECRETS[field]
    path = secret_file(tmp_path, value + "\n")
    env = {**PRODUCTION, env_name(field): "", env_name(field) + "_FILE": path}
    settings = load_settings(env)
    assert shown(getattr(settings, field)) == value


@pytest.mark.parametrize("field", sorted(COURIER_SECRETS))
def test_each_mail_sender_secret_may_come_from_a_file(tmp_path: Path, field: str) -> None:
    value = COURIER_SECRETS[field]
    path = secret_file(tmp_path, value + "\n")
    env = {**COURIER_BASE, "IDENTITY_SMTP_URL": COURIER_SECRETS["smtp_url"]}
    env.pop(env_name(field), None)
    settings = load_courier_settings({**env, env_name(field) + "_FILE": path})
    assert shown(getattr(settings, field)) == value


def test_production_runs_with_every_key_and_url_only_in_files(tmp_path: Path) -> None:
    env = {"IDENTITY_CALLERS": "web=session.start"}
    for field, value in WORKER_SECRETS.items():
        env[env_name(field) + "_FILE"] = secret_file(tmp_path, value, name=field)
    settings = load_settings(env)
    assert [key.kid for key in settings.parsed_signing_keys()] == [SIGNING_KEYS.split(":")[0]]
    assert settings.parsed_hmac_key() is not None
    assert settings.migration_dsn == WORKER_SECRETS["migration_database_url"]
    assert settings.broker_user == "identity-worker"


@pytest.mark.parametrize(
    "ending", ["\n", "\r\n", "", "\n\n"], ids=["newline", "crlf", "none", "blank-line"]
)
def test_the_trailing_newline_is_dropped(tmp_path: Path, ending: str) -> None:
    """Files written by `echo`, by an editor, on Windows, or by `printf`: the same value
    (what is left around it is stripped as a variable's value is)."""
    url = WORKER_SECRETS["database_url"]
    path = secret_file(tmp_path, url + ending)
    settings = load_settings({**PRODUCTION, "IDENTITY_DATABASE_URL_FILE": path})
    assert settings.database_url.get_secret_value() == url


def test_giving_both_forms_is_an_error_naming_the_two_variables(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "postgresql://x:from-the-file@db/identity")
    env = {
        **PRODUCTION,
        "IDENTITY_DATABASE_URL": "postgresql://x:from-the-env@db/identity",
        "IDENTITY_DATABASE_URL_FILE": path,
    }
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert "IDENTITY_DATABASE_URL and IDENTITY_DATABASE_URL_FILE are both set" in message
    assert "from-the-file" not in message
    assert "from-the-env" not in message


def test_giving_both_forms_to_the_mail_sender_is_the_same_error(tmp_path: Path) -> None:
    path = secret_file(tmp_path, COURIER_SECRETS["smtp_url"])
    env = {**COURIER_BASE, "IDENTITY_SMTP_URL": COURIER_SECRETS["smtp_url"]}
    with pytest.raises(SettingsError, match="IDENTITY_SMTP_URL and IDENTITY_SMTP_URL_FILE"):
        load_courier_settings({**env, "IDENTITY_SMTP_URL_FILE": path})


def test_every_variable_at_fault_is_named_at_once(tmp_path: Path) -> None:
    env = {
        **PRODUCTION,
        "IDENTITY_HMAC_KEY_FILE": secret_file(tmp_path, HMAC_KEY),
        "IDENTITY_AMQP_URL_FILE": str(tmp_path / "missing"),
    }
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert "IDENTITY_HMAC_KEY and IDENTITY_HMAC_KEY_FILE" in message
    assert "IDENTITY_AMQP_URL_FILE" in message


def test_a_missing_file_names_its_variable_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    with pytest.raises(SettingsError) as raised:
        load_settings({**PRODUCTION, "IDENTITY_DATABASE_URL_FILE": str(missing)})
    message = str(raised.value)
    assert message.startswith("IDENTITY_DATABASE_URL_FILE: cannot read")
    assert str(missing) in message
    assert "No such file or directory" in message


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"IDENTITY_JWT_KEYS_FILE: cannot read"):
        load_settings({**PRODUCTION, "IDENTITY_JWT_KEYS": "", "IDENTITY_JWT_KEYS_FILE": "/"})


def test_an_empty_file_is_an_error_not_the_default(tmp_path: Path) -> None:
    """A secret not rendered yet (a Vault agent still starting) must not mean the default
    guest URL or no key at all."""
    for content in ("", "\n", "  \n"):
        path = secret_file(tmp_path, content)
        with pytest.raises(SettingsError, match=r"IDENTITY_AMQP_URL_FILE: .* is empty"):
            load_settings({**PRODUCTION, "IDENTITY_AMQP_URL_FILE": path})


def test_a_file_that_is_not_text_or_too_large_is_refused_unquoted(tmp_path: Path) -> None:
    binary = secret_file(tmp_path, b"\xff\xfe-s3cret-bytes", name="binary")
    with pytest.raises(SettingsError) as raised:
        load_settings({**PRODUCTION, "IDENTITY_DATABASE_URL_FILE": binary})
    assert "IDENTITY_DATABASE_URL_FILE" in str(raised.value)
    assert "not UTF-8" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    large = secret_file(tmp_path, "s3cret" * MAX_SECRET_FILE_BYTES, name="large")
    with pytest.raises(SettingsError) as raised:
        load_settings({**PRODUCTION, "IDENTITY_DATABASE_URL_FILE": large})
    assert "larger than 64 KiB" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_a_bad_value_in_a_file_names_the_setting_and_its_file_never_the_value(
    tmp_path: Path,
) -> None:
    path = secret_file(tmp_path, "mysql://root:s3cret-pass@db/identity\n")
    with pytest.raises(SettingsError) as raised:
        load_settings({**PRODUCTION, "IDENTITY_DATABASE_URL_FILE": path})
    message = str(raised.value)
    assert "IDENTITY_DATABASE_URL (read from IDENTITY_DATABASE_URL_FILE)" in message
    assert "must be a URL with scheme postgresql or postgres" in message
    assert "s3cret" not in message
    bad_key = secret_file(tmp_path, "k1:s3cret-not-base64!!", name="key")
    with pytest.raises(SettingsError) as raised:
        load_settings(
            {**PRODUCTION, "IDENTITY_SIGNING_KEYS": "", "IDENTITY_SIGNING_KEYS_FILE": bad_key}
        )
    assert "IDENTITY_SIGNING_KEYS (read from IDENTITY_SIGNING_KEYS_FILE)" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_production_still_names_a_key_given_neither_way(tmp_path: Path) -> None:
    env = {**PRODUCTION, "IDENTITY_HMAC_KEY": "", "IDENTITY_HMAC_KEY_FILE": ""}
    with pytest.raises(SettingsError, match="needs IDENTITY_HMAC_KEY"):
        load_settings(env)


def test_a_blank_files_variable_is_unset_as_any_blank_variable() -> None:
    url = WORKER_SECRETS["database_url"]
    settings = load_settings(
        {**PRODUCTION, "IDENTITY_DATABASE_URL": url, "IDENTITY_DATABASE_URL_FILE": "  "}
    )
    assert settings.database_url.get_secret_value() == url


@pytest.mark.parametrize("variable", ["IDENTITY_CALLERS_FILE", "IDENTITY_LOG_LEVEL_FILE"])
def test_a_setting_that_is_not_secret_is_not_read_from_a_file(
    tmp_path: Path, variable: str
) -> None:
    """Said at once rather than ignored: the operator meant something by it."""
    path = secret_file(tmp_path, "DEBUG")
    with pytest.raises(SettingsError, match=rf"{variable}: .* is not a secret; set it directly"):
        load_settings({**PRODUCTION, variable: path})


def test_the_mail_senders_ca_file_is_still_its_own_setting(tmp_path: Path) -> None:
    """IDENTITY_SMTP_CA_FILE names a CA bundle (a setting of its own), not a secret's file."""
    env = {**COURIER_BASE, "IDENTITY_SMTP_URL": COURIER_SECRETS["smtp_url"]}
    with pytest.raises(SettingsError, match="IDENTITY_SMTP_CA_FILE: must be a readable file"):
        load_courier_settings({**env, "IDENTITY_SMTP_CA_FILE": str(tmp_path / "none.pem")})


def test_the_mail_senders_smtp_url_from_a_file_keeps_its_rules(tmp_path: Path) -> None:
    """Plain-text SMTP from a file is refused outside dev mode all the same."""
    path = secret_file(tmp_path, "smtp+insecure://mailpit:1025\n")
    with pytest.raises(SettingsError, match=r"smtp\+insecure:// sends codes in plain text"):
        load_courier_settings({**COURIER_BASE, "IDENTITY_SMTP_URL_FILE": path})
    settings = load_courier_settings(
        {**COURIER_BASE, "IDENTITY_SMTP_URL_FILE": path, "IDENTITY_DEV_MODE": "true"}
    )
    assert settings.smtp_target().describe() == "smtp+insecure://mailpit:1025"
