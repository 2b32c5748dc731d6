"""Accounts written under an earlier rule for canonical emails, moved to today's form.

`accounts.email_canonical` is computed by the service layer (`services.emails`) and is what
uniqueness and every look-up by email use. When the rule changes, as when lower-casing became
full case folding, a row written before keeps the old form while sign-in and sign-up compute
the new one: the account's owner would be answered `invalid_credentials`, and the same mailbox
could be registered a second time. `recanonicalise_emails` moves each such account to its new
form, computed from the address as the owner gave it (`accounts.email`).

Two accounts may have been one mailbox all along (the bug the new rule fixes): their new forms
collide, or one's new form is another's current one. None of them is moved then, since only a
person can tell which account is the mailbox's: the collision is reported with the account
ids, for an operator to resolve (docs/runbook.md). Until then, whichever account holds the new
form answers for the address, and the others cannot be signed in to by email (they are still
found by id). An address the rule no longer accepts is reported too, and left. The step is
idempotent and runs at every migration: a collision resolved since, or a row written by a
worker of the previous version during a rolling upgrade, is taken care of the next time.

Only addresses with a character outside ASCII are read: on ASCII, folding and lower-casing
agree, so every other row is in today's form already.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from stores.postgres.migrate import MIGRATION_LOCK_ID

log = logging.getLogger(__name__)

# Canonicalise: the canonical form of an address as the owner gave it, None if the rule
# refuses it.
Canonicalise = Callable[[str], str | None]

_CANDIDATES = r"""
SELECT id, email, email_canonical FROM accounts
WHERE email ~ '[^\x01-\x7f]'
ORDER BY created_at, id
"""
_OWNERS = "SELECT email_canonical, id FROM accounts WHERE email_canonical = ANY($1::text[])"
# Neither `version` nor `updated_at` moves: nothing the account holder sees has changed.
_MOVE = """
UPDATE accounts SET email_canonical = $3 WHERE id = $1 AND email_canonical = $2
"""


@dataclass(slots=True)
class EmailReport:
    """What one pass did: accounts moved to their new canonical form, accounts left as they
    were because their new form is (or would be) another account's, and accounts whose
    address the rule no longer accepts. Account ids only: no address goes to a log."""

    moved: list[str] = field(default_factory=list)
    collisions: list[list[str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


async def recanonicalise_emails(dsn: str, canonicalise: Canonicalise) -> EmailReport:
    """Move every account whose canonical email changed with the rule, under the migration
    lock; report what could not be moved (also logged as warnings)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            report = await _recanonicalise(conn, canonicalise)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    for ids in report.collisions:
        log.warning("accounts share one canonical email; not moved", extra={"ids": ids})
    if report.refused:
        log.warning("stored emails the rule refuses; not moved", extra={"ids": report.refused})
    return report


async def _recanonicalise(conn: asyncpg.Connection, canonicalise: Canonicalise) -> EmailReport:
    report = EmailReport()
    wanted: dict[str, list[tuple[str, str]]] = defaultdict(list)  # new form -> (id, old form)
    for row in await conn.fetch(_CANDIDATES):
        new = canonicalise(row["email"])
        if new is None:
            report.refused.append(row["id"])
        elif new != row["email_canonical"]:
            wanted[new].append((row["id"], row["email_canonical"]))
    owners = {row["email_canonical"]: row["id"] for row in await conn.fetch(_OWNERS, list(wanted))}
    for new, movers in wanted.items():
        owner = owners.get(new)
        if owner is not None or len(movers) > 1:
            report.collisions.append(sorted([*([owner] if owner else []), *(i for i, _ in movers)]))
            continue
        [(account_id, old)] = movers
        try:
            moved = await conn.execute(_MOVE, account_id, old, new)
        except asyncpg.UniqueViolationError:  # taken since the look-up, by a new sign-up
            report.collisions.append([account_id])
            continue
        if moved == "UPDATE 1":
            report.moved.append(account_id)
    return report
