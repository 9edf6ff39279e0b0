#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, and the integration tests that start
# real redis-server shards and the slotgate binary on loopback ports.
# Needs redis-server, redis-tools (redis-benchmark), openssl (TLS version tests) and chromium
# (the dashboard test); installs them with apt-get if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_redis() {
  command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null \
    && command -v openssl >/dev/null
}
if ! need_redis; then
  echo "installing redis-server and redis-tools (apt-get)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools openssl >/dev/null
fi
# The Debian package starts a redis-server on 6379 as a service; the tests never use it.
# redis-py (from PyPI) for the client tests of tests/python/.
# (redis.auth and streaming credential providers came with redis-py 6.)
if ! python3 -c "import redis, redis.asyncio, redis.auth.token" 2>/dev/null; then
  echo "installing redis-py (pip)..." >&2
  python3 -m pip install --quiet --upgrade "redis>=6" \
    || python3 -m pip install --quiet --upgrade --break-system-packages "redis>=6"
fi

# Debian's chromium: the dashboard test loads the admin page in a headless browser.
if ! command -v chromium >/dev/null; then
  echo "installing chromium (apt-get)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

# ioredis and node-redis (from npm) for the client tests of tests/node/.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs and npm (apt-get)..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -d tests/node/node_modules/ioredis ] || [ ! -d tests/node/node_modules/redis ]; then
  echo "installing ioredis and node-redis (npm)..." >&2
  npm ci --prefix tests/node --no-audit --no-fund --silent
fi

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Integration tests start several redis-server processes each: keep the parallelism bounded.
cargo test --lib --bins --tests -- --test-threads="${TEST_THREADS:-3}"
# The end-to-end tests again, every slotgate they start on the io_uring data path (`--io
# uring`, through SLOTGATE_IO); tests/io_uring.rs has the differences of its own.
SLOTGATE_IO=uring cargo test --tests -- --test-threads="${TEST_THREADS:-3}"
# Each criterion bench runs once in test mode, so the benches keep compiling and working.
cargo test --benches --quiet
