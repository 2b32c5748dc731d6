"""Encryption in transit for every process that connects to the broker: the TLS client
context for `amqps://` URLs and the connect arguments that carry it, and what counts as a
loopback host (where plain text never leaves the machine). Standard library only, so the
worker, the mail sender, the client library and the tools share one definition."""

from tls.amqp import (
    URL_TLS_PARAMETERS,
    TlsFiles,
    amqp_connect_kwargs,
    client_context,
    is_amqps,
    is_loopback,
    refused_certificate,
    url_tls_parameters,
)

__all__ = [
    "URL_TLS_PARAMETERS",
    "TlsFiles",
    "amqp_connect_kwargs",
    "client_context",
    "is_amqps",
    "is_loopback",
    "refused_certificate",
    "url_tls_parameters",
]
