"""JSON log lines: their shape, and that no secret survives into them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from pydantic import SecretStr

from worker.logs import REDACTED, configure_logging, redact, redact_text

TOKEN = "v1.k20261122-ab12.ses_0123456789abcdefghijklmnopqrstuv.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_object_on_one_line(stream: io.StringIO) -> None:
    logging.getLogger("worker.test").info(
        "command %s handled", "account.get", extra={"command": "account.get", "elapsed_ms": 3}
    )

    [line] = _lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "worker.test"
    assert line["msg"] == "command account.get handled"
    assert line["command"] == "account.get"
    assert line["elapsed_ms"] == 3
    assert datetime.fromisoformat(line["ts"]).utcoffset() is not None
    assert datetime.fromisoformat(line["ts"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_an_exception_adds_its_type_and_traceback(stream: io.StringIO) -> None:
    try:
        raise ConnectionError("broker went away")
    except ConnectionError:
        logging.getLogger("worker.test").exception("publish failed")

    [line] = _lines(stream)
    assert line["level"] == "ERROR"
    assert line["exc_type"] == "ConnectionError"
    assert "broker went away" in line["exc"]
    assert "Traceback" in line["exc"]


def test_configuring_twice_still_writes_each_record_once(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)

    logging.getLogger("worker.test").info("once")
    logging.getLogger("worker.test").debug("filtered by the new level")

    assert [line["msg"] for line in _lines(stream)] == ["once"]


def test_an_extra_cannot_overwrite_the_line_fields(stream: io.StringIO) -> None:
    logging.getLogger("worker.test").warning("real", extra={"level": "fake", "ts": "fake"})

    [line] = _lines(stream)
    assert line["level"] == "WARNING"
    assert line["ts"] != "fake"


def test_secret_fields_are_redacted_at_any_depth(stream: io.StringIO) -> None:
    payload = {
        "email": "a@example.com",
        "Password": "hunter2hunter2",
        "changes": [{"new_password": "n3w-pa55word", "current_password": "0ld-pa55word"}],
        "store": {"password_hash": "$argon2id$v=19$m=65536", "SIGNING_KEYS": "k1:abc"},
    }

    logging.getLogger("worker.test").info("received", extra={"payload": payload, "token": TOKEN})

    raw = stream.getvalue()
    [line] = _lines(stream)
    assert line["payload"]["email"] == "a@example.com"
    assert line["payload"]["Password"] == REDACTED
    assert line["payload"]["changes"][0] == {
        "new_password": REDACTED,
        "current_password": REDACTED,
    }
    assert line["payload"]["store"] == {"password_hash": REDACTED, "SIGNING_KEYS": REDACTED}
    assert line["token"] == REDACTED
    for secret in ("hunter2", "n3w-pa55", "0ld-pa55", "argon2id", "k1:abc", "ses_0123"):
        assert secret not in raw


def test_token_looking_strings_are_masked_wherever_they_appear(stream: io.StringIO) -> None:
    log = logging.getLogger("worker.test")
    log.info("verify %s", TOKEN, extra={"note": f"caller sent {TOKEN} twice", "list": [TOKEN]})
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        log.exception("failed")

    assert "ses_0123" not in stream.getvalue()
    first, second = _lines(stream)
    assert first["msg"].startswith("verify v1.")
    assert first["note"].startswith("caller sent v1.")
    assert "bad token v1." in second["exc"]


def test_url_passwords_are_masked(stream: io.StringIO) -> None:
    logging.getLogger("worker.test").error("cannot reach postgresql://app:s3cr3t@db:5432/identity")

    [line] = _lines(stream)
    assert line["msg"] == "cannot reach postgresql://app:***@db:5432/identity"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://app:p@ss@db/identity", "postgresql://app:***@db/identity"),
        (
            "postgresql://app@db/identity?password=s3cr3t&sslmode=require",
            "postgresql://app@db/identity?password=***&sslmode=require",
        ),
        (
            "amqp://guest:guest@rabbit:5672/ and mailto:ada@example.com",
            "amqp://guest:***@rabbit:5672/ and mailto:ada@example.com",
        ),
        ("https://host:8443/path@v2", "https://host:8443/path@v2"),
        ("http://example.com:8080?ref=a@b.c", "http://example.com:8080?ref=a@b.c"),
        (
            "amqp://guest:guest@rabbit:5672?name=worker@host1",
            "amqp://guest:***@rabbit:5672?name=worker@host1",
        ),
    ],
    ids=[
        "at-sign-in-password",
        "query-parameter",
        "two-urls",
        "no-password",
        "at-in-query",
        "password-and-at-in-query",
    ],
)
def test_url_passwords_are_masked_in_every_spelling(text: str, masked: str) -> None:
    assert redact_text(text) == masked


def test_secret_fields_go_by_the_common_names_too() -> None:
    names = [
        "access_token",
        "refresh_token",
        "api_key",
        "Authorization",
        "client_secret",
        "actor_token",
    ]
    assert redact({name: "s3cr3t" for name in names}) == dict.fromkeys(names, REDACTED)


def test_objects_json_cannot_encode_are_logged_by_their_masked_text(stream: io.StringIO) -> None:
    logging.getLogger("worker.test").info("x", extra={"dsn": SecretStr("amqp://u:p@h/")})

    [line] = _lines(stream)
    assert line["dsn"] == "**********"


def test_redact_leaves_the_input_alone_and_keeps_harmless_values() -> None:
    body = {"payload": {"password": "pw", "count": 2, "ok": True, "none": None}, "ids": ("a",)}

    cleaned = redact(body)

    assert cleaned == {
        "payload": {"password": REDACTED, "count": 2, "ok": True, "none": None},
        "ids": ["a"],
    }
    assert body["payload"]["password"] == "pw"  # type: ignore[index]


def test_refresh_tokens_and_jwts_are_masked_wherever_they_appear(stream: io.StringIO) -> None:
    from services.access_tokens import AccessClaims, AccessTokenSigner
    from services.refresh import RefreshTokenCodec
    from tests.support.factory import TEST_JWT_KEYS, TEST_KEYS
    from worker.logs import redact_text, shows_a_mask

    session_id = "ses_" + "0123456789abcdefghjkmnpqrstvwxyz"
    refresh = RefreshTokenCodec(TEST_KEYS).sign(session_id, 7)
    access = AccessTokenSigner(TEST_JWT_KEYS).sign(
        AccessClaims("acct_" + "a" * 26, session_id, ("admin",), 1, 2)
    )
    log = logging.getLogger("worker.test")
    log.info("refresh %s", refresh, extra={"note": f"bearer {access}.", "list": [access]})

    raw = stream.getvalue()
    for secret in (refresh.rpartition(".")[2], access.split(".")[1], access.split(".")[2]):
        assert secret not in raw
    [line] = _lines(stream)
    assert shows_a_mask(line["msg"])
    assert shows_a_mask(line["note"])
    masked = redact_text(f"a {access} b")
    assert redact_text(masked) == masked  # masking a masked text changes nothing
