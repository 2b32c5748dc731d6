"""Seeing and ending an account's sessions one by one: `session.list` and `session.revoke`.

A user sees their signed-in devices (when and from where each session was opened, as the
caller of `session.start` reported it, and when it was last seen) and ends one of them;
support staff do the same for any account. Never a token: a session is named by its id.

`session.list` is a query (no key needed): live sessions only (not ended, not expired, not
idle), oldest first in (created_at, id) order, a page at a time. The cursor is opaque to
callers: the position of the last session of the page, so sessions opened or ended between
two pages neither repeat nor shift the ones after them.

`session.revoke` acts on the session's account (what an `@self` grant is checked against;
`session_account` answers it). Ending an ended session is not an error and announces nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta

import orjson

from messages import ListSessions, ListSessionsResult, RevokeSession, RevokeSessionResult
from services.clock import Clock
from services.errors import InvalidInputError, NotFoundError
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.shapes import announce_ended, idle_cutoff, to_session_info
from stores import ServiceStore, SessionPosition, SessionRecord


class SessionAdmin:
    """`session.list` and `session.revoke`; `idle_timeout` is the one `session.verify`
    applies, so a listed session is one that would verify."""

    def __init__(
        self, store: ServiceStore, ops: OperationRunner, clock: Clock, idle_timeout: timedelta
    ) -> None:
        self._store = store
        self._ops = ops
        self._clock = clock
        self._idle_timeout = idle_timeout

    async def list_sessions(
        self, cmd: ListSessions, ctx: CommandContext = NO_CONTEXT
    ) -> ListSessionsResult:
        after = None if cmd.cursor is None else decode_cursor(cmd.cursor)
        if await self._store.get_account(cmd.account_id) is None:
            raise NotFoundError()
        now = self._clock.now()
        # One more than asked: whether there is a next page, without a second query.
        found = await self._store.list_live_sessions(
            cmd.account_id,
            now=now,
            idle_since=now - self._idle_timeout,
            after=after,
            limit=cmd.limit + 1,
        )
        page = found[: cmd.limit]
        more = len(found) > cmd.limit
        return ListSessionsResult(
            sessions=[to_session_info(session) for session in page],
            next_cursor=encode_cursor(page[-1]) if more else None,
        )

    async def revoke_session(
        self, cmd: RevokeSession, ctx: CommandContext = NO_CONTEXT
    ) -> RevokeSessionResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, RevokeSessionResult, lambda op: self._revoke(op, cmd))

    async def _revoke(self, op: Operation, cmd: RevokeSession) -> RevokeSessionResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            session = await uow.get_session(cmd.session_id)
            if session is None:
                raise NotFoundError("No such session.")
            ended = await uow.end_session(
                session.id, now, "revoked", idle_cutoff=idle_cutoff(now, self._idle_timeout)
            )
            announce_ended(op, [ended] if ended else [], "revoked", now)
            result = RevokeSessionResult(session_id=session.id, account_id=session.account_id)
            await self._ops.finish(uow, op, result)
        return result

    async def session_account(self, session_id: str) -> str | None:
        """The id of the account `session_id` belongs to (ended or not), or None for a
        session this service does not know: what `session.revoke` acts on, for `@self`."""
        found = await self._store.get_session_with_account(session_id)
        return None if found is None else found[0].account_id


# What `new_session_id` makes (messages.models.SessionId).
_SESSION_ID = re.compile(r"ses_[0-9a-z]{32}")


def encode_cursor(session: SessionRecord) -> str:
    """The position after `session`, as an opaque URL-safe text."""
    position = orjson.dumps([session.created_at.isoformat(), session.id])
    return base64.urlsafe_b64encode(position).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> SessionPosition:
    """The position an `encode_cursor` text names; InvalidInputError for any other text."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, session_id = orjson.loads(raw)
        stamped = datetime.fromisoformat(created)
        # In UTC, as a store compares it: a hand-made offset at either end of time overflows.
        created_at = None if stamped.utcoffset() is None else stamped.astimezone(UTC)
    except (binascii.Error, TypeError, ValueError, OverflowError):  # orjson's is a ValueError
        raise _not_a_cursor() from None
    # Only what a session id can be reaches a store (no NUL, nothing PostgreSQL refuses).
    if created_at is None or not isinstance(session_id, str):
        raise _not_a_cursor()
    if not _SESSION_ID.fullmatch(session_id):
        raise _not_a_cursor()
    return created_at, session_id


def _not_a_cursor() -> InvalidInputError:
    return InvalidInputError.for_field("payload.cursor", "is not a cursor this service gave")
