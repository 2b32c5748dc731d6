"""An account's life after sign-up, as an operator (or the holder) decides it: disable,
enable, and erase (`account.disable`, `account.enable`, `account.delete`).

- **Disable** sets the status and ends every live session in the same transaction (reason
  `account_disabled`): once the command is acknowledged, no token of the account verifies,
  and `session.start` answers `account_disabled`, after checking the password (a wrong one
  is `invalid_credentials`, so the status is no oracle for the password). Disabling a
  disabled account changes nothing and announces nothing: no new version, no second
  `account.disabled` (the first one's reason stands); the reply is the account as it is.
- **Enable** sets the status back; sign-in works again, the sessions ended stay ended.
  Enabling an active account changes and announces nothing.
- **Erase** ends the live sessions (reason `account_deleted`), then removes the account and
  what is kept about it, in one transaction (`UnitOfWork.erase_account`): its row and all its
  sessions (those that had expired or idled out were over already: deleted, but neither
  counted in `sessions_ended` nor announced), the data in its stored replies (which answer
  `not_found` from then on), its outbox rows (published ones cut down to event id and type,
  unpublished ones dropped), its sign-in throttle rows; a tombstone keeps the id, so it is
  never given out again. The one event, `account.deleted`, names the id and nothing else.
  The erasure's own stored reply (`{account_id, sessions_ended}`) is kept: the same key
  replays it; any other key gets `not_found`, like every later command about the account.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta

from messages import (
    AccountResult,
    DeleteAccount,
    DeleteAccountResult,
    DisableAccount,
    DisableAccountResult,
    EnableAccount,
    StoredReply,
)
from messages.events import (
    AccountDeleted,
    AccountDeletedData,
    AccountDisabled,
    AccountDisabledData,
    AccountEnabled,
    AccountEnabledData,
)
from services.clock import Clock
from services.errors import NotFoundError
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.shapes import announce_ended, idle_cutoff, to_account
from stores import AccountChanges, AccountRecord, CommandStore, TransientStoreError, UnitOfWork

log = logging.getLogger("identity.audit")

# What a stored reply about an erased account answers from then on.
ERASED_REPLY = StoredReply.of_error(NotFoundError().to_error_body()).to_json()


class AccountLifecycle:
    """`account.disable`, `account.enable` and `account.delete`.

    `throttle_key` gives the keyed tag the throttle counts an email under, so erasure
    deletes the account's throttle rows."""

    def __init__(
        self,
        store: CommandStore,
        ops: OperationRunner,
        clock: Clock,
        throttle_key: Callable[[str], bytes],
        *,
        idle_timeout: timedelta,
    ) -> None:
        self._store = store
        self._idle_timeout = idle_timeout
        self._ops = ops
        self._clock = clock
        self._throttle_key = throttle_key

    async def disable_account(
        self, cmd: DisableAccount, ctx: CommandContext = NO_CONTEXT
    ) -> DisableAccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, DisableAccountResult, lambda op: self._disable(op, cmd))

    async def _disable(self, op: Operation, cmd: DisableAccount) -> DisableAccountResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            record = await _locked(uow, cmd.account_id)
            changed = record.status != "disabled"
            if changed:
                record = await _set_status(uow, record, "disabled", now)
            # Every live session ends with the change, under the account's row lock: a sign-in
            # that checked the password meanwhile waits for it, and then sees the status.
            ended = await uow.end_all_sessions(
                record.id, now, "account_disabled", idle_cutoff=self._idle_cutoff(now)
            )
            announce_ended(op, ended, "account_disabled", now)
            if changed:
                data = AccountDisabledData(
                    account_id=record.id, reason=cmd.reason, sessions_ended=len(ended)
                )
                op.emit(AccountDisabled, data, now)
            result = DisableAccountResult(account=to_account(record), sessions_ended=len(ended))
            await self._ops.finish(uow, op, result)
        return result

    async def enable_account(
        self, cmd: EnableAccount, ctx: CommandContext = NO_CONTEXT
    ) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, AccountResult, lambda op: self._enable(op, cmd))

    async def _enable(self, op: Operation, cmd: EnableAccount) -> AccountResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            record = await _locked(uow, cmd.account_id)
            if record.status != "active":
                record = await _set_status(uow, record, "active", now)
                op.emit(AccountEnabled, AccountEnabledData(account_id=record.id), now)
            result = AccountResult(account=to_account(record))
            await self._ops.finish(uow, op, result)
        return result

    async def delete_account(
        self, cmd: DeleteAccount, ctx: CommandContext = NO_CONTEXT
    ) -> DeleteAccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(op, DeleteAccountResult, lambda op: self._delete(op, cmd))

    async def _delete(self, op: Operation, cmd: DeleteAccount) -> DeleteAccountResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            record = await _locked(uow, cmd.account_id)
            # Only the live sessions end, count and are announced; the erasure below deletes
            # every session, those that were over already too.
            ended = await uow.end_all_sessions(
                record.id, now, "account_deleted", idle_cutoff=self._idle_cutoff(now)
            )
            counts = await uow.erase_account(
                record.id,
                erased_at=now,
                email_canonical=record.email_canonical,
                email_tag=self._throttle_key(record.email_canonical),
                erased_reply=ERASED_REPLY,
            )
            # Written after the erasure, so they are kept: they name ids, nothing else.
            announce_ended(op, ended, "account_deleted", now)
            op.emit(AccountDeleted, AccountDeletedData(account_id=record.id), now)
            result = DeleteAccountResult(account_id=record.id, sessions_ended=len(ended))
            await self._ops.finish(uow, op, result)
        log.info(
            "account_erased",
            extra={"event": "account_erased", "account_id": record.id, "erased": asdict(counts)},
        )
        return result

    def _idle_cutoff(self, now: datetime) -> datetime:
        return idle_cutoff(now, self._idle_timeout)


async def _locked(uow: UnitOfWork, account_id: str) -> AccountRecord:
    record = await uow.get_account(account_id, for_update=True)
    if record is None:
        raise NotFoundError()
    return record


async def _set_status(
    uow: UnitOfWork, record: AccountRecord, status: str, now: datetime
) -> AccountRecord:
    changes = AccountChanges(updated_at=now, status=status)
    updated = await uow.update_account(record.id, record.version, changes)
    if updated is None:  # cannot happen under the row lock; retried if it ever does
        raise TransientStoreError("the locked account changed under its lock")
    return updated
