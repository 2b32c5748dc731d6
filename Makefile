# The few commands a newcomer needs. Each one creates the virtualenv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test check bench venv services asyncapi clean

$(BIN)/identity-worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(BIN)/identity-worker

services:
	./scripts/ensure-services.sh

## Run the worker against the local RabbitMQ and PostgreSQL (creates the database), in dev
## mode: keys it is not given are made and kept in the database, with a warning.
# GLIBC_TUNABLES: argon2's memory on huge pages, as in the Dockerfile (services.passwords).
# What the caller sets comes last, and glibc takes the last value: glibc.malloc.hugetlb=0 wins.
run: venv services
	IDENTITY_DEV_MODE=true GLIBC_TUNABLES=glibc.malloc.hugetlb=1$${GLIBC_TUNABLES:+:$$GLIBC_TUNABLES} $(BIN)/identity-worker run

## Every test: unit, store contract (memory + PostgreSQL), integration and faults.
# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: venv services
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
