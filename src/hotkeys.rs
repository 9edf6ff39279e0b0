//! Hot keys and big replies: what the proxy sees of its traffic, key by key.
//!
//! Each worker samples about one command in `hotkeys_sample` (a [`Sampler`]: a random
//! countdown, so a client cycling through keys cannot fall between two samples) and records
//! the keys of a sampled command, each weighing `hotkeys_sample` requests, in its [`Book`]:
//! one Space-Saving summary (Metwally, Agrawal, El Abbadi, 2005) of [`KEYS_PER_WINDOW`] keys
//! per 10-second window, 31 windows kept. A key already in the summary has its count raised; a
//! new one replaces the least counted and inherits its count, so a key requested often is
//! never lost. What is reported is what was counted while the key was in the summary. A sampled single-key read also records
//! the size of its reply (the big replies: the [`BIG_PER_WINDOW`] largest per window).
//!
//! The fast path is [`Sampler::tick`]: one decrement and a branch per command. A sample
//! takes the book's lock (only this worker takes it, except while someone asks), so the
//! answers of `SLOTGATE.HOTKEYS`, `/hotkeys` and the gauges merge every worker's book on
//! demand ([`merge`]).

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The length of one window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Windows kept: 5 minutes of full windows and the current one.
const WINDOWS_KEPT: u64 = 31;
/// Keys one worker's summary holds per window.
pub const KEYS_PER_WINDOW: usize = 256;
/// Big replies one worker remembers per window.
pub const BIG_PER_WINDOW: usize = 32;
/// The default of `hotkeys_sample`: one command in 32 (measured: about 1.5% more
/// instructions on an unpipelined GET; see the README).
pub const DEFAULT_SAMPLE: u32 = 32;

/// The spans `WINDOW` takes: the current window and this many full ones before it.
pub fn parse_span(arg: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(arg).ok()?.to_ascii_lowercase();
    match s.as_str() {
        "10s" => Some(Duration::from_secs(10)),
        "1m" | "60s" => Some(Duration::from_secs(60)),
        "5m" | "300s" => Some(Duration::from_secs(300)),
        _ => None,
    }
}

/// What `SLOTGATE.HOTKEYS` / `SLOTGATE.BIGKEYS` (and `/hotkeys`, `/bigkeys`) ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub count: usize,
    pub span: Duration,
}

/// Why a query's options were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryError {
    Syntax,
    NotInteger,
    NotPositive,
    Window,
}

impl Query {
    pub const DEFAULT: Query = Query {
        count: 10,
        span: Duration::from_secs(60),
    };

    /// Parses `[COUNT n] [WINDOW 10s|1m|5m]` (names in any case, either order).
    pub fn parse<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> Result<Query, QueryError> {
        let mut q = Query::DEFAULT;
        while let Some(opt) = args.next() {
            let value = args.next();
            if opt.eq_ignore_ascii_case(b"count") {
                let v = value.ok_or(QueryError::Syntax)?;
                let n: i64 = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(QueryError::NotInteger)?;
                if n < 1 {
                    return Err(QueryError::NotPositive);
                }
                q.count = n as usize;
            } else if opt.eq_ignore_ascii_case(b"window") {
                q.span = parse_span(value.ok_or(QueryError::Syntax)?).ok_or(QueryError::Window)?;
            } else {
                return Err(QueryError::Syntax);
            }
        }
        Ok(q)
    }

    /// The span as asked (`10s`, `1m`, `5m`).
    pub fn window_name(&self) -> &'static str {
        match self.span.as_secs() {
            10 => "10s",
            300 => "5m",
            _ => "1m",
        }
    }
}

/// One worker's sampling decision, on the command path (not shared).
pub struct Sampler {
    left: Cell<u32>,
    rng: Cell<u64>,
    /// One command in `every` (0: never).
    every: u32,
    pub book: Arc<Book>,
}

impl Sampler {
    pub fn new(every: u32, book: Arc<Book>, seed: u64) -> Self {
        let s = Sampler {
            left: Cell::new(u32::MAX),
            rng: Cell::new(seed | 1),
            every,
            book,
        };
        if every > 0 {
            s.fire();
        }
        s
    }

    /// Whether this command is sampled.
    #[inline]
    pub fn tick(&self) -> bool {
        let left = self.left.get().wrapping_sub(1);
        self.left.set(left);
        left == 0 && self.fire()
    }

    /// Draws the next interval, uniform in `1..2*every` (mean `every`): sampling stays
    /// unbiased and cannot lock on to a pattern that repeats every `every` commands.
    #[cold]
    fn fire(&self) -> bool {
        if self.every == 0 {
            self.left.set(u32::MAX);
            return false;
        }
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        let span = 2 * u64::from(self.every) - 1;
        self.left.set(1 + (x % span) as u32);
        true
    }

    /// How many requests one sample stands for.
    pub fn weight(&self) -> u64 {
        u64::from(self.every)
    }
}

/// One worker's windows of sampled keys and big replies.
pub struct Book {
    started: Instant,
    state: Mutex<State>,
}

struct State {
    windows: Vec<Window>,
    /// The doorkeeper of the current window (see [`doorkeeper`]).
    door: Vec<u64>,
    door_window: u64,
}

/// Buckets of the doorkeeper, four fingerprints each (128 KiB per worker).
const DOOR_BUCKETS: usize = 1 << 14;

/// The doorkeeper: fingerprints of keys sampled once (and whether that sample was a write),
/// four per bucket. A key enters the summary at its second sample, counted twice then, so
/// the long tail of keys sampled once costs a hash and a store, not an eviction.
/// `Some(first_write)` lets the key in (and forgets it here); `None` remembers it. A key
/// whose fingerprint was pushed out of a full bucket meanwhile waits for its next sample;
/// two keys with the same bucket and fingerprint (1 in 2^29 per pair) would count one
/// sample too many.
fn doorkeeper(door: &mut [u64], h: u64, write: bool) -> Option<bool> {
    let bucket = &mut door[h as usize % DOOR_BUCKETS];
    let print = ((h >> 48) & 0x7fff).max(1);
    let mut empty = None;
    for lane in 0..4 {
        let v = (*bucket >> (16 * lane)) & 0xffff;
        if v & 0x7fff == print {
            *bucket &= !(0xffff << (16 * lane));
            return Some(v >> 15 == 1);
        }
        if v == 0 && empty.is_none() {
            empty = Some(lane);
        }
    }
    let lane = empty.unwrap_or(((h >> 40) & 3) as usize);
    *bucket &= !(0xffff << (16 * lane));
    *bucket |= (print | u64::from(write) << 15) << (16 * lane);
    None
}
/// The longest key kept whole; a longer one is kept as its first bytes and its length.
pub const KEY_MAX: usize = 256;

/// `key`, or for a key over [`KEY_MAX`] bytes its first 200 and `…(N bytes)`: what the
/// summaries keep and show, so that a client's huge key names cannot take their memory.
pub fn kept_key(key: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if key.len() <= KEY_MAX {
        return std::borrow::Cow::Borrowed(key);
    }
    let mut k = key[..200].to_vec();
    k.extend_from_slice(format!("…({} bytes)", key.len()).as_bytes());
    std::borrow::Cow::Owned(k)
}

#[derive(Default)]
struct Window {
    /// The window's number since `started` (`u64::MAX`: unused).
    number: u64,
    keys: SpaceSaving,
    big: Vec<Big>,
    /// The smallest size in `big`.
    big_min: usize,
    /// Requests (estimated) per shard, every sampled key counted (a few shards: a list).
    shards: Vec<(SocketAddr, u64)>,
}

/// A big reply seen in a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Big {
    pub key: Bytes,
    /// The reply's size in bytes, as framed (RESP header included).
    pub size: usize,
    pub shard: SocketAddr,
}

fn hash(key: &[u8]) -> u64 {
    let mut h = KeyHasher::default();
    h.write(key);
    h.finish()
}

impl Book {
    pub fn new(started: Instant) -> Self {
        let windows = (0..WINDOWS_KEPT)
            .map(|_| Window {
                number: u64::MAX,
                ..Window::default()
            })
            .collect();
        Book {
            started,
            state: Mutex::new(State {
                windows,
                door: vec![0; DOOR_BUCKETS],
                door_window: u64::MAX,
            }),
        }
    }

    fn number(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / WINDOW.as_secs()
    }

    /// Runs `f` on the window of `now`, unless that window is gone (a record that comes
    /// later than the windows kept: it never replaces a newer window).
    fn with_window(&self, now: Instant, f: impl FnOnce(&mut Window, &mut [u64])) {
        let n = self.number(now);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        let w = &st.windows[(n % WINDOWS_KEPT) as usize];
        if w.number != u64::MAX && w.number > n {
            return;
        }
        if st.door_window == u64::MAX || n > st.door_window {
            st.door.fill(0);
            st.door_window = n;
        }
        let w = &mut st.windows[(n % WINDOWS_KEPT) as usize];
        if w.number != n {
            w.number = n;
            w.keys.clear();
            w.big.clear();
            w.big_min = 0;
            w.shards.clear();
        }
        f(w, &mut st.door);
    }

    /// Records the keys of one sampled command, each standing for `weight` requests.
    pub fn record<'k>(
        &self,
        now: Instant,
        weight: u64,
        write: bool,
        keys: impl Iterator<Item = (&'k [u8], SocketAddr)>,
    ) {
        self.with_window(now, |w, door| {
            for (key, shard) in keys {
                match w.shards.iter_mut().find(|(s, _)| *s == shard) {
                    Some((_, n)) => *n += weight,
                    None => w.shards.push((shard, weight)),
                }
                let key = kept_key(key);
                if w.keys.bump(&key, weight, write, shard) {
                    continue;
                }
                // Not in the summary: its second sample lets it in.
                if let Some(first_write) = doorkeeper(door, hash(&key), write) {
                    w.keys.enter(&key, weight, write, shard, first_write);
                }
            }
        });
    }

    /// Records the size of a sampled read's reply (`at`: when the read was sampled).
    pub fn record_size(&self, at: Instant, key: &[u8], size: usize, shard: SocketAddr) {
        self.with_window(at, |w, _| {
            // Most replies are smaller than every big one kept: one comparison.
            if w.big.len() == BIG_PER_WINDOW && size <= w.big_min {
                return;
            }
            let key = &*kept_key(key);
            if let Some(b) = w.big.iter_mut().find(|b| b.key == key) {
                b.size = b.size.max(size);
                b.shard = shard;
            } else {
                let key = Bytes::copy_from_slice(key);
                if w.big.len() < BIG_PER_WINDOW {
                    w.big.push(Big { key, size, shard });
                } else if let Some(small) = w.big.iter_mut().min_by_key(|b| b.size) {
                    *small = Big { key, size, shard };
                }
            }
            w.big_min = w.big.iter().map(|b| b.size).min().unwrap_or(0);
        });
    }
}

/// A key kept until its reply's size is known: inline when short (most keys), so that a
/// sample allocates nothing for it.
pub struct SmallKey {
    len: u8,
    inline: [u8; 46],
    long: Option<Bytes>,
}

impl SmallKey {
    pub fn new(key: &[u8]) -> Self {
        let mut k = SmallKey {
            len: 0,
            inline: [0; 46],
            long: None,
        };
        match k.inline.get_mut(..key.len()) {
            Some(dst) => {
                dst.copy_from_slice(key);
                k.len = key.len() as u8;
            }
            None => k.long = Some(Bytes::copy_from_slice(key)),
        }
        k
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.long {
            Some(b) => b,
            None => &self.inline[..self.len as usize],
        }
    }
}

/// A hot key, merged over the workers and the windows asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct HotKey {
    pub key: Bytes,
    /// Requests estimated in the span: those counted while the key was in the summary (a
    /// key requested often enters a window early and stays), so never over the truth, up to
    /// sampling noise. (The summary's own count, which ranks keys for eviction, adds what
    /// the key inherited on entry: an upper bound, far too high for keys that come and go.)
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    /// The shard the key was last seen going to.
    pub shard: SocketAddr,
}

/// Every worker's books merged over a span ending now.
pub struct Merged {
    pub keys: Vec<HotKey>,
    pub big: Vec<Big>,
    /// Requests (estimated) per shard.
    pub shards: HashMap<SocketAddr, u64>,
    /// The seconds the span covers (the current window's elapsed part included; never
    /// more than the time since start-up).
    pub seconds: f64,
}

impl Merged {
    pub fn rate(&self, n: u64) -> f64 {
        if self.seconds > 0.0 {
            n as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Requests per second to `shard` (every sampled key counted).
    pub fn shard_rate(&self, shard: SocketAddr) -> f64 {
        self.rate(self.shards.get(&shard).copied().unwrap_or(0))
    }

    /// Per shard: the hottest key's share of the shard's requests (0 without requests).
    pub fn hottest_share(&self, shard: SocketAddr) -> f64 {
        let total = self.shards.get(&shard).copied().unwrap_or(0);
        let top = self
            .keys
            .iter()
            .filter(|k| k.shard == shard)
            .map(|k| k.requests)
            .max()
            .unwrap_or(0);
        if total == 0 {
            0.0
        } else {
            (top as f64 / total as f64).min(1.0)
        }
    }
}

/// The last merge of each span, reused for a second: a client (or a scraper) asking again
/// and again costs one merge a second, not one per request.
#[derive(Default)]
pub struct MergeCache {
    last: Mutex<Vec<(Duration, Instant, Arc<Merged>)>>,
}

/// How long a merge is reused.
const MERGE_REUSE: Duration = Duration::from_secs(1);

impl MergeCache {
    pub fn merged(&self, books: &[Arc<Book>], now: Instant, span: Duration) -> Arc<Merged> {
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, m)) = last
                .iter()
                .find(|(s, at, _)| *s == span && now.saturating_duration_since(*at) < MERGE_REUSE)
            {
                return m.clone();
            }
        }
        let m = Arc::new(merge(books, now, span));
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.retain(|(s, _, _)| *s != span);
        last.push((span, now, m.clone()));
        m
    }
}

/// One window of one book, copied out of its lock.
struct Copied {
    number: u64,
    keys: Vec<(Bytes, u64, u64, SocketAddr)>,
    big: Vec<Big>,
    shards: Vec<(SocketAddr, u64)>,
}

/// Merges `books` over the current window and the full windows of `span` before it: keys
/// sorted by requests (most first), big replies by size (largest first).
pub fn merge(books: &[Arc<Book>], now: Instant, span: Duration) -> Merged {
    let full = span.as_secs() / WINDOW.as_secs();
    let mut seconds = 0.0;
    // Each book's windows are copied out under its lock (the keys are shared, not copied)
    // and merged after: a worker waits for the copy, never for the merge.
    let mut copied: Vec<Copied> = Vec::new();
    for book in books {
        let cur = book.number(now);
        let first = cur.saturating_sub(full);
        let since_start = now.saturating_duration_since(book.started);
        let into_cur = since_start.as_secs_f64() - cur as f64 * WINDOW.as_secs_f64();
        seconds = ((cur - first) as f64 * WINDOW.as_secs_f64() + into_cur).max(0.001);
        let st = book.state.lock().unwrap_or_else(|e| e.into_inner());
        for w in st.windows.iter() {
            if w.number >= first && w.number <= cur {
                copied.push(Copied {
                    number: w.number,
                    keys: w
                        .keys
                        .entries
                        .iter()
                        .map(|e| (e.key.clone(), e.reads, e.writes, e.shard))
                        .collect(),
                    big: w.big.clone(),
                    shards: w.shards.clone(),
                });
            }
        }
    }
    // Oldest window first, so that a key's shard is the newest seen (a reload or a
    // cluster's reshard may have moved it).
    copied.sort_by_key(|c| c.number);
    let mut keys: HashMap<Bytes, HotKey> = HashMap::new();
    let mut big: HashMap<Bytes, Big> = HashMap::new();
    let mut shards: HashMap<SocketAddr, u64> = HashMap::new();
    for c in copied {
        for (key, reads, writes, shard) in c.keys {
            let k = keys.entry(key.clone()).or_insert_with(|| HotKey {
                key,
                requests: 0,
                reads: 0,
                writes: 0,
                shard,
            });
            k.requests += reads + writes;
            k.reads += reads;
            k.writes += writes;
            k.shard = shard;
        }
        for b in c.big {
            let m = big.entry(b.key.clone()).or_insert_with(|| b.clone());
            m.size = m.size.max(b.size);
            m.shard = b.shard;
        }
        for (s, n) in c.shards {
            *shards.entry(s).or_default() += n;
        }
    }
    let mut keys: Vec<HotKey> = keys.into_values().collect();
    keys.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
    let mut big: Vec<Big> = big.into_values().collect();
    big.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.key.cmp(&b.key)));
    Merged {
        keys,
        big,
        shards,
        seconds,
    }
}

/// A multiply-rotate hash of key bytes for the summary's index: a few instructions per 8
/// bytes where SipHash costs a hundred. Keys come from clients, but the index holds at most
/// [`KEYS_PER_WINDOW`] of them, so crafted collisions cost at most a scan of those.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            self.0 = (self.0 ^ w).wrapping_mul(K).rotate_left(29);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
        }
    }

    /// Mixed so that every bit depends on every byte (a multiply alone carries low bits
    /// up, never high bits down, and the index and the doorkeeper use the low bits).
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

/// A Space-Saving summary: the keys in `entries` (stable slots), with a binary min-heap of
/// slots by count (`heap`, and `pos[slot]` its place there) so that the least counted is
/// found at once and a raised count sinks in a few steps, without hashing.
#[derive(Default)]
struct SpaceSaving {
    index: HashMap<Bytes, u32, BuildHasherDefault<KeyHasher>>,
    entries: Vec<Entry>,
    heap: Vec<u32>,
    pos: Vec<u32>,
}

struct Entry {
    key: Bytes,
    count: u64,
    reads: u64,
    writes: u64,
    shard: SocketAddr,
}

impl SpaceSaving {
    fn clear(&mut self) {
        self.index.clear();
        self.entries.clear();
        self.heap.clear();
        self.pos.clear();
    }

    /// Counts a sample of `key` if it is in the summary; `false` if it is not.
    fn bump(&mut self, key: &[u8], w: u64, write: bool, shard: SocketAddr) -> bool {
        let Some(&slot) = self.index.get(key) else {
            return false;
        };
        let (r, wr) = if write { (0, w) } else { (w, 0) };
        let e = &mut self.entries[slot as usize];
        e.count += w;
        e.reads += r;
        e.writes += wr;
        e.shard = shard;
        self.sink(self.pos[slot as usize] as usize);
        true
    }

    /// Lets `key` (not in the summary) in with its sample and the one the doorkeeper held
    /// back (`first_write`: what that one was).
    fn enter(&mut self, key: &[u8], w: u64, write: bool, shard: SocketAddr, first_write: bool) {
        let (r, wr) = if write { (0, w) } else { (w, 0) };
        // (Past the doorkeeper: its first sample counts too.)
        let (r, wr) = if first_write {
            (r, wr + w)
        } else {
            (r + w, wr)
        };
        let w = 2 * w;
        let key = Bytes::copy_from_slice(key);
        if self.entries.len() < KEYS_PER_WINDOW {
            let slot = self.entries.len() as u32;
            self.index.insert(key.clone(), slot);
            self.entries.push(Entry {
                key,
                count: w,
                reads: r,
                writes: wr,
                shard,
            });
            self.pos.push(self.heap.len() as u32);
            self.heap.push(slot);
            return self.rise(self.heap.len() - 1);
        }
        // Full: the least counted key makes room, and its count carries over (the
        // newcomer may have been requested that often while it was not in the summary).
        let slot = self.heap[0];
        let e = &mut self.entries[slot as usize];
        self.index.remove(&e.key);
        self.index.insert(key.clone(), slot);
        *e = Entry {
            key,
            count: e.count + w,
            reads: r,
            writes: wr,
            shard,
        };
        self.sink(0);
    }

    fn count_at(&self, i: usize) -> u64 {
        self.entries[self.heap[i] as usize].count
    }

    fn swap(&mut self, i: usize, j: usize) {
        self.heap.swap(i, j);
        self.pos[self.heap[i] as usize] = i as u32;
        self.pos[self.heap[j] as usize] = j as u32;
    }

    fn sink(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.heap.len() && self.count_at(l) < self.count_at(least) {
                least = l;
            }
            if r < self.heap.len() && self.count_at(r) < self.count_at(least) {
                least = r;
            }
            if least == i {
                return;
            }
            self.swap(i, least);
            i = least;
        }
    }

    fn rise(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.count_at(parent) <= self.count_at(i) {
                return;
            }
            self.swap(i, parent);
            i = parent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    #[test]
    fn heavy_keys_keep_their_exact_counts_among_many_light_ones() {
        let t0 = Instant::now();
        let book = Arc::new(Book::new(t0));
        // 20 heavy keys (100 + 2i each) among 5,000 keys seen once: more keys than the
        // summary holds, so light keys keep replacing each other.
        for round in 0..200u64 {
            for i in 0..20u64 {
                if round < 100 + 2 * i {
                    let k = format!("heavy:{i}");
                    book.record(t0, 1, i % 2 == 0, [(k.as_bytes(), shard(1))].into_iter());
                }
            }
            for j in 0..25 {
                let k = format!("light:{round}:{j}");
                book.record(t0, 1, false, [(k.as_bytes(), shard(2))].into_iter());
            }
        }
        let m = merge(
            &[book],
            t0 + Duration::from_secs(1),
            Duration::from_secs(60),
        );
        // Counts are exact (a key pushed out of a full doorkeeper bucket, or sharing a
        // fingerprint, would be one sample off).
        let top: Vec<&HotKey> = m.keys.iter().take(20).collect();
        let mut off = 0;
        for (rank, k) in top.iter().enumerate() {
            let i = 19 - rank as u64;
            assert_eq!(
                k.key,
                format!("heavy:{i}").as_bytes(),
                "rank {rank}: {top:?}"
            );
            assert!((99 + 2 * i..=101 + 2 * i).contains(&k.requests), "{k:?}");
            off += u64::from(k.requests != 100 + 2 * i);
            let (reads, writes) = if i.is_multiple_of(2) {
                (0, k.requests)
            } else {
                (k.requests, 0)
            };
            assert_eq!((k.reads, k.writes), (reads, writes));
        }
        assert!(off <= 2, "{off} heavy keys off by one");
        assert_eq!(m.shards[&shard(2)], 5_000);
        // Light keys seen once did not enter the summary, but for the few whose doorkeeper
        // bit another key had set (about 50 of 5,000).
        assert!(m.keys.len() < 20 + 100, "{}", m.keys.len());
        // The heavy keys' shard: its hottest key has 138 of 2,380 requests.
        let share = m.hottest_share(shard(1));
        assert!((share - 138.0 / 2_380.0).abs() < 2.0 / 2_380.0, "{share}");
    }

    #[test]
    fn windows_age_out_and_spans_choose_them() {
        let t0 = Instant::now();
        let book = Arc::new(Book::new(t0));
        let at = |s: u64| t0 + Duration::from_secs(s);
        // (Twice each: a key enters the summary at its second sample.)
        for (s, key, w) in [(5, &b"old"[..], 1), (125, b"mid", 1), (185, b"new", 3)] {
            for _ in 0..2 {
                book.record(at(s), w, false, [(key, shard(1))].into_iter());
            }
        }
        let names = |m: &Merged| -> Vec<Bytes> { m.keys.iter().map(|k| k.key.clone()).collect() };
        let now = at(186);
        assert_eq!(
            names(&merge(
                std::slice::from_ref(&book),
                now,
                Duration::from_secs(10)
            )),
            ["new"]
        );
        let m = merge(std::slice::from_ref(&book), now, Duration::from_secs(60));
        assert_eq!(names(&m), ["new", "mid"]);
        // The span covers 6 full windows and 6 s of the current one.
        assert!((m.seconds - 66.0).abs() < 0.01, "{}", m.seconds);
        assert_eq!(m.keys[0].requests, 6);
        assert!((m.rate(6) - 6.0 / 66.0).abs() < 1e-9);
        assert_eq!(
            names(&merge(
                std::slice::from_ref(&book),
                now,
                Duration::from_secs(300)
            )),
            ["new", "mid", "old"]
        );
        // 31 windows later the first one is reused and forgets "old".
        book.record(at(315), 1, false, [(&b"newer"[..], shard(1))].into_iter());
        book.record(at(315), 1, false, [(&b"newer"[..], shard(1))].into_iter());
        let m = merge(&[book], at(316), Duration::from_secs(300));
        assert!(!names(&m).contains(&Bytes::from_static(b"old")));
    }

    #[test]
    fn the_doorkeeper_admits_at_the_second_sample_even_in_a_shared_bucket() {
        let mut door = vec![0u64; DOOR_BUCKETS];
        // Five keys in one bucket (same low bits), sampled in turn: four fit, and each is
        // let in at its second sample with what its first one was.
        let h = |i: u64| (i + 1) << 48 | 7;
        for i in 0..4 {
            assert_eq!(doorkeeper(&mut door, h(i), i == 2), None);
        }
        for i in 0..4 {
            assert_eq!(doorkeeper(&mut door, h(i), false), Some(i == 2), "key {i}");
        }
        // Once in, a key is forgotten here; keys sampled once are never let in.
        assert_eq!(doorkeeper(&mut door, h(0), false), None);
        let mut admitted = 0;
        for i in 0..10_000u64 {
            let k = format!("once:{i}");
            admitted += usize::from(doorkeeper(&mut door, hash(k.as_bytes()), false).is_some());
        }
        assert_eq!(admitted, 0);
    }

    #[test]
    fn a_key_shows_its_newest_shard_and_late_records_spare_newer_windows() {
        let t0 = Instant::now();
        let book = Arc::new(Book::new(t0));
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Window 30 sits in slot 30 of the ring, window 31 in slot 0: the newest is not
        // the last in the ring's order.
        for _ in 0..2 {
            book.record(at(305), 1, false, [(&b"k"[..], shard(1))].into_iter());
        }
        for _ in 0..2 {
            book.record(at(315), 1, false, [(&b"k"[..], shard(2))].into_iter());
        }
        let m = merge(
            std::slice::from_ref(&book),
            at(316),
            Duration::from_secs(300),
        );
        assert_eq!((m.keys[0].requests, m.keys[0].shard), (4, shard(2)));
        // A reply size recorded for a window long gone does not wipe the current one.
        book.record_size(at(5), b"late", 10, shard(1));
        let m = merge(
            std::slice::from_ref(&book),
            at(316),
            Duration::from_secs(10),
        );
        assert_eq!(m.keys[0].requests, 4);
        assert!(m.big.is_empty());
        // Long keys are kept as their first bytes and their length.
        let long = vec![b'x'; 10_000];
        book.record_size(at(316), &long, 50_000, shard(1));
        let m = merge(
            std::slice::from_ref(&book),
            at(316),
            Duration::from_secs(10),
        );
        assert!(m.big[0].key.len() < 250 && m.big[0].key.ends_with(b"(10000 bytes)"));
    }

    #[test]
    fn big_replies_keep_the_largest_per_window() {
        let t0 = Instant::now();
        let book = Arc::new(Book::new(t0));
        for i in 0..100usize {
            let key = Bytes::from(format!("k{i}"));
            book.record_size(t0, &key, 1000 + i, shard(1));
        }
        book.record_size(t0, b"k99", 50, shard(1));
        let m = merge(&[book], t0, Duration::from_secs(60));
        assert_eq!(m.big.len(), BIG_PER_WINDOW);
        assert_eq!(m.big[0].key, "k99");
        assert_eq!(m.big[0].size, 1099);
        assert_eq!(m.big[BIG_PER_WINDOW - 1].size, 1100 - BIG_PER_WINDOW);
    }

    #[test]
    fn the_sampler_takes_one_in_every_on_average_and_none_when_off() {
        let book = Arc::new(Book::new(Instant::now()));
        let s = Sampler::new(16, book.clone(), 42);
        let taken = (0..160_000).filter(|_| s.tick()).count();
        assert!((9_000..11_000).contains(&taken), "{taken}");
        let all = Sampler::new(1, book.clone(), 7);
        assert_eq!((0..1000).filter(|_| all.tick()).count(), 1000);
        let off = Sampler::new(0, book, 7);
        assert_eq!((0..100_000).filter(|_| off.tick()).count(), 0);
    }
}
