//! The narrow context a command handler gets instead of the whole `Session`: the worker,
//! where the client's replies go, its protocol, the command being run, and who the client is.
//! A handler that holds a `Cx` and its own state (`Login`, `Subs` …) cannot reach a
//! transaction, a subscription or the connection loop it was not given.
//!
//! The route-class handlers that send to shards (`single`, `scatter`, `all_shards`, the
//! read-through requests) get a [`Fwd`]: a `Cx`, plus which of the worker's connections the
//! client's requests use, its tracking state (a tracking client reads from primaries) and the
//! session's reused key-index buffer.

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;

use crate::command::CommandSpec;
use tokio::time::Instant;

use crate::fanout::{Gather, GatherKind};
use crate::queue::{ReplyQueue, Slot, Target};
use crate::resp::reply::Proto;
use crate::shard::Upstream;
use crate::worker::Worker;

/// The context of a handler that sends the command to shards (see the module's doc).
pub(crate) struct Fwd<'s> {
    pub(crate) cx: Cx<'s>,
    /// Which of the per-shard shared connections the client's requests use.
    pub(crate) conn: usize,
    pub(crate) tracking: Option<&'s Rc<crate::tracking::Client>>,
    /// Reused buffer of key argument indices.
    pub(crate) keys: &'s mut Vec<usize>,
}

pub(crate) struct Cx<'s> {
    pub(crate) w: &'s Rc<Worker>,
    pub(crate) queue: &'s Rc<ReplyQueue>,
    pub(crate) proto: Proto,
    /// The command being run (INFO errorstats counts its errors).
    pub(crate) cmd: Option<&'static CommandSpec>,
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
}

impl Cx<'_> {
    /// Queues a reply that is ready now (an error is counted against the command).
    pub(crate) fn reply(&self, b: Bytes) {
        if b.first() == Some(&b'-') {
            crate::metrics::note_error(self.cmd.map(|c| c.name), &b, false);
        }
        self.queue.push_ready(b);
    }

    pub(crate) fn reply_static(&self, b: &'static [u8]) {
        self.reply(Bytes::from_static(b));
    }

    /// Sends `raw` on `up`, failing at `deadline`; its reply fills `slot`, the next of the
    /// queue.
    pub(crate) fn send_until(&self, slot: Slot, up: &Upstream, raw: &[u8], deadline: Instant) {
        let seq = self.queue.push_waiting(slot);
        let target = Target::Client {
            queue: self.queue.clone(),
            seq,
            part: 0,
        };
        up.send_until(raw, target, deadline);
    }
    /// Sends `raw` to every shard on its control connection (never queued behind client
    /// traffic or a busy script) and merges the replies; each fails at `deadline`.
    pub(crate) fn gather_on_control(&self, kind: GatherKind, raw: &[u8], deadline: Instant) {
        let n = self.w.live().slot_map.shard_count();
        let mut g = Gather::new(kind, n, self.proto);
        g.cmd = self.cmd;
        let seq = self.queue.push_waiting(Slot::Gather(Box::new(g)));
        for shard in 0..n {
            let up = self.w.pools().control(shard);
            let target = Target::Client {
                queue: self.queue.clone(),
                seq,
                part: shard as u32,
            };
            up.send_until(raw, target, deadline);
        }
    }
}
