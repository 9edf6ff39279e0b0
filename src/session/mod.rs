//! One client connection: read a burst, parse every complete command, route each one, and
//! write every ready reply in request order with one syscall.
//!
//! Routing is by the command table's [`Route`]: local answers go straight into the reply
//! queue; single-slot commands are forwarded as their raw bytes to the owning shard's
//! connection; scatter and all-shard commands become a [`Gather`]. Back-pressure: at most
//! `max_client_pipeline` commands in flight per client; beyond that the session stops reading
//! until replies drain, so a client that pipelines without reading costs bounded memory.

pub mod local;
pub mod pinned;
pub mod pubsub;

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::auth::User;
use crate::readthrough::{self, PendingGet, PendingMget};

use crate::command::policy::{
    channel_args, config_set_refused, has_block_option, parse_cursor, refused_arguments,
    sort_acl_error,
};
use crate::command::{
    self, BeginSearch, CommandSpec, FindKeys, KeySpec, Merge, Route, flags, keys,
};
use crate::fanout::{Gather, GatherKind};
use crate::netio::{PlainRead, PlainWrite, ReadSide, WriteSide};
use crate::notify::FlagWaker;
use crate::queue::{ReplyQueue, SinkRef, Slot, Target};
use crate::resp::reply::{self, Proto};
use crate::resp::request::push_header;
use crate::resp::{Limits, Parsed, Request, RequestParser};
use crate::router;
use crate::worker::{Shared, Worker};

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
    /// The authenticated user; `None` until AUTH when a password is required.
    pub(crate) user: Option<Arc<User>>,
    /// The user has command, key or channel restrictions (checked per command; scripts run
    /// as the user's mirror on the shards).
    pub(crate) restricted: bool,
    /// Consecutive failed AUTH attempts.
    pub(crate) auth_failures: u32,
    /// Commands whose latency is being measured: (reply sequence number, start, name).
    sampled: std::collections::VecDeque<(u64, std::time::Instant, &'static str)>,
    /// The last top-level command looked up.
    last_command: Option<&'static CommandSpec>,
    /// Commands dispatched, for sampling one in `metrics::SAMPLE_EVERY`.
    dispatched: u64,
    /// An open MULTI (see `pinned`).
    pub(crate) tx: Option<crate::session::pinned::Tx>,
    /// WATCHed keys outside MULTI: their dedicated connection and slot.
    pub(crate) watch: Option<(crate::shard::Dedicated, u16)>,
    /// The dedicated connection of a blocking command in flight.
    pub(crate) blocked: Option<crate::shard::Dedicated>,
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
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Holds one of the `maxclients` places for as long as a session lives.
struct ClientPlace(Arc<Shared>);

impl ClientPlace {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.settings.maxclients;
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
async fn serve<R, W>(mut rd: R, mut wr: W, w: Rc<Worker>, addr: SocketAddr, laddr: SocketAddr)
where
    R: ReadSide,
    W: WriteSide,
{
    let shared = w.shared.clone();
    let Some(_place) = ClientPlace::take(&shared) else {
        let _ = wr.write_all(reply::MAX_CLIENTS).await;
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
        return;
    };
    let settings = &shared.settings;
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
        user: None,
        restricted: false,
        auth_failures: 0,
        sampled: std::collections::VecDeque::new(),
        last_command: None,
        dispatched: 0,
        tx: None,
        watch: None,
        blocked: None,
        deferred: None,
        on_dedicated: Lane::Shared,
        subs: crate::session::pubsub::Subs::default(),
        kill: Arc::new(tokio::sync::Notify::new()),
        w,
    };
    if !users.auth_required() {
        s.set_user(users.default_user().clone());
    }
    s.queue.set_output_limit(settings.obuf_normal);
    s.register();
    let limits = Limits {
        max_bulk_len: settings.proto_max_bulk_len,
        ..Limits::default()
    };
    let qbuf_limit = settings.client_query_buffer_limit;
    let idle_timeout = settings.idle_timeout;
    // The idle timer, when one is configured (re-armed whenever the client is idle).
    let mut idle_sleep = idle_timeout.map(|d| Box::pin(tokio::time::sleep(d)));
    let mut parser = RequestParser::new();
    // The session's own buffers stay empty (unallocated) while it keeps up: reads go into the
    // worker's read scratch, commands are parsed and dispatched straight from there, and only
    // the bytes of a partial command are copied here (Redis's shared query buffer does the
    // same); replies are gathered in the worker's write scratch and only what the socket does
    // not take at once is kept here. So 10,000 idle clients cost no buffers, and a request
    // costs no reference counting of a shared buffer.
    let mut rbuf = BytesMut::new();
    // The last read went into the worker's read scratch (not yet parsed).
    let mut in_scratch = false;
    let mut out = BytesMut::new();
    // A TLS flush did not complete: it is polled again in the wait.
    let mut flushing = false;
    let mut soft_sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let w = s.w.clone();
    let mut eof = false;
    // CLIENT KILL comes from any worker thread (tokio's `Notify`). A small task waits for it and
    // flags this session's own queue, so the loop polls nothing thread-safe per turn (polling
    // a `Notified` takes its lock: about 180 instructions per GET in callgrind).
    let _watcher = {
        let (kill, queue) = (s.kill.clone(), s.queue.clone());
        AbortOnDrop(tokio::task::spawn_local(async move {
            kill.notified().await;
            queue.mark_killed();
        }))
    };
    // Read readiness is registered with a waker that flags its wake-ups; `read_armed` says a
    // read returned Pending, so its interest is registered and only the flag can change that.
    let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let (read_flag, read_waker) = FlagWaker::new(task.clone());
    let mut read_armed = false;
    // Reads that returned input since the read last had to wait.
    let mut reads_in_a_row = 0u32;
    loop {
        let bounded = if in_scratch {
            in_scratch = false;
            let mut sc = w.read_scratch.borrow_mut();
            let (used, bounded) = s.process(&mut parser, &sc, &limits);
            if used < sc.len() {
                // A partial command (or commands past the pipeline bound) stays with the
                // session; the scratch is the next reader's.
                rbuf.extend_from_slice(&sc[used..]);
            }
            sc.clear();
            bounded
        } else if !rbuf.is_empty() || s.deferred.is_some() || s.blocked.is_some() || s.barrier {
            // (Parsing also ends a barrier, a deferred command and a finished blocking one.)
            let (used, bounded) = s.process(&mut parser, &rbuf, &limits);
            rbuf.advance(used);
            bounded
        } else {
            // Nothing to parse and nothing held back (woken by a reply): skip the call.
            // (Every state `process` ends must be in the condition above.)
            false
        };
        if rbuf.len() > qbuf_limit {
            tracing::warn!(
                client = s.id,
                "closing client that reached max query buffer length"
            );
            break;
        }
        if s.queue.must_close() {
            // CLIENT KILL, a lost subscriber connection (the client reconnects and
            // resubscribes), or the output buffer limit.
            s.log_close();
            break;
        }
        // Write what is ready: first what the socket did not take last time (`out`), then
        // replies from the queue through the worker's scratch, at most `WRITE_CHUNK` at a
        // time (larger replies stay in the queue, uncopied, until the socket takes them), for
        // as long as the socket takes everything. What it does not take stays in `out`, which
        // the wait below writes as the socket drains, while the session goes on reading and
        // dispatching as Redis does: a client that does not read is closed by its output
        // buffer limit, never waited on.
        let mut wrote = false;
        let mut write_failed = false;
        if !out.is_empty() {
            match wr.poll_write_now(&mut Context::from_waker(&task), &out) {
                Poll::Ready(Ok(n)) => {
                    out.advance(n);
                    s.queue.sub_out_bytes(n);
                    wrote = n > 0;
                }
                Poll::Ready(Err(_)) => write_failed = true,
                Poll::Pending => {}
            }
        }
        let mut turn_bytes = 0;
        while out.is_empty() && !write_failed {
            let mut sc = w.write_scratch.borrow_mut();
            let n = s.queue.drain_ready(&mut sc, WRITE_CHUNK);
            s.queue.drain_pushes(&mut sc);
            if n > 0 && !s.sampled.is_empty() {
                s.record_latencies();
            }
            if sc.is_empty() {
                break;
            }
            wrote = true;
            let chunk = sc.len();
            turn_bytes += chunk;
            match wr.poll_write_now(&mut Context::from_waker(&task), &sc) {
                Poll::Ready(Ok(n)) => out.extend_from_slice(&sc[n..]),
                Poll::Ready(Err(_)) => write_failed = true,
                Poll::Pending => out.extend_from_slice(&sc),
            }
            sc.clear();
            if sc.capacity() > KEEP_BUF {
                *sc = BytesMut::new();
            }
            if !out.is_empty() {
                // Still the client's output buffer until the socket takes it.
                s.queue.add_out_bytes(out.len());
                break;
            }
            // Less than a chunk: the drain stopped at a reply not ready yet.
            if chunk < WRITE_CHUNK || !s.queue.front_ready() {
                break;
            }
            if turn_bytes >= TURN_WRITE_MAX {
                // More is ready for a fast reader: continue after the worker's other tasks.
                s.queue.notify.notify_one();
                reads_in_a_row = READS_BEFORE_YIELD;
                break;
            }
        }
        if out.is_empty() && out.capacity() > 0 {
            out = BytesMut::new();
        }
        if wrote || flushing {
            // A no-op on plain TCP; pushes TLS records out.
            match Pin::new(&mut wr).poll_flush(&mut Context::from_waker(&task)) {
                Poll::Ready(Ok(())) => flushing = false,
                Poll::Ready(Err(_)) => write_failed = true,
                Poll::Pending => flushing = true,
            }
        }
        if write_failed || s.queue.must_close() {
            s.log_close();
            break;
        }
        if (s.closing || eof) && s.queue.is_empty() && out.is_empty() && !flushing {
            break;
        }
        let room = s.queue.has_room(s.max_pipeline);
        if bounded && room {
            // Parsing stopped at the pipeline bound and the replies written since made room:
            // the commands still buffered are parsed now, since the client may have sent
            // everything and be waiting for them.
            continue;
        }
        let can_read = !s.closing && !eof && !s.barrier && room;
        if rbuf.is_empty() {
            if rbuf.capacity() > 0 {
                // Nothing partial is buffered: let go of the read buffer.
                rbuf = BytesMut::new();
            }
        } else if can_read && rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        if reads_in_a_row >= READS_BEFORE_YIELD {
            // A client that always has more input must let the worker's other sessions run
            // (tokio's reads spent its cooperative budget for this; `netio`'s do not). The
            // read scratch is empty here.
            reads_in_a_row = 0;
            tokio::task::yield_now().await;
        }
        // Idle: nothing in flight and nothing read for `idle_timeout` (Redis's `timeout`;
        // like Redis, it does not apply to subscribed clients).
        let mut idle = match (idle_timeout, idle_sleep.as_mut()) {
            (Some(d), Some(sleep)) if s.queue.is_empty() && out.is_empty() && !s.subscribed() => {
                sleep.as_mut().reset(Instant::now() + d);
                Some(sleep)
            }
            _ => None,
        };
        // A client that is not keeping up with its replies and is over the soft output limit
        // is closed once that has lasted too long, even if nothing else happens meanwhile.
        let mut soft = if out.is_empty() {
            None
        } else {
            soft_timer(&s.queue, &mut soft_sleep)
        };
        // Wait for a reply (the queue's notify), input, room in the client's socket, or the
        // idle timeout. The read is polled only when it may have become ready: see
        // `FlagWaker`.
        let woke = std::future::poll_fn(|cx| {
            if s.queue.notify.poll_notified(cx).is_ready() {
                return Poll::Ready(Wake::Queue);
            }
            if !out.is_empty() {
                match wr.poll_write_now(cx, &out) {
                    Poll::Ready(Ok(n)) => {
                        out.advance(n);
                        s.queue.sub_out_bytes(n);
                        return Poll::Ready(Wake::Wrote);
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Wake::WriteFailed),
                    Poll::Pending => {}
                }
            } else if flushing {
                match Pin::new(&mut wr).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        flushing = false;
                        return Poll::Ready(Wake::Wrote);
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Wake::WriteFailed),
                    Poll::Pending => {}
                }
            }
            if let Some(sleep) = &mut soft
                && sleep.as_mut().poll(cx).is_ready()
            {
                s.queue.check_soft_limit();
                return Poll::Ready(Wake::Queue);
            }
            if can_read && (!read_armed || read_flag.take()) {
                let mut rcx = Context::from_waker(&read_waker);
                let polled = if rbuf.is_empty() {
                    // Into the worker's scratch, parsed from there at the top of the loop
                    // (no other session runs in between: the scratch is empty again by then).
                    let mut sc = w.read_scratch.borrow_mut();
                    // Always empty here; cleared anyway, so that no bytes of one client can
                    // ever be read as another's.
                    debug_assert!(sc.is_empty());
                    sc.clear();
                    if sc.capacity() < SCRATCH {
                        sc.reserve(SCRATCH);
                    }
                    let polled = rd.poll_read_vec(&mut rcx, &mut sc);
                    in_scratch = !sc.is_empty();
                    polled
                } else {
                    rd.poll_read_bytes(&mut rcx, &mut rbuf)
                };
                match polled {
                    Poll::Ready(r) => {
                        read_armed = false;
                        return Poll::Ready(Wake::Read(r));
                    }
                    Poll::Pending => {
                        read_armed = true;
                        reads_in_a_row = 0;
                    }
                }
            }
            if let Some(sleep) = &mut idle
                && sleep.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Wake::Idle);
            }
            Poll::Pending
        })
        .await;
        match woke {
            Wake::Queue | Wake::Wrote => {}
            Wake::WriteFailed => break,
            // The client closed its side: answer what it sent, then close — unless a blocking
            // command is waiting (it may never return): then close now, which closes its
            // dedicated connection and unblocks the shard.
            Wake::Read(Ok(0)) if s.blocked.is_some() => break,
            Wake::Read(Ok(0)) => eof = true,
            Wake::Read(Ok(_)) => reads_in_a_row += 1,
            Wake::Read(Err(_)) => break,
            Wake::Idle => {
                tracing::debug!(client = s.id, "closing idle client");
                break;
            }
        }
    }
    // Replies still in flight are dropped as they arrive, and what is queued is freed now.
    s.queue.close();
    drop(out);
    let _ = wr.shutdown().await;
    s.unregister();
}

/// The timer for the soft output limit, armed while the client's output is over it.
#[cold]
fn soft_timer<'a>(
    queue: &ReplyQueue,
    timer: &'a mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> Option<Pin<&'a mut tokio::time::Sleep>> {
    let at = queue.soft_deadline()?;
    match timer {
        Some(sleep) => {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
        }
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    timer.as_mut().map(|t| t.as_mut())
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

    /// Updates this session's CLIENT LIST entry after a name, user or protocol change.
    pub(crate) fn update_info(&self) {
        self.register();
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
                if self.queue.waiting() > 0 {
                    self.deferred = Some(d);
                    break;
                }
                self.dispatch(&d.request(), now);
                continue;
            }
            if used == buf.len() {
                // Everything is parsed (the parser keeps no partial state then).
                break;
            }
            match parser.parse(&buf[used..], limits, self.user.is_some()) {
                Ok(Parsed::Command { req, used: u }) => {
                    n += 1;
                    self.dispatch(&req, now);
                    used += u;
                }
                Ok(Parsed::Incomplete { used: u }) => {
                    used += u;
                    break;
                }
                Err(e) => {
                    self.queue.push_ready(reply::error(&e.message()));
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

    /// Appends a reply that is ready now.
    #[inline]
    pub(crate) fn reply(&self, b: Bytes) {
        self.queue.push_ready(b);
    }

    #[inline]
    pub(crate) fn reply_static(&self, b: &'static [u8]) {
        self.queue.push_ready(Bytes::from_static(b));
    }

    /// Looks the command up, checks arity and routes it.
    fn dispatch(&mut self, req: &Request<'_>, now: Instant) {
        let spec = match self.check(req) {
            Ok(spec) => spec,
            Err(e) => {
                // A queuing error inside MULTI makes EXEC fail, as in Redis.
                self.flag_tx();
                return self.reply(e);
            }
        };
        // Switching between shared and dedicated connections waits for what is in flight, and
        // so does anything after a blocking command (the connection is "blocked", as in Redis).
        let dedicated = if self.restricted && self.tx.is_none() && spec.runs_script() {
            Lane::Mirror
        } else if self.wants_dedicated(spec, req) {
            Lane::Dedicated
        } else {
            Lane::Shared
        };
        // RESET closes dedicated connections: their replies in flight must arrive first.
        let resets_pinned = spec.name == "reset"
            && (self.tx.is_some() || self.watch.is_some() || self.subscribed());
        if dedicated != self.on_dedicated || self.blocked.is_some() || resets_pinned {
            if self.queue.waiting() > 0 {
                self.deferred = Some(crate::session::pinned::Deferred::from(req));
                return;
            }
            self.on_dedicated = dedicated;
        }
        self.w.metrics.command(spec.name);
        self.dispatched += 1;
        if self.dispatched.is_multiple_of(crate::metrics::SAMPLE_EVERY) {
            let seq = self.queue.next_seq();
            self.sampled
                .push_back((seq, std::time::Instant::now(), spec.name));
        }
        if !self.w.shared.readthrough.rules.is_empty() && spec.may_write_keys() {
            self.note_writes(spec, req);
        }
        if self.tx.is_some()
            && spec.route != Route::Transaction
            && !matches!(spec.name, "quit" | "reset")
        {
            if self.restricted && spec.runs_script() {
                self.flag_tx();
                return self.reply_static(NOPERM_SCRIPT_IN_MULTI);
            }
            return self.tx_queue(spec, req, now);
        }
        if self.proto == Proto::Resp2 && self.subscribed() {
            if !crate::session::pubsub::allowed_while_subscribed(spec.name) {
                return self.reply(reply::error(&format!(
                    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    spec.name
                )));
            }
            if spec.name == "ping" {
                return self.subscribed_ping(req);
            }
        }
        if dedicated == Lane::Mirror {
            return self.script_as_user(spec, req, now);
        }
        match spec.route {
            Route::PubSub => {
                self.pubsub(spec, req, now);
                self.update_output_class();
            }
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
                return Err(reply::wrong_arity(spec.name));
            }
            match command::lookup_sub(spec, req.arg(1)) {
                Some(sub) => spec = sub,
                None => return Err(reply::unknown_subcommand(spec.name, req.arg(1))),
            }
        }
        if !spec.arity_ok(req.argc()) {
            return Err(reply::wrong_arity(spec.name));
        }
        if self.user.is_none() {
            // Before AUTH, nothing reaches a shard (Redis's NOAUTH rule).
            if !matches!(spec.name, "auth" | "hello" | "quit" | "reset") {
                return Err(Bytes::from_static(reply::NOAUTH));
            }
        } else if self.restricted {
            self.permitted(spec, req)?;
        }
        Ok(spec)
    }

    /// Records the latency of sampled commands whose replies are now written.
    fn record_latencies(&mut self) {
        let base = self.queue.base();
        while let Some(&(seq, start, name)) = self.sampled.front() {
            if seq >= base {
                break;
            }
            metrics::histogram!(crate::metrics::COMMAND_DURATION, "command" => name)
                .record(start.elapsed().as_secs_f64());
            self.sampled.pop_front();
        }
    }

    /// The authenticated user's name (`default` before AUTH, as Redis shows it).
    pub(crate) fn user_name(&self) -> &str {
        self.user.as_ref().map_or("default", |u| u.name.as_str())
    }

    /// Switches the connection's identity (AUTH, HELLO AUTH, RESET).
    pub(crate) fn set_user(&mut self, user: Arc<User>) {
        self.restricted = !user.unrestricted_access();
        self.user = Some(user);
    }

    /// The user's command and key permissions for this command: `Err` is the NOPERM reply.
    /// Every key is checked, including each key of a scatter command.
    fn permitted(&mut self, spec: &CommandSpec, req: &Request<'_>) -> Result<(), Bytes> {
        let Some(user) = self.user.clone() else {
            return Ok(());
        };
        if !user.may_run(spec) {
            return Err(reply::noperm_command(spec.name));
        }
        if matches!(spec.name, "sort" | "sort_ro")
            && !user.may_access(b"*", crate::command::access::READ)
            && let Some(e) = sort_acl_error(req)
        {
            return Err(Bytes::from_static(e));
        }
        if matches!(spec.name, "unsubscribe" | "punsubscribe" | "sunsubscribe") {
            // Leaving a channel needs no permission (as in Redis).
            return Ok(());
        }
        if let Some((first, pattern)) = channel_args(spec.name) {
            // Channels are checked against the user's channel patterns (their key specs in
            // SSUBSCRIBE and SPUBLISH are not keys).
            let last = if matches!(spec.name, "publish" | "spublish") {
                2
            } else {
                req.argc()
            };
            return if (first..last).all(|i| user.may_use_channel(req.arg(i), pattern)) {
                Ok(())
            } else {
                Err(Bytes::from_static(reply::NOPERM_CHANNELS))
            };
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
            Ok(slot) => slot.map_or(0, |s| self.w.shared.settings.slot_map.shard_of_slot(s)),
            Err(()) => return self.reply_static(reply::CROSSSLOT),
        };
        let Some(user) = self.user.clone() else {
            return;
        };
        let up = self
            .w
            .pools
            .as_user(&user, command::refused_in_scripts(), self.proto, shard);
        let seq = self.queue.push_waiting(Slot::Waiting);
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
                let shard = self.w.shared.settings.slot_map.shard_of_slot(slot);
                if spec.name == "get"
                    && let Some(rule) = self.w.shared.readthrough.rules.position(req.arg(1))
                {
                    return self.get_readthrough(shard, rule, req, now);
                }
                self.forward(shard, req.raw, now)
            }
            // No keys, or key positions undeterminable: any shard answers (its own error).
            Ok(None) => self.forward(0, req.raw, now),
            Err(()) => self.reply_static(reply::CROSSSLOT),
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
        let seq = self.queue.push_waiting(Slot::Waiting);
        let up = self.w.pools.get(self.proto, shard, self.conn);
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

    /// Sends one request per part; the gathered reply fills the next slot of the queue.
    pub(crate) fn gather(&mut self, kind: GatherKind, parts: &[(usize, Bytes)], now: Instant) {
        let g = Gather::new(kind, parts.len(), self.proto);
        let seq = self.queue.push_waiting(Slot::Gather(Box::new(g)));
        for (i, (shard, raw)) in parts.iter().enumerate() {
            let up = self.w.pools.get(self.proto, *shard, self.conn);
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
        let map = &self.w.shared.settings.slot_map;
        let nkeys = (argc - 1) / step;
        self.keys.clear();
        let mut same = true;
        for k in 0..nkeys {
            let shard = map.shard_of(req.arg(1 + k * step));
            same &= self.keys.first().is_none_or(|&f| f == shard);
            self.keys.push(shard);
        }
        let rules = &self.w.shared.readthrough.rules;
        let readthrough = merge == Merge::ArrayInOrder
            && !rules.is_empty()
            && (1..argc).any(|i| rules.find(req.arg(i)).is_some());
        if same && !readthrough {
            let shard = self.keys[0];
            return self.forward(shard, req.raw, now);
        }
        let mut positions: Vec<Vec<u32>> = vec![Vec::new(); map.shard_count()];
        for (k, &shard) in self.keys.iter().enumerate() {
            positions[shard].push(k as u32);
        }
        let name = req.arg_frame(0);
        let mut parts = Vec::new();
        let mut used_positions = Vec::new();
        for (shard, pos) in positions.into_iter().enumerate() {
            if pos.is_empty() {
                continue;
            }
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
    fn get_readthrough(&mut self, shard: usize, rule_at: usize, req: &Request<'_>, now: Instant) {
        let key = req.arg(1);
        let rule = self.w.shared.readthrough.rules.at(rule_at);
        let script = readthrough::get_request(rule, key);
        let seq = self.queue.push_waiting(Slot::Waiting);
        let pending = self.w.pending_gets.insert(PendingGet {
            w: self.w.clone(),
            queue: self.queue.clone(),
            seq,
            rule: rule_at,
            sent_at: now.into_std(),
            proto: self.proto,
            with_pttl: script.is_some(),
            key: readthrough::KeyBuf::new(key),
        });
        let up = self.w.pools.get(self.proto, shard, self.conn);
        let raw = script.as_deref().unwrap_or(req.raw);
        up.send(raw, Target::Sink(pending), now);
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
        let seq = self.queue.push_waiting(Slot::Waiting);
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
        }));
        for (i, (shard, raw)) in parts.iter().enumerate() {
            let up = self.w.pools.get(self.proto, *shard, self.conn);
            let target = Target::Sink(SinkRef::new(state.clone(), i as u32));
            up.send(raw, target, now);
        }
    }

    /// A write through slotgate to read-through keys (a script's or function's declared keys
    /// count as written): an in-flight fill of them must not store its (older) value, and
    /// their negative entries end.
    fn note_writes(&mut self, spec: &CommandSpec, req: &Request<'_>) {
        let rt = &self.w.shared.readthrough;
        self.keys.clear();
        if keys::key_indices(spec, req.argc(), |i| req.arg(i), &mut self.keys).is_err() {
            return;
        }
        for &i in &self.keys {
            if rt.rules.find(req.arg(i)).is_some() {
                rt.note_write(req.arg(i));
            }
        }
    }

    /// DBSIZE, KEYS, FLUSHDB, FLUSHALL, CONFIG SET/RESETSTAT, SCAN, RANDOMKEY.
    fn all_shards(&mut self, spec: &CommandSpec, req: &Request<'_>, merge: Merge, now: Instant) {
        let kind = match merge {
            Merge::Special if spec.name == "scan" => return self.scan(req, now),
            Merge::Special => GatherKind::RandomKey {
                pick: (self.id as usize).wrapping_add(now.elapsed().subsec_nanos() as usize)
                    ^ random_seed(),
            },
            Merge::ArrayInOrder => GatherKind::AllOk,
            m => GatherKind::from_merge(m).unwrap_or(GatherKind::AllOk),
        };
        if spec.name == "config|set"
            && let Some(bad) = config_set_refused(req)
        {
            return self.reply(reply::error(&format!(
                "ERR CONFIG SET parameter '{bad}' is not allowed through slotgate"
            )));
        }
        self.gather_from_every_shard(kind, req.raw, now);
    }

    /// Sends `raw` to every shard and merges their replies as `kind` says.
    pub(crate) fn gather_from_every_shard(&mut self, kind: GatherKind, raw: &[u8], now: Instant) {
        let n = self.w.shared.settings.slot_map.shard_count();
        let raw = Bytes::copy_from_slice(raw);
        let parts: Vec<(usize, Bytes)> = (0..n).map(|s| (s, raw.clone())).collect();
        self.gather(kind, &parts, now);
    }

    /// SCAN: the cursor names the shard (cursor = shard_cursor * shards + shard), so one
    /// iteration walks shard 0, then 1, … with Redis's guarantees on each.
    fn scan(&mut self, req: &Request<'_>, now: Instant) {
        let shards = self.w.shared.settings.slot_map.shard_count() as u64;
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

/// Scripts of a restricted user run on its mirror connections, which a transaction's
/// dedicated connection is not.
const NOPERM_SCRIPT_IN_MULTI: &[u8] = b"-NOPERM scripts and functions of users with restricted permissions cannot run inside MULTI through slotgate\r\n";
