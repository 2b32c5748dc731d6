"""The worker's settings: one frozen object, read once from `IDENTITY_*` environment variables.

`load_settings()` is the only place in the project that reads the worker's configuration from
the environment (services.passwords reads glibc's own GLIBC_TUNABLES, for the start-up log).
Every field `name` is read from `IDENTITY_<NAME>`; an empty value counts as unset, so a
deployment template can leave a variable blank to keep the default. A bad value raises
`SettingsError`, whose message names the variable and what is wrong with it, never the value
itself (URLs and signing keys are secrets).

Every secret field (a `SecretStr`: URLs with passwords, keys) may instead be given as
`IDENTITY_<NAME>_FILE`, the path of a file holding the value (a Kubernetes or compose secret,
a file a Vault agent renders); one trailing newline is dropped. Both at once, an unreadable or
an empty file are settings errors naming the variables, never the file's content. Files are
read once, at start-up: a rotated secret takes a restart, as a changed variable does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, get_args
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from brokers import check_urls, split_urls

# One parser per key, the one the service uses, so a key that loads also works.
from services.access_tokens import DEFAULT_ISSUER, MAX_TTL_S, JwtKey, parse_jwt_keys
from services.keys import is_published, parse_hmac_key
from services.tokens import SigningKey, parse_signing_keys
from tls import TlsFiles, amqp_connect_kwargs
from worker.callers import CallerPolicy
from worker.rates import CallerRates
from worker.transit import (
    plaintext_amqp_problem,
    plaintext_database_problem,
    postgres_hosts,
    tls_files_problem,
)

ENV_PREFIX = "IDENTITY_"
# IDENTITY_X_FILE: the path of a file holding secret setting X's value.
FILE_SUFFIX = "_FILE"
# A secret is a URL or a few keys; a file much larger is the wrong file.
MAX_SECRET_FILE_BYTES = 64 * 1024
_PG = ("postgresql", "postgres")
_URL_SCHEMES = {"database_url": _PG, "migration_database_url": _PG}
# What production cannot run without (contract v2, sections 1 and 4): keys and a caller policy.
_PRODUCTION_NEEDS = ("signing_keys", "callers", "hmac_key", "jwt_keys")
_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
# What a PostgreSQL URL naming several hosts must ask for: the one that takes writes (libpq's
# and asyncpg's `target_session_attrs`; "primary" means the same to asyncpg).
_WRITABLE = ("read-write", "primary")
# Where a list of URLs (IDENTITY_AMQP_URL's nodes) splits: a comma before the next scheme.
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# Whether this load checks production's keys (load_settings(keys_needed=False) does not).
_KEYS_NEEDED: ContextVar[bool] = ContextVar("keys_needed", default=True)


class SettingsError(ValueError):
    """The environment does not describe a valid configuration; the message names the
    variables at fault and never their values."""


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()


def redacted_url(url: str) -> str:
    """`url` with its password (in the authority or a `password=` query parameter) masked,
    fit for the start-up log line; each URL of a comma-separated list so."""
    return ",".join(_redacted_one(part) for part in _NEXT_URL.split(url))


def _redacted_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostinfo}"
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)],
            safe="*",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        # Unparseable (e.g. a bad port): show nothing of it rather than risk the password.
        return "<unparseable url>"


def _check_hosts(url: str) -> None:
    """A PostgreSQL URL naming several hosts (libpq's `h1:5432,h2:5433` form) must ask for
    the one that takes writes: asyncpg's default, `any`, keeps the first that answers, which
    after a failover may be the old primary come back or a standby that refuses writes."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if len(postgres_hosts(url)) < 2:  # in the authority or in `?host=`
        return
    attrs = dict(parse_qsl(parts.query)).get("target_session_attrs")
    if attrs not in _WRITABLE:
        raise ValueError(
            "a URL with several hosts must ask for the writable one:"
            " add ?target_session_attrs=read-write"
        )


class Settings(BaseSettings):
    """Everything the worker can be told from outside. Field `x` comes from `IDENTITY_X`."""

    model_config = SettingsConfigDict(frozen=True, env_prefix=ENV_PREFIX, extra="forbid")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/identity")
    # The schema owner, for migrations (None: IDENTITY_DATABASE_URL's role migrates too). The
    # migration grants the worker's role (IDENTITY_DATABASE_URL's user) what it needs.
    migration_database_url: SecretStr | None = None
    # Encryption in transit (contract v2, section 5; worker.transit): for amqps:// URLs, the
    # broker's CA (None: the system store) and an optional client certificate and key. The
    # database's TLS is libpq's, in its URL: sslmode, sslrootcert, sslcert, sslkey.
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    # Production refuses plain text to a host that is not loopback unless this is true.
    allow_plaintext: bool = False
    http_host: str = "0.0.0.0"  # noqa: S104 - the sidecar must be reachable by the orchestrator
    http_port: int = Field(default=8080, ge=0, le=65535)
    signing_keys: SecretStr | None = None
    # Contract v2, section 1 (trust). Production (dev_mode false) requires keys and a policy.
    dev_mode: bool = False
    # `user=grant,grant;user=grant`: who may send what (None: the open policy, dev mode only).
    callers: str | None = None
    # `user=N/s;*=N/s`: commands a second per caller, per worker (None: no limit).
    caller_rates: str | None = None
    # Broker users trusted to report `metadata.client_ip` (comma-separated).
    gateways: str = ""
    # base64url, >= 32 bytes: keys the HMACs that must outlive signing-key rotation.
    hmac_key: SecretStr | None = None
    # Contract v2, section 4: access tokens. `kid:base64url-seed,...` (Ed25519 seeds); the
    # first signs, all are published. Production requires them; dev mode makes one.
    jwt_keys: SecretStr | None = None
    issuer: str = Field(default=DEFAULT_ISSUER, min_length=1, max_length=200)
    access_token_ttl_s: int = Field(default=600, ge=10, le=MAX_TTL_S)
    # A refresh token used up this recently and presented again is a client racing itself
    # (invalid_token), not theft (which ends the session).
    refresh_reuse_grace_s: float = Field(default=10.0, ge=0, le=60)

    # AMQP prefetch is a 16-bit field.
    fast_prefetch: int = Field(default=64, ge=1, le=65535)
    password_prefetch: int | None = Field(default=None, ge=1, le=65535)
    hash_workers: int | None = Field(default=None, ge=1, le=256)
    # Deliveries decoded and worked on at once per queue, whatever the prefetch: bounds memory.
    max_concurrent_commands: int = Field(default=128, ge=1, le=65535)
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=4, ge=1)

    password_min_length: int = Field(default=15, ge=1)
    password_max_length: int = Field(default=128, ge=1)
    password_max_bytes: int = Field(default=512, ge=1)

    session_lifetime_s: int = Field(default=86400, ge=1)
    session_idle_timeout_s: int = Field(default=1800, ge=1)
    session_touch_interval_s: int = Field(default=60, ge=0)
    # Live sessions an account may hold; a sign-in beyond it ends the oldest (session_limit).
    max_sessions_per_account: int = Field(default=100, ge=1, le=100_000)

    throttle_free_failures: int = Field(default=5, ge=0)
    throttle_base_delay_s: float = Field(default=1.0, ge=0)
    throttle_max_delay_s: float = Field(default=900.0, ge=0)
    throttle_reset_after_s: float = Field(default=43200, gt=0)
    # Failed attempts on one email from all sources together before that email is locked for
    # every source that has not signed in to it before (same doubling delays).
    throttle_email_free_failures: int = Field(default=20, ge=0)
    # How long a source that signed in to an email stays exempt from that email's lock.
    throttle_known_source_s: float = Field(default=90 * 86400, gt=0)
    # Argon2 work per source: a token bucket, one token per hash or verify.
    source_hash_rate_per_s: float = Field(default=0.5, gt=0)
    source_hash_burst: int = Field(default=30, ge=2)

    # One-time codes (contract v2, section 2): lifetime, and the limits on asking for codes
    # and trying them, per email and per source, counted in fixed windows.
    code_lifetime_s: int = Field(default=900, ge=60, le=86400)
    code_max_attempts: int = Field(default=5, ge=1, le=20)
    code_throttle_window_s: int = Field(default=900, ge=1)
    code_requests_per_email: int = Field(default=3, ge=1)
    code_requests_per_source: int = Field(default=50, ge=1)
    code_attempts_per_email: int = Field(default=10, ge=1)
    code_attempts_per_source: int = Field(default=50, ge=1)
    send_verification_on_create: bool = True
    # `session.start` answers `email_not_verified` (after the right password) until verified.
    require_verified_email: bool = False
    courier_batch: int = Field(default=100, ge=1)

    # The contract promises idempotency keys are kept at least 24 hours.
    idempotency_retention_s: int = Field(default=86400, ge=86400)
    outbox_retention_s: int = Field(default=604800, ge=1)

    max_message_bytes: int = Field(default=65536, ge=1024)
    delivery_limit: int = Field(default=5, ge=1)
    worker_delivery_limit: int = Field(default=4, ge=1)
    retry_attempts: int = Field(default=12, ge=1)
    retry_max_delay_s: float = Field(default=5.0, gt=0)

    shutdown_grace_s: float = Field(default=20.0, ge=0)
    migrate_on_start: bool = True
    log_level: str = "INFO"
    # One log line per successful session.verify / account.get too (state changes and
    # failures always get one).
    log_queries: bool = False
    # Spans (worker.tracing): exported over OTLP/HTTP here; unset, none are recorded.
    otlp_traces_url: str | None = None
    # The share of traces started here (commands without a caller's trace) that are kept;
    # a caller's trace is recorded when the caller sampled it, whatever this says.
    traces_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # The audit trail (worker.audit): JSON lines appended to this file; unset, to stderr.
    audit_log: str | None = None
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
    outbox_batch: int = Field(default=100, ge=1)
    outbox_poll_s: float = Field(default=1.0, gt=0)
    readiness_probe_s: float = Field(default=2.0, gt=0)
    use_uvloop: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() hands over the values it read; the class itself never looks at the
        # process environment, so a test's `env=` mapping is the whole truth.
        return (init_settings,)

    @field_validator("signing_keys")
    @classmethod
    def _signing_keys_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_signing_keys(value.get_secret_value())
        return value

    @field_validator("callers")
    @classmethod
    def _callers_policy(cls, value: str | None) -> str | None:
        if value is not None:
            CallerPolicy.parse(value)  # a PolicyError is a ValueError: named IDENTITY_CALLERS
        return value

    @field_validator("caller_rates")
    @classmethod
    def _caller_rates_format(cls, value: str | None) -> str | None:
        if value is not None:
            CallerRates.parse(value)  # a RatesError is a ValueError: named IDENTITY_CALLER_RATES
        return value

    @field_validator("jwt_keys")
    @classmethod
    def _jwt_keys_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_jwt_keys(value.get_secret_value())
        return value

    @field_validator("hmac_key")
    @classmethod
    def _hmac_key_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_hmac_key(value.get_secret_value())
        return value

    @field_validator("amqp_url", "database_url", "migration_database_url")
    @classmethod
    def _url_scheme(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        if info.field_name == "amqp_url":
            check_urls(value.get_secret_value())  # the nodes of one cluster (contract v2, 3)
            return value
        allowed = _URL_SCHEMES[info.field_name or ""]
        try:
            scheme = urlsplit(value.get_secret_value()).scheme
        except ValueError:
            scheme = ""
        if scheme not in allowed:
            raise ValueError(f"must be a URL with scheme {' or '.join(allowed)}")
        _check_hosts(value.get_secret_value())
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(_LOG_LEVELS))}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for low, high, why in _ORDERED_PAIRS:
            if getattr(self, low) > getattr(self, high) or (
                why == "strict" and getattr(self, low) == getattr(self, high)
            ):
                relation = "below" if why == "strict" else "at most"
                raise ValueError(f"{env_name(low)} must be {relation} {env_name(high)}")
        return self

    @model_validator(mode="after")
    def _encrypted_in_transit(self) -> Settings:
        production = not self.dev_mode and not self.allow_plaintext
        url = self.amqp_url.get_secret_value()
        if problem := amqp_transit_problem(url, self.amqp_tls(), production=production):
            raise ValueError(problem)
        for field in ("database_url", "migration_database_url"):
            value: SecretStr | None = getattr(self, field)
            if production and value is not None:
                allow = env_name("allow_plaintext")
                dsn = value.get_secret_value()
                if problem := plaintext_database_problem(env_name(field), dsn, allow):
                    raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _production_has_its_keys(self) -> Settings:
        """Production (the default) runs only with keys and a caller policy of its own; dev
        mode generates what is missing (worker.bootstrap) and says so loudly. Migrating needs
        none of them (a migration job should not hold the worker's keys)."""
        if self.dev_mode or not _KEYS_NEEDED.get():
            return self
        missing = [env_name(name) for name in _PRODUCTION_NEEDS if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"production mode (IDENTITY_DEV_MODE is false) needs {', '.join(missing)}"
                " (identity-worker keys new, keys hmac and keys jwt make keys;"
                " IDENTITY_DEV_MODE=true runs without)"
            )
        published = [
            f"{env_name('signing_keys')} (key {key.kid!r})"
            for key in self.parsed_signing_keys()
            if is_published(key.secret)
        ]
        if is_published(self.parsed_hmac_key() or b""):
            published.append(env_name("hmac_key"))
        published += [
            f"{env_name('jwt_keys')} (key {key.kid!r})"
            for key in self.parsed_jwt_keys()
            if is_published(key.seed)
        ]
        if published:
            raise ValueError(
                f"{', '.join(published)}: a key published in the identity worker's repository"
                " is refused in production; make your own with identity-worker keys new"
            )
        return self

    def amqp_tls(self) -> TlsFiles:
        """The broker's CA, client certificate and key files (IDENTITY_AMQP_*_FILE)."""
        return TlsFiles(self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)

    def amqp_connect_kwargs(self) -> dict[str, Any]:
        """What `aio_pika.connect_robust(url, **them)` needs beside the URL: a verifying TLS
        context for amqps://, nothing for amqp://."""
        return amqp_connect_kwargs(self.amqp_url.get_secret_value(), self.amqp_tls())

    @property
    def effective_hash_workers(self) -> int:
        """Threads in the argon2 pool: as configured, else one per CPU."""
        return self.hash_workers or os.cpu_count() or 1

    @property
    def effective_password_prefetch(self) -> int:
        """Unacked password commands per consumer: as configured, else two per hashing thread,
        so the pool never idles yet messages don't pile up in memory behind argon2."""
        return self.password_prefetch or 2 * self.effective_hash_workers

    def caller_policy(self) -> CallerPolicy:
        """Who may send what: IDENTITY_CALLERS, or the open policy when it is unset."""
        return CallerPolicy.open() if self.callers is None else CallerPolicy.parse(self.callers)

    def parsed_caller_rates(self) -> CallerRates:
        """Commands a second per caller: IDENTITY_CALLER_RATES, or no limit when it is unset."""
        return (
            CallerRates.none()
            if self.caller_rates is None
            else CallerRates.parse(self.caller_rates)
        )

    @property
    def broker_user(self) -> str:
        """The worker's own broker user (the user of IDENTITY_AMQP_URL; RabbitMQ's default,
        guest, when the URL names none): the `user_id` of everything the worker publishes."""
        try:
            user = urlsplit(split_urls(self.amqp_url.get_secret_value())[0]).username
        except ValueError:
            user = None
        return unquote(user) if user else "guest"

    @property
    def migration_dsn(self) -> str:
        """Where migrations run: the owner's URL, else the worker's own."""
        url = self.migration_database_url or self.database_url
        return url.get_secret_value()

    @property
    def worker_role(self) -> str | None:
        """The worker's database role, to be granted its privileges by the migration; None
        when the worker migrates as itself (no owner URL, or the same user)."""
        if self.migration_database_url is None:
            return None
        worker = urlsplit(self.database_url.get_secret_value()).username
        owner = urlsplit(self.migration_database_url.get_secret_value()).username
        return None if worker is None or worker == owner else unquote(worker)

    @property
    def gateway_users(self) -> frozenset[str]:
        """Broker users trusted to report `metadata.client_ip`."""
        return frozenset(user.strip() for user in self.gateways.split(",") if user.strip())

    def parsed_hmac_key(self) -> bytes | None:
        """IDENTITY_HMAC_KEY's secret bytes; None when it is not configured."""
        return None if self.hmac_key is None else parse_hmac_key(self.hmac_key.get_secret_value())

    def parsed_signing_keys(self) -> list[SigningKey]:
        """The parsed signing keys, the signing one first; empty when none are configured."""
        if self.signing_keys is None:
            return []
        return parse_signing_keys(self.signing_keys.get_secret_value())

    def parsed_jwt_keys(self) -> list[JwtKey]:
        """The parsed JWT keys, the signing one first; empty when none are configured."""
        if self.jwt_keys is None:
            return []
        return parse_jwt_keys(self.jwt_keys.get_secret_value())


# (lower, upper, "strict" or "loose"): lower must be below (strict) or at most (loose) upper.
_ORDERED_PAIRS: tuple[tuple[str, str, str], ...] = (
    # The worker dead-letters a redacted copy before the broker's backstop would dead-letter
    # the raw body (passwords included), so its own limit has to fire first.
    ("worker_delivery_limit", "delivery_limit", "strict"),
    ("password_min_length", "password_max_length", "loose"),
    ("session_idle_timeout_s", "session_lifetime_s", "loose"),
    ("session_touch_interval_s", "session_idle_timeout_s", "strict"),
    ("throttle_base_delay_s", "throttle_max_delay_s", "loose"),
    # The purge deletes sign-in counters untouched for reset_after_s; a lock longer than that
    # would go with its counter, and the next guess would be free.
    ("throttle_max_delay_s", "throttle_reset_after_s", "loose"),
    ("db_pool_min", "db_pool_max", "loose"),
)


AMQP_TLS_VARIABLES = TlsFiles(
    env_name("amqp_ca_file"), env_name("amqp_cert_file"), env_name("amqp_key_file")
)


def amqp_transit_problem(url: str, files: TlsFiles, *, production: bool) -> str | None:
    """What is wrong with how IDENTITY_AMQP_URL is reached (the worker's and the mail
    sender's rule): unusable TLS files, or, when `production` (not dev mode, plain text not
    allowed), plain text to a host that is not loopback. None when nothing is."""
    variable = env_name("amqp_url")
    # Each URL of a comma-separated list of cluster nodes obeys the rule on its own.
    for one in url.split(","):
        if problem := tls_files_problem(variable, one.strip(), files, AMQP_TLS_VARIABLES):
            return problem
        if production and (
            problem := plaintext_amqp_problem(variable, one.strip(), env_name("allow_plaintext"))
        ):
            return problem
    return None


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    keys_needed: bool = True,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Read the settings from `env` (default: the process environment), once, at start-up.
    `keys_needed=False` (migrations, the operator tools) skips production's key checks;
    `overrides` (variable -> value) wins over `env` and its `_FILE` form (a tool's
    --amqp-url flag)."""
    token = _KEYS_NEEDED.set(keys_needed)
    try:
        source: Mapping[str, str] = os.environ if env is None else env
        if overrides:
            kept = {k: v for k, v in source.items() if k.removesuffix(FILE_SUFFIX) not in overrides}
            source = {**kept, **overrides}
        return read_settings(Settings, source)
    finally:
        _KEYS_NEEDED.reset(token)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def secret_fields(cls: type[BaseSettings]) -> tuple[str, ...]:
    """The fields of `cls` that hold secrets (`SecretStr`, optional or not): the ones that may
    also come from a file, `IDENTITY_<NAME>_FILE`."""
    return tuple(
        name
        for name, info in cls.model_fields.items()
        if info.annotation is SecretStr or SecretStr in get_args(info.annotation)
    )


def read_secret_file(variable: str, path: str) -> str:
    """The value in the file at `path`, named by `variable` (`IDENTITY_X_FILE`), one trailing
    newline dropped; `SettingsError` naming the variable and the path (never the content)
    when the file cannot be read, is not UTF-8 text, is empty or is too large for a secret."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise SettingsError(f"{variable}: cannot read {path!r} ({why})") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SettingsError(
            f"{variable}: {path!r} is larger than {MAX_SECRET_FILE_BYTES // 1024} KiB; "
            "it holds one secret value"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}: {path!r} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if text.strip() == "":
        # Most likely a secret not rendered yet (a Vault agent still starting): never a reason
        # to run on the default.
        raise SettingsError(f"{variable}: {path!r} is empty")
    return text


def _given(raw: str | None) -> str | None:
    """A variable's value, None when unset or blank (a blank variable keeps the default)."""
    return raw if raw is not None and raw.strip() != "" else None


def read_environment(
    cls: type[BaseSettings], source: Mapping[str, str]
) -> tuple[dict[str, str], frozenset[str]]:
    """The raw value of every field of `cls` that `source` sets, from `IDENTITY_X` or, for a
    secret field, from the file `IDENTITY_X_FILE` names; `SettingsError` naming every
    variable at fault (both forms given, a file that cannot be read, `_FILE` for a setting
    that is not secret), and the fields that came from files."""
    secrets = set(secret_fields(cls))
    values: dict[str, str] = {}
    from_files: set[str] = set()
    problems: list[str] = []
    for field in cls.model_fields:
        name = env_name(field)
        file_name = name + FILE_SUFFIX
        raw, path = _given(source.get(name)), _given(source.get(file_name))
        if path is not None:
            if field not in secrets:
                problems.append(f"{file_name}: {name} is not a secret; set it directly")
                continue
            if raw is not None:
                problems.append(f"{name} and {file_name} are both set; give one or the other")
                continue
            try:
                raw = read_secret_file(file_name, path.strip())
            except SettingsError as exc:
                problems.append(str(exc))
                continue
            from_files.add(field)
        if raw is not None:
            values[field] = raw.strip()
    if problems:
        raise SettingsError("; ".join(problems))
    return values, frozenset(from_files)


def read_settings(cls: type[SettingsT], env: Mapping[str, str] | None = None) -> SettingsT:
    """Read `cls`, a settings class whose field `x` comes from `IDENTITY_X` (the worker's, the
    mail sender's), or from the file `IDENTITY_X_FILE` names when `x` is secret, from `env`
    (default: the process environment); `SettingsError` naming every variable at fault, never
    a value."""
    source: Mapping[str, str] = os.environ if env is None else env
    raw, from_files = read_environment(cls, source)
    values: dict[str, Any] = dict(raw)
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = _describe(exc, from_files)
    # Raised outside the handler so the ValidationError, whose text quotes the input values,
    # is not even chained as context.
    raise SettingsError(problems)


def _describe(exc: ValidationError, from_files: frozenset[str] = frozenset()) -> str:
    # Built from locations and messages only: `input` would echo a secret back into a log.
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = env_name(str(error["loc"][0])) if error["loc"] else "settings"
        if error["loc"] and error["loc"][0] in from_files:
            where = f"{where} (read from {where}{FILE_SUFFIX})"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if error["loc"] else message)
    return "; ".join(problems)
