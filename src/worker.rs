//! What workers share ([`Shared`]: settings, counters, the client list, read-through state)
//! and one worker thread's own state ([`Worker`]: its shard connections, scratch buffers,
//! origin client and metrics). Sessions and the read-through fill reach everything through
//! their `Rc<Worker>`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics::WorkerMetrics;
use crate::readthrough::ReadThrough;
use crate::readthrough::origin::OriginClient;
use crate::settings::Settings;
use crate::shard::{DedicatedPool, Pools, UpstreamConfig};

/// State shared by every worker. Cloning the `Arc` is the only cost of access.
pub struct Shared {
    /// The settings slotgate started with. What a reload cannot change (listeners, workers,
    /// upstream connections and their credentials, timeouts of shard connections) is read
    /// here; everything else through [`Worker::live`] or [`Shared::live`].
    pub settings: Settings,
    /// The settings of the last successful reload (the start-up ones before any).
    live: Mutex<Arc<Settings>>,
    /// Counts reloads; a worker whose own count differs picks the new settings up.
    pub generation: AtomicU64,
    /// Where SLOTGATE.RELOAD sends its request (set by the server at start-up).
    pub reloads: OnceLock<tokio::sync::mpsc::UnboundedSender<ReloadRequest>>,
    /// Where `POST /invalidate` sends its work (worker 0 carries it out: see
    /// `readthrough::invalidate`).
    pub invalidations:
        OnceLock<tokio::sync::mpsc::UnboundedSender<crate::readthrough::invalidate::Job>>,
    /// The bearer token of `POST /invalidate` (`SLOTGATE_INVALIDATE_TOKEN`; none: the
    /// endpoint answers 404).
    pub invalidate_token: Option<String>,
    /// Cluster mode: a redirect says the layout changed; read it again soon.
    pub cluster_changed: tokio::sync::Notify,
    pub cluster_stats: crate::cluster::ClusterStats,
    pub started: Instant,
    pub started_wall: SystemTime,
    /// INFO's `run_id` (and `master_replid`): 40 random hex characters per process, as Redis.
    pub run_id: String,
    /// The shards' `redis_version`, learned from the first INFO that reaches a shard.
    pub redis_version: OnceLock<String>,
    pub next_client_id: AtomicU64,
    /// Client connections now (for `maxclients`).
    pub connected: AtomicUsize,
    /// Scripts and function libraries loaded through slotgate (loaded again on new shard
    /// connections).
    pub scripts: Arc<crate::shard::Scripts>,
    /// Clients with CLIENT TRACKING on (INFO's `tracking_clients`).
    pub tracking_clients: Arc<AtomicUsize>,
    /// Per worker: keys in its tracking table (INFO's `tracking_total_keys`).
    pub tracking_keys: Vec<Arc<AtomicUsize>>,
    /// Per worker: its sampled keys and big replies (see `hotkeys`).
    pub hot_books: Vec<Arc<crate::hotkeys::Book>>,
    /// The books' last merges (SLOTGATE.HOTKEYS, the admin endpoints, the gauges).
    pub hot_merged: crate::hotkeys::MergeCache,
    /// Clients waiting on a blocking command (INFO's `blocked_clients`).
    pub blocked_clients: Arc<AtomicUsize>,
    pub stats: Stats,
    /// Client sessions, for CLIENT LIST. Touched on connect/disconnect and by CLIENT SETNAME.
    pub clients: Mutex<HashMap<u64, ClientInfo>>,
    /// Failed AUTHs per source address, and the rate of their warnings.
    pub auth_guard: crate::auth::AuthGuard,
    /// The plain listener's bound address (known after bind).
    pub listen_addr: OnceLock<SocketAddr>,
    /// Read-through rules, fetches in flight and negative entries (shared by the workers).
    pub readthrough: ReadThrough,
    /// The Prometheus registry's handle, when metrics are installed.
    pub prometheus: Option<PrometheusHandle>,
    /// Set once on SIGTERM/SIGINT: sessions answer what they have read, then close.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Per shard address: RESP2 upstream connections up, over all workers (for /readyz).
    shard_up: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    /// Per worker: requests in flight per shard address, published once a second.
    pub inflight: Vec<Mutex<Vec<(SocketAddr, usize)>>>,
    /// CLIENT PAUSE and MONITOR (proxy-wide).
    pub gate: crate::gate::Gate,
    /// INFO commandstats and errorstats: what the workers published (once a second, and
    /// by the worker answering INFO just before).
    pub command_totals: Mutex<crate::metrics::CommandTotals>,
    /// slotgate's own slow log (see `slowlog`).
    pub slowlog: Arc<crate::slowlog::SlowLog>,
}

/// Process-wide counters (relaxed atomics; each is written by many workers only rarely, or is
/// per-connection rather than per-request).
#[derive(Default)]
pub struct Stats {
    pub connections_received: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub auth_failures: AtomicU64,
    pub commands_processed: AtomicU64,
    /// AUTHs (and HELLO AUTHs) that succeeded with a token.
    pub token_auths: AtomicU64,
    /// AUTHs with a token that was refused (also counted in `auth_failures`).
    pub token_auth_failures: AtomicU64,
    /// Clients closed for going over their output buffer limit.
    pub obuf_closes: AtomicU64,
}

/// What CLIENT LIST shows of a session.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    pub name: String,
    pub user: String,
    pub resp: u8,
    /// The `exp` of the token the client authenticated with (CLIENT LIST `token-exp`).
    pub token_exp: Option<u64>,
    /// Has subscriptions (a new shard layout closes such clients: see `reload`).
    pub subscribed: bool,
    /// Notified by CLIENT KILL: the session closes.
    pub kill: Arc<tokio::sync::Notify>,
    /// Where the client's blocking command waits, while one does (CLIENT UNBLOCK).
    pub blocked_on: Arc<BlockedOn>,
    /// Where the invalidations of clients that redirect theirs to this one go.
    pub mail: Arc<crate::tracking::Mail>,
    /// CLIENT TRACKING, while on: BCAST, and the redirect id (0: none).
    pub tracking: Option<(bool, u64)>,
}

/// The shard a client's blocking command waits on, and the shard's client id for its
/// dedicated connection (0 until known).
pub type BlockedOn = Mutex<Option<(SocketAddr, Arc<std::sync::atomic::AtomicI64>)>>;

impl Shared {
    pub fn new(settings: Settings, prometheus: Option<PrometheusHandle>) -> Arc<Self> {
        let readthrough = ReadThrough::new(settings.op_timeout * 2);
        let workers = settings.workers;
        let slowlog = Arc::new(crate::slowlog::SlowLog::new(
            settings.slowlog_log_slower_than,
            settings.slowlog_max_len,
        ));
        Arc::new(Shared {
            readthrough,
            prometheus,
            draining: tokio::sync::watch::Sender::new(false),
            shard_up: Mutex::new(HashMap::new()),
            inflight: (0..settings.workers).map(|_| Mutex::default()).collect(),
            live: Mutex::new(Arc::new(settings.clone())),
            generation: AtomicU64::new(0),
            reloads: OnceLock::new(),
            invalidations: OnceLock::new(),
            invalidate_token: std::env::var("SLOTGATE_INVALIDATE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            cluster_changed: tokio::sync::Notify::new(),
            cluster_stats: Default::default(),
            settings,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            run_id: random_hex40(),
            redis_version: OnceLock::new(),
            next_client_id: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
            blocked_clients: Arc::default(),
            tracking_clients: Arc::default(),
            tracking_keys: (0..workers).map(|_| Arc::default()).collect(),
            hot_merged: Default::default(),
            hot_books: (0..workers)
                .map(|_| Arc::new(crate::hotkeys::Book::new(Instant::now())))
                .collect(),
            scripts: Arc::default(),
            stats: Stats::default(),
            clients: Mutex::new(HashMap::new()),
            auth_guard: Default::default(),
            listen_addr: OnceLock::new(),
            gate: Default::default(),
            command_totals: Mutex::default(),
            slowlog,
        })
    }

    /// The settings now in force (after the last reload).
    pub fn live(&self) -> Arc<Settings> {
        self.live
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Makes `settings` the ones in force; workers pick them up when told (see
    /// [`Worker::refresh`]).
    pub fn publish(&self, settings: Settings) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        self.slowlog
            .configure(settings.slowlog_log_slower_than, settings.slowlog_max_len);
        *live = Arc::new(settings);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn connected_clients(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// The count of RESP2 connections up to the shard at `addr`, over all workers.
    pub fn shard_up(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut map = self.shard_up.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(addr).or_default().clone()
    }

    /// Whether every worker has all its RESP2 connections to `addr` up.
    pub fn shard_is_up(&self, addr: SocketAddr) -> bool {
        let expected = self.settings.workers * self.settings.upstream_connections;
        self.shard_up(addr).load(Ordering::Relaxed) >= expected
    }

    /// Requests in flight to `addr`, over all workers (as published once a second).
    pub fn shard_inflight(&self, addr: SocketAddr) -> usize {
        self.inflight
            .iter()
            .filter_map(|w| w.lock().ok())
            .map(|w| {
                w.iter()
                    .filter(|(a, _)| *a == addr)
                    .map(|(_, n)| n)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Shards of the layout in force that do not have all their RESP2 connections up (empty
    /// when ready).
    pub fn shards_down(&self) -> Vec<String> {
        let live = self.live();
        // (Cluster mode: the primaries; the replicas reads go to come after them, and a
        // read falls back to its primary when its replica is down with `prefer-replica`.)
        let primaries = live.slot_map.shard_count().min(live.shards.len());
        live.shards[..primaries]
            .iter()
            .filter(|&&a| !self.shard_is_up(a))
            .map(|a| a.to_string())
            .collect()
    }
}

/// A process-wide limit split over the workers (0: none).
fn per_worker(max: usize, workers: usize) -> usize {
    if max == 0 {
        0
    } else {
        max.div_ceil(workers.max(1))
    }
}

/// 40 random hex characters (20 bytes from the system's generator).
fn random_hex40() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 20];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // (No system randomness: the time and the process id still differ between runs.)
        let seed = format!("{:?}{}", SystemTime::now(), std::process::id());
        let d = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        bytes.copy_from_slice(&d.as_ref()[..20]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How to reach each shard of `s` (in its order): the upstream settings slotgate started with,
/// each shard's credentials, and its shared up-counter.
fn upstream_configs(shared: &Shared, s: &Settings) -> Vec<(SocketAddr, UpstreamConfig)> {
    let fixed = &shared.settings;
    s.shards
        .iter()
        .zip(&s.upstream_auth)
        .enumerate()
        .map(|(i, (&addr, auth))| {
            let cfg = UpstreamConfig {
                op_timeout: fixed.op_timeout,
                max_inflight: fixed.max_inflight_per_connection,
                max_inflight_bytes: fixed.max_inflight_bytes_per_connection,
                auth: auth.clone(),
                tls: fixed.upstream_tls.clone(),
                up: shared.shard_up(addr),
                dedicated: false,
                mirror: None,
                scripts: Some(shared.scripts.clone()),
                slowlog: Some(shared.slowlog.clone()),
                // (The replicas reads go to.)
                readonly: s.replica_of.contains(&Some(i)),
                cluster: s.cluster.is_some(),
            };
            (addr, cfg)
        })
        .collect()
}

/// A reload asked for by SLOTGATE.RELOAD: the outcome (a summary, or why the new
/// configuration was refused) goes back on the channel.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// One worker thread's state: the shared settings plus its own shard connections.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// This worker's copy of the settings in force, and the reload count it belongs to;
    /// sessions compare their own count once per turn (see [`Worker::refresh`]).
    live: std::cell::RefCell<Arc<Settings>>,
    /// Counts the shard layouts this worker has had (shards or slot ranges changed).
    pub layout: std::cell::Cell<u64>,
    /// Whether the settings in force have read-through rules (one load on the write path).
    pub has_rules: std::cell::Cell<bool>,
    /// Cluster mode: requests on the shared connections keep their bytes, to follow
    /// redirects (see `cluster`).
    pub cluster: bool,
    /// Cluster mode: where read-only commands go (`read_from`).
    pub read_from: crate::settings::ReadFrom,
    /// Told the reload count each time this worker takes up a reload; each session's watcher
    /// flags its session (see `session::serve`).
    pub reloads: tokio::sync::watch::Sender<u64>,
    /// The shard connections of the layout in force (a reload may change the layout).
    pools: std::cell::RefCell<Rc<Pools>>,
    /// Dedicated connections for transactions and blocking commands.
    dedicated: std::cell::RefCell<Rc<DedicatedPool>>,
    /// Commands processed by this worker, flushed into `Stats` now and then.
    pub commands: std::cell::Cell<u64>,
    /// This worker's HTTP client for read-through origins.
    pub origin: OriginClient,
    /// Per-command counters, published once a second.
    pub metrics: WorkerMetrics,
    /// Shared by this worker's sessions: reads land here and writes are gathered here, so an
    /// idle client holds no buffer of its own (see `session::serve`).
    pub read_scratch: std::cell::RefCell<Vec<u8>>,
    pub write_scratch: std::cell::RefCell<bytes::BytesMut>,
    /// Read-through GETs waiting for their shard.
    pub pending_gets: Rc<crate::readthrough::PendingGets>,
    /// Client-side caching: this worker's tracking clients and invalidation links.
    pub tracker: Rc<crate::tracking::Tracker>,
    /// Hot keys and big replies: which commands are sampled, and this worker's book.
    pub hot: crate::hotkeys::Sampler,
    /// `slotgate_request_duration_seconds` of each command class (`command::CLASSES`), kept
    /// so that a sampled latency is recorded without looking its series up.
    pub class_latency: Vec<metrics::Histogram>,
}

impl Worker {
    pub(crate) fn start(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        let s = &shared.settings;
        let shards = upstream_configs(&shared, s);
        let dedicated = DedicatedPool::new(&shards, s.max_dedicated_per_shard);
        let pools = Pools::start(shards, s.upstream_connections);
        let tracker = crate::tracking::Tracker::new(
            per_worker(s.tracking_table_max_keys, s.workers),
            shared.tracking_clients.clone(),
            shared.tracking_keys[id].clone(),
        );
        let seed = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ shared.started.elapsed().as_nanos() as u64;
        let hot =
            crate::hotkeys::Sampler::new(s.hotkeys_sample, shared.hot_books[id].clone(), seed);
        Rc::new(Worker {
            id,
            pools: std::cell::RefCell::new(Rc::new(pools)),
            dedicated: std::cell::RefCell::new(dedicated),
            layout: std::cell::Cell::new(0),
            has_rules: std::cell::Cell::new(!shared.live().readthrough.is_empty()),
            cluster: shared.settings.cluster.is_some(),
            read_from: shared
                .settings
                .cluster
                .as_ref()
                .map_or(crate::settings::ReadFrom::Primary, |c| c.read_from),
            live: std::cell::RefCell::new(shared.live()),
            reloads: tokio::sync::watch::Sender::new(shared.generation.load(Ordering::Acquire)),
            shared,
            commands: std::cell::Cell::new(0),
            origin: OriginClient::new(),
            metrics: WorkerMetrics::default(),
            read_scratch: Default::default(),
            write_scratch: Default::default(),
            pending_gets: Default::default(),
            tracker,
            hot,
            class_latency: crate::command::CLASSES
                .iter()
                .map(|&c| metrics::histogram!(crate::metrics::REQUEST_DURATION, "class" => c))
                .collect(),
        })
    }

    /// Hot keys: records the keys of a sampled command, and asks `queue` for the size of a
    /// single-key read's reply (the big replies) when `probe` (not inside MULTI). `now`: when
    /// the command was read.
    #[cold]
    #[inline(never)]
    pub(crate) fn sample(
        &self,
        spec: &crate::command::CommandSpec,
        req: &crate::resp::request::Request<'_>,
        queue: &crate::queue::ReplyQueue,
        now: Instant,
        probe: bool,
    ) {
        use crate::command::{BeginSearch, FindKeys, KeySpec, flags};
        let mut at = Vec::new();
        let one = [1];
        let at: &[usize] = match spec.key_specs {
            // The common shape (GET, SET, HGET …): one key, the first argument.
            [
                KeySpec {
                    begin: BeginSearch::Index(1),
                    find: FindKeys::Range { lastkey: 0, .. },
                    ..
                },
            ] if req.argc() > 1 => &one,
            _ => {
                let indices = |i| req.arg(i);
                if crate::command::keys::key_indices(spec, req.argc(), indices, &mut at).is_err() {
                    return;
                }
                &at
            }
        };
        let live = self.live();
        let shard = |key: &[u8]| live.shards[live.slot_map.shard_of(key)];
        let write = spec.has(flags::WRITE);
        let weight = self.hot.weight();
        if let [i] = at[..] {
            let key = req.arg(i);
            let to = shard(key);
            self.hot
                .book
                .record(now, weight, write, [(key, to)].into_iter());
            // (A blocking read may answer much later, in a window gone by.)
            if probe && spec.has(flags::READONLY) && !spec.has(flags::BLOCKING) {
                let probe = crate::queue::Probe {
                    key: crate::hotkeys::SmallKey::new(key),
                    shard: to,
                    at: now,
                };
                queue.probe(queue.next_seq(), probe, &self.hot.book);
            }
        } else {
            let keys = at.iter().map(|&i| (req.arg(i), shard(req.arg(i))));
            self.hot.book.record(now, weight, write, keys);
        }
    }

    /// The settings in force on this worker. Never hold the borrow across an await: a
    /// reload replaces them between two turns of the worker's tasks.
    #[inline]
    pub fn live(&self) -> std::cell::Ref<'_, Arc<Settings>> {
        self.live.borrow()
    }

    /// This worker's connections to the shards of the layout in force. Never hold the borrow
    /// across an await.
    #[inline]
    pub fn pools(&self) -> std::cell::Ref<'_, Rc<Pools>> {
        self.pools.borrow()
    }

    /// This worker's pool of dedicated connections (transactions, blocking commands).
    #[inline]
    pub fn dedicated(&self) -> Rc<DedicatedPool> {
        self.dedicated.borrow().clone()
    }

    /// Takes up the settings of the last reload; every session of this worker is flagged and
    /// re-reads its user and limits before its next command. A new shard layout (static mode) gets new
    /// pools: connections to shards that stay are kept, new shards are connected, and
    /// connections to removed shards drain (their requests in flight are answered) and close.
    pub fn refresh(&self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let new = self.shared.live();
        let (same_shards, same_slots) = {
            let old = self.live();
            (new.shards == old.shards, new.slot_map == old.slot_map)
        };
        if !(same_shards && same_slots) {
            self.layout.set(self.layout.get() + 1);
        }
        if !same_shards {
            let configs = upstream_configs(&self.shared, &new);
            let (pools, removed) = self.pools().relayout(configs.clone());
            *self.pools.borrow_mut() = Rc::new(pools);
            let dedicated =
                DedicatedPool::new(&configs, self.shared.settings.max_dedicated_per_shard);
            *self.dedicated.borrow_mut() = dedicated;
            let within = self.shared.settings.op_timeout * 2;
            for up in removed {
                tokio::task::spawn_local(up.retire(within));
            }
        }
        self.has_rules.set(!new.readthrough.is_empty());
        let relayout = !(same_shards && same_slots);
        *self.live.borrow_mut() = new;
        if relayout {
            self.tracker.relayout(&self.primaries());
        }
        self.reloads.send_replace(generation);
    }

    /// The primaries of the layout in force, with how to reach each (their writes are what
    /// tracking clients are told of).
    pub fn primaries(&self) -> Vec<(std::net::SocketAddr, UpstreamConfig)> {
        let n = self.live().slot_map.shard_count();
        let pools = self.pools();
        let all = pools.configs();
        all[..n.min(all.len())].to_vec()
    }

    /// Sends one request of the proxy's own to `shard` and waits for its reply (read-through
    /// stores, INFO probes). Uses the same pipelined connections as clients.
    pub async fn request(&self, shard: usize, raw: &[u8]) -> bytes::Bytes {
        let up = self.pools().get(crate::resp::Proto::Resp2, shard, 0);
        up.request(raw).await
    }

    /// Once a second: publish counters, per-shard in-flight depth, and (worker 0) sweep the
    /// read-through tables.
    pub(crate) async fn tick(self: Rc<Self>) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            let c = self.commands.replace(0);
            self.shared
                .stats
                .commands_processed
                .fetch_add(c, Ordering::Relaxed);
            self.metrics.publish(&self.shared.command_totals);
            let pending = self.pools().pending_per_shard();
            let shards = self.live().shards.clone();
            if let Ok(mut mine) = self.shared.inflight[self.id].lock() {
                *mine = shards.into_iter().zip(pending).collect();
            }
            if self.id == 0 {
                self.shared.readthrough.sweep();
                if let Some(h) = &self.shared.prometheus {
                    h.run_upkeep();
                }
            }
        }
    }

    /// Counts processed commands; `tick` publishes them to the shared counter once a second,
    /// which keeps atomics off the per-request path.
    #[inline]
    pub fn count_commands(&self, n: u64) {
        self.commands.set(self.commands.get() + n);
    }
}

impl crate::readthrough::Context for Worker {
    fn readthrough(&self) -> &ReadThrough {
        &self.shared.readthrough
    }

    fn rules(&self) -> Arc<crate::readthrough::Rules> {
        self.live().readthrough.clone()
    }

    fn origin(&self) -> &OriginClient {
        &self.origin
    }

    fn request_for_key<'a>(
        &'a self,
        key: &[u8],
        cmd: &'a [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bytes::Bytes> + 'a>> {
        let shard = self.live().slot_map.shard_of(key);
        Box::pin(self.request(shard, cmd))
    }
}
