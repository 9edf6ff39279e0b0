//! The validated settings the server runs with, built by the `config` module from `proxy.toml`
//! and the flags, and read by every worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Users;
use crate::queue::OutputLimit;
use crate::readthrough::Rules;
use crate::router::SlotMap;
use crate::shard::UpstreamAuth;
use crate::tls::{ReloadableCert, UpstreamTls};

/// The TLS listener.
#[derive(Clone)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    pub cert: Arc<ReloadableCert>,
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Cluster mode: a Redis Cluster behind slotgate, its layout read from the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Nodes to read the topology from at start-up (`HOST:PORT`), in order.
    pub seeds: Vec<String>,
    /// The `[upstream]` credentials, for every node.
    pub auth: Option<UpstreamAuth>,
    /// How often the topology is read again.
    pub refresh: Duration,
    pub read_from: ReadFrom,
}

/// How plain TCP sockets are read and written (`io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// tokio's readiness (epoll) and one system call per read or write.
    Epoll,
    /// io_uring: each worker turn's reads and writes submitted with one system call.
    Uring,
}

/// Where reads go in cluster mode (`read_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Primary,
    /// Reads go to a replica of the slot's primary, and fail when it has none.
    Replica,
    /// Reads go to a replica when one is connected, else to the primary.
    PreferReplica,
}

/// The validated settings the server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    /// The shards (in cluster mode: the cluster's primaries, as last read), in order.
    pub shards: Vec<SocketAddr>,
    pub slot_map: SlotMap,
    /// Cluster mode: `shards`, `slot_map` and `upstream_auth` follow the cluster's topology.
    pub cluster: Option<Arc<ClusterSettings>>,
    /// Cluster mode with reads from replicas: per primary (its shard index), the shard index
    /// of the replica its reads go to. The replicas are the shards after the primaries (no
    /// slot maps to them). Empty otherwise.
    pub replica_of: Vec<Option<usize>>,
    pub workers: usize,
    pub upstream_connections: usize,
    pub op_timeout: Duration,
    pub log_level: String,
    pub max_client_pipeline: usize,
    pub max_inflight_per_connection: usize,
    pub max_inflight_bytes_per_connection: usize,
    pub max_dedicated_per_shard: usize,
    /// Keys the workers' tracking tables may hold together (0: no limit).
    pub tracking_table_max_keys: usize,
    /// Hot keys and big replies: one command in this many is sampled (0: none).
    pub hotkeys_sample: u32,
    /// Socket I/O of plain TCP clients and shard connections (`--io`).
    pub io: Io,
    /// The bearer token the admin listener asks for, if any.
    pub admin_token: Option<String>,
    pub proto_max_bulk_len: usize,
    pub client_query_buffer_limit: usize,
    /// Redis's `client-output-buffer-limit` for ordinary clients and for subscribers.
    pub obuf_normal: OutputLimit,
    pub obuf_pubsub: OutputLimit,
    pub tls: Option<TlsSettings>,
    pub users: Arc<Users>,
    /// Token issuers (`[[token_issuers]]`); empty: no token authentication.
    pub tokens: Arc<crate::token::Issuers>,
    pub max_auth_failures: u32,
    /// Failed AUTHs per source address and minute before it must wait (0: no limit).
    pub max_auth_failures_per_address: u32,
    pub maxclients: usize,
    /// The listeners' accept queue (Redis's `tcp-backlog`).
    pub tcp_backlog: u32,
    pub idle_timeout: Option<Duration>,
    /// How long a graceful shutdown waits for clients to be answered (zero: not at all).
    pub shutdown_timeout: Duration,
    /// slotgate's own slow log: the threshold in microseconds (negative: off) and length.
    pub slowlog_log_slower_than: i64,
    pub slowlog_max_len: usize,
    /// Per shard, in order.
    pub upstream_auth: Vec<Option<UpstreamAuth>>,
    pub upstream_tls: Option<UpstreamTls>,
    pub readthrough: Arc<Rules>,
    pub admin_listen: Option<SocketAddr>,
    /// The cluster API (`--cluster-api`): the fleet this instance announces itself in.
    pub cluster_api: Option<Arc<crate::cluster_api::ClusterApi>>,
}
