#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside (and without touching) the machine's own
# broker: each node has its own node name, AMQP and distribution ports, data, log and config
# files under one directory, and the nodes share an Erlang cookie of their own.
#
#   tests/rabbitmq-cluster.sh start DIR        start three nodes, join them, wait until they run;
#                                              writes DIR/cluster.env (NODE1..3, PORT1..3, URLS)
#   tests/rabbitmq-cluster.sh kill DIR N       SIGKILL node N (1, 2 or 3)
#   tests/rabbitmq-cluster.sh restart DIR N    start node N again (it rejoins the cluster)
#   tests/rabbitmq-cluster.sh ctl DIR N ARGS   rabbitmqctl against node N
#   tests/rabbitmq-cluster.sh queues DIR N ARGS   rabbitmq-queues against node N
#   tests/rabbitmq-cluster.sh stop DIR         SIGKILL every node and remove DIR
#
# Ports: OG_CLUSTER_PORTS="P1 P2 P3" (AMQP; the distribution ports are P+10000), otherwise free
# ones are picked. Start and restart wait up to OG_CLUSTER_TIMEOUT seconds (default 180).
set -euo pipefail

# The server's own scripts, not the wrappers in /usr/sbin, which switch to the rabbitmq user
# and its cookie.
RMQ_BIN=${RABBITMQ_BIN:-}
if [ -z "$RMQ_BIN" ]; then
  for dir in /usr/lib/rabbitmq/bin /usr/local/lib/rabbitmq/bin "$(dirname "$(command -v rabbitmq-server 2>/dev/null || echo /x/x)")"; do
    if [ -x "$dir/rabbitmq-server" ] && [ -x "$dir/rabbitmq-env" ]; then RMQ_BIN=$dir; break; fi
  done
fi
[ -n "$RMQ_BIN" ] || { echo "rabbitmq-server not found (set RABBITMQ_BIN)" >&2; exit 1; }
TIMEOUT=${OG_CLUSTER_TIMEOUT:-180}

die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 20000))
    if port_free "$p" && port_free $((p + 10000)); then echo "$p"; return; fi
  done
  die "no free port found"
}

# The environment of node N: everything under DIR/nN, plugins off, the cluster's cookie.
node_env() {
  local dir=$1 n=$2
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  local node port
  eval "node=\$NODE$n; port=\$PORT$n"
  local home="$dir/n$n"
  echo HOME="$dir" \
    RABBITMQ_NODENAME="$node" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT=$((port + 10000)) \
    RABBITMQ_MNESIA_BASE="$home/mnesia" \
    RABBITMQ_LOG_BASE="$home/log" \
    RABBITMQ_CONFIG_FILE="$home/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$home/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="'+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none'"
}

in_env() {
  local dir=$1 n=$2
  shift 2
  eval "env $(node_env "$dir" "$n") \"\$@\""
}

# Runs one of RabbitMQ's command-line tools (rabbitmqctl, rabbitmq-queues) against node n.
node_tool() {
  local dir=$1 n=$2 tool=$3
  shift 3
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  local node
  eval "node=\$NODE$n"
  HOME="$dir" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$RMQ_BIN/$tool" -q -n "$node" "$@"
}

ctl() {
  local dir=$1 n=$2
  shift 2
  node_tool "$dir" "$n" rabbitmqctl "$@"
}

queues() {
  local dir=$1 n=$2
  shift 2
  node_tool "$dir" "$n" rabbitmq-queues "$@"
}

start_node() {
  local dir=$1 n=$2
  mkdir -p "$dir/n$n/log" "$dir/n$n/mnesia"
  # A session (and process group) of its own, whose id is the pid written here: every process
  # of the node can be killed at once, even one that never finished booting.
  (eval "exec env $(node_env "$dir" "$n") setsid \"\$RMQ_BIN/rabbitmq-server\"") \
    </dev/null >>"$dir/n$n/log/console.log" 2>&1 &
  echo $! >"$dir/n$n/group.pid"
}

await_node() {
  local dir=$1 n=$2
  local end=$((SECONDS + TIMEOUT))
  # await_startup fails at once while the node is not up at all: ask again until it answers.
  until ctl "$dir" "$n" await_startup --timeout "$TIMEOUT" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || die "node $n did not start within ${TIMEOUT}s; see $dir/n$n/log"
    sleep 1
  done
  # The beam process, for a SIGKILL.
  ctl "$dir" "$n" eval 'os:getpid().' | tr -d '"\r\n ' >"$dir/n$n/pid"
  [ -s "$dir/n$n/pid" ] || die "cannot learn the pid of node $n"
}

beam_pid() {
  local dir=$1 n=$2
  [ -s "$dir/n$n/pid" ] && cat "$dir/n$n/pid"
}

kill_node() {
  local dir=$1 n=$2 pid
  pid=$(beam_pid "$dir" "$n" || true)
  if [ -z "$pid" ]; then
    kill_group "$dir" "$n"
    echo "rabbitmq-cluster: node $n is not running" >&2
    return 1
  fi
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$dir/n$n/pid"
  kill_group "$dir" "$n"
}

# Every process left of node N: the group it was started in.
kill_group() {
  local dir=$1 n=$2
  if [ -s "$dir/n$n/group.pid" ]; then
    kill -KILL -- "-$(cat "$dir/n$n/group.pid")" 2>/dev/null || true
    rm -f "$dir/n$n/group.pid"
  fi
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|kill|restart|ctl|queues|stop DIR [N] [ARGS]"

case "$cmd" in
  start)
    [ ! -e "$dir/cluster.env" ] || die "$dir already holds a cluster"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    suffix=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 8)
    # A cookie of the cluster's own: its nodes cannot talk to any other node on the machine.
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' >"$dir/.erlang.cookie"
    chmod 400 "$dir/.erlang.cookie"
    echo '[].' >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
    read -r -a ports <<<"${OG_CLUSTER_PORTS:-}"
    {
      for n in 1 2 3; do
        port=${ports[$((n - 1))]:-$(pick_port)}
        echo "NODE$n=og-c$n-$suffix@localhost"
        echo "PORT$n=$port"
      done
    } >"$dir/cluster.env"
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    echo "URLS=amqp://guest:guest@127.0.0.1:$PORT1/%2f,amqp://guest:guest@127.0.0.1:$PORT2/%2f,amqp://guest:guest@127.0.0.1:$PORT3/%2f" >>"$dir/cluster.env"
    for n in 1 2 3; do
      cat >"$dir/n$n.conf.tmp" <<EOF
listeners.tcp.1 = 127.0.0.1:$(eval "echo \$PORT$n")
loopback_users = none
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.2
log.console = false
log.file.level = info
EOF
      mkdir -p "$dir/n$n"
      mv "$dir/n$n.conf.tmp" "$dir/n$n/rabbitmq.conf"
      start_node "$dir" "$n"
    done
    for n in 1 2 3; do await_node "$dir" "$n"; done
    for n in 2 3; do
      for step in stop_app "join_cluster $NODE1" start_app; do
        # shellcheck disable=SC2086
        ctl "$dir" "$n" $step >>"$dir/join.log" 2>&1 \
          || die "node $n: $step failed; see $dir/join.log"
      done
      await_node "$dir" "$n"
    done
    running=$(ctl "$dir" 1 cluster_status --formatter json | grep -o "og-c[123]-$suffix@localhost" | sort -u | wc -l)
    [ "$running" -ge 3 ] || die "the nodes did not form a cluster"
    echo "$dir/cluster.env"
    ;;
  kill)
    kill_node "$dir" "${3:?node number}"
    ;;
  restart)
    n=${3:?node number}
    start_node "$dir" "$n"
    await_node "$dir" "$n"
    ;;
  ctl)
    n=${3:?node number}
    shift 3
    ctl "$dir" "$n" "$@"
    ;;
  queues)
    n=${3:?node number}
    shift 3
    queues "$dir" "$n" "$@"
    ;;
  stop)
    if [ -e "$dir/cluster.env" ]; then
      for n in 1 2 3; do kill_node "$dir" "$n" 2>/dev/null || true; done
    fi
    rm -rf "$dir"
    ;;
  *)
    die "unknown command $cmd"
    ;;
esac
