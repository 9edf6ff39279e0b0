//! How a routed command reaches its shards, for every route class: one request whose reply
//! fills the client's next reply slot ([`Fwd::forward`]), or one per part, merged
//! ([`Fwd::gather`]). In cluster mode a read may go to a replica, and every request is
//! followed through MOVED/ASK redirects.

use bytes::Bytes;
use tokio::time::Instant;

use crate::command::{BeginSearch, CommandSpec, FindKeys, KeySpec, flags, keys};
use crate::fanout::{Gather, GatherKind};
use crate::queue::{Slot, Target};
use crate::resp::Request;
use crate::resp::reply;
use crate::router;
use crate::session::cx::Fwd;
use crate::settings::ReadFrom;
use crate::shard::Upstream;

impl Fwd<'_> {
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
        if keys::key_indices(spec, req.argc(), |i| req.arg(i), self.keys).is_err() {
            return Ok(None);
        }
        let mut slot = None;
        for &i in self.keys.iter() {
            let s = router::slot(req.arg(i));
            match slot {
                None => slot = Some(s),
                Some(x) if x != s => return Err(()),
                _ => {}
            }
        }
        Ok(slot)
    }

    /// The shared connection to `shard` that this client's requests use.
    #[inline]
    pub(crate) fn upstream(&self, shard: usize) -> std::rc::Rc<Upstream> {
        self.cx.w.pools().get(self.cx.proto, shard, self.conn)
    }

    /// Sends `raw` to `shard`; its reply fills the next slot of the queue.
    #[inline]
    pub(crate) fn forward(&self, shard: usize, raw: &[u8], now: Instant) {
        if self.cx.w.cluster {
            return self.forward_cluster(shard, raw, now);
        }
        let seq = self.cx.queue.push_waiting(Slot::Waiting(self.cx.cmd));
        let up = self.upstream(shard);
        up.send(raw, self.client_target(seq, 0), now);
    }

    /// The reply slot `seq` (part `part`) of this client's queue.
    #[inline]
    fn client_target(&self, seq: u64, part: u32) -> Target {
        Target::Client {
            queue: self.cx.queue.clone(),
            seq,
            part,
        }
    }

    /// Cluster mode's [`forward`](Self::forward): to a replica for a read when `read_from`
    /// says so, and followed through redirects (out of line: static mode's forward stays as
    /// it was).
    #[inline(never)]
    fn forward_cluster(&self, shard: usize, raw: &[u8], now: Instant) {
        let shard = match self.reader_for(shard) {
            Ok(s) => s,
            Err(e) => return self.cx.reply(e),
        };
        let seq = self.cx.queue.push_waiting(Slot::Waiting(self.cx.cmd));
        send_redirectable(&self.upstream(shard), raw, self.client_target(seq, 0), now);
    }

    /// Cluster mode: where the current command goes instead of `primary`: a replica of it
    /// for a read-only command when reads go to replicas (see `reader_of`), else `primary`.
    /// A tracking client reads from primaries: its invalidations come from them, and a
    /// replica that lags could give it a value older than the last one reported.
    fn reader_for(&self, primary: usize) -> Result<usize, Bytes> {
        if self.cx.w.read_from != ReadFrom::Primary
            && self.cx.cmd.is_some_and(|c| c.has(flags::READONLY))
            && self.tracking.is_none()
        {
            self.reader_of(primary)
        } else {
            Ok(primary)
        }
    }

    /// Cluster mode with reads from replicas: the shard a read of `primary`'s slots goes
    /// to: its replica, or (`prefer-replica`, when it has none or that one is not connected)
    /// the primary itself.
    #[cold]
    fn reader_of(&self, primary: usize) -> Result<usize, Bytes> {
        let w = self.cx.w;
        let replica = w.live().replica_of.get(primary).copied().flatten();
        match (replica, w.read_from) {
            (Some(r), ReadFrom::Replica) => Ok(r),
            (Some(r), _) if self.upstream(r).is_connected() => Ok(r),
            (None, ReadFrom::Replica) => {
                let addr = w.live().shards[primary].to_string();
                Err(reply::shard_unavailable(
                    &addr,
                    "no replica to read from (read_from = replica)",
                ))
            }
            _ => Ok(primary),
        }
    }

    /// Sends one request per part; the gathered reply fills the next slot of the queue.
    pub(crate) fn gather(&self, kind: GatherKind, parts: &[(usize, Bytes)], now: Instant) {
        if self.cx.w.cluster {
            return self.gather_cluster(kind, parts, now);
        }
        let seq = self.push_gather(kind, parts.len());
        for (i, (shard, raw)) in parts.iter().enumerate() {
            let target = self.client_target(seq, i as u32);
            self.upstream(*shard).send(raw, target, now);
        }
    }

    /// Cluster mode's [`gather`](Self::gather): each part to a replica for a read when
    /// `read_from` says so, and followed through redirects.
    #[inline(never)]
    fn gather_cluster(&self, kind: GatherKind, parts: &[(usize, Bytes)], now: Instant) {
        let mut shards = Vec::with_capacity(parts.len());
        for (shard, _) in parts {
            match self.reader_for(*shard) {
                Ok(s) => shards.push(s),
                Err(e) => return self.cx.reply(e),
            }
        }
        let seq = self.push_gather(kind, parts.len());
        for (i, ((_, raw), shard)) in parts.iter().zip(shards).enumerate() {
            let target = self.client_target(seq, i as u32);
            send_redirectable(&self.upstream(shard), raw, target, now);
        }
    }

    /// Queues the slot that merges `parts` replies as `kind` says: its sequence number.
    fn push_gather(&self, kind: GatherKind, parts: usize) -> u64 {
        let mut g = Gather::new(kind, parts, self.cx.proto);
        g.cmd = self.cx.cmd;
        self.cx.queue.push_waiting(Slot::Gather(Box::new(g)))
    }

    /// Sends `raw` to every shard and merges their replies as `kind` says.
    pub(crate) fn gather_from_every_shard(&self, kind: GatherKind, raw: &[u8], now: Instant) {
        let n = self.cx.w.live().slot_map.shard_count();
        let raw = Bytes::copy_from_slice(raw);
        let parts: Vec<(usize, Bytes)> = (0..n).map(|s| (s, raw.clone())).collect();
        self.gather(kind, &parts, now);
    }

    /// Sends `raw` to `shard` with `target` for its reply: followed through redirects in
    /// cluster mode.
    pub(crate) fn send_to(&self, shard: usize, raw: &[u8], target: Target, now: Instant) {
        let up = self.upstream(shard);
        if self.cx.w.cluster {
            send_redirectable(&up, raw, target, now);
        } else {
            up.send(raw, target, now);
        }
    }
}

/// Cluster mode: sends a request that a redirect may send again elsewhere.
fn send_redirectable(up: &Upstream, raw: &[u8], target: Target, now: Instant) {
    let deadline = now + up.op_timeout();
    up.send_retryable(crate::shard::Retry::new(raw, 0), target, deadline);
}
