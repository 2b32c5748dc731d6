-- The identity worker's tables. Every index below serves a lookup of the IdentityStore
-- port or the purge; constraint names are spelled out because the store maps them to errors.

CREATE TABLE accounts (
    id              text        NOT NULL,
    email           text        NOT NULL,
    email_canonical text        NOT NULL,
    display_name    text        NOT NULL,
    password_hash   text        NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    CONSTRAINT accounts_pkey PRIMARY KEY (id),
    CONSTRAINT accounts_email_canonical_key UNIQUE (email_canonical)
);

CREATE TABLE sessions (
    id           text        NOT NULL,
    account_id   text        NOT NULL,
    key_id       text        NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    ended_at     timestamptz,
    end_reason   text,
    CONSTRAINT sessions_pkey PRIMARY KEY (id),
    CONSTRAINT sessions_account_id_fkey FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT sessions_end_reason_with_ended_at CHECK ((ended_at IS NULL) = (end_reason IS NULL))
);

-- end_all_sessions: the open sessions of one account.
CREATE INDEX sessions_open_by_account ON sessions (account_id) WHERE ended_at IS NULL;
-- purge: LEAST ignores NULLs, so this is "ended or expired", as one indexable expression.
CREATE INDEX sessions_purge ON sessions (LEAST(ended_at, expires_at));

CREATE TABLE idempotency (
    key         text        NOT NULL,
    command     text        NOT NULL,
    fingerprint text        NOT NULL,
    reply       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    CONSTRAINT idempotency_pkey PRIMARY KEY (key)
);

CREATE INDEX idempotency_purge ON idempotency (created_at);

CREATE TABLE outbox (
    seq          bigserial   NOT NULL,
    event_id     text        NOT NULL,
    type         text        NOT NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL,
    published_at timestamptz,
    CONSTRAINT outbox_pkey PRIMARY KEY (seq),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);

-- The relay's claim and the backlog gauge only ever look at unpublished rows.
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_purge ON outbox (created_at) WHERE published_at IS NOT NULL;

CREATE TABLE signin_throttle (
    email_canonical text        NOT NULL,
    failures        integer     NOT NULL CHECK (failures >= 0),
    locked_until    timestamptz,
    updated_at      timestamptz NOT NULL,
    CONSTRAINT signin_throttle_pkey PRIMARY KEY (email_canonical)
);

CREATE INDEX signin_throttle_purge ON signin_throttle (updated_at);

CREATE TABLE shared_secrets (
    name       text        NOT NULL,
    secret     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT shared_secrets_pkey PRIMARY KEY (name)
);
