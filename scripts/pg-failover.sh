#!/usr/bin/env bash
# A PostgreSQL 15 primary and a streaming standby on this one machine (physical replication
# through a replication slot), for failover tests and for trying the worker on a libpq
# multi-host URL. Both live in their own data directories under one base directory and listen
# on their own ports on 127.0.0.1 (trust authentication, loopback only); the machine's own
# cluster (5432) is never touched. Run as root, the server tools run as the `postgres` user.
#
#   scripts/pg-failover.sh start          node a primary (5441), node b its standby (5442)
#   scripts/pg-failover.sh status         each node's role and replication state
#   scripts/pg-failover.sh promote        the standby becomes a primary
#   scripts/pg-failover.sh stop-primary   stop the primary (fast shutdown)
#   scripts/pg-failover.sh kill-primary   kill -9 the primary's postmaster and its processes
#   scripts/pg-failover.sh rejoin         the old primary (stopped) follows the new one again
#                                         (pg_rewind, then standby)
#   scripts/pg-failover.sh url [DB]       the libpq multi-host URL of both nodes
#   scripts/pg-failover.sh teardown       stop both and remove the base directory
#
# Settings (environment; `start` writes them to the base directory and every later command
# reads them back, so only PG_FAILOVER_DIR needs repeating):
#   PG_FAILOVER_DIR           base directory             (/tmp/identity-pg-failover)
#   PG_FAILOVER_PORT_A / _B   ports of the two nodes     (5441 / 5442)
#   PG_FAILOVER_SYNC          1: synchronous replication (synchronous_standby_names = '*'),
#                             a commit returns once the standby has flushed it   (0)
#   PG_BIN                    PostgreSQL's programs      (/usr/lib/postgresql/15/bin)
#   PG_FAILOVER_STANDBY       0: node a alone, no standby (commands that need one refuse)  (1)
#   PG_FAILOVER_SSL_DIR       a directory holding ca.pem, server.pem and server.key: the nodes
#                             take TLS (ssl = on; plain text still accepted) and verify a
#                             client certificate against ca.pem when one is presented (unset)
#
# Synchronous replication and promotion: a primary with synchronous_standby_names set and no
# standby connected waits forever at every commit. `promote` therefore clears the setting on
# the new primary (it has no standby to wait for: writes continue, unprotected, and say so);
# `rejoin` sets it again once the old primary follows it.
set -euo pipefail

SELF="$(basename "$0")"
die() { echo "$SELF: $*" >&2; exit 1; }
say() { echo "$SELF: $*" >&2; }

DIR="${PG_FAILOVER_DIR:-/tmp/identity-pg-failover}"
MARKER="$DIR/.identity-pg-failover"
SETTINGS="$DIR/failover.env"

load_settings() {
  if [ -f "$SETTINGS" ]; then
    # shellcheck disable=SC1090
    . "$SETTINGS"
  fi
  PORT_A="${PG_FAILOVER_PORT_A:-5441}"
  PORT_B="${PG_FAILOVER_PORT_B:-5442}"
  SYNC="${PG_FAILOVER_SYNC:-0}"
  PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
  STANDBY="${PG_FAILOVER_STANDBY:-1}"
  SSL_DIR="${PG_FAILOVER_SSL_DIR:-}"
}

port_of() { if [ "$1" = a ]; then echo "$PORT_A"; else echo "$PORT_B"; fi; }
other() { if [ "$1" = a ]; then echo b; else echo a; fi; }
data() { echo "$DIR/$1"; }

# The server programs run as `postgres` when this script runs as root (initdb refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    (cd "$DIR" && runuser -u postgres -- "$@")
  else
    (cd "$DIR" && "$@")
  fi
}

sql() {
  # sql NODE STATEMENT: one value per line, unaligned, no psqlrc.
  psql -X -q -At -h 127.0.0.1 -p "$(port_of "$1")" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "$2"
}

postmaster_pid() {
  # The postmaster of NODE, if it runs from this node's data directory.
  local file pid
  file="$(data "$1")/postmaster.pid"
  [ -s "$file" ] || return 1
  pid="$(head -n 1 "$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-D $(data "$1")" || return 1
  echo "$pid"
}

running() { postmaster_pid "$1" >/dev/null; }

primary() {
  # The node that is (or last was) the primary: kept in a file, moved by `promote`.
  cat "$DIR/primary"
}

standby() { other "$(primary)"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_start() {
  local node="$1"
  # The port on the command line: pg_basebackup and pg_rewind copy the other node's files.
  as_pg "$PG_BIN/pg_ctl" start -w -t 120 -D "$(data "$node")" -l "$DIR/$node.log" \
    -o "-p $(port_of "$node")" >/dev/null \
    || { tail -n 20 "$DIR/$node.log" >&2; die "node $node did not start"; }
}

# What a node needs to follow `source` as a standby: standby.signal and, in
# postgresql.auto.conf, where to stream from, under which name (for synchronous_standby_names
# and pg_stat_replication) and through which slot.
make_standby_of() {
  local node="$1" source="$2"
  as_pg touch "$(data "$node")/standby.signal"
  as_pg sh -c "cat >> '$(data "$node")/postgresql.auto.conf'" <<EOF
primary_conninfo = 'host=127.0.0.1 port=$(port_of "$source") user=postgres application_name=node_$node'
primary_slot_name = 'node_$node'
EOF
}

await_streaming() {
  # The standby shows up in the primary's pg_stat_replication as streaming, and in
  # synchronous mode as the standby commits wait for (a reload takes effect asynchronously).
  local node="$1" source="$2" sync_state=''
  [ "$SYNC" = 1 ] && sync_state="AND sync_state = 'sync'"
  for _ in $(seq 1 300); do
    if [ "$(sql "$source" "SELECT count(*) FROM pg_stat_replication
        WHERE application_name = 'node_$node' AND state = 'streaming' $sync_state" \
        2>/dev/null)" = 1 ]; then
      return 0
    fi
    sleep 0.1
  done
  die "node $node is not streaming from node $source"
}

cmd_start() {
  local started=$SECONDS
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL 15 is not installed ($PG_BIN/initdb)"
  if [ -e "$DIR" ]; then
    [ -e "$MARKER" ] || die "$DIR exists and is not a directory made by this script"
    running a || running b && die "already running (teardown first, or use another PG_FAILOVER_DIR)"
    rm -rf -- "$DIR"
  fi
  port_free "$PORT_A" || die "port $PORT_A is taken"
  [ "$STANDBY" = 0 ] || port_free "$PORT_B" || die "port $PORT_B is taken"
  if [ -n "$SSL_DIR" ]; then
    for f in ca.pem server.pem server.key; do
      [ -r "$SSL_DIR/$f" ] || die "PG_FAILOVER_SSL_DIR has no readable $f"
    done
  fi
  mkdir -p "$DIR"
  touch "$MARKER"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  {
    printf 'PG_FAILOVER_PORT_A=%q\n' "$PORT_A"
    printf 'PG_FAILOVER_PORT_B=%q\n' "$PORT_B"
    printf 'PG_FAILOVER_SYNC=%q\n' "$SYNC"
    printf 'PG_BIN=%q\n' "$PG_BIN"
    printf 'PG_FAILOVER_STANDBY=%q\n' "$STANDBY"
    printf 'PG_FAILOVER_SSL_DIR=%q\n' "$SSL_DIR"
  } >"$SETTINGS"
  echo a >"$DIR/primary"

  # Checksums let pg_rewind bring a failed primary back as a standby (`rejoin`).
  as_pg "$PG_BIN/initdb" -D "$(data a)" -U postgres --auth=trust --data-checksums \
    --no-instructions >"$DIR/initdb.log"
  as_pg sh -c "cat >> '$(data a)/postgresql.conf'" <<EOF

# scripts/pg-failover.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
hot_standby = on
wal_log_hints = on
shared_buffers = 64MB
log_line_prefix = '%m [%p] '
synchronous_standby_names = '$([ "$SYNC" = 1 ] && echo '*')'
EOF
  as_pg sh -c "cat > '$(data a)/pg_hba.conf'" <<EOF
local all all trust
host all all 127.0.0.1/32 trust
local replication all trust
host replication all 127.0.0.1/32 trust
EOF
  if [ -n "$SSL_DIR" ]; then
    # In the data directory, owned by postgres, the key private to it (the server insists);
    # a base backup copies them to the standby.
    install -m 600 "$SSL_DIR/server.key" "$(data a)/server.key"
    install -m 644 "$SSL_DIR/server.pem" "$(data a)/server.crt"
    install -m 644 "$SSL_DIR/ca.pem" "$(data a)/root.crt"
    [ "$(id -u)" = 0 ] && chown postgres: "$(data a)/server.key" "$(data a)/server.crt" \
      "$(data a)/root.crt"
    as_pg sh -c "cat >> '$(data a)/postgresql.conf'" <<EOF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'root.crt'
EOF
  fi
  node_start a
  if [ "$STANDBY" = 0 ]; then
    say "primary on $PORT_A (no standby)$([ -n "$SSL_DIR" ] && echo ', TLS on'), in $((SECONDS - started)) s"
    echo "postgresql://postgres@127.0.0.1:$PORT_A/postgres"
    return 0
  fi
  # The standby: a base backup streaming its WAL, through a slot made for it (-C -S), so the
  # primary keeps every WAL segment the standby has not received yet.
  as_pg "$PG_BIN/pg_basebackup" -D "$(data b)" -h 127.0.0.1 -p "$PORT_A" -U postgres \
    -X stream -C -S node_b --checkpoint=fast
  make_standby_of b a
  node_start b
  await_streaming b a
  say "primary on $PORT_A, standby on $PORT_B streaming$([ "$SYNC" = 1 ] && echo ' (synchronous)'), in $((SECONDS - started)) s"
  cmd_url
}

cmd_status() {
  local node role
  [ -e "$MARKER" ] || die "nothing in $DIR"
  for node in a b; do
    if running "$node"; then
      case "$(sql "$node" "SELECT pg_is_in_recovery()" 2>/dev/null || echo '?')" in
        t) role=standby ;;
        f) role=primary ;;
        *) role="not answering" ;;
      esac
    else
      role=stopped
    fi
    printf 'node %s\t127.0.0.1:%s\t%s\n' "$node" "$(port_of "$node")" "$role"
    if [ "$role" = primary ]; then
      sql "$node" "SELECT '  streams to ' || application_name || ': ' || state || ', ' ||
          sync_state || ', replay lag ' || coalesce(replay_lag::text, '0')
          FROM pg_stat_replication" 2>/dev/null || true
      sql "$node" "SELECT '  synchronous_standby_names = ''' ||
          current_setting('synchronous_standby_names') || ''''" 2>/dev/null || true
    fi
  done
}

cmd_promote() {
  local node
  node="$(standby)"
  running "$node" || die "the standby (node $node) is not running"
  [ "$(sql "$node" "SELECT pg_is_in_recovery()")" = t ] || die "node $node is not a standby"
  as_pg "$PG_BIN/pg_ctl" promote -w -t 60 -D "$(data "$node")" >/dev/null
  echo "$node" >"$DIR/primary"
  if [ -n "$(sql "$node" "SHOW synchronous_standby_names")" ]; then
    sql "$node" "ALTER SYSTEM SET synchronous_standby_names = ''" >/dev/null
    sql "$node" "SELECT pg_reload_conf()" >/dev/null
    say "node $node has no standby now: synchronous replication is off until rejoin"
  fi
  say "node $node (port $(port_of "$node")) is the primary"
}

cmd_stop_primary() {
  local node
  node="$(primary)"
  running "$node" || die "the primary (node $node) is not running"
  as_pg "$PG_BIN/pg_ctl" stop -w -m fast -D "$(data "$node")" >/dev/null
  say "primary (node $node) stopped"
}

cmd_kill_primary() {
  local node pid children
  node="$(primary)"
  pid="$(postmaster_pid "$node")" || die "the primary (node $node) is not running"
  # The postmaster and every process it started, at once: a crash, not a shutdown.
  children="$(pgrep -P "$pid" || true)"
  # shellcheck disable=SC2086
  kill -9 "$pid" $children 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  say "primary (node $node) killed (postmaster $pid)"
}

cmd_rejoin() {
  local node source
  source="$(primary)"
  node="$(other "$source")"
  running "$source" || die "the primary (node $source) is not running"
  [ "$(sql "$source" "SELECT pg_is_in_recovery()")" = f ] || die "node $source is not a primary"
  if running "$node"; then
    as_pg "$PG_BIN/pg_ctl" stop -w -m fast -D "$(data "$node")" >/dev/null
  fi
  # pg_rewind reads the source's timeline from its control file, which a promotion updates
  # only at its next checkpoint: without one it finds "the same timeline" and does nothing.
  sql "$source" "CHECKPOINT" >/dev/null
  # Whatever the old primary wrote that the new one never got is undone; pg_rewind runs the
  # crash recovery a killed server needs first.
  as_pg "$PG_BIN/pg_rewind" -D "$(data "$node")" \
    --source-server="host=127.0.0.1 port=$(port_of "$source") user=postgres dbname=postgres" \
    >>"$DIR/rewind.log" 2>&1 || { tail -n 20 "$DIR/rewind.log" >&2; die "pg_rewind failed"; }
  rm -f "$(data "$node")/postmaster.pid"
  sql "$source" "SELECT pg_create_physical_replication_slot('node_$node')
      WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'node_$node')" \
    >/dev/null
  # The copied auto.conf may say synchronous_standby_names = '' or name an old source.
  as_pg sed -i -e '/^synchronous_standby_names/d' -e '/^primary_conninfo/d' \
    -e '/^primary_slot_name/d' "$(data "$node")/postgresql.auto.conf"
  make_standby_of "$node" "$source"
  node_start "$node"
  # Slots the node held as a primary would pin its WAL as a standby.
  sql "$node" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" \
    >/dev/null || true
  if [ "$SYNC" = 1 ]; then
    sql "$source" "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
    sql "$source" "SELECT pg_reload_conf()" >/dev/null
  fi
  await_streaming "$node" "$source"
  say "node $node follows node $source"
}

cmd_url() {
  echo "postgresql://postgres@127.0.0.1:$PORT_A,127.0.0.1:$PORT_B/${1:-postgres}?target_session_attrs=read-write"
}

cmd_teardown() {
  local node pid
  if [ ! -e "$DIR" ]; then
    say "nothing to tear down in $DIR"
    return 0
  fi
  [ -e "$MARKER" ] || die "$DIR is not a directory made by this script; not removing it"
  for node in a b; do
    if pid="$(postmaster_pid "$node")"; then
      as_pg "$PG_BIN/pg_ctl" stop -w -m immediate -D "$(data "$node")" >/dev/null 2>&1 \
        || kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf -- "$DIR"
  say "both nodes stopped and $DIR removed"
}

load_settings
command="${1:-}"
shift || true
case "$command" in
  start) cmd_start ;;
  status) cmd_status ;;
  promote) cmd_promote ;;
  stop-primary) cmd_stop_primary ;;
  kill-primary) cmd_kill_primary ;;
  rejoin) cmd_rejoin ;;
  url) cmd_url "${1:-}" ;;
  teardown) cmd_teardown ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
