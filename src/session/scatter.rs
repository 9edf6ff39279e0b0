//! The scatter route class: MGET, MSET, DEL, EXISTS, UNLINK, TOUCH split by shard (by slot
//! behind a Redis Cluster) and merged in key order, summed, or `+OK`.

use bytes::BytesMut;
use tokio::time::Instant;

use crate::command::{CommandSpec, Merge};
use crate::fanout::GatherKind;
use crate::resp::Request;
use crate::resp::reply;
use crate::resp::request::push_header;
use crate::session::cx::Fwd;

/// Splits the command into one part per shard (per slot in cluster mode), merged as `merge`
/// says. When every key is on one shard, the original bytes are forwarded as they are.
pub(crate) fn scatter(
    f: &mut Fwd<'_>,
    spec: &CommandSpec,
    req: &Request<'_>,
    merge: Merge,
    now: Instant,
) {
    // MSET takes key-value pairs; the others take keys.
    let step = if merge == Merge::AllOk { 2 } else { 1 };
    let argc = req.argc();
    if !(argc - 1).is_multiple_of(step) {
        return f.cx.reply(reply::wrong_arity(spec.name));
    }
    let live = f.cx.w.live().clone();
    let map = &live.slot_map;
    // A cluster node takes the keys of one slot per command: the parts are per slot there,
    // per shard otherwise.
    let per_slot = live.cluster.is_some();
    let nkeys = (argc - 1) / step;
    f.keys.clear();
    let mut same = true;
    for k in 0..nkeys {
        let key = req.arg(1 + k * step);
        let group = if per_slot {
            crate::router::slot(key) as usize
        } else {
            map.shard_of(key)
        };
        same &= f.keys.first().is_none_or(|&g| g == group);
        f.keys.push(group);
    }
    let rules = &live.readthrough;
    let readthrough = merge == Merge::ArrayInOrder
        && !rules.is_empty()
        && (1..argc).any(|i| rules.find(req.arg(i)).is_some());
    if same && !readthrough {
        let shard = if per_slot {
            map.shard_of_slot(f.keys[0] as u16)
        } else {
            f.keys[0]
        };
        return f.forward(shard, req.raw, now);
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
        for (k, &slot) in f.keys.iter().enumerate() {
            by_slot.entry(slot).or_default().push(k as u32);
        }
        for (slot, pos) in by_slot {
            add_part(map.shard_of_slot(slot as u16), pos);
        }
    } else {
        let mut positions: Vec<Vec<u32>> = vec![Vec::new(); map.shard_count()];
        for (k, &shard) in f.keys.iter().enumerate() {
            positions[shard].push(k as u32);
        }
        for (shard, pos) in positions.into_iter().enumerate() {
            if !pos.is_empty() {
                add_part(shard, pos);
            }
        }
    }
    if readthrough {
        return super::readthrough::mget(f, req, &parts, used_positions, now);
    }
    let kind = match merge {
        Merge::ArrayInOrder => GatherKind::ArrayInOrder {
            positions: used_positions,
            total: nkeys,
        },
        m => GatherKind::from_merge(m).unwrap_or(GatherKind::AllOk),
    };
    f.gather(kind, &parts, now);
}
