#!/usr/bin/env bash
# Starts three slotgate instances (127.0.0.1:6380-6382, admin 9180-9182) in front of the same
# 2 local redis-server shards (ports 7011-7012) and the demo HTTP origin (127.0.0.1:8080),
# with one read-through rule for `label:PO…` keys: a fleet as behind a load balancer. A miss
# on all three at once makes one origin request (the key's lease), an invalidation sent to
# one instance reaches the others, and hot keys are refreshed ahead of their TTL.
# Installs redis-server with apt-get if it is missing, builds slotgate (release), and stops
# everything it started on Ctrl-C.
#
#   scripts/run-fleet.sh            # then, in another terminal: redis-cli -p 6381
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${SHARD_BASE_PORT:-7011}
PORT=${PORT:-6380}
ORIGIN_PORT=${ORIGIN_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-9180}
export SLOTGATE_INVALIDATE_TOKEN=${SLOTGATE_INVALIDATE_TOKEN:-fleet-demo-token}

# shellcheck source=scripts/local-setup.sh
. scripts/local-setup.sh slotgate-fleet

SHARD_ARGS=()
for i in 0 1; do
  start_redis $((BASE + i)) SHARD_BASE_PORT
  SHARD_ARGS+=(--shard "127.0.0.1:$((BASE + i))")
done
for i in 0 1; do wait_ping $((BASE + i)); done

target/release/slotgate-demo-origin "127.0.0.1:$ORIGIN_PORT" &
PIDS+=($!)
RULE="label:=http://127.0.0.1:$ORIGIN_PORT/labels/{rest};ttl=10m;refresh_ahead=0.8;timeout=500ms;name=labels"
for i in 0 1 2; do
  target/release/slotgate --listen "127.0.0.1:$((PORT + i))" "${SHARD_ARGS[@]}" \
    --admin-listen "127.0.0.1:$((ADMIN_PORT + i))" --readthrough "$RULE" &
  PIDS+=($!)
done
for i in 0 1 2; do wait_ping $((PORT + i)); done

cat <<MSG

Three slotgate instances listen on 127.0.0.1:$PORT-$((PORT + 2)) (admin $ADMIN_PORT-$((ADMIN_PORT + 2))),
in front of the same redis-server shards ($BASE-$((BASE + 1))) and the demo origin on http://127.0.0.1:$ORIGIN_PORT.
Try:   for p in $PORT $((PORT + 1)) $((PORT + 2)); do redis-cli -p \$p GET label:PO777 & done; wait
                                      # one origin request (one log line from the origin)
       redis-cli -p $((PORT + 1)) INFO readthrough | tr , '\n' | grep -E 'origin_requests|lease_waits'
       curl -s -X POST -H "Authorization: Bearer $SLOTGATE_INVALIDATE_TOKEN" \\
            -d '{"keys": ["label:PO777"]}' 127.0.0.1:$ADMIN_PORT/invalidate
                                      # {"cleared": 1}, for all three instances
Press Ctrl-C to stop everything.
MSG
wait
