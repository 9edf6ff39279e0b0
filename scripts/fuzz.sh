#!/usr/bin/env bash
# Fuzzes the parsers that face untrusted input: client requests, shard replies (RESP2/RESP3)
# and their merges, proxy.toml, the command line, read-through rules (README, "Fuzzing").
#
#   scripts/fuzz.sh [N]             N inputs over all targets (default 5000, as in
#                                   `cargo test`), in an optimised build with debug
#                                   assertions (profile "fuzz", target/fuzz)
#   scripts/fuzz.sh --replay FILE   re-runs one saved failure (target/fuzz-failures/*.txt)
#
# Environment: FUZZ_SEED=S repeats a run (the seed is printed); FUZZ_JOBS=J shares the inputs
# out to J processes (default 1); FUZZ_TARGETS=request,reply fuzzes a subset (request, reply,
# gather, config, cli, rules); FUZZ_OUT=DIR is where failing inputs are written.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
case "${1:-}" in
  -h | --help) usage ;;
  --replay)
    [ $# -eq 2 ] || usage
    export FUZZ_REPLAY="$2"
    ;;
  "") ;;
  *)
    [ $# -eq 1 ] || usage
    export FUZZ_INPUTS="$1"
    ;;
esac

start=$(date +%s)
cargo test --profile fuzz --test fuzz --no-run
echo "fuzz.sh: build $(($(date +%s) - start)) s" >&2
jobs=${FUZZ_JOBS:-1}
if [ -n "${FUZZ_REPLAY:-}" ] || [ "$jobs" -le 1 ]; then
  cargo test --profile fuzz --test fuzz --quiet
else
  # The same seed for every process; each takes every J-th input.
  export FUZZ_SEED=${FUZZ_SEED:-$(date +%s%N)}
  logs=$(mktemp -d)
  trap 'rm -rf "$logs"' EXIT
  pids=()
  for ((k = 0; k < jobs; k++)); do
    FUZZ_SHARD="$k/$jobs" cargo test --profile fuzz --test fuzz --quiet >"$logs/$k" 2>&1 &
    pids+=($!)
  done
  status=0
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || status=1
    echo "--- process $k of $jobs"
    cat "$logs/$k"
  done
  [ "$status" -eq 0 ] || { echo "fuzz.sh: a process failed" >&2; exit 1; }
fi
echo "fuzz.sh: build and run $(($(date +%s) - start)) s" >&2
