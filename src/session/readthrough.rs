//! Read-through from the session's side: a GET or MGET of read-through keys is sent with a
//! sink that turns misses into origin fetches ([`crate::readthrough`]), and a write through
//! slotgate to read-through keys ends what slotgate remembers of them.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::command::{CommandSpec, keys};
use crate::queue::{SinkRef, Slot, Target};
use crate::readthrough::{self, PendingGet, PendingMget, Rule};
use crate::resp::Request;
use crate::session::cx::Fwd;

/// A GET of a read-through key: forwarded like any GET (or as the value+PTTL script for
/// rules with a grace period); a nil reply becomes an origin fetch (see `readthrough`).
pub(super) fn get(f: &Fwd<'_>, shard: usize, rule: Arc<Rule>, req: &Request<'_>, now: Instant) {
    let key = req.arg(1);
    let script = readthrough::get_request(&rule, key);
    let cx = &f.cx;
    let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
    let pending = cx.w.pending_gets.insert(PendingGet {
        w: cx.w.clone(),
        queue: cx.queue.clone(),
        seq,
        rule,
        sent_at: now.into_std(),
        proto: cx.proto,
        with_pttl: script.is_some(),
        key: readthrough::KeyBuf::new(key),
        tracking: f.tracking.cloned(),
    });
    let raw = script.as_deref().unwrap_or(req.raw);
    f.send_to(shard, raw, Target::Sink(pending), now);
}

/// An MGET with read-through keys: its shard parts are sent now (so it keeps its place
/// among this client's commands); misses are filled when every part has arrived.
pub(super) fn mget(
    f: &Fwd<'_>,
    req: &Request<'_>,
    parts: &[(usize, Bytes)],
    positions: Vec<Vec<u32>>,
    now: Instant,
) {
    let cx = &f.cx;
    let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
    let state = Rc::new(RefCell::new(PendingMget {
        w: cx.w.clone(),
        queue: cx.queue.clone(),
        seq,
        proto: cx.proto,
        sent_at: now.into_std(),
        keys: (1..req.argc()).map(|i| req.arg_copy(i)).collect(),
        positions,
        parts: vec![None; parts.len()],
        missing: parts.len(),
        tracking: f.tracking.cloned(),
    }));
    for (i, (shard, raw)) in parts.iter().enumerate() {
        let target = Target::Sink(SinkRef::new(state.clone(), i as u32));
        f.send_to(*shard, raw, target, now);
    }
}

/// A write through slotgate to read-through keys (a script's or function's declared keys
/// count as written): an in-flight fill of them must not store its (older) value, and
/// their negative entries end.
pub(super) fn note_writes(f: &mut Fwd<'_>, spec: &CommandSpec, req: &Request<'_>) {
    let w = f.cx.w;
    let rt = &w.shared.readthrough;
    let rules = w.live().readthrough.clone();
    f.keys.clear();
    if keys::key_indices(spec, req.argc(), |i| req.arg(i), f.keys).is_err() {
        return;
    }
    for &i in f.keys.iter() {
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
            let shard = w.live().slot_map.shard_of(key);
            f.send_to(shard, &release, Target::Discard, Instant::now());
        }
    }
}
