"""Every SQL statement of the PostgreSQL store, as constants.

Column lists are derived from the record dataclasses, so a row maps to a record positionally
(`AccountRecord(*row)`) and the two can't drift apart. The statements are fixed strings, so
asyncpg prepares each once per connection and reuses it from its statement cache.

The f-strings only splice in column names taken from the record classes and fixed SQL
fragments; every value travels as a `$n` parameter.
"""

# ruff: noqa: S608  (see above: no value is ever formatted into a statement)
# ruff: noqa: S105  ("secret" here is a column name)

from __future__ import annotations

from dataclasses import fields

from stores.records import AccountRecord, IdempotencyRecord, SessionRecord


def _columns(record: type, prefix: str = "") -> str:
    return ", ".join(prefix + field.name for field in fields(record))


def _placeholders(record: type) -> str:
    return ", ".join(f"${n}" for n in range(1, len(fields(record)) + 1))


ACCOUNT = _columns(AccountRecord)
SESSION = _columns(SessionRecord)
IDEMPOTENCY = _columns(IdempotencyRecord)
SESSION_FIELD_COUNT = len(fields(SessionRecord))

GET_ACCOUNT = f"SELECT {ACCOUNT} FROM accounts WHERE id = $1"
GET_ACCOUNT_FOR_UPDATE = GET_ACCOUNT + " FOR UPDATE"
GET_ACCOUNT_BY_EMAIL = f"SELECT {ACCOUNT} FROM accounts WHERE email_canonical = $1"
INSERT_ACCOUNT = f"INSERT INTO accounts ({ACCOUNT}) VALUES ({_placeholders(AccountRecord)})"
UPDATE_ACCOUNT = f"""
UPDATE accounts SET
    email = COALESCE($3, email),
    email_canonical = COALESCE($4, email_canonical),
    display_name = COALESCE($5, display_name),
    password_hash = COALESCE($6, password_hash),
    updated_at = $7,
    version = version + 1
WHERE id = $1 AND version = $2
RETURNING {ACCOUNT}
"""
REPLACE_PASSWORD_HASH = """
UPDATE accounts SET password_hash = $3 WHERE id = $1 AND password_hash = $2
"""

INSERT_SESSION = f"INSERT INTO sessions ({SESSION}) VALUES ({_placeholders(SessionRecord)})"
GET_SESSION = f"SELECT {SESSION} FROM sessions WHERE id = $1"
# Look-ups by primary key, many keys a query (batching.py): the key comes first.
GET_ACCOUNTS = f"SELECT {ACCOUNT} FROM accounts WHERE id = ANY($1::text[])"
GET_SESSIONS_WITH_ACCOUNTS = f"""
SELECT {_columns(SessionRecord, "s.")}, {_columns(AccountRecord, "a.")}
FROM sessions s JOIN accounts a ON a.id = s.account_id
WHERE s.id = ANY($1::text[])
"""
# Only a live session ends: not ended, not expired at $2 (now), not idle since $4 (the idle
# cutoff); one that expired or idled out is over already, and stays as it is. Under READ
# COMMITTED a second writer waits for the first one's row lock, then re-checks the condition
# against the committed row: only one of them ever ends a session, and a `last_seen_at`
# moved by a verify meanwhile counts.
_LIVE = "ended_at IS NULL AND expires_at > $2 AND last_seen_at > $4"
END_SESSION = f"""
UPDATE sessions SET ended_at = $2, end_reason = $3
WHERE id = $1 AND {_LIVE}
RETURNING {SESSION}
"""
END_ALL_SESSIONS = f"""
WITH ended AS (
    UPDATE sessions SET ended_at = $2, end_reason = $3
    WHERE account_id = $1 AND {_LIVE}
    RETURNING {SESSION}
)
SELECT {SESSION} FROM ended ORDER BY created_at, id
"""
TOUCH_SESSION = "UPDATE sessions SET last_seen_at = $2 WHERE id = $1 AND last_seen_at < $2"

GET_IDEMPOTENCY_RECORDS = (
    f"SELECT {IDEMPOTENCY} FROM idempotency WHERE key = ANY($1::text[])"  # batched, as above
)

# A command's outcome in one statement: its events ($1-$4, one array per column) and its
# idempotency record ($5-$9; skipped when the key is NULL). A data-modifying CTE always runs to
# completion, whether or not the main statement reads it. Rows are inserted in ORDER BY order,
# so the outbox seqs follow the events' order; they share one `command_seq`, drawn once
# (MATERIALIZED: evaluated once, not once per row), and the command gets its `outbox_pending`
# row when it has events. The casts give every parameter its column's type, so the reply goes
# through the connection's jsonb codec.
RECORD_OUTCOME = f"""
WITH command AS MATERIALIZED (
    SELECT nextval('outbox_command_seq') AS command_seq
),
events AS (
    INSERT INTO outbox (event_id, type, body, created_at, command_seq)
    SELECT e.event_id, e.type, e.body, e.created_at, command.command_seq
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[])
        WITH ORDINALITY AS e (event_id, type, body, created_at, n)
    CROSS JOIN command
    ORDER BY e.n
    RETURNING seq, command_seq
),
pending AS (
    INSERT INTO outbox_pending (command_seq, next_seq, last_seq)
    SELECT command_seq, min(seq), max(seq) FROM events GROUP BY command_seq
)
INSERT INTO idempotency ({IDEMPOTENCY})
SELECT $5::text, $6::text, $7::text, $8::jsonb, $9::timestamptz
WHERE $5::text IS NOT NULL
"""
# Whole commands, oldest first: a relay holds a command by locking its `outbox_pending` row,
# so SKIP LOCKED passes over a command another relay holds, whole. A command that another
# relay finished or moved on since this statement's snapshot is seen as it is now: READ
# COMMITTED locks the newest version of the row (or skips it, deleted), so `next_seq` leaves
# out what was published meanwhile, even where the snapshot still shows those outbox rows
# unpublished. Of each command, its unpublished rows in order, found through the primary key:
# all of them, or the first $2 (the store asks for one more, to know whether any is left).
# A command without any (published by a relay of the previous version) comes back as one row
# of NULLs, to be finished. The locks last as long as the claiming transaction, i.e. the
# `async with claim_events(...)` block.
CLAIM_EVENTS = """
WITH held AS MATERIALIZED (
    SELECT command_seq, next_seq, last_seq FROM outbox_pending
    ORDER BY command_seq
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
SELECT held.command_seq, e.seq, e.event_id, e.type, e.body, e.created_at
FROM held LEFT JOIN LATERAL (
    SELECT seq, event_id, type, body, created_at FROM outbox
    WHERE seq BETWEEN held.next_seq AND held.last_seq
      AND command_seq = held.command_seq AND published_at IS NULL
    ORDER BY seq
    LIMIT $2
) e ON true
ORDER BY held.command_seq, e.seq
"""
# The end of a claim, in one statement: the rows published ($1), the commands finished ($2),
# and how far the others got ($3 command, $4 its first row not published).
FINISH_CLAIM = """
WITH published AS (
    UPDATE outbox SET published_at = now()
    WHERE seq = ANY($1::bigint[]) AND published_at IS NULL
),
finished AS (
    DELETE FROM outbox_pending WHERE command_seq = ANY($2::bigint[])
)
UPDATE outbox_pending p SET next_seq = moved.next_seq
FROM unnest($3::bigint[], $4::bigint[]) AS moved (command_seq, next_seq)
WHERE p.command_seq = moved.command_seq
"""
OUTBOX_BACKLOG = "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL"


def _lock_until(failures: str) -> str:
    """SQL for `ThrottleSchedule.lock_seconds(failures)` applied to `$2` (now), NULL for no
    lock; $4 = free_failures, $5 = base_delay_s, $6 = max_delay_s."""
    return (
        f"CASE WHEN {failures} <= $4::int THEN NULL ELSE $2::timestamptz + make_interval("
        f"secs => LEAST($5::float8 * power(2::float8, LEAST({failures} - $4::int - 1, 62)),"
        " $6::float8)) END"
    )


# $3 = now - reset_after_s: a counter untouched since then starts again from one.
_NEXT_FAILURES = "(CASE WHEN t.updated_at < $3 THEN 1 ELSE t.failures + 1 END)"

# One statement, so the row lock taken by ON CONFLICT makes concurrent reservations count
# one after the other; the WHERE refuses (returns no row) while a lock is in force.
RESERVE_SIGNIN = f"""
INSERT INTO signin_throttle AS t (email_canonical, failures, locked_until, updated_at)
VALUES ($1, 1, {_lock_until("1")}, $2)
ON CONFLICT (email_canonical) DO UPDATE SET
    failures = {_NEXT_FAILURES},
    locked_until = {_lock_until(_NEXT_FAILURES)},
    updated_at = $2
WHERE t.locked_until IS NULL OR t.locked_until <= $2
RETURNING failures
"""
GET_SIGNIN_LOCK = "SELECT failures, locked_until FROM signin_throttle WHERE email_canonical = $1"
REFUND_SIGNIN = """
UPDATE signin_throttle SET failures = GREATEST(failures - 1, 0) WHERE email_canonical = $1
"""
RESET_SIGNIN = "DELETE FROM signin_throttle WHERE email_canonical = $1"

INSERT_SECRET = """
INSERT INTO shared_secrets (name, secret) VALUES ($1, $2)
ON CONFLICT (name) DO NOTHING
RETURNING secret
"""
GET_SECRET = "SELECT secret FROM shared_secrets WHERE name = $1"

PURGE = """
WITH i AS (DELETE FROM idempotency WHERE created_at < $1 RETURNING 1),
     o AS (DELETE FROM outbox WHERE published_at IS NOT NULL AND created_at < $2 RETURNING 1),
     t AS (DELETE FROM signin_throttle WHERE updated_at < $3 RETURNING 1),
     s AS (DELETE FROM sessions WHERE LEAST(ended_at, expires_at) < $4 RETURNING 1)
SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM o),
       (SELECT count(*) FROM t), (SELECT count(*) FROM s)
"""
