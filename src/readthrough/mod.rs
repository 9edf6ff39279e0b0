//! Read-through: a GET that misses on a key owned by a rule is loaded from an HTTP origin,
//! stored in the owning shard with a TTL, and returned — the cache-aside pattern moved out of
//! every application into the proxy.
//!
//! Guarantees (each tested in `tests/readthrough.rs`):
//! - **Single-flight.** Concurrent misses for one key, from any client on any worker, make one
//!   origin request ([`Flights`], a `DashMap` shared by the workers). Every waiter gets its
//!   result and none waits longer than the rule's timeout. A miss whose GET reached the shard
//!   before a fill stored the value (so it saw nil) but is processed after the fill completed
//!   takes that fill's result instead of starting another one.
//! - **No stale set.** The fill stores with `SET key value PX ttl NX`. A write or delete of
//!   the key through slotgate while the fill is in flight marks it dirty, and a dirty fill is
//!   returned to its waiters but not stored. Background refreshes (stale-while-revalidate)
//!   replace the value only if it is still the one that was served (compare-and-set script).
//! - **Negative caching.** `404`/`410` are remembered for `negative_ttl` in the proxy (per
//!   process, bounded). A write of the key through slotgate ends the entry at once.
//! - **Errors are clear.** Origin `5xx`, timeouts, refused connections and oversized bodies
//!   give `-ERR origin …` for GET; nothing is stored.
//! - **Stale-while-revalidate / stale-if-error** (per rule, `grace`): values are stored for
//!   `ttl + grace`; a GET reads the value and its PTTL in one round trip (a small script), and
//!   a value whose remaining PTTL is within `grace` is served at once while one background
//!   refresh runs. When the origin fails, the stale value keeps being served until the hard
//!   TTL.

pub mod origin;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Deserialize;
use tokio::sync::watch;

use crate::queue::{ReplyQueue, Sink, SinkRef};
use crate::resp::reply::{self, Proto};
use crate::resp::request::command;
use crate::units::parse_duration;
use crate::worker::Worker;
use origin::{Fetched, OriginError, UrlTemplate};

/// A `[[readthrough]]` table (or one `--readthrough` flag).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name used in metrics and INFO; default: the prefix.
    pub name: Option<String>,
    /// Keys this rule owns.
    pub prefix: String,
    /// `http://host:port/path/{rest}` (`{key}` = whole key, `{rest}` = key minus the prefix).
    pub origin: String,
    /// How long a loaded value is cached [default: 10m].
    pub ttl: Option<String>,
    /// Use the origin's `Cache-Control: max-age` instead of `ttl` when present [default: false].
    #[serde(default)]
    pub honor_max_age: bool,
    /// How long a 404/410 is remembered [default: 30s].
    pub negative_ttl: Option<String>,
    /// Longest wait for the origin [default: 500ms].
    pub timeout: Option<String>,
    /// Largest body accepted, in bytes [default: 16 MiB].
    pub max_body: Option<usize>,
    /// Stale-while-revalidate / stale-if-error window after `ttl` [default: 0s = off].
    pub grace: Option<String>,
}

impl RuleConfig {
    /// `PREFIX=URL_TEMPLATE[;ttl=10m][;negative_ttl=30s][;timeout=500ms][;grace=1m]
    /// [;name=N][;max_body=BYTES][;honor_max_age=true]`, split at the first `=` so the prefix
    /// may contain colons.
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        let (prefix, rest) = s.split_once('=').ok_or_else(|| {
            format!("--readthrough '{s}': expected PREFIX=URL_TEMPLATE[;opt=value…]")
        })?;
        let mut parts = rest.split(';');
        let mut rc = RuleConfig {
            prefix: prefix.to_string(),
            origin: parts.next().unwrap_or("").trim().to_string(),
            ..Default::default()
        };
        for opt in parts.map(str::trim).filter(|o| !o.is_empty()) {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("--readthrough option '{opt}': expected name=value"))?;
            let v = v.trim().to_string();
            match k.trim() {
                "ttl" => rc.ttl = Some(v),
                "negative_ttl" => rc.negative_ttl = Some(v),
                "timeout" => rc.timeout = Some(v),
                "grace" => rc.grace = Some(v),
                "name" => rc.name = Some(v),
                "max_body" => {
                    rc.max_body = Some(v.parse().map_err(|_| format!("max_body '{v}': bytes"))?)
                }
                "honor_max_age" => {
                    rc.honor_max_age = v.parse().map_err(|_| format!("honor_max_age '{v}'"))?
                }
                other => return Err(format!("--readthrough: unknown option '{other}'")),
            }
        }
        Ok(rc)
    }
}

/// A validated rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub prefix: Vec<u8>,
    pub template: UrlTemplate,
    pub ttl: Duration,
    pub honor_max_age: bool,
    pub negative_ttl: Duration,
    pub timeout: Duration,
    pub max_body: usize,
    pub grace: Duration,
    pub stats: RuleStats,
}

/// Per-rule counters: atomics for INFO, copied into the metrics registry when it is scraped
/// ([`RuleStats::publish`]), so a hit costs one atomic add.
#[derive(Debug)]
pub struct RuleStats {
    pub hits: Stat,
    pub misses: Stat,
    pub origin_requests: Stat,
    pub coalesced: Stat,
    pub negative_hits: Stat,
    pub stale_serves: Stat,
    pub origin_errors: Stat,
    pub bytes_loaded: Stat,
    pub stored: Stat,
    pub store_skipped: Stat,
    errors_by_kind: [metrics::Counter; 5],
    latency: metrics::Histogram,
}

/// A counter readable for INFO and exported to Prometheus (see [`RuleStats::publish`]).
#[derive(Debug)]
pub struct Stat {
    value: AtomicU64,
    counter: metrics::Counter,
}

impl Stat {
    fn new(name: &'static str, rule: &str) -> Self {
        Stat {
            value: AtomicU64::new(0),
            counter: metrics::counter!(name, "rule" => rule.to_string()),
        }
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl RuleStats {
    fn new(rule: &str) -> Self {
        use crate::metrics as m;
        let kinds = ["status", "timeout", "connect", "too_large", "other"];
        RuleStats {
            hits: Stat::new(m::RT_HITS, rule),
            misses: Stat::new(m::RT_MISSES, rule),
            origin_requests: Stat::new(m::RT_ORIGIN_REQUESTS, rule),
            coalesced: Stat::new(m::RT_COALESCED, rule),
            negative_hits: Stat::new(m::RT_NEGATIVE_HITS, rule),
            stale_serves: Stat::new(m::RT_STALE_SERVES, rule),
            origin_errors: Stat::new(m::RT_ORIGIN_ERRORS_ALL, rule),
            bytes_loaded: Stat::new(m::RT_BYTES_LOADED, rule),
            stored: Stat::new(m::RT_STORED, rule),
            store_skipped: Stat::new(m::RT_STORE_SKIPPED, rule),
            errors_by_kind: kinds.map(
                |k| metrics::counter!(m::RT_ORIGIN_ERRORS, "rule" => rule.to_string(), "kind" => k),
            ),
            latency: metrics::histogram!(m::RT_ORIGIN_LATENCY, "rule" => rule.to_string()),
        }
    }

    /// Copies the counters into the metrics registry (before `/metrics` renders it).
    pub fn publish(&self) {
        for s in [
            &self.hits,
            &self.misses,
            &self.origin_requests,
            &self.coalesced,
            &self.negative_hits,
            &self.stale_serves,
            &self.origin_errors,
            &self.bytes_loaded,
            &self.stored,
            &self.store_skipped,
        ] {
            s.counter.absolute(s.get());
        }
    }

    fn origin_error(&self, e: &OriginError) {
        self.origin_errors.add(1);
        let i = match e.kind() {
            "status" => 0,
            "timeout" => 1,
            "connect" => 2,
            "too_large" => 3,
            _ => 4,
        };
        self.errors_by_kind[i].increment(1);
    }
}

/// The rules, longest prefix first.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Arc<Rule>>,
}

impl Rules {
    /// Validates the rules: well-formed URL templates and durations, distinct prefixes and
    /// names. Nested prefixes are allowed; the longest one wins.
    pub fn build(configs: &[RuleConfig]) -> Result<Self, String> {
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        for c in configs {
            if c.prefix.is_empty() {
                return Err("a read-through rule needs a non-empty prefix".into());
            }
            let name = c.name.clone().unwrap_or_else(|| c.prefix.clone());
            let what = |k: &str| format!("read-through rule '{name}': {k}");
            let dur = |v: &Option<String>, default: &str, k: &str| {
                parse_duration(v.as_deref().unwrap_or(default))
                    .map_err(|e| format!("{}: {e}", what(k)))
            };
            let template = UrlTemplate::parse(&c.origin).map_err(|e| what(&e))?;
            let ttl = dur(&c.ttl, "10m", "ttl")?;
            let timeout = dur(&c.timeout, "500ms", "timeout")?;
            if ttl.is_zero() || timeout.is_zero() {
                return Err(what("ttl and timeout must be > 0"));
            }
            let rule = Rule {
                stats: RuleStats::new(&name),
                prefix: c.prefix.as_bytes().to_vec(),
                template,
                ttl,
                honor_max_age: c.honor_max_age,
                negative_ttl: dur(&c.negative_ttl, "30s", "negative_ttl")?,
                timeout,
                max_body: c.max_body.unwrap_or(16 * 1024 * 1024),
                grace: dur(&c.grace, "0s", "grace")?,
                name,
            };
            if let Some(o) = rules.iter().find(|o| o.prefix == rule.prefix) {
                return Err(format!(
                    "read-through rules '{}' and '{}' both own prefix '{}'",
                    o.name, rule.name, c.prefix
                ));
            }
            if rules.iter().any(|o| o.name == rule.name) {
                return Err(format!("two read-through rules are named '{}'", rule.name));
            }
            rules.push(Arc::new(rule));
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Rules { rules })
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule owning `key`: the longest matching prefix.
    #[inline]
    pub fn find(&self, key: &[u8]) -> Option<&Arc<Rule>> {
        self.position(key).map(|i| &self.rules[i])
    }

    /// Where in [`Rules::at`] the rule owning `key` is (a GET in flight keeps this, not an
    /// `Arc`: no shared reference count to touch per request).
    #[inline]
    pub fn position(&self, key: &[u8]) -> Option<usize> {
        self.rules.iter().position(|r| key.starts_with(&r.prefix))
    }

    #[inline]
    pub fn at(&self, i: usize) -> &Arc<Rule> {
        &self.rules[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.iter()
    }
}

/// What one origin fetch produced, shared with every waiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Value(Bytes),
    Absent,
    /// The error reply (without `-` and CRLF).
    /// The error reply (see [`reply::Failure::Origin`]).
    Error(Bytes),
}

impl Outcome {
    /// The reply for a GET.
    pub fn reply(&self, proto: Proto) -> Bytes {
        match self {
            Outcome::Value(v) => reply::bulk(v),
            Outcome::Absent => Bytes::from_static(reply::null(proto)),
            Outcome::Error(e) => e.clone(),
        }
    }
}

/// One in-flight (or just finished) origin fetch.
pub struct Flight {
    dirty: AtomicBool,
    tx: watch::Sender<Option<Arc<Outcome>>>,
    done_at: Mutex<Option<Instant>>,
}

impl Flight {
    fn new() -> Arc<Self> {
        Arc::new(Flight {
            dirty: AtomicBool::new(false),
            tx: watch::channel(None).0,
            done_at: Mutex::new(None),
        })
    }

    fn done_at(&self) -> Option<Instant> {
        self.done_at.lock().ok().and_then(|d| *d)
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }
}

/// How a miss relates to the fetches in flight.
pub enum Join {
    /// Nobody is fetching this key: fetch it.
    Leader(Arc<Flight>),
    /// Someone is: wait for their result.
    Waiter(Arc<Flight>),
    /// A fetch finished after this miss's GET was sent: its result answers this miss too.
    Done(Arc<Outcome>),
}

/// The shared read-through state: rules, fetches in flight, negative entries.
pub struct ReadThrough {
    pub rules: Arc<Rules>,
    flights: DashMap<Bytes, Arc<Flight>>,
    negatives: DashMap<Bytes, Instant>,
    refresh_backoff: DashMap<Bytes, Instant>,
    /// How long a finished flight stays to answer misses that raced with its store.
    linger: Duration,
    max_negatives: usize,
}

/// At most this many negative entries (404s) are remembered; beyond, 404s are not cached.
const MAX_NEGATIVES: usize = 1_000_000;
/// After a failed background refresh, the next one for that key waits this long.
const REFRESH_BACKOFF: Duration = Duration::from_secs(1);

impl ReadThrough {
    pub fn new(rules: Arc<Rules>, linger: Duration) -> Self {
        ReadThrough {
            rules,
            flights: DashMap::new(),
            negatives: DashMap::new(),
            refresh_backoff: DashMap::new(),
            linger,
            max_negatives: MAX_NEGATIVES,
        }
    }

    /// Joins or starts the fetch of `key` for a miss whose GET was sent at `sent_at`.
    pub fn join(&self, key: &Bytes, sent_at: Instant) -> Join {
        match self.flights.entry(key.clone()) {
            Entry::Occupied(mut e) => match e.get().done_at() {
                None => Join::Waiter(e.get().clone()),
                Some(done) if done > sent_at => match e.get().tx.borrow().clone() {
                    Some(o) => Join::Done(o),
                    None => Join::Waiter(e.get().clone()),
                },
                Some(_) => {
                    let f = Flight::new();
                    e.insert(f.clone());
                    Join::Leader(f)
                }
            },
            Entry::Vacant(v) => {
                let f = Flight::new();
                v.insert(f.clone());
                Join::Leader(f)
            }
        }
    }

    /// Publishes a fetch's outcome to its waiters.
    pub fn finish(&self, flight: &Flight, outcome: Arc<Outcome>) {
        if let Ok(mut d) = flight.done_at.lock() {
            *d = Some(Instant::now());
        }
        flight.tx.send_replace(Some(outcome));
    }

    /// A client wrote `key` through slotgate: an in-flight fill must not store, and a
    /// negative entry ends now.
    pub fn note_write(&self, key: &[u8]) {
        if let Some(f) = self.flights.get(key)
            && f.done_at().is_none()
        {
            f.dirty.store(true, Ordering::Release);
        }
        self.negatives.remove(key);
        self.refresh_backoff.remove(key);
    }

    /// Whether a fresh negative entry says `key` is absent at the origin.
    pub fn negative_fresh(&self, key: &[u8]) -> bool {
        self.negatives
            .get(key)
            .is_some_and(|until| *until > Instant::now())
    }

    fn remember_absent(&self, key: &Bytes, ttl: Duration) {
        if ttl.is_zero() || self.negatives.len() >= self.max_negatives {
            return;
        }
        self.negatives.insert(key.clone(), Instant::now() + ttl);
    }

    /// Whether `key` has a fetch in flight (not finished).
    pub fn in_flight(&self, key: &[u8]) -> bool {
        self.flights.get(key).is_some_and(|f| f.done_at().is_none())
    }

    /// Drops finished flights and expired entries (called every second).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.flights.retain(|_, f| {
            f.done_at()
                .is_none_or(|d| now.duration_since(d) < self.linger)
        });
        self.negatives.retain(|_, until| *until > now);
        self.refresh_backoff.retain(|_, until| *until > now);
    }

    /// Entries held now: (flights, negative entries).
    pub fn sizes(&self) -> (usize, usize) {
        (self.flights.len(), self.negatives.len())
    }
}

/// A GET of a rule-owned key, waiting for its shard reply.
pub struct PendingGet {
    pub w: Rc<Worker>,
    pub queue: Rc<ReplyQueue>,
    pub seq: u64,
    /// The rule, by its place in the worker's [`Rules`].
    pub rule: usize,
    pub key: KeyBuf,
    pub sent_at: Instant,
    pub proto: Proto,
    /// The request was the value+PTTL script (rules with a grace period).
    pub with_pttl: bool,
}

/// A key kept by value without a heap allocation when it is short (most cache keys): the
/// request it came from is a view of the client's read buffer, which is reused at once.
pub enum KeyBuf {
    Inline {
        len: u8,
        bytes: [u8; KeyBuf::INLINE],
    },
    Heap(Bytes),
}

impl KeyBuf {
    /// Keys up to this long are kept inline.
    pub const INLINE: usize = 46;

    pub fn new(key: &[u8]) -> Self {
        if key.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..key.len()].copy_from_slice(key);
            KeyBuf::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            KeyBuf::Heap(Bytes::copy_from_slice(key))
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            KeyBuf::Inline { len, bytes } => &bytes[..*len as usize],
            KeyBuf::Heap(b) => b,
        }
    }

    /// The key as `Bytes`, for a miss or a refresh (which fetch from the origin anyway).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            KeyBuf::Inline { .. } => Bytes::copy_from_slice(self.as_slice()),
            KeyBuf::Heap(b) => b.clone(),
        }
    }
}

/// The value+PTTL script: `{GET key, PTTL key}` in one round trip.
const GET_PTTL: &str = "return {redis.call('GET',KEYS[1]),redis.call('PTTL',KEYS[1])}";
/// Replaces the value only if it is still the one that was served.
const CAS_SET: &str = "if redis.call('GET',KEYS[1])==ARGV[1] then \
     return redis.call('SET',KEYS[1],ARGV[2],'PX',ARGV[3]) else return 0 end";

/// The request a rule-owned GET sends to its shard: GET, or the value+PTTL script when the
/// rule has a grace period.
pub fn get_request(rule: &Rule, key: &[u8]) -> Option<Bytes> {
    (!rule.grace.is_zero()).then(|| command(&[b"EVAL", GET_PTTL.as_bytes(), b"1", key]))
}

fn is_nil(frame: &[u8]) -> bool {
    frame == reply::NULL_RESP2 || frame == reply::NULL_RESP3 || frame == b"*-1\r\n"
}

/// The read-through GETs in flight on one worker, held by index, so that a GET costs no heap
/// allocation in steady state. (A `Box` per GET, freed in a different order than allocated,
/// pushed glibc malloc into consolidating its fastbins under pipelining: about 400
/// instructions per pipelined read-through GET in callgrind.)
#[derive(Default)]
pub struct PendingGets {
    slots: RefCell<Vec<Option<PendingGet>>>,
    free: RefCell<Vec<u32>>,
}

impl PendingGets {
    /// Stores `get` until its shard answers: the shard connection's target.
    pub fn insert(self: &Rc<Self>, get: PendingGet) -> SinkRef {
        let mut slots = self.slots.borrow_mut();
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i as usize] = Some(get);
                i
            }
            None => {
                slots.push(Some(get));
                (slots.len() - 1) as u32
            }
        };
        SinkRef::new(self.clone(), idx)
    }

    /// Takes GET `idx` out, giving its slot back.
    fn take(&self, idx: u32) -> Option<PendingGet> {
        let get = self.slots.borrow_mut()[idx as usize].take();
        self.free.borrow_mut().push(idx);
        get
    }
}

/// A read-through GET's slot is given back when its shard answered, or when its target is
/// dropped undelivered.
impl Sink for PendingGets {
    fn deliver(self: Rc<Self>, idx: u32, reply: Bytes) {
        if let Some(get) = self.take(idx) {
            get.on_reply(reply);
        }
    }

    fn release(&self, idx: u32) {
        // Taken first: the GET's own fields are dropped outside the borrow.
        drop(self.take(idx));
    }
}

/// An MGET's part `idx` arrived.
impl Sink for std::cell::RefCell<PendingMget> {
    fn deliver(self: Rc<Self>, idx: u32, reply: Bytes) {
        PendingMget::on_part(self, idx as usize, reply);
    }
}

impl PendingGet {
    /// The shard answered: a hit goes straight to the client; a miss starts (or joins) the
    /// origin fetch on this worker; a value within its grace period is served and refreshed.
    pub fn on_reply(self, frame: Bytes) {
        let (value, pttl) = if self.with_pttl {
            match split_value_pttl(&frame) {
                Some(v) => v,
                // The script's WRONGTYPE carries a script suffix: give GET's own text.
                None if frame.starts_with(b"-WRONGTYPE") => {
                    return self
                        .queue
                        .deliver(self.seq, 0, Bytes::from_static(reply::WRONGTYPE));
                }
                // An error (shard unavailable…) or anything unexpected passes through.
                None => return self.queue.deliver(self.seq, 0, frame),
            }
        } else {
            (frame, None)
        };
        if value.first() == Some(&b'-') {
            return self.queue.deliver(self.seq, 0, value);
        }
        let rule = self.w.shared.readthrough.rules.at(self.rule);
        let stats = &rule.stats;
        if !is_nil(&value) {
            let grace = rule.grace.as_millis() as i64;
            match pttl {
                Some(p) if p >= 0 && p < grace => {
                    stats.stale_serves.add(1);
                    refresh_in_background(&self.w, rule, &self.key.to_bytes(), &value);
                }
                _ => stats.hits.add(1),
            }
            return self.queue.deliver(self.seq, 0, value);
        }
        stats.misses.add(1);
        let rule = rule.clone();
        tokio::task::spawn_local(async move {
            let key = self.key.to_bytes();
            let outcome = miss(&self.w, &rule, &key, self.sent_at).await;
            self.queue.deliver(self.seq, 0, outcome.reply(self.proto));
        });
    }
}

/// An MGET with read-through keys: its shard parts, then the misses filled from the origin.
/// Elements whose origin fetch fails are nil (the failure is counted in the rule's metrics).
pub struct PendingMget {
    pub w: Rc<Worker>,
    pub queue: Rc<ReplyQueue>,
    pub seq: u64,
    pub proto: Proto,
    pub sent_at: Instant,
    /// All keys, in request order.
    pub keys: Vec<Bytes>,
    /// For each part, the positions (in `keys`) of its array's elements.
    pub positions: Vec<Vec<u32>>,
    pub parts: Vec<Option<Bytes>>,
    pub missing: usize,
}

impl PendingMget {
    pub fn on_part(state: Rc<std::cell::RefCell<Self>>, part: usize, frame: Bytes) {
        let done = {
            let mut s = state.borrow_mut();
            if let Some(p) = s.parts.get_mut(part)
                && p.is_none()
            {
                *p = Some(frame);
                s.missing -= 1;
            }
            s.missing == 0
        };
        if done {
            Self::complete(state);
        }
    }

    fn complete(state: Rc<std::cell::RefCell<Self>>) {
        let s = state.borrow();
        // A shard error is the reply, as for any split command.
        if let Some(e) = s.parts.iter().flatten().find(|p| p.first() == Some(&b'-')) {
            return s.queue.deliver(s.seq, 0, e.clone());
        }
        // Every part has arrived: the merge of any split MGET (with its length checks).
        let parts: Vec<Bytes> = s
            .parts
            .iter()
            .map(|p| p.clone().unwrap_or_default())
            .collect();
        let elems: Vec<Option<Bytes>> =
            match crate::fanout::order_elements(&parts, &s.positions, s.keys.len()) {
                Ok(order) => order
                    .into_iter()
                    .map(|(p, a, b)| Some(parts[p].slice(a..b)))
                    .collect(),
                Err(e) => return s.queue.deliver(s.seq, 0, e),
            };
        let rules = &s.w.shared.readthrough.rules;
        let mut fills = Vec::new();
        for (i, e) in elems.iter().enumerate() {
            let Some(rule) = rules.find(&s.keys[i]) else {
                continue;
            };
            match e {
                Some(v) if !is_nil(v) => rule.stats.hits.add(1),
                _ => {
                    rule.stats.misses.add(1);
                    fills.push((i, rule.clone()));
                }
            }
        }
        let (w, queue, seq, proto, sent_at, keys) = (
            s.w.clone(),
            s.queue.clone(),
            s.seq,
            s.proto,
            s.sent_at,
            s.keys.clone(),
        );
        drop(s);
        let build = move |elems: Vec<Option<Bytes>>| {
            let mut a = reply::Aggregate::array(elems.len());
            for e in &elems {
                match e {
                    Some(v) => a.raw(v),
                    None => a.raw(reply::null(proto)),
                };
            }
            a.finish()
        };
        if fills.is_empty() {
            return queue.deliver(seq, 0, build(elems));
        }
        tokio::task::spawn_local(async move {
            // Every miss is fetched concurrently (each single-flight per key).
            let handles: Vec<_> = fills
                .into_iter()
                .map(|(i, rule)| {
                    let (w, key) = (w.clone(), keys[i].clone());
                    let h =
                        tokio::task::spawn_local(
                            async move { miss(&w, &rule, &key, sent_at).await },
                        );
                    (i, h)
                })
                .collect();
            let mut elems = elems;
            for (i, h) in handles {
                elems[i] = match h.await.ok().as_deref() {
                    Some(Outcome::Value(v)) => Some(reply::bulk(v)),
                    _ => None,
                };
            }
            queue.deliver(seq, 0, build(elems));
        });
    }
}

/// `*2 [value, :pttl]` → (value frame, pttl).
fn split_value_pttl(frame: &Bytes) -> Option<(Bytes, Option<i64>)> {
    let elems = crate::resp::scan::array_elements(frame)?;
    if elems.len() != 2 {
        return None;
    }
    let (vs, ve) = elems[0];
    let value = frame.slice(vs..ve);
    // A nil element inside the script's array comes back as RESP2 `$-1` / RESP3 `_`.
    let pttl = crate::resp::scan::reply_integer(&frame[elems[1].0..elems[1].1]);
    Some((value, pttl))
}

/// A miss on a rule-owned key: negative entry, join a fetch, or lead one.
pub async fn miss(w: &Rc<Worker>, rule: &Arc<Rule>, key: &Bytes, sent_at: Instant) -> Arc<Outcome> {
    let rt = &w.shared.readthrough;
    if rt.negative_fresh(key) {
        rule.stats.negative_hits.add(1);
        return Arc::new(Outcome::Absent);
    }
    match rt.join(key, sent_at) {
        Join::Done(o) => {
            rule.stats.coalesced.add(1);
            o
        }
        Join::Waiter(f) => {
            rule.stats.coalesced.add(1);
            let mut rx = f.tx.subscribe();
            match tokio::time::timeout(rule.timeout, rx.wait_for(|o| o.is_some())).await {
                Ok(Ok(o)) => o.clone().unwrap_or_else(|| Arc::new(timeout_error(rule))),
                _ => Arc::new(timeout_error(rule)),
            }
        }
        Join::Leader(f) => {
            let o = Arc::new(lead(w, rule, key, &f).await);
            rt.finish(&f, o.clone());
            o
        }
    }
}

fn timeout_error(rule: &Rule) -> Outcome {
    Outcome::Error(
        reply::Failure::Origin {
            rule: &rule.name,
            why: &format!("timed out after {:?}", rule.timeout),
        }
        .to_reply(),
    )
}

/// One origin fetch, counted in the rule's metrics.
enum Loaded {
    /// `200`: the body, and how long to store it (`None`: `no-store` or a zero TTL).
    Value {
        body: Bytes,
        store_for: Option<Duration>,
    },
    /// `404`/`410`.
    Absent,
    /// The error reply for the client.
    Failed(Outcome),
}

async fn fetch(w: &Worker, rule: &Rule, key: &[u8]) -> Loaded {
    let stats = &rule.stats;
    stats.origin_requests.add(1);
    let url = rule.template.render(key, rule.prefix.len());
    let t0 = Instant::now();
    let fetched = w.origin.fetch(&url, rule.timeout, rule.max_body).await;
    stats.latency.record(t0.elapsed().as_secs_f64());
    match fetched {
        Ok(Fetched::Found {
            body,
            max_age,
            no_store,
        }) => {
            stats.bytes_loaded.add(body.len() as u64);
            let ttl = match max_age {
                Some(a) if rule.honor_max_age => a,
                _ => rule.ttl,
            };
            // Stored for ttl + grace: the grace period serves it stale (see the module docs).
            let store_for = (!no_store && !ttl.is_zero()).then_some(ttl + rule.grace);
            Loaded::Value { body, store_for }
        }
        Ok(Fetched::Absent) => Loaded::Absent,
        Err(e) => {
            stats.origin_error(&e);
            tracing::debug!(rule = %rule.name, %url, "origin fetch failed: {e}");
            Loaded::Failed(Outcome::Error(
                reply::Failure::Origin {
                    rule: &rule.name,
                    why: &e.to_string(),
                }
                .to_reply(),
            ))
        }
    }
}

/// Fetches `key` from the origin and, unless the fill went dirty, stores it with `NX`.
async fn lead(w: &Rc<Worker>, rule: &Rule, key: &Bytes, flight: &Flight) -> Outcome {
    let stats = &rule.stats;
    match fetch(w, rule, key).await {
        Loaded::Value { body, store_for } => {
            match store_for {
                Some(d) if !flight.is_dirty() => {
                    let px = d.as_millis().to_string();
                    let set = command(&[b"SET", key, &body, b"PX", px.as_bytes(), b"NX"]);
                    let shard = w.shared.settings.slot_map.shard_of(key);
                    let r = w.request(shard, &set).await;
                    if r.first() == Some(&b'-') {
                        tracing::warn!(rule = %rule.name, "storing a loaded value failed: {}",
                            String::from_utf8_lossy(&r).trim_end());
                    } else {
                        stats.stored.add(1);
                    }
                }
                _ => stats.store_skipped.add(1),
            }
            Outcome::Value(body)
        }
        Loaded::Absent => {
            if !flight.is_dirty() {
                w.shared.readthrough.remember_absent(key, rule.negative_ttl);
            }
            Outcome::Absent
        }
        Loaded::Failed(o) => o,
    }
}

/// Starts one background refresh of a value served in its grace period (single-flight).
fn refresh_in_background(w: &Rc<Worker>, rule: &Arc<Rule>, key: &Bytes, served: &Bytes) {
    let rt = &w.shared.readthrough;
    if rt
        .refresh_backoff
        .get(key)
        .is_some_and(|until| *until > Instant::now())
    {
        return;
    }
    let Join::Leader(flight) = rt.join(key, Instant::now()) else {
        return;
    };
    let (w, rule, key) = (w.clone(), rule.clone(), key.clone());
    // The served frame is `$len\r\nvalue\r\n`: keep the value for the compare-and-set.
    let old = bulk_payload(served);
    tokio::task::spawn_local(async move {
        let stats = &rule.stats;
        let rt = &w.shared.readthrough;
        let outcome = match fetch(&w, &rule, &key).await {
            Loaded::Value { body, store_for } => {
                match store_for {
                    Some(d) if !flight.is_dirty() => {
                        let px = d.as_millis().to_string();
                        let cas = command(&[
                            b"EVAL",
                            CAS_SET.as_bytes(),
                            b"1",
                            &key,
                            &old,
                            &body,
                            px.as_bytes(),
                        ]);
                        let shard = w.shared.settings.slot_map.shard_of(&key);
                        if w.request(shard, &cas).await.starts_with(b"+OK") {
                            stats.stored.add(1);
                        } else {
                            stats.store_skipped.add(1);
                        }
                    }
                    _ => stats.store_skipped.add(1),
                }
                Outcome::Value(body)
            }
            // Gone at the origin: the stale value expires on its own (hard TTL).
            Loaded::Absent => Outcome::Absent,
            Loaded::Failed(o) => {
                rt.refresh_backoff
                    .insert(key.clone(), Instant::now() + REFRESH_BACKOFF);
                o
            }
        };
        rt.finish(&flight, Arc::new(outcome));
    });
}

/// The payload of a `$len\r\n…\r\n` frame.
fn bulk_payload(frame: &Bytes) -> Bytes {
    match frame.iter().position(|&c| c == b'\n') {
        Some(nl) if frame.len() >= nl + 3 => frame.slice(nl + 1..frame.len() - 2),
        _ => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_any_length_are_kept_whole() {
        for n in [
            0,
            1,
            KeyBuf::INLINE - 1,
            KeyBuf::INLINE,
            KeyBuf::INLINE + 1,
            1000,
        ] {
            let key: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let k = KeyBuf::new(&key);
            assert_eq!(k.as_slice(), &key[..], "length {n}");
            assert_eq!(&k.to_bytes()[..], &key[..], "length {n}");
            assert_eq!(matches!(k, KeyBuf::Inline { .. }), n <= KeyBuf::INLINE);
        }
    }

    fn rule(prefix: &str, name: Option<&str>) -> RuleConfig {
        RuleConfig {
            name: name.map(str::to_string),
            prefix: prefix.into(),
            origin: "http://127.0.0.1:1/{rest}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn longest_prefix_wins_and_duplicates_fail() {
        let r = Rules::build(&[rule("label:", None), rule("label:vip:", Some("vip"))]).unwrap();
        assert_eq!(r.find(b"label:vip:1").unwrap().name, "vip");
        assert_eq!(r.find(b"label:1").unwrap().name, "label:");
        assert!(r.find(b"other").is_none());
        assert!(Rules::build(&[rule("a:", None), rule("a:", Some("b"))]).is_err());
        assert!(Rules::build(&[rule("a:", Some("x")), rule("b:", Some("x"))]).is_err());
        let mut bad = rule("a:", None);
        bad.ttl = Some("ten minutes".into());
        assert!(Rules::build(&[bad]).is_err());
    }

    #[test]
    fn flag_syntax() {
        let r = RuleConfig::parse_flag(
            "label:=http://127.0.0.1:8080/labels/{rest};ttl=1m;negative_ttl=5s;timeout=200ms",
        )
        .unwrap();
        assert_eq!(r.prefix, "label:");
        assert_eq!(r.origin, "http://127.0.0.1:8080/labels/{rest}");
        assert_eq!(r.ttl.as_deref(), Some("1m"));
        assert_eq!(r.timeout.as_deref(), Some("200ms"));
        assert!(RuleConfig::parse_flag("nourl").is_err());
        assert!(RuleConfig::parse_flag("a=http://x/{key};bogus=1").is_err());
    }

    #[test]
    fn join_leads_once_and_late_misses_take_the_result() {
        let rt = ReadThrough::new(Arc::new(Rules::default()), Duration::from_secs(1));
        let key = Bytes::from_static(b"k");
        let before = Instant::now();
        let Join::Leader(f) = rt.join(&key, before) else {
            panic!("first miss leads")
        };
        assert!(matches!(rt.join(&key, Instant::now()), Join::Waiter(_)));
        rt.note_write(b"k");
        assert!(f.is_dirty(), "a write marks the fill dirty");
        rt.finish(&f, Arc::new(Outcome::Absent));
        // A GET sent before the fill finished takes its outcome …
        assert!(matches!(rt.join(&key, before), Join::Done(_)));
        // … one sent after it leads a new fetch.
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(rt.join(&key, Instant::now()), Join::Leader(_)));
    }
}
