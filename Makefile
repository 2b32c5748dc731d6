# The few commands a newcomer needs. Each one creates the virtualenv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run mailbox courier test check bench venv services tools asyncapi lock clean

# Dependencies come from the lock file, each checked against its hashes; the project itself is
# installed on top without resolving anything again.
$(BIN)/identity-worker: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/identity-worker

## Pin every dependency, with hashes, after changing pyproject.toml: requirements.lock is what
## the image installs (with the `tracing` extra, so that IDENTITY_OTLP_TRACES_URL works in the
## image), requirements-dev.lock adds the test, benchmark and lock tools.
lock: venv
	$(BIN)/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 \
		--extra tracing -q -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 \
		--extra test --extra tracing --extra bench --extra lock -q -o requirements-dev.lock

services:
	./scripts/ensure-services.sh

## Command-line tools the tests call: promtool (Debian package prometheus), installed if missing.
tools:
	./scripts/ensure-tools.sh

## Run the worker against the local RabbitMQ and PostgreSQL (creates the database), in dev mode:
## keys made on the spot and kept in the database, the open caller policy, loud warnings.
## The database has two roles (scripts/ensure-roles.sh): identity_owner migrates, the worker
## runs as identity_worker, which may only read and write rows. The codes and notices it mails
## go to identity.courier: see `make mailbox` and `make courier` below.
# GLIBC_TUNABLES: argon2's memory on huge pages, as in the Dockerfile (services.passwords).
# What the caller sets comes last, and glibc takes the last value: glibc.malloc.hugetlb=0 wins.
run: venv services
	./scripts/ensure-roles.sh
	IDENTITY_DEV_MODE=true \
	IDENTITY_DATABASE_URL=$${IDENTITY_DATABASE_URL:-postgresql://identity_worker@127.0.0.1:5432/identity} \
	IDENTITY_MIGRATION_DATABASE_URL=$${IDENTITY_MIGRATION_DATABASE_URL:-postgresql://identity_owner@127.0.0.1:5432/identity} \
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1$${GLIBC_TUNABLES:+:$$GLIBC_TUNABLES} $(BIN)/identity-worker run

## See the mails (verification and recovery codes) locally, beside `make run`: `make mailbox`
## in one terminal (an SMTP server on 127.0.0.1:1025 that prints every mail it gets), then
## `make courier` in another (the mail sender, in dev mode, sending to it in plain text; its
## sidecar on 8081). Mailpit works too: `make courier` sends to 127.0.0.1:1025 all the same,
## and its inbox is on http://localhost:8025.
mailbox: venv
	exec $(BIN)/aiosmtpd -n -l 127.0.0.1:1025 -c aiosmtpd.handlers.Debugging

courier: venv services
	IDENTITY_DEV_MODE=true \
	IDENTITY_SMTP_URL=$${IDENTITY_SMTP_URL:-smtp+insecure://127.0.0.1:1025} \
	IDENTITY_MAIL_FROM="$${IDENTITY_MAIL_FROM:-Identity <no-reply@identity.localhost>}" \
	IDENTITY_HTTP_PORT=$${IDENTITY_HTTP_PORT:-8081} \
	exec $(BIN)/identity-worker courier

## Every test: unit, store contract (memory + PostgreSQL), integration and faults.
# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: venv services tools
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

## Lint, format and types.
check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv services
	$(BIN)/python bench/run.py

asyncapi: venv
	$(BIN)/identity-worker asyncapi > docs/asyncapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
