"""The one way an `amqps://` connection is made: the broker's certificate verified against
a CA file (else the system store), its host name checked, a client certificate presented
when one is configured.

    amqp_connect_kwargs(url, TlsFiles(ca_file=...))  ->  {"ssl_context": <verifying context>}
    amqp_connect_kwargs("amqp://...")                ->  {}   (plain text: no TLS at all)

The result goes to `aio_pika.connect` / `connect_robust` beside the URL. The context is built
here, never by aiormq from the URL's query: aiormq would honour `?no_verify_ssl=1`, which
turns verification off, so TLS options in the URL are refused (`url_tls_parameters`).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# What aiormq reads from an amqps:// URL's query; here they come from settings instead.
URL_TLS_PARAMETERS = frozenset(
    {"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"}
)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What a client trusts and presents: PEM files (paths), each optional. No CA file means
    the system's trust store; a certificate file may hold its key, else `key_file` does."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


def client_context(files: TlsFiles | None = None) -> ssl.SSLContext:
    """A context that verifies the server: certificate chain to the CA (or the system store),
    host name, TLS 1.2 at least. Raises OSError or ssl.SSLError for unreadable or bad files,
    ValueError for a key without a certificate."""
    files = files or TlsFiles()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca_file)
    # create_default_context already requires a certificate and checks the host name; said
    # here so that no later edit of this function can quietly drop either.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert_file is not None:
        context.load_cert_chain(files.cert_file, files.key_file)
    elif files.key_file is not None:
        raise ValueError("a client key needs its certificate")
    return context


def is_amqps(url: str) -> bool:
    return urlsplit(url).scheme == "amqps"


def url_tls_parameters(url: str) -> list[str]:
    """TLS options in the URL's query (aiormq's), which the context built here would ignore."""
    query = urlsplit(url).query
    return sorted({name for name, _ in parse_qsl(query)} & URL_TLS_PARAMETERS)


def amqp_connect_kwargs(
    url: str, files: TlsFiles | None = None, *, context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """The arguments `aio_pika.connect_robust(url, **them)` needs for `url`: a verifying
    context for amqps:// (`context` if given, else one from `files`), nothing for amqp://.
    ValueError when TLS is asked of a plain-text URL (it would silently not happen) or the URL
    carries TLS options of its own."""
    if not is_amqps(url):
        if context is not None or (files is not None and files.configured):
            raise ValueError("TLS options were given for a plain-text amqp:// URL: use amqps://")
        return {}
    if found := url_tls_parameters(url):
        raise ValueError(
            f"TLS options in the URL ({', '.join(found)}) are not used: give the CA, client"
            " certificate and key as files (settings or arguments) instead"
        )
    return {"ssl_context": context if context is not None else client_context(files)}


def is_loopback(host: str | None) -> bool:
    """Whether traffic to `host` stays on this machine: localhost, 127.0.0.0/8, ::1, or a
    Unix socket (a path, or no host at all for libpq). Names are not resolved: a name other
    than localhost counts as remote."""
    if not host or host.startswith("/"):
        return True
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refused_certificate(exc: BaseException) -> str | None:
    """Why a connection failed verifying the server's certificate (OpenSSL's words: "Hostname
    mismatch, ...", "self-signed certificate in certificate chain"), when that is what `exc`
    or an exception it was raised from is; else None. aiormq and the store wrap the error."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain, not a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return None
