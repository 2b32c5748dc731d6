"""A real SMTP server in the test process (aiosmtpd), recording what it accepts.

aiosmtpd's `Controller` runs the server on an event loop of its own in a thread, so the
tests' loop and the mail sender under test talk to it over a real socket. Pitfalls handled
here: `Controller(port=0)` does not work (its readiness check connects to port 0), so a free
port is picked first and kept across stop/start (the "server down for a while" tests); an
authenticator must answer `handled=False`, or a refused login gets no reply at all; and
aiosmtpd does not count implicit TLS as TLS for AUTH, so that server allows AUTH "without" it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import ssl
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support.workers import free_port

# aiosmtpd logs every command, addresses included, at INFO: not what a test is about.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def part(self, content_type: str) -> str:
        body = self.message.get_body(preferencelist=(content_type.split("/")[1],))
        assert body is not None, f"no {content_type} part"
        assert body.get_content_type() == content_type
        content = body.get_content()
        assert isinstance(content, str)
        return content


@dataclass
class Recorder:
    """The aiosmtpd handler: records accepted mails; canned refusals on demand."""

    received: list[Received] = field(default_factory=list)
    # address (lower case) -> the reply to its RCPT, e.g. "550 5.1.1 no such mailbox"
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    # replies to the next DATA commands, in order, e.g. ["451 4.3.0 try again later"]
    data_replies: list[str] = field(default_factory=list)
    # a slow server: seconds each DATA takes before its reply; set when one has begun
    data_delay_s: float = 0.0
    data_started: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self.refuse_rcpt.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started.set()
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        with self._lock:
            if self.data_replies:
                return self.data_replies.pop(0)
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
        return "250 Message accepted"

    def mails(self) -> list[Received]:
        with self._lock:
            return list(self.received)


def _authenticator(user: str, password: str) -> Any:
    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


class SmtpServer:
    """One aiosmtpd server on a fixed local port: plain, STARTTLS (required) or implicit TLS,
    with or without required authentication. `stop()` and `start()` again on the same port."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        starttls: bool = True,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.recorder = Recorder()
        self._tls = tls
        self._implicit = implicit_tls
        self._starttls = starttls
        self._credentials = credentials
        self._controller: Controller | None = None

    def _make(self) -> Controller:
        kwargs: dict[str, Any] = {}
        if self._credentials is not None:
            kwargs.update(authenticator=_authenticator(*self._credentials), auth_required=True)
        if self._tls is not None and self._implicit:
            kwargs.update(ssl_context=self._tls, auth_require_tls=False)
        elif self._tls is not None and self._starttls:
            kwargs.update(tls_context=self._tls, require_starttls=True)
        elif self._credentials is not None:
            kwargs.update(auth_require_tls=False)
        return Controller(self.recorder, hostname=self.host, port=self.port, **kwargs)

    def start(self) -> SmtpServer:
        assert self._controller is None
        self._controller = self._make()
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def url(self, scheme: str = "smtp+insecure", credentials: tuple[str, str] | None = None) -> str:
        userinfo = f"{credentials[0]}:{credentials[1]}@" if credentials else ""
        return f"{scheme}://{userinfo}{self.host}:{self.port}"

    def mails(self) -> list[Received]:
        return self.recorder.mails()
