"""One-time codes: made, shown, read back, keyed, sealed for the courier, and throttled.

    code     8 characters of Crockford's base32 (40 bits from the OS's CSPRNG), shown to a
             person as ``ABCD-EFGH``; read back ignoring case, dashes and spaces, with
             Crockford's look-alikes (O -> 0, I and L -> 1)
    mac      what the database keeps instead: HMAC-SHA256 under a subkey of the HMAC key, over
             (purpose, canonical email, code). The database never holds the key, so a copy of
             it gives no code back, even by trying all 2^40; and a code mailed to one address
             or for one purpose is worth nothing for another.
    sealed   the code in its courier row until the relay has handed it to the broker:
             XOR with HMAC-SHA256(seal subkey, message_id), a keystream that is never reused
             because message ids are unique (a PRF in counter mode, one block). A database
             copy taken before the relay therefore holds no readable code either; the relay
             unseals, publishes, and the row's sealed code is wiped.
    tags     throttle counters are keyed by HMAC of what they count (an email, a source), so
             the table holds no address and no client IP.

Each subkey is HMAC(key, purpose), so no two uses of the key can stand in for each other.
`CodePolicy` holds the numbers: lifetime, wrong attempts per code, and the per-email and
per-source limits on requests and attempts, counted per fixed window.
"""

from __future__ import annotations

import hmac
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.errors import RateLimitedError
from services.ids import new_message_id
from services.operations import NO_CONTEXT, CommandContext
from stores import (
    RECOVERY,
    AccountRecord,
    CodeIssue,
    Limit,
    NewCode,
    NewEvent,
    NewMail,
    UnitOfWork,
)
from stores.codes import CodeReads

CODE_LENGTH = 8  # x 5 bits = 40 bits
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Crockford's decoding: look-alikes read as the digit they resemble.
_LOOK_ALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})
_IGNORED = str.maketrans("", "", "- \t")
MIN_KEY_BYTES = 32

_MAC_PURPOSE = b"identity-worker/hmac/one-time-code"
_SEAL_PURPOSE = b"identity-worker/hmac/courier-seal"
_TAG_PURPOSE = b"identity-worker/hmac/code-throttle"
TAG_BYTES = 16

# What each purpose mails: its code kind.
CODE_KIND = {RECOVERY: "recovery_code", "verification": "verification_code"}
ATTEMPTS_MESSAGE = "Too many attempts at a code; try again later."


def new_code() -> str:
    """A fresh code, 8 characters of Crockford's base32, as stored and compared."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(CODE_LENGTH))


def show_code(code: str) -> str:
    """``ABCDEFGH`` -> ``ABCD-EFGH``: how a person sees it."""
    half = len(code) // 2
    return f"{code[:half]}-{code[half:]}"


def read_code(typed: str) -> str:
    """What a person typed, in the form codes are made in (case, dashes and spaces ignored,
    look-alikes mapped); anything else stays as it is and simply never matches."""
    return typed.translate(_IGNORED).upper().translate(_LOOK_ALIKES)


@dataclass(frozen=True, slots=True)
class CodePolicy:
    """Lifetimes and limits of one-time codes, and the two verification switches."""

    lifetime: timedelta = timedelta(seconds=900)
    max_attempts: int = 5  # wrong tries that void a code
    window: timedelta = timedelta(seconds=900)  # the throttle's fixed window
    requests_per_email: int = 3
    requests_per_source: int = 50
    attempts_per_email: int = 10
    attempts_per_source: int = 50
    send_verification_on_create: bool = True
    require_verified_email: bool = False


class CodeKeys:
    """The subkeys of the HMAC key that codes use; the key itself is not kept."""

    __slots__ = ("_mac", "_seal", "_tag")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"the HMAC key must be at least {MIN_KEY_BYTES} bytes")
        self._mac = hmac.digest(secret, _MAC_PURPOSE, "sha256")
        self._seal = hmac.digest(secret, _SEAL_PURPOSE, "sha256")
        self._tag = hmac.digest(secret, _TAG_PURPOSE, "sha256")

    def __repr__(self) -> str:
        return "CodeKeys(<redacted>)"

    def mac(self, purpose: str, email_canonical: str, code: str) -> bytes:
        message = "\x00".join((purpose, email_canonical, read_code(code))).encode()
        return hmac.digest(self._mac, message, "sha256")

    def seal(self, message_id: str, code: str) -> bytes:
        raw = code.encode("ascii")
        return bytes(a ^ b for a, b in zip(raw, self._keystream(message_id), strict=False))

    def unseal(self, message_id: str, sealed: bytes) -> str:
        stream = self._keystream(message_id)
        return bytes(a ^ b for a, b in zip(sealed, stream, strict=False)).decode("ascii")

    def _keystream(self, message_id: str) -> bytes:
        return hmac.digest(self._seal, message_id.encode(), "sha256")

    def tag(self, counted: str, value: str) -> bytes:
        """The throttle tag of `value` (an email, a source) for the counter `counted`."""
        message = f"{counted}\x00{value}".encode()
        return hmac.digest(self._tag, message, "sha256")[:TAG_BYTES]


class Codes:
    """Makes codes and courier rows for the flows, and counts their limits; the store keeps
    what it is handed."""

    def __init__(self, keys: CodeKeys, policy: CodePolicy) -> None:
        self.keys = keys
        self.policy = policy

    async def send_code(
        self,
        uow: UnitOfWork,
        account: AccountRecord,
        purpose: str,
        now: datetime,
        context: CommandContext = NO_CONTEXT,
    ) -> None:
        """Store a new code of `purpose` for `account` (replacing the live one) and mail it to
        the account's address, in `uow`; the mail carries `context`'s trace."""
        code = new_code()
        expires_at = now + self.policy.lifetime
        mac = self.keys.mac(purpose, account.email_canonical, code)
        await uow.put_code(NewCode(account.id, purpose, mac, now, expires_at))
        message_id = new_message_id(now)
        mail = NewMail(
            message_id=message_id,
            kind=CODE_KIND[purpose],
            recipient=account.email,
            account_id=account.id,
            display_name=account.display_name,
            sealed_code=self.keys.seal(message_id, code),
            expires_at=expires_at,
            created_at=now,
            traceparent=context.traceparent,
            tracestate=context.tracestate,
        )
        await uow.add_mail([mail])

    @staticmethod
    def notice(
        kind: str,
        recipient: str,
        account: AccountRecord,
        now: datetime,
        context: CommandContext = NO_CONTEXT,
    ) -> NewMail:
        """A courier row that carries no code (`email_changed_notice`,
        `password_changed_notice`)."""
        return NewMail(
            message_id=new_message_id(now),
            kind=kind,
            recipient=recipient,
            account_id=account.id,
            display_name=account.display_name,
            sealed_code=None,
            expires_at=None,
            created_at=now,
            traceparent=context.traceparent,
            tracestate=context.tracestate,
        )

    def issue(
        self,
        purpose: str,
        email_canonical: str,
        source: str,
        now: datetime,
        *,
        event: NewEvent | None,
        unverified_only: bool,
        context: CommandContext = NO_CONTEXT,
    ) -> CodeIssue:
        """A request for a code, made in full whoever the email belongs to (the same work
        for an unknown email, a disabled account and a cool-down): the store decides."""
        code = new_code()
        message_id = new_message_id(now)
        limits = (
            Limit(self.keys.tag(f"request:{purpose}:email", email_canonical),
                  self.policy.requests_per_email),
            Limit(self.keys.tag("request:source", source), self.policy.requests_per_source),
        )  # fmt: skip
        return CodeIssue(
            email_canonical=email_canonical,
            purpose=purpose,
            mac=self.keys.mac(purpose, email_canonical, code),
            created_at=now,
            expires_at=now + self.policy.lifetime,
            limits=limits,
            window=self.policy.window,
            unverified_only=unverified_only,
            message_id=message_id,
            kind=CODE_KIND[purpose],
            sealed_code=self.keys.seal(message_id, code),
            event=event,
            traceparent=context.traceparent,
            tracestate=context.tracestate,
        )

    async def limit_attempts(
        self, store: CodeReads, email_canonical: str, source: str, now: datetime
    ) -> None:
        """Count an attempt at a code for the email and for the source; RateLimitedError
        beyond either limit. Counted by keyed tag whether or not the email has an account,
        so the answer tells nothing about it."""
        limits = (
            Limit(self.keys.tag("attempt:email", email_canonical), self.policy.attempts_per_email),
            Limit(self.keys.tag("attempt:source", source), self.policy.attempts_per_source),
        )
        wait = await store.hit_limits(limits, now, self.policy.window)
        if wait > 0:
            raise RateLimitedError(max(1, math.ceil(wait)), ATTEMPTS_MESSAGE)
