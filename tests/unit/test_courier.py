"""The mail sender's parts without a broker or a server: the courier message, its settings,
the templates, the MIME mail, the verdicts on SMTP failures, the window of sent ids."""

from __future__ import annotations

import ssl
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPDataError,
    SMTPNotSupported,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)
from pydantic import SecretStr, ValidationError

from courier.app import RecentIds, frames_only
from courier.mail import AddressTagger, InvalidRecipient, build_mail, wire_address
from courier.metrics import FAILURE_REASONS, create_courier_metrics, kind_label
from courier.render import MailRenderer, RenderedMail, TemplateProblem, display_code
from courier.settings import load_courier_settings, mail_from_address, parse_smtp_url
from courier.smtp import (
    PERMANENT_REASONS,
    TRANSIENT_REASONS,
    SmtpFailure,
    classify_connect,
    classify_send,
)
from messages.courier import COURIER_KINDS, CourierMessage, parse_courier_message
from messages.models import wire_form
from worker.health import BROKER, HealthState
from worker.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)
ACCOUNT = "acct_01jd3m8f2q9v7x4k6t5r0w2y8z"


def message(**fields: Any) -> CourierMessage:
    values: dict[str, Any] = {
        "message_id": "cmsg_01jd3m8g7c2n5p8r1t4w6y9b3e",
        "kind": "verification_code",
        "to": "ada@example.com",
        "account_id": ACCOUNT,
        "display_name": "Ada",
        "code": SecretStr("k7pq2m9x"),
        "expires_at": NOW + timedelta(minutes=15),
        "occurred_at": NOW,
    }
    values.update(fields)
    return CourierMessage(**values)


def wire(**fields: Any) -> bytes:
    body = wire_form(message())
    body.update(fields)
    return orjson.dumps(body)


# -- the message ------------------------------------------------------------------------------


def test_the_wire_form_reads_back_and_only_it_shows_the_code() -> None:
    original = message()
    parsed = parse_courier_message(orjson.dumps(wire_form(original)))

    assert parsed == original
    assert wire_form(parsed)["code"] == "k7pq2m9x"
    assert "k7pq2m9x" not in repr(parsed)
    assert "k7pq2m9x" not in parsed.model_dump_json()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"kind": "welcome"}, "kind"),
        ({"extra": 1}, "extra"),
        ({"to": "ada@example.com\r\nBcc: eve@example.com"}, "to"),
        ({"to": "Ada <ada@example.com>"}, "to"),
        ({"to": "ada@example.com, eve@example.com"}, "to"),
        ({"message_id": "<id>@x"}, "message_id"),
        ({"message_id": "a" * 65}, "message_id"),
        ({"account_id": "acct_x"}, "account_id"),
        ({"display_name": "Ada\u202e"}, "display_name"),
        ({"code": "ABCD EFGH"}, "code"),
        ({"code": "AB"}, "code"),
        ({"expires_at": "2026-12-04T18:15:00"}, "expires_at"),  # no offset
    ],
)
def test_what_is_not_a_courier_message_is_refused(change: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_courier_message(wire(**change))

    locations = {error["loc"][0] for error in caught.value.errors() if error["loc"]}
    assert where in locations


@pytest.mark.parametrize("kind", ["verification_code", "recovery_code"])
@pytest.mark.parametrize("missing", ["code", "expires_at"])
def test_a_code_kind_carries_a_code_and_an_expiry(kind: str, missing: str) -> None:
    with pytest.raises(ValidationError, match=f"a {kind} message needs code and expires_at"):
        parse_courier_message(wire(kind=kind, **{missing: None}))


def test_a_notice_carries_no_code() -> None:
    with pytest.raises(ValidationError, match="carries no code"):
        parse_courier_message(wire(kind="password_changed_notice"))
    notice = parse_courier_message(wire(kind="email_changed_notice", code=None, expires_at=None))
    assert notice.code is None


def test_a_refusal_never_quotes_the_code() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_courier_message(wire(code="SECRET CODE"))
    errors = caught.value.errors(include_input=False, include_url=False)
    assert "SECRET" not in str(errors)


# -- settings ---------------------------------------------------------------------------------

BASE = {
    "IDENTITY_SMTP_URL": "smtp://mailer:pa%40ss@smtp.example.com",
    "IDENTITY_MAIL_FROM": "Identity <no-reply@example.com>",
}


def settings(**env: str) -> Any:
    return load_courier_settings({**BASE, **env})


def test_smtp_urls_map_to_their_security_and_default_ports() -> None:
    assert parse_smtp_url("smtp://u:p@h").security == "starttls"
    assert parse_smtp_url("smtp://u:p@h").port == 587
    assert parse_smtp_url("smtps://u:p@h").security == "tls"
    assert parse_smtp_url("smtps://u:p@h").port == 465
    assert parse_smtp_url("smtp+insecure://h").security == "none"
    assert parse_smtp_url("smtp+insecure://h:1025").port == 1025
    target = parse_smtp_url("smtp://mailer:pa%40ss%3Aw@smtp.example.com:2525")
    assert (target.host, target.port, target.username, target.password) == (
        "smtp.example.com",
        2525,
        "mailer",
        "pa@ss:w",
    )
    assert parse_smtp_url("smtp://smtp.example.com").username is None
    assert "pa@ss" not in repr(target)
    assert target.describe() == "smtp://smtp.example.com:2525"
    assert parse_smtp_url("smtp+insecure://h").describe() == "smtp+insecure://h:25"


def test_defaults_and_the_shared_variables() -> None:
    loaded = settings()
    assert loaded.smtp_target().security == "starttls"
    assert loaded.http_port == 8080  # as the worker's, and the image's health check
    assert loaded.courier_prefetch == 16
    assert loaded.sender().addr_spec == "no-reply@example.com"
    assert loaded.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    with pytest.raises(ValueError, match="frozen"):
        loaded.http_port = 1


def test_the_smtp_url_and_the_sender_are_required() -> None:
    with pytest.raises(SettingsError) as caught:
        load_courier_settings({})
    assert "IDENTITY_SMTP_URL: Field required" in str(caught.value)
    assert "IDENTITY_MAIL_FROM: Field required" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://u:leaked-pw@h", "scheme smtp, smtps or smtp+insecure"),
        ("smtp://u:leaked-pw@h:99999", "not a valid URL"),
        ("smtp://u:leaked-pw@", "names no host"),
        ("smtp://u:leaked-pw@h/path", "takes no path"),
        ("smtp://u:leaked-pw@h?tls=no", "takes no path, query"),
        ("smtp://user-only@h", "both a user and a password"),
    ],
)
def test_a_bad_smtp_url_is_named_and_never_echoed(url: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(IDENTITY_SMTP_URL=url)
    text = str(caught.value)
    assert text.startswith("IDENTITY_SMTP_URL: ")
    assert why in text
    assert "leaked-pw" not in text


def test_plain_text_smtp_is_for_development_only() -> None:
    with pytest.raises(SettingsError) as caught:
        settings(IDENTITY_SMTP_URL="smtp+insecure://u:leaked-pw@mailpit:1025")
    assert "IDENTITY_DEV_MODE=true" in str(caught.value)
    assert "leaked-pw" not in str(caught.value)

    dev = settings(IDENTITY_SMTP_URL="smtp+insecure://mailpit:1025", IDENTITY_DEV_MODE="true")
    assert dev.smtp_target().security == "none"


@pytest.mark.parametrize(
    "sender",
    [
        "no-reply",
        "no-reply@localhost",
        "a@b.com, c@d.com",
        "Identity <no-reply@exa mple.com>",
        "Ident\x00ity <no-reply@example.com>",
        "Identity <nö-reply@example.com>",
        "Identity <no-reply@bücher.example>",
    ],
)
def test_a_bad_sender_is_named(sender: str) -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_MAIL_FROM: "):
        settings(IDENTITY_MAIL_FROM=sender)


def test_a_sender_may_have_a_display_name() -> None:
    address = mail_from_address('"Example, Inc." <no-reply@mail.example.com>')
    assert address.display_name == "Example, Inc."
    assert address.domain == "mail.example.com"


def test_files_and_directories_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_SMTP_CA_FILE: must be a readable file"):
        settings(IDENTITY_SMTP_CA_FILE=str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SettingsError, match=r"^IDENTITY_SMTP_CA_FILE: "):
        settings(IDENTITY_SMTP_CA_FILE=str(garbage))
    with pytest.raises(SettingsError, match=r"^IDENTITY_MAIL_TEMPLATES_DIR: must be a directory"):
        settings(IDENTITY_MAIL_TEMPLATES_DIR=str(tmp_path / "nope"))


def test_the_tls_context_verifies_certificates_and_host_names() -> None:
    context = settings().tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_tag_key_is_long_enough_and_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        settings(IDENTITY_COURIER_TAG_KEY="c2hvcnQta2V5")
    assert "at least 32 bytes" in str(caught.value)
    assert "c2hvcnQta2V5" not in str(caught.value)
    key = "a" * 43
    assert settings(IDENTITY_COURIER_TAG_KEY=key).tag_key() is not None


def test_retry_delays_must_be_in_order() -> None:
    with pytest.raises(SettingsError, match="IDENTITY_SMTP_RETRY_INITIAL_DELAY_S must be at most"):
        settings(IDENTITY_SMTP_RETRY_INITIAL_DELAY_S="60", IDENTITY_SMTP_RETRY_MAX_DELAY_S="1")


# -- templates --------------------------------------------------------------------------------


def test_every_kind_renders_a_subject_and_two_parts() -> None:
    renderer = MailRenderer(service_name="Identity")
    renderer.check(NOW)
    notices = {"email_changed_notice", "password_changed_notice"}
    for kind in COURIER_KINDS:
        fields: dict[str, Any] = {"kind": kind}
        if kind in notices:
            fields.update(code=None, expires_at=None)
        mail = renderer.render(message(**fields), NOW)
        assert mail.subject
        assert "\n" not in mail.subject
        assert "Hello Ada," in mail.text
        assert "<p>Hello Ada,</p>" in mail.html
        assert ("K7PQ-2M9X" in mail.text) is (kind not in notices)
        assert "K7PQ-2M9X" not in mail.subject


def test_html_is_escaped_and_text_is_not() -> None:
    name = "<script>alert(1)</script> O'Brien & Co"
    mail = MailRenderer(service_name="Identity").render(message(display_name=name), NOW)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; O&#39;Brien &amp; Co" in mail.html
    assert "<script>" not in mail.html
    assert f"Hello {name}," in mail.text


def test_the_code_is_shown_in_groups_of_four_and_the_expiry_in_minutes() -> None:
    assert display_code(SecretStr("abcdefgh")) == "ABCD-EFGH"
    assert display_code(SecretStr("ABCD-EFGH")) == "ABCD-EFGH"
    assert display_code(SecretStr("abcdefghjk")) == "ABCD-EFGH-JK"
    text = MailRenderer(service_name="Identity").render(message(), NOW + timedelta(seconds=61)).text
    assert "expires in 14 minutes, at 2026-12-04 18:15 UTC" in text
    last = MailRenderer(service_name="Identity").render(
        message(), NOW + timedelta(minutes=14, seconds=30)
    )
    assert "expires in 1 minute," in last.text


def test_a_file_in_the_override_directory_replaces_only_its_namesake(tmp_path: Path) -> None:
    (tmp_path / "recovery_code.txt").write_text("Code: {{ code }} for {{ display_name }}\n")
    (tmp_path / "unrelated.txt").write_text("ignored")
    renderer = MailRenderer(service_name="Identity", override_dir=str(tmp_path))
    mail = renderer.render(message(kind="recovery_code", display_name="<b>"), NOW)

    assert mail.text == "Code: K7PQ-2M9X for <b>\n"
    assert "recovery code" in mail.subject  # shipped
    assert "&lt;b&gt;" in mail.html  # shipped
    assert renderer.overridden() == ["recovery_code.txt"]


def test_the_shared_layout_can_be_overridden_too(tmp_path: Path) -> None:
    (tmp_path / "_layout.html").write_text("<main>{% block content %}{% endblock %}</main>")
    mail = MailRenderer(service_name="Identity", override_dir=str(tmp_path)).render(message(), NOW)
    assert mail.html.startswith("<main>")
    assert "K7PQ-2M9X" in mail.html


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{{ cod }}", "'cod' is undefined"),
        ("{% if %}", "TemplateSyntaxError"),
        ("{{ ''.__class__.__mro__ }}", "SecurityError"),
        ("{{ code + 1 }}", "TypeError"),
        ("   \n", "empty subject"),
    ],
)
def test_a_broken_override_fails_the_check_naming_the_file(
    tmp_path: Path, source: str, problem: str
) -> None:
    name = "verification_code.subject.txt"
    (tmp_path / name).write_text(source)
    renderer = MailRenderer(service_name="Identity", override_dir=str(tmp_path))
    with pytest.raises(TemplateProblem) as caught:
        renderer.check(NOW)
    assert str(caught.value).startswith(name)
    assert problem in str(caught.value)
    assert "ABCDEFGH" not in str(caught.value)


def test_the_templates_ship_as_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = pyproject["tool"]["setuptools"]
    assert "courier" in tool["packages"]
    patterns = tool["package-data"]["courier"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "courier").glob(pattern)}
    needed = {f"{kind}.{part}" for kind in COURIER_KINDS for part in ("subject.txt", "txt", "html")}
    assert needed | {"_layout.html", "_code.html"} <= shipped


# -- the mail ---------------------------------------------------------------------------------

RENDERED = RenderedMail(subject="Subject", text="text K7PQ-2M9X\n", html="<p>html</p>\n")


def test_the_message_id_is_derived_from_the_courier_message_id_alone() -> None:
    sender = mail_from_address("Identity <no-reply@mail.example.com>")
    first = build_mail(message(), RENDERED, sender).message
    again = build_mail(message(display_name="Other"), RENDERED, sender).message

    assert first["Message-ID"] == "<cmsg_01jd3m8g7c2n5p8r1t4w6y9b3e.courier@mail.example.com>"
    assert again["Message-ID"] == first["Message-ID"]
    assert first["Date"] == "Fri, 04 Dec 2026 18:00:00 +0000"
    other = build_mail(message(message_id="cmsg_other"), RENDERED, sender).message
    assert other["Message-ID"] != first["Message-ID"]


def test_the_mail_has_both_parts_and_the_envelope() -> None:
    sender = mail_from_address("Identity <no-reply@example.com>")
    outgoing = build_mail(message(), RENDERED, sender)
    mail = outgoing.message

    assert (outgoing.sender, outgoing.recipient) == ("no-reply@example.com", "ada@example.com")
    assert mail["From"] == "Identity <no-reply@example.com>"
    assert mail["To"] == "ada@example.com"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in mail.iter_parts()] == ["text/plain", "text/html"]


def test_a_unicode_domain_goes_on_the_wire_in_idna() -> None:
    assert wire_address("ada@Bücher.example") == "ada@xn--bcher-kva.example"
    assert wire_address("ada@example.com") == "ada@example.com"
    with pytest.raises(InvalidRecipient):
        wire_address("ada@" + "ü" * 70 + ".example")


def test_an_address_stands_in_logs_as_a_keyed_tag_and_its_domain() -> None:
    tagger = AddressTagger(b"k" * 32)
    assert tagger.tag("Ada@Example.com") == tagger.tag("ada@example.com")
    assert tagger.tag("ada@example.com") != AddressTagger(b"j" * 32).tag("ada@example.com")
    assert "ada" not in tagger.tag("ada@example.com")
    assert AddressTagger.domain("ada@Example.com") == "example.com"


# -- SMTP verdicts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason", "transient"),
    [
        (SMTPDataError(451, "4.3.0 try later"), "smtp_4xx", True),
        (SMTPDataError(554, "5.7.1 policy"), "rejected", False),
        (SMTPSenderRefused(553, "no", "x@example.com"), "sender_refused", False),
        (SMTPSenderRefused(421, "busy", "x@example.com"), "smtp_4xx", True),
        (
            SMTPRecipientsRefused([SMTPRecipientRefused(550, "no such user", "a@example.com")]),
            "recipient_refused",
            False,
        ),
        (
            SMTPRecipientsRefused([SMTPRecipientRefused(450, "greylisted", "a@example.com")]),
            "smtp_4xx",
            True,
        ),
        (SMTPServerDisconnected("gone"), "connection", True),
        (SMTPReadTimeoutError("slow"), "timeout", True),
        (ConnectionResetError(), "connection", True),
        (SMTPNotSupported("SMTPUTF8 is not supported"), "invalid_recipient", False),
        (ValueError("address cannot be sent safely"), "invalid_recipient", False),
    ],
)
def test_send_failures_are_transient_or_permanent(
    exc: Exception, reason: str, transient: bool
) -> None:
    failure = classify_send(exc)
    assert (failure.reason, failure.transient) == (reason, transient)
    assert failure.reason in (TRANSIENT_REASONS if transient else PERMANENT_REASONS)
    assert "example.com" not in str(failure)  # the reply text is not kept


def test_an_unknown_exception_is_a_bug_not_a_verdict() -> None:
    with pytest.raises(KeyError):
        classify_send(KeyError("x"))


def _caused(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (SMTPConnectError("refused"), "connection"),
        (_caused(SMTPConnectError("tls"), ssl.SSLCertVerificationError("bad cert")), "tls"),
        (SMTPAuthenticationError(535, "5.7.8 no"), "auth"),
        (TimeoutError(), "timeout"),
    ],
)
def test_every_failure_to_connect_is_transient(exc: Exception, reason: str) -> None:
    failure = classify_connect(exc)
    assert failure.transient
    assert failure.reason == reason


def test_a_traceback_for_the_log_keeps_frames_and_drops_messages() -> None:
    address = "ada@" + "example.com"  # a frame shows its source line, never this value
    try:
        raise SmtpFailure("recipient_refused", transient=False) from ValueError(address)
    except SmtpFailure as exc:
        text = frames_only(exc)
    assert "test_a_traceback_for_the_log" in text
    assert text.endswith("SmtpFailure")
    assert "ada@example.com" not in text


# -- the window, readiness and metrics --------------------------------------------------------


def test_the_window_of_sent_ids_forgets_the_oldest_first() -> None:
    window = RecentIds(3)
    for mid in ("a", "b", "c"):
        window.add(mid)
    window.add("a")  # seen again: now the newest
    window.add("d")
    assert "b" not in window
    assert {"a", "c", "d"} == {mid for mid in "abcd" if mid in window}
    assert len(window) == 3


def test_health_names_the_dependencies_it_was_given() -> None:
    health = HealthState(dependencies=(BROKER, "smtp"))
    health.set(BROKER, True)
    health.set("smtp", False, "tls")
    assert health.snapshot() == (False, ["smtp: tls"])
    health.set("smtp", True)
    assert health.snapshot() == (True, [])
    with pytest.raises(KeyError):
        health.set("database", True)


def test_metrics_start_at_zero_with_closed_label_sets() -> None:
    metrics = create_courier_metrics()
    registry = metrics.registry
    for kind in COURIER_KINDS:
        assert registry.get_sample_value("identity_courier_sent_total", {"kind": kind}) == 0
    assert registry.get_sample_value("identity_courier_retries_total", {"reason": "tls"}) == 0
    assert kind_label("verification_code") == "verification_code"
    assert kind_label("cmsg_attacker_chosen") == "unknown"
    assert set(PERMANENT_REASONS) <= set(FAILURE_REASONS)
    assert {"expired", "retry_deadline", "invalid_message"} <= set(FAILURE_REASONS)
