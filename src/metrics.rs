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
    describe_counter!(
        SHARD_ERRORS,
        "Requests failed with shard unavailable, by shard"
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
        RT_STORE_SKIPPED,
        "Loaded values not stored (no-store, a client wrote the key meanwhile, or a refresh lost its compare-and-set)"
    );
    Some(handle)
}

/// A worker's command counters, published to the registry once a second.
#[derive(Default)]
pub struct WorkerMetrics {
    /// Keyed by the address of the command table's name: every name is a distinct
    /// `&'static str`, so the address identifies it and hashing is a multiply, not SipHash
    /// over the bytes (callgrind showed SipHash at ~1% of a GET).
    commands: RefCell<HashMap<usize, (&'static str, u64), BuildHasherDefault<AddrHasher>>>,
    /// The command counted last and how many times in a row, not yet in `commands`: a run
    /// of one command (the common case) costs a comparison per command, not a map lookup.
    run: std::cell::Cell<Option<(&'static str, u64)>>,
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

    /// Adds the current run to the map and starts `next`.
    fn end_run(&self, next: Option<(&'static str, u64)>) {
        if let Some((name, n)) = self.run.replace(next) {
            self.commands
                .borrow_mut()
                .entry(name.as_ptr() as usize)
                .or_insert((name, 0))
                .1 += n;
        }
    }

    /// Moves the counts into the registry.
    pub fn publish(&self) {
        self.end_run(None);
        for (_, (name, n)) in self.commands.borrow_mut().drain() {
            metrics::counter!(COMMANDS, "command" => name).increment(n);
        }
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
        let mut counts: Vec<(&str, u64)> = m.commands.borrow().values().copied().collect();
        counts.sort();
        assert_eq!(counts, vec![("del", 1), ("get", 3), ("set", 4)]);
        // Nothing is left in the run after publishing.
        m.command("get");
        m.publish();
        assert!(m.run.get().is_none() && m.commands.borrow().is_empty());
    }
}
