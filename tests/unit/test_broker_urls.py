"""Several broker addresses (contract v2, section 3): the nodes of one RabbitMQ cluster in
IDENTITY_AMQP_URL, checked as one list; a PostgreSQL URL with several hosts asks for the
writable one. Nothing connects here (tests/integration/test_broker_nodes.py does)."""

from __future__ import annotations

import pytest

from brokers import check_urls, split_urls, url_differences
from courier.settings import load_courier_settings
from worker.settings import SettingsError, load_settings, redacted_url

DEV = {"IDENTITY_DEV_MODE": "true"}
NODES = (
    "amqp://identity:s3cret-pw@rabbit-1:5672/identity,"
    " amqp://identity:s3cret-pw@rabbit-2:5673/identity ,amqp://identity:s3cret-pw@rabbit-3/identity"
)


def test_a_comma_separated_list_names_each_node() -> None:
    assert split_urls(NODES) == [
        "amqp://identity:s3cret-pw@rabbit-1:5672/identity",
        "amqp://identity:s3cret-pw@rabbit-2:5673/identity",
        "amqp://identity:s3cret-pw@rabbit-3/identity",
    ]
    assert split_urls(["amqp://a/", "amqp://b/,amqp://c/"]) == [
        "amqp://a/",
        "amqp://b/",
        "amqp://c/",
    ]


def test_an_empty_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(" , ")


def test_the_worker_takes_the_nodes_of_a_cluster_and_its_user_is_the_first_urls() -> None:
    settings = load_settings({**DEV, "IDENTITY_AMQP_URL": NODES})

    assert settings.broker_user == "identity"
    assert len(check_urls(settings.amqp_url.get_secret_value())) == 3


def test_the_mail_sender_takes_the_nodes_of_a_cluster_too() -> None:
    mail = {"IDENTITY_SMTP_URL": "smtp://smtp.example.com", "IDENTITY_MAIL_FROM": "x@example.com"}
    # Production: TLS to hosts that are not loopback.
    nodes = NODES.replace("amqp://", "amqps://")
    settings = load_courier_settings({**mail, "IDENTITY_AMQP_URL": nodes})

    assert settings.amqp_url.get_secret_value() == nodes
    with pytest.raises(SettingsError, match=r"IDENTITY_AMQP_URL: .*username"):
        load_courier_settings({**mail, "IDENTITY_AMQP_URL": "amqps://a@r1/,amqps://b@r2/"})


@pytest.mark.parametrize(
    ("other", "differs"),
    [
        ("amqp://someone:s3cret-pw@rabbit-2/identity", "username"),
        ("amqp://identity:other-pw@rabbit-2/identity", "password"),
        ("amqp://identity:s3cret-pw@rabbit-2/elsewhere", "virtual host"),
        ("amqps://identity:s3cret-pw@rabbit-2/identity", "scheme"),
        ("amqp://identity:s3cret-pw@rabbit-2/identity?heartbeat=5", "query"),
    ],
)
def test_nodes_that_differ_in_more_than_host_and_port_are_refused(other: str, differs: str) -> None:
    urls = f"amqp://identity:s3cret-pw@rabbit-1/identity,{other}"
    assert url_differences(split_urls(urls)) == [differs]
    with pytest.raises(SettingsError) as caught:
        load_settings({**DEV, "IDENTITY_AMQP_URL": urls})

    assert str(caught.value).startswith("IDENTITY_AMQP_URL: ")
    assert differs in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "other-pw" not in str(caught.value)


@pytest.mark.parametrize(
    "urls",
    [
        "amqp://guest:guest@rabbit-1/,http://guest:guest@rabbit-2/",
        "amqp://guest:guest@rabbit-1/,amqp://guest:guest@rabbit-2:99999/",
        "amqp://guest:guest@rabbit-1/,amqp:///",
    ],
)
def test_every_node_url_is_checked(urls: str) -> None:
    with pytest.raises(SettingsError, match="IDENTITY_AMQP_URL"):
        load_settings({**DEV, "IDENTITY_AMQP_URL": urls})


def test_the_start_up_log_masks_every_nodes_password() -> None:
    shown = redacted_url(NODES)

    assert "s3cret" not in shown
    assert shown.count("identity:***@") == 3


def test_a_multi_host_database_url_keeps_its_hosts_and_masks_its_password() -> None:
    url = "postgresql://app:pw1@db-a:5432,db-b:5433/identity?target_session_attrs=read-write"

    assert redacted_url(url) == (
        "postgresql://app:***@db-a:5432,db-b:5433/identity?target_session_attrs=read-write"
    )


@pytest.mark.parametrize("attrs", ["read-write", "primary"])
def test_a_multi_host_database_url_asking_for_the_writable_host_is_taken(attrs: str) -> None:
    url = f"postgresql://app@db-a:5432,db-b:5433/identity?target_session_attrs={attrs}"
    settings = load_settings({**DEV, "IDENTITY_DATABASE_URL": url})

    assert settings.database_url.get_secret_value() == url


@pytest.mark.parametrize("query", ["", "?target_session_attrs=any", "?sslmode=require"])
def test_a_multi_host_database_url_that_may_land_on_a_standby_is_refused(query: str) -> None:
    for name in ("IDENTITY_DATABASE_URL", "IDENTITY_MIGRATION_DATABASE_URL"):
        with pytest.raises(SettingsError, match=rf"{name}: .*target_session_attrs=read-write"):
            load_settings({**DEV, name: f"postgresql://app@db-a:5432,db-b:5433/identity{query}"})
