"""Refresh tokens, the tokens a sign-in or a refresh hands out, and `session.refresh` itself.

A refresh token is opaque to callers, bound to one session, and derived, never stored:

    r1.<kid>.<session_id>.<generation>.<mac>
    mac = base64url(HMAC-SHA256(refresh_key(kid), "r1.<kid>.<session_id>.<generation>"))

- 256 bits of MAC under a subkey of the session-token keys (IDENTITY_SIGNING_KEYS, purpose
  "refresh-token", so it is never a session token's MAC). The session row keeps the current
  `refresh_generation`; neither the token nor anything that gives it back is stored, so a
  reader of the database cannot make one.
- Rotation: presenting generation g of a live session (g current) moves the session to g + 1
  and answers with the tokens of g + 1. The row is locked and the move is a compare-and-set
  on the generation, so of two refreshes with one token exactly one wins.
- Reuse: a token of an older generation means two parties hold one session (a copy was
  stolen): the session ends (`refresh_token_reused`) and the answer is `invalid_token`.
  Except within `reuse_grace` after the rotation that used it up, and only for the
  generation just before the current one: that is the same client sending two refreshes at
  once, and the loser only gets `invalid_token` (the winner's reply holds the new tokens).
- A refresh counts as activity (`last_seen_at`); an ended, expired or idle session, or a
  disabled account, answers `session_expired`.

What a reply's tokens are derived from (`TokenIssue`: the generation, the issue time, the
roles then held, the key ids) is kept with the idempotency record, never the tokens, so a
replayed `session.start` or `session.refresh` hands out the very same tokens, whatever
happened to the session or the account since.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr

from messages import GetJwks, JwksResult, RefreshSession, RefreshSessionResult
from services.access_tokens import (
    DEFAULT_ISSUER,
    DEFAULT_TTL_S,
    MAX_TTL_S,
    AccessClaims,
    AccessTokenSigner,
    numeric_date,
)
from services.clock import Clock
from services.errors import InvalidTokenError, SessionExpiredError
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.shapes import announce_ended, idle_cutoff, session_is_live, to_session
from services.tokens import SigningKey
from stores import ServiceStore, SessionRecord, TransientStoreError

MAX_REFRESH_TOKEN_LENGTH = 256
_VERSION = "r1"
_PURPOSE = b"identity-worker/refresh-token"
_SHAPE = re.compile(
    r"r1\.(?P<kid>[a-z0-9][a-z0-9-]{0,31})\.(?P<sid>ses_[0-9a-z]{32})"
    r"\.(?P<gen>0|[1-9][0-9]{0,9})\.(?P<mac>[A-Za-z0-9_-]{43})"
)
# What the caller is told when a used refresh token comes back: the session ended with it.
REUSED_MESSAGE = "The refresh token was used already; its session has ended. Sign in again."


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """Access tokens' issuer and lifetime, and the grace of a refresh token just used up."""

    issuer: str = DEFAULT_ISSUER
    access_ttl: timedelta = timedelta(seconds=DEFAULT_TTL_S)
    reuse_grace: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        if not timedelta(seconds=1) <= self.access_ttl <= timedelta(seconds=MAX_TTL_S):
            raise ValueError("the access token lifetime must be 1 s to 1 hour")
        if self.reuse_grace < timedelta(0):
            raise ValueError("the reuse grace must not be negative")


@dataclass(frozen=True, slots=True)
class PresentedRefresh:
    """A genuine refresh token, taken apart."""

    kid: str
    session_id: str
    generation: int


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class RefreshTokenCodec:
    """Derives and checks refresh tokens under the session-token keys (the first one signs)."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        # Only the derived subkeys are kept, as in TokenSigner.
        self._subkeys = {
            key.kid: hmac.new(key.secret, _PURPOSE, hashlib.sha256).digest() for key in keys
        }
        self._current = keys[0].kid

    def __repr__(self) -> str:
        return f"RefreshTokenCodec(kids={list(self._subkeys)!r})"

    @property
    def current_kid(self) -> str:
        return self._current

    def kid_for(self, kid: str | None) -> str:
        return kid if kid is not None and kid in self._subkeys else self._current

    def _mac(self, kid: str, session_id: str, generation: int) -> str:
        message = f"{_VERSION}.{kid}.{session_id}.{generation}".encode("ascii")
        return _b64url(hmac.digest(self._subkeys[kid], message, "sha256"))

    def sign(self, session_id: str, generation: int, kid: str | None = None) -> str:
        """The refresh token of `session_id` at `generation`, under `kid` while it is
        configured (else the current key)."""
        use = self.kid_for(kid)
        if generation < 0:
            raise ValueError("a generation is not negative")
        mac = self._mac(use, session_id, generation)
        token = f"{_VERSION}.{use}.{session_id}.{generation}.{mac}"
        if not _SHAPE.fullmatch(token):
            raise ValueError("not a session id")
        return token

    def verify(self, token: str) -> PresentedRefresh:
        """The parts of a genuine token; `InvalidTokenError` for anything else (before any
        database read)."""
        if not isinstance(token, str) or len(token) > MAX_REFRESH_TOKEN_LENGTH:
            raise InvalidTokenError()
        shape = _SHAPE.fullmatch(token)
        if shape is None or shape["kid"] not in self._subkeys:
            raise InvalidTokenError()
        kid, session_id, generation = shape["kid"], shape["sid"], int(shape["gen"])
        expected = self._mac(kid, session_id, generation).encode("ascii")
        if not hmac.compare_digest(expected, shape["mac"].encode("ascii")):
            raise InvalidTokenError()
        return PresentedRefresh(kid, session_id, generation)


@dataclass(frozen=True, slots=True)
class TokenIssue:
    """What one reply's access and refresh tokens are derived from. Kept with the idempotency
    record (no secret in it), so that a replay derives the same tokens."""

    generation: int
    issued_at: int  # NumericDate: the access token's `iat`
    expires_at: int  # its `exp`
    roles: tuple[str, ...]
    jwt_kid: str
    refresh_kid: str

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "roles": list(self.roles),
            "jwt_kid": self.jwt_kid,
            "refresh_kid": self.refresh_kid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenIssue:
        return cls(
            generation=int(data["generation"]),
            issued_at=int(data["issued_at"]),
            expires_at=int(data["expires_at"]),
            roles=tuple(str(role) for role in data["roles"]),
            jwt_kid=str(data["jwt_kid"]),
            refresh_kid=str(data["refresh_kid"]),
        )

    @property
    def expires(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: SecretStr
    access_token_expires_at: datetime
    refresh_token: SecretStr


class SessionTokens:
    """Issues (decides the facts of) and derives the access and refresh tokens of a session."""

    def __init__(
        self, access: AccessTokenSigner, refresh: RefreshTokenCodec, policy: TokenPolicy
    ) -> None:
        self.access = access
        self.refresh = refresh
        self.policy = policy

    def issue(self, session: SessionRecord, roles: Sequence[str], now: datetime) -> TokenIssue:
        """The facts of the tokens of `session` at its current generation, issued `now` with
        the current keys. The access token never outlives the session."""
        issued_at = numeric_date(now)
        lifetime = int(self.policy.access_ttl.total_seconds())
        expires_at = min(issued_at + lifetime, numeric_date(session.expires_at))
        return TokenIssue(
            generation=session.refresh_generation,
            issued_at=issued_at,
            expires_at=max(expires_at, issued_at),
            roles=tuple(sorted(set(roles))),
            jwt_kid=self.access.current_kid,
            refresh_kid=self.refresh.current_kid,
        )

    def issue_at_start(self, stored: Mapping[str, Any]) -> TokenIssue:
        """The facts of the first tokens of a sign-in whose stored reply predates access
        tokens (it kept no facts): generation 0, issued when the session started, with the
        roles in the stored account and the current keys."""
        session = stored["session"]
        started = datetime.fromisoformat(str(session["created_at"]))
        issued_at = numeric_date(started)
        lifetime = int(self.policy.access_ttl.total_seconds())
        ends = numeric_date(datetime.fromisoformat(str(session["expires_at"])))
        return TokenIssue(
            generation=0,
            issued_at=issued_at,
            expires_at=max(min(issued_at + lifetime, ends), issued_at),
            roles=tuple(sorted(str(role) for role in stored["account"].get("roles", []))),
            jwt_kid=self.access.current_kid,
            refresh_kid=self.refresh.current_kid,
        )

    def derive(self, account_id: str, session_id: str, issue: TokenIssue) -> IssuedTokens:
        """The tokens `issue` describes (with its keys while they are configured)."""
        claims = AccessClaims(
            account_id=account_id,
            session_id=session_id,
            roles=issue.roles,
            issued_at=issue.issued_at,
            expires_at=issue.expires_at,
        )
        return IssuedTokens(
            access_token=SecretStr(self.access.sign(claims, issue.jwt_kid)),
            access_token_expires_at=issue.expires,
            refresh_token=SecretStr(
                self.refresh.sign(session_id, issue.generation, issue.refresh_kid)
            ),
        )


class TokenService:
    """`session.refresh` and `keys.jwks`."""

    def __init__(
        self,
        store: ServiceStore,
        ops: OperationRunner,
        clock: Clock,
        tokens: SessionTokens,
        *,
        idle_timeout: timedelta,
    ) -> None:
        self._store = store
        self._ops = ops
        self._clock = clock
        self._tokens = tokens
        self._idle_timeout = idle_timeout

    async def jwks(self, cmd: GetJwks, ctx: CommandContext = NO_CONTEXT) -> JwksResult:
        return JwksResult.model_validate(self._tokens.access.jwks())

    async def refresh_session(
        self, cmd: RefreshSession, ctx: CommandContext = NO_CONTEXT
    ) -> RefreshSessionResult:
        # A forged token is refused before anything is looked up or remembered.
        presented = self._tokens.refresh.verify(cmd.refresh_token.get_secret_value())
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op,
            RefreshSessionResult,
            lambda op: self._refresh(op, presented),
            restore=self._replayed,
        )

    async def _refresh(self, op: Operation, presented: PresentedRefresh) -> RefreshSessionResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            # Locked: a concurrent refresh, sign-out or password change waits for this one.
            session = await uow.lock_session(presented.session_id)
            if session is None:
                raise SessionExpiredError()
            account = await uow.get_account(session.account_id)
            live = session_is_live(session, now, self._idle_timeout)
            if account is None or account.status != "active" or not live:
                raise SessionExpiredError()
            if presented.generation == session.refresh_generation:
                rotated = await uow.rotate_refresh_token(session.id, presented.generation, now)
                if rotated is None:  # cannot happen under the lock; retried if it does
                    raise TransientStoreError("the session changed under its row lock")
                issue = self._tokens.issue(rotated, account.roles, now)
                result = self._result(rotated.account_id, rotated, issue)
                await self._ops.finish(uow, op, result, derive=issue.to_json())
                return result
            if presented.generation > session.refresh_generation or self._in_grace(
                session, presented.generation, now
            ):
                raise InvalidTokenError()
            # A used-up token came back: someone else holds a copy. End the session, and
            # commit that together with the answer.
            ended = await uow.end_session(
                session.id,
                now,
                "refresh_token_reused",
                idle_cutoff=idle_cutoff(now, self._idle_timeout),
            )
            announce_ended(op, [ended] if ended is not None else [], "refresh_token_reused", now)
            error = InvalidTokenError(REUSED_MESSAGE)
            await self._ops.fail(uow, op, error)
        raise error

    def _in_grace(self, session: SessionRecord, generation: int, now: datetime) -> bool:
        """Whether `generation` was used up by the rotation just before this request, too
        recently to call a second use theft (a client racing itself)."""
        return (
            generation == session.refresh_generation - 1
            and session.refreshed_at is not None
            and now - session.refreshed_at < self._tokens.policy.reuse_grace
        )

    def _result(
        self, account_id: str, session: SessionRecord, issue: TokenIssue
    ) -> RefreshSessionResult:
        tokens = self._tokens.derive(account_id, session.id, issue)
        return RefreshSessionResult(
            session=to_session(session),
            access_token=tokens.access_token,
            access_token_expires_at=tokens.access_token_expires_at,
            refresh_token=tokens.refresh_token,
        )

    async def _replayed(
        self, stored: Mapping[str, Any], derive: Mapping[str, Any] | None
    ) -> RefreshSessionResult:
        if derive is None:
            raise ValueError("a stored refresh has the facts of its tokens")
        issue = TokenIssue.from_json(derive)
        session_id = RefreshSessionResult.stored_session_id(stored)
        tokens = self._tokens.derive(str(stored["session"]["account_id"]), session_id, issue)
        return RefreshSessionResult.from_stored(
            stored,
            access_token=tokens.access_token.get_secret_value(),
            refresh_token=tokens.refresh_token.get_secret_value(),
        )
