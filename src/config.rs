//! Configuration: `proxy.toml`, then CLI flags override it, then `validate` turns it into the
//! checked [`Settings`] the server runs with. `--check-config` stops after `validate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use std::sync::Arc;

use crate::auth::{UserConfig, Users};
pub use crate::queue::OutputLimit;
use crate::readthrough::{RuleConfig, Rules};
use crate::router::{LayoutError, SlotMap, parse_slot_ranges};
pub use crate::settings::{Settings, TlsSettings};
pub use crate::shard::{Secret, UpstreamAuth};
use crate::tls::{CertSource, ReloadableCert, TlsError};
use crate::token::{IssuerConfig, Issuers};
pub use crate::units::{parse_bytes, parse_duration};

/// Command-line flags. Every flag overrides the matching `proxy.toml` key.
#[derive(Debug, Parser, Default)]
#[command(name = "slotgate", version, about = "A transparent RESP caching proxy")]
pub struct Cli {
    /// Configuration file (TOML). Without it, flags alone describe the proxy.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plain RESP listener address, or `none` to disable it [default: 127.0.0.1:6380].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A shard `HOST:PORT[=SLOTS]`, repeatable, in order. Without `=SLOTS` the 16384 slots are
    /// split evenly in the order given; SLOTS is a list like `0-5460,5462`. Replaces the file's
    /// `[[shards]]` when given.
    #[arg(long = "shard", value_name = "ADDR[=SLOTS]")]
    pub shards: Vec<String>,
    /// The same as repeated `--shard`, comma-separated.
    #[arg(long = "shard-list", value_name = "ADDR,ADDR…")]
    pub shard_list: Option<String>,
    /// A Redis Cluster node `HOST:PORT`, repeatable: slotgate reads the slot layout from the
    /// cluster (instead of `--shard`) and follows it. Replaces the file's `[[shards]]` and
    /// `[cluster] seeds` when given.
    #[arg(long = "cluster", value_name = "HOST:PORT")]
    pub cluster: Vec<String>,
    /// Cluster mode: how often the topology is read again [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub cluster_refresh: Option<String>,
    /// Cluster mode: where reads go, `primary`, `replica` or `prefer-replica` [default: primary].
    #[arg(long, value_name = "MODE")]
    pub read_from: Option<String>,
    /// Worker threads, each with its own upstream connections [default: number of cores].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Pipelined connections per shard per worker [default: 1].
    #[arg(long)]
    pub upstream_connections: Option<usize>,
    /// How long a request may wait for its shard before failing [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub op_timeout: Option<String>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive) [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Commands a client may have in flight before slotgate stops reading from it [default: 1024].
    #[arg(long)]
    pub max_client_pipeline: Option<usize>,
    /// Requests in flight per upstream connection before new ones fail [default: 65536].
    #[arg(long)]
    pub max_inflight_per_connection: Option<usize>,
    /// Request bytes in flight per upstream connection before new ones fail, e.g. `256mb`
    /// [default: 256mb].
    #[arg(long, value_name = "BYTES")]
    pub max_inflight_bytes_per_connection: Option<String>,
    /// Dedicated connections (transactions, blocking commands) per shard per worker [default: 512].
    #[arg(long)]
    pub max_dedicated_per_shard: Option<usize>,
    /// Keys the tracking table of client-side caching may hold (Redis's
    /// `tracking-table-max-keys`; 0: no limit) [default: 1000000].
    #[arg(long, value_name = "N")]
    pub tracking_table_max_keys: Option<usize>,
    /// Hot keys and big replies: sample one command in N (1: every command; 0: off)
    /// [default: 32].
    #[arg(long, value_name = "N")]
    pub hotkeys_sample: Option<u32>,
    /// Socket I/O of plain TCP clients and shard connections: `epoll` (tokio's readiness) or
    /// `uring` (io_uring, one ring per worker; falls back to epoll, logged once, where the
    /// kernel refuses it) [default: epoll].
    #[arg(long, value_name = "MODE")]
    pub io: Option<String>,
    /// TLS listener address, or `none` [default: 127.0.0.1:10000 when a certificate is set].
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// Server certificate chain (PEM) for the TLS listener.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Generate an in-memory certificate for localhost/127.0.0.1 (development only).
    #[arg(long)]
    pub tls_self_signed: bool,
    /// Require client certificates signed by this CA (PEM) on the TLS listener (mutual TLS).
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Password of the `default` user; clients must AUTH before anything else.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "SLOTGATE_REQUIREPASS",
        hide_env_values = true
    )]
    pub requirepass: Option<String>,
    /// Consecutive failed AUTHs after which a connection is closed [default: 10].
    #[arg(long)]
    pub max_auth_failures: Option<u32>,
    /// Failed AUTHs per source address and minute, over all its connections, after which
    /// the address waits before its next AUTH (1 s, doubling; `0` = no limit) [default: 50].
    #[arg(long)]
    pub max_auth_failures_per_address: Option<u32>,
    /// Most client connections at once; beyond, `-ERR max number of clients reached` [default: 10000].
    #[arg(long)]
    pub maxclients: Option<usize>,
    /// Length of the listeners' accept queue, as Redis's `tcp-backlog` (the kernel caps it at
    /// `net.core.somaxconn`) [default: 511].
    #[arg(long)]
    pub tcp_backlog: Option<u32>,
    /// Close clients idle for this long (`0` = never) [default: 0].
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// On SIGTERM/SIGINT, how long to wait for clients to get the replies of what they sent
    /// before exiting (`0` = exit at once) [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// slotgate's own slow log: commands that took at least this many microseconds from
    /// being read to their reply arriving from the shard (negative = off, 0 = every
    /// command), as Redis's `slowlog-log-slower-than` [default: 10000].
    #[arg(long, value_name = "MICROSECONDS", allow_negative_numbers = true)]
    pub slowlog_log_slower_than: Option<i64>,
    /// Entries slotgate's own slow log keeps, as Redis's `slowlog-max-len` [default: 128].
    #[arg(long)]
    pub slowlog_max_len: Option<usize>,
    /// Username sent with AUTH on every new shard connection.
    #[arg(long)]
    pub upstream_username: Option<String>,
    /// Password sent with AUTH on every new shard connection.
    #[arg(long, env = "SLOTGATE_UPSTREAM_PASSWORD", hide_env_values = true)]
    pub upstream_password: Option<String>,
    /// Connect to the shards over TLS.
    #[arg(long)]
    pub upstream_tls: bool,
    /// CA (PEM) that signed the shards' certificates.
    #[arg(long, value_name = "PEM")]
    pub upstream_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for shards that require one.
    #[arg(long, value_name = "PEM")]
    pub upstream_tls_cert: Option<PathBuf>,
    /// Key (PEM) of `--upstream-tls-cert`.
    #[arg(long, value_name = "PEM")]
    pub upstream_tls_key: Option<PathBuf>,
    /// Name to verify in the shards' certificates (and send as SNI) [default: the shard's IP].
    #[arg(long)]
    pub upstream_tls_server_name: Option<String>,
    /// A read-through rule `PREFIX=URL_TEMPLATE[;ttl=10m][;negative_ttl=30s][;timeout=500ms]
    /// [;grace=0s][;name=N][;max_body=BYTES][;honor_max_age=true]`, repeatable. Replaces the
    /// file's `[[readthrough]]` rules when given.
    #[arg(long = "readthrough", value_name = "PREFIX=URL[;opt=v…]")]
    pub readthrough: Vec<String>,
    /// Admin HTTP listener (/metrics, /healthz, /readyz), or `none` [default: 127.0.0.1:9180].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Answer CLUSTER SLOTS/SHARDS/NODES … as a Redis Cluster whose nodes are this slotgate
    /// instance and its peers (`[cluster_api] enabled`).
    #[arg(long = "cluster-api")]
    pub cluster_api: bool,
    /// The address this instance announces in the cluster API [default: the plain listener's;
    /// required when that is a wildcard address].
    #[arg(long = "announce", value_name = "HOST:PORT")]
    pub announce: Option<String>,
    /// The other instances' announced addresses, for the cluster API.
    #[arg(
        long = "cluster-api-peers",
        value_name = "A,B,C",
        value_delimiter = ','
    )]
    pub cluster_api_peers: Vec<String>,
    /// Validate the configuration (file plus flags) without contacting any shard, then exit.
    #[arg(long)]
    pub check_config: bool,
}

/// `proxy.toml`. Every key is optional; the example file in the repository lists them all
/// with their defaults.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub upstream_connections: Option<usize>,
    pub op_timeout: Option<String>,
    pub log_level: Option<String>,
    pub max_client_pipeline: Option<usize>,
    pub max_inflight_per_connection: Option<usize>,
    pub max_inflight_bytes_per_connection: Option<ByteSize>,
    pub max_dedicated_per_shard: Option<usize>,
    pub tracking_table_max_keys: Option<usize>,
    pub hotkeys_sample: Option<u32>,
    /// `epoll` or `uring` (see `--io`).
    pub io: Option<String>,
    /// A bearer token the admin listener asks for (except /healthz and /readyz);
    /// `SLOTGATE_ADMIN_TOKEN` takes precedence.
    pub admin_token: Option<String>,
    pub client_output_buffer_limit_normal: Option<String>,
    pub client_output_buffer_limit_pubsub: Option<String>,
    pub proto_max_bulk_len: Option<usize>,
    pub client_query_buffer_limit: Option<usize>,
    pub requirepass: Option<String>,
    pub max_auth_failures: Option<u32>,
    pub max_auth_failures_per_address: Option<u32>,
    pub maxclients: Option<usize>,
    pub tcp_backlog: Option<u32>,
    pub idle_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub slowlog_log_slower_than: Option<i64>,
    pub slowlog_max_len: Option<usize>,
    pub admin_listen: Option<String>,
    pub tls: TlsFile,
    pub upstream: UpstreamFile,
    pub shards: Vec<ShardEntry>,
    pub cluster: ClusterFile,
    pub cluster_api: ClusterApiFile,
    pub users: Vec<UserConfig>,
    pub token_issuers: Vec<IssuerConfig>,
    pub readthrough: Vec<RuleConfig>,
}

/// The `[tls]` table.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFile {
    pub listen: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub self_signed: bool,
    pub client_ca: Option<PathBuf>,
}

/// The `[upstream]` table: how slotgate connects to the shards.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamFile {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
}

/// The `[cluster]` table: a Redis Cluster behind slotgate instead of `[[shards]]`.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterFile {
    /// Nodes to read the topology from at start-up (`"HOST:PORT"`).
    pub seeds: Vec<String>,
    pub refresh_interval: Option<String>,
    pub read_from: Option<String>,
}

/// The `[cluster_api]` table: slotgate instances announced as the nodes of one cluster.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterApiFile {
    pub enabled: bool,
    /// `"HOST:PORT"` this instance announces [default: the plain listener's address].
    pub announce: Option<String>,
    /// The other instances' announced addresses.
    pub peers: Vec<String>,
}

/// One `[[shards]]` table.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub addr: String,
    /// Slot list such as `"0-5460"`; omit on every shard for an even split.
    pub slots: Option<String>,
    /// Credentials for this shard (override `[upstream]`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// A configuration error, with what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {what} '{value}': {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("invalid shard layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("invalid users: {0}")]
    Users(String),
    #[error("invalid token issuers: {0}")]
    TokenIssuers(String),
    #[error("invalid read-through rule: {0}")]
    ReadThrough(String),
}

/// A byte count in `proxy.toml`: an integer, or a string with Redis's units (`"256mb"`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn text(&self) -> String {
        match self {
            ByteSize::Bytes(n) => n.to_string(),
            ByteSize::Text(t) => t.clone(),
        }
    }
}

impl Cli {
    /// Reads the file (if any), applies the flags over it and validates the result.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        self.merge(file).validate()
    }

    /// The shards given by `--shard` and `--shard-list`, in order.
    fn flag_shards(&self) -> Vec<ShardEntry> {
        let mut shards: Vec<ShardEntry> = Vec::new();
        let flag_shards = self
            .shards
            .iter()
            .cloned()
            .chain(
                self.shard_list
                    .iter()
                    .flat_map(|l| l.split([',', ' ']).map(str::to_string)),
            )
            .filter(|s| !s.trim().is_empty());
        for s in flag_shards {
            let (addr, slots) = match s.split_once('=') {
                Some((a, r)) => (a.to_string(), Some(r.to_string())),
                None => (s, None),
            };
            shards.push(ShardEntry {
                addr,
                slots,
                username: None,
                password: None,
            });
        }
        shards
    }

    fn merge(&self, f: FileConfig) -> Merged {
        // A text setting: the flag, else the file, else the default.
        let text = |flag: &Option<String>, file: Option<String>, default: &str| {
            flag.clone().or(file).unwrap_or_else(|| default.into())
        };
        // Layout flags (shards or cluster seeds) replace the file's whole layout.
        let (shards, cluster_seeds) = {
            let flag_shards = self.flag_shards();
            if flag_shards.is_empty() && self.cluster.is_empty() {
                (f.shards, f.cluster.seeds)
            } else {
                (flag_shards, self.cluster.clone())
            }
        };
        Merged {
            cluster_seeds,
            cluster_refresh: text(&self.cluster_refresh, f.cluster.refresh_interval, "10s"),
            read_from: text(&self.read_from, f.cluster.read_from, "primary"),
            listen: text(&self.listen, f.listen, "127.0.0.1:6380"),
            shards,
            workers: self.workers.or(f.workers).unwrap_or(0),
            upstream_connections: self
                .upstream_connections
                .or(f.upstream_connections)
                .unwrap_or(1),
            op_timeout: text(&self.op_timeout, f.op_timeout, "1s"),
            log_level: text(&self.log_level, f.log_level, "info"),
            max_client_pipeline: self
                .max_client_pipeline
                .or(f.max_client_pipeline)
                .unwrap_or(1024),
            max_inflight_per_connection: self
                .max_inflight_per_connection
                .or(f.max_inflight_per_connection)
                .unwrap_or(65536),
            max_inflight_bytes_per_connection: self
                .max_inflight_bytes_per_connection
                .clone()
                .or(f.max_inflight_bytes_per_connection.map(|b| b.text()))
                .unwrap_or_else(|| "256mb".into()),
            obuf_normal: f
                .client_output_buffer_limit_normal
                .unwrap_or_else(|| "256mb 64mb 60".into()),
            obuf_pubsub: f
                .client_output_buffer_limit_pubsub
                .unwrap_or_else(|| "32mb 8mb 60".into()),
            max_dedicated_per_shard: self
                .max_dedicated_per_shard
                .or(f.max_dedicated_per_shard)
                .unwrap_or(512),
            tracking_table_max_keys: self
                .tracking_table_max_keys
                .or(f.tracking_table_max_keys)
                .unwrap_or(crate::tracking::DEFAULT_MAX_KEYS),
            hotkeys_sample: self
                .hotkeys_sample
                .or(f.hotkeys_sample)
                .unwrap_or(crate::hotkeys::DEFAULT_SAMPLE),
            io: io_mode(&self.io, f.io),
            // (An empty variable is unset: it never turns off the file's token.)
            admin_token: std::env::var("SLOTGATE_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or(f.admin_token)
                .filter(|t| !t.is_empty()),
            proto_max_bulk_len: f.proto_max_bulk_len.unwrap_or(512 * 1024 * 1024),
            client_query_buffer_limit: f.client_query_buffer_limit.unwrap_or(1024 * 1024 * 1024),
            tls_listen: self.tls_listen.clone().or(f.tls.listen),
            tls_cert: self.tls_cert.clone().or(f.tls.cert),
            tls_key: self.tls_key.clone().or(f.tls.key),
            tls_self_signed: self.tls_self_signed || f.tls.self_signed,
            tls_client_ca: self.tls_client_ca.clone().or(f.tls.client_ca),
            requirepass: self.requirepass.clone().or(f.requirepass),
            max_auth_failures: self.max_auth_failures.or(f.max_auth_failures).unwrap_or(10),
            max_auth_failures_per_address: self
                .max_auth_failures_per_address
                .or(f.max_auth_failures_per_address)
                .unwrap_or(50),
            maxclients: self.maxclients.or(f.maxclients).unwrap_or(10000),
            tcp_backlog: self.tcp_backlog.or(f.tcp_backlog).unwrap_or(511),
            idle_timeout: text(&self.idle_timeout, f.idle_timeout, "0s"),
            shutdown_timeout: text(&self.shutdown_timeout, f.shutdown_timeout, "10s"),
            slowlog_log_slower_than: self
                .slowlog_log_slower_than
                .or(f.slowlog_log_slower_than)
                .unwrap_or(10_000),
            slowlog_max_len: self.slowlog_max_len.or(f.slowlog_max_len).unwrap_or(128),
            users: f.users,
            token_issuers: f.token_issuers,
            readthrough: if self.readthrough.is_empty() {
                Ok(f.readthrough)
            } else {
                self.readthrough
                    .iter()
                    .map(|s| RuleConfig::parse_flag(s))
                    .collect()
            },
            admin_listen: text(&self.admin_listen, f.admin_listen, "127.0.0.1:9180"),
            cluster_api: self.cluster_api || f.cluster_api.enabled,
            announce: self.announce.clone().or(f.cluster_api.announce),
            cluster_api_peers: if self.cluster_api_peers.is_empty() {
                f.cluster_api.peers
            } else {
                self.cluster_api_peers.clone()
            },
            upstream_username: self.upstream_username.clone().or(f.upstream.username),
            upstream_password: self.upstream_password.clone().or(f.upstream.password),
            upstream_tls: self.upstream_tls || f.upstream.tls,
            upstream_tls_ca: self.upstream_tls_ca.clone().or(f.upstream.tls_ca),
            upstream_tls_cert: self.upstream_tls_cert.clone().or(f.upstream.tls_cert),
            upstream_tls_key: self.upstream_tls_key.clone().or(f.upstream.tls_key),
            upstream_tls_server_name: self
                .upstream_tls_server_name
                .clone()
                .or(f.upstream.tls_server_name),
        }
    }
}

/// `--io`, else `SLOTGATE_IO` (the test suite runs both paths with it), else the file's `io`,
/// else epoll.
fn io_mode(flag: &Option<String>, file: Option<String>) -> String {
    let env = std::env::var("SLOTGATE_IO").ok().filter(|v| !v.is_empty());
    (flag.clone().or(env).or(file)).unwrap_or_else(|| "epoll".into())
}

/// File and flags merged, not yet validated.
struct Merged {
    listen: String,
    shards: Vec<ShardEntry>,
    cluster_seeds: Vec<String>,
    cluster_refresh: String,
    cluster_api: bool,
    announce: Option<String>,
    cluster_api_peers: Vec<String>,
    read_from: String,
    workers: usize,
    upstream_connections: usize,
    op_timeout: String,
    log_level: String,
    max_client_pipeline: usize,
    max_inflight_per_connection: usize,
    max_inflight_bytes_per_connection: String,
    obuf_normal: String,
    obuf_pubsub: String,
    max_dedicated_per_shard: usize,
    tracking_table_max_keys: usize,
    hotkeys_sample: u32,
    io: String,
    admin_token: Option<String>,
    proto_max_bulk_len: usize,
    client_query_buffer_limit: usize,
    tls_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_self_signed: bool,
    tls_client_ca: Option<PathBuf>,
    requirepass: Option<String>,
    max_auth_failures: u32,
    max_auth_failures_per_address: u32,
    maxclients: usize,
    tcp_backlog: u32,
    idle_timeout: String,
    shutdown_timeout: String,
    slowlog_log_slower_than: i64,
    slowlog_max_len: usize,
    users: Vec<UserConfig>,
    token_issuers: Vec<IssuerConfig>,
    readthrough: Result<Vec<RuleConfig>, String>,
    admin_listen: String,
    upstream_username: Option<String>,
    upstream_password: Option<String>,
    upstream_tls: bool,
    upstream_tls_ca: Option<PathBuf>,
    upstream_tls_cert: Option<PathBuf>,
    upstream_tls_key: Option<PathBuf>,
    upstream_tls_server_name: Option<String>,
}

/// AUTH credentials for shard connections (`of` names the shard, or `cluster`, in an error).
fn credentials(
    user: Option<String>,
    pass: Option<String>,
    of: &str,
) -> Result<Option<UpstreamAuth>, ConfigError> {
    match (user, pass) {
        (u, Some(p)) => Ok(Some(UpstreamAuth {
            username: u,
            password: Secret(p),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            "upstream username",
            of,
            "a username needs a password",
        )),
    }
}

fn invalid(what: &'static str, value: impl ToString, why: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        what,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn parse_addr(what: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    // host:port with a name (e.g. localhost:7001): resolved once, at start-up.
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| invalid(what, s, "the name resolves to no address")),
        Err(e) => Err(invalid(what, s, format!("expected HOST:PORT ({e})"))),
    }
}

/// The log filter for `log_level`: a level (Redis's names too: `warning`, `notice`,
/// `verbose`, `nothing`) or `target=level` directives. A bare word that is neither is an
/// error: tracing would take it for a target and log nothing at all.
fn log_filter(s: &str) -> Result<String, String> {
    const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];
    let t = s.trim();
    let mapped = match t.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        "notice" => "info".to_string(),
        "verbose" => "debug".to_string(),
        "nothing" => "off".to_string(),
        _ => t.to_string(),
    };
    for part in mapped.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !part.contains('=') && !LEVELS.contains(&part.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "'{part}' is neither a level (error, warn, info, debug, trace, off) nor a \
                 target=level directive"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&mapped).map_err(|e| e.to_string())?;
    Ok(mapped)
}

/// A duration, where a bare `0` also means zero.
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

impl Merged {
    fn validate(self) -> Result<Settings, ConfigError> {
        let listen = if self.listen.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(parse_addr("listen address", &self.listen)?)
        };
        let cluster = self.cluster()?;
        let (shards, slot_map) = match cluster {
            // Read from the cluster when slotgate starts (`cluster::start`); until then, a
            // map of one placeholder shard that nothing routes by.
            Some(_) => (Vec::new(), SlotMap::build(&[("cluster".into(), None)])?),
            None => self.shard_layout()?,
        };
        let op_timeout = parse_duration(&self.op_timeout)
            .map_err(|why| invalid("op-timeout", &self.op_timeout, why))?;
        if op_timeout.is_zero() {
            return Err(invalid("op-timeout", &self.op_timeout, "must be > 0"));
        }
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > 1024 => return Err(invalid("workers", n, "at most 1024")),
            n => n,
        };
        self.check_limits()?;
        let (max_inflight_bytes_per_connection, obuf_normal, obuf_pubsub) = self.byte_limits()?;
        let log_level =
            log_filter(&self.log_level).map_err(|e| invalid("log-level", &self.log_level, e))?;
        let tls = self.tls_settings()?;
        if listen.is_none() && tls.is_none() {
            return Err(invalid(
                "listen",
                "none",
                "no listener left: enable the plain or the TLS listener",
            ));
        }
        let (users, tokens) = self.users_and_tokens()?;
        let idle = parse_duration_or_zero(&self.idle_timeout)
            .map_err(|why| invalid("idle-timeout", &self.idle_timeout, why))?;
        let shutdown_timeout = parse_duration_or_zero(&self.shutdown_timeout)
            .map_err(|why| invalid("shutdown-timeout", &self.shutdown_timeout, why))?;
        let upstream_auth = self.upstream_auth()?;
        let upstream_tls = self.upstream_tls()?;
        let rules = self
            .readthrough
            .clone()
            .and_then(|r| Rules::build(&r))
            .map_err(ConfigError::ReadThrough)?;
        let cluster_api = self.cluster_api(listen, tls.as_ref().map(|t| t.listen.port()))?;
        let admin_listen = if self.admin_listen.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(parse_addr("admin listen address", &self.admin_listen)?)
        };
        Ok(Settings {
            listen,
            shards,
            slot_map,
            cluster: cluster.map(Arc::new),
            replica_of: Vec::new(),
            workers,
            upstream_connections: self.upstream_connections,
            op_timeout,
            log_level,
            max_client_pipeline: self.max_client_pipeline,
            max_inflight_per_connection: self.max_inflight_per_connection,
            max_inflight_bytes_per_connection,
            obuf_normal,
            obuf_pubsub,
            max_dedicated_per_shard: self.max_dedicated_per_shard,
            tracking_table_max_keys: self.tracking_table_max_keys,
            hotkeys_sample: self.hotkeys_sample,
            io: match self.io.as_str() {
                "epoll" => crate::settings::Io::Epoll,
                "uring" => crate::settings::Io::Uring,
                _ => return Err(invalid("io", &self.io, "expected epoll or uring")),
            },
            admin_token: self.admin_token,
            proto_max_bulk_len: self.proto_max_bulk_len,
            client_query_buffer_limit: self.client_query_buffer_limit,
            tls,
            users: Arc::new(users),
            tokens: Arc::new(tokens),
            max_auth_failures: self.max_auth_failures,
            max_auth_failures_per_address: self.max_auth_failures_per_address,
            maxclients: self.maxclients,
            tcp_backlog: self.tcp_backlog,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            shutdown_timeout,
            slowlog_log_slower_than: self.slowlog_log_slower_than,
            slowlog_max_len: self.slowlog_max_len,
            upstream_auth,
            upstream_tls,
            readthrough: Arc::new(rules),
            admin_listen,
            cluster_api: cluster_api.map(Arc::new),
        })
    }

    /// The cluster API (`--cluster-api`): what this instance announces, and its peers.
    fn cluster_api(
        &self,
        listen: Option<SocketAddr>,
        tls_port: Option<u16>,
    ) -> Result<Option<crate::cluster_api::ClusterApi>, ConfigError> {
        use crate::cluster_api::{ClusterApi, Node};
        if !self.cluster_api {
            if self.announce.is_some() || !self.cluster_api_peers.is_empty() {
                return Err(invalid(
                    "announce",
                    self.announce.as_deref().unwrap_or("(peers)"),
                    "announce and cluster-api-peers need --cluster-api ([cluster_api] enabled)",
                ));
            }
            return Ok(None);
        }
        let me = match (&self.announce, listen) {
            (Some(a), _) => Node::parse(a).map_err(|why| invalid("announce", a, why))?,
            (None, Some(l)) if !l.ip().is_unspecified() => Node {
                host: l.ip().to_string(),
                port: l.port(),
            },
            (None, l) => {
                return Err(invalid(
                    "announce",
                    l.map_or("none".to_string(), |l| l.to_string()),
                    "the cluster API needs --announce HOST:PORT when the plain listener is a \
                     wildcard address or off",
                ));
            }
        };
        let mut peers = Vec::new();
        for p in &self.cluster_api_peers {
            peers.push(Node::parse(p).map_err(|why| invalid("cluster-api-peers", p, why))?);
        }
        Ok(Some(ClusterApi::new(
            me,
            peers,
            listen.map(|l| l.port()),
            tls_port,
        )))
    }

    /// The numeric limits and the password, each within its bounds.
    fn check_limits(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.upstream_connections) {
            return Err(invalid(
                "upstream-connections",
                self.upstream_connections,
                "must be between 1 and 64",
            ));
        }
        if self.max_client_pipeline == 0 {
            return Err(invalid("max-client-pipeline", 0, "must be > 0"));
        }
        if self.max_inflight_per_connection == 0 {
            return Err(invalid("max-inflight-per-connection", 0, "must be > 0"));
        }
        if self.proto_max_bulk_len < 1024 * 1024 {
            return Err(invalid(
                "proto_max_bulk_len",
                self.proto_max_bulk_len,
                "at least 1048576 (as in Redis)",
            ));
        }
        if self.requirepass.as_deref() == Some("") {
            return Err(invalid("requirepass", "\"\"", "must not be empty"));
        }
        if self.max_auth_failures == 0 {
            return Err(invalid("max-auth-failures", 0, "must be > 0"));
        }
        if self.maxclients == 0 {
            return Err(invalid("maxclients", 0, "must be > 0"));
        }
        if !(1..=65535).contains(&self.tcp_backlog) {
            return Err(invalid(
                "tcp-backlog",
                self.tcp_backlog,
                "must be between 1 and 65535",
            ));
        }
        Ok(())
    }

    /// The users and the token issuers (whose JWKS files are read here).
    fn users_and_tokens(&self) -> Result<(Users, Issuers), ConfigError> {
        let users =
            Users::build(self.requirepass.as_deref(), &self.users).map_err(ConfigError::Users)?;
        let tokens = Issuers::build(&self.token_issuers).map_err(ConfigError::TokenIssuers)?;
        if tokens.is_empty() && users.token_users() {
            return Err(ConfigError::Users(
                "token_subjects and token_roles need a [[token_issuers]] entry".into(),
            ));
        }
        Ok((users, tokens))
    }

    /// The limits given in bytes: in flight per upstream connection, and the two classes of
    /// client output buffer.
    fn byte_limits(&self) -> Result<(usize, OutputLimit, OutputLimit), ConfigError> {
        let inflight_bytes = &self.max_inflight_bytes_per_connection;
        let inflight = match parse_bytes(inflight_bytes) {
            Ok(0) => Err("must be > 0".to_string()),
            other => other,
        }
        .map_err(|why| invalid("max-inflight-bytes-per-connection", inflight_bytes, why))?;
        let normal = OutputLimit::parse(&self.obuf_normal)
            .map_err(|why| invalid("client_output_buffer_limit_normal", &self.obuf_normal, why))?;
        let pubsub = OutputLimit::parse(&self.obuf_pubsub)
            .map_err(|why| invalid("client_output_buffer_limit_pubsub", &self.obuf_pubsub, why))?;
        Ok((inflight, normal, pubsub))
    }

    /// Cluster mode (`--cluster`, `[cluster] seeds`), when its seeds are given: checked here,
    /// contacted only when slotgate starts.
    fn cluster(&self) -> Result<Option<crate::settings::ClusterSettings>, ConfigError> {
        let refresh = parse_duration(&self.cluster_refresh)
            .map_err(|why| invalid("cluster-refresh", &self.cluster_refresh, why))?;
        if refresh < Duration::from_millis(100) {
            return Err(invalid(
                "cluster-refresh",
                &self.cluster_refresh,
                "at least 100ms",
            ));
        }
        let read_from = match self.read_from.as_str() {
            "primary" => crate::settings::ReadFrom::Primary,
            "replica" => crate::settings::ReadFrom::Replica,
            "prefer-replica" => crate::settings::ReadFrom::PreferReplica,
            _ => {
                return Err(invalid(
                    "read-from",
                    &self.read_from,
                    "expected primary, replica or prefer-replica",
                ));
            }
        };
        if self.cluster_seeds.is_empty() {
            // (The cluster keys are checked anyway: a typo is an error in static mode too.)
            return Ok(None);
        }
        if !self.shards.is_empty() {
            return Err(invalid(
                "layout",
                "shards and cluster seeds",
                "give shards (--shard, [[shards]]) or cluster seeds (--cluster, [cluster] seeds), \
                 not both",
            ));
        }
        let mut seeds = Vec::new();
        for s in &self.cluster_seeds {
            let s = s.trim();
            let port = s.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            match port {
                Some((h, Ok(p))) if !h.is_empty() && p != 0 => seeds.push(s.to_string()),
                _ => return Err(invalid("cluster seed", s, "expected HOST:PORT")),
            }
        }
        let auth = credentials(
            self.upstream_username.clone(),
            self.upstream_password.clone(),
            "cluster",
        )?;
        Ok(Some(crate::settings::ClusterSettings {
            seeds,
            auth,
            refresh,
            read_from,
        }))
    }

    /// The shards in order, and the slot map of their layout.
    fn shard_layout(&self) -> Result<(Vec<SocketAddr>, SlotMap), ConfigError> {
        let mut shards = Vec::new();
        let mut layout = Vec::new();
        for s in &self.shards {
            let addr = parse_addr("shard address", s.addr.trim())?;
            if shards.contains(&addr) {
                return Err(invalid("shard address", &s.addr, "listed twice"));
            }
            let ranges = match &s.slots {
                Some(r) => Some(parse_slot_ranges(r)?),
                None => None,
            };
            if ranges.is_none() && self.shards.iter().any(|o| o.slots.is_some()) {
                return Err(invalid(
                    "shard",
                    &s.addr,
                    "give slots for every shard or for none (even split)",
                ));
            }
            shards.push(addr);
            layout.push((s.addr.clone(), ranges));
        }
        let slot_map = SlotMap::build(&layout)?;
        Ok((shards, slot_map))
    }

    /// Each shard's AUTH credentials (its own, or `[upstream]`'s).
    fn upstream_auth(&self) -> Result<Vec<Option<UpstreamAuth>>, ConfigError> {
        self.shards
            .iter()
            .map(|s| {
                credentials(
                    s.username.clone().or(self.upstream_username.clone()),
                    s.password.clone().or(self.upstream_password.clone()),
                    &s.addr,
                )
            })
            .collect()
    }

    /// TLS to the shards, when configured.
    fn upstream_tls(&self) -> Result<Option<crate::tls::UpstreamTls>, ConfigError> {
        if !self.upstream_tls {
            return Ok(None);
        }
        let ca = self
            .upstream_tls_ca
            .as_deref()
            .ok_or_else(|| invalid("upstream-tls", "on", "--upstream-tls-ca is required"))?;
        let client = match (&self.upstream_tls_cert, &self.upstream_tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "upstream-tls-cert",
                    "",
                    "give both --upstream-tls-cert and --upstream-tls-key",
                ));
            }
        };
        Ok(Some(crate::tls::upstream_config(
            ca,
            client,
            self.upstream_tls_server_name.as_deref(),
        )?))
    }

    /// The TLS listener, when a certificate (files or self-signed) is configured. Loads the
    /// certificate now, so bad files fail at start-up (and in `--check-config`).
    fn tls_settings(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let source = match (&self.tls_cert, &self.tls_key, self.tls_self_signed) {
            (Some(cert), Some(key), false) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None, true) => CertSource::SelfSigned,
            (None, None, false) => {
                if self
                    .tls_listen
                    .as_deref()
                    .is_some_and(|l| !l.eq_ignore_ascii_case("none"))
                {
                    return Err(invalid(
                        "tls-listen",
                        self.tls_listen.as_deref().unwrap_or(""),
                        "needs --tls-cert and --tls-key, or --tls-self-signed",
                    ));
                }
                return Ok(None);
            }
            (_, _, true) => {
                return Err(invalid(
                    "tls-self-signed",
                    "on",
                    "give either a certificate or --tls-self-signed, not both",
                ));
            }
            _ => {
                return Err(invalid(
                    "tls-cert",
                    "",
                    "give both --tls-cert and --tls-key",
                ));
            }
        };
        let listen = match self.tls_listen.as_deref() {
            Some(l) if l.eq_ignore_ascii_case("none") => return Ok(None),
            Some(l) => parse_addr("TLS listen address", l)?,
            None => "127.0.0.1:10000".parse().expect("valid literal"),
        };
        let cert = ReloadableCert::load(source)?;
        let config = crate::tls::server_config(cert.clone(), self.tls_client_ca.as_deref())?;
        Ok(Some(TlsSettings {
            listen,
            cert,
            config,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn sizes_and_output_limits() {
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("64mb").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1k").unwrap(), 1000);
        assert_eq!(parse_bytes("2KB").unwrap(), 2048);
        assert_eq!(parse_bytes("1gb").unwrap(), 1 << 30);
        assert!(parse_bytes("1tb").is_err());
        assert!(parse_bytes("mb").is_err());
        assert_eq!(
            OutputLimit::parse("256mb 64mb 60").unwrap(),
            OutputLimit {
                hard: 256 << 20,
                soft: 64 << 20,
                soft_for: Duration::from_secs(60)
            }
        );
        assert_eq!(OutputLimit::parse("0 0 0").unwrap().hard, 0);
        assert!(OutputLimit::parse("256mb 64mb").is_err());
        assert!(OutputLimit::parse("256mb 64mb x").is_err());
        let file: FileConfig = toml::from_str(
            "max_inflight_bytes_per_connection = 1048576\nclient_output_buffer_limit_pubsub = \"1mb 0 0\"\n[[shards]]\naddr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let s = Cli::default().merge(file).validate().unwrap();
        assert_eq!(s.max_inflight_bytes_per_connection, 1 << 20);
        assert_eq!(s.obuf_pubsub.hard, 1 << 20);
        assert_eq!(s.obuf_normal.soft, 64 << 20);
    }

    #[test]
    fn flags_override_file() {
        let cli = Cli::parse_from([
            "slotgate",
            "--shard",
            "127.0.0.1:7001",
            "--shard",
            "127.0.0.1:7002",
            "--op-timeout",
            "250ms",
        ]);
        let file: FileConfig = toml::from_str(
            "op_timeout = \"5s\"\nworkers = 3\n[[shards]]\naddr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let s = cli.merge(file).validate().unwrap();
        assert_eq!(s.shards.len(), 2, "--shard replaces the file's shards");
        assert_eq!(s.op_timeout, Duration::from_millis(250));
        assert_eq!(s.workers, 3);
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../proxy.toml");
        let file: FileConfig = toml::from_str(text).expect("proxy.toml parses");
        let cli = Cli::default();
        cli.merge(file).validate().expect("proxy.toml validates");
    }
}
