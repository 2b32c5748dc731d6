-- Contract v2, account lifecycle and session management: what session.list shows, and what
-- erasure (account.delete) needs to find every place an account's data was written.

-- What the caller of session.start reported about the client. Personal data: deleted with
-- the session (purge) or the account (erasure).
ALTER TABLE sessions
    ADD COLUMN client_ip  text,
    ADD COLUMN user_agent text;

-- One index for every look-up of an account's sessions: session.list's pages in
-- (created_at, id) order, end_all_sessions, erasure's delete, and the check of the foreign
-- key when an account row is deleted (which a partial index on open sessions cannot serve).
CREATE INDEX sessions_by_account ON sessions (account_id, created_at, id);
DROP INDEX IF EXISTS sessions_open_by_account;

-- The account a stored reply or an outbox row is about, written with it, so erasure finds
-- them without reading every body. Rows written before this migration are filled from the
-- same fields the service reads (an `account`'s id, an `account_id`, a `session`'s account).
ALTER TABLE idempotency ADD COLUMN account_id text;
ALTER TABLE outbox ADD COLUMN account_id text;

UPDATE idempotency SET account_id = COALESCE(
    reply #>> '{result,account,id}',
    reply #>> '{result,account_id}',
    reply #>> '{result,session,account_id}'
)
WHERE reply ->> 'ok' = 'true';

UPDATE outbox SET account_id = (
    SELECT COALESCE(data #>> '{account,id}', data ->> 'account_id', data #>> '{session,account_id}')
    FROM (SELECT convert_from(body, 'UTF8')::jsonb -> 'data') AS event (data)
);

CREATE INDEX idempotency_by_account ON idempotency (account_id) WHERE account_id IS NOT NULL;
CREATE INDEX outbox_by_account ON outbox (account_id) WHERE account_id IS NOT NULL;

-- Erased accounts: the id only, kept for good, so an id is never given out twice.
CREATE TABLE account_tombstones (
    id        text        NOT NULL,
    erased_at timestamptz NOT NULL,
    CONSTRAINT account_tombstones_pkey PRIMARY KEY (id)
);

-- An erased id cannot come back, whichever statement inserts it: refused as a duplicate id.
CREATE FUNCTION accounts_id_not_erased() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM account_tombstones WHERE id = NEW.id) THEN
        RAISE EXCEPTION 'account id % was erased', NEW.id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'accounts_pkey';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER accounts_id_not_erased BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_id_not_erased();
