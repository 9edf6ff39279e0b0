//! The process: one acceptor, N workers.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime with its own upstream
//! connections to every shard ([`Pools`]). The acceptor hands each new client connection to the
//! next worker, round-robin, and from then on every request of that client is read, routed,
//! forwarded and answered on that one thread: no lock, no cross-thread hop on the hot path
//! (Envoy's model). What workers share is read-mostly: [`Shared`] (settings, slot map) and a
//! few counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::shard::{Pools, UpstreamConfig};

/// State shared by every worker. Cloning the `Arc` is the only cost of access.
pub struct Shared {
    pub settings: Settings,
    pub started: Instant,
    pub started_wall: SystemTime,
    /// The shards' `redis_version`, learned from the first INFO that reaches a shard.
    pub redis_version: OnceLock<String>,
    pub next_client_id: AtomicU64,
    pub stats: Stats,
    /// Client sessions, for CLIENT LIST. Touched on connect/disconnect and by CLIENT SETNAME.
    pub clients: Mutex<HashMap<u64, ClientInfo>>,
    /// The plain listener's bound address (known after bind).
    pub listen_addr: OnceLock<SocketAddr>,
}

/// Process-wide counters (relaxed atomics; each is written by many workers only rarely, or is
/// per-connection rather than per-request).
#[derive(Default)]
pub struct Stats {
    pub connections_received: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub commands_processed: AtomicU64,
}

/// What CLIENT LIST shows of a session.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    pub name: String,
    pub resp: u8,
    pub worker: usize,
}

impl Shared {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Shared {
            settings,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            redis_version: OnceLock::new(),
            next_client_id: AtomicU64::new(1),
            stats: Stats::default(),
            clients: Mutex::new(HashMap::new()),
            listen_addr: OnceLock::new(),
        })
    }

    pub fn connected_clients(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// One worker thread's state: the shared settings plus its own shard connections.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub pools: Pools,
    /// Commands processed by this worker, flushed into `Stats` now and then.
    pub commands: std::cell::Cell<u64>,
}

impl Worker {
    fn start(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        let s = &shared.settings;
        let cfg = UpstreamConfig {
            op_timeout: s.op_timeout,
            max_inflight: s.max_inflight_per_connection,
        };
        let pools = Pools::start(&s.shards, s.upstream_connections, cfg);
        Rc::new(Worker {
            id,
            shared,
            pools,
            commands: std::cell::Cell::new(0),
        })
    }

    /// Counts processed commands; publishes to the shared counter every 256 to keep atomics
    /// off the per-request path.
    #[inline]
    pub fn count_commands(&self, n: u64) {
        let c = self.commands.get() + n;
        if c >= 256 {
            self.shared
                .stats
                .commands_processed
                .fetch_add(c, Ordering::Relaxed);
            self.commands.set(0);
        } else {
            self.commands.set(c);
        }
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("no listener configured (listen = \"none\")")]
    NoListener,
}

/// Runs the proxy until SIGINT/SIGTERM.
pub fn run(settings: Settings) -> Result<(), StartError> {
    let listen = settings.listen.ok_or(StartError::NoListener)?;
    let workers = settings.workers;
    let shared = Shared::new(settings);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let listener = rt
        .block_on(async { tokio::net::TcpListener::bind(listen).await })
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(listen);
    let _ = shared.listen_addr.set(bound);

    let mut senders = Vec::with_capacity(workers);
    for id in 0..workers {
        let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        senders.push(tx);
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("slotgate-worker-{id}"))
            .spawn(move || worker_main(id, shared, rx))
            .map_err(StartError::Runtime)?;
    }
    tracing::info!(
        %bound,
        workers,
        shards = shared.settings.shards.len(),
        "slotgate listening"
    );

    rt.block_on(async move {
        let mut next = 0usize;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("shutting down");
                    return Ok(());
                }
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        shared.stats.connections_received.fetch_add(1, Ordering::Relaxed);
                        let Ok(std_stream) = stream.into_std() else { continue };
                        let _ = senders[next % workers].send(std_stream);
                        next = next.wrapping_add(1);
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        }
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn worker_main(
    id: usize,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<std::net::TcpStream>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("worker {id}: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let worker = Worker::start(id, shared);
        if id == 0 {
            tokio::task::spawn_local(learn_redis_version(worker.clone()));
        }
        while let Some(std_stream) = rx.recv().await {
            if std_stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
                continue;
            };
            tokio::task::spawn_local(crate::session::run(stream, worker.clone()));
        }
    });
}

/// Asks a shard for its `redis_version` (reported by HELLO and INFO) until one answers.
async fn learn_redis_version(worker: Rc<Worker>) {
    use crate::queue::{ReplyQueue, Slot, Target};
    let shards = worker.shared.settings.shards.len();
    for attempt in 0usize.. {
        let queue = ReplyQueue::new();
        let seq = queue.push_waiting(Slot::Waiting);
        let up = worker
            .pools
            .get(crate::resp::Proto::Resp2, attempt % shards, 0);
        let target = Target::Client {
            queue: queue.clone(),
            seq,
            part: 0,
        };
        up.send(
            b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n",
            target,
            tokio::time::Instant::now(),
        );
        queue.notify.notified().await;
        let mut out = bytes::BytesMut::new();
        queue.drain_ready(&mut out);
        let text = String::from_utf8_lossy(&out);
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("redis_version:")) {
            let _ = worker.shared.redis_version.set(v.trim().to_string());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
