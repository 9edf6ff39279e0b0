//! slotgate: a transparent RESP caching proxy.
//!
//! Unmodified Redis clients connect to one endpoint; slotgate routes every command by hash
//! slot over a set of `redis-server` shards, through a few pipelined connections per shard,
//! and answers so that clients cannot tell it from a single Redis.
//!
//! # Layout
//!
//! Modules are layered; each uses only its own layer and those below (`tests/layers.rs` checks
//! it), lowest first: wire and utilities (`resp`, `netio`, `notify`, `metrics`, `router`,
//! `units`, `tls`, `slowlog`, `hotkeys`) · data (`command`, `auth`, `token`) · `fanout` · `queue` · `shard` · proxy logic and
//! worker state (`readthrough`, `settings`, `worker`) · the client connection (`session`, with
//! `session::local`, `session::pinned`, `session::pubsub`) · the process (`server`, `admin`,
//! `config`, `reload`).
//!
//! - [`config`]: `proxy.toml` + CLI flags → validated [`settings::Settings`] (`--check-config`);
//!   [`units`] parses durations and sizes.
//! - [`server`]: one acceptor hands connections round-robin to N worker threads; each worker
//!   runs a single-threaded runtime with its own shard connections, so a request never leaves
//!   the thread that read it; SIGTERM/SIGINT drain the clients. [`worker`] holds what workers
//!   share and each worker's own state (the settings in force, the shard pools of the layout).
//! - [`reload`]: SIGHUP and SLOTGATE.RELOAD: `proxy.toml` read again, published to the workers.
//! - [`session`]: one client connection: read a burst, parse, route, write ready replies in
//!   request order with one syscall. Only three files see the whole `Session`: `mod.rs` (its
//!   life), `dispatch.rs` (checks, then each command to its route class's handler) and
//!   `state.rs` (the commands that change the connection: HELLO, AUTH, RESET, CLIENT
//!   SETNAME …). Every other handler gets a narrow context — `session::Cx` (the worker, the
//!   reply queue, the protocol, the command, the client's id and address), or `Fwd` (a `Cx`
//!   plus the client's connection index, tracking state and key buffer) for the route classes
//!   that send to shards (`single`, `scatter`, `all_shards`, `readthrough`, through `send`) —
//!   and its own state: [`session::login`] (the user, AUTH, tokens), `Subs` in
//!   [`session::pubsub`], `Pinned` in [`session::pinned`], `FollowCx` in [`session::follow`].
//!   [`session::local`] holds the other commands the proxy answers itself.
//! - [`resp`]: the bounded, resumable request parser (multibulk + inline, Redis's exact
//!   protocol errors), the resumable reply framer for RESP2/RESP3, and the proxy's own replies
//!   (the only place error strings are spelled).
//! - [`command`]: the command table as data (generated from Redis 7.0's `COMMAND`), with
//!   arity, flags, key specs and a route class per command; [`command::keys`] finds the keys.
//! - [`router`]: key → slot (CRC16 with `{hashtag}`) → shard, an immutable 16384-entry map.
//! - [`shard`]: one multiplexed, pipelined upstream connection per shard per worker: batched
//!   writes, bulk reads, FIFO matching, op timeout, reconnect with capped backoff.
//! - [`queue`]: a session's in-order reply slots, filled by local answers or by shards.
//! - [`fanout`]: scatter/gather merges (MGET order, summed counts, all-OK, KEYS, SCAN cursor).
//! - [`tls`]: rustls (TLS 1.2/1.3) for the client listener, with a certificate reloadable on
//!   SIGHUP and optional mutual TLS, and for connections to the shards.
//! - [`readthrough`]: rules (prefix → HTTP origin), the miss path, single-flight across
//!   workers and instances (leases), no-stale-set, negative entries, stale-while-revalidate,
//!   refresh-ahead, revalidation, batch loads, invalidation; [`readthrough::origin`] is the
//!   hyper HTTP/1.1 client (HTTP and HTTPS).
//! - [`session::pinned`]: transactions and blocking commands on dedicated upstream connections, with
//!   the client's order kept when it switches between shared and dedicated connections.
//! - [`session::pubsub`]: subscriptions on dedicated subscriber connections (classic channels on the
//!   first shard, sharded channels by slot), confirmations in reply order, messages as they
//!   arrive.
//! - [`tracking`]: client-side caching (`CLIENT TRACKING`): per worker, an invalidation link
//!   per shard (BCAST on the shard), the keys each tracking client read, and the pushes.
//! - [`netio`]: socket reads and writes on the hot path (plain TCP: tokio's readiness, rustix
//!   system calls; TLS: tokio's own path).
//! - [`metrics`]: every metric name, described once, and registered at 0 from start-up;
//!   [`admin`]: the dashboard and its JSON, /metrics, /healthz, /readyz, /invalidate.
//! - [`hotkeys`]: sampled hot keys (Space-Saving windows behind a doorkeeper) and big
//!   replies, merged over the workers for SLOTGATE.HOTKEYS/BIGKEYS and the dashboard.
//! - [`auth`]: users (`requirepass`, `[[users]]`), SHA-256 password digests, ACL-style command
//!   rules and key patterns, checked per command before anything is forwarded.
//! - [`token`]: token authentication: JWT access tokens checked against `[[token_issuers]]`
//!   (keys from a JWKS file or an HTTPS URL) and mapped to users.
//!
//! # Request flow
//!
//! ```text
//! accept (plain | TLS) → worker (round-robin) → session::run (TLS handshake on the worker)
//!   read into the worker's scratch → RequestParser::parse (pre-auth limits until AUTH)
//!   → Request { raw: &[u8], args } (a view of the scratch; a partial command is copied to
//!   the session) → command::lookup (+ subcommand) → arity check → NOAUTH / NOPERM checks → Route:
//!       Local      → reply now (PING, HELLO, SELECT, CLIENT …, INFO gathers shard INFO)
//!       Single     → key_indices → one slot (else CROSSSLOT) → shard → Upstream::send(raw)
//!                    (GET of a read-through key: a `Target::Sink`; nil → origin fetch)
//!       Scatter    → split keys per shard → Gather (MGET order | sum | +OK)
//!       AllShards  → every shard → Gather (DBSIZE sum, KEYS concat, FLUSHDB …); SCAN one shard
//!       Refused / NotYet → clear error, never forwarded
//!   Upstream: write queued bytes in one syscall; read replies in bulk; ReplyScanner frames
//!   each; the oldest pending Target gets the bytes → ReplyQueue slot
//!   session: drain ready slots from the front → one write
//! ```

// No unsafe code, except in `uring` (the io_uring data path: buffers the kernel writes
// outside the borrow checker's view), which allows it for itself with a comment per block;
// `tests/layers.rs` fails if any other file allows or uses it.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod cluster_api;
pub mod command;
pub mod config;
pub mod fanout;
pub mod gate;
pub mod hotkeys;
pub mod metrics;
pub mod netio;
pub mod notify;
pub mod queue;
pub mod readthrough;
pub mod reload;
pub mod resp;
pub mod router;
pub mod server;
pub mod session;
pub mod settings;
pub mod shard;
pub mod slowlog;
pub mod tls;
pub mod token;
pub mod tracking;
pub mod units;
pub mod uring;
pub mod worker;
