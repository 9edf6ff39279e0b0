#!/usr/bin/env bash
# Starts slotgate on 127.0.0.1:6380 in front of 3 local redis-server shards (ports 7001-7003)
# and a demo HTTP origin (127.0.0.1:8080) serving JSON label payloads, configured as the
# read-through rule for keys `label:PO…`. Admin/metrics on 127.0.0.1:9180.
# Installs redis-server with apt-get if it is missing, builds slotgate (release), and stops
# everything it started on Ctrl-C.
#
#   scripts/run-local.sh            # then, in another terminal: redis-cli -p 6380
#   SHARDS=5 PORT=6390 ORIGIN_PORT=8081 ADMIN_PORT=9181 scripts/run-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-3}
BASE=${SHARD_BASE_PORT:-7001}
PORT=${PORT:-6380}
ORIGIN_PORT=${ORIGIN_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-9180}

# shellcheck source=scripts/local-setup.sh
. scripts/local-setup.sh slotgate-local

SHARD_ARGS=()
for i in $(seq 0 $((SHARDS - 1))); do
  start_redis $((BASE + i)) SHARD_BASE_PORT
  SHARD_ARGS+=(--shard "127.0.0.1:$((BASE + i))")
done
for i in $(seq 0 $((SHARDS - 1))); do wait_ping $((BASE + i)); done

target/release/slotgate-demo-origin "127.0.0.1:$ORIGIN_PORT" &
PIDS+=($!)
target/release/slotgate --listen "127.0.0.1:$PORT" "${SHARD_ARGS[@]}" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" \
  --readthrough "label:=http://127.0.0.1:$ORIGIN_PORT/labels/{rest};ttl=10m;negative_ttl=30s;timeout=500ms;name=labels" &
PIDS+=($!)
wait_ping "$PORT"

cat <<MSG

slotgate is listening on 127.0.0.1:$PORT in front of $SHARDS redis-server shards (ports $BASE-$((BASE + SHARDS - 1))),
with a demo origin on http://127.0.0.1:$ORIGIN_PORT for keys label:PO... (read-through).
Connect with:   redis-cli -p $PORT
Try:            redis-cli -p $PORT GET label:PO12345      # a miss: loaded from the origin (see its log line)
                redis-cli -p $PORT GET label:PO12345      # a hit: served by the shard
                redis-cli -p $PORT INFO readthrough
                curl -s 127.0.0.1:$ADMIN_PORT/metrics | grep readthrough
                redis-cli -p $PORT set hello world && redis-cli -p $PORT get hello
Press Ctrl-C to stop everything.
MSG
wait
