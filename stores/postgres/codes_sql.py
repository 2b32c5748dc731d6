"""The SQL of one-time codes, their throttle and the courier outbox (see stores.codes).

Every value travels as a `$n` parameter; the f-strings only splice column lists taken from
the record classes.
"""

# ruff: noqa: S608  (no value is ever formatted into a statement)

from __future__ import annotations

from dataclasses import fields

from stores.postgres.sql import _columns
from stores.records import AccountRecord

MAIL_COLUMNS = (
    "message_id, kind, recipient, account_id, display_name, sealed_code, expires_at, created_at,"
    " traceparent, tracestate"
)

# Fixed windows per tag: a window that started at or before $reset_before starts again at now.
_HITS = """
INSERT INTO code_throttle AS t (tag, window_start, hits)
SELECT tag, {now}, 1 FROM unnest({tags}::bytea[]) AS tag
ON CONFLICT (tag) DO UPDATE SET
    window_start = CASE WHEN t.window_start <= {reset} THEN {now} ELSE t.window_start END,
    hits = CASE WHEN t.window_start <= {reset} THEN 1 ELSE t.hits + 1 END
RETURNING tag, hits, window_start
"""

HIT_LIMITS = _HITS.format(now="$2::timestamptz", tags="$1", reset="$3::timestamptz")

# `account.recovery.request` / `account.verification.request` in one statement, of the same
# shape whether or not the email has an account, the account is active, or a limit says no:
# the limits are counted, the account looked up, and only if it qualifies are the code stored,
# the courier row and the event written; the idempotency record is written either way. Data-
# modifying CTEs all run to completion whether or not the main statement reads them.
#   $1 email_canonical  $2 purpose  $3 mac  $4 now  $5 expires_at  $6 tags  $7 limits
#   $8 window reset before  $9 unverified_only  $10 message_id  $11 kind  $12 sealed code
#   $13-$15 event (id, type, body; id NULL: none; its account_id is the account's)
#   $16-$21 idempotency record (key NULL: none)  $22-$23 trace context (traceparent, tracestate)
ISSUE_CODE = f"""
WITH hits AS ({_HITS.format(now="$4::timestamptz", tags="$6", reset="$8::timestamptz")}),
within AS (
    SELECT coalesce(bool_and(h.hits <= l.lim), true) AS ok
    FROM hits h JOIN unnest($6::bytea[], $7::int[]) AS l (tag, lim) ON l.tag = h.tag
),
target AS (
    SELECT a.id, a.email, a.display_name FROM accounts a, within w
    WHERE a.email_canonical = $1 AND a.status = 'active' AND w.ok
      AND NOT ($9::bool AND a.email_verified)
),
code AS (
    INSERT INTO one_time_codes AS c
        (account_id, purpose, mac, attempts, created_at, expires_at, used_at)
    SELECT id, $2::text, $3::bytea, 0, $4, $5::timestamptz, NULL FROM target
    ON CONFLICT (account_id, purpose) DO UPDATE SET
        mac = excluded.mac, attempts = 0, created_at = excluded.created_at,
        expires_at = excluded.expires_at, used_at = NULL
    RETURNING account_id
),
mail AS (
    INSERT INTO courier_outbox ({MAIL_COLUMNS})
    SELECT $10::text, $11::text, email, id, display_name, $12::bytea, $5, $4, $22::text, $23::text
    FROM target
),
events AS (
    INSERT INTO outbox (event_id, type, body, created_at, account_id, traceparent, tracestate)
    SELECT $13::text, $14::text,
        convert_to(jsonb_set(convert_from($15::bytea, 'UTF8')::jsonb,
                             '{{data,account_id}}', to_jsonb(id))::text, 'UTF8'),
        $4, id, $22::text, $23::text
    FROM target WHERE $13::text IS NOT NULL
),
record AS (
    INSERT INTO idempotency (key, command, fingerprint, reply, created_at, account_id)
    SELECT $16::text, $17::text, $18::text, $19::jsonb, $20::timestamptz, $21::text
    WHERE $16::text IS NOT NULL
)
SELECT count(*) FROM code
"""

# Checks the code and counts a wrong one in the same statement: concurrent attempts count
# one after the other on the row lock, and none can slip past the limit.
ATTEMPT_CODE = f"""
UPDATE one_time_codes c SET attempts = c.attempts + CASE WHEN c.mac = $3 THEN 0 ELSE 1 END
FROM accounts a
WHERE a.email_canonical = $1 AND a.status = 'active' AND c.account_id = a.id
  AND c.purpose = $2 AND c.used_at IS NULL AND c.expires_at > $4 AND c.attempts < $5
RETURNING c.mac = $3, {_columns(AccountRecord, "a.")}
"""
ACCOUNT_FIELD_COUNT = len(fields(AccountRecord))

# Under READ COMMITTED a second unit waits for the first one's row lock, then re-checks
# `used_at IS NULL` against the committed row: only one of them ever uses a code.
USE_CODE = """
UPDATE one_time_codes SET used_at = $4
WHERE account_id = $1 AND purpose = $2 AND mac = $3
  AND used_at IS NULL AND expires_at > $4 AND attempts < $5
"""
PUT_CODE = """
INSERT INTO one_time_codes (account_id, purpose, mac, attempts, created_at, expires_at)
VALUES ($1, $2, $3, 0, $4, $5)
ON CONFLICT (account_id, purpose) DO UPDATE SET
    mac = excluded.mac, attempts = 0, created_at = excluded.created_at,
    expires_at = excluded.expires_at, used_at = NULL
"""
DROP_CODES = "DELETE FROM one_time_codes WHERE account_id = $1"
ADD_MAIL = f"""
INSERT INTO courier_outbox ({MAIL_COLUMNS})
SELECT {MAIL_COLUMNS}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
            $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[]) WITH ORDINALITY AS m
    (message_id, kind, recipient, account_id, display_name, sealed_code, expires_at,
     created_at, traceparent, tracestate, n)
ORDER BY n
"""

CLAIM_MAIL = f"""
SELECT seq, {MAIL_COLUMNS} FROM courier_outbox
WHERE relayed_at IS NULL
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
# The code leaves the database with the row's relay: a relayed row holds none.
MARK_RELAYED = """
UPDATE courier_outbox SET relayed_at = now(), sealed_code = NULL
WHERE seq = ANY($1::bigint[]) AND relayed_at IS NULL
"""
MAIL_BACKLOG = "SELECT count(*), min(created_at) FROM courier_outbox WHERE relayed_at IS NULL"

# Erasure: the account's courier rows go, relayed or not (its codes go with the account row).
ERASE_MAIL = "DELETE FROM courier_outbox WHERE account_id = $1"

PURGE_CODES = """
WITH c AS (DELETE FROM one_time_codes WHERE expires_at < $1 OR used_at < $1 RETURNING 1),
     m AS (DELETE FROM courier_outbox
           WHERE relayed_at IS NOT NULL AND created_at < $2 RETURNING 1),
     t AS (DELETE FROM code_throttle WHERE window_start < $3 RETURNING 1)
SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM m), (SELECT count(*) FROM t)
"""
