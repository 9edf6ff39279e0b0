//! slotgate's own slow log: commands whose time through the proxy, from reading the command
//! to its reply arriving from the shard, reached `slowlog_log_slower_than` microseconds
//! (Redis's `slowlog-log-slower-than` semantics: negative turns it off, 0 logs every
//! command). Kept newest first, at most `slowlog_max_len` entries; SLOWLOG GET shows them
//! beside the shards' own entries.
//!
//! The check costs a shard connection one comparison per reply: each request already carries
//! its deadline (its start plus the operation timeout), and the connection reads the clock
//! after every read, so "started before the read time minus the threshold" needs no clock
//! read of its own.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One slow command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    /// Unix time (seconds) when it was logged.
    pub time: u64,
    pub micros: u64,
    /// The command's table name (`get`, `client|list` …): slotgate does not keep arguments.
    pub command: &'static str,
    /// The shard it went to.
    pub shard: String,
    pub client: Option<SocketAddr>,
}

/// The log (one per process, shared by the workers).
#[derive(Debug)]
pub struct SlowLog {
    threshold_us: AtomicI64,
    max_len: AtomicUsize,
    next_id: AtomicU64,
    entries: Mutex<VecDeque<Entry>>,
}

impl SlowLog {
    pub fn new(threshold_us: i64, max_len: usize) -> Self {
        SlowLog {
            threshold_us: AtomicI64::new(threshold_us),
            max_len: AtomicUsize::new(max_len),
            next_id: AtomicU64::new(0),
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// A reload's new threshold and length.
    pub fn configure(&self, threshold_us: i64, max_len: usize) {
        self.threshold_us.store(threshold_us, Ordering::Relaxed);
        self.max_len.store(max_len, Ordering::Relaxed);
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.truncate(max_len);
    }

    /// The threshold, `None` when the log is off.
    #[inline]
    pub fn threshold(&self) -> Option<Duration> {
        let t = self.threshold_us.load(Ordering::Relaxed);
        (t >= 0).then(|| Duration::from_micros(t as u64))
    }

    /// Logs a command that took `took`.
    #[cold]
    pub fn record(
        &self,
        command: &'static str,
        took: Duration,
        shard: &str,
        client: Option<SocketAddr>,
    ) {
        let max = self.max_len.load(Ordering::Relaxed);
        if max == 0 {
            return;
        }
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            time,
            micros: took.as_micros() as u64,
            command,
            shard: shard.to_string(),
            client,
        };
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.push_front(entry);
        e.truncate(max);
    }

    /// The newest `count` entries (all with `None`), newest first.
    pub fn newest(&self, count: Option<usize>) -> Vec<Entry> {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.iter()
            .take(count.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// SLOWLOG RESET: how many entries went.
    pub fn reset(&self) -> usize {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let n = e.len();
        e.clear();
        n
    }
}

impl Default for SlowLog {
    /// Redis's defaults: 10 ms, 128 entries.
    fn default() -> Self {
        SlowLog::new(10_000, 128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_up_to_its_length() {
        let log = SlowLog::new(0, 2);
        for c in ["get", "set", "del"] {
            log.record(c, Duration::from_millis(20), "127.0.0.1:1", None);
        }
        let names: Vec<_> = log.newest(None).iter().map(|e| (e.id, e.command)).collect();
        assert_eq!(names, [(2, "del"), (1, "set")]);
        assert_eq!(log.newest(Some(1)).len(), 1);
        log.configure(-1, 1);
        assert_eq!((log.threshold(), log.len()), (None, 1));
        assert_eq!(log.reset(), 1);
        assert!(log.is_empty());
    }
}
