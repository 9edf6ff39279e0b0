#!/usr/bin/env bash
# Starts a 6-node Redis Cluster on loopback (3 primaries, 3 replicas; ports 7101-7106) and
# slotgate in cluster mode in front of it on 127.0.0.1:6380 (admin on 127.0.0.1:9180).
# Installs redis-server with apt-get if it is missing, builds slotgate (release), and stops
# everything it started on Ctrl-C.
#
#   scripts/run-cluster.sh          # then, in another terminal: redis-cli -p 6380
#   CLUSTER_BASE_PORT=7201 PORT=6390 ADMIN_PORT=9181 scripts/run-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${CLUSTER_BASE_PORT:-7101}
PORT=${PORT:-6380}
ADMIN_PORT=${ADMIN_PORT:-9180}
NODES=6

# shellcheck source=scripts/local-setup.sh
. scripts/local-setup.sh slotgate-cluster

ADDRS=()
for i in $(seq 0 $((NODES - 1))); do
  p=$((BASE + i))
  start_redis "$p" CLUSTER_BASE_PORT --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
    --cluster-node-timeout 2000
  ADDRS+=("127.0.0.1:$p")
done
for i in $(seq 0 $((NODES - 1))); do wait_ping $((BASE + i)); done
redis-cli --cluster create "${ADDRS[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
for _ in $(seq 100); do
  redis-cli -p "$BASE" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done

target/release/slotgate --listen "127.0.0.1:$PORT" --cluster "127.0.0.1:$BASE" \
  --cluster-refresh 2s --admin-listen "127.0.0.1:$ADMIN_PORT" &
PIDS+=($!)
wait_ping "$PORT" 100

cat <<MSG

slotgate is listening on 127.0.0.1:$PORT in front of a Redis Cluster of $NODES nodes
(3 primaries and 3 replicas, ports $BASE-$((BASE + NODES - 1))), in cluster mode.
Connect with:   redis-cli -p $PORT                   (a plain client: no cluster support needed)
Try:            redis-cli -p $PORT set hello world && redis-cli -p $PORT mget hello a b c
                redis-cli -p $PORT info shards       (the cluster's primaries and their slots)
                redis-cli -p $BASE cluster shards    (the same, from the cluster)
Press Ctrl-C to stop everything.
MSG
wait
