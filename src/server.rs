//! The process: one acceptor, N workers.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime with its own upstream
//! connections to every shard ([`crate::shard::Pools`]). The acceptor hands each new client connection to the
//! next worker, round-robin, and from then on every request of that client is read, routed,
//! forwarded and answered on that one thread: no lock, no cross-thread hop on the hot path
//! (Envoy's model). What workers share is read-mostly: [`Shared`] (settings, slot map) and a
//! few counters.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::tls::ReloadableCert;
pub use crate::worker::{ClientInfo, Shared, Stats, Worker};
use metrics_exporter_prometheus::PrometheusHandle;

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
    #[error("cluster: {0}")]
    Cluster(String),
}

/// A connection accepted by the acceptor, for a worker.
pub enum Incoming {
    Plain(std::net::TcpStream),
    Tls(std::net::TcpStream),
    /// New settings were published (a reload): take them up, then acknowledge.
    Reload(tokio::sync::oneshot::Sender<()>),
}

/// Raises the soft limit on open files to what `maxclients` needs, as Redis does at start-up
/// (a default soft limit of 1024 would refuse connections long before `maxclients`): one per
/// client, each worker's shard connections (shared and dedicated) and a reserve. Subscriber
/// connections come on top, so the soft limit goes up to twice that when the hard limit
/// allows; a warning is logged only when even the first figure is out of reach.
fn raise_fd_limit(settings: &Settings) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let per_worker = settings.shards.len()
        * (settings.upstream_connections + settings.max_dedicated_per_shard + 2);
    let need = (settings.maxclients + settings.workers * per_worker + 64) as u64;
    let want = need + settings.maxclients as u64;
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if current >= want {
        return;
    }
    let target = lim.maximum.map_or(want, |max| max.min(want));
    if target > current {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        );
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < need {
        tracing::warn!(
            "maxclients {} needs about {need} open files, but the limit is {now} \
             (raise `ulimit -n`); connections beyond it will be refused",
            settings.maxclients
        );
    }
}

/// Runs the proxy until SIGINT/SIGTERM, then drains it (see `drain`).
pub fn run(
    settings: Settings,
    prometheus: Option<PrometheusHandle>,
    reloader: crate::reload::Reloader,
) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    // Before anything else: a SIGHUP (a reload, or a closed terminal) must never end the
    // process, whatever else is configured.
    let hup = {
        let _entered = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    };
    // Cluster mode: the layout is the cluster's, read before the workers start.
    let settings = rt
        .block_on(crate::cluster::start(settings))
        .map_err(StartError::Cluster)?;
    let workers = settings.workers;
    raise_fd_limit(&settings);
    let shared = Shared::new(settings, prometheus);

    let backlog = shared.settings.tcp_backlog;
    warn_somaxconn(backlog);
    let bind = |addr: SocketAddr| {
        let _entered = rt.enter();
        listen(addr, backlog).map_err(|source| StartError::Bind { addr, source })
    };
    let plain = match shared.settings.listen {
        Some(a) => Some(bind(a)?),
        None => None,
    };
    let tls = match &shared.settings.tls {
        Some(t) => Some(bind(t.listen)?),
        None => None,
    };
    if plain.is_none() && tls.is_none() {
        return Err(StartError::NoListener);
    }
    let admin = match shared.settings.admin_listen {
        Some(a) => Some(bind(a)?),
        None => None,
    };
    if let Some(a) = plain.as_ref().and_then(|l| l.local_addr().ok()) {
        let _ = shared.listen_addr.set(a);
    }

    let mut senders = Vec::with_capacity(workers);
    for id in 0..workers {
        let (tx, rx) = mpsc::unbounded_channel::<Incoming>();
        senders.push(tx);
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("slotgate-worker-{id}"))
            .spawn(move || worker_main(id, shared, rx))
            .map_err(StartError::Runtime)?;
    }
    tracing::info!(
        plain = ?plain.as_ref().and_then(|l| l.local_addr().ok()),
        tls = ?tls.as_ref().and_then(|l| l.local_addr().ok()),
        workers,
        shards = shared.settings.shards.len(),
        "slotgate listening"
    );

    rt.block_on(async move {
        // Token issuers' keys from a URL, before the first client (bounded; retried later).
        let tokens = shared.live().tokens.clone();
        tokens.start().await;
        if let Some(l) = admin {
            tokio::spawn(crate::admin::serve(l, shared.clone()));
        }
        if let Some(t) = &shared.settings.tls {
            if let Some(fp) = &t.cert.self_signed_fingerprint {
                tracing::warn!(
                    "TLS: self-signed certificate for localhost/127.0.0.1 (development only), \
                     SHA-256 fingerprint {fp}"
                );
            }
            tokio::spawn(reload_certificates(t.cert.clone()));
        }
        // Installed before anything else can arrive: a SIGHUP must never end the process.
        let (layouts, new_layouts) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(crate::cluster::keep_fresh(shared.clone(), layouts));
        tokio::spawn(crate::readthrough::invalidate::listen(shared.clone()));
        if let Some(api) = &shared.settings.cluster_api {
            tokio::spawn(crate::cluster_api::watch_peers(api.clone()));
        }
        let reloads =
            crate::reload::serve(shared.clone(), reloader, senders.clone(), hup, new_layouts);
        tokio::spawn(reloads);
        let mut signals = StopSignals::new();
        accept_until_stopped(&shared, &plain, &tls, &senders, &mut signals).await;
        // No new connections from here on: the listeners close.
        drop((plain, tls));
        drain(&shared, &mut signals).await;
        Ok(())
    })
}

/// Hands each accepted connection to the next worker, round robin, until a stop signal.
async fn accept_until_stopped(
    shared: &Shared,
    plain: &Option<tokio::net::TcpListener>,
    tls: &Option<tokio::net::TcpListener>,
    senders: &[mpsc::UnboundedSender<Incoming>],
    signals: &mut StopSignals,
) {
    let mut next = 0usize;
    loop {
        let (accepted, is_tls) = tokio::select! {
            _ = signals.next() => break,
            r = accept(plain) => (r, false),
            r = accept(tls) => (r, true),
        };
        match accepted {
            Ok(stream) => {
                shared
                    .stats
                    .connections_received
                    .fetch_add(1, Ordering::Relaxed);
                let Ok(std_stream) = stream.into_std() else {
                    continue;
                };
                let incoming = if is_tls {
                    Incoming::Tls(std_stream)
                } else {
                    Incoming::Plain(std_stream)
                };
                let _ = senders[next % senders.len()].send(incoming);
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

/// A graceful shutdown, after SIGTERM/SIGINT: every session reads nothing more, answers
/// what it has read (also requests waiting on a slow shard or origin), then closes; idle
/// clients close at once. Returns when every client is gone, after `shutdown_timeout`, or
/// at a second signal. Read-through fills still in flight then are abandoned with the
/// process: nothing is stored after it has ended.
async fn drain(shared: &Shared, signals: &mut StopSignals) {
    let timeout = shared.live().shutdown_timeout;
    let clients = || shared.connected.load(Ordering::Relaxed);
    tracing::info!(
        "shutting down: not accepting; draining {} client(s) for at most {timeout:?}",
        clients()
    );
    shared.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(10));
    while clients() > 0 {
        tokio::select! {
            _ = signals.next() => {
                tracing::warn!("second signal: exiting with {} client(s) connected", clients());
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    "shutdown_timeout ({timeout:?}) reached: exiting with {} client(s) connected",
                    clients()
                );
                return;
            }
            _ = poll.tick() => {}
        }
    }
    tracing::info!("drained: every client answered; exiting");
}

/// A listening socket with Redis's options: address reuse (a restart binds at once) and an
/// accept queue of `backlog` (tokio's default of 1024 is not configurable, and Redis uses 511).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Warns, as Redis does, when the kernel caps the accept queue below `tcp_backlog`.
fn warn_somaxconn(backlog: u32) {
    let max = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(max) = max.filter(|&m| m < backlog) {
        tracing::warn!(
            "the TCP backlog setting of {backlog} cannot be enforced because \
             /proc/sys/net/core/somaxconn is set to the lower value of {max}"
        );
    }
}

/// Accepts on `listener`, or never when there is none.
async fn accept(
    listener: &Option<tokio::net::TcpListener>,
) -> std::io::Result<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Reloads the TLS certificate on SIGHUP and when its files change (checked every 2 s).
/// A broken new file is logged and the old certificate stays in use.
async fn reload_certificates(cert: Arc<ReloadableCert>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Some((cert_path, key_path)) = cert.files() else {
        return;
    };
    let mtimes = || {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&cert_path), m(&key_path))
    };
    let mut seen = mtimes();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        let why = tokio::select! {
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                let now = mtimes();
                if now == seen {
                    continue;
                }
                seen = now;
                "certificate files changed"
            }
        };
        match cert.reload() {
            Ok(()) => tracing::info!("TLS certificate reloaded ({why})"),
            Err(e) => {
                tracing::error!("TLS certificate reload failed ({why}), keeping the old one: {e}")
            }
        }
    }
}

/// SIGTERM and SIGINT, listened to once for the whole run: a second signal sent right after
/// the first is not lost between the two waits.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = one(&mut self.term) => {}
            _ = one(&mut self.int) => {}
        }
    }
}

fn worker_main(id: usize, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Incoming>) {
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
        let ring = (shared.settings.io == crate::settings::Io::Uring)
            .then(start_ring)
            .flatten();
        let worker = Worker::start(id, shared);
        if id == 0 {
            tokio::task::spawn_local(learn_redis_version(worker.clone()));
            let (jobs, todo) = tokio::sync::mpsc::unbounded_channel();
            let _ = worker.shared.invalidations.set(jobs);
            tokio::task::spawn_local(crate::readthrough::invalidate::serve_jobs(
                worker.clone(),
                todo,
            ));
        }
        tokio::task::spawn_local(worker.clone().tick());
        if worker.shared.settings.cluster.is_some() {
            tokio::task::spawn_local(crate::cluster::redirector(worker.clone()));
        }
        let tls = worker
            .shared
            .settings
            .tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.config.clone()));
        while let Some(incoming) = rx.recv().await {
            let (std_stream, acceptor) = match incoming {
                Incoming::Plain(s) => (s, None),
                Incoming::Tls(s) => (s, tls.clone()),
                Incoming::Reload(ack) => {
                    worker.refresh();
                    let _ = ack.send(());
                    continue;
                }
            };
            if let (Some(ring), None) = (&ring, &acceptor) {
                let session = crate::session::run_on_ring(std_stream, ring.clone(), worker.clone());
                tokio::task::spawn_local(session);
                continue;
            }
            if std_stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
                continue;
            };
            tokio::task::spawn_local(crate::session::run(stream, worker.clone(), acceptor));
        }
    });
}

/// The io_uring path (`--io uring`): this worker's ring, or `None` (logged once for the
/// process) where the kernel refuses it, and the worker uses epoll.
fn start_ring() -> Option<crate::uring::Driver> {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    match crate::uring::Driver::start() {
        Ok(ring) => {
            LOGGED.call_once(|| tracing::info!("socket I/O: io_uring, one ring per worker"));
            Some(ring)
        }
        Err(e) => {
            LOGGED.call_once(|| {
                tracing::warn!("io_uring is not available ({e}): using epoll (--io epoll)")
            });
            None
        }
    }
}

/// Asks a shard for its `redis_version` (reported by HELLO and INFO) until one answers.
async fn learn_redis_version(worker: Rc<Worker>) {
    let shards = worker.shared.settings.shards.len();
    for attempt in 0usize.. {
        let reply = worker
            .request(attempt % shards, b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            .await;
        let text = String::from_utf8_lossy(&reply);
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("redis_version:")) {
            let _ = worker.shared.redis_version.set(v.trim().to_string());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
