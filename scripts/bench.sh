#!/usr/bin/env bash
# End-to-end benchmark of slotgate, self-contained (scripts/bench.py has the options):
#
#   scripts/bench.sh                      # all scenarios: direct Redis vs slotgate, 2 shards
#   scripts/bench.sh --repeat 3           # medians of 3
#   scripts/bench.sh --callgrind --quick  # user-space instructions/request (valgrind)
#   scripts/bench.sh --syscalls           # + syscalls/request (perf)
#   scripts/bench.sh --tls                # TLS termination: get_p1_tls, set_p1_tls, get_p16_tls
#   scripts/bench.sh --io epoll,uring --twemproxy --syscalls --idle 10000   # both data paths
#   WORKERS=2 scripts/bench.sh            # slotgate worker threads (default 1)
#   READTHROUGH=1 scripts/bench.sh --scenarios get_p1,get_p16   # + read-through hits
#
# scripts/bench-compare.sh runs the same comparison with twemproxy and predixy anchors through
# the team's shared harness (../shared/bench/compare.sh), as a cross-check.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bench.py "$@"
