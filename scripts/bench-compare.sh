#!/usr/bin/env bash
# Cross-check: direct Redis vs twemproxy vs predixy vs slotgate through the shared harness,
# same redis-benchmark load, same
# run (../shared/bench/compare.sh). Builds slotgate in release mode first.
#
#   scripts/bench-compare.sh                      # all scenarios, 2 shards, 50 clients
#   scripts/bench-compare.sh --repeat 3           # medians of 3
#   scripts/bench-compare.sh --syscalls           # + syscalls/request (perf)
#   scripts/bench-compare.sh --callgrind          # user-space instructions/request instead of CPU time
#   scripts/bench-compare.sh --tls --scenarios get_p1_tls,set_p1_tls,get_p16_tls   # TLS termination cost
#   scripts/bench-compare.sh --quick --scenarios get_p1,get_p16
#   WORKERS=2 scripts/bench-compare.sh            # slotgate worker threads (default 1 on this 2-core box)
#   READTHROUGH=1 scripts/bench-compare.sh --no-anchors --scenarios get_p1,get_p16
#                                         # + slotgate-rt: every benchmark key owned by a
#                                         #   read-through rule (GETs are read-through hits)
#
# Set-up once per machine: apt-get install -y redis-server redis-tools nutcracker valgrind linux-perf
set -euo pipefail
cd "$(dirname "$0")/.."
COMPARE=${COMPARE:-../shared/bench/compare.sh}
[ -x "$COMPARE" ] || [ -f "$COMPARE" ] || { echo "compare.sh not found at $COMPARE (set COMPARE=)" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/slotgate
CMD="$BIN --listen 127.0.0.1:{PORT} --shard-list {SHARDS} --workers ${WORKERS:-1} --log-level warn"
# With --tls, slotgate also terminates TLS on the port compare.sh gives it, with its certificate.
for a in "$@"; do
  [ "$a" = "--tls" ] && CMD="$CMD --tls-listen 127.0.0.1:{TLS_PORT} --tls-cert {CERT} --tls-key {KEY}"
done
CMD="$CMD --admin-listen none"
EXTRA=()
if [ "${READTHROUGH:-0}" = 1 ]; then
  # The origin is never called: populate writes every key first, so GETs hit.
  EXTRA=(--proxy "slotgate-rt=$CMD --readthrough 'key:=http://127.0.0.1:9/{rest}'")
fi
exec bash "$COMPARE" --proxy "slotgate=$CMD" "${EXTRA[@]}" "$@"
