#!/usr/bin/env bash
# The two database roles of a local run, made once: IDENTITY_DB_OWNER owns the `identity`
# database and its tables and runs the migrations; IDENTITY_DB_WORKER is the worker's role,
# which the migration grants row access only. Run as a superuser of the local PostgreSQL (the
# README's setup: user postgres, trust authentication). Safe to run again.
set -euo pipefail

PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
ADMIN="${PGUSER:-postgres}"
OWNER="${IDENTITY_DB_OWNER:-identity_owner}"
WORKER="${IDENTITY_DB_WORKER:-identity_worker}"
DATABASE="${IDENTITY_DB_NAME:-identity}"

psql=(psql -h "$PGHOST" -p "$PGPORT" -U "$ADMIN" -v ON_ERROR_STOP=1 -q -X)

"${psql[@]}" -d postgres -v owner="$OWNER" -v worker="$WORKER" -v db="$DATABASE" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'worker')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'worker') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
-- A database made before the roles existed (by an earlier `make run`) changes hands.
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'owner') \gexec
SQL

# Inside it: the owner owns the schema and every table there (earlier runs migrated as the
# superuser), and nobody else may create in it.
"${psql[@]}" -d "$DATABASE" -v owner="$OWNER" -v worker="$WORKER" <<'SQL'
SELECT format('ALTER SCHEMA public OWNER TO %I', :'owner') \gexec
SELECT format('ALTER TABLE public.%I OWNER TO %I', tablename, :'owner')
FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'owner' \gexec
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
