//! A session's in-order reply queue, and the [`Target`] a shard connection delivers a reply to.
//!
//! Each command a session reads takes the next sequence number and a slot in its queue. A
//! local reply fills the slot at once; a forwarded command's slot is filled when its shard
//! answers (the shard connection holds a [`Target`] naming the queue and the sequence number).
//! The session writes replies from the front as they become ready, so replies leave in
//! request order whichever shard answers first (Envoy's "flush out what we can").
//!
//! Everything here lives on one worker thread: `Rc` and `RefCell`, no locks, no atomics.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::fanout::Gather;
use crate::notify::LocalNotify;

/// One command's reply, in request order.
pub enum Slot {
    /// Forwarded; waiting for its shard.
    Waiting,
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
    /// A subscriber connection was lost (or the client fell too far behind): the client is
    /// closed, so that it reconnects and resubscribes.
    sub_lost: std::cell::Cell<bool>,
    /// Bytes of out-of-band frames not yet written.
    pushed_bytes: std::cell::Cell<usize>,
    /// CLIENT KILL named this client.
    killed: std::cell::Cell<bool>,
}

/// Pub/sub bytes a client may have waiting before it is disconnected (Redis's default
/// `client-output-buffer-limit pubsub 32mb`).
pub const PUBSUB_OUTPUT_LIMIT: usize = 32 * 1024 * 1024;

impl ReplyQueue {
    pub fn new() -> Rc<Self> {
        Rc::new(ReplyQueue::default())
    }

    /// Appends a reply that is ready now.
    pub fn push_ready(&self, reply: Bytes) {
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
        let mut q = self.inner.borrow_mut();
        let Some(idx) = seq.checked_sub(q.base) else {
            return;
        };
        let Some(slot) = q.slots.get_mut(idx as usize) else {
            return;
        };
        let done = match slot {
            Slot::Waiting => {
                *slot = Slot::Ready(reply);
                true
            }
            Slot::Gather(g) => match g.put(part as usize, reply) {
                Some(merged) => {
                    *slot = Slot::Ready(merged);
                    true
                }
                None => false,
            },
            Slot::Ready(_) => false,
        };
        if done {
            q.waiting -= 1;
            let front_ready = matches!(q.slots.front(), Some(Slot::Ready(_)));
            drop(q);
            if front_ready {
                self.notify.notify_one();
            }
        }
    }

    /// Moves the ready replies at the front into `out`; returns how many.
    #[inline]
    pub fn drain_ready(&self, out: &mut BytesMut) -> usize {
        if !matches!(self.inner.borrow().slots.front(), Some(Slot::Ready(_))) {
            return 0;
        }
        self.drain_ready_slow(out)
    }

    fn drain_ready_slow(&self, out: &mut BytesMut) -> usize {
        let mut q = self.inner.borrow_mut();
        let mut n = 0;
        while let Some(Slot::Ready(_)) = q.slots.front() {
            if let Some(Slot::Ready(b)) = q.slots.pop_front() {
                out.extend_from_slice(&b);
            }
            q.base += 1;
            n += 1;
        }
        n
    }

    /// Commands whose replies have not been written yet.
    pub fn len(&self) -> usize {
        self.inner.borrow().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues an out-of-band pub/sub frame and wakes the session. A client that lets more
    /// than [`PUBSUB_OUTPUT_LIMIT`] bytes of messages pile up (it does not read) is
    /// disconnected, as Redis's `client-output-buffer-limit pubsub 32mb` does.
    pub fn push_oob(&self, frame: Bytes) {
        let queued: usize = self.pushed_bytes.get() + frame.len();
        if queued > PUBSUB_OUTPUT_LIMIT {
            // Dropped, and the client is closed: memory stays bounded.
            self.sub_lost.set(true);
        } else {
            self.pushed_bytes.set(queued);
            self.pushes.borrow_mut().push_back(frame);
        }
        self.notify.notify_one();
    }

    /// Moves the out-of-band frames into `out`.
    #[inline]
    pub fn drain_pushes(&self, out: &mut BytesMut) {
        if self.pushed_bytes.get() != 0 {
            self.drain_pushes_slow(out);
        }
    }

    #[cold]
    fn drain_pushes_slow(&self, out: &mut BytesMut) {
        for f in self.pushes.borrow_mut().drain(..) {
            out.extend_from_slice(&f);
        }
        self.pushed_bytes.set(0);
    }

    pub fn mark_sub_lost(&self) {
        self.sub_lost.set(true);
        self.notify.notify_one();
    }

    /// Flags the session as killed (CLIENT KILL) and wakes it.
    pub fn mark_killed(&self) {
        self.killed.set(true);
        self.notify.notify_one();
    }

    pub fn killed(&self) -> bool {
        self.killed.get()
    }

    pub fn sub_lost(&self) -> bool {
        self.sub_lost.get()
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
    /// The connection's handshake (AUTH / HELLO): an error reply fails the connection.
    Handshake,
    /// A GET of a read-through key: a nil reply starts the origin fetch.
    ReadThrough(crate::readthrough::PendingGetRef),
    /// One shard's part of an MGET that includes read-through keys.
    ReadThroughMget {
        state: Rc<RefCell<crate::readthrough::PendingMget>>,
        part: usize,
    },
}

impl Target {
    #[inline]
    pub fn deliver(self, reply: Bytes) {
        match self {
            Target::Client { queue, seq, part } => queue.deliver(seq, part, reply),
            Target::Discard | Target::Handshake => {}
            Target::ReadThrough(get) => get.on_reply(reply),
            Target::ReadThroughMget { state, part } => {
                crate::readthrough::PendingMget::on_part(state, part, reply)
            }
        }
    }
}
