#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this one machine, for tests and for trying the worker
# against a cluster. It uses the installed RabbitMQ (the same Debian packages as the machine's
# own broker) but nothing of that broker: its own node names, AMQP and distribution ports,
# data and log directories, configuration files and Erlang cookie, all under one base
# directory. The machine's own RabbitMQ (rabbit@localhost on 5672, its cookie in
# /var/lib/rabbitmq) is never started, stopped, configured or asked anything.
#
#   scripts/rabbit-cluster.sh start          three nodes (RABBIT_CLUSTER_NODES), clustered, with
#                                            a user and a vhost
#   scripts/rabbit-cluster.sh status         which nodes run, and the cluster as one sees it
#   scripts/rabbit-cluster.sh stop N         stop node N gracefully (N = 1, 2 or 3)
#   scripts/rabbit-cluster.sh kill N         kill -9 node N's Erlang VM
#   scripts/rabbit-cluster.sh restart N      start node N again; it rejoins the cluster
#   scripts/rabbit-cluster.sh leader QUEUE   the node that leads quorum queue QUEUE
#   scripts/rabbit-cluster.sh urls           the AMQP URLs of the nodes, comma-separated
#   scripts/rabbit-cluster.sh ctl N ARGS...  rabbitmqctl ARGS against node N
#   scripts/rabbit-cluster.sh teardown       stop every node and remove the base directory
#
# Settings (environment; `start` writes them to the base directory and every later command
# reads them back from there, so only RABBIT_CLUSTER_DIR needs repeating):
#   RABBIT_CLUSTER_DIR        base directory            (/tmp/identity-rabbit-cluster)
#   RABBIT_CLUSTER_NAME       node name prefix          (identity-c: identity-c1@localhost ...)
#   RABBIT_CLUSTER_PORT       AMQP port of node N is this + N              (5680: 5681-5683)
#   RABBIT_CLUSTER_DIST_PORT  Erlang distribution port of node N is this + N (25680)
#   RABBIT_CLUSTER_USER / _PASSWORD / _VHOST   created on first boot (identity/identity/identity)
#   RABBIT_CLUSTER_NODES      how many nodes, 1 to 3                    (3)
#   RABBIT_CLUSTER_TLS_DIR    a directory holding ca.pem, server.pem and server.key: each node
#                             also listens for AMQP over TLS on RABBIT_CLUSTER_TLS_PORT + N
#                             (default: the AMQP port + 10), verifying client certificates
#                             against ca.pem when a client presents one        (unset: no TLS)
#
# Quorum queues: RabbitMQ 3.10 places a new quorum queue's replicas on every node that is a
# cluster member when the queue is declared (no x-quorum-initial-group-size needed). `start`
# returns only once all three nodes have joined, so a queue declared after it is replicated on
# all three. A node that joins later gets no replica of existing queues until
# `rabbitmq-queues grow <node> all` is run against it.
set -euo pipefail

SELF="$(basename "$0")"
RABBIT_BIN="${RABBIT_BIN:-/usr/lib/rabbitmq/bin}"

die() { echo "$SELF: $*" >&2; exit 1; }
say() { echo "$SELF: $*" >&2; }

DIR="${RABBIT_CLUSTER_DIR:-/tmp/identity-rabbit-cluster}"
MARKER="$DIR/.identity-rabbit-cluster"
SETTINGS="$DIR/cluster.env"

load_settings() {
  # What `start` wrote wins over the environment: the cluster is what was started.
  if [ -f "$SETTINGS" ]; then
    # shellcheck disable=SC1090
    . "$SETTINGS"
  fi
  NAME="${RABBIT_CLUSTER_NAME:-identity-c}"
  PORT_BASE="${RABBIT_CLUSTER_PORT:-5680}"
  DIST_BASE="${RABBIT_CLUSTER_DIST_PORT:-25680}"
  USER_NAME="${RABBIT_CLUSTER_USER:-identity}"
  USER_PASSWORD="${RABBIT_CLUSTER_PASSWORD:-identity}"
  VHOST="${RABBIT_CLUSTER_VHOST:-identity}"
  NODE_COUNT="${RABBIT_CLUSTER_NODES:-3}"
  TLS_DIR="${RABBIT_CLUSTER_TLS_DIR:-}"
  TLS_BASE="${RABBIT_CLUSTER_TLS_PORT:-$((PORT_BASE + 10))}"
  case "$NODE_COUNT" in
    1 | 2 | 3) ;;
    *) die "RABBIT_CLUSTER_NODES must be 1, 2 or 3, got '$NODE_COUNT'" ;;
  esac
  mapfile -t NODES < <(seq 1 "$NODE_COUNT")
}

node_name() { echo "${NAME}$1@localhost"; }
node_dir() { echo "$DIR/n$1"; }
amqp_port() { echo $((PORT_BASE + $1)); }
dist_port() { echo $((DIST_BASE + $1)); }
tls_port() { echo $((TLS_BASE + $1)); }

check_n() {
  case "${1:-}" in
    1 | 2 | 3) [ "$1" -le "$NODE_COUNT" ] || die "the cluster has $NODE_COUNT nodes, not node $1" ;;
    *) die "expected a node number 1, 2 or 3, got '${1:-}'" ;;
  esac
}

# NODE_ENV: the environment every RabbitMQ script gets: this cluster's files only. HOME points at the
# base directory, where the cluster's own cookie is; RABBITMQ_CONF_ENV_FILE keeps
# /etc/rabbitmq/rabbitmq-env.conf (the machine broker's node name) out.
node_env() {
  local n="$1" d
  d="$(node_dir "$n")"
  NODE_ENV=(HOME="$DIR"
    RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
    RABBITMQ_NODENAME="$(node_name "$n")"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$(amqp_port "$n")"
    RABBITMQ_DIST_PORT="$(dist_port "$n")"
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
    RABBITMQ_MNESIA_BASE="$d/mnesia"
    RABBITMQ_LOG_BASE="$d/log"
    RABBITMQ_PID_FILE="$d/beam.pid"
    ERL_EPMD_ADDRESS=127.0.0.1)
}

# rabbitmqctl (or another CLI tool) against node N, with the cluster's cookie.
ctl_tool() {
  local tool="$1" n="$2"
  shift 2
  node_env "$n"
  env "${NODE_ENV[@]}" "$RABBIT_BIN/$tool" -n "$(node_name "$n")" "$@"
}
ctl() { ctl_tool rabbitmqctl "$@"; }

node_pid() {
  # The pid in the node's pid file, if that process is alive and is this node's Erlang VM.
  local file pid
  file="$(node_dir "$1")/beam.pid"
  [ -s "$file" ] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  # A recycled pid is not the node: the VM carries its node name and home in its environment.
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null \
    | grep -qx -e "RABBITMQ_NODENAME=$(node_name "$1")" || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx -e "HOME=$DIR" || return 1
  echo "$pid"
}

running() { node_pid "$1" >/dev/null; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_files() {
  local n d m
  mkdir -p "$DIR"
  touch "$MARKER"
  {
    printf 'RABBIT_CLUSTER_NAME=%q\n' "$NAME"
    printf 'RABBIT_CLUSTER_PORT=%q\n' "$PORT_BASE"
    printf 'RABBIT_CLUSTER_DIST_PORT=%q\n' "$DIST_BASE"
    printf 'RABBIT_CLUSTER_USER=%q\n' "$USER_NAME"
    printf 'RABBIT_CLUSTER_PASSWORD=%q\n' "$USER_PASSWORD"
    printf 'RABBIT_CLUSTER_VHOST=%q\n' "$VHOST"
    printf 'RABBIT_CLUSTER_NODES=%q\n' "$NODE_COUNT"
    printf 'RABBIT_CLUSTER_TLS_DIR=%q\n' "$TLS_DIR"
    printf 'RABBIT_CLUSTER_TLS_PORT=%q\n' "$TLS_BASE"
  } >"$SETTINGS"
  : >"$DIR/rabbitmq-env.conf"
  if [ ! -s "$DIR/.erlang.cookie" ]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -dc '0-9a-f' >"$DIR/.erlang.cookie")
  fi
  chmod 400 "$DIR/.erlang.cookie"
  for n in "${NODES[@]}"; do
    d="$(node_dir "$n")"
    mkdir -p "$d/mnesia" "$d/log"
    echo '[].' >"$d/enabled_plugins"
    echo '[].' >"$d/advanced.config"
    {
      echo "listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")"
      echo "cluster_formation.peer_discovery_backend = classic_config"
      for m in "${NODES[@]}"; do
        echo "cluster_formation.classic_config.nodes.$m = $(node_name "$m")"
      done
      if [ -n "$TLS_DIR" ]; then
        # verify_peer: a client certificate, when presented, must chain to ca.pem.
        cat <<EOF
listeners.ssl.1 = 127.0.0.1:$(tls_port "$n")
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
EOF
      fi
    } >"$d/rabbitmq.conf"
    cat >>"$d/rabbitmq.conf" <<EOF
cluster_partition_handling = pause_minority
default_vhost = $VHOST
default_user = $USER_NAME
default_pass = $USER_PASSWORD
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
log.console = false
log.file.level = info
EOF
  done
}

launch() {
  local n="$1"
  rm -f "$(node_dir "$n")/beam.pid"
  node_env "$n"
  env "${NODE_ENV[@]}" "$RABBIT_BIN/rabbitmq-server" -detached \
    >>"$(node_dir "$n")/log/startup.log" 2>&1
}

await_node() {
  local n="$1"
  # `wait` follows the pid file the node writes, then waits for the app to be running.
  if ! ctl "$n" wait --timeout 120 "$(node_dir "$n")/beam.pid" >/dev/null 2>&1; then
    say "node $n ($(node_name "$n")) did not start; its log:"
    tail -n 30 "$(node_dir "$n")/log/$(node_name "$n").log" >&2 2>/dev/null || true
    tail -n 30 "$(node_dir "$n")/log/startup.log" >&2 2>/dev/null || true
    return 1
  fi
}

running_members() {
  # How many nodes the cluster, as node N sees it, has running.
  ctl "$1" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null | tr -dc '0-9'
}

any_running() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then
      echo "$n"
      return 0
    fi
  done
  return 1
}

cmd_start() {
  local n started=$SECONDS
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "RabbitMQ is not installed ($RABBIT_BIN/rabbitmq-server)"
  for n in "${NODES[@]}"; do
    running "$n" && die "node $n is already running (teardown first, or use another RABBIT_CLUSTER_DIR)"
  done
  if [ -e "$DIR" ] && [ ! -e "$MARKER" ]; then
    die "$DIR exists and is not a cluster directory made by this script"
  fi
  if [ -n "$TLS_DIR" ]; then
    for f in ca.pem server.pem server.key; do
      [ -r "$TLS_DIR/$f" ] || die "RABBIT_CLUSTER_TLS_DIR has no readable $f"
    done
  fi
  for n in "${NODES[@]}"; do
    port_free "$(amqp_port "$n")" || die "port $(amqp_port "$n") is taken"
    port_free "$(dist_port "$n")" || die "port $(dist_port "$n") is taken"
    [ -z "$TLS_DIR" ] || port_free "$(tls_port "$n")" || die "port $(tls_port "$n") is taken"
  done
  write_files
  # The first node forms the cluster; the other two find it through classic_config and join.
  # Started together, each of them could find no peer yet and form a cluster of its own.
  launch 1
  await_node 1 || die "the first node did not start"
  for n in "${NODES[@]:1}"; do launch "$n"; done
  for n in "${NODES[@]:1}"; do await_node "$n" || die "node $n did not start"; done
  local members
  members="$(running_members 1)"
  [ "$members" = "$NODE_COUNT" ] \
    || die "the cluster has ${members:-no} running nodes, not $NODE_COUNT"
  say "$NODE_COUNT node(s) clustered in $((SECONDS - started)) s; vhost '$VHOST', user '$USER_NAME'"
  cmd_urls
}

cmd_status() {
  local n pid up
  [ -e "$MARKER" ] || die "no cluster in $DIR"
  for n in "${NODES[@]}"; do
    if pid="$(node_pid "$n")"; then up="running (pid $pid)"; else up="stopped"; fi
    printf '%s\tamqp 127.0.0.1:%s\tdist %s\t%s%s\n' \
      "$(node_name "$n")" "$(amqp_port "$n")" "$(dist_port "$n")" "$up" \
      "$([ -n "$TLS_DIR" ] && printf '\tamqps 127.0.0.1:%s' "$(tls_port "$n")")"
  done
  if n="$(any_running)"; then
    ctl "$n" cluster_status --formatter erlang -q 2>/dev/null \
      | tr -d ' \n' | grep -o '{running_nodes,\[[^]]*\]}' || true
    echo
  fi
}

cmd_stop() {
  check_n "$1"
  running "$1" || die "node $1 is not running"
  # shutdown stops the app, then the Erlang VM, and waits for the process to be gone.
  ctl "$1" shutdown >/dev/null
  say "node $1 stopped"
}

cmd_kill() {
  local pid
  check_n "$1"
  pid="$(node_pid "$1")" || die "node $1 is not running"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  say "node $1 killed (pid $pid)"
}

cmd_restart() {
  local started=$SECONDS
  check_n "$1"
  running "$1" && die "node $1 is running"
  [ -e "$MARKER" ] || die "no cluster in $DIR"
  launch "$1"
  await_node "$1" || die "node $1 did not start"
  say "node $1 back in $((SECONDS - started)) s; running nodes: $(running_members "$1")"
}

cmd_leader() {
  local queue="$1" n
  n="$(any_running)" || die "no node is running"
  ctl "$n" list_queues -q -p "$VHOST" name leader --no-table-headers 2>/dev/null \
    | awk -F '\t' -v q="$queue" '$1 == q { print $2; found = 1 } END { exit !found }' \
    || die "no quorum queue '$queue' in vhost '$VHOST'"
}

cmd_urls() {
  local n urls=()
  for n in "${NODES[@]}"; do
    urls+=("amqp://$USER_NAME:$USER_PASSWORD@127.0.0.1:$(amqp_port "$n")/$VHOST")
  done
  (IFS=,; echo "${urls[*]}")
}

cmd_teardown() {
  local n pid pids=()
  if [ ! -e "$DIR" ]; then
    say "nothing to tear down in $DIR"
    return 0
  fi
  [ -e "$MARKER" ] || die "$DIR is not a cluster directory made by this script; not removing it"
  # SIGTERM makes the Erlang VM shut down in order; what has not gone after 20 s is killed.
  for n in "${NODES[@]}"; do
    if pid="$(node_pid "$n")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf -- "$DIR"
  say "cluster stopped and $DIR removed"
}

load_settings
command="${1:-}"
shift || true
case "$command" in
  start) cmd_start ;;
  status) cmd_status ;;
  stop) cmd_stop "${1:-}" ;;
  kill) cmd_kill "${1:-}" ;;
  restart) cmd_restart "${1:-}" ;;
  leader) [ -n "${1:-}" ] || die "usage: $SELF leader QUEUE"; cmd_leader "$1" ;;
  urls) cmd_urls ;;
  ctl) check_n "${1:-}"; n="$1"; shift; ctl "$n" "$@" ;;
  teardown) cmd_teardown ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
