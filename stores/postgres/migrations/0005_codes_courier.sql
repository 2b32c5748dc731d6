-- Contract v2, section 2: one-time codes (recovery, email verification), their throttle, and
-- the courier outbox that carries codes and notices to the mail sender.

-- A code is kept only as a keyed hash (`mac`; the key never lives in the database), bound to
-- the purpose and the address it was sent to. One live code per account and purpose: a new
-- one replaces the old. `attempts` counts wrong tries; the code is void at the limit.
CREATE TABLE one_time_codes (
    account_id text        NOT NULL,
    purpose    text        NOT NULL,
    mac        bytea       NOT NULL,
    attempts   integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    CONSTRAINT one_time_codes_pkey PRIMARY KEY (account_id, purpose),
    CONSTRAINT one_time_codes_account_id_fkey FOREIGN KEY (account_id)
        REFERENCES accounts (id) ON DELETE CASCADE,
    CONSTRAINT one_time_codes_purpose_known CHECK (purpose IN ('recovery', 'verification'))
);

CREATE INDEX one_time_codes_purge ON one_time_codes (expires_at);

-- Courier messages, written in the transaction of the change they report and relayed to the
-- `identity.courier` exchange. The code travels sealed (encrypted under a key derived from
-- the HMAC key) and is wiped once the broker confirmed the message: a relayed row holds none.
-- Personal data (recipient, display_name) is found for erasure by account_id.
CREATE TABLE courier_outbox (
    seq          bigserial   NOT NULL,
    message_id   text        NOT NULL,
    kind         text        NOT NULL,
    recipient    text        NOT NULL,
    account_id   text        NOT NULL,
    display_name text        NOT NULL,
    sealed_code  bytea,
    expires_at   timestamptz,
    created_at   timestamptz NOT NULL,
    relayed_at   timestamptz,
    CONSTRAINT courier_outbox_pkey PRIMARY KEY (seq),
    CONSTRAINT courier_outbox_message_id_key UNIQUE (message_id),
    CONSTRAINT courier_outbox_relayed_holds_no_code CHECK (relayed_at IS NULL OR sealed_code IS NULL)
);

-- The relay's claim and the backlog gauge look only at rows not relayed yet.
CREATE INDEX courier_outbox_pending ON courier_outbox (seq) WHERE relayed_at IS NULL;
CREATE INDEX courier_outbox_purge ON courier_outbox (created_at) WHERE relayed_at IS NOT NULL;
CREATE INDEX courier_outbox_by_account ON courier_outbox (account_id);

-- Requests for codes and attempts at them, counted per keyed tag (of an email, of a source)
-- in fixed windows: no address or client IP is stored.
CREATE TABLE code_throttle (
    tag          bytea       NOT NULL,
    window_start timestamptz NOT NULL,
    hits         integer     NOT NULL CHECK (hits >= 0),
    CONSTRAINT code_throttle_pkey PRIMARY KEY (tag)
);

CREATE INDEX code_throttle_purge ON code_throttle (window_start);
