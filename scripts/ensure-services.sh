#!/usr/bin/env bash
# Make sure the local PostgreSQL and RabbitMQ answer; start them if they are installed but down.
# Used by `make run` and `make test` so a fresh machine needs no manual step.
set -euo pipefail

PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"

pg_up() { pg_isready -h "$PGHOST" -p "$PGPORT" -q 2>/dev/null; }
if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 60); do pg_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL is not reachable on $PGHOST:$PGPORT" >&2; exit 1; }

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
    rabbitmqctl wait --timeout 120 --pid "$(pgrep -f 'beam.*rabbit' | head -n1)" >/dev/null 2>&1 || true
  fi
  for _ in $(seq 1 120); do rabbit_up && break; sleep 1; done
fi
rabbit_up || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
# The port opens before the broker accepts work; wait until the app is running.
if command -v rabbitmqctl >/dev/null 2>&1; then
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
fi
echo "PostgreSQL and RabbitMQ are up"
