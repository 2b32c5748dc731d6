"""Encryption in transit, as settings see it: production refuses plain text to a host that is
not loopback (unless told otherwise), TLS files are checked at start, and an amqps:// URL
always gets a verifying context, never aiormq's URL options."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from client import subscribe
from courier.settings import load_courier_settings
from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.tokens import format_signing_key, new_signing_key
from tests.support.certs import issue, make_ca
from tls import TlsFiles, amqp_connect_kwargs, client_context, is_loopback, refused_certificate
from worker.settings import Settings, SettingsError, load_settings
from worker.transit import postgres_hosts, postgres_sslmode

PRODUCTION = {
    "IDENTITY_SIGNING_KEYS": format_signing_key(new_signing_key()),
    "IDENTITY_HMAC_KEY": new_hmac_key(),
    "IDENTITY_CALLERS": "web=session.start",
    "IDENTITY_JWT_KEYS": format_jwt_key(new_jwt_key()),
}
SECRET = "s3cr3t-pw"
REMOTE_DB = f"postgresql://identity_worker:{SECRET}@db.internal:5432/identity"
REMOTE_AMQP = f"amqp://identity:{SECRET}@rabbit.internal:5672/identity"


def production(**env: str) -> Settings:
    return load_settings({**PRODUCTION, **env})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca("unit-ca")
    client = issue(ca, directory, "unit-client", client=True)
    return {
        "ca": str(ca.write(directory)),
        "cert": str(client.cert),
        "key": str(client.key),
    }


# -- the broker URL ------------------------------------------------------------------------


def test_production_refuses_a_plain_text_broker_url_to_a_remote_host() -> None:
    with pytest.raises(SettingsError) as caught:
        production(IDENTITY_AMQP_URL=REMOTE_AMQP)

    message = str(caught.value)
    assert message.startswith("IDENTITY_AMQP_URL: plain-text amqp://")
    assert "commands carry passwords" in message
    assert "IDENTITY_ALLOW_PLAINTEXT=true" in message
    assert SECRET not in message
    assert "rabbit.internal" not in message


def test_allow_plaintext_lets_production_use_a_plain_text_broker() -> None:
    settings = production(IDENTITY_AMQP_URL=REMOTE_AMQP, IDENTITY_ALLOW_PLAINTEXT="true")

    assert settings.allow_plaintext is True
    assert settings.amqp_connect_kwargs() == {}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "LOCALHOST", "[::1]"])
def test_plain_text_to_loopback_is_allowed_in_production(host: str) -> None:
    settings = production(IDENTITY_AMQP_URL=f"amqp://guest:guest@{host}:5672/")

    assert settings.amqp_connect_kwargs() == {}


def test_dev_mode_allows_plain_text_anywhere() -> None:
    settings = load_settings(
        {
            "IDENTITY_DEV_MODE": "true",
            "IDENTITY_AMQP_URL": REMOTE_AMQP,
            "IDENTITY_DATABASE_URL": REMOTE_DB,
        }
    )

    assert settings.dev_mode is True


def test_an_amqps_url_gets_a_context_that_verifies_certificate_and_host_name() -> None:
    settings = production(IDENTITY_AMQP_URL="amqps://identity:pw@rabbit.internal/identity")

    context = settings.amqp_connect_kwargs()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_the_ca_and_client_certificate_are_loaded(pki: dict[str, str]) -> None:
    settings = production(
        IDENTITY_AMQP_URL="amqps://identity:pw@rabbit.internal/identity",
        IDENTITY_AMQP_CA_FILE=pki["ca"],
        IDENTITY_AMQP_CERT_FILE=pki["cert"],
        IDENTITY_AMQP_KEY_FILE=pki["key"],
    )

    context = settings.amqp_connect_kwargs()["ssl_context"]
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "unit-ca"),),)]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IDENTITY_AMQP_CA_FILE": "/nonexistent/ca.pem"}, "IDENTITY_AMQP_CA_FILE: must be"),
        ({"IDENTITY_AMQP_KEY_FILE": "key"}, "IDENTITY_AMQP_KEY_FILE: a client key needs"),
        ({"IDENTITY_AMQP_CERT_FILE": "/nonexistent/c.pem"}, "IDENTITY_AMQP_CERT_FILE / "),
    ],
)
def test_unusable_tls_files_are_named_at_start(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{named}"):
        production(IDENTITY_AMQP_URL="amqps://identity:pw@rabbit.internal/identity", **env)


def test_tls_files_with_a_plain_text_url_are_refused(pki: dict[str, str]) -> None:
    # The operator believes the traffic is encrypted; it would not be.
    with pytest.raises(SettingsError, match="apply to amqps:// only"):
        production(IDENTITY_AMQP_CA_FILE=pki["ca"])


@pytest.mark.parametrize("option", ["no_verify_ssl=1", "cafile=/etc/ca.pem", "certfile=c.pem"])
def test_tls_options_in_the_url_are_refused(option: str) -> None:
    url = f"amqps://identity:{SECRET}@rabbit.internal/identity?{option}"
    with pytest.raises(SettingsError, match=r"^IDENTITY_AMQP_URL: TLS options") as caught:
        load_settings({"IDENTITY_DEV_MODE": "true", "IDENTITY_AMQP_URL": url})
    assert SECRET not in str(caught.value)


# -- the database URLs ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "disable", "allow", "prefer"])
def test_production_refuses_a_database_url_that_may_be_plain_text(mode: str | None) -> None:
    url = REMOTE_DB if mode is None else f"{REMOTE_DB}?sslmode={mode}"
    with pytest.raises(SettingsError) as caught:
        production(IDENTITY_DATABASE_URL=url)

    message = str(caught.value)
    assert message.startswith("IDENTITY_DATABASE_URL: ")
    assert "sslmode=verify-full" in message
    assert "passwords" in message
    assert SECRET not in message


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_an_encrypting_sslmode_is_accepted(mode: str) -> None:
    settings = production(IDENTITY_DATABASE_URL=f"{REMOTE_DB}?sslmode={mode}")

    assert postgres_sslmode(settings.database_url.get_secret_value()) == mode


def test_the_migration_url_obeys_the_same_rule() -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_MIGRATION_DATABASE_URL: "):
        load_settings({"IDENTITY_MIGRATION_DATABASE_URL": REMOTE_DB}, keys_needed=False)


def test_allow_plaintext_lets_production_use_a_plain_text_database() -> None:
    assert production(IDENTITY_DATABASE_URL=REMOTE_DB, IDENTITY_ALLOW_PLAINTEXT="true")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/identity",
        "postgresql://postgres@localhost/identity",
        "postgresql://postgres@[::1]:5432/identity",
        "postgresql:///identity",
        "postgresql:///identity?host=/var/run/postgresql",
        "postgresql://postgres@127.0.0.1:5441,127.0.0.1:5442/identity?target_session_attrs=read-write",
    ],
)
def test_plain_text_to_loopback_or_a_socket_is_allowed(url: str) -> None:
    assert production(IDENTITY_DATABASE_URL=url)


def test_one_remote_host_in_a_multi_host_url_is_enough_to_refuse() -> None:
    url = "postgresql://postgres@127.0.0.1:5432,db-b.internal:5432/identity"
    with pytest.raises(SettingsError, match=r"^IDENTITY_DATABASE_URL: "):
        production(IDENTITY_DATABASE_URL=url)


def test_a_socket_in_the_query_does_not_hide_a_remote_host_in_the_url() -> None:
    url = "postgresql://identity:pw@db.prod.internal/identity?host=/var/run/postgresql"
    with pytest.raises(SettingsError, match=r"^IDENTITY_DATABASE_URL: "):
        production(IDENTITY_DATABASE_URL=url)


def test_without_a_host_in_the_url_pghost_is_where_it_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGHOST", "db.prod.internal")
    assert postgres_hosts("postgresql://identity@/identity") == ["db.prod.internal"]
    with pytest.raises(SettingsError, match=r"^IDENTITY_DATABASE_URL: "):
        production(IDENTITY_DATABASE_URL="postgresql://identity@/identity")


def test_hosts_are_read_the_way_libpq_reads_them() -> None:
    assert postgres_hosts("postgresql://u:p@a:1,[::1]:2,b/db") == ["a", "::1", "b"]
    # libpq lets the query's host override the URL's, asyncpg the other way round: both count.
    assert postgres_hosts("postgresql://u@x/db?host=/run/pg") == ["x", "/run/pg"]
    assert postgres_hosts("postgresql:///db?host=/run/pg") == ["/run/pg"]
    assert postgres_hosts("postgresql:///db?host=h1,h2") == ["h1", "h2"]
    assert postgres_hosts("postgresql:///db") == [""]
    assert postgres_sslmode("postgresql://h/db?sslmode=prefer&sslmode=verify-full") == (
        "verify-full"
    )


# -- the mail sender -----------------------------------------------------------------------

COURIER = {
    "IDENTITY_SMTP_URL": "smtps://mailer:pw@smtp.example.com",
    "IDENTITY_MAIL_FROM": "Identity <no-reply@example.com>",
}


def test_the_mail_sender_refuses_a_plain_text_broker_in_production() -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_AMQP_URL: plain-text amqp://"):
        load_courier_settings({**COURIER, "IDENTITY_AMQP_URL": REMOTE_AMQP})
    allowed = load_courier_settings(
        {**COURIER, "IDENTITY_AMQP_URL": REMOTE_AMQP, "IDENTITY_ALLOW_PLAINTEXT": "true"}
    )
    assert allowed.amqp_connect_kwargs() == {}


def test_the_mail_sender_verifies_an_amqps_broker(pki: dict[str, str]) -> None:
    settings = load_courier_settings(
        {
            **COURIER,
            "IDENTITY_AMQP_URL": "amqps://courier:pw@rabbit.internal/identity",
            "IDENTITY_AMQP_CA_FILE": pki["ca"],
        }
    )

    context = settings.amqp_connect_kwargs()["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


# -- the shared module ---------------------------------------------------------------------


def test_a_plain_text_url_gets_no_tls_and_refuses_tls_options(pki: dict[str, str]) -> None:
    assert amqp_connect_kwargs("amqp://guest:guest@127.0.0.1/") == {}
    with pytest.raises(ValueError, match="plain-text amqp://"):
        amqp_connect_kwargs("amqp://127.0.0.1/", TlsFiles(ca_file=pki["ca"]))
    with pytest.raises(ValueError, match="plain-text amqp://"):
        amqp_connect_kwargs("amqp://127.0.0.1/", context=client_context())


def test_a_given_context_is_used_as_it_is() -> None:
    context = client_context()
    kwargs: dict[str, Any] = amqp_connect_kwargs("amqps://h/", context=context)

    assert kwargs["ssl_context"] is context


def test_a_client_key_without_its_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="needs its certificate"):
        client_context(TlsFiles(key_file="client.key"))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("", True),
        (None, True),
        ("/var/run/postgresql", True),
        ("10.0.0.5", False),
        ("rabbit.internal", False),
        ("localhost.example.com", False),
        ("evil.localhost", False),
    ],
)
def test_loopback_is_decided_without_resolving_names(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_refused_certificate_is_found_under_the_wrappers() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "Hostname mismatch, certificate is not valid for 'db'."
    wrapped = ConnectionError("database unavailable")
    wrapped.__cause__ = verify

    assert refused_certificate(wrapped) == verify.verify_message
    assert refused_certificate(ConnectionRefusedError(111, "refused")) is None


def test_a_tools_broker_flag_wins_over_the_url_file(tmp_path: Path) -> None:
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqps://from-the-file@rabbit.internal/identity\n")
    env = {"IDENTITY_DEV_MODE": "true", "IDENTITY_AMQP_URL_FILE": str(url_file)}

    flagged = load_settings(
        env, keys_needed=False, overrides={"IDENTITY_AMQP_URL": "amqp://flag@127.0.0.1/"}
    )

    assert flagged.amqp_url.get_secret_value() == "amqp://flag@127.0.0.1/"
    assert load_settings(env).amqp_url.get_secret_value().startswith("amqps://from-the-file@")


async def test_tls_options_for_a_connection_already_open_are_refused() -> None:
    # They could not apply: the caller opened the connection (plain or not) itself.
    events = subscribe(object(), queue="identity.x", ca_file="ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply to a URL"):
        await anext(events)


def test_several_hosts_in_the_query_must_ask_for_the_writable_one_too() -> None:
    url = "postgresql://identity@/identity?host=127.0.0.1,127.0.0.2"
    with pytest.raises(SettingsError, match="target_session_attrs=read-write"):
        production(IDENTITY_DATABASE_URL=url)
    production(IDENTITY_DATABASE_URL=url + "&target_session_attrs=read-write")
