//! One client connection: read a burst, parse every complete command, route each one, and
//! write every ready reply in request order with one syscall.
//!
//! Routing is by the command table's [`Route`](crate::command::Route): local answers go straight into the reply
//! queue; single-slot commands are forwarded as their raw bytes to the owning shard's
//! connection; scatter and all-shard commands become a [`Gather`](crate::fanout::Gather). Back-pressure: at most
//! `max_client_pipeline` commands in flight per client; beyond that the session stops reading
//! until replies drain, so a client that pipelines without reading costs bounded memory.

/// The narrow context of a session's handlers ([`Cx`]), built from its fields so that it
/// borrows only them: `let cx = cx!(self); self.subs.change(&cx, …)`.
macro_rules! cx {
    ($s:expr) => {
        crate::session::Cx {
            w: &$s.w,
            queue: &$s.queue,
            proto: $s.proto,
            cmd: $s.cmd,
            id: $s.id,
            addr: $s.addr,
        }
    };
}

/// A [`Fwd`] built from the session's fields, borrowing only them.
macro_rules! fwd {
    ($s:expr) => {
        crate::session::cx::Fwd {
            cx: cx!($s),
            conn: $s.conn,
            tracking: $s.tracking.as_ref(),
            keys: &mut $s.keys,
        }
    };
}

mod all_shards;
mod conn;
pub mod control;
mod cx;
mod dispatch;
pub mod follow;
mod hotkeys;
mod info;
pub mod local;
pub mod login;
pub mod pinned;
pub mod pubsub;
mod readthrough;
pub(crate) mod scatter;
mod send;
mod single;
mod state;
pub mod tracking;

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::command::CommandSpec;
use crate::netio::{PlainRead, PlainWrite, ReadSide, WriteSide};
use crate::queue::{Attention, ReplyQueue};
use crate::resp::reply::{self, Proto};
use crate::resp::{Limits, Parsed, RequestParser};
use crate::worker::{Shared, Worker};
pub(crate) use cx::Cx;

/// What ended a session's wait.
enum Wake {
    Queue,
    /// The socket took some of what was waiting to be written (or a TLS flush completed).
    Wrote,
    WriteFailed,
    Read(std::io::Result<usize>),
    Idle,
}

/// Reads with input in a row after which a session yields to the worker's other tasks.
const READS_BEFORE_YIELD: u32 = 32;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Write buffers larger than this are released after use instead of kept for reuse.
const KEEP_BUF: usize = 1024 * 1024;
/// Most bytes of replies copied into the write scratch for one write.
const WRITE_CHUNK: usize = 1024 * 1024;
/// Bytes a session writes in one turn before it lets the worker's other tasks run.
const TURN_WRITE_MAX: usize = 8 * WRITE_CHUNK;
/// Allocation step of a worker's shared read buffer.
const SCRATCH: usize = 64 * 1024;

/// The state of one client connection.
pub struct Session {
    pub(crate) w: Rc<Worker>,
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) laddr: SocketAddr,
    pub(crate) created: std::time::Instant,
    /// Which of the per-shard connections this session uses (its requests to one shard stay
    /// on one connection, so they stay in order).
    conn: usize,
    pub(crate) proto: Proto,
    pub(crate) name: Option<String>,
    pub(crate) queue: Rc<ReplyQueue>,
    /// Reused buffer of key argument indices.
    keys: Vec<usize>,
    /// Reused buffer of key indices with the access each needs (permission checks).
    access: Vec<(usize, u8)>,
    /// Who the client is: its user and how it logged in.
    pub(crate) login: login::Login,
    /// Commands whose latency is being measured: (reply sequence number, start, name).
    sampled: std::collections::VecDeque<(u64, std::time::Instant, &'static CommandSpec)>,
    /// The last top-level command looked up.
    last_command: Option<&'static CommandSpec>,
    /// The command being dispatched (`None` for an unknown one): INFO commandstats counts its
    /// errors.
    pub(crate) cmd: Option<&'static CommandSpec>,
    /// Commands dispatched, for sampling one in `metrics::SAMPLE_EVERY`.
    dispatched: u64,
    /// An open MULTI and WATCHed keys (see `pinned`).
    pub(crate) pinned: crate::session::pinned::Pinned,
    /// The dedicated connection of a blocking command in flight.
    pub(crate) blocked: Option<crate::session::pinned::Blocked>,
    /// Cluster mode: redirected requests of its dedicated connections (see `follow`).
    follows: Option<Rc<crate::session::follow::Follows>>,
    /// A command waiting until nothing is in flight (switching between shared and dedicated
    /// connections keeps the client's order).
    deferred: Option<crate::session::pinned::Deferred>,
    /// Whether the last forwarded command used a dedicated connection.
    on_dedicated: Lane,
    /// Pub/sub subscriptions and their subscriber connections.
    pub(crate) subs: crate::session::pubsub::Subs,
    /// CLIENT KILL from another session.
    pub(crate) kill: Arc<tokio::sync::Notify>,
    /// QUIT or a protocol error: write what is queued, then close.
    pub(crate) closing: bool,
    /// The protocol changed (HELLO/RESET): wait for in-flight replies before the next command,
    /// which may go over a connection of the other protocol.
    pub(crate) barrier: bool,
    max_pipeline: usize,
    /// Whether the client list shows this client as subscribed.
    listed_subscribed: bool,
    /// The worker's shard layout count when this session's pinned state began to count on
    /// it (see `reloaded`).
    layout: u64,
    /// CLIENT REPLY.
    pub(crate) reply_mode: ReplyMode,
    /// The command in `deferred` waits for a CLIENT PAUSE to end.
    pub(crate) held: bool,
    /// MONITOR mode.
    pub(crate) monitor: Option<control::Monitoring>,
    /// Where a blocking command of this client waits (see `pinned::Blocked`).
    pub(crate) blocked_on: Arc<crate::worker::BlockedOn>,
    /// Cluster mode: the worker's layout count this client's requests were last routed by
    /// (see `follow_layout`).
    routed_layout: u64,
    /// CLIENT TRACKING, while on (see `tracking`).
    pub(crate) tracking: Option<Rc<crate::tracking::Client>>,
    /// Invalidations of the clients that redirect theirs to this one.
    pub(crate) mail: Arc<crate::tracking::Mail>,
}

/// CLIENT REPLY ON|OFF|SKIP: whether replies are written. Muted replies are dropped by the
/// reply queue (`ReplyQueue::mute`); the commands still run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ReplyMode {
    On,
    Off,
    /// The next command's reply is dropped, then ON again.
    SkipNext,
}

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one client connection until it closes: plain, or TLS when `tls` is given (the
/// handshake runs here, on the worker, so it never blocks the acceptor).
pub async fn run(stream: TcpStream, w: Rc<Worker>, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let (Ok(addr), Ok(laddr)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    match tls {
        None => {
            let (rd, wr) = (PlainRead(&stream), PlainWrite(&stream));
            serve(rd, wr, w, addr, laddr).await;
        }
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    let (rd, wr) = tokio::io::split(tls_stream);
                    serve(rd, wr, w, addr, laddr).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves one plain client connection on the worker's io_uring ring (`--io uring`); the
/// socket never joins tokio's epoll.
pub async fn run_on_ring(stream: std::net::TcpStream, ring: crate::uring::Driver, w: Rc<Worker>) {
    let _ = stream.set_nodelay(true);
    let (Ok(addr), Ok(laddr)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    // (A socket the ring refuses is closed, as one whose addresses are unknown.)
    if let Ok((rd, wr)) = ring.stream(stream) {
        serve(rd, wr, w, addr, laddr).await;
    }
}

/// Aborts a helper task when its session ends.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Holds one of the `maxclients` places for as long as a session lives.
struct ClientPlace(Arc<Shared>);

impl ClientPlace {
    fn take(shared: &Arc<Shared>, max: usize) -> Option<Self> {
        let prev = shared.connected.fetch_add(1, Ordering::Relaxed);
        if prev >= max {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            shared
                .stats
                .rejected_connections
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ClientPlace(shared.clone()))
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The read/parse/route/write loop of one connection, over any byte stream.
async fn serve<R, W>(rd: R, mut wr: W, w: Rc<Worker>, addr: SocketAddr, laddr: SocketAddr)
where
    R: ReadSide,
    W: WriteSide,
{
    let shared = w.shared.clone();
    let settings = w.live().clone();
    let Some(_place) = ClientPlace::take(&shared, settings.maxclients) else {
        let _ = wr.write_all(reply::MAX_CLIENTS).await;
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
        return;
    };
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let users = &settings.users;
    let mut s = Session {
        conn: id as usize,
        id,
        addr,
        laddr,
        created: std::time::Instant::now(),
        proto: Proto::Resp2,
        name: None,
        queue: ReplyQueue::new(),
        keys: Vec::with_capacity(16),
        access: Vec::new(),
        closing: false,
        barrier: false,
        max_pipeline: settings.max_client_pipeline,
        login: login::Login::default(),
        sampled: std::collections::VecDeque::new(),
        last_command: None,
        cmd: None,
        dispatched: 0,
        pinned: Default::default(),
        blocked: None,
        follows: None,
        deferred: None,
        on_dedicated: Lane::Shared,
        subs: crate::session::pubsub::Subs::default(),
        kill: Arc::new(tokio::sync::Notify::new()),
        listed_subscribed: false,
        layout: w.layout.get(),
        reply_mode: ReplyMode::On,
        held: false,
        monitor: None,
        blocked_on: Arc::default(),
        routed_layout: w.layout.get(),
        tracking: None,
        mail: Arc::default(),
        w,
    };
    if !users.auth_required() {
        s.login.set_user(users.default_user().clone());
    }
    s.queue.set_output_limit(settings.obuf_normal);
    s.queue.set_client(addr);
    s.register();
    // CLIENT KILL comes from any worker thread (tokio's `Notify`). A small task waits for it and
    // flags this session's own queue, so the loop polls nothing thread-safe per turn (polling
    // a `Notified` takes its lock: about 180 instructions per GET in callgrind).
    // A graceful shutdown and a reload taken up by the worker are flagged the same way.
    let _watcher = {
        let (kill, queue, mail) = (s.kill.clone(), s.queue.clone(), s.mail.clone());
        let mut draining = shared.draining.subscribe();
        let mut reloads = s.w.reloads.subscribe();
        let mut resumed = shared.gate.resumed();
        AbortOnDrop(tokio::task::spawn_local(async move {
            let mut drained = false;
            loop {
                tokio::select! {
                    _ = kill.notified() => return queue.mark_killed(),
                    Ok(_) = draining.wait_for(|d| *d), if !drained => {
                        drained = true;
                        queue.flag(Attention::DRAIN);
                    }
                    Ok(()) = reloads.changed() => queue.flag(Attention::RELOAD),
                    Ok(()) = resumed.changed() => queue.flag(Attention::RESUME),
                    _ = mail.notify.notified() => queue.flag(Attention::MAIL),
                }
            }
        }))
    };
    let mut conn = conn::Conn::new(rd, wr, &s).await;
    conn.run(&mut s).await;
}

impl Session {
    fn register(&self) {
        if let Ok(mut c) = self.w.shared.clients.lock() {
            c.insert(self.id, self.info_entry());
        }
    }

    /// Logs why the session is being closed by slotgate (not by its client).
    #[cold]
    fn log_close(&self) {
        let q = &self.queue;
        if q.overflowed() {
            self.w
                .shared
                .stats
                .obuf_closes
                .fetch_add(1, Ordering::Relaxed);
            // Redis logs the same event as "… scheduled to be closed ASAP for overcoming of
            // output buffer limits".
            tracing::warn!(
                client = self.id,
                addr = %self.addr,
                user = self.user_name(),
                output_bytes = q.out_bytes(),
                "closing client for overcoming of output buffer limits"
            );
        } else if q.killed() {
            tracing::debug!(client = self.id, "killed by CLIENT KILL");
        } else if q.sub_lost() {
            tracing::debug!(client = self.id, "a subscriber connection was lost");
        }
    }

    fn unregister(&self) {
        if let Ok(mut c) = self.w.shared.clients.lock() {
            c.remove(&self.id);
        }
    }
}

impl Drop for Session {
    /// Out of CLIENT LIST however the session ends (a panic in a session leaves no ghost
    /// entry behind).
    fn drop(&mut self) {
        self.unregister();
        if let Some(t) = self.tracking.take() {
            self.w.tracker.remove(t.id);
        }
        if let Some(f) = &self.follows {
            // (A redirected transaction in there holds the list: the cycle is broken.)
            f.clear();
        }
    }
}

impl Session {
    /// Updates this session's CLIENT LIST entry after a name, user or protocol change.
    pub(crate) fn update_info(&self) {
        self.register();
    }

    /// After a reload: the session takes up the new client limits and its user's new rules.
    /// A user that no longer exists is closed (as Redis closes the clients of a deleted ACL
    /// user); a client that had not authenticated is let in if the new configuration needs
    /// no password. The connection's own limits are re-read by [`conn::Conn`].
    #[cold]
    pub(crate) fn reloaded(&mut self) {
        let layout = self.w.layout.get();
        if layout != self.layout {
            self.layout = layout;
            // (In cluster mode their node stays, and answers for the slots it still serves:
            // the clients stay.)
            if !self.w.cluster
                && (self.pinned.tx.is_some()
                    || self.pinned.watch.is_some()
                    || self.blocked.is_some()
                    || self.subscribed())
            {
                // Its transaction, watches, blocking command or subscriptions live on a shard
                // that may no longer own their slots: closed, so that the client starts over
                // on the new layout (an EXEC would write where reads no longer look).
                tracing::info!(
                    client = self.id,
                    "closing the client: the shard layout changed under its transaction, \
                     blocking command or subscriptions"
                );
                self.queue.mark_killed();
                return;
            }
        }
        let live = self.w.live().clone();
        self.max_pipeline = live.max_client_pipeline;
        self.update_output_class();
        match &self.login.user {
            Some(user) => match live.users.get(user.name.as_bytes()) {
                Some(new) => {
                    let new = new.clone();
                    self.login.set_user(new);
                    tracking::sync_user(&self.tracking, &self.login);
                }
                None => {
                    tracing::info!(
                        client = self.id,
                        user = %user.name,
                        "closing the client: its user was removed by a reload"
                    );
                    self.queue.mark_killed();
                }
            },
            None if !live.users.auth_required() => {
                self.login.set_user(live.users.default_user().clone());
            }
            None => {}
        }
        self.update_info();
    }

    /// The command after CLIENT REPLY SKIP is dispatched with its replies muted ...
    #[cold]
    fn begin_skip(&mut self) {
        self.reply_mode = ReplyMode::On;
        self.queue.mute(self.queue.next_seq());
    }

    /// ... then replies are on again (unless it switched them itself: OFF keeps them muted,
    /// ON has unmuted).
    #[cold]
    fn end_skip(&mut self) {
        if self.reply_mode == ReplyMode::On {
            self.queue.unmute(self.queue.next_seq());
        }
    }

    /// The command after CLIENT REPLY SKIP was held back (it waits for replies in flight or
    /// for a CLIENT PAUSE): its reply is muted when it runs.
    #[cold]
    fn skip_deferred(&mut self) {
        if let Some(d) = self.deferred.as_mut() {
            d.skip = true;
        }
    }

    /// Parses and dispatches every complete command in `buf`, within the pipeline bound.
    /// Returns how many bytes at the front of `buf` are done with, and whether it stopped at
    /// the bound with bytes still buffered.
    fn process(
        &mut self,
        parser: &mut RequestParser,
        buf: &[u8],
        limits: &Limits,
    ) -> (usize, bool) {
        let now = Instant::now();
        let mut n = 0;
        let mut used = 0;
        let mut bounded = false;
        if self.w.cluster {
            self.follow_layout();
        }
        loop {
            if self.closing {
                break;
            }
            if !self.queue.has_room(self.max_pipeline) {
                bounded = used < buf.len();
                break;
            }
            if self.queue.waiting() == 0
                && let Some(done) = self.blocked.take()
            {
                // The blocking command returned: its connection is clean again.
                done.release();
            }
            if self.barrier {
                if self.queue.waiting() > 0 {
                    break;
                }
                self.barrier = false;
            }
            if let Some(d) = self.deferred.take() {
                if self.queue.waiting() > 0 || (self.held && self.pause_holds()) {
                    self.deferred = Some(d);
                    break;
                }
                self.held = false;
                if d.skip {
                    self.begin_skip();
                }
                self.dispatch(&d.request(), now);
                if d.skip {
                    self.end_skip();
                    self.skip_deferred();
                }
                continue;
            }
            if used == buf.len() {
                // Everything is parsed (the parser keeps no partial state then).
                break;
            }
            match parser.parse(&buf[used..], limits, self.login.user.is_some()) {
                Ok(Parsed::Command { req, used: u }) => {
                    n += 1;
                    let skip = self.reply_mode == ReplyMode::SkipNext;
                    if skip {
                        self.begin_skip();
                    }
                    self.dispatch(&req, now);
                    if skip {
                        self.end_skip();
                        self.skip_deferred();
                    }
                    used += u;
                }
                Ok(Parsed::Incomplete { used: u }) => {
                    used += u;
                    break;
                }
                Err(e) => {
                    let e = reply::error_bytes(&[&e.message()]);
                    // (Counted in errorstats, as Redis counts protocol errors.)
                    crate::metrics::note_error(None, &e, false);
                    self.queue.push_ready(e);
                    self.closing = true;
                    break;
                }
            }
        }
        if n > 0 {
            self.w.count_commands(n);
        }
        (used, bounded)
    }

    /// Appends a reply that is ready now (an error counts as the command's failure).
    #[inline]
    pub(crate) fn reply(&self, b: Bytes) {
        cx!(self).reply(b);
    }

    #[inline]
    pub(crate) fn reply_static(&self, b: &'static [u8]) {
        self.reply(Bytes::from_static(b));
    }

    /// Records the latency of sampled commands whose replies are now written.
    fn record_latencies(&mut self) {
        let base = self.queue.base();
        while let Some(&(seq, start, spec)) = self.sampled.front() {
            if seq >= base {
                break;
            }
            let took = start.elapsed();
            let name = spec.name;
            metrics::histogram!(crate::metrics::COMMAND_DURATION, "command" => name)
                .record(took.as_secs_f64());
            self.w.class_latency[spec.route.class_index()].record(took.as_secs_f64());
            self.w.metrics.sampled(name, took);
            self.sampled.pop_front();
        }
    }

    /// The authenticated user's name (`default` before AUTH, as Redis shows it).
    pub(crate) fn user_name(&self) -> &str {
        self.login.user_name()
    }

    pub(crate) fn subscribed(&self) -> bool {
        self.subs.active()
    }

    /// A client with subscriptions gets the `pubsub` output buffer limit, as in Redis.
    /// (The client list notes whether the client has subscriptions.)
    pub(crate) fn update_output_class(&mut self) {
        let subscribed = self.subscribed();
        {
            let settings = self.w.live();
            // (A monitor has the pub/sub class's limits too: it receives a stream it did not
            // ask for line by line.)
            self.queue
                .set_output_limit(if subscribed || self.monitor.is_some() {
                    settings.obuf_pubsub
                } else {
                    settings.obuf_normal
                });
        }
        if subscribed != self.listed_subscribed {
            self.listed_subscribed = subscribed;
            self.update_info();
        }
    }

    /// Cluster mode: after the cluster's layout changed, this client's next commands wait
    /// for the replies of those sent by the old one. Those may be redirected to the new
    /// owner of their slot, and a later command sent there directly could overtake them (a
    /// pipelined `SET k 1`, `SET k 2` would end as 1). The layout only changes between two
    /// turns of the worker, so once per read is enough.
    #[cold]
    fn follow_layout(&mut self) {
        let layout = self.w.layout.get();
        if layout != self.routed_layout {
            self.routed_layout = layout;
            if self.queue.waiting() > 0 {
                self.barrier = true;
            }
        }
    }
}

/// Which connections a client's commands go to; switching waits until nothing is in flight,
/// so that commands run on the shards in the order they were sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The worker's shared connections.
    Shared,
    /// A dedicated connection (transaction, blocking command, subscriber).
    Dedicated,
    /// The user's mirror connections (scripts of a restricted user).
    Mirror,
}
#[cfg(test)]
mod dispatch_tests;
