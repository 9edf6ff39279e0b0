//! The single-flight table and negative entries, shared by the workers ([`ReadThrough`]).

use super::*;

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
    /// When a write first made it dirty.
    dirty_at: Mutex<Option<Instant>>,
    pub(super) tx: watch::Sender<Option<Arc<Outcome>>>,
    done_at: Mutex<Option<Instant>>,
}

impl Flight {
    fn new() -> Arc<Self> {
        Arc::new(Flight {
            dirty: AtomicBool::new(false),
            dirty_at: Mutex::new(None),
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

    /// A write made it dirty: its result must not be stored.
    fn make_dirty(&self) {
        if let Ok(mut d) = self.dirty_at.lock() {
            d.get_or_insert_with(Instant::now);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether a miss sent at `sent_at` came after a write made it dirty.
    fn dirty_before(&self, sent_at: Instant) -> bool {
        self.is_dirty()
            && self
                .dirty_at
                .lock()
                .ok()
                .and_then(|d| *d)
                .is_some_and(|d| d <= sent_at)
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

/// The shared read-through state: fetches in flight, negative entries. (The rules are
/// settings: a reload replaces them.)
pub struct ReadThrough {
    flights: DashMap<Bytes, Arc<Flight>>,
    negatives: DashMap<Bytes, Instant>,
    pub(super) refresh_backoff: DashMap<Bytes, Instant>,
    /// How long a finished flight stays to answer misses that raced with its store.
    linger: Duration,
    max_negatives: usize,
}

/// At most this many negative entries (404s) are remembered; beyond, 404s are not cached.
pub(super) const MAX_NEGATIVES: usize = 1_000_000;
/// After a failed background refresh, the next one for that key waits this long.
pub(super) const REFRESH_BACKOFF: Duration = Duration::from_secs(1);

impl ReadThrough {
    pub fn new(linger: Duration) -> Self {
        ReadThrough {
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
                // A fill that a write made dirty answers those who asked before the write,
                // not those who ask after it: they get a new fetch.
                _ if e.get().dirty_before(sent_at) => {
                    let f = Flight::new();
                    e.insert(f.clone());
                    Join::Leader(f)
                }
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
            f.make_dirty();
        }
        self.negatives.remove(key);
        self.refresh_backoff.remove(key);
    }

    /// [`note_write`](Self::note_write) for every key under `prefix` this instance has
    /// state for.
    pub fn note_prefix(&self, prefix: &[u8]) {
        for f in self.flights.iter() {
            if f.key().starts_with(prefix) && f.done_at().is_none() {
                f.make_dirty();
            }
        }
        self.negatives.retain(|k, _| !k.starts_with(prefix));
        self.refresh_backoff.retain(|k, _| !k.starts_with(prefix));
    }

    /// Whether a fresh negative entry says `key` is absent at the origin.
    pub fn negative_fresh(&self, key: &[u8]) -> bool {
        self.negatives
            .get(key)
            .is_some_and(|until| *until > Instant::now())
    }

    pub(super) fn remember_absent(&self, key: &Bytes, ttl: Duration) {
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
