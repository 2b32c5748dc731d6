"""The mail sender's settings: one frozen object, read once from `IDENTITY_*` variables.

Read the way the worker's are (`worker.settings.read_settings`): field `x` comes from
`IDENTITY_X`, an empty value counts as unset, and a bad value raises `SettingsError` naming
the variable, never its value (the SMTP and broker URLs hold passwords). Its secrets
(`IDENTITY_SMTP_URL`, `IDENTITY_AMQP_URL`, `IDENTITY_COURIER_TAG_KEY`) may come from files
as the worker's do, `IDENTITY_SMTP_URL_FILE=/run/secrets/smtp-url`: the same reader, the
same rules. Variables the two processes share (`IDENTITY_AMQP_URL`, `IDENTITY_DEV_MODE`,
`IDENTITY_HTTP_PORT`, ...) mean the same thing in both; a deployment gives the mail sender its
own broker user, one that may only read `identity.courier`.

`IDENTITY_SMTP_URL`:

    smtp://user:password@host:587     STARTTLS, required (never falls back to plain text)
    smtps://user:password@host:465    TLS from the first byte (implicit TLS)
    smtp+insecure://host:1025         plain text, no TLS at all: development only (Mailpit,
                                      aiosmtpd), refused unless IDENTITY_DEV_MODE=true

User and password are percent-decoded; without them the mail sender does not authenticate.
Certificates are always verified against the system store, or `IDENTITY_SMTP_CA_FILE`.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from email.headerregistry import Address, HeaderRegistry
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from brokers import check_urls
from messages.models import _no_control_chars
from tls import TlsFiles, amqp_connect_kwargs
from worker.settings import ENV_PREFIX, amqp_transit_problem, env_name, read_settings

SmtpSecurity = Literal["starttls", "tls", "none"]
_SCHEMES: dict[str, tuple[SmtpSecurity, int]] = {
    "smtp": ("starttls", 587),
    "smtps": ("tls", 465),
    "smtp+insecure": ("none", 25),
}
_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
_MIN_TAG_KEY_BYTES = 32
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*")


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """Where and how to send, from `IDENTITY_SMTP_URL`."""

    host: str
    port: int
    security: SmtpSecurity
    username: str | None
    password: str | None

    @property
    def scheme(self) -> str:
        return next(
            scheme for scheme, (security, _) in _SCHEMES.items() if security == self.security
        )

    def describe(self) -> str:
        """`scheme://host:port`, for logs: never the user's password."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def __repr__(self) -> str:  # never the password, wherever a target is printed
        return f"SmtpTarget({self.describe()}, user={self.username!r})"


def parse_smtp_url(url: str) -> SmtpTarget:
    """The target `url` names; ValueError (never quoting the URL) when it names none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (a bad port?)") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError("must be a URL with scheme smtp, smtps or smtp+insecure")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("takes no path, query or fragment: scheme://user:password@host:port")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if (username is None) != (password is None):
        raise ValueError("needs both a user and a password to authenticate, or neither")
    security, default_port = _SCHEMES[parts.scheme]
    return SmtpTarget(parts.hostname, port or default_port, security, username, password)


class CourierSettings(BaseSettings):
    """Everything the mail sender can be told from outside. Field `x` comes from `IDENTITY_X`."""

    model_config = SettingsConfigDict(frozen=True, env_prefix=ENV_PREFIX, extra="forbid")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # As the worker's (worker.transit): the broker's CA and an optional client certificate.
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    # Production refuses a plain-text broker URL to a host that is not loopback unless true.
    allow_plaintext: bool = False
    # Shared with the worker: development conveniences (plain-text SMTP) need it said aloud.
    dev_mode: bool = False
    # Required: no default could be right, and a wrong one would send codes somewhere.
    smtp_url: SecretStr
    smtp_ca_file: str | None = None
    mail_from: str
    mail_templates_dir: str | None = None
    # The worker's broker user: when set, a courier message published by any other user is
    # dead-lettered unsent (the broker guarantees user_id; permissions should already stop
    # anyone else from writing identity.courier, this catches permissions that do not).
    worker_user: str | None = None
    # Keys the tag that stands for a recipient address in logs (base64url, >= 32 bytes);
    # unset, each process draws its own, and tags only compare within one process.
    courier_tag_key: SecretStr | None = None

    courier_prefetch: int = Field(default=16, ge=1, le=65535)
    smtp_connections: int = Field(default=4, ge=1, le=64)
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    smtp_retry_initial_delay_s: float = Field(default=0.5, gt=0)
    smtp_retry_max_delay_s: float = Field(default=30.0, gt=0)
    # After this long retrying one message, hand it back to the queue (another instance may
    # reach its SMTP server) instead of holding it unacked any longer.
    smtp_retry_deadline_s: float = Field(default=120.0, gt=0)
    # How often the SMTP server is checked when no mail went out meanwhile.
    smtp_probe_s: float = Field(default=30.0, gt=0)
    courier_dedupe_window: int = Field(default=10000, ge=1)

    http_host: str = "0.0.0.0"  # noqa: S104 - the sidecar must be reachable by the orchestrator
    # The worker's default too (and the image's health check); beside a worker on one host,
    # give one of them another port (`make courier` uses 8081).
    http_port: int = Field(default=8080, ge=0, le=65535)
    readiness_probe_s: float = Field(default=2.0, gt=0)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: str = "INFO"
    use_uvloop: bool = True
    # Spans (worker.tracing): exported over OTLP/HTTP here; unset, none are recorded.
    otlp_traces_url: str | None = None
    # The share of traces started here (mails without a trace) that are kept; a mail's trace
    # is recorded when the command that caused it was, whatever this says.
    traces_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_courier_settings() hands over what it read; the class never reads os.environ.
        return (init_settings,)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        check_urls(value.get_secret_value())  # one node, or the nodes of one cluster
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: SecretStr) -> SecretStr:
        parse_smtp_url(value.get_secret_value())
        return value

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=value)
            except (OSError, ssl.SSLError):
                raise ValueError("must be a readable file of PEM CA certificates") from None
        return value

    @field_validator("mail_from")
    @classmethod
    def _mail_from(cls, value: str) -> str:
        mail_from_address(value)
        return value

    @field_validator("mail_templates_dir")
    @classmethod
    def _templates_dir(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError("must be a directory")
        return value

    @field_validator("courier_tag_key")
    @classmethod
    def _tag_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _decode_key(value.get_secret_value())
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(_LOG_LEVELS))}")
        return value.upper()

    @model_validator(mode="after")
    def _encrypted_in_transit(self) -> CourierSettings:
        # The messages it reads carry one-time codes.
        production = not self.dev_mode and not self.allow_plaintext
        url = self.amqp_url.get_secret_value()
        if problem := amqp_transit_problem(url, self.amqp_tls(), production=production):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> CourierSettings:
        if self.smtp_target().security == "none" and not self.dev_mode:
            raise ValueError(
                f"{env_name('smtp_url')}: smtp+insecure:// sends codes in plain text; it is "
                f"for development only and needs {env_name('dev_mode')}=true"
            )
        if self.smtp_retry_initial_delay_s > self.smtp_retry_max_delay_s:
            raise ValueError(
                f"{env_name('smtp_retry_initial_delay_s')} must be at most "
                f"{env_name('smtp_retry_max_delay_s')}"
            )
        return self

    def amqp_tls(self) -> TlsFiles:
        return TlsFiles(self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)

    def amqp_connect_kwargs(self) -> dict[str, Any]:
        """A verifying TLS context for an amqps:// broker URL, nothing for amqp://."""
        return amqp_connect_kwargs(self.amqp_url.get_secret_value(), self.amqp_tls())

    def smtp_target(self) -> SmtpTarget:
        return parse_smtp_url(self.smtp_url.get_secret_value())

    def tls_context(self) -> ssl.SSLContext:
        """Verifies the server's certificate and host name, against the CA file if given."""
        return ssl.create_default_context(cafile=self.smtp_ca_file)

    def sender(self) -> Address:
        """`IDENTITY_MAIL_FROM` as an address (display name and mailbox)."""
        return mail_from_address(self.mail_from)

    def tag_key(self) -> bytes | None:
        if self.courier_tag_key is None:
            return None
        return _decode_key(self.courier_tag_key.get_secret_value())


def mail_from_address(value: str) -> Address:
    """`Name <mailbox@domain>` or a bare `mailbox@domain` as an Address; ValueError if it is
    not exactly one address with an ASCII (IDNA) domain."""
    _no_control_chars(value)
    header = HeaderRegistry()("From", value)
    addresses: tuple[Address, ...] = tuple(getattr(header, "addresses", ()))
    if header.defects or len(addresses) != 1:
        raise ValueError("must be one address, e.g. Identity <no-reply@example.com>")
    address = addresses[0]
    if not _DOMAIN.fullmatch(address.domain) or "." not in address.domain:
        raise ValueError("must have a domain of ASCII letters, digits and dots (IDNA)")
    if not address.username.isascii():
        raise ValueError("must have an ASCII mailbox name (not every server takes SMTPUTF8)")
    return address


def _decode_key(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("must be base64url") from None
    if len(key) < _MIN_TAG_KEY_BYTES:
        raise ValueError(f"must decode to at least {_MIN_TAG_KEY_BYTES} bytes")
    return key


def load_courier_settings(env: Mapping[str, str] | None = None) -> CourierSettings:
    """Read the mail sender's settings from `env` (default: the process environment)."""
    return read_settings(CourierSettings, env)
