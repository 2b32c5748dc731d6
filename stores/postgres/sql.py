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
    email_verified = COALESCE($8, email_verified),
    status = COALESCE($9, status),
    roles = COALESCE($10::text[], roles),
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
# The live sessions beyond the `$5` newest, ended; the account row is locked by the caller.
# ARRAY(...) is computed once, then the primary key finds each row: the usual case (below the
# cap: an empty array) touches no row of the table at all, whatever plan its size suggests.
END_OLDEST_SESSIONS = f"""
WITH ended AS (
    UPDATE sessions SET ended_at = $2, end_reason = $3
    WHERE id = ANY(ARRAY(
        SELECT id FROM sessions
        WHERE account_id = $1 AND {_LIVE}
        ORDER BY created_at DESC, id DESC
        OFFSET $5
    )) AND {_LIVE}
    RETURNING {SESSION}
)
SELECT {SESSION} FROM ended ORDER BY created_at, id
"""
TOUCH_SESSION = "UPDATE sessions SET last_seen_at = $2 WHERE id = $1 AND last_seen_at < $2"
LOCK_SESSION = GET_SESSION + " FOR UPDATE"
# Under READ COMMITTED a second rotation waits for the first one's row lock, then re-checks the
# generation against the committed row: only one rotation from a generation succeeds.
ROTATE_REFRESH_TOKEN = f"""
UPDATE sessions SET
    refresh_generation = refresh_generation + 1,
    refreshed_at = $3,
    last_seen_at = GREATEST(last_seen_at, $3)
WHERE id = $1 AND refresh_generation = $2 AND ended_at IS NULL
RETURNING {SESSION}
"""
# One page of an account's live sessions ($2 now, $3 idle since), after the position ($4, $5)
# when one is given, in the order of the index sessions_by_account.
LIST_LIVE_SESSIONS = f"""
SELECT {SESSION} FROM sessions
WHERE account_id = $1 AND ended_at IS NULL AND expires_at > $2 AND last_seen_at > $3
    AND ($4::timestamptz IS NULL OR (created_at, id) > ($4::timestamptz, $5::text))
ORDER BY created_at, id
LIMIT $6
"""

GET_IDEMPOTENCY_RECORDS = (
    f"SELECT {IDEMPOTENCY} FROM idempotency WHERE key = ANY($1::text[])"  # batched, as above
)

# A command's outcome in one statement: its events ($1-$4, $11-$13, one array per column) and
# its idempotency record ($5-$10; skipped when the key is NULL). A data-modifying CTE always runs to
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
    INSERT INTO outbox
        (event_id, type, body, created_at, account_id, command_seq, traceparent, tracestate)
    SELECT e.event_id, e.type, e.body, e.created_at, e.account_id, command.command_seq,
        e.traceparent, e.tracestate
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[], $11::text[],
                $12::text[], $13::text[])
        WITH ORDINALITY AS e (event_id, type, body, created_at, account_id, traceparent,
                              tracestate, n)
    CROSS JOIN command
    ORDER BY e.n
    RETURNING seq, command_seq
),
pending AS (
    INSERT INTO outbox_pending (command_seq, next_seq, last_seq)
    SELECT command_seq, min(seq), max(seq) FROM events GROUP BY command_seq
)
INSERT INTO idempotency ({IDEMPOTENCY})
SELECT $5::text, $6::text, $7::text, $8::jsonb, $9::timestamptz, $10::text
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
SELECT held.command_seq, e.seq, e.event_id, e.type, e.body, e.created_at, e.traceparent,
    e.tracestate
FROM held LEFT JOIN LATERAL (
    SELECT seq, event_id, type, body, created_at, traceparent, tracestate FROM outbox
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


# Throttling by source. A reservation is one transaction that first locks the email's counter
# row (creating it at zero failures if need be): every change to an email's counters waits
# for that lock, so reservations, refunds and settlements of one email run one after the
# other, and always lock the email row before a pair row (no deadlocks among them).
# $1 email tag, $2 now. ON CONFLICT DO UPDATE locks the row and returns its latest version.
LOCK_THROTTLE = """
INSERT INTO throttle_emails AS t (email_tag, failures, locked_until, updated_at)
VALUES ($1, 0, NULL, $2)
ON CONFLICT (email_tag) DO UPDATE SET email_tag = t.email_tag
RETURNING failures, locked_until, updated_at
"""
# A statement of its own, after the lock: under READ COMMITTED its snapshot includes what the
# previous holder of the lock committed (in the locking statement it would not).
# $1 email tag, $2 source tag, $3 known-good since.
READ_SOURCE_THROTTLE = """
SELECT p.failures, p.locked_until, p.updated_at,
       EXISTS (
           SELECT 1 FROM known_sources k
           WHERE k.email_tag = $1 AND k.source_tag = $2 AND k.last_success_at >= $3
       )
FROM (SELECT 1) AS one
LEFT JOIN throttle_pairs p ON p.email_tag = $1 AND p.source_tag = $2
"""
# $1 email tag, $2 source tag, $3-$5 the pair's failures, lock, time, $6-$7 the email's.
COUNT_ATTEMPT = """
WITH p AS (
    INSERT INTO throttle_pairs (email_tag, source_tag, failures, locked_until, updated_at)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (email_tag, source_tag) DO UPDATE SET
        failures = EXCLUDED.failures,
        locked_until = EXCLUDED.locked_until,
        updated_at = EXCLUDED.updated_at
)
UPDATE throttle_emails SET failures = $6, locked_until = $7, updated_at = $5
WHERE email_tag = $1
"""
UNCOUNT_EMAIL = """
UPDATE throttle_emails SET failures = GREATEST(failures - 1, 0) WHERE email_tag = $1
"""
UNCOUNT_PAIR = """
UPDATE throttle_pairs SET failures = GREATEST(failures - 1, 0)
WHERE email_tag = $1 AND source_tag = $2
"""
# The password verified: the pair's failures are forgotten and the source becomes known-good.
SETTLE_PAIR = """
WITH forgotten AS (DELETE FROM throttle_pairs WHERE email_tag = $1 AND source_tag = $2)
INSERT INTO known_sources AS k (email_tag, source_tag, last_success_at) VALUES ($1, $2, $3)
ON CONFLICT (email_tag, source_tag) DO UPDATE
    SET last_success_at = GREATEST(k.last_success_at, EXCLUDED.last_success_at)
"""


def _refilled(budget: str) -> str:
    """SQL for `HashBudget.available`: the tokens of row `budget` at $3, refilled at $5 per
    second up to $4."""
    return (
        f"LEAST($4::float8, {budget}.tokens + $5::float8 * GREATEST(0::float8,"
        f" EXTRACT(EPOCH FROM ($3::timestamptz - {budget}.updated_at))::float8))"
    )


# One statement: the row lock of ON CONFLICT makes concurrent spends take turns, and the WHERE
# refuses (returns no row, changes nothing) when fewer than $2 tokens are left.
# $1 source tag, $2 cost, $3 now, $4 burst, $5 rate per second.
SPEND_BUDGET = f"""
INSERT INTO source_budgets AS b (source_tag, tokens, updated_at)
VALUES ($1, $4::float8 - $2::float8, $3)
ON CONFLICT (source_tag) DO UPDATE SET
    tokens = {_refilled("b")} - $2::float8,
    updated_at = GREATEST(b.updated_at, $3)
WHERE {_refilled("b")} >= $2::float8
RETURNING tokens
"""
GET_BUDGET = "SELECT tokens, updated_at FROM source_budgets WHERE source_tag = $1"

# Schema 0001's plain-email counters, taken out to be re-keyed (see migration 0002).
TAKE_LEGACY_THROTTLE = """
DELETE FROM signin_throttle
WHERE email_canonical IN (SELECT email_canonical FROM signin_throttle LIMIT $1 FOR UPDATE)
RETURNING email_canonical, failures, locked_until, updated_at
"""
# The larger count and the later lock and time win: nothing a lock in force is lifted.
MERGE_EMAIL_COUNTERS = """
INSERT INTO throttle_emails AS t (email_tag, failures, locked_until, updated_at)
SELECT * FROM unnest($1::bytea[], $2::int[], $3::timestamptz[], $4::timestamptz[])
ON CONFLICT (email_tag) DO UPDATE SET
    failures = GREATEST(t.failures, EXCLUDED.failures),
    locked_until = GREATEST(t.locked_until, EXCLUDED.locked_until),
    updated_at = GREATEST(t.updated_at, EXCLUDED.updated_at)
"""

INSERT_SECRET = """
INSERT INTO shared_secrets (name, secret) VALUES ($1, $2)
ON CONFLICT (name) DO NOTHING
RETURNING secret
"""
GET_SECRET = "SELECT secret FROM shared_secrets WHERE name = $1"

# $5 and $6 may be NULL: then nothing compares below them and nothing is deleted.
PURGE = """
WITH i AS (DELETE FROM idempotency WHERE created_at < $1 RETURNING 1),
     o AS (DELETE FROM outbox WHERE published_at IS NOT NULL AND created_at < $2 RETURNING 1),
     tp AS (DELETE FROM throttle_pairs WHERE updated_at < $3 RETURNING 1),
     te AS (DELETE FROM throttle_emails WHERE updated_at < $3 RETURNING 1),
     s AS (DELETE FROM sessions WHERE LEAST(ended_at, expires_at) < $4 RETURNING 1),
     k AS (DELETE FROM known_sources WHERE last_success_at < $5 RETURNING 1),
     b AS (DELETE FROM source_budgets WHERE updated_at < $6 RETURNING 1)
SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM o),
       (SELECT count(*) FROM tp) + (SELECT count(*) FROM te), (SELECT count(*) FROM s),
       (SELECT count(*) FROM k), (SELECT count(*) FROM b)
"""

# Erasure (UnitOfWork.erase_account): one statement per table that holds an account's data, run
# in this order inside the unit. A table added later with such data adds its statement here;
# the erasure tests walk every column of every table, so one left out fails them.
ERASE_SESSIONS = "DELETE FROM sessions WHERE account_id = $1"
ERASE_ACCOUNT = "DELETE FROM accounts WHERE id = $1"
INSERT_TOMBSTONE = """
INSERT INTO account_tombstones (id, erased_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING
"""
ERASE_REPLIES = "UPDATE idempotency SET reply = $2::jsonb WHERE account_id = $1"
# Unpublished first. A relay holds a whole command by its `outbox_pending` row (CLAIM_EVENTS),
# not by its outbox rows, so the commands with unpublished rows of the account are locked
# first: a command a relay holds is waited for, until the relay has marked what it published
# and moved the command on (or finished it). Locking them before any outbox row is touched
# keeps the order a relay takes (command, then its rows), so the two cannot deadlock.
LOCK_COMMANDS_OF_ACCOUNT = """
SELECT command_seq FROM outbox_pending
WHERE command_seq IN (
    SELECT command_seq FROM outbox WHERE account_id = $1 AND published_at IS NULL
)
ORDER BY command_seq
FOR UPDATE
"""
# Then the rows still unpublished are dropped (the next statement's snapshot sees what the
# relay published meanwhile, and scrubs it), with the commands they belonged to.
DROP_UNPUBLISHED_EVENTS = """
DELETE FROM outbox WHERE account_id = $1 AND published_at IS NULL
RETURNING command_seq
"""
# A command whose rows were dropped keeps its `outbox_pending` row only while it has
# unpublished rows left (of other accounts, or without one), and its `next_seq` moves to the
# first of them: a command left with none is finished, as a relay would find it.
SETTLE_COMMANDS = """
WITH left_over AS (
    SELECT p.command_seq, (
        SELECT min(o.seq) FROM outbox o
        WHERE o.seq BETWEEN p.next_seq AND p.last_seq
          AND o.command_seq = p.command_seq AND o.published_at IS NULL
    ) AS next_seq
    FROM outbox_pending p
    WHERE p.command_seq = ANY($1::bigint[])
),
finished AS (
    DELETE FROM outbox_pending p USING left_over l
    WHERE p.command_seq = l.command_seq AND l.next_seq IS NULL
)
UPDATE outbox_pending p SET next_seq = l.next_seq
FROM left_over l
WHERE p.command_seq = l.command_seq AND l.next_seq IS NOT NULL
"""
SCRUB_PUBLISHED_EVENTS = """
UPDATE outbox
SET body = convert_to(jsonb_build_object('event_id', event_id, 'type', type, 'erased', true)::text,
                      'UTF8')
WHERE account_id = $1 AND published_at IS NOT NULL
"""
# Every throttle row of the email: the keyed tables by its tag, the legacy one (rows of schema
# 0001 not yet re-keyed by the worker) by the address itself.
ERASE_THROTTLE = """
WITH p AS (DELETE FROM throttle_pairs WHERE email_tag = $1 RETURNING 1),
     e AS (DELETE FROM throttle_emails WHERE email_tag = $1 RETURNING 1),
     k AS (DELETE FROM known_sources WHERE email_tag = $1 RETURNING 1),
     l AS (DELETE FROM signin_throttle WHERE email_canonical = $2 RETURNING 1)
SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM e) + (SELECT count(*) FROM k)
     + (SELECT count(*) FROM l)
"""
