# shellcheck shell=bash
# Sourced by run-local.sh and run-cluster.sh: installs redis-server and redis-tools with
# apt-get if missing, builds slotgate (release), makes a temporary directory DIR, and stops
# every process in PIDS (and removes DIR) when the script ends or is interrupted.
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
