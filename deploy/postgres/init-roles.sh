#!/usr/bin/env bash
# Compose's PostgreSQL, first start only (docker-entrypoint-initdb.d): the schema owner, which
# runs the migrations, and the worker's own role, which the migration grants row access only.
# The passwords come from compose.yaml and are for a laptop; production makes its own roles
# (docs/runbook.md, "Database roles").
set -euo pipefail

psql -v ON_ERROR_STOP=1 -X -q --username "$POSTGRES_USER" --dbname postgres \
  -v owner_password="$IDENTITY_OWNER_PASSWORD" -v worker_password="$IDENTITY_WORKER_PASSWORD" <<'SQL'
CREATE ROLE identity_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE identity_worker LOGIN PASSWORD :'worker_password';
CREATE DATABASE identity OWNER identity_owner;
SQL
psql -v ON_ERROR_STOP=1 -X -q --username "$POSTGRES_USER" --dbname identity \
  -c "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
