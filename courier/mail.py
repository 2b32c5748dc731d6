"""One courier message as one MIME mail: headers, a plain-text part and an HTML alternative.

The `Message-ID` is derived from the courier `message_id` alone (`<message_id.courier@domain
of IDENTITY_MAIL_FROM>`), so a redelivery after a crash between the SMTP server's "250" and
the broker's ack carries the same Message-ID as the first mail, and receivers that dedupe on
it show one. The `Date` is when the worker acted (`occurred_at`), the same on every try.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from courier.render import RenderedMail
from messages.courier import CourierMessage


class InvalidRecipient(ValueError):
    """The address cannot be put on the wire (a domain IDNA refuses)."""


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    message: EmailMessage
    sender: str  # the envelope's MAIL FROM
    recipient: str  # the envelope's RCPT TO


def message_id_header(message_id: str, domain: str) -> str:
    """The Message-ID of the mail for courier message `message_id`: the same on every try."""
    return f"<{message_id}.courier@{domain}>"


def wire_address(address: str) -> str:
    """`address` with its domain in IDNA (punycode) form, as SMTP servers take it; the local
    part is left as it is (non-ASCII ones need a server that offers SMTPUTF8)."""
    local, _, domain = address.rpartition("@")
    try:
        ascii_domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidRecipient("the domain has no IDNA form") from None
    return f"{local}@{ascii_domain.lower()}"


def build_mail(message: CourierMessage, rendered: RenderedMail, sender: Address) -> OutgoingMail:
    recipient = wire_address(message.to)
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = rendered.subject
    mail["Date"] = format_datetime(message.occurred_at)
    mail["Message-ID"] = message_id_header(message.message_id, sender.domain)
    # RFC 3834: sent by a program, so vacation responders and the like stay silent.
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Auto-Response-Suppress"] = "All"
    mail.set_content(rendered.text)
    mail.add_alternative(rendered.html, subtype="html")
    return OutgoingMail(mail, sender.addr_spec, recipient)


class AddressTagger:
    """Stands for an address in logs: a keyed hash (operators who hold the key can find the
    lines of one address; nobody can read the address back) and the domain."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def tag(self, address: str) -> str:
        digest = hmac.new(self._key, address.strip().lower().encode(), hashlib.sha256)
        return digest.hexdigest()[:16]

    @staticmethod
    def domain(address: str) -> str:
        return address.rpartition("@")[2].lower()
