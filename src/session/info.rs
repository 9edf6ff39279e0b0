//! INFO: the proxy's own sections (server, clients, stats, commandstats, errorstats,
//! latencystats, read-through, shards) and what the shards report (version, memory,
//! persistence, a keyspace summed over shards), gathered on their control connections.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::fanout::GatherKind;
use crate::resp::Request;
use crate::resp::reply;
use crate::session::Cx;
use crate::worker::Shared;

/// INFO: the proxy's own sections plus what the shards report (version, memory and a
/// keyspace summed over shards), gathered from every shard.
pub(super) fn info(cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
    let wanted: Vec<String> = (1..req.argc())
        .map(|i| String::from_utf8_lossy(req.arg(i)).to_ascii_lowercase())
        .collect();
    let shared = cx.w.shared.clone();
    // This worker's latest counts first (the others publish theirs once a second).
    cx.w.metrics.publish(&shared.command_totals);
    let connected = cx.w.pools().connected();
    let proto = cx.proto;
    let build = move |parts: &[Bytes]| -> Bytes {
        let text = build_info(&shared, &wanted, &connected, parts);
        reply::verbatim(proto, text.as_bytes())
    };
    // On the control connections: INFO never waits behind client traffic (or a busy
    // script), and fails at the usual op-timeout.
    let deadline = now + cx.w.shared.settings.op_timeout;
    cx.gather_on_control(
        GatherKind::Info(Box::new(build)),
        b"*1\r\n$4\r\nINFO\r\n",
        deadline,
    );
}

/// The text of a shard's INFO reply (RESP2 bulk or RESP3 verbatim), if it is one.
fn info_text(part: &[u8]) -> Option<&str> {
    let cr = part.iter().position(|&c| c == b'\r')?;
    let body = part.get(cr + 2..part.len().checked_sub(2)?)?;
    let body = match part.first()? {
        b'$' => body,
        b'=' => body.get(4..)?,
        _ => return None,
    };
    std::str::from_utf8(body).ok()
}

/// `field:value` from an INFO text.
fn info_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim_end)
    })
}

/// `db0:keys=1,expires=0,avg_ttl=0` → (keys, expires, avg_ttl).
fn db0(text: &str) -> (u64, u64, u64) {
    let Some(v) = info_field(text, "db0") else {
        return (0, 0, 0);
    };
    let get = |k: &str| {
        v.split(',')
            .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (get("keys"), get("expires"), get("avg_ttl"))
}

/// One INFO line per command with statistics (by name), as `line` writes it (`None`: no line).
fn per_command_lines(
    shared: &Shared,
    line: impl Fn(&str, &crate::metrics::CommandCounts) -> Option<String>,
) -> String {
    let t = shared
        .command_totals
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.commands.iter().collect();
    rows.sort_by_key(|(name, _)| **name);
    rows.into_iter()
        .filter_map(|(name, c)| line(name, c))
        .collect()
}

/// INFO's `# Commandstats`, as Redis (`cmdstat_<name>:calls=…,usec=…,usec_per_call=…,
/// rejected_calls=…,failed_calls=…`), counted by slotgate: `usec_per_call` is the mean of the
/// sampled latencies (one command in `metrics::SAMPLE_EVERY`, from reading the command to its
/// reply being written) and `usec` that mean times `calls`.
fn commandstats_info(shared: &Shared) -> String {
    per_command_lines(shared, |name, c| {
        let per_call = if c.samples > 0 {
            c.sampled_usec as f64 / c.samples as f64
        } else {
            0.0
        };
        Some(format!(
            "cmdstat_{name}:calls={},usec={},usec_per_call={per_call:.2},rejected_calls={},\
             failed_calls={}\r\n",
            c.calls,
            (per_call * c.calls as f64) as u64,
            c.rejected,
            c.failed
        ))
    })
}

/// INFO's `# Latencystats`, as Redis (`latency_percentiles_usec_<name>:p50=…,p99=…,p99.9=…`),
/// from the sampled latencies (one command in `metrics::SAMPLE_EVERY`), each percentile the
/// upper bound of its bucket (within 19%).
fn latencystats_info(shared: &Shared) -> String {
    per_command_lines(shared, |name, c| {
        let p = |q: f64| c.latency.percentile(q);
        let (p50, p99, p999) = (p(50.0)?, p(99.0)?, p(99.9)?);
        Some(format!(
            "latency_percentiles_usec_{name}:p50={p50:.3},p99={p99:.3},p99.9={p999:.3}\r\n"
        ))
    })
}

/// INFO's `# Errorstats`: `errorstat_<PREFIX>:count=…` for every error slotgate answered, its
/// own and the shards' (Redis's first-word prefix; at most 128 prefixes).
fn errorstats_info(shared: &Shared) -> String {
    let t = shared
        .command_totals
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.errors.iter().collect();
    rows.sort();
    rows.iter()
        .map(|(prefix, n)| format!("errorstat_{prefix}:count={n}\r\n"))
        .collect()
}

/// INFO's `# Memory`: the shards' figures summed where a sum means something, and slotgate's
/// own resident size as its own field.
fn memory_info(texts: &[Option<&str>]) -> String {
    let sum = |field: &str| -> u64 {
        texts
            .iter()
            .flatten()
            .filter_map(|t| info_field(t, field)?.parse::<u64>().ok())
            .sum()
    };
    let used = sum("used_memory");
    format!(
        "used_memory:{used}\r\nused_memory_human:{}\r\nused_memory_rss:{}\r\n\
         used_memory_peak:{}\r\nmaxmemory:{}\r\nused_memory_shards_sum:{used}\r\n\
         proxy_used_memory_rss:{}\r\n",
        human_bytes(used),
        sum("used_memory_rss"),
        sum("used_memory_peak"),
        sum("maxmemory"),
        own_rss_bytes()
    )
}

/// Redis's `_human` memory figures (`1.50M`).
fn human_bytes(n: u64) -> String {
    let units = [
        (1u64 << 40, 'T'),
        (1 << 30, 'G'),
        (1 << 20, 'M'),
        (1 << 10, 'K'),
    ];
    match units.iter().find(|(u, _)| n >= *u) {
        Some((u, c)) => format!("{:.2}{c}", n as f64 / *u as f64),
        None => format!("{n}B"),
    }
}

/// INFO's `# Persistence`, over the shards: counts summed, "in progress" flags and `loading`
/// set when any shard's is, the oldest `rdb_last_save_time`, and a status `err` when any
/// shard's is not `ok`.
fn persistence_info(texts: &[Option<&str>]) -> String {
    let shards: Vec<&str> = texts.iter().flatten().copied().collect();
    let nums = |field: &str| -> Vec<i64> {
        shards
            .iter()
            .filter_map(|t| info_field(t, field)?.parse::<i64>().ok())
            .collect()
    };
    let mut out = String::new();
    for field in [
        "loading",
        "async_loading",
        "rdb_bgsave_in_progress",
        "aof_enabled",
        "aof_rewrite_in_progress",
        "aof_rewrite_scheduled",
    ] {
        let v = nums(field).into_iter().max().unwrap_or(0);
        out.push_str(&format!("{field}:{v}\r\n"));
    }
    for field in ["rdb_changes_since_last_save", "rdb_saves", "aof_rewrites"] {
        let v: i64 = nums(field).into_iter().sum();
        out.push_str(&format!("{field}:{v}\r\n"));
    }
    let last_save = nums("rdb_last_save_time").into_iter().min().unwrap_or(0);
    out.push_str(&format!("rdb_last_save_time:{last_save}\r\n"));
    for field in [
        "rdb_last_bgsave_status",
        "aof_last_bgrewrite_status",
        "aof_last_write_status",
    ] {
        let ok = shards
            .iter()
            .all(|t| info_field(t, field).is_none_or(|v| v == "ok"));
        out.push_str(&format!("{field}:{}\r\n", if ok { "ok" } else { "err" }));
    }
    out
}

/// INFO's `# Stats`: slotgate's own counters.
fn stats_info(shared: &Shared) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let st = &shared.stats;
    format!(
        "total_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
         rejected_connections:{}\r\nauth_failures:{}\r\ntoken_auths:{}\r\n\
         token_auth_failures:{}\r\ntotal_error_replies:{}\r\ntracking_total_keys:{}\r\n",
        st.connections_received.load(Relaxed),
        st.commands_processed.load(Relaxed),
        st.rejected_connections.load(Relaxed),
        st.auth_failures.load(Relaxed),
        st.token_auths.load(Relaxed),
        st.token_auth_failures.load(Relaxed),
        shared.command_totals.lock().map_or(0, |t| t.total_errors),
        shared
            .tracking_keys
            .iter()
            .map(|k| k.load(Relaxed))
            .sum::<usize>()
    )
}

/// INFO's `# Keyspace`: database 0 summed over the shards (the mean of their `avg_ttl`s).
fn keyspace_info(texts: &[Option<&str>]) -> String {
    let (mut keys, mut expires, mut ttl_sum, mut ttl_n) = (0u64, 0u64, 0u64, 0u64);
    for t in texts.iter().flatten() {
        let (k, e, a) = db0(t);
        keys += k;
        expires += e;
        if a > 0 {
            ttl_sum += a;
            ttl_n += 1;
        }
    }
    if keys == 0 {
        return String::new();
    }
    format!(
        "db0:keys={keys},expires={expires},avg_ttl={}\r\n",
        ttl_sum.checked_div(ttl_n).unwrap_or(0)
    )
}

/// INFO's `# Server`, with the shards' Redis version.
fn server_info(shared: &Shared, version: &str) -> String {
    let up_secs = shared.started.elapsed().as_secs();
    let port = shared.listen_addr.get().map_or(0, |a| a.port());
    format!(
        "redis_version:{version}\r\nslotgate_version:{}\r\nredis_mode:standalone\r\n\
             os:{} {}\r\narch_bits:{}\r\nmultiplexing_api:epoll\r\nprocess_id:{}\r\n\
             run_id:{}\r\ntcp_port:{port}\r\nuptime_in_seconds:{up_secs}\r\nuptime_in_days:{}\r\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        usize::BITS,
        std::process::id(),
        shared.run_id,
        up_secs / 86400
    )
}

/// INFO's `# CPU`: slotgate's own CPU time, in Redis's fields (from /proc/self/stat; the
/// kernel counts in 1/100 s on Linux).
fn cpu_info() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces): state is the first.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let secs =
        |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) as f64 / 100.0;
    let (user, sys, cuser, csys) = (secs(11), secs(12), secs(13), secs(14));
    format!(
        "used_cpu_sys:{sys:.6}\r\nused_cpu_user:{user:.6}\r\n\
         used_cpu_sys_children:{csys:.6}\r\nused_cpu_user_children:{cuser:.6}\r\n"
    )
}

/// slotgate's own resident memory, in bytes (0 where /proc does not say).
fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// INFO's `# Replication`: to its clients slotgate is a primary without replicas (Redis
/// 7.0's fields; clients such as StackExchange.Redis read `role`).
fn replication_info(shared: &Shared) -> String {
    format!(
        "role:master\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\n\
         master_replid:{}\r\nmaster_replid2:0000000000000000000000000000000000000000\r\n\
         master_repl_offset:0\r\nsecond_repl_offset:-1\r\nrepl_backlog_active:0\r\n\
         repl_backlog_size:1048576\r\nrepl_backlog_first_byte_offset:0\r\n\
         repl_backlog_histlen:0\r\n",
        shared.run_id
    )
}

/// INFO's `# Clients`: slotgate's own clients.
fn clients_info(shared: &Shared, maxclients: usize) -> String {
    let (connected, pubsub) = match shared.clients.lock() {
        Ok(c) => (c.len(), c.values().filter(|i| i.subscribed).count()),
        Err(_) => (0, 0),
    };
    format!(
        "connected_clients:{connected}\r\ncluster_connections:0\r\nmaxclients:{maxclients}\r\n\
         blocked_clients:{}\r\ntracking_clients:{}\r\npubsub_clients:{pubsub}\r\n",
        shared
            .blocked_clients
            .load(std::sync::atomic::Ordering::Relaxed),
        shared
            .tracking_clients
            .load(std::sync::atomic::Ordering::Relaxed)
    )
}

/// INFO's `# Readthrough`: the rules and their counters.
fn readthrough_info(shared: &Shared) -> String {
    let (flights, negatives) = shared.readthrough.sizes();
    let rules = shared.live().readthrough.clone();
    let mut body = format!(
        "rules:{}\r\nfetches_tracked:{flights}\r\nnegative_entries:{negatives}\r\n",
        rules.iter().count()
    );
    // `rule_<i>:name=…`: a rule's name may contain `:` (the default name is the prefix), which
    // INFO parsers split on (issue 13.4).
    for (i, r) in rules.iter().enumerate() {
        let s = &r.stats;
        let (hits, misses) = (s.hits.get(), s.misses.get());
        let ratio = if hits + misses > 0 {
            hits as f64 / (hits + misses) as f64
        } else {
            0.0
        };
        let avoided = s.avoided();
        body.push_str(&format!(
            "rule_{i}:name={},prefix={},hits={hits},misses={misses},hit_ratio={ratio:.4},\
             origin_requests={},origin_calls_avoided={avoided},coalesced={},\
             negative_hits={},stale_serves={},origin_errors={},bytes_loaded={},stored={},\
             origin_inflight={},throttled={},lease_waits={},refreshes={},revalidated={},breaker={},\
             breaker_rejections={},\
             breaker_opens={}\r\n",
            r.name,
            String::from_utf8_lossy(&r.prefix),
            s.origin_requests.get(),
            s.coalesced.get(),
            s.negative_hits.get(),
            s.stale_serves.get(),
            s.origin_errors.get(),
            s.bytes_loaded.get(),
            s.stored.get(),
            r.guard.inflight(),
            s.throttled.get(),
            s.lease_waits.get(),
            s.refreshes.get(),
            s.revalidated.get(),
            match &r.guard.breaker {
                None => "off",
                Some(b) if b.is_open() => "open",
                Some(_) => "closed",
            },
            s.breaker_rejections.get(),
            s.breaker_opens.get()
        ));
    }
    body
}

/// INFO's `# Shards`: each shard's address, slots, status, keys and version.
fn shards_info(
    settings: &crate::settings::Settings,
    texts: &[Option<&str>],
    up: &[bool],
) -> String {
    let mut body = String::new();
    for (i, addr) in settings.shards.iter().enumerate() {
        let ranges: Vec<String> = settings
            .slot_map
            .ranges(i)
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        let text = texts.get(i).copied().flatten();
        // (INFO is asked of the shards with slots; the others are up when connected.)
        let answered = text.is_some() || i >= texts.len();
        let status = if answered && up.get(i).copied().unwrap_or(false) {
            "up"
        } else {
            "down"
        };
        // Cluster mode: the replicas reads go to come after the primaries.
        let role = match (&settings.cluster, settings.replica_of.contains(&Some(i))) {
            (None, _) => "",
            (Some(_), false) => ",role=primary",
            (Some(_), true) => ",role=replica",
        };
        body.push_str(&format!(
            "shard{i}:addr={addr},slots={},status={status},keys={},redis_version={}{role}\r\n",
            ranges.join(" "),
            text.map_or(0, |t| db0(t).0),
            text.and_then(|t| info_field(t, "redis_version"))
                .unwrap_or("?")
        ));
    }
    body
}

fn build_info(shared: &Arc<Shared>, wanted: &[String], up: &[bool], parts: &[Bytes]) -> String {
    let texts: Vec<Option<&str>> = parts.iter().map(|p| info_text(p)).collect();
    if shared.redis_version.get().is_none()
        && let Some(v) = texts
            .iter()
            .flatten()
            .find_map(|t| info_field(t, "redis_version"))
    {
        let _ = shared.redis_version.set(v.to_string());
    }
    let version = texts
        .iter()
        .flatten()
        .find_map(|t| info_field(t, "redis_version"))
        .unwrap_or(super::local::FALLBACK_VERSION);
    // As Redis: no argument or `default` is every section but commandstats and
    // latencystats; `all` and `everything` are every section.
    let all = wanted
        .iter()
        .any(|w| matches!(w.as_str(), "all" | "everything"));
    let default = all || wanted.is_empty() || wanted.iter().any(|w| w == "default");
    let want = |s: &str| {
        (default && s != "commandstats" && s != "latencystats")
            || all
            || wanted.iter().any(|w| w == s)
    };
    let settings = &*shared.live();
    let mut out = String::with_capacity(2048);
    let mut section = |name: &str, body: String| {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str("# ");
        out.push_str(name);
        out.push_str("\r\n");
        out.push_str(&body);
    };
    if want("server") {
        section("Server", server_info(shared, version));
    }
    if want("clients") {
        section("Clients", clients_info(shared, settings.maxclients));
    }
    if want("memory") {
        section("Memory", memory_info(&texts));
    }
    if want("persistence") {
        section("Persistence", persistence_info(&texts));
    }
    if want("cpu") {
        section("CPU", cpu_info());
    }
    if want("replication") {
        section("Replication", replication_info(shared));
    }
    if want("stats") {
        section("Stats", stats_info(shared));
    }
    if want("commandstats") {
        section("Commandstats", commandstats_info(shared));
    }
    if want("errorstats") {
        section("Errorstats", errorstats_info(shared));
    }
    if want("latencystats") {
        section("Latencystats", latencystats_info(shared));
    }
    if want("cluster") {
        let on = u8::from(shared.settings.cluster_api.is_some());
        section("Cluster", format!("cluster_enabled:{on}\r\n"));
    }
    if want("keyspace") {
        section("Keyspace", keyspace_info(&texts));
    }
    if want("proxy") {
        section(
            "Proxy",
            format!(
                "proxy:slotgate\r\nworkers:{}\r\nshards:{}\r\nupstream_connections_per_shard:{}\r\n\
                 op_timeout_ms:{}\r\nmax_client_pipeline:{}\r\n",
                settings.workers,
                settings.shards.len(),
                settings.upstream_connections,
                settings.op_timeout.as_millis(),
                settings.max_client_pipeline
            ),
        );
    }
    if want("readthrough") {
        section("Readthrough", readthrough_info(shared));
    }
    if want("shards") {
        let mut body = shards_info(settings, &texts, up);
        if settings.cluster.is_some() {
            body.push_str(&shared.cluster_stats.info());
        }
        section("Shards", body);
    }
    out
}
