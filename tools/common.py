"""What the operator tools (`send`, `demo`, `dead`) share: the broker URL, masking, exit codes,
and one way to say that the broker could not be reached."""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika.exceptions
import aiormq.exceptions

from tls import TlsFiles, amqp_connect_kwargs
from worker.logs import redact_text
from worker.settings import SettingsError, env_name, load_settings, redacted_url

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3


# What failing to reach or talk to the broker looks like from aio-pika.
BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    # Using a channel that the broker or a dropped connection closed: a RuntimeError.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def quiet_broker_library() -> None:
    """aio-pika logs connection failures on its own; the tools report them once, themselves."""
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Broker:
    """Where the tools connect, and how: amqps:// verifies the broker with the worker's TLS
    settings (IDENTITY_AMQP_CA_FILE, _CERT_FILE, _KEY_FILE)."""

    url: str
    tls: TlsFiles

    def connect_kwargs(self) -> dict[str, Any]:
        return amqp_connect_kwargs(self.url, self.tls)

    def ssl_context(self) -> ssl.SSLContext | None:
        context: ssl.SSLContext | None = self.connect_kwargs().get("ssl_context")
        return context


def resolve_broker(flag: str | None) -> Broker:
    """`--amqp-url` if given, else the worker's own setting (IDENTITY_AMQP_URL), checked by
    the worker's rules (production refuses plain text to a host that is not loopback)."""
    quiet_broker_library()
    overrides = {env_name("amqp_url"): flag} if flag else None
    try:
        # The tools are callers: they need the broker URL, not the worker's keys.
        settings = load_settings(keys_needed=False, overrides=overrides)
    except SettingsError as exc:
        print(f"identity-worker: bad settings: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return Broker(settings.amqp_url.get_secret_value(), settings.amqp_tls())


def broker_unreachable(url: str, exc: BaseException) -> int:
    """Say which broker (password masked) failed and how; the exit code for it."""
    # aiormq quotes the URL in some messages: mask its password there too.
    reason = redact_text(str(exc)) or type(exc).__name__
    print(f"identity-worker: broker {redacted_url(url)}: {reason}", file=sys.stderr)
    return EXIT_FAILED


def mask_token(token: str) -> str:
    """Enough of a token to tell two apart in a transcript, not enough to use it."""
    return token[:8] + "…"


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-item list that holds the elapsed milliseconds once the block ends."""
    elapsed = [0.0]
    started = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = (time.perf_counter() - started) * 1000
