//! The all-shards route class: DBSIZE, KEYS, FLUSHDB, FLUSHALL, CONFIG SET/RESETSTAT, SCAN,
//! RANDOMKEY, SLOWLOG, LATENCY, SCRIPT …: sent to every shard and merged (SCAN walks the
//! shards one after the other), with what slotgate itself must do alongside.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::command::policy::{self, AlsoHere, config_set_refused, parse_cursor};
use crate::command::{CommandSpec, Merge};
use crate::fanout::GatherKind;
use crate::resp::Request;
use crate::resp::reply;
use crate::resp::request::push_header;
use crate::session::cx::Fwd;
use crate::worker::Worker;

/// Sends the command to every shard and merges the replies as `merge` says.
pub(super) fn all_shards(
    f: &Fwd<'_>,
    spec: &CommandSpec,
    req: &Request<'_>,
    merge: Merge,
    now: Instant,
) {
    let w = f.cx.w;
    let kind = match merge {
        Merge::Scan => return scan(f, req, now),
        Merge::RandomKey => GatherKind::RandomKey {
            pick: (f.cx.id as usize).wrapping_add(now.elapsed().subsec_nanos() as usize)
                ^ random_seed(),
        },
        Merge::ArrayInOrder => GatherKind::AllOk,
        Merge::LatencyLatest | Merge::LatencyHistory | Merge::LatencyDoctor => {
            GatherKind::Latency {
                which: merge,
                shards: shard_names(w),
            }
        }
        Merge::SlowlogEntries => {
            // SLOWLOG GET [count]: 10 by default, a negative count means all (Redis 7).
            let count = match req.argc() {
                2 => Some(10),
                _ => match crate::resp::request::parse_i64(req.arg(2)) {
                    Some(n) if n < 0 => None,
                    Some(n) => Some(n as usize),
                    None => return f.cx.reply_static(reply::NOT_INTEGER),
                },
            };
            GatherKind::Slowlog {
                count,
                shards: shard_names(w),
                own: w.shared.slowlog.newest(count),
            }
        }
        // SLOWLOG LEN: the shards' and slotgate's own.
        Merge::SlowlogLen => {
            let own = w.shared.slowlog.len() as i64;
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
        return f.cx.reply(reply::config_set_not_allowed(&bad));
    }
    match policy::also_here(spec.name) {
        AlsoHere::ResetStats => reset_stats(w),
        AlsoHere::ResetSlowlog => {
            w.shared.slowlog.reset();
        }
        AlsoHere::NoteScripts => {
            let args: Vec<&[u8]> = (1..req.argc()).map(|i| req.arg(i)).collect();
            w.shared.scripts.note(spec.name, &args);
        }
        AlsoHere::Nothing => {}
    }
    if merge == Merge::AnyOk {
        // SCRIPT KILL, FUNCTION KILL: on the control connections, since the shared ones may
        // be the ones stuck behind the busy script.
        let deadline = now + crate::shard::CONTROL_TIMEOUT;
        return f.cx.gather_on_control(kind, req.raw, deadline);
    }
    f.gather_from_every_shard(kind, req.raw, now);
}

/// The shards' addresses, as LATENCY and SLOWLOG replies name them.
fn shard_names(w: &Worker) -> Vec<String> {
    w.live().shards.iter().map(|a| a.to_string()).collect()
}

/// CONFIG RESETSTAT: slotgate's own statistics restart from zero too (INFO commandstats,
/// errorstats and stats), as Redis's do.
#[cold]
fn reset_stats(w: &Worker) {
    use std::sync::atomic::Ordering::Relaxed;
    let shared = &w.shared;
    w.metrics.reset(&shared.command_totals);
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

/// SCAN: the cursor names the shard (cursor = shard_cursor * shards + shard), so one
/// iteration walks shard 0, then 1, … with Redis's guarantees on each.
fn scan(f: &Fwd<'_>, req: &Request<'_>, now: Instant) {
    let shards = f.cx.w.live().slot_map.shard_count() as u64;
    let Some(cursor) = parse_cursor(req.arg(1)) else {
        return f.cx.reply_static(reply::INVALID_CURSOR);
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
    f.gather(kind, &[(shard as usize, b.freeze())], now);
}

/// A cheap per-process random value (RANDOMKEY's shard pick needs no cryptography).
fn random_seed() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as usize
}
