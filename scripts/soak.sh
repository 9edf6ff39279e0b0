#!/usr/bin/env bash
# Soak test of slotgate (issue 14.14): mixed traffic, faults and client churn for a bounded
# time, with slotgate's RSS and descriptor count sampled over time. Not part of CI.
#
#   scripts/soak.sh            # 10 minutes
#   scripts/soak.sh 90s        # or 2m, 1h, 600 (seconds)
#   SAMPLE_EVERY=5 FAULT_EVERY=15 WARMUP_PCT=20 SETTLE=10 scripts/soak.sh 2m
#   NO_BUILD=1 scripts/soak.sh 2m    # use the slotgate already in target/release
#
# It starts, on free loopback ports: 3 redis-server shards (own temp dir, no persistence),
# the demo origin (slotgate-demo-origin) and slotgate in front of them, configured by a
# proxy.toml with two read-through rules (label: and slabel:, the latter with a grace
# period) and an output buffer limit of "32mb 8mb 10" for ordinary clients.
# scripts/soak.py then drives traffic for the duration (redis-benchmark runs with values of
# 100 B to 256 KiB, pipelined and not; read-through GETs; pub/sub; MULTI/EXEC; EVAL;
# blocking pops; short connections; clients that disconnect mid-pipeline; clients that never
# read and must be closed at their output limit), while this script injects a fault every
# FAULT_EVERY seconds, in turn: SIGSTOP/SIGCONT of a shard for 4 s; SIGKILL of a shard and a
# restart on the same port 2 s later; SIGSTOP/SIGCONT of the origin for 4 s; SIGHUP of
# slotgate (a hot reload, with the label: rule's ttl changed each time).
#
# Every SAMPLE_EVERY seconds it prints and records slotgate's RSS (VmRSS), open descriptors,
# threads, connected clients and commands processed (INFO). After the traffic it waits
# SETTLE seconds and takes a final sample. Results go to target/soak/soak-<timestamp>.csv
# (samples), .log (slotgate's log), .json (the drivers' counts) and .txt (the summary).
#
# Exits non-zero if slotgate died, if its RSS grew after the warm-up (the first WARMUP_PCT%)
# by more than RSS_PCT% or RSS_MIB MiB (the larger; defaults 25 and 64) by the end of the
# traffic or in the final idle sample, or if its final descriptor count exceeds the count
# after the warm-up by more than FD_MARGIN (default 16).
#
# Everything it starts is stopped by PID on exit; it never kills processes by name.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- options -------------------------------------------------------------------------------

# Seconds from "90s", "2m", "1h" or a bare number of seconds.
parse_duration() {
  case "$1" in
    *[!0-9smh]* | "" ) echo "bad duration '$1' (use e.g. 90s, 2m, 1h or 600)" >&2; return 1 ;;
    *h) echo $(( ${1%h} * 3600 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo $(( ${1%s} )) ;;
    *) echo $(( $1 )) ;;
  esac
}
DURATION=$(parse_duration "${1:-10m}")
if (( DURATION < 30 )); then echo "the duration must be at least 30s" >&2; exit 2; fi
SAMPLE_EVERY=${SAMPLE_EVERY:-5}
FAULT_EVERY=${FAULT_EVERY:-15}
WARMUP_PCT=${WARMUP_PCT:-20}
SETTLE=${SETTLE:-10}
RSS_PCT=${RSS_PCT:-25}
RSS_MIB=${RSS_MIB:-64}
FD_MARGIN=${FD_MARGIN:-16}
WARMUP=$(( DURATION * WARMUP_PCT / 100 ))

# --- prerequisites -------------------------------------------------------------------------

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
  || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-server and redis-tools (apt-get)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
if ! python3 -c "import redis" 2>/dev/null; then
  echo "installing redis-py (pip)..." >&2
  python3 -m pip install --quiet "redis>=5" || python3 -m pip install --quiet --break-system-packages "redis>=5"
fi
# The target directory is shared: cargo may wait for its lock; never clean it.
if [ "${NO_BUILD:-0}" != 1 ]; then cargo build --release --quiet; fi

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=target/soak
mkdir -p "$OUT"
CSV=$OUT/soak-$STAMP.csv
LOG=$OUT/soak-$STAMP.log
STATS=$OUT/soak-$STAMP.json
SUMMARY=$OUT/soak-$STAMP.txt
DIR=$(mktemp -d /tmp/slotgate-soak.XXXXXX)
FAULTS=$DIR/faults.csv   # start,end,what of each injected fault
# Own copies of the binaries: another engineer's build may replace target/release meanwhile.
cp target/release/slotgate target/release/slotgate-demo-origin "$DIR/"

# --- processes and cleanup -----------------------------------------------------------------

SHARD_PIDS=()   # by shard index; replaced when a shard is restarted
ORIGIN_PID=""
SG_PID=""
DRIVER_PID=""

# Stops one of our processes: SIGCONT (it may be stopped), SIGTERM, SIGKILL after 5 s.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -CONT "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# Alive: the process exists and is not a zombie (a child of ours until we wait for it).
alive() { [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
cleanup() {
  local p
  stop_pid "$DRIVER_PID"
  stop_pid "$SG_PID"
  stop_pid "$ORIGIN_PID"
  for p in "${SHARD_PIDS[@]}"; do stop_pid "$p"; done
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# N free loopback ports (bound to port 0 together, so they are distinct).
free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  return 1
}

read -r S0 S1 S2 ORIGIN_PORT PORT ADMIN_PORT <<<"$(free_ports 6)"
SHARD_PORTS=("$S0" "$S1" "$S2")

start_shard() {  # $1 = shard index
  local i=$1 p=${SHARD_PORTS[$1]}
  mkdir -p "$DIR/shard$i"
  redis-server --bind 127.0.0.1 --port "$p" --save '' --appendonly no --dir "$DIR/shard$i" \
    --daemonize no --loglevel warning >>"$DIR/shard$i/log" 2>&1 &
  SHARD_PIDS[i]=$!
}
for i in 0 1 2; do start_shard "$i"; done
for p in "${SHARD_PORTS[@]}"; do wait_port "$p"; done

# The origin logs every request: not kept.
"$DIR/slotgate-demo-origin" "127.0.0.1:$ORIGIN_PORT" >/dev/null 2>&1 &
ORIGIN_PID=$!
wait_port "$ORIGIN_PORT"

# slotgate's configuration; SIGHUP re-reads it (write_config is called again with another ttl).
write_config() {  # $1 = ttl of the label: rule
  cat >"$DIR/proxy.toml.new" <<TOML
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
op_timeout = "1s"
log_level = "info"
shutdown_timeout = "2s"
client_output_buffer_limit_normal = "32mb 8mb 10"

[[shards]]
addr = "127.0.0.1:$S0"
[[shards]]
addr = "127.0.0.1:$S1"
[[shards]]
addr = "127.0.0.1:$S2"

[[readthrough]]
name = "labels"
prefix = "label:"
origin = "http://127.0.0.1:$ORIGIN_PORT/labels/{rest}"
ttl = "$1"
negative_ttl = "30s"
timeout = "500ms"

[[readthrough]]
name = "labels_swr"
prefix = "slabel:"
origin = "http://127.0.0.1:$ORIGIN_PORT/labels/{rest}"
ttl = "20s"
grace = "10s"
timeout = "500ms"
TOML
  mv "$DIR/proxy.toml.new" "$DIR/proxy.toml"
}
write_config 10m
"$DIR/slotgate" --config "$DIR/proxy.toml" --check-config >/dev/null
"$DIR/slotgate" --config "$DIR/proxy.toml" >"$LOG" 2>&1 &
SG_PID=$!
wait_port "$PORT"

# --- sampling ------------------------------------------------------------------------------

sg_alive() { alive "$SG_PID"; }
T0=$SECONDS
LAST_T=""
LAST_CMDS=""
EVENTS=""       # faults since the last sample, shown in its row
echo "t_s,phase,rss_kib,fds,threads,clients,commands,cmds_per_s,events" >"$CSV"

sample() {  # $1 = phase: idle, warmup, traffic, settle, final
  local t=$(( SECONDS - T0 )) rss="" fds="" thr="" clients="" cmds="" rate="" info
  if sg_alive; then
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SG_PID/status" 2>/dev/null || true)
    thr=$(awk '/^Threads:/ {print $2}' "/proc/$SG_PID/status" 2>/dev/null || true)
    fds=$(find "/proc/$SG_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l || true)
    # INFO's counters are published by the workers once a second.
    info=$(timeout 5 redis-cli -h 127.0.0.1 -p "$PORT" INFO clients stats 2>/dev/null | tr -d '\r' || true)
    clients=$(sed -n 's/^connected_clients://p' <<<"$info")
    cmds=$(sed -n 's/^total_commands_processed://p' <<<"$info")
  fi
  if [ -n "$cmds" ] && [ -n "$LAST_CMDS" ] && (( t > LAST_T )); then
    rate=$(( (cmds - LAST_CMDS) / (t - LAST_T) ))
  fi
  [ -n "$cmds" ] && { LAST_CMDS=$cmds; LAST_T=$t; }
  printf '%5ss  %-7s %8s %5s %4s %7s %12s %8s  %s\n' "$t" "$1" \
    "$([ -n "$rss" ] && awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}' || echo -)" \
    "${fds:--}" "${thr:--}" "${clients:--}" "${cmds:--}" "${rate:--}" "$EVENTS"
  echo "$t,$1,$rss,$fds,$thr,$clients,$cmds,$rate,\"$EVENTS\"" >>"$CSV"
  EVENTS=""
}

# --- faults --------------------------------------------------------------------------------

FAULT_N=0
FAULT_T=0       # when the pending fault started (the table's clock)
HUPS=0
PENDING=""      # a fault to undo: "cont PID LABEL" or "restart INDEX"
UNDO_AT=0
event() { EVENTS="${EVENTS:+$EVENTS; }$1"; }

start_fault() {
  local i=$(( (FAULT_N / 4) % 3 )) kind=$(( FAULT_N % 4 ))
  FAULT_N=$(( FAULT_N + 1 ))
  FAULT_T=$(( SECONDS - T0 ))
  case $kind in
    0) kill -STOP "${SHARD_PIDS[i]}" || true; PENDING="cont ${SHARD_PIDS[i]} shard$i"; UNDO_AT=$(( SECONDS + 4 ))
       event "SIGSTOP shard$i" ;;
    1) kill -KILL "${SHARD_PIDS[i]}" || true; wait "${SHARD_PIDS[i]}" 2>/dev/null || true
       PENDING="restart $i"; UNDO_AT=$(( SECONDS + 2 ))
       event "SIGKILL shard$i" ;;
    2) kill -STOP "$ORIGIN_PID" || true; PENDING="cont $ORIGIN_PID origin"; UNDO_AT=$(( SECONDS + 4 ))
       event "SIGSTOP origin" ;;
    3) HUPS=$(( HUPS + 1 ))
       write_config "$( (( HUPS % 2 )) && echo 9m || echo 10m )"
       kill -HUP "$SG_PID" || true
       echo "$FAULT_T,$FAULT_T,SIGHUP" >>"$FAULTS"
       event "SIGHUP slotgate" ;;
  esac
}
undo_fault() {
  local what arg label
  read -r what arg label <<<"$PENDING"
  case $what in
    cont) kill -CONT "$arg" || true; event "SIGCONT $label" ;;
    restart) start_shard "$arg"; event "restart shard$arg" ;;
  esac
  # The fault's window, to tell its errors from errors at other times.
  echo "$FAULT_T,$(( SECONDS - T0 )),$what $arg $label" >>"$FAULTS"
  PENDING=""
}

# --- the run -------------------------------------------------------------------------------

cat <<MSG
soak: ${DURATION}s of traffic (warm-up ${WARMUP}s), a fault every ${FAULT_EVERY}s, a sample every ${SAMPLE_EVERY}s
slotgate pid $SG_PID on 127.0.0.1:$PORT (admin $ADMIN_PORT), shards ${SHARD_PORTS[*]}, origin $ORIGIN_PORT
results: $CSV, $LOG, $STATS, $SUMMARY

    time  phase    RSS MiB   fds  thr clients     commands    cmd/s  events
MSG
sleep 1
sample idle

python3 scripts/soak.py drive --port "$PORT" --duration "$DURATION" --stats "$STATS" \
  --clock-offset $(( SECONDS - T0 )) &
DRIVER_PID=$!
T_START=$SECONDS
NEXT_SAMPLE=$(( SECONDS + SAMPLE_EVERY ))
NEXT_FAULT=$(( SECONDS + 10 ))
DEATH=""
while alive "$DRIVER_PID"; do
  if ! sg_alive; then
    wait "$SG_PID" && DEATH="exited with status 0" || DEATH="exited with status $?"
    DEATH="$DEATH at t=$(( SECONDS - T0 ))s (see $LOG)"
    event "slotgate DIED"
    sample traffic
    break
  fi
  if [ -n "$PENDING" ] && (( SECONDS >= UNDO_AT )); then undo_fault; fi
  # No new fault in the last 15 s of traffic: the end is measured on a healthy system.
  if [ -z "$PENDING" ] && (( SECONDS >= NEXT_FAULT && SECONDS - T_START < DURATION - 15 )); then
    start_fault
    NEXT_FAULT=$(( SECONDS + FAULT_EVERY ))
  fi
  if (( SECONDS >= NEXT_SAMPLE )); then
    sample "$( (( SECONDS - T_START < WARMUP )) && echo warmup || echo traffic )"
    NEXT_SAMPLE=$(( NEXT_SAMPLE + SAMPLE_EVERY ))
  fi
  sleep 0.5
done
if [ -n "$PENDING" ]; then undo_fault; fi
# The drivers stop themselves at the deadline; if slotgate died, stop them now.
if alive "$DRIVER_PID"; then
  stop_pid "$DRIVER_PID"
else
  DRIVER_RC=0
  wait "$DRIVER_PID" || DRIVER_RC=$?
  if (( DRIVER_RC != 0 || SECONDS - T_START < DURATION - 5 )); then
    echo "warning: the drivers ended early (status $DRIVER_RC, after $(( SECONDS - T_START ))s)" >&2
  fi
fi
DRIVER_PID=""

# Traffic stopped: descriptors and memory should come back down.
if sg_alive; then
  SETTLE_END=$(( SECONDS + SETTLE ))
  while (( SECONDS + SAMPLE_EVERY < SETTLE_END )); do sleep "$SAMPLE_EVERY"; sample settle; done
  sleep $(( SETTLE_END > SECONDS ? SETTLE_END - SECONDS : 0 ))
  sample final
  ALIVE=1
else
  ALIVE=0
  [ -n "$DEATH" ] || DEATH="died during the settle phase"
fi

python3 scripts/soak.py report --csv "$CSV" --stats "$STATS" --log "$LOG" --summary "$SUMMARY" --faults "$FAULTS" \
  --duration "$DURATION" --warmup "$WARMUP" --settle "$SETTLE" --alive "$ALIVE" --death "$DEATH" \
  --hups "$HUPS" --rss-pct "$RSS_PCT" --rss-mib "$RSS_MIB" --fd-margin "$FD_MARGIN"
