//! The JSON the dashboard reads: `/hotkeys`, `/bigkeys` and `/overview`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{Value, json};

use crate::hotkeys::{Query, QueryError};
use crate::metrics::LatencyHistogram;
use crate::worker::Shared;

/// A query string's `name=value` pairs, percent-decoded as a browser's form encoding
/// (`+` is a space).
pub fn pairs(q: Option<&str>) -> Vec<(Vec<u8>, Vec<u8>)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// `count=n&window=1m` (either, both or none; other parameters are ignored) as
/// `SLOTGATE.HOTKEYS` options.
pub fn query(q: Option<&str>) -> Result<Query, QueryError> {
    let mut args: Vec<Vec<u8>> = Vec::new();
    for (k, v) in pairs(q) {
        if k == b"count" || k == b"window" {
            args.extend([k, v]);
        }
    }
    Query::parse(args.iter().map(Vec::as_slice))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `GET /hotkeys`: the keys requested most over the window, every key shown (the admin
/// listener is an operator's).
pub fn hot_keys(shared: &Shared, q: Query) -> Value {
    let m = shared
        .hot_merged
        .merged(&shared.hot_books, Instant::now(), q.span);
    let keys: Vec<Value> = m
        .keys
        .iter()
        .take(q.count)
        .map(|k| {
            json!({
                "key": text(&k.key),
                "requests": k.requests,
                "rps": (m.rate(k.requests) * 10.0).round() / 10.0,
                "reads": k.reads,
                "writes": k.writes,
                "shard": k.shard.to_string(),
            })
        })
        .collect();
    json!({
        "window": q.window_name(),
        "seconds": m.seconds,
        "sample": shared.settings.hotkeys_sample,
        "keys": keys,
    })
}

/// `GET /bigkeys`: the largest replies over the window.
pub fn big_keys(shared: &Shared, q: Query) -> Value {
    let m = shared
        .hot_merged
        .merged(&shared.hot_books, Instant::now(), q.span);
    let big: Vec<Value> = m
        .big
        .iter()
        .take(q.count)
        .map(|b| json!({"key": text(&b.key), "bytes": b.size, "shard": b.shard.to_string()}))
        .collect();
    json!({
        "window": q.window_name(),
        "sample": shared.settings.hotkeys_sample,
        "keys": big,
    })
}

/// The process's command counts by class (`command::CLASSES`): calls, and the sampled
/// latencies.
pub(super) fn per_class(
    t: &crate::metrics::CommandTotals,
) -> HashMap<&'static str, (u64, LatencyHistogram)> {
    let mut classes: HashMap<&'static str, (u64, LatencyHistogram)> = HashMap::new();
    for (name, c) in &t.commands {
        let e = classes.entry(crate::command::class_of(name)).or_default();
        e.0 += c.calls;
        e.1.add(&c.latency);
    }
    classes
}

/// `GET /overview`: the dashboard's numbers. Counters are totals since start-up (the page
/// turns them into rates between two reads); per class, the sampled latencies as buckets.
pub fn overview(shared: &Shared) -> Value {
    let live = shared.live();
    let m = shared.hot_merged.merged(
        &shared.hot_books,
        Instant::now(),
        std::time::Duration::from_secs(60),
    );
    let (mut classes, errors, commands) = {
        let t = shared
            .command_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (
            per_class(&t),
            t.total_errors,
            t.commands.values().map(|c| c.calls).sum::<u64>(),
        )
    };
    let classes: serde_json::Map<String, Value> = crate::command::CLASSES
        .iter()
        .map(|&c| {
            let (calls, lat) = classes.remove(c).unwrap_or_default();
            let buckets: Vec<Value> = lat.buckets().map(|(us, n)| json!([us, n])).collect();
            (
                c.to_string(),
                json!({"calls": calls, "latency_us": buckets}),
            )
        })
        .collect();
    let primaries = live.slot_map.shard_count().min(live.shards.len());
    let shards: Vec<Value> = live
        .shards
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let role = if i < primaries { "primary" } else { "replica" };
            let replica_of = (0..primaries)
                .find(|&p| live.replica_of.get(p).copied().flatten() == Some(i))
                .map(|p| live.shards[p].to_string());
            let slots: Vec<Value> = if i < primaries {
                live.slot_map
                    .ranges(i)
                    .into_iter()
                    .map(|(a, b)| json!([a, b]))
                    .collect()
            } else {
                Vec::new()
            };
            let hottest = m.keys.iter().find(|k| k.shard == addr);
            json!({
                "addr": addr.to_string(),
                "role": role,
                "replica_of": replica_of,
                "up": shared.shard_is_up(addr),
                "inflight": shared.shard_inflight(addr),
                "rps": (m.shard_rate(addr) * 10.0).round() / 10.0,
                "hottest_key": hottest.map(|k| text(&k.key)),
                "hottest_share": m.hottest_share(addr),
                "slots": slots,
            })
        })
        .collect();
    let rules: Vec<Value> = live
        .readthrough
        .iter()
        .map(|r| {
            let s = &r.stats;
            json!({
                "name": r.name,
                "prefix": text(&r.prefix),
                "hits": s.hits.get(),
                "misses": s.misses.get(),
                "origin_requests": s.origin_requests.get(),
                "avoided": s.avoided(),
                "origin_errors": s.origin_errors.get(),
                "breaker_open": r.guard.breaker.as_ref().is_some_and(|b| b.is_open()),
            })
        })
        .collect();
    let st = &shared.stats;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": if shared.settings.cluster.is_some() { "cluster" } else { "static" },
        "uptime_s": shared.started.elapsed().as_secs_f64(),
        "workers": shared.settings.workers,
        "clients": shared.connected.load(Ordering::Relaxed),
        "connections_received": st.connections_received.load(Ordering::Relaxed),
        "commands": commands,
        "errors": errors,
        "obuf_closes": st.obuf_closes.load(Ordering::Relaxed),
        "classes": classes,
        "shards": shards,
        "rules": rules,
        "hotkeys_sample": shared.settings.hotkeys_sample,
    })
}
