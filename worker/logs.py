"""JSON-lines logging through the standard `logging` module, with a redaction guarantee.

One object per line: `ts` (ISO 8601, UTC), `level`, `logger`, `msg`, every `extra=` field,
and `exc_type`/`exc` when an exception is attached. Before anything is written, `redact()`
runs over the extra fields and the text:

- a value under a secret-looking key (`password`, `token`, `secret`, ... at any depth,
  whatever the letter case) becomes "[redacted]";
- inside any string, a session token (`v1.<kid>.ses_...`) and the password of a URL
  (`scheme://user:password@host`) are masked, so an exception message that quotes a token or
  a DSN does not leak it either.

`redact()` is the same function the dead-letter writer uses on message bodies.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

import orjson

REDACTED = "[redacted]"
REDACTED_TOKEN = "v1.[redacted-token]"  # noqa: S105 - the mask, not a token
SECRET_KEYS = frozenset(
    {
        "password",
        "current_password",
        "new_password",
        "password_hash",
        "passwd",
        "token",
        "actor_token",
        "code",  # a one-time code (never an error code: those are logged as `outcome`)
        "access_token",
        "refresh_token",
        "id_token",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "private_key",
        "signing_key",
        "signing_keys",
        "jwt_keys",
        "authorization",
    }
)
# Broad on purpose: anything that starts like a token is masked to its end, valid or not: a
# session token (v1.), a refresh token (r1.), or a JWT (a base64url JSON object, then dots).
_TOKEN = re.compile(r"[vr]1\.[A-Za-z0-9_-]{1,64}\.ses_[A-Za-z0-9_.=-]*")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?")
REDACTED_JWT = "eyJ.[redacted-token]"
# Up to the last @ of the authority: a password may hold an unescaped @ itself.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^\s/?#]*@")
# libpq and asyncpg also take the password as a query parameter.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|sslpassword)=)[^&#\s]*", re.I)
# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


# What the masks above leave in a text, to recognise a text that was redacted.
_MASKS = re.compile(
    re.escape(REDACTED_TOKEN)
    + "|"
    + re.escape(REDACTED_JWT)
    + r"|[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:\*\*\*@|[?&]"
    r"(?:password|passwd|sslpassword)=\*\*\*(?:[&#\s]|$)",
    re.I,
)


def shows_a_mask(text: str) -> bool:
    """Whether `text` is, or holds, something `redact` put in place of a secret."""
    return text == REDACTED or _MASKS.search(text) is not None


def redact_text(text: str) -> str:
    """`text` with session, refresh and access tokens and URL passwords masked."""
    text = _TOKEN.sub(REDACTED_TOKEN, text)
    text = _JWT.sub(REDACTED_JWT, text)
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    return _QUERY_PASSWORD.sub(r"\g<head>***", text)


def redact(obj: Any) -> Any:
    """A copy of `obj` with secrets masked: recursive over mappings, lists, tuples and sets;
    other values (numbers, None, ...) come back as they are."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, Mapping):
        return {
            key: REDACTED if _is_secret_key(key) else redact(value) for key, value in obj.items()
        }
    if isinstance(obj, list | tuple | set | frozenset):
        return [redact(item) for item in obj]
    return obj


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in SECRET_KEYS


class JsonFormatter(logging.Formatter):
    """Formats a record as one redacted JSON object (no trailing newline)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        # Reserved names win: an extra cannot overwrite the fields every line is parsed by.
        for key, value in redact(extras).items():
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = redact_text("".join(traceback.format_exception(*record.exc_info)))
        return orjson.dumps(entry, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()


def _fallback(value: object) -> str:
    # Objects orjson cannot encode are logged by their str(); SecretStr prints masked.
    return redact_text(str(value))


class _JsonHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler this module installed, so a second configure replaces it."""


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every log record, as JSON lines, to `stream` (default: stdout). Idempotent: a
    second call replaces the handler installed by the first instead of adding another."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
