//! One client connection: read a burst, parse every complete command, route each one, and
//! write every ready reply in request order with one syscall.
//!
//! Routing is by the command table's [`Route`]: local answers go straight into the reply
//! queue; single-slot commands are forwarded as their raw bytes to the owning shard's
//! connection; scatter and all-shard commands become a [`Gather`]. Back-pressure: at most
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

mod conn;
pub mod control;
mod cx;
pub mod follow;
mod hotkeys;
pub mod local;
pub mod login;
pub mod pinned;
pub mod pubsub;
pub mod tracking;

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::readthrough::{self, PendingGet, PendingMget, Rule};

use crate::command::policy::{
    config_set_refused, has_block_option, parse_cursor, refused_arguments,
};
use crate::command::{
    self, BeginSearch, CommandSpec, FindKeys, KeySpec, Merge, Route, flags, keys,
};
use crate::fanout::{Gather, GatherKind};
use crate::netio::{PlainRead, PlainWrite, ReadSide, WriteSide};
use crate::queue::{Attention, ReplyQueue, SinkRef, Slot, Target};
use crate::resp::reply::{self, Proto};
use crate::resp::request::push_header;
use crate::resp::{Limits, Parsed, Request, RequestParser};
use crate::router;
use crate::settings::ReadFrom;
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

    /// Looks the command up, checks arity and routes it.
    fn dispatch(&mut self, req: &Request<'_>, now: Instant) {
        let spec = match self.check(req) {
            Ok(spec) => spec,
            Err(e) => {
                // A queuing error inside MULTI makes EXEC fail, as in Redis.
                self.pinned.flag_tx();
                crate::metrics::note_error(self.cmd.map(|c| c.name), &e, true);
                return self.queue.push_ready(e);
            }
        };
        // CLIENT PAUSE and MONITOR: one load while neither is in use.
        let gate = self.w.shared.gate.bits();
        if gate != 0 && self.gated(spec, req) {
            return;
        }
        // Switching between shared and dedicated connections waits for what is in flight, and
        // so does anything after a blocking command (the connection is "blocked", as in Redis).
        let dedicated = if self.login.restricted && self.pinned.tx.is_none() && spec.runs_script() {
            Lane::Mirror
        } else if self.pinned.wants_dedicated(spec, req) {
            Lane::Dedicated
        } else {
            Lane::Shared
        };
        // RESET closes dedicated connections: their replies in flight must arrive first.
        let resets_pinned = command::policy::resets_connection(spec.name)
            && (self.pinned.tx.is_some() || self.pinned.watch.is_some() || self.subscribed());
        if dedicated != self.on_dedicated
            || self.blocked.is_some()
            || resets_pinned
            || self.pinned.exec_waits(self.w.cluster, spec)
        {
            if self.queue.waiting() > 0 {
                self.deferred = Some(crate::session::pinned::Deferred::from(req));
                return;
            }
            self.on_dedicated = dedicated;
        }
        self.w.metrics.command(spec.name);
        if self.w.hot.tick() {
            // (Inside MULTI the reply is +QUEUED: no size to learn.)
            let probe = self.pinned.tx.is_none();
            self.w.sample(spec, req, &self.queue, now.into_std(), probe);
        }
        if gate & crate::gate::Gate::MONITOR != 0 {
            self.feed_monitors(spec, req);
        }
        self.dispatched += 1;
        if self.dispatched.is_multiple_of(crate::metrics::SAMPLE_EVERY) {
            let seq = self.queue.next_seq();
            self.sampled
                .push_back((seq, std::time::Instant::now(), spec));
        }
        if spec.may_write_keys() && self.w.has_rules.get() {
            self.note_writes(spec, req);
        }
        if let Some(t) = &self.tracking {
            if t.is_active() {
                let in_multi = self.pinned.tx.is_some();
                self.w.tracker.command(t, spec, req, in_multi);
            } else {
                self.tracking = None;
            }
        }
        if self.pinned.tx.is_some()
            && spec.route != Route::Transaction
            && !command::policy::ends_connection_state(spec.name)
        {
            if self.login.restricted && spec.runs_script() {
                self.pinned.flag_tx();
                return self.reply_static(reply::NOPERM_SCRIPT_IN_MULTI);
            }
            return self.tx_queue(spec, req, now);
        }
        if self.proto == Proto::Resp2 && self.subscribed() {
            if !crate::session::pubsub::allowed_while_subscribed(spec.name) {
                // Refused before running, as Redis counts it: a rejected call.
                self.w.metrics.uncount(spec.name);
                let e = reply::not_while_subscribed(spec.name);
                crate::metrics::note_error(Some(spec.name), &e, true);
                return self.queue.push_ready(e);
            }
            if command::policy::is_ping(spec.name) {
                return crate::session::pubsub::subscribed_ping(&cx!(self), req);
            }
        }
        if dedicated == Lane::Mirror {
            return self.script_as_user(spec, req, now);
        }
        match spec.route {
            Route::PubSub => self.pubsub(spec, req, now),
            Route::Transaction => self.transaction(spec, req, now),
            Route::Blocking => self.blocking(spec, req, now),
            Route::Single => self.single(spec, req, now),
            Route::Local => self.local(spec, req, now),
            Route::AnyShard => self.forward(0, req.raw, now),
            Route::Scatter(m) => self.scatter(spec, req, m, now),
            Route::AllShards(m) => self.all_shards(spec, req, m, now),
            Route::Refused => self.reply(reply::not_allowed(spec.name)),
            Route::NotYet => self.reply(reply::not_yet(spec.name)),
        }
    }

    /// Looks the command up and checks arity, authentication and permissions: the command's
    /// row, or the error reply.
    fn check(&mut self, req: &Request<'_>) -> Result<&'static CommandSpec, Bytes> {
        let name = req.arg(0);
        let mut spec = match self.last_command {
            // Clients mostly repeat a few commands: one short comparison instead of a lookup.
            Some(last)
                if last.name.len() == name.len()
                    && last.name.as_bytes().eq_ignore_ascii_case(name) =>
            {
                last
            }
            _ => {
                let Some(spec) = command::lookup(name) else {
                    self.cmd = None;
                    let mut args = (1..req.argc()).map(|i| req.arg(i));
                    return Err(reply::unknown_command(name, &mut args));
                };
                self.last_command = Some(spec);
                spec
            }
        };
        // A container takes a subcommand, except where its own arity allows none (bare
        // `COMMAND`, which answers the whole table).
        if spec.is_container() && !(req.argc() == 1 && spec.arity_ok(1)) {
            if req.argc() < 2 {
                self.cmd = Some(spec);
                return Err(reply::wrong_arity(spec.name));
            }
            match command::lookup_sub(spec, req.arg(1)) {
                Some(sub) => spec = sub,
                None => {
                    // (No commandstats line, as in Redis; errorstats counts it.)
                    self.cmd = None;
                    return Err(reply::unknown_subcommand(spec.name, req.arg(1)));
                }
            }
        }
        self.cmd = Some(spec);
        if !spec.arity_ok(req.argc()) {
            return Err(reply::wrong_arity(spec.name));
        }
        if self.login.user.is_none() {
            // Before AUTH, nothing reaches a shard (Redis's NOAUTH rule).
            if !command::policy::allowed_before_auth(spec.name) {
                return Err(Bytes::from_static(reply::NOAUTH));
            }
        } else if self.login.restricted {
            self.permitted(spec, req)?;
        }
        Ok(spec)
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

    /// What the session does after a login attempt: registers the new identity, or closes
    /// after too many failures in a row.
    pub(crate) fn after_login(&mut self, verdict: login::Verdict) {
        match verdict {
            login::Verdict::In => {
                self.update_info();
                tracking::sync_user(&self.tracking, &self.login);
            }
            login::Verdict::Refused { close } => self.closing |= close,
        }
    }

    /// The user's command and key permissions for this command: `Err` is the NOPERM reply.
    /// Every key is checked, including each key of a scatter command.
    fn permitted(&mut self, spec: &CommandSpec, req: &Request<'_>) -> Result<(), Bytes> {
        let Some(user) = self.login.user.clone() else {
            return Ok(());
        };
        if !user.may_run(spec) {
            return Err(reply::noperm_command(spec.name));
        }
        if let Some(decided) = crate::auth::special_permission(&user, spec.name, req) {
            return decided.map_err(Bytes::from_static);
        }
        self.access.clear();
        if keys::key_access(spec, req.argc(), |i| req.arg(i), &mut self.access).is_err() {
            // Key positions undeterminable: a restricted user gets no benefit of the doubt.
            return Err(Bytes::from_static(reply::NOPERM_KEYS));
        }
        if self
            .access
            .iter()
            .all(|&(i, need)| user.may_access(req.arg(i), need))
        {
            Ok(())
        } else {
            Err(Bytes::from_static(reply::NOPERM_KEYS))
        }
    }

    /// A script or function of a user with restrictions: to the shard of its keys, over a
    /// connection authenticated as the user's mirror ([`crate::shard::Mirror`]), so that it
    /// runs with the user's rights rather than slotgate's.
    fn script_as_user(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        let shard = match self.slot_of(spec, req) {
            Ok(slot) => slot.map_or(0, |s| self.w.live().slot_map.shard_of_slot(s)),
            Err(()) => return self.reply_static(reply::CROSSSLOT),
        };
        let Some(user) = self.login.user.clone() else {
            return;
        };
        let up = self
            .w
            .pools()
            .as_user(&user, command::refused_in_scripts(), self.proto, shard);
        if self.w.cluster {
            let via = crate::session::follow::Via::Mirror(user);
            return self.send_followed(&up, via, req.raw, now + up.op_timeout());
        }
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        up.send(
            req.raw,
            Target::Client {
                queue: self.queue.clone(),
                seq,
                part: 0,
            },
            now,
        );
    }

    /// A command whose keys must all be in one slot.
    #[inline]
    fn single(&mut self, spec: &'static CommandSpec, req: &Request<'_>, now: Instant) {
        if spec.has(flags::BLOCKING) && has_block_option(req) {
            // XREAD/XREADGROUP … BLOCK: a blocking command.
            return self.blocking(spec, req, now);
        }
        if let Some(e) = refused_arguments(spec.name, req) {
            return self.reply_static(e);
        }
        match self.slot_of(spec, req) {
            Ok(Some(slot)) => {
                let (shard, rule) = {
                    let live = self.w.live();
                    let rules = &live.readthrough;
                    let rule = if rules.is_empty() || spec.name != "get" {
                        None
                    } else {
                        rules.find(req.arg(1)).cloned()
                    };
                    (live.slot_map.shard_of_slot(slot), rule)
                };
                match rule {
                    Some(rule) => self.get_readthrough(shard, rule, req, now),
                    None => self.forward(shard, req.raw, now),
                }
            }
            // No keys, or key positions undeterminable: any shard answers (its own error).
            Ok(None) => self.forward(0, req.raw, now),
            Err(()) => self.reply_static(reply::CROSSSLOT),
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

    /// Cluster mode with reads from replicas: the shard a read of `primary`'s slots goes
    /// to: its replica, or (`prefer-replica`, when it has none or that one is not connected)
    /// the primary itself.
    #[cold]
    fn reader_of(&self, primary: usize) -> Result<usize, Bytes> {
        let replica = self.w.live().replica_of.get(primary).copied().flatten();
        match (replica, self.w.read_from) {
            (Some(r), ReadFrom::Replica) => Ok(r),
            (Some(r), _) if self.w.pools().get(self.proto, r, self.conn).is_connected() => Ok(r),
            (None, ReadFrom::Replica) => {
                let addr = self.w.live().shards[primary].to_string();
                Err(reply::shard_unavailable(
                    &addr,
                    "no replica to read from (read_from = replica)",
                ))
            }
            _ => Ok(primary),
        }
    }

    /// The one slot of all of a command's keys; `Err` when they span slots.
    pub(crate) fn slot_of(
        &mut self,
        spec: &CommandSpec,
        req: &Request<'_>,
    ) -> Result<Option<u16>, ()> {
        if let [
            KeySpec {
                begin: BeginSearch::Index(1),
                find: FindKeys::Range { lastkey: 0, .. },
                ..
            },
        ] = spec.key_specs
            && req.argc() > 1
        {
            // The common shape (GET, SET, INCR, HGET …): one key, the first argument.
            return Ok(Some(router::slot(req.arg(1))));
        }
        self.keys.clear();
        if keys::key_indices(spec, req.argc(), |i| req.arg(i), &mut self.keys).is_err() {
            return Ok(None);
        }
        let mut slot = None;
        for &i in &self.keys {
            let s = router::slot(req.arg(i));
            match slot {
                None => slot = Some(s),
                Some(x) if x != s => return Err(()),
                _ => {}
            }
        }
        Ok(slot)
    }

    /// Sends `raw` to `shard`; its reply fills the next slot of the queue.
    pub(crate) fn forward(&mut self, shard: usize, raw: &[u8], now: Instant) {
        if self.w.cluster {
            return self.forward_cluster(shard, raw, now);
        }
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        let up = self.w.pools().get(self.proto, shard, self.conn);
        up.send(
            raw,
            Target::Client {
                queue: self.queue.clone(),
                seq,
                part: 0,
            },
            now,
        );
    }

    /// Cluster mode's [`forward`](Self::forward): to a replica for a read when `read_from`
    /// says so, and followed through redirects (out of line: static mode's forward stays as
    /// it was).
    #[inline(never)]
    fn forward_cluster(&mut self, shard: usize, raw: &[u8], now: Instant) {
        let shard = match self.reader_for(shard) {
            Ok(s) => s,
            Err(e) => return self.reply(e),
        };
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        let up = self.w.pools().get(self.proto, shard, self.conn);
        let target = Target::Client {
            queue: self.queue.clone(),
            seq,
            part: 0,
        };
        send_redirectable(&up, raw, target, now);
    }

    /// Cluster mode: where the current command goes instead of `primary`: a replica of it
    /// for a read-only command when reads go to replicas (see `reader_of`), else `primary`.
    /// A tracking client reads from primaries: its invalidations come from them, and a
    /// replica that lags could give it a value older than the last one reported.
    fn reader_for(&self, primary: usize) -> Result<usize, Bytes> {
        if self.w.read_from != ReadFrom::Primary
            && self.cmd.is_some_and(|c| c.has(flags::READONLY))
            && self.tracking.is_none()
        {
            self.reader_of(primary)
        } else {
            Ok(primary)
        }
    }

    /// Sends one request per part; the gathered reply fills the next slot of the queue.
    pub(crate) fn gather(&mut self, kind: GatherKind, parts: &[(usize, Bytes)], now: Instant) {
        if self.w.cluster {
            return self.gather_cluster(kind, parts, now);
        }
        let mut g = Gather::new(kind, parts.len(), self.proto);
        g.cmd = self.cmd;
        let seq = self.queue.push_waiting(Slot::Gather(Box::new(g)));
        for (i, (shard, raw)) in parts.iter().enumerate() {
            let up = self.w.pools().get(self.proto, *shard, self.conn);
            up.send(
                raw,
                Target::Client {
                    queue: self.queue.clone(),
                    seq,
                    part: i as u32,
                },
                now,
            );
        }
    }

    /// Cluster mode's [`gather`](Self::gather): each part to a replica for a read when
    /// `read_from` says so, and followed through redirects.
    #[inline(never)]
    fn gather_cluster(&mut self, kind: GatherKind, parts: &[(usize, Bytes)], now: Instant) {
        let mut shards = Vec::with_capacity(parts.len());
        for (shard, _) in parts {
            match self.reader_for(*shard) {
                Ok(s) => shards.push(s),
                Err(e) => return self.reply(e),
            }
        }
        let mut g = Gather::new(kind, parts.len(), self.proto);
        g.cmd = self.cmd;
        let seq = self.queue.push_waiting(Slot::Gather(Box::new(g)));
        for (i, ((_, raw), shard)) in parts.iter().zip(shards).enumerate() {
            let up = self.w.pools().get(self.proto, shard, self.conn);
            let target = Target::Client {
                queue: self.queue.clone(),
                seq,
                part: i as u32,
            };
            send_redirectable(&up, raw, target, now);
        }
    }

    /// MGET, MSET, DEL, EXISTS, UNLINK, TOUCH: split by shard, merged in key order / summed /
    /// `+OK`. When every key is on one shard, the original bytes are forwarded as they are.
    pub(crate) fn scatter(
        &mut self,
        spec: &CommandSpec,
        req: &Request<'_>,
        merge: Merge,
        now: Instant,
    ) {
        // MSET takes key-value pairs; the others take keys.
        let step = if merge == Merge::AllOk { 2 } else { 1 };
        let argc = req.argc();
        if !(argc - 1).is_multiple_of(step) {
            return self.reply(reply::wrong_arity(spec.name));
        }
        let live = self.w.live().clone();
        let map = &live.slot_map;
        // A cluster node takes the keys of one slot per command: the parts are per slot
        // there, per shard otherwise.
        let per_slot = live.cluster.is_some();
        let nkeys = (argc - 1) / step;
        self.keys.clear();
        let mut same = true;
        for k in 0..nkeys {
            let key = req.arg(1 + k * step);
            let group = if per_slot {
                crate::router::slot(key) as usize
            } else {
                map.shard_of(key)
            };
            same &= self.keys.first().is_none_or(|&f| f == group);
            self.keys.push(group);
        }
        let rules = &live.readthrough;
        let readthrough = merge == Merge::ArrayInOrder
            && !rules.is_empty()
            && (1..argc).any(|i| rules.find(req.arg(i)).is_some());
        if same && !readthrough {
            let shard = if per_slot {
                map.shard_of_slot(self.keys[0] as u16)
            } else {
                self.keys[0]
            };
            return self.forward(shard, req.raw, now);
        }
        let name = req.arg_frame(0);
        let mut parts = Vec::new();
        let mut used_positions = Vec::new();
        let mut add_part = |shard: usize, pos: Vec<u32>| {
            let mut b = BytesMut::with_capacity(16 + name.len() + pos.len() * 32 * step);
            push_header(&mut b, b'*', 1 + pos.len() * step);
            b.extend_from_slice(name);
            for &k in &pos {
                for j in 0..step {
                    b.extend_from_slice(req.arg_frame(1 + k as usize * step + j));
                }
            }
            parts.push((shard, b.freeze()));
            used_positions.push(pos);
        };
        if per_slot {
            let mut by_slot: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
            for (k, &slot) in self.keys.iter().enumerate() {
                by_slot.entry(slot).or_default().push(k as u32);
            }
            for (slot, pos) in by_slot {
                add_part(map.shard_of_slot(slot as u16), pos);
            }
        } else {
            let mut positions: Vec<Vec<u32>> = vec![Vec::new(); map.shard_count()];
            for (k, &shard) in self.keys.iter().enumerate() {
                positions[shard].push(k as u32);
            }
            for (shard, pos) in positions.into_iter().enumerate() {
                if !pos.is_empty() {
                    add_part(shard, pos);
                }
            }
        }
        if readthrough {
            return self.mget_readthrough(req, &parts, used_positions, now);
        }
        let kind = match merge {
            Merge::ArrayInOrder => GatherKind::ArrayInOrder {
                positions: used_positions,
                total: nkeys,
            },
            m => GatherKind::from_merge(m).unwrap_or(GatherKind::AllOk),
        };
        self.gather(kind, &parts, now);
    }

    /// A GET of a read-through key: forwarded like any GET (or as the value+PTTL script for
    /// rules with a grace period); a nil reply becomes an origin fetch (see `readthrough`).
    fn get_readthrough(&mut self, shard: usize, rule: Arc<Rule>, req: &Request<'_>, now: Instant) {
        let key = req.arg(1);
        let script = readthrough::get_request(&rule, key);
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        let pending = self.w.pending_gets.insert(PendingGet {
            w: self.w.clone(),
            queue: self.queue.clone(),
            seq,
            rule,
            sent_at: now.into_std(),
            proto: self.proto,
            with_pttl: script.is_some(),
            key: readthrough::KeyBuf::new(key),
            tracking: self.tracking.clone(),
        });
        let up = self.w.pools().get(self.proto, shard, self.conn);
        let raw = script.as_deref().unwrap_or(req.raw);
        if self.w.cluster {
            send_redirectable(&up, raw, Target::Sink(pending), now);
        } else {
            up.send(raw, Target::Sink(pending), now);
        }
    }

    /// An MGET with read-through keys: its shard parts are sent now (so it keeps its place
    /// among this client's commands); misses are filled when every part has arrived.
    fn mget_readthrough(
        &mut self,
        req: &Request<'_>,
        parts: &[(usize, Bytes)],
        positions: Vec<Vec<u32>>,
        now: Instant,
    ) {
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        let state = Rc::new(std::cell::RefCell::new(PendingMget {
            w: self.w.clone(),
            queue: self.queue.clone(),
            seq,
            proto: self.proto,
            sent_at: now.into_std(),
            keys: (1..req.argc()).map(|i| req.arg_copy(i)).collect(),
            positions,
            parts: vec![None; parts.len()],
            missing: parts.len(),
            tracking: self.tracking.clone(),
        }));
        for (i, (shard, raw)) in parts.iter().enumerate() {
            let up = self.w.pools().get(self.proto, *shard, self.conn);
            let target = Target::Sink(SinkRef::new(state.clone(), i as u32));
            if self.w.cluster {
                send_redirectable(&up, raw, target, now);
            } else {
                up.send(raw, target, now);
            }
        }
    }

    /// A write through slotgate to read-through keys (a script's or function's declared keys
    /// count as written): an in-flight fill of them must not store its (older) value, and
    /// their negative entries end.
    fn note_writes(&mut self, spec: &CommandSpec, req: &Request<'_>) {
        let rt = &self.w.shared.readthrough;
        let rules = self.w.live().readthrough.clone();
        self.keys.clear();
        if keys::key_indices(spec, req.argc(), |i| req.arg(i), &mut self.keys).is_err() {
            return;
        }
        for &i in &self.keys {
            let key = req.arg(i);
            let Some(rule) = rules.find(key) else {
                continue;
            };
            rt.note_write(key);
            if rule.lease
                && let Some(release) = readthrough::lease::release_command(key)
            {
                // Another instance's fill in flight for the key loses its lease, so it does
                // not store (the write goes to the shard right after this).
                let shard = self.w.live().slot_map.shard_of(key);
                let up = self.w.pools().get(self.proto, shard, self.conn);
                let now = Instant::now();
                if self.w.cluster {
                    send_redirectable(&up, &release, Target::Discard, now);
                } else {
                    up.send(&release, Target::Discard, now);
                }
            }
        }
    }

    /// DBSIZE, KEYS, FLUSHDB, FLUSHALL, CONFIG SET/RESETSTAT, SCAN, RANDOMKEY.
    fn all_shards(&mut self, spec: &CommandSpec, req: &Request<'_>, merge: Merge, now: Instant) {
        let kind = match merge {
            Merge::Scan => return self.scan(req, now),
            Merge::RandomKey => GatherKind::RandomKey {
                pick: (self.id as usize).wrapping_add(now.elapsed().subsec_nanos() as usize)
                    ^ random_seed(),
            },
            Merge::ArrayInOrder => GatherKind::AllOk,
            Merge::LatencyLatest | Merge::LatencyHistory | Merge::LatencyDoctor => {
                GatherKind::Latency {
                    which: merge,
                    shards: self.w.live().shards.iter().map(|a| a.to_string()).collect(),
                }
            }
            Merge::SlowlogEntries => {
                // SLOWLOG GET [count]: 10 by default, a negative count means all (Redis 7).
                let count = match req.argc() {
                    2 => Some(10),
                    _ => match crate::resp::request::parse_i64(req.arg(2)) {
                        Some(n) if n < 0 => None,
                        Some(n) => Some(n as usize),
                        None => return self.reply_static(reply::NOT_INTEGER),
                    },
                };
                GatherKind::Slowlog {
                    count,
                    shards: self.w.live().shards.iter().map(|a| a.to_string()).collect(),
                    own: self.w.shared.slowlog.newest(count),
                }
            }
            // SLOWLOG LEN: the shards' and slotgate's own.
            Merge::SlowlogLen => {
                let own = self.w.shared.slowlog.len() as i64;
                GatherKind::Info(Box::new(move |parts: &[Bytes]| {
                    if let Some(e) = parts.iter().find(|p| p.first() == Some(&b'-')) {
                        return e.clone();
                    }
                    let n: i64 = parts
                        .iter()
                        .filter_map(|p| crate::resp::scan::reply_integer(p))
                        .sum();
                    reply::integer(n + own)
                }))
            }
            m => GatherKind::from_merge(m).unwrap_or(GatherKind::AllOk),
        };
        if let Some(bad) = config_set_refused(spec.name, req) {
            return self.reply(reply::config_set_not_allowed(&bad));
        }
        match command::policy::also_here(spec.name) {
            command::policy::AlsoHere::ResetStats => self.reset_stats(),
            command::policy::AlsoHere::ResetSlowlog => {
                self.w.shared.slowlog.reset();
            }
            command::policy::AlsoHere::NoteScripts => {
                let args: Vec<&[u8]> = (1..req.argc()).map(|i| req.arg(i)).collect();
                self.w.shared.scripts.note(spec.name, &args);
            }
            command::policy::AlsoHere::Nothing => {}
        }
        if merge == Merge::AnyOk {
            // SCRIPT KILL, FUNCTION KILL: on the control connections, since the shared ones
            // may be the ones stuck behind the busy script.
            let deadline = now + crate::shard::CONTROL_TIMEOUT;
            return cx!(self).gather_on_control(kind, req.raw, deadline);
        }
        self.gather_from_every_shard(kind, req.raw, now);
    }

    /// CONFIG RESETSTAT: slotgate's own statistics restart from zero too (INFO commandstats,
    /// errorstats and stats), as Redis's do.
    #[cold]
    fn reset_stats(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = &self.w.shared;
        self.w.metrics.reset(&shared.command_totals);
        let st = &shared.stats;
        for c in [
            &st.connections_received,
            &st.commands_processed,
            &st.rejected_connections,
            &st.auth_failures,
            &st.token_auths,
            &st.token_auth_failures,
        ] {
            c.store(0, Relaxed);
        }
    }

    /// Sends `raw` to every shard and merges their replies as `kind` says.
    pub(crate) fn gather_from_every_shard(&mut self, kind: GatherKind, raw: &[u8], now: Instant) {
        let n = self.w.live().slot_map.shard_count();
        let raw = Bytes::copy_from_slice(raw);
        let parts: Vec<(usize, Bytes)> = (0..n).map(|s| (s, raw.clone())).collect();
        self.gather(kind, &parts, now);
    }

    /// SCAN: the cursor names the shard (cursor = shard_cursor * shards + shard), so one
    /// iteration walks shard 0, then 1, … with Redis's guarantees on each.
    fn scan(&mut self, req: &Request<'_>, now: Instant) {
        let shards = self.w.live().slot_map.shard_count() as u64;
        let Some(cursor) = parse_cursor(req.arg(1)) else {
            return self.reply_static(reply::INVALID_CURSOR);
        };
        let shard = cursor % shards;
        let shard_cursor = (cursor / shards).to_string();
        let mut b = BytesMut::with_capacity(req.raw.len() + 8);
        push_header(&mut b, b'*', req.argc());
        b.extend_from_slice(req.arg_frame(0));
        push_header(&mut b, b'$', shard_cursor.len());
        b.extend_from_slice(shard_cursor.as_bytes());
        b.extend_from_slice(b"\r\n");
        for i in 2..req.argc() {
            b.extend_from_slice(req.arg_frame(i));
        }
        let kind = GatherKind::Scan { shard, shards };
        self.gather(kind, &[(shard as usize, b.freeze())], now);
    }
}

/// Cluster mode: sends a request that a redirect may send again elsewhere.
fn send_redirectable(up: &crate::shard::Upstream, raw: &[u8], target: Target, now: Instant) {
    let deadline = now + up.op_timeout();
    up.send_retryable(crate::shard::Retry::new(raw, 0), target, deadline);
}

/// A cheap per-process random value (RANDOMKEY's shard pick needs no cryptography).
fn random_seed() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as usize
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
