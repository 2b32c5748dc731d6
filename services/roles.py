"""Roles: `account.grant_role` and `account.revoke_role`.

An account's roles are a sorted set of names (`[a-z][a-z0-9_.:-]{0,63}`). A change bumps the
account's version like any other change of the account, and announces the whole new set
(`account.roles_changed`). Granting a role the account holds, or revoking one it lacks, is not
an error and changes nothing: no new version, no event, the reply is the account as it is
(like an `account.update` that names no difference).

Roles reach callers in `session.verify` results at once, and in access tokens issued after
the change (a refresh or a sign-in); tokens already issued keep theirs until they expire.
"""

from __future__ import annotations

from messages import AccountResult, GrantRole, RevokeRole
from messages.events import AccountRolesChanged, AccountRolesChangedData
from services.clock import Clock
from services.errors import InvalidInputError, NotFoundError
from services.operations import NO_CONTEXT, CommandContext, Operation, OperationRunner
from services.shapes import to_account
from stores import AccountChanges, CommandStore, TransientStoreError

# Every role travels in every access token: a bound keeps tokens small.
MAX_ROLES = 32


class RoleService:
    def __init__(self, store: CommandStore, ops: OperationRunner, clock: Clock) -> None:
        self._store = store
        self._ops = ops
        self._clock = clock

    async def grant_role(self, cmd: GrantRole, ctx: CommandContext = NO_CONTEXT) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, AccountResult, lambda op: self._change(op, cmd.account_id, cmd.role, grant=True)
        )

    async def revoke_role(self, cmd: RevokeRole, ctx: CommandContext = NO_CONTEXT) -> AccountResult:
        op = self._ops.begin(cmd, ctx)
        return await self._ops.execute(
            op, AccountResult, lambda op: self._change(op, cmd.account_id, cmd.role, grant=False)
        )

    async def _change(
        self, op: Operation, account_id: str, role: str, *, grant: bool
    ) -> AccountResult:
        now = self._clock.now()
        async with self._store.unit_of_work() as uow:
            record = await uow.get_account(account_id, for_update=True)
            if record is None:
                raise NotFoundError()
            held = set(record.roles)
            roles = tuple(sorted(held | {role} if grant else held - {role}))
            if roles == tuple(sorted(held)):
                result = AccountResult(account=to_account(record))
                await self._ops.finish(uow, op, result)
                return result
            if len(roles) > MAX_ROLES:
                raise InvalidInputError.for_field(
                    "payload.role", f"an account holds at most {MAX_ROLES} roles"
                )
            changes = AccountChanges(updated_at=now, roles=roles)
            updated = await uow.update_account(account_id, record.version, changes)
            if updated is None:  # cannot happen under the row lock; retried if it does
                raise TransientStoreError("the account changed under its row lock")
            result = AccountResult(account=to_account(updated))
            data = AccountRolesChangedData(account_id=account_id, roles=list(roles))
            op.emit(AccountRolesChanged, data, now)
            await self._ops.finish(uow, op, result)
        return result
