-- Throttling by source (contract v2, section 1). Emails and sources are stored only as keyed
-- tags (HMAC with IDENTITY_HMAC_KEY, which never enters the database): a copy of these tables
-- names nobody.

-- Failed password attempts of one source on one email: its own lock refuses that source only.
CREATE TABLE throttle_pairs (
    email_tag    bytea       NOT NULL,
    source_tag   bytea       NOT NULL,
    failures     integer     NOT NULL CHECK (failures >= 0),
    locked_until timestamptz,
    updated_at   timestamptz NOT NULL,
    CONSTRAINT throttle_pairs_pkey PRIMARY KEY (email_tag, source_tag)
);

CREATE INDEX throttle_pairs_purge ON throttle_pairs (updated_at);

-- Failed password attempts on one email from every source: its lock refuses the sources that
-- are not known-good for the email. Its row is also what reservations for the email lock.
CREATE TABLE throttle_emails (
    email_tag    bytea       NOT NULL,
    failures     integer     NOT NULL CHECK (failures >= 0),
    locked_until timestamptz,
    updated_at   timestamptz NOT NULL,
    CONSTRAINT throttle_emails_pkey PRIMARY KEY (email_tag)
);

CREATE INDEX throttle_emails_purge ON throttle_emails (updated_at);

-- Sources whose password verified for an email, and when last.
CREATE TABLE known_sources (
    email_tag       bytea       NOT NULL,
    source_tag      bytea       NOT NULL,
    last_success_at timestamptz NOT NULL,
    CONSTRAINT known_sources_pkey PRIMARY KEY (email_tag, source_tag)
);

CREATE INDEX known_sources_purge ON known_sources (last_success_at);

-- Argon2 work per source: a token bucket; a row untouched long enough is a full bucket.
CREATE TABLE source_budgets (
    source_tag bytea            NOT NULL,
    tokens     double precision NOT NULL,
    updated_at timestamptz      NOT NULL,
    CONSTRAINT source_budgets_pkey PRIMARY KEY (source_tag)
);

CREATE INDEX source_budgets_purge ON source_budgets (updated_at);

-- signin_throttle (schema 0001) names emails in plain text, and SQL cannot compute their tags
-- (the key is not in the database). Its rows are moved by the worker, which has the key: at
-- start and at every purge it re-keys them into throttle_emails and deletes them, so a lock in
-- force stays in force across the upgrade, and workers of the previous version still running
-- during a rolling upgrade lose nothing. A later migration drops the table.
COMMENT ON TABLE signin_throttle IS
    'legacy (schema 0001): emptied by the worker into throttle_emails; do not write';
