#!/bin/sh
# Runs the worker under callgrind, for `bench --worker bench/callgrind-worker.sh`: each worker
# the benchmark starts writes its instruction counts to $CALLGRIND_DIR/worker.<pid>
# (default /tmp/opsgenie-callgrind). Instructions, unlike seconds, do not move with whatever
# else the machine is doing, so two builds can be compared on a busy machine:
#
#   target/dist/bench --jobs 3000 --replicas "" --api-latency off --seconds 2 --rate 100 \
#     --worker bench/callgrind-worker.sh
#   callgrind_annotate /tmp/opsgenie-callgrind/worker.<pid of the first drain> | head -30
#
# Under valgrind the worker runs some fifty times slower, so the figures of that run other than
# the instruction counts mean nothing. WORKER picks the binary (default: the dist build).
set -eu
dir="${CALLGRIND_DIR:-/tmp/opsgenie-callgrind}"
mkdir -p "$dir"
here="$(cd "$(dirname "$0")/.." && pwd)"
exec valgrind --tool=callgrind --callgrind-out-file="$dir/worker.%p" \
  "${WORKER:-$here/target/dist/opsgenie-worker}" "$@"
