#!/usr/bin/env bash
# Scale in clients: the RSS of 10,000 idle plain and 10,000 idle TLS connections, and
# slotgate's CPU per request at 50 and at 1,000 clients (same harness as scripts/bench.sh).
#
#   scripts/scale.sh                 # both parts
#   IDLE=20000 scripts/scale.sh      # more idle connections
#   SKIP_CPU=1 scripts/scale.sh      # only the idle-connection part
#
# Everything listens on 127.0.0.1 and is stopped (by PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10000}
BASE_PORT=${BASE_PORT:-21600}
cargo build --release --quiet
BIN=$PWD/target/release/slotgate
DIR=$(mktemp -d /tmp/slotgate-scale.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  return 1
}

# slotgate raises its own descriptor limit for --maxclients; the shell needs it for the
# client side (the Python script raises its soft limit up to this hard limit).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
S1=$BASE_PORT S2=$((BASE_PORT + 1)) PLAIN=$((BASE_PORT + 2)) TLS=$((BASE_PORT + 3))
for p in $S1 $S2; do
  mkdir -p "$DIR/$p"
  redis-server --bind 127.0.0.1 --port "$p" --save '' --appendonly no --dir "$DIR/$p" \
    --daemonize no --loglevel warning >"$DIR/$p/log" 2>&1 &
  PIDS+=($!)
  wait_port "$p"
done
"$BIN" --listen "127.0.0.1:$PLAIN" --tls-listen "127.0.0.1:$TLS" --tls-self-signed \
  --shard-list "127.0.0.1:$S1,127.0.0.1:$S2" --workers 1 --maxclients $((2 * IDLE + 100)) \
  --admin-listen none --log-level warn >"$DIR/slotgate.log" 2>&1 &
SG=$!
PIDS+=($SG)
wait_port "$PLAIN"
wait_port "$TLS"

echo "## idle connections (slotgate pid $SG, 1 worker)"
python3 scripts/idle_conns.py --port "$PLAIN" --pid "$SG" --count "$IDLE"
python3 scripts/idle_conns.py --port "$TLS" --pid "$SG" --count "$IDLE" --tls

if [ "${SKIP_CPU:-0}" != 1 ]; then
  echo
  echo "## CPU per request at 50 and at 1,000 clients (scripts/bench.sh, GET and SET unpipelined)"
  for c in 50 1000; do
    echo "### $c clients"
    CLIENTS=$c N_P1=${N_P1:-200000} bash scripts/bench.sh --no-anchors --scenarios get_p1,set_p1 \
      2>&1 | grep -E '^\| (scenario|---|get_p1|set_p1) ' || true
  done
fi
