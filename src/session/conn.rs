//! The loop of one client connection, in steps: parse what was read ([`Conn::parse`]),
//! write what is ready ([`Conn::write_ready`]), then wait for a reply, input, room in the
//! client's socket or a timer ([`Conn::wait`]).
//!
//! The connection's buffers stay empty (unallocated) while it keeps up: reads go into the
//! worker's read scratch, commands are parsed and dispatched straight from there, and only the
//! bytes of a partial command are copied into `rbuf` (Redis's shared query buffer does the
//! same); replies are gathered in the worker's write scratch and only what the socket does
//! not take at once is kept in `out`. So 10,000 idle clients cost no buffers, and a request
//! costs no reference counting of a shared buffer.

use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::future::Future;
use tokio::time::{Instant, Sleep};

use super::{
    KEEP_BUF, READ_CHUNK, READS_BEFORE_YIELD, SCRATCH, Session, TURN_WRITE_MAX, WRITE_CHUNK, Wake,
};
use crate::netio::{ReadSide, WriteSide};
use crate::notify::FlagWaker;
use crate::queue::Attention;
use crate::resp::{Limits, RequestParser};
use crate::worker::Worker;

/// How long a drained client may keep sending before its connection is closed anyway.
const LINGER: Duration = Duration::from_secs(5);
/// A drained client that sends nothing for this long is closed.
const LINGER_QUIET: Duration = Duration::from_millis(200);

/// One client connection's I/O state around its [`Session`].
pub(super) struct Conn<R, W> {
    rd: R,
    wr: W,
    w: Rc<Worker>,
    parser: RequestParser,
    limits: Limits,
    qbuf_limit: usize,
    /// Bytes of a partial command (or of commands past the pipeline bound).
    rbuf: BytesMut,
    /// The last read went into the worker's read scratch (not yet parsed).
    in_scratch: bool,
    /// What the client's socket did not take yet.
    out: BytesMut,
    /// A TLS flush did not complete: it is polled again in the wait.
    flushing: bool,
    eof: bool,
    /// A graceful shutdown stopped reading this client (see [`Conn::linger`]).
    drained: bool,
    idle_timeout: Option<Duration>,
    idle_sleep: Option<Pin<Box<Sleep>>>,
    soft_sleep: Option<Pin<Box<Sleep>>>,
    /// The session task's own waker (writes register it).
    task: Waker,
    /// Read readiness is registered with a waker that flags its wake-ups; `read_armed` says
    /// a read returned Pending, so its interest is registered and only the flag can change
    /// that.
    read_flag: Arc<FlagWaker>,
    read_waker: Waker,
    read_armed: bool,
    /// Reads that returned input since the read last had to wait.
    reads_in_a_row: u32,
}

impl<R: ReadSide, W: WriteSide> Conn<R, W> {
    pub(super) async fn new(rd: R, wr: W, s: &Session) -> Self {
        let settings = s.w.live().clone();
        let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let (read_flag, read_waker) = FlagWaker::new(task.clone());
        Conn {
            rd,
            wr,
            w: s.w.clone(),
            parser: RequestParser::new(),
            limits: Limits {
                max_bulk_len: settings.proto_max_bulk_len,
                ..Limits::default()
            },
            qbuf_limit: settings.client_query_buffer_limit,
            rbuf: BytesMut::new(),
            in_scratch: false,
            out: BytesMut::new(),
            flushing: false,
            eof: false,
            drained: false,
            idle_timeout: settings.idle_timeout,
            // The idle timer, when one is configured (re-armed whenever the client is idle).
            idle_sleep: settings
                .idle_timeout
                .map(|d| Box::pin(tokio::time::sleep(d))),
            soft_sleep: None,
            task,
            read_flag,
            read_waker,
            read_armed: false,
            reads_in_a_row: 0,
        }
    }

    /// Serves the session until its connection closes; then what is unwritten is dropped.
    pub(super) async fn run(&mut self, s: &mut Session) {
        self.turns(s).await;
        // Replies still in flight are dropped as they arrive, and what is queued is freed now.
        s.queue.close();
        self.out = BytesMut::new();
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.wr).await;
        if self.drained {
            self.linger().await;
        }
    }

    /// After a graceful shutdown's last reply: the write side is shut (the client sees the
    /// end of its replies), and what the client still sends is read and dropped until it
    /// closes too or goes quiet for [`LINGER_QUIET`], for at most [`LINGER`]. Closing a
    /// socket with unread input makes the kernel reset the connection, which drops the
    /// replies not yet delivered from the send buffer: a client still pipelining lost
    /// replies to requests the shards had applied.
    async fn linger(&mut self) {
        let mut sink = Vec::with_capacity(READ_CHUNK);
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                sink.clear();
                let read = std::future::poll_fn(|cx| self.rd.poll_read_vec(cx, &mut sink));
                match tokio::time::timeout(LINGER_QUIET, read).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
            }
        })
        .await;
    }

    /// Turns of parse, write, wait until the client closes or slotgate closes it (limits,
    /// CLIENT KILL, idle, a write error).
    async fn turns(&mut self, s: &mut Session) {
        loop {
            let bounded = self.parse(s);
            if self.rbuf.len() > self.qbuf_limit {
                tracing::warn!(
                    client = s.id,
                    "closing client that reached max query buffer length"
                );
                return;
            }
            // CLIENT KILL, a lost subscriber connection (the client reconnects and
            // resubscribes), the output buffer limit, a reload, a drain. (A flag raised while
            // the session waited wakes it without a read, so what `parse` just ran was read
            // before the flag: a reload applies from the next command on.)
            if s.queue.attention() != 0 && !self.attend(s) {
                return;
            }
            if !self.write_ready(s) || s.queue.must_close() {
                s.log_close();
                return;
            }
            if (s.closing || self.eof)
                && s.queue.is_empty()
                && self.out.is_empty()
                && !self.flushing
            {
                return;
            }
            let room = s.queue.has_room(s.max_pipeline);
            if bounded && room {
                // Parsing stopped at the pipeline bound and the replies written since made
                // room: the commands still buffered are parsed now, since the client may have
                // sent everything and be waiting for them.
                continue;
            }
            // (A blocked client is read even behind a barrier: its going away must close
            // the blocking command's connection.)
            let can_read = !s.closing && !self.eof && (!s.barrier || s.blocked.is_some()) && room;
            self.size_rbuf(can_read);
            if self.reads_in_a_row >= READS_BEFORE_YIELD {
                // A client that always has more input must let the worker's other sessions
                // run (tokio's reads spent its cooperative budget for this; `netio`'s do
                // not). The read scratch is empty here.
                self.reads_in_a_row = 0;
                tokio::task::yield_now().await;
            }
            let idle = self.arm_idle(s);
            let soft = self.arm_soft(s);
            let woke = std::future::poll_fn(|cx| self.poll_wake(s, cx, can_read, idle, soft)).await;
            match woke {
                Wake::Queue | Wake::Wrote => {}
                Wake::WriteFailed => return,
                // The client closed its side: answer what it sent, then close — unless a
                // blocking command is waiting (it may never return): then close now, which
                // closes its dedicated connection and unblocks the shard.
                Wake::Read(Ok(0)) if s.blocked.is_some() => return,
                Wake::Read(Ok(0)) => self.eof = true,
                Wake::Read(Ok(_)) => self.reads_in_a_row += 1,
                Wake::Read(Err(_)) => return,
                Wake::Idle => {
                    tracing::debug!(client = s.id, "closing idle client");
                    return;
                }
            }
        }
    }

    /// What the session was flagged for (see `queue::Attention`): a reload, a graceful
    /// shutdown, or a reason to close (`false`: close now). A drain reads nothing more and
    /// closes once everything read has been answered, as when the client closes its side (a
    /// partial command is not a request yet).
    #[cold]
    fn attend(&mut self, s: &mut Session) -> bool {
        let flags = s.queue.attention();
        if flags & Attention::RELOAD != 0 {
            s.queue.unflag(Attention::RELOAD);
            self.reloaded(s);
        }
        if flags & Attention::SUB_FAILED != 0 {
            s.queue.unflag(Attention::SUB_FAILED);
            s.subs.drop_failed();
            s.update_output_class();
        }
        if flags & Attention::FOLLOW != 0 {
            s.queue.unflag(Attention::FOLLOW);
            s.follow_redirects();
        }
        if flags & Attention::MAIL != 0 {
            s.queue.unflag(Attention::MAIL);
            let cx = cx!(s);
            crate::session::tracking::read_mail(&cx, &s.mail, &s.subs, &s.login);
        }
        if flags & Attention::RESUME != 0 {
            // (`parse` has already tried the held command again.)
            s.queue.unflag(Attention::RESUME);
        }
        if flags & Attention::EXPIRED != 0 {
            s.queue.unflag(Attention::EXPIRED);
            tracing::debug!(
                client = s.id,
                user = s.user_name(),
                "closing client: its token expired"
            );
            if s.blocked.is_some() {
                // A blocking command may never return: the client is closed now.
                return false;
            }
            // What it sent before is answered; nothing more is read (as in a drain).
            self.drained = !self.eof;
            self.eof = true;
        }
        if flags & Attention::DRAIN != 0 {
            s.queue.unflag(Attention::DRAIN);
            self.drained = !self.eof;
            self.eof = true;
        }
        if s.queue.must_close() {
            // CLIENT KILL, a removed user, a lost subscriber connection, the output limit.
            s.log_close();
            return false;
        }
        true
    }

    /// After a reload: the session and this connection take up the new limits.
    fn reloaded(&mut self, s: &mut Session) {
        s.reloaded();
        let live = self.w.live().clone();
        self.limits.max_bulk_len = live.proto_max_bulk_len;
        self.qbuf_limit = live.client_query_buffer_limit;
        if self.idle_timeout != live.idle_timeout {
            self.idle_timeout = live.idle_timeout;
            self.idle_sleep = live.idle_timeout.map(|d| Box::pin(tokio::time::sleep(d)));
        }
    }

    /// Parses and dispatches what was read; `true` when parsing stopped at the pipeline bound.
    #[inline]
    fn parse(&mut self, s: &mut Session) -> bool {
        if self.in_scratch {
            self.in_scratch = false;
            let mut sc = self.w.read_scratch.borrow_mut();
            let (used, bounded) = s.process(&mut self.parser, &sc, &self.limits);
            if used < sc.len() {
                // A partial command (or commands past the pipeline bound) stays with the
                // session; the scratch is the next reader's.
                self.rbuf.extend_from_slice(&sc[used..]);
            }
            sc.clear();
            bounded
        } else if !self.rbuf.is_empty() || s.deferred.is_some() || s.blocked.is_some() || s.barrier
        {
            // (Parsing also ends a barrier, a deferred command and a finished blocking one.)
            let (used, bounded) = s.process(&mut self.parser, &self.rbuf, &self.limits);
            self.rbuf.advance(used);
            bounded
        } else {
            // Nothing to parse and nothing held back (woken by a reply): skip the call.
            // (Every state `process` ends must be in the condition above.)
            false
        }
    }

    /// Writes what is ready: first what the socket did not take last time (`out`), then
    /// replies from the queue through the worker's scratch, at most `WRITE_CHUNK` at a time
    /// (larger replies stay in the queue, uncopied, until the socket takes them), for as long
    /// as the socket takes everything. What it does not take stays in `out`, which the wait
    /// writes as the socket drains, while the session goes on reading and dispatching as
    /// Redis does: a client that does not read is closed by its output buffer limit, never
    /// waited on. `false` when the write failed.
    #[inline]
    fn write_ready(&mut self, s: &mut Session) -> bool {
        let mut wrote = false;
        let mut failed = false;
        if !self.out.is_empty() {
            match self
                .wr
                .poll_write_now(&mut Context::from_waker(&self.task), &self.out)
            {
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    s.queue.sub_out_bytes(n);
                    wrote = n > 0;
                }
                Poll::Ready(Err(_)) => failed = true,
                Poll::Pending => {}
            }
        }
        let mut turn_bytes = 0;
        while self.out.is_empty() && !failed {
            let mut sc = self.w.write_scratch.borrow_mut();
            let n = s.queue.drain_ready(&mut sc, WRITE_CHUNK);
            if let Some(t) = &s.tracking {
                // (Invalidations that wait for replies just drained follow them.)
                t.written();
            }
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
            match self
                .wr
                .poll_write_now(&mut Context::from_waker(&self.task), &sc)
            {
                Poll::Ready(Ok(n)) => self.out.extend_from_slice(&sc[n..]),
                Poll::Ready(Err(_)) => failed = true,
                Poll::Pending => self.out.extend_from_slice(&sc),
            }
            sc.clear();
            if sc.capacity() > KEEP_BUF {
                *sc = BytesMut::new();
            }
            if !self.out.is_empty() {
                // Still the client's output buffer until the socket takes it.
                s.queue.add_out_bytes(self.out.len());
                break;
            }
            // Less than a chunk: the drain stopped at a reply not ready yet.
            if chunk < WRITE_CHUNK || !s.queue.front_ready() {
                break;
            }
            if turn_bytes >= TURN_WRITE_MAX {
                // More is ready for a fast reader: continue after the worker's other tasks.
                s.queue.notify.notify_one();
                self.reads_in_a_row = READS_BEFORE_YIELD;
                break;
            }
        }
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        if wrote || self.flushing {
            // A no-op on plain TCP; pushes TLS records out.
            match Pin::new(&mut self.wr).poll_flush(&mut Context::from_waker(&self.task)) {
                Poll::Ready(Ok(())) => self.flushing = false,
                Poll::Ready(Err(_)) => failed = true,
                Poll::Pending => self.flushing = true,
            }
        }
        !failed
    }

    /// Lets go of the read buffer when nothing partial is in it, and makes room when reading.
    #[inline]
    fn size_rbuf(&mut self, can_read: bool) {
        if self.rbuf.is_empty() {
            if self.rbuf.capacity() > 0 {
                self.rbuf = BytesMut::new();
            }
        } else if can_read && self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
    }

    /// Arms the idle timer when the client is idle: nothing in flight and nothing read for
    /// `idle_timeout` (Redis's `timeout`; like Redis, it does not apply to subscribed
    /// clients, nor to one whose command a CLIENT PAUSE holds). Whether it is armed.
    #[inline]
    fn arm_idle(&mut self, s: &Session) -> bool {
        match (self.idle_timeout, self.idle_sleep.as_mut()) {
            (Some(d), Some(sleep))
                if s.queue.is_empty() && self.out.is_empty() && !s.subscribed() && !s.held =>
            {
                sleep.as_mut().reset(Instant::now() + d);
                true
            }
            _ => false,
        }
    }

    /// Arms the soft output limit's timer while the client is not keeping up with its
    /// replies and is over that limit: it is closed once that has lasted too long, even if
    /// nothing else happens meanwhile. Whether it is armed.
    #[inline]
    fn arm_soft(&mut self, s: &Session) -> bool {
        if self.out.is_empty() {
            return false;
        }
        soft_timer(s, &mut self.soft_sleep)
    }

    /// One poll of the wait: a reply (the queue's notify), room in the client's socket, the
    /// soft limit's timer, input, or the idle timer. The read is polled only when it may have
    /// become ready: see `FlagWaker`.
    #[inline]
    fn poll_wake(
        &mut self,
        s: &mut Session,
        cx: &mut Context<'_>,
        can_read: bool,
        idle: bool,
        soft: bool,
    ) -> Poll<Wake> {
        if s.queue.notify.poll_notified(cx).is_ready() {
            return Poll::Ready(Wake::Queue);
        }
        if !self.out.is_empty() {
            match self.wr.poll_write_now(cx, &self.out) {
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    s.queue.sub_out_bytes(n);
                    return Poll::Ready(Wake::Wrote);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Wake::WriteFailed),
                Poll::Pending => {}
            }
        } else if self.flushing {
            match Pin::new(&mut self.wr).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.flushing = false;
                    return Poll::Ready(Wake::Wrote);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Wake::WriteFailed),
                Poll::Pending => {}
            }
        }
        if soft
            && let Some(sleep) = self.soft_sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            s.queue.check_soft_limit();
            return Poll::Ready(Wake::Queue);
        }
        if can_read && (!self.read_armed || self.read_flag.take()) {
            let mut rcx = Context::from_waker(&self.read_waker);
            let polled = if self.rbuf.is_empty() {
                // Into the worker's scratch, parsed from there at the top of the loop (no
                // other session runs in between: the scratch is empty again by then).
                let mut sc = self.w.read_scratch.borrow_mut();
                // Always empty here; cleared anyway, so that no bytes of one client can ever
                // be read as another's.
                debug_assert!(sc.is_empty());
                sc.clear();
                if sc.capacity() < SCRATCH {
                    sc.reserve(SCRATCH);
                }
                let polled = self.rd.poll_read_vec(&mut rcx, &mut sc);
                self.in_scratch = !sc.is_empty();
                polled
            } else {
                self.rd.poll_read_bytes(&mut rcx, &mut self.rbuf)
            };
            match polled {
                Poll::Ready(r) => {
                    self.read_armed = false;
                    return Poll::Ready(Wake::Read(r));
                }
                Poll::Pending => {
                    self.read_armed = true;
                    self.reads_in_a_row = 0;
                }
            }
        }
        if idle
            && let Some(sleep) = self.idle_sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Wake::Idle);
        }
        Poll::Pending
    }
}

/// The timer for the soft output limit, armed while the client's output is over it; whether
/// it is armed.
#[cold]
fn soft_timer(s: &Session, timer: &mut Option<Pin<Box<Sleep>>>) -> bool {
    let Some(at) = s.queue.soft_deadline() else {
        return false;
    };
    match timer {
        Some(sleep) => {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
        }
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    true
}
