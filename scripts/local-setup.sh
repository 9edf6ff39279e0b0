# shellcheck shell=bash
# Sourced by run-local.sh, run-cluster.sh and run-fleet.sh: installs redis-server and redis-tools with
# apt-get if missing, builds slotgate (release), makes a temporary directory DIR, and stops
# every process in PIDS (and removes DIR) when the script ends or is interrupted; and gives
# start_redis and wait_ping (below).
# Usage: . scripts/local-setup.sh NAME      (DIR is /tmp/NAME.XXXXXX)

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "installing redis-server and redis-tools (apt-get)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet

DIR=$(mktemp -d "/tmp/$1.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

# start_redis PORT BASE_VAR [ARGS...]: a redis-server on 127.0.0.1:PORT without
# persistence, logging to $DIR, with ARGS; refuses a port already in use (BASE_VAR names
# the variable that moves the ports).
start_redis() {
  local p=$1 base_var=$2
  shift 2
  if redis-cli -p "$p" ping >/dev/null 2>&1; then
    echo "port $p is already in use; set $base_var to another base" >&2; exit 1
  fi
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
    --daemonize no --loglevel warning "$@" >"$DIR/redis-$p.log" 2>&1 &
  PIDS+=($!)
}

# wait_ping PORT [TRIES]: waits (0.1 s a try, 50 tries by default) until PORT answers PING.
wait_ping() {
  for _ in $(seq "${2:-50}"); do redis-cli -p "$1" ping >/dev/null 2>&1 && return; sleep 0.1; done
}
