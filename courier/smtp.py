"""Sending over SMTP with aiosmtplib: a small pool of open connections, and one verdict per
failure (try again later, or never).

Connections are opened with the security the URL asks for and nothing less: `smtp://`
requires STARTTLS (aiosmtplib's default would send in plain text when a server, or a machine
in the middle, does not offer it), `smtps://` speaks TLS from the first byte, and both verify
the certificate and the host name. A connection is kept for the next mail (a TLS handshake
and a login per mail would cost more than the mail), closed after any error, after
`MAX_MAILS_PER_CONNECTION` mails, and when idle longer than `IDLE_S` (servers drop idle
clients; sending on a dropped one costs a failed try).

Verdicts (`SmtpFailure.transient`):

- transient: a 4xx reply; the server unreachable, refusing or resetting the connection, or
  silent past the timeout; TLS that fails (certificate, STARTTLS not offered); login refused.
  The last two are the operator's to fix, not the message's fault: the message waits.
- permanent: a 5xx reply to MAIL, RCPT or DATA (no such mailbox, policy, size), an address
  that cannot be put on the wire, an address that needs SMTPUTF8 from a server without it.

`reason` is a short label from a closed set, for metrics and logs. Server reply texts are
never kept: they often quote the recipient's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPNotSupported,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from courier.mail import InvalidRecipient, OutgoingMail
from courier.settings import SmtpTarget

MAX_MAILS_PER_CONNECTION = 100
IDLE_S = 30.0
QUIT_S = 2.0

# Transient reasons (retried), then permanent ones (dead-lettered).
TRANSIENT_REASONS = ("smtp_4xx", "connection", "timeout", "tls", "auth")
PERMANENT_REASONS = ("rejected", "recipient_refused", "sender_refused", "invalid_recipient")


class SmtpFailure(Exception):
    """A send that did not happen: `transient` says whether trying again may help."""

    def __init__(self, reason: str, *, transient: bool, code: int | None = None) -> None:
        super().__init__(reason if code is None else f"{reason} ({code})")
        self.reason = reason
        self.transient = transient
        self.code = code


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify_connect(exc: BaseException) -> SmtpFailure:
    """Whatever stops a connection from opening is transient: it is not the message's fault."""
    if isinstance(exc, SmtpFailure):
        return exc
    code = exc.code if isinstance(exc, SMTPResponseException) else None
    if isinstance(exc, SMTPAuthenticationError):
        return SmtpFailure("auth", transient=True, code=code)
    if _caused_by(exc, ssl.SSLError) or isinstance(exc, SMTPNotSupported):
        return SmtpFailure("tls", transient=True)  # bad certificate, no STARTTLS offered
    if _caused_by(exc, TimeoutError):
        return SmtpFailure("timeout", transient=True)
    return SmtpFailure("connection", transient=True, code=code)


def _step_failure(exc: BaseException, reason: str) -> SmtpFailure:
    """A failure of STARTTLS or the login on an open connection: the network's own (a
    timeout, a dropped connection) keep their reason, a TLS error is `tls`, and anything else
    (not offered, refused) is the step's own `reason`."""
    if _caused_by(exc, ssl.SSLError):
        return SmtpFailure("tls", transient=True)
    if _caused_by(exc, TimeoutError):
        return SmtpFailure("timeout", transient=True)
    if isinstance(exc, ConnectionError):
        return SmtpFailure("connection", transient=True)
    code = exc.code if isinstance(exc, SMTPResponseException) else None
    return SmtpFailure(reason, transient=True, code=code)


def classify_send(exc: BaseException) -> SmtpFailure:
    """The verdict on a failure of MAIL, RCPT or DATA on an open connection."""
    if isinstance(exc, SmtpFailure):
        return exc
    if isinstance(exc, InvalidRecipient | ValueError):
        # aiosmtplib refuses addresses it cannot put on the wire safely with a ValueError.
        return SmtpFailure("invalid_recipient", transient=False)
    if isinstance(exc, SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        code = max(codes, default=None)
        if code is not None and code >= 500:
            return SmtpFailure("recipient_refused", transient=False, code=code)
        return SmtpFailure("smtp_4xx", transient=True, code=code)
    if isinstance(exc, SMTPNotSupported):
        return SmtpFailure("invalid_recipient", transient=False)  # SMTPUTF8 needed, not offered
    if isinstance(exc, SMTPResponseException):
        if 400 <= exc.code < 500:
            return SmtpFailure("smtp_4xx", transient=True, code=exc.code)
        if exc.code >= 500:
            reason = "sender_refused" if isinstance(exc, SMTPSenderRefused) else "rejected"
            return SmtpFailure(reason, transient=False, code=exc.code)
        return SmtpFailure("connection", transient=True, code=exc.code)  # nonsense reply
    if _caused_by(exc, TimeoutError):
        return SmtpFailure("timeout", transient=True)
    if isinstance(exc, ConnectionError | OSError):
        return SmtpFailure("connection", transient=True)
    raise exc  # a bug, not an SMTP outcome


@dataclass(slots=True)
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SmtpPool:
    """At most `size` connections to one SMTP server, each used by one send at a time."""

    def __init__(
        self,
        target: SmtpTarget,
        *,
        tls_context: ssl.SSLContext | None,
        timeout_s: float,
        size: int,
    ) -> None:
        self.target = target
        self._tls = tls_context
        self._timeout = timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._closed = False

    def _client(self) -> aiosmtplib.SMTP:
        target = self.target
        return aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            use_tls=target.security == "tls",
            # STARTTLS and the login are done step by step in _open, to tell the failures
            # apart; never left to aiosmtplib's opportunistic default.
            start_tls=False,
            validate_certs=True,
            tls_context=self._tls if target.security != "none" else None,
            timeout=self._timeout,
        )

    async def _open(self) -> _Connection:
        """Connect (TLS from the first byte for smtps://), STARTTLS for smtp:// (no mail
        without it), then log in if the URL has credentials."""
        target = self.target
        client = self._client()
        try:
            try:
                await client.connect()
            except Exception as exc:
                raise classify_connect(exc) from None
            if target.security == "starttls":
                try:
                    await client.starttls()
                except Exception as exc:
                    raise _step_failure(exc, "tls") from None
            if target.username is not None and target.password is not None:
                try:
                    await client.login(target.username, target.password)
                except Exception as exc:
                    raise _step_failure(exc, "auth") from None
        except BaseException:
            client.close()
            raise
        return _Connection(client)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[tuple[_Connection, bool]]:
        """A connection for one send, and whether it was reused; kept afterwards only if the
        block ended without an error."""
        async with self._slots:
            reused = self._take_idle()
            connection = reused or await self._open()
            try:
                yield connection, reused is not None
            except BaseException:
                connection.client.close()
                raise
            connection.sent += 1
            connection.last_used = time.monotonic()
            if connection.sent >= MAX_MAILS_PER_CONNECTION or self._closed:
                await self._quit(connection)
            else:
                self._idle.append(connection)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.client.is_connected and now - connection.last_used < IDLE_S:
                return connection
            connection.client.close()
        return None

    async def send(self, mail: OutgoingMail) -> None:
        """Send `mail`, or raise SmtpFailure. A connection the server dropped while it sat
        idle is replaced once at once, without counting as a failed try."""
        for attempt in (1, 2):
            reused = False
            try:
                async with self._connection() as (connection, reused):
                    await connection.client.send_message(
                        mail.message, sender=mail.sender, recipients=[mail.recipient]
                    )
                return
            except SmtpFailure:
                raise
            except SMTPServerDisconnected as exc:
                if attempt == 1 and reused:
                    continue
                raise classify_send(exc) from None
            except Exception as exc:
                raise classify_send(exc) from None

    async def probe(self) -> None:
        """Open a fresh connection (TLS, login), say NOOP and QUIT: raises SmtpFailure if the
        server cannot be used. Counts against the pool's size, like a send."""
        async with self._slots:
            connection = await self._open()
            try:
                await connection.client.noop()
            except Exception as exc:
                connection.client.close()
                raise classify_connect(exc) from None
            await self._quit(connection)

    async def _quit(self, connection: _Connection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.client.quit(), QUIT_S)
        connection.client.close()

    async def close(self) -> None:
        """QUIT every idle connection; those in use close when their send ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle), return_exceptions=True)
