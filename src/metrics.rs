//! Every metric name, declared once, with its description. Labels are low-cardinality: the
//! command name from the table, the shard address, the read-through rule name, an error
//! kind — never a key.
//!
//! Hot-path counters are kept per worker in plain cells and published once a second
//! ([`WorkerMetrics::publish`]); latency is sampled (one command in [`SAMPLE_EVERY`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const COMMANDS: &str = "slotgate_commands_total";
pub const COMMAND_DURATION: &str = "slotgate_command_duration_seconds";
pub const CONNECTIONS: &str = "slotgate_connected_clients";
pub const CONNECTIONS_TOTAL: &str = "slotgate_connections_received_total";
pub const REJECTED: &str = "slotgate_rejected_connections_total";
pub const AUTH_FAILURES: &str = "slotgate_auth_failures_total";
pub const TOKEN_AUTHS: &str = "slotgate_token_auths_total";
pub const TOKEN_AUTH_FAILURES: &str = "slotgate_token_auth_failures_total";
pub const CLUSTER_REDIRECTS: &str = "slotgate_cluster_redirects_total";
pub const CLUSTER_REFRESHES: &str = "slotgate_cluster_refreshes_total";
pub const CLUSTER_LAYOUT_CHANGES: &str = "slotgate_cluster_layout_changes_total";
pub const CLUSTER_FAILOVERS: &str = "slotgate_cluster_failovers_total";
pub const SHARD_ERRORS: &str = "slotgate_shard_errors_total";
pub const SHARD_RECONNECTS: &str = "slotgate_shard_disconnects_total";
pub const SHARD_INFLIGHT: &str = "slotgate_shard_inflight_requests";
pub const SHARD_UP: &str = "slotgate_shard_up";
pub const RT_HITS: &str = "slotgate_readthrough_hits_total";
pub const RT_MISSES: &str = "slotgate_readthrough_misses_total";
pub const RT_ORIGIN_REQUESTS: &str = "slotgate_readthrough_origin_requests_total";
pub const RT_COALESCED: &str = "slotgate_readthrough_coalesced_total";
pub const RT_NEGATIVE_HITS: &str = "slotgate_readthrough_negative_hits_total";
pub const RT_STALE_SERVES: &str = "slotgate_readthrough_stale_serves_total";
pub const RT_ORIGIN_ERRORS_ALL: &str = "slotgate_readthrough_origin_errors_all_total";
pub const RT_ORIGIN_ERRORS: &str = "slotgate_readthrough_origin_errors_total";
pub const RT_ORIGIN_LATENCY: &str = "slotgate_readthrough_origin_duration_seconds";
pub const RT_BYTES_LOADED: &str = "slotgate_readthrough_bytes_loaded_total";
pub const RT_STORED: &str = "slotgate_readthrough_stored_total";
pub const RT_STORE_SKIPPED: &str = "slotgate_readthrough_store_skipped_total";
pub const RT_THROTTLED: &str = "slotgate_readthrough_origin_throttled_total";
pub const RT_LEASE_WAITS: &str = "slotgate_readthrough_lease_waits_total";
pub const RT_REFRESHES: &str = "slotgate_readthrough_refreshes_total";
pub const RT_REVALIDATED: &str = "slotgate_readthrough_revalidated_total";
pub const RT_BREAKER_REJECTIONS: &str = "slotgate_readthrough_breaker_rejections_total";
pub const RT_BREAKER_OPENS: &str = "slotgate_readthrough_breaker_opens_total";
pub const RT_BREAKER_OPEN: &str = "slotgate_readthrough_breaker_open";
pub const RT_ORIGIN_INFLIGHT: &str = "slotgate_readthrough_origin_inflight";
pub const REQUESTS: &str = "slotgate_requests_total";
pub const REQUEST_DURATION: &str = "slotgate_request_duration_seconds";
pub const ERROR_REPLIES: &str = "slotgate_error_replies_total";
pub const OBUF_CLOSES: &str = "slotgate_client_output_buffer_closes_total";
pub const HOTKEY_SHARE: &str = "slotgate_hotkey_share";
pub const SHARD_RPS: &str = "slotgate_shard_requests_per_second";

/// Labels of `TOKEN_AUTH_FAILURES`' reasons and `CLUSTER_REDIRECTS`' kinds, exported at 0
/// from start-up.
/// (`token::Failure::as_str` spells them; a test there keeps the two lists equal.)
pub const TOKEN_FAILURE_REASONS: &[&str] = &[
    "malformed",
    "algorithm",
    "issuer",
    "unknown_key",
    "signature",
    "expired",
    "not_yet_valid",
    "audience",
    "username",
    "missing_claim",
    "no_user",
];
pub const REDIRECT_KINDS: &[&str] = &["moved", "ask", "tryagain"];

/// One command in this many has its latency recorded.
pub const SAMPLE_EVERY: u64 = 32;

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> Option<PrometheusHandle> {
    let buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .ok()?
        .install_recorder()
        .ok()?;
    describe_counter!(COMMANDS, "Commands received, by command name");
    describe_histogram!(
        COMMAND_DURATION,
        metrics::Unit::Seconds,
        "Time from reading a command to its reply being ready (sampled)"
    );
    describe_gauge!(CONNECTIONS, "Client connections now");
    describe_counter!(CONNECTIONS_TOTAL, "Client connections accepted");
    describe_counter!(REJECTED, "Client connections refused over maxclients");
    describe_counter!(AUTH_FAILURES, "Failed AUTH attempts");
    describe_counter!(TOKEN_AUTHS, "AUTHs that succeeded with a token");
    describe_counter!(
        TOKEN_AUTH_FAILURES,
        "AUTHs with a token that was refused, by reason"
    );
    describe_counter!(
        SHARD_ERRORS,
        "Requests failed with shard unavailable, by shard"
    );
    describe_counter!(
        CLUSTER_REDIRECTS,
        "Cluster mode: requests sent again after MOVED, ASK or TRYAGAIN, by kind"
    );
    describe_counter!(CLUSTER_REFRESHES, "Cluster mode: reads of the topology");
    describe_counter!(
        CLUSTER_FAILOVERS,
        "Cluster mode: replicas seen promoted to primary"
    );
    describe_counter!(
        CLUSTER_LAYOUT_CHANGES,
        "Cluster mode: topology reads that found a new layout"
    );
    describe_counter!(SHARD_RECONNECTS, "Shard connections lost, by shard");
    describe_gauge!(
        SHARD_INFLIGHT,
        "Requests in flight to a shard (all workers)"
    );
    describe_gauge!(
        SHARD_UP,
        "1 when every worker has a connection to the shard"
    );
    describe_counter!(RT_HITS, "Read-through GETs answered by the cache");
    describe_counter!(
        RT_MISSES,
        "Read-through GETs that found nothing in the cache"
    );
    describe_counter!(RT_ORIGIN_REQUESTS, "Requests sent to the origin");
    describe_counter!(RT_COALESCED, "Misses that joined a fetch already in flight");
    describe_counter!(RT_NEGATIVE_HITS, "Misses answered by a remembered 404/410");
    describe_counter!(RT_STALE_SERVES, "Values served within their grace period");
    describe_counter!(RT_ORIGIN_ERRORS_ALL, "Origin fetches that failed");
    describe_counter!(RT_ORIGIN_ERRORS, "Origin fetches that failed, by kind");
    describe_histogram!(
        RT_ORIGIN_LATENCY,
        metrics::Unit::Seconds,
        "Origin fetch duration"
    );
    describe_counter!(RT_BYTES_LOADED, "Bytes loaded from the origin");
    describe_counter!(RT_STORED, "Loaded values stored in a shard");
    describe_counter!(
        RT_THROTTLED,
        "Origin fetches that waited for the rule's max_origin_concurrency"
    );
    describe_counter!(
        RT_REFRESHES,
        "Background refreshes of values (refresh-ahead, grace) this instance made"
    );
    describe_counter!(
        RT_REVALIDATED,
        "Refreshes the origin answered 304 Not Modified to (the value's TTL was extended)"
    );
    describe_counter!(
        RT_LEASE_WAITS,
        "Misses that waited for another instance's lease instead of calling the origin"
    );
    describe_counter!(
        RT_BREAKER_REJECTIONS,
        "Origin fetches the rule's open circuit breaker refused"
    );
    describe_counter!(RT_BREAKER_OPENS, "Times the rule's circuit breaker opened");
    describe_gauge!(
        RT_BREAKER_OPEN,
        "1 while the rule's circuit breaker is open (or half-open), else 0"
    );
    describe_gauge!(
        RT_ORIGIN_INFLIGHT,
        "Origin fetches of the rule in flight (rules with max_origin_concurrency)"
    );
    describe_counter!(
        RT_STORE_SKIPPED,
        "Loaded values not stored (no-store, a client wrote the key meanwhile, or a refresh lost its compare-and-set)"
    );
    describe_counter!(
        REQUESTS,
        "Commands received, by class (single, multi_key, all_shards, local, transaction, blocking, pubsub, refused)"
    );
    describe_operator_metrics();
    Some(handle)
}

/// The operator's view: classes, error replies, output-buffer closes, hot keys.
fn describe_operator_metrics() {
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from reading a command to its reply being ready, by class (sampled)"
    );
    describe_counter!(
        ERROR_REPLIES,
        "Error replies sent to clients (INFO's total_error_replies)"
    );
    describe_counter!(
        OBUF_CLOSES,
        "Clients closed for going over their output buffer limit"
    );
    describe_gauge!(
        HOTKEY_SHARE,
        "The hottest key's share of a shard's requests over the last minute (sampled)"
    );
    describe_gauge!(
        SHARD_RPS,
        "Requests per second to a shard over the last minute (estimated from the hot-key samples)"
    );
}

/// Registers every metric that has not moved yet at 0 (so that dashboards and alerts find a
/// series from start-up): the process-wide ones, each of `shards`, and each of the
/// command classes, token failure reasons and redirect kinds. (Per-command series start with
/// their command; a read-through rule registers its own when it is built.)
pub fn register_at_zero(shards: &[String], classes: &[&'static str]) {
    for name in [
        CONNECTIONS_TOTAL,
        REJECTED,
        AUTH_FAILURES,
        TOKEN_AUTHS,
        CLUSTER_REFRESHES,
        CLUSTER_LAYOUT_CHANGES,
        CLUSTER_FAILOVERS,
        ERROR_REPLIES,
        OBUF_CLOSES,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(CONNECTIONS).increment(0.0);
    for &reason in TOKEN_FAILURE_REASONS {
        metrics::counter!(TOKEN_AUTH_FAILURES, "reason" => reason).increment(0);
    }
    for &kind in REDIRECT_KINDS {
        metrics::counter!(CLUSTER_REDIRECTS, "kind" => kind).increment(0);
    }
    for &class in classes {
        metrics::counter!(REQUESTS, "class" => class).increment(0);
        let _ = metrics::histogram!(REQUEST_DURATION, "class" => class);
    }
    for shard in shards {
        metrics::counter!(SHARD_ERRORS, "shard" => shard.clone()).increment(0);
        metrics::counter!(SHARD_RECONNECTS, "shard" => shard.clone()).increment(0);
        for g in [SHARD_UP, SHARD_INFLIGHT, HOTKEY_SHARE, SHARD_RPS] {
            metrics::gauge!(g, "shard" => shard.clone()).increment(0.0);
        }
    }
}

/// A worker's command counters, published to the registry once a second.
#[derive(Default)]
pub struct WorkerMetrics {
    /// Keyed by the address of the command table's name: every name is a distinct
    /// `&'static str`, so the address identifies it and hashing is a multiply, not SipHash
    /// over the bytes (callgrind showed SipHash at ~1% of a GET).
    commands:
        RefCell<HashMap<usize, (&'static str, CommandCounts), BuildHasherDefault<AddrHasher>>>,
    /// The command counted last and how many times in a row, not yet in `commands`: a run
    /// of one command (the common case) costs a comparison per command, not a map lookup.
    run: std::cell::Cell<Option<(&'static str, u64)>>,
}

/// What INFO commandstats (and latencystats) shows of one command.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct CommandCounts {
    pub calls: u64,
    /// Sampled latencies (one command in [`SAMPLE_EVERY`]): their sum and count. The time
    /// per call is their mean.
    pub sampled_usec: u64,
    pub samples: u64,
    /// Refused before running (unknown subcommand, arity, authentication, permissions).
    pub rejected: u64,
    /// Answered with an error (slotgate's own or the shard's).
    pub failed: u64,
    /// The sampled latencies' distribution (INFO latencystats).
    pub latency: LatencyHistogram,
}

/// Buckets per doubling of [`LatencyHistogram`]: a bucket spans at most 19% of its value.
const SUB_BUCKETS: f64 = 4.0;
/// Buckets up to 2^30 µs (about 18 minutes).
const BUCKETS: usize = 120;

/// A latency distribution in logarithmic buckets of microseconds, for percentiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram(Vec<u64>);

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        (((us + 1) as f64).log2() * SUB_BUCKETS) as usize
    }

    /// The upper bound (µs) of bucket `i`.
    fn bound(i: usize) -> f64 {
        (2f64.powf((i + 1) as f64 / SUB_BUCKETS) - 1.0).max(0.001)
    }

    pub fn record(&mut self, us: u64) {
        if self.0.is_empty() {
            self.0 = vec![0; BUCKETS];
        }
        self.0[Self::bucket(us).min(BUCKETS - 1)] += 1;
    }

    pub fn add(&mut self, o: &LatencyHistogram) {
        if o.0.is_empty() {
            return;
        }
        if self.0.is_empty() {
            self.0 = vec![0; BUCKETS];
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a += b;
        }
    }

    /// The buckets with samples: (upper bound in microseconds, samples).
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (Self::bound(i), *n))
    }

    /// The `p`-th percentile (0–100) in microseconds, as the upper bound of its bucket;
    /// `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::bound(i));
            }
        }
        None
    }
}

impl CommandCounts {
    fn add(&mut self, o: &CommandCounts) {
        self.calls += o.calls;
        self.sampled_usec += o.sampled_usec;
        self.samples += o.samples;
        self.rejected += o.rejected;
        self.failed += o.failed;
        self.latency.add(&o.latency);
    }
}

/// Errors answered, counted where they are seen (off the hot path: only error replies get
/// here). Per thread, so per worker; [`WorkerMetrics::publish`] moves them to the totals.
#[derive(Default)]
struct ErrorCounts {
    /// Per command (address of its table name, as in `commands`): rejected, failed.
    per_command: HashMap<usize, (&'static str, u64, u64), BuildHasherDefault<AddrHasher>>,
    /// Per error prefix (`ERR`, `WRONGTYPE` …).
    prefixes: HashMap<String, u64>,
    total: u64,
}

thread_local! {
    static ERRORS: RefCell<ErrorCounts> = RefCell::default();
}

/// Most distinct error prefixes counted. As Redis 7.2+ does, one more turns errorstats off
/// until CONFIG RESETSTAT (a client making up error prefixes, through scripts' `error_reply`,
/// must not grow it without bound): the section then shows `errorstat_ERRORSTATS_DISABLED`.
/// `total_error_replies` keeps counting.
pub const ERROR_PREFIXES_MAX: usize = 128;

/// The prefix Redis's errorstats counts an error reply under: its first word (within 32
/// bytes), or `ERR` when it has none.
pub fn error_prefix(reply: &[u8]) -> &[u8] {
    let body = reply.strip_prefix(b"-").unwrap_or(reply);
    let head = &body[..body.len().min(31)];
    match head.iter().position(|&c| c == b' ') {
        Some(n) if n > 0 => &head[..n],
        _ => b"ERR",
    }
}

/// Counts an error reply of command `cmd` (when known): `rejected` before it ran, else failed.
#[cold]
#[inline(never)]
pub fn note_error(cmd: Option<&'static str>, reply: &[u8], rejected: bool) {
    ERRORS.with(|e| {
        let mut e = e.borrow_mut();
        e.total += 1;
        if let Some(name) = cmd {
            let c = e
                .per_command
                .entry(name.as_ptr() as usize)
                .or_insert((name, 0, 0));
            if rejected {
                c.1 += 1;
            } else {
                c.2 += 1;
            }
        }
        let prefix = String::from_utf8_lossy(error_prefix(reply));
        // (One past the limit is kept, so that publishing sees the overflow.)
        let full = e.prefixes.len() > ERROR_PREFIXES_MAX;
        match e.prefixes.get_mut(prefix.as_ref()) {
            Some(n) => *n += 1,
            None if !full => {
                e.prefixes.insert(prefix.into_owned(), 1);
            }
            None => {}
        }
    });
}

/// The process's command and error statistics (INFO commandstats, errorstats and
/// `total_error_replies`): what every worker published.
#[derive(Default, Debug)]
pub struct CommandTotals {
    pub commands: HashMap<&'static str, CommandCounts>,
    pub errors: HashMap<String, u64>,
    pub total_errors: u64,
    /// Too many distinct prefixes came: errorstats is off until a reset.
    pub errors_disabled: bool,
}

impl CommandTotals {
    fn command(&mut self, name: &'static str) -> &mut CommandCounts {
        self.commands.entry(name).or_default()
    }
}

/// Hashes one `usize` (an address) with a multiply.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl WorkerMetrics {
    /// Counts one command (by its table name, so the label set is bounded).
    #[inline]
    pub fn command(&self, name: &'static str) {
        match self.run.get() {
            Some((last, n)) if std::ptr::eq(last, name) => self.run.set(Some((last, n + 1))),
            _ => self.end_run(Some((name, 1))),
        }
    }

    /// Takes back the count of the command just counted: it was refused after all, or will
    /// be counted again when it runs (a deferred MONITOR).
    #[cold]
    pub fn uncount(&self, name: &'static str) {
        if let Some((last, n)) = self.run.get()
            && std::ptr::eq(last, name)
            && n > 0
        {
            self.run.set(Some((last, n - 1)));
        }
    }

    /// Adds the current run to the map and starts `next`.
    fn end_run(&self, next: Option<(&'static str, u64)>) {
        if let Some((name, n)) = self.run.replace(next) {
            self.counts(name, |c| c.calls += n);
        }
    }

    fn counts(&self, name: &'static str, f: impl FnOnce(&mut CommandCounts)) {
        f(&mut self
            .commands
            .borrow_mut()
            .entry(name.as_ptr() as usize)
            .or_insert((name, CommandCounts::default()))
            .1);
    }

    /// A sampled command's latency (see [`SAMPLE_EVERY`]).
    pub fn sampled(&self, name: &'static str, took: std::time::Duration) {
        self.counts(name, |c| {
            let us = took.as_micros() as u64;
            c.sampled_usec += us;
            c.samples += 1;
            c.latency.record(us);
        });
    }

    /// CONFIG RESETSTAT: the process's totals start over, with this worker's counts not yet
    /// published. (The other workers' counts of the last second, published later, still
    /// arrive: a reset is exact for the worker that takes it, within a second for others.)
    pub fn reset(&self, totals: &std::sync::Mutex<CommandTotals>) {
        self.publish(totals);
        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
        *t = CommandTotals::default();
    }

    /// Moves the counts into the registry and into the process's `totals`.
    pub fn publish(&self, totals: &std::sync::Mutex<CommandTotals>) {
        self.end_run(None);
        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (name, c)) in self.commands.borrow_mut().drain() {
            if c.calls > 0 {
                metrics::counter!(COMMANDS, "command" => name).increment(c.calls);
            }
            t.command(name).add(&c);
        }
        ERRORS.with(|e| {
            let mut e = e.borrow_mut();
            for (_, (name, rejected, failed)) in e.per_command.drain() {
                let c = t.command(name);
                c.rejected += rejected;
                c.failed += failed;
            }
            for (prefix, n) in e.prefixes.drain() {
                if t.errors_disabled {
                    continue;
                }
                if !t.errors.contains_key(&prefix) && t.errors.len() >= ERROR_PREFIXES_MAX {
                    tracing::warn!(
                        "errorstats stopped counting: more than {ERROR_PREFIXES_MAX} distinct \
                         error prefixes (a script's error_reply?); CONFIG RESETSTAT starts it again"
                    );
                    t.errors.clear();
                    t.errors.insert("ERRORSTATS_DISABLED".into(), 1);
                    t.errors_disabled = true;
                    continue;
                }
                *t.errors.entry(prefix).or_default() += n;
            }
            t.total_errors += std::mem::take(&mut e.total);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_commands_are_all_counted() {
        let m = WorkerMetrics::default();
        for name in ["get", "get", "set", "get", "set", "set", "set", "del"] {
            m.command(name);
        }
        m.end_run(None);
        let mut counts: Vec<(&str, u64)> = m
            .commands
            .borrow()
            .values()
            .map(|(n, c)| (*n, c.calls))
            .collect();
        counts.sort();
        assert_eq!(counts, vec![("del", 1), ("get", 3), ("set", 4)]);
        // Nothing is left in the run after publishing; the totals have it all.
        m.command("get");
        let totals = std::sync::Mutex::default();
        m.publish(&totals);
        assert!(m.run.get().is_none() && m.commands.borrow().is_empty());
        assert_eq!(totals.lock().unwrap().commands["get"].calls, 4);
    }

    #[test]
    fn errors_count_by_command_and_prefix_as_redis() {
        assert_eq!(
            error_prefix(b"-WRONGTYPE Operation against a key"),
            b"WRONGTYPE"
        );
        assert_eq!(error_prefix(b"-ERR unknown command"), b"ERR");
        assert_eq!(error_prefix(b"-NOSPACEINTHISERROR"), b"ERR");
        assert_eq!(
            error_prefix(b"-AVERYVERYVERYLONGPREFIXPASTTHIRTYTWOBYTES x"),
            b"ERR"
        );
        let m = WorkerMetrics::default();
        note_error(Some("get"), b"-WRONGTYPE x\r\n", false);
        note_error(Some("get"), b"-ERR wrong number of arguments\r\n", true);
        note_error(None, b"-ERR unknown command\r\n", true);
        let totals = std::sync::Mutex::default();
        m.publish(&totals);
        let t = totals.lock().unwrap();
        assert_eq!(
            (t.commands["get"].rejected, t.commands["get"].failed),
            (1, 1)
        );
        assert_eq!(
            (t.errors["ERR"], t.errors["WRONGTYPE"], t.total_errors),
            (2, 1, 3)
        );
        drop(t);
        // One prefix past the limit turns errorstats off (Redis 7.2+), not the total.
        for i in 0..ERROR_PREFIXES_MAX {
            note_error(None, format!("-P{i} x").as_bytes(), false);
        }
        m.publish(&totals);
        let t = totals.lock().unwrap();
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors.keys());
        assert!(t.errors_disabled && t.errors["ERRORSTATS_DISABLED"] == 1);
        assert_eq!(t.total_errors, 3 + ERROR_PREFIXES_MAX as u64);
    }

    #[test]
    fn latency_percentiles_are_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile(50.0), None);
        for us in 1..=1000 {
            h.record(us);
        }
        let p50 = h.percentile(50.0).unwrap();
        let p99 = h.percentile(99.0).unwrap();
        assert!((500.0..=500.0 * 1.2).contains(&p50), "{p50}");
        assert!((990.0..=990.0 * 1.2).contains(&p99), "{p99}");
        assert!(h.percentile(100.0).unwrap() >= 1000.0);
    }
}
