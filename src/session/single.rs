//! The single-slot route class: a command whose keys are all in one slot goes, as its raw
//! bytes, to the shard that owns the slot (a GET of a read-through key through the
//! read-through path).

use tokio::time::Instant;

use crate::command::CommandSpec;
use crate::command::policy::{reads_through, refused_arguments};
use crate::resp::Request;
use crate::resp::reply;
use crate::session::cx::Fwd;

/// A command whose keys must all be in one slot.
#[inline]
pub(super) fn single(f: &mut Fwd<'_>, spec: &'static CommandSpec, req: &Request<'_>, now: Instant) {
    if let Some(e) = refused_arguments(spec.name, req) {
        return f.cx.reply_static(e);
    }
    match f.slot_of(spec, req) {
        Ok(Some(slot)) => {
            let (shard, rule) = {
                let live = f.cx.w.live();
                let rules = &live.readthrough;
                let rule = if rules.is_empty() || !reads_through(spec.name) {
                    None
                } else {
                    rules.find(req.arg(1)).cloned()
                };
                (live.slot_map.shard_of_slot(slot), rule)
            };
            match rule {
                Some(rule) => super::readthrough::get(f, shard, rule, req, now),
                None => f.forward(shard, req.raw, now),
            }
        }
        // No keys, or key positions undeterminable: any shard answers (its own error).
        Ok(None) => f.forward(0, req.raw, now),
        Err(()) => f.cx.reply_static(reply::CROSSSLOT),
    }
}
