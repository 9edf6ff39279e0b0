//! A session's in-order reply queue, and the [`Target`] a shard connection delivers a reply to.
//!
//! Each command a session reads takes the next sequence number and a slot in its queue. A
//! local reply fills the slot at once; a forwarded command's slot is filled when its shard
//! answers (the shard connection holds a [`Target`] naming the queue and the sequence number).
//! The session writes replies from the front as they become ready, so replies leave in
//! request order whichever shard answers first (Envoy's "flush out what we can").
//!
//! Everything here lives on one worker thread: `Rc` and `RefCell`, no locks, no atomics.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::fanout::Gather;
use crate::notify::LocalNotify;
use crate::units::parse_bytes;
use std::time::Duration;

/// One command's reply, in request order.
pub enum Slot {
    /// Forwarded; waiting for its shard. Names its command (when known) for INFO's
    /// `failed_calls`.
    Waiting(Option<&'static crate::command::CommandSpec>),
    /// Ready to be written.
    Ready(Bytes),
    /// Split over several shards; merged when every part has arrived.
    Gather(Box<Gather>),
}

#[derive(Default)]
struct Inner {
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
    /// Slots not yet `Ready`.
    waiting: usize,
}

/// The reply queue of one client session.
#[derive(Default)]
pub struct ReplyQueue {
    inner: RefCell<Inner>,
    /// Woken when a waiting slot becomes ready (or a pub/sub frame arrives). Only the
    /// owning session's task waits on it.
    pub notify: LocalNotify,
    /// Out-of-band frames from the client's subscriber connections (pub/sub messages and
    /// subscription confirmations), written as they arrive.
    pushes: RefCell<VecDeque<Bytes>>,
    /// What the session must look at before its next turn, as bits (see [`Attention`]): one
    /// load per turn covers them all.
    flags: Cell<u16>,
    /// Bytes of out-of-band frames not yet written.
    pushed_bytes: Cell<usize>,
    /// The reply at the front was written in part: out-of-band frames wait until its rest
    /// is written (a push must never land inside a reply).
    cut: Cell<bool>,
    /// Requests of this client that timed out but whose replies the shard has yet to send:
    /// they still count against the client's pipeline bound (see [`Target::expire`]).
    abandoned: Cell<usize>,
    /// The client's output buffer, as Redis counts it: bytes of replies that are ready (in
    /// any slot, also behind one still waiting), out-of-band frames, and what the session
    /// holds for a socket that did not take it yet.
    out_bytes: Cell<usize>,
    /// Bytes of late replies to this client's timed-out requests, read from the shard and
    /// dropped since its output buffer was last empty. They count against its limit as if
    /// they had been queued (Redis would have queued them): a client that keeps a shard busy
    /// with replies it never gets to read is closed like one that does not read.
    late_bytes: Cell<usize>,
    /// Moving average of the size of this client's replies from shards (0: none yet).
    reply_avg: Cell<usize>,
    /// The client's output buffer limit (its class: normal, or pubsub while subscribed).
    limit: Cell<OutputLimit>,
    /// The smaller of the limit's non-zero hard and soft bytes (`usize::MAX`: no limit): the
    /// one comparison the hot path makes.
    alarm: Alarm,
    /// Since when the output buffer is at or over the soft limit.
    soft_since: Cell<Option<std::time::Instant>>,
    /// The session ended: replies still arriving are dropped at once.
    closed: Cell<bool>,
    /// CLIENT REPLY OFF/SKIP: ranges `[from, to)` of sequence numbers whose replies are
    /// dropped instead of written (`to` is `u64::MAX` while open). Checked only when
    /// `muting` is set.
    muted: RefCell<VecDeque<(u64, u64)>>,
    muting: Cell<bool>,
    /// The client's address (the slow log names it).
    client: Cell<Option<std::net::SocketAddr>>,
    /// Hot keys: one more than the lowest sequence number of the sampled reads whose
    /// replies' sizes are wanted (0: none; see [`ReplyQueue::probe`]), and those reads.
    probe_min: Cell<u64>,
    probes: RefCell<VecDeque<(u64, Probe)>>,
    /// The worker's book the probes' sizes go to (set with the first probe).
    book: std::cell::OnceCell<std::sync::Arc<crate::hotkeys::Book>>,
}

/// Sampled reads whose replies a client may have pending at once (a pipeline).
const PROBES_MAX: usize = 16;

/// A sampled single-key read whose reply's size goes to a worker's big replies.
pub struct Probe {
    pub key: crate::hotkeys::SmallKey,
    pub shard: std::net::SocketAddr,
    /// When the read was sampled (its window).
    pub at: std::time::Instant,
}

/// Writes reply `b` into `out` within `room` bytes: `true` when all of it went (its slot is
/// done); else what fits was written, `b` keeps the rest, and the drain stops.
#[inline(always)]
fn copy_reply(b: &mut Bytes, out: &mut BytesMut, room: usize, cut: &Cell<bool>) -> bool {
    if room == 0 {
        return false;
    }
    if b.len() > room {
        out.extend_from_slice(&b[..room]);
        *b = b.slice(room..);
        cut.set(true);
        return false;
    }
    out.extend_from_slice(b);
    cut.set(false);
    true
}

/// The bits of [`ReplyQueue::attention`].
pub struct Attention;

impl Attention {
    /// CLIENT KILL named this client (or a reload removed its user).
    pub const KILLED: u16 = 1;
    /// A subscriber connection was lost.
    pub const SUB_LOST: u16 = 2;
    /// The output buffer went over its limit.
    pub const OVERFLOW: u16 = 4;
    /// The worker took up a reload: the session re-reads its user and limits.
    pub const RELOAD: u16 = 8;
    /// A graceful shutdown: the session reads nothing more, answers what it has read, then
    /// closes.
    pub const DRAIN: u16 = 16;
    /// A CLIENT PAUSE ended: a command it held is tried again.
    pub const RESUME: u16 = 32;
    /// A subscriber connection failed before any subscription began on it: the session
    /// forgets them (see `Session::drop_failed_subscriptions`).
    pub const SUB_FAILED: u16 = 64;
    /// The token the client authenticated with expired: like a drain, it reads nothing more,
    /// gets the replies of what it sent, then is closed.
    pub const EXPIRED: u16 = 128;
    /// Cluster mode: a request on a dedicated connection (a blocking command, a transaction,
    /// a WATCH) was redirected; the session sends it where it goes (see `session::follow`).
    pub const FOLLOW: u16 = 256;
    /// Invalidations of clients that redirect their tracking here are in this session's
    /// mailbox (see `tracking::Mail`).
    pub const MAIL: u16 = 512;
    /// The bits that close the session.
    pub const CLOSE: u16 = Self::KILLED | Self::SUB_LOST | Self::OVERFLOW;
}

/// An output buffer size that needs a look at the limits; `usize::MAX` (never) by default.
struct Alarm(Cell<usize>);

impl Default for Alarm {
    fn default() -> Self {
        Alarm(Cell::new(usize::MAX))
    }
}

/// Expected bytes of replies one client may have in flight at the shards (see
/// [`ReplyQueue::has_room`]).
pub const INFLIGHT_REPLY_BUDGET: usize = 32 * 1024 * 1024;
/// Requests a client may have in flight before the size of its replies is known.
pub const FIRST_WINDOW: usize = 64;

impl ReplyQueue {
    pub fn new() -> Rc<Self> {
        Rc::new(ReplyQueue::default())
    }

    /// Appends a reply that is ready now.
    pub fn push_ready(&self, reply: Bytes) {
        self.add_out_bytes(reply.len());
        self.inner.borrow_mut().slots.push_back(Slot::Ready(reply));
    }

    /// Appends a slot to be filled later; returns its sequence number.
    pub fn push_waiting(&self, slot: Slot) -> u64 {
        let mut q = self.inner.borrow_mut();
        let seq = q.base + q.slots.len() as u64;
        q.slots.push_back(slot);
        q.waiting += 1;
        seq
    }

    /// Fills part `part` of slot `seq` (part 0 for a single-shard command).
    pub fn deliver(&self, seq: u64, part: u32, reply: Bytes) {
        if self.closed.get() {
            return;
        }
        let mut q = self.inner.borrow_mut();
        let Some(idx) = seq.checked_sub(q.base) else {
            return;
        };
        let Some(slot) = q.slots.get_mut(idx as usize) else {
            return;
        };
        let (ready, cmd) = match slot {
            Slot::Waiting(cmd) => (Some(reply), *cmd),
            Slot::Gather(g) => (g.put(part as usize, reply), g.cmd),
            Slot::Ready(_) => (None, None),
        };
        if let Some(reply) = ready {
            if reply.first() == Some(&b'-') {
                crate::metrics::note_error(cmd.map(|c| c.name), &reply, false);
            }
            let len = reply.len();
            *slot = Slot::Ready(reply);
            q.waiting -= 1;
            let front_ready = matches!(q.slots.front(), Some(Slot::Ready(_)));
            drop(q);
            if self.probe_min.get().wrapping_sub(1) <= seq {
                self.probed(seq, len);
            }
            self.sample_reply(len);
            self.add_out_bytes(len);
            if front_ready {
                self.notify.notify_one();
            }
        }
    }

    /// Moves the ready replies at the front into `out`, up to about `max` bytes (a reply
    /// that does not fit is cut: its rest stays at the front, as a slice of the same
    /// buffer); returns how many replies were moved whole. What stays here is not copied,
    /// so a client that reads slowly costs its replies once, not twice.
    #[inline]
    pub fn drain_ready(&self, out: &mut BytesMut, max: usize) -> usize {
        if !self.front_ready() {
            return 0;
        }
        self.drain_ready_slow(out, max)
    }

    fn drain_ready_slow(&self, out: &mut BytesMut, max: usize) -> usize {
        if self.muting.get() {
            return self.drain_ready_muting(out, max);
        }
        let mut q = self.inner.borrow_mut();
        let mut n = 0;
        let before = out.len();
        while let Some(Slot::Ready(b)) = q.slots.front_mut() {
            if !copy_reply(b, out, max.saturating_sub(out.len() - before), &self.cut) {
                break;
            }
            q.slots.pop_front();
            q.base += 1;
            n += 1;
        }
        drop(q);
        self.sub_out_bytes(out.len() - before);
        n
    }

    /// [`drain_ready`](Self::drain_ready) while CLIENT REPLY mutes some replies: those are
    /// dropped instead of written.
    #[cold]
    fn drain_ready_muting(&self, out: &mut BytesMut, max: usize) -> usize {
        let mut q = self.inner.borrow_mut();
        let mut n = 0;
        let before = out.len();
        let mut dropped = 0;
        loop {
            let base = q.base;
            let Some(Slot::Ready(b)) = q.slots.front_mut() else {
                break;
            };
            if self.is_muted(base) {
                dropped += b.len();
            } else if !copy_reply(b, out, max.saturating_sub(out.len() - before), &self.cut) {
                break;
            }
            q.slots.pop_front();
            q.base += 1;
            n += 1;
        }
        drop(q);
        self.sub_out_bytes(out.len() - before + dropped);
        n
    }

    /// Whether the reply with sequence number `seq` is muted (CLIENT REPLY); forgets the
    /// ranges that end before it.
    #[cold]
    fn is_muted(&self, seq: u64) -> bool {
        let mut m = self.muted.borrow_mut();
        while m.front().is_some_and(|&(_, to)| to <= seq) {
            m.pop_front();
        }
        if m.is_empty() {
            self.muting.set(false);
        }
        m.front().is_some_and(|&(from, _)| from <= seq)
    }

    /// Whether CLIENT REPLY OFF is in force now (a mute range still open).
    #[cold]
    fn muted_open(&self) -> bool {
        self.muted
            .borrow()
            .back()
            .is_some_and(|&(_, to)| to == u64::MAX)
    }

    /// CLIENT REPLY OFF/SKIP: replies from sequence number `from` on are dropped until
    /// [`unmute`](Self::unmute).
    pub fn mute(&self, from: u64) {
        if !self.muted_open() {
            self.muted.borrow_mut().push_back((from, u64::MAX));
        }
        self.muting.set(true);
    }

    /// CLIENT REPLY ON (or the end of a SKIP): replies from `at` on are written again.
    pub fn unmute(&self, at: u64) {
        let mut m = self.muted.borrow_mut();
        if let Some(last) = m.back_mut()
            && last.1 == u64::MAX
        {
            last.1 = at;
            if last.0 >= at {
                m.pop_back();
            }
        }
    }

    /// Names the client these replies go to.
    pub fn set_client(&self, addr: std::net::SocketAddr) {
        self.client.set(Some(addr));
    }

    pub fn client(&self) -> Option<std::net::SocketAddr> {
        self.client.get()
    }

    /// The command of reply slot `seq`, while it waits, for the slow log: once per command
    /// (a command split over shards is one entry, named at its first slow part).
    pub fn slow_command(&self, seq: u64) -> Option<&'static str> {
        let mut q = self.inner.borrow_mut();
        let base = q.base;
        match q.slots.get_mut(seq.checked_sub(base)? as usize)? {
            Slot::Waiting(cmd) => cmd.map(|c| c.name),
            Slot::Gather(g) if !g.slow_logged => {
                g.slow_logged = true;
                g.cmd.map(|c| c.name)
            }
            Slot::Gather(_) | Slot::Ready(_) => None,
        }
    }

    /// Whether the reply at the front is ready to be written.
    #[inline]
    pub fn front_ready(&self) -> bool {
        matches!(self.inner.borrow().slots.front(), Some(Slot::Ready(_)))
    }

    /// Commands whose replies have not been written yet.
    pub fn len(&self) -> usize {
        self.inner.borrow().slots.len()
    }

    /// Whether the session may dispatch another command: its replies not yet written plus
    /// its timed-out requests whose replies the shard has yet to send (a client whose requests
    /// time out must not pile more onto a shard still working through the old ones) are under
    /// `max_pipeline`, and the replies it has in flight at the shards are expected to come to less than
    /// [`INFLIGHT_REPLY_BUDGET`] bytes (their count times the client's average reply size;
    /// [`FIRST_WINDOW`] requests before any reply has been seen). A client that asks for
    /// large values therefore keeps only a few in flight on the shared shard connection, and
    /// one that never reads cannot make a shard queue gigabytes of replies for it.
    #[inline]
    pub fn has_room(&self, max_pipeline: usize) -> bool {
        let q = self.inner.borrow();
        let abandoned = self.abandoned.get();
        if q.slots.len() + abandoned >= max_pipeline {
            return false;
        }
        let inflight = q.waiting + abandoned;
        match self.reply_avg.get() {
            0 => inflight < FIRST_WINDOW,
            avg => inflight.saturating_mul(avg) < INFLIGHT_REPLY_BUDGET,
        }
    }

    /// Asks for the size of the reply that will fill slot `seq` (a sampled read; see
    /// `hotkeys`). A pipeline may have several; past [`PROBES_MAX`] the oldest is dropped.
    pub fn probe(&self, seq: u64, probe: Probe, book: &std::sync::Arc<crate::hotkeys::Book>) {
        self.book.get_or_init(|| book.clone());
        let mut probes = self.probes.borrow_mut();
        if probes.len() == PROBES_MAX {
            probes.pop_front();
        }
        probes.push_back((seq, probe));
        let min = self.probe_min.get();
        if min == 0 || seq < min - 1 {
            self.probe_min.set(seq + 1);
        }
    }

    /// Records the size of slot `seq`'s reply if it was probed, and forgets probes whose
    /// replies are gone (written, or answered without a shard).
    #[cold]
    fn probed(&self, seq: u64, len: usize) {
        let found = {
            let mut probes = self.probes.borrow_mut();
            let at = probes.iter().position(|(s, _)| *s == seq);
            at.and_then(|i| probes.remove(i))
        };
        if let (Some((_, p)), Some(book)) = (found, self.book.get()) {
            book.record_size(p.at, p.key.as_slice(), len, p.shard);
        }
        self.prune_probes();
    }

    fn prune_probes(&self) {
        let base = self.inner.borrow().base;
        let mut probes = self.probes.borrow_mut();
        probes.retain(|(s, _)| *s >= base);
        let min = probes.iter().map(|(s, _)| *s + 1).min().unwrap_or(0);
        self.probe_min.set(min);
    }

    /// Folds a reply's size into the client's average (a moving average over about the last
    /// eight replies).
    #[inline]
    fn sample_reply(&self, len: usize) {
        let avg = self.reply_avg.get();
        self.reply_avg.set(if avg == 0 {
            len.max(1)
        } else {
            (avg * 7 + len) / 8 + 1
        });
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues an out-of-band pub/sub frame and wakes the session. A client that lets its
    /// messages pile up past its output buffer limit (it does not read) is disconnected, as
    /// Redis's `client-output-buffer-limit pubsub 32mb 8mb 60` does.
    pub fn push_oob(&self, frame: Bytes) {
        // (CLIENT REPLY OFF: messages and MONITOR lines are not written either.)
        if !(self.muting.get() && self.muted_open()) {
            self.queue_oob(frame);
        }
    }

    /// Queues an out-of-band frame that CLIENT REPLY OFF does not hold back (Redis writes
    /// its pushes, client-side caching's invalidations, whatever the reply mode).
    pub fn push_oob_always(&self, frame: Bytes) {
        self.queue_oob(frame);
    }

    fn queue_oob(&self, frame: Bytes) {
        if self.closed.get() {
            return;
        }
        self.add_out_bytes(frame.len());
        if self.overflowed() {
            // Dropped, and the client is closed: memory stays bounded.
            self.sub_out_bytes(frame.len());
        } else {
            self.pushed_bytes.set(self.pushed_bytes.get() + frame.len());
            self.pushes.borrow_mut().push_back(frame);
        }
        self.notify.notify_one();
    }

    /// Moves the out-of-band frames into `out` (not while the front reply is written in
    /// part: they follow its rest).
    #[inline]
    pub fn drain_pushes(&self, out: &mut BytesMut) {
        if self.pushed_bytes.get() != 0 && !self.cut.get() {
            self.drain_pushes_slow(out);
        }
    }

    #[cold]
    fn drain_pushes_slow(&self, out: &mut BytesMut) {
        for f in self.pushes.borrow_mut().drain(..) {
            out.extend_from_slice(&f);
        }
        self.sub_out_bytes(self.pushed_bytes.replace(0));
    }

    /// Sets the output buffer limit of the client's class.
    pub fn set_output_limit(&self, limit: OutputLimit) {
        self.limit.set(limit);
        let on = |b: usize| if b == 0 { usize::MAX } else { b };
        self.alarm.0.set(on(limit.hard).min(on(limit.soft)));
        self.add_out_bytes(0);
    }

    /// Counts `n` more bytes in the output buffer; closes the client (flags it and wakes the
    /// session) when that reaches the hard limit, or keeps it over the soft limit for longer
    /// than allowed — checked as bytes are added, as Redis does.
    #[inline]
    pub fn add_out_bytes(&self, n: usize) {
        let out = self.out_bytes.get() + n;
        self.out_bytes.set(out);
        let total = out + self.late_bytes.get();
        if total >= self.alarm.0.get() {
            self.over_limit(total);
        }
    }

    #[cold]
    fn over_limit(&self, total: usize) {
        let l = self.limit.get();
        let overflow = if l.hard != 0 && total >= l.hard {
            true
        } else {
            let now = std::time::Instant::now();
            match self.soft_since.get() {
                None => {
                    self.soft_since.set(Some(now));
                    false
                }
                Some(since) => now.duration_since(since) > l.soft_for,
            }
        };
        if overflow && !self.overflowed() {
            self.flag(Attention::OVERFLOW);
        }
    }

    /// Counts `n` bytes out of the output buffer (written, or dropped).
    #[inline]
    pub fn sub_out_bytes(&self, n: usize) {
        let out = self.out_bytes.get() - n;
        self.out_bytes.set(out);
        if out == 0 {
            // The client has read everything: late replies are forgiven.
            self.late_bytes.set(0);
        }
        if self.soft_since.get().is_some() && out + self.late_bytes.get() < self.limit.get().soft {
            self.soft_since.set(None);
        }
    }

    /// A late reply of `n` bytes to a timed-out request was read and dropped.
    fn late_reply(&self, n: usize) {
        if self.closed.get() {
            return;
        }
        self.late_bytes.set(self.late_bytes.get() + n);
        self.sample_reply(n);
        self.add_out_bytes(0);
    }

    /// When the output buffer will have been over the soft limit for too long, if it is over
    /// it now (a session blocked on a full socket checks then, as nothing else may arrive).
    pub fn soft_deadline(&self) -> Option<tokio::time::Instant> {
        let since = self.soft_since.get()?;
        Some((since + self.limit.get().soft_for).into())
    }

    /// Checks the soft limit now (see [`soft_deadline`](Self::soft_deadline)).
    pub fn check_soft_limit(&self) {
        self.add_out_bytes(0);
    }

    /// The client's output buffer in bytes.
    pub fn out_bytes(&self) -> usize {
        self.out_bytes.get()
    }

    /// The output buffer went over its limit.
    pub fn overflowed(&self) -> bool {
        self.flags.get() & Attention::OVERFLOW != 0
    }

    /// The session is gone: drops every reply it holds, and those that arrive later.
    pub fn close(&self) {
        self.closed.set(true);
        self.inner.borrow_mut().slots.clear();
        self.pushes.borrow_mut().clear();
    }

    /// Whether the session is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Sets a flag for the session's next turn and wakes it.
    pub fn flag(&self, bit: u16) {
        self.flags.set(self.flags.get() | bit);
        self.notify.notify_one();
    }

    /// Clears a flag the session has acted on (a reload, a drain).
    pub fn unflag(&self, bit: u16) {
        self.flags.set(self.flags.get() & !bit);
    }

    /// A subscriber connection was lost: the client is closed, so that it reconnects and
    /// resubscribes.
    pub fn mark_sub_lost(&self) {
        self.flag(Attention::SUB_LOST);
    }

    /// Flags the session as killed (CLIENT KILL) and wakes it.
    pub fn mark_killed(&self) {
        self.flag(Attention::KILLED);
    }

    pub fn killed(&self) -> bool {
        self.flags.get() & Attention::KILLED != 0
    }

    /// Whether anything needs the session's attention before its next turn (one load: the
    /// hot path's only check of all these).
    #[inline]
    pub fn attention(&self) -> u16 {
        self.flags.get()
    }

    /// The session must close: CLIENT KILL, a lost subscriber connection, or the output
    /// buffer limit.
    #[inline]
    pub fn must_close(&self) -> bool {
        self.flags.get() & Attention::CLOSE != 0
    }

    pub fn sub_lost(&self) -> bool {
        self.flags.get() & Attention::SUB_LOST != 0
    }

    /// The sequence number the next slot will get.
    pub fn next_seq(&self) -> u64 {
        let q = self.inner.borrow();
        q.base + q.slots.len() as u64
    }

    /// The sequence number of the oldest reply not yet written.
    pub fn base(&self) -> u64 {
        self.inner.borrow().base
    }

    /// Commands still waiting for a shard.
    pub fn waiting(&self) -> usize {
        self.inner.borrow().waiting
    }
}

/// Where a shard connection sends the reply it read.
pub enum Target {
    /// A client's reply slot.
    Client {
        queue: Rc<ReplyQueue>,
        seq: u64,
        part: u32,
    },
    /// A request the proxy made for itself (e.g. `HELLO 3` on a RESP3 connection).
    Discard,
    /// A client request that timed out (its client got the error); its late reply is dropped.
    Abandoned(Rc<ReplyQueue>),
    /// The connection's handshake (AUTH / HELLO): an error reply fails the connection.
    Handshake,
    /// A request of code above this layer (a read-through GET or MGET part).
    Sink(SinkRef),
}

/// What code above the shard connections implements to get replies (read-through: a GET
/// whose nil reply starts an origin fetch, an MGET's parts). `idx` tells its requests apart.
pub trait Sink {
    /// Request `idx` got its reply.
    fn deliver(self: Rc<Self>, idx: u32, reply: Bytes);
    /// Request `idx` will get no reply: its target was dropped undelivered.
    fn release(&self, _idx: u32) {}
}

/// One request of a [`Sink`]: delivered once, or released when dropped.
pub struct SinkRef {
    sink: Option<Rc<dyn Sink>>,
    idx: u32,
}

impl SinkRef {
    pub fn new(sink: Rc<dyn Sink>, idx: u32) -> Self {
        SinkRef {
            sink: Some(sink),
            idx,
        }
    }

    pub fn deliver(mut self, reply: Bytes) {
        if let Some(sink) = self.sink.take() {
            sink.deliver(self.idx, reply);
        }
    }
}

impl Drop for SinkRef {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink.release(self.idx);
        }
    }
}

impl Target {
    #[inline]
    pub fn deliver(self, reply: Bytes) {
        match self {
            Target::Client { queue, seq, part } => queue.deliver(seq, part, reply),
            Target::Discard | Target::Handshake => {}
            Target::Abandoned(queue) => {
                queue.abandoned.set(queue.abandoned.get() - 1);
                queue.late_reply(reply.len());
                // Room in the pipeline bound: commands the session holds back may go now.
                queue.notify.notify_one();
            }
            Target::Sink(s) => s.deliver(reply),
        }
    }

    /// Delivers the error of a request that timed out after it was sent, and returns what
    /// stays in the connection's FIFO until the late reply arrives: for a client's request, a
    /// ghost that keeps counting against the client's pipeline bound.
    pub fn expire(self, err: Bytes) -> Target {
        match self {
            Target::Client { queue, seq, part } => {
                queue.deliver(seq, part, err);
                queue.abandoned.set(queue.abandoned.get() + 1);
                Target::Abandoned(queue)
            }
            other => {
                other.deliver(err);
                Target::Discard
            }
        }
    }
}

/// One class of Redis's `client-output-buffer-limit`: a client whose replies not yet written
/// reach `hard` bytes, or stay at `soft` bytes or more for `soft_for`, is closed. 0 = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    pub hard: usize,
    pub soft: usize,
    pub soft_for: Duration,
}

impl Default for OutputLimit {
    /// No limit.
    fn default() -> Self {
        OutputLimit {
            hard: 0,
            soft: 0,
            soft_for: std::time::Duration::ZERO,
        }
    }
}

impl OutputLimit {
    /// `"<hard> <soft> <soft seconds>"`, as in redis.conf (e.g. `"256mb 64mb 60"`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [hard, soft, secs] = parts[..] else {
            return Err("expected '<hard> <soft> <soft seconds>', e.g. \"256mb 64mb 60\"".into());
        };
        let secs: u64 = secs
            .parse()
            .map_err(|_| format!("'{secs}' is not a number of seconds"))?;
        Ok(OutputLimit {
            hard: parse_bytes(hard)?,
            soft: parse_bytes(soft)?,
            soft_for: Duration::from_secs(secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::{Gather, GatherKind};
    use crate::resp::reply::Proto;

    fn drain(q: &ReplyQueue) -> Vec<u8> {
        let mut out = BytesMut::new();
        q.drain_ready(&mut out, usize::MAX);
        out.to_vec()
    }

    fn client(q: &Rc<ReplyQueue>, seq: u64) -> Target {
        Target::Client {
            queue: q.clone(),
            seq,
            part: 0,
        }
    }

    #[test]
    fn replies_leave_in_request_order_whatever_order_they_arrive_in() {
        let q = ReplyQueue::new();
        let a = q.push_waiting(Slot::Waiting(None));
        q.push_ready(Bytes::from_static(b"+local\r\n"));
        let b = q.push_waiting(Slot::Waiting(None));
        client(&q, b).deliver(Bytes::from_static(b":2\r\n"));
        assert_eq!(drain(&q), b"", "the first reply is not there yet");
        client(&q, a).deliver(Bytes::from_static(b":1\r\n"));
        assert_eq!(drain(&q), b":1\r\n+local\r\n:2\r\n");
        assert!(q.is_empty() && q.out_bytes() == 0);
        // A late or duplicate delivery to a written slot is ignored.
        client(&q, a).deliver(Bytes::from_static(b":9\r\n"));
        assert_eq!(drain(&q), b"");
    }

    /// A push (a pub/sub message, an invalidation) never lands inside a reply that is
    /// written in pieces: it waits for the reply's rest.
    #[test]
    fn a_push_waits_for_the_rest_of_a_reply_written_in_part() {
        let q = ReplyQueue::new();
        q.push_ready(Bytes::from_static(b"$6\r\nvalue!\r\n"));
        q.push_oob(Bytes::from_static(b">1\r\n$1\r\np\r\n"));
        let mut out = BytesMut::new();
        q.drain_ready(&mut out, 5);
        q.drain_pushes(&mut out);
        assert_eq!(&out[..], b"$6\r\nv");
        out.clear();
        q.drain_ready(&mut out, usize::MAX);
        q.drain_pushes(&mut out);
        assert_eq!(&out[..], b"alue!\r\n>1\r\n$1\r\np\r\n");
        assert_eq!(q.out_bytes(), 0);
    }

    #[test]
    fn a_split_command_is_one_reply_once_every_part_is_in() {
        let q = ReplyQueue::new();
        let g = Gather::new(GatherKind::SumIntegers, 2, Proto::Resp2);
        let seq = q.push_waiting(Slot::Gather(Box::new(g)));
        q.deliver(seq, 1, Bytes::from_static(b":3\r\n"));
        assert_eq!(drain(&q), b"");
        q.deliver(seq, 0, Bytes::from_static(b":4\r\n"));
        assert_eq!(drain(&q), b":7\r\n");
    }

    #[test]
    fn a_large_reply_is_written_in_pieces_without_a_copy_of_the_rest() {
        let q = ReplyQueue::new();
        q.push_ready(Bytes::from(vec![b'x'; 10]));
        q.push_ready(Bytes::from_static(b"+OK\r\n"));
        let mut out = BytesMut::new();
        assert_eq!(q.drain_ready(&mut out, 4), 0, "the first reply is cut");
        assert_eq!(&out[..], b"xxxx");
        assert_eq!(q.out_bytes(), 6 + 5);
        out.clear();
        assert_eq!(q.drain_ready(&mut out, 100), 2);
        assert_eq!(&out[..], b"xxxxxx+OK\r\n");
        assert_eq!(q.out_bytes(), 0);
    }

    #[test]
    fn timed_out_requests_keep_counting_until_their_late_reply() {
        let q = ReplyQueue::new();
        let seq = q.push_waiting(Slot::Waiting(None));
        let ghost = client(&q, seq).expire(Bytes::from_static(b"-ERR outcome unknown\r\n"));
        assert_eq!(drain(&q), b"-ERR outcome unknown\r\n");
        assert!(!q.has_room(1), "the abandoned request still counts");
        assert!(q.has_room(2));
        ghost.deliver(Bytes::from(vec![b'v'; 100]));
        assert!(q.has_room(1), "its late reply was read and dropped");
        assert_eq!(drain(&q), b"");
    }

    #[test]
    fn replies_in_flight_are_bounded_by_their_expected_bytes() {
        let q = ReplyQueue::new();
        // Before any reply: a first window of requests.
        for _ in 0..FIRST_WINDOW {
            assert!(q.has_room(usize::MAX));
            q.push_waiting(Slot::Waiting(None));
        }
        assert!(!q.has_room(usize::MAX));
        // Replies of 4 MiB: the budget holds 8 of them.
        let q = ReplyQueue::new();
        let first = q.push_waiting(Slot::Waiting(None));
        q.deliver(first, 0, Bytes::from(vec![b'v'; 4 << 20]));
        drain(&q);
        let mut n = 0;
        while q.has_room(usize::MAX) {
            q.push_waiting(Slot::Waiting(None));
            n += 1;
        }
        assert_eq!(n, INFLIGHT_REPLY_BUDGET / (4 << 20));
    }

    #[test]
    fn output_limits_close_a_client_over_the_hard_limit_or_too_long_over_the_soft_one() {
        let q = ReplyQueue::new();
        q.set_output_limit(OutputLimit {
            hard: 100,
            soft: 0,
            soft_for: Duration::ZERO,
        });
        q.push_ready(Bytes::from(vec![b'x'; 99]));
        assert!(!q.must_close());
        q.push_ready(Bytes::from_static(b"+"));
        assert!(q.must_close() && q.overflowed());

        let q = ReplyQueue::new();
        q.set_output_limit(OutputLimit {
            hard: 0,
            soft: 10,
            soft_for: Duration::from_secs(3600),
        });
        q.push_ready(Bytes::from(vec![b'x'; 20]));
        assert!(
            q.soft_deadline().is_some(),
            "over the soft limit: the clock runs"
        );
        assert!(!q.must_close(), "not for long enough");
        drain(&q);
        assert!(
            q.soft_deadline().is_none(),
            "back under it: the clock stops"
        );

        let q = ReplyQueue::new();
        q.set_output_limit(OutputLimit {
            hard: 0,
            soft: 10,
            soft_for: Duration::ZERO,
        });
        q.push_ready(Bytes::from(vec![b'x'; 20]));
        std::thread::sleep(Duration::from_millis(2));
        q.check_soft_limit();
        assert!(
            q.must_close(),
            "over the soft limit for longer than allowed"
        );
    }

    #[test]
    fn a_sink_request_is_delivered_once_or_released_when_dropped() {
        #[derive(Default)]
        struct Seen(RefCell<Vec<String>>);
        impl Sink for Seen {
            fn deliver(self: Rc<Self>, idx: u32, reply: Bytes) {
                self.0
                    .borrow_mut()
                    .push(format!("{idx}:{}", String::from_utf8_lossy(&reply)));
            }
            fn release(&self, idx: u32) {
                self.0.borrow_mut().push(format!("{idx}:released"));
            }
        }
        let seen = Rc::new(Seen::default());
        Target::Sink(SinkRef::new(seen.clone(), 1)).deliver(Bytes::from_static(b"a"));
        drop(Target::Sink(SinkRef::new(seen.clone(), 2)));
        assert_eq!(*seen.0.borrow(), ["1:a", "2:released"]);
    }
}
