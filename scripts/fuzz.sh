#!/usr/bin/env bash
# Fuzzes the parsers that face untrusted input: client requests, shard replies (RESP2/RESP3)
# and their merges, proxy.toml, the command line, read-through rules (README, "Fuzzing").
#
#   scripts/fuzz.sh [N]             N inputs over all targets (default 5000, as in
#                                   `cargo test`), in an optimised build with debug
#                                   assertions (profile "fuzz", target/fuzz)
#   scripts/fuzz.sh --replay FILE   re-runs one saved failure (target/fuzz-failures/*.txt)
#
# Environment: FUZZ_SEED=S repeats a run (the seed is printed), FUZZ_TARGETS=request,reply
# fuzzes a subset (request, reply, gather, config, cli, rules), FUZZ_OUT=DIR is where failing
# inputs are written.
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
built=$(date +%s)
echo "fuzz.sh: build $((built - start)) s" >&2
cargo test --profile fuzz --test fuzz --quiet
echo "fuzz.sh: build and run $(($(date +%s) - start)) s" >&2
