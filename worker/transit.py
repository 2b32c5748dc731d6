"""What production refuses on the way to the broker and the database (contract v2, section 5):
plain text to a host that is not loopback, since commands carry passwords and the database
holds password hashes. Shared by the worker's and the mail sender's settings.

    amqps://...                                encrypted, broker certificate verified
    amqp://...@127.0.0.1 or @localhost         plain text on this machine: allowed
    amqp://...@rabbit.internal                 refused unless IDENTITY_ALLOW_PLAINTEXT=true
    postgresql://...?sslmode=verify-full       encrypted, certificate and host name checked
    postgresql://...@db.internal/identity      refused (libpq's default sslmode, prefer,
                                               falls back to plain text without a word)

Each check returns the problem as a sentence naming the variable (never its value), or None.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qsl, unquote, urlsplit

from tls import TlsFiles, is_amqps, is_loopback, url_tls_parameters

# libpq's sslmodes that never talk plain text (verify-full also checks the host name).
ENCRYPTED_SSLMODES = frozenset({"require", "verify-ca", "verify-full"})

_WHY = "commands carry passwords"


def _escape_hatch(allow: str) -> str:
    return f"or set {allow}=true if the network is protected otherwise (a service mesh, IPsec)"


def plaintext_amqp_problem(variable: str, url: str, allow: str) -> str | None:
    """Production's rule for a broker URL: amqps://, or plain text to loopback only."""
    parts = urlsplit(url)
    if parts.scheme == "amqps" or is_loopback(parts.hostname):
        return None
    return (
        f"{variable}: plain-text amqp:// to a host that is not loopback is refused in"
        f" production ({_WHY}): use amqps:// (a private CA in IDENTITY_AMQP_CA_FILE), "
        + _escape_hatch(allow)
    )


def postgres_hosts(url: str) -> list[str]:
    """Every host a libpq URL may reach: the authority's (a multi-host list), the query's
    `host=` (libpq lets it override the authority, asyncpg uses it only without one: both
    count), and, when the URL names none, `PGHOST` (which both read then); "" for the default
    Unix socket."""
    parts = urlsplit(url)
    listed = [parts.netloc.rpartition("@")[2]]
    listed += [value for name, value in parse_qsl(parts.query) if name == "host"]
    if not any(listed):
        listed.append(os.environ.get("PGHOST", ""))
    hosts = []
    for item in unquote(",".join(x for x in listed if x)).split(","):
        item = item.strip()
        if item.startswith("["):  # [::1]:5432
            hosts.append(item[1 : item.find("]")])
        elif item.startswith("/"):
            hosts.append(item)
        elif item:
            hosts.append(item.partition(":")[0])
    return hosts or [""]


def postgres_sslmode(url: str) -> str | None:
    """The URL's `sslmode`, as libpq reads it (the last one given); None when absent."""
    modes = [value for name, value in parse_qsl(urlsplit(url).query) if name == "sslmode"]
    return modes[-1] if modes else None


def plaintext_database_problem(variable: str, url: str, allow: str) -> str | None:
    """Production's rule for a database URL: sslmode require/verify-ca/verify-full, or only
    loopback hosts and Unix sockets."""
    if postgres_sslmode(url) in ENCRYPTED_SSLMODES:
        return None
    if all(is_loopback(host) for host in postgres_hosts(url)):
        return None
    return (
        f"{variable}: a database URL to a host that is not loopback needs sslmode=verify-full"
        f" (or require / verify-ca) in production ({_WHY}, the database holds their hashes);"
        " sslrootcert= names a private CA; " + _escape_hatch(allow)
    )


def tls_files_problem(url_variable: str, url: str, files: TlsFiles, names: TlsFiles) -> str | None:
    """The broker's TLS files are usable, and used: readable PEM, a key only with a
    certificate, and an amqps:// URL to use them on. `names` holds the variables' names."""
    if url_tls_parameters(url):
        return (
            f"{url_variable}: TLS options in the URL's query are not used; give"
            f" {names.ca_file}, {names.cert_file} and {names.key_file} instead"
        )
    if not files.configured:
        return None
    if not is_amqps(url):
        return (
            f"{names.ca_file}, {names.cert_file} and {names.key_file} apply to amqps:// only:"
            f" {url_variable} is plain text, so they would silently not be used"
        )
    try:
        ssl.create_default_context(cafile=files.ca_file)
    except (OSError, ssl.SSLError):
        return f"{names.ca_file}: must be a readable file of PEM CA certificates"
    if files.key_file is not None and files.cert_file is None:
        return f"{names.key_file}: a client key needs its certificate in {names.cert_file}"
    if files.cert_file is not None:
        try:
            ssl.create_default_context().load_cert_chain(files.cert_file, files.key_file)
        except (OSError, ssl.SSLError):
            return (
                f"{names.cert_file} / {names.key_file}: must be a readable PEM certificate"
                " and its private key (unencrypted)"
            )
    return None
