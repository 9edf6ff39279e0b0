//! Rule-owned GETs and MGETs waiting for their shard: a hit goes to the client, a miss to
//! the fill.

use super::*;

/// A GET of a rule-owned key, waiting for its shard reply.
pub struct PendingGet {
    pub w: Rc<dyn Context>,
    pub queue: Rc<ReplyQueue>,
    pub seq: u64,
    /// The rule (as it was when the GET was sent: a reload may replace the rules).
    pub rule: Arc<Rule>,
    pub key: KeyBuf,
    pub sent_at: Instant,
    pub proto: Proto,
    /// The request was the value+PTTL script (rules with a grace period).
    pub with_pttl: bool,
    /// The client's tracking (CLIENT TRACKING), if on: see [`PendingGet::on_reply`].
    pub tracking: Option<Rc<crate::tracking::Client>>,
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
pub(super) const GET_PTTL: &str = "return {redis.call('GET',KEYS[1]),redis.call('PTTL',KEYS[1])}";
/// Replaces the value only if it is still the one that was served.
pub(super) const CAS_SET: &str = "if redis.call('GET',KEYS[1])==ARGV[1] then \
     return redis.call('SET',KEYS[1],ARGV[2],'PX',ARGV[3]) else return 0 end";

/// The request a rule-owned GET sends to its shard: GET, or the value+PTTL script when the
/// rule has a grace period or refreshes ahead.
pub fn get_request(rule: &Rule, key: &[u8]) -> Option<Bytes> {
    (!rule.refresh_below.is_zero()).then(|| command(&[b"EVAL", GET_PTTL.as_bytes(), b"1", key]))
}

pub(super) fn is_nil(frame: &[u8]) -> bool {
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
        let rule = &self.rule;
        let stats = &rule.stats;
        if !is_nil(&value) {
            let grace = rule.grace.as_millis() as i64;
            match pttl {
                Some(p) if p >= 0 && p < rule.refresh_below.as_millis() as i64 => {
                    if p < grace {
                        stats.stale_serves.add(1);
                    } else {
                        stats.hits.add(1);
                    }
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
            // A miss's answer may not be in the shard at all (a 404's nil, a `no-store`
            // value): nothing would ever tell a tracking client it changed. It is told right
            // after this reply (a stored one is reported by the shard anyway).
            if let Some(t) = &self.tracking {
                t.invalidate_after(self.seq, key);
            }
        });
    }
}

/// An MGET with read-through keys: its shard parts, then the misses filled from the origin.
/// Elements whose origin fetch fails are nil (the failure is counted in the rule's metrics).
pub struct PendingMget {
    pub w: Rc<dyn Context>,
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
    /// The client's tracking, if on: the keys its misses answered are invalidated right
    /// after the reply (see [`PendingGet::on_reply`]).
    pub tracking: Option<Rc<crate::tracking::Client>>,
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
        let rules = s.w.rules();
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
        let (w, queue, seq, proto, sent_at, keys, tracking) = (
            s.w.clone(),
            s.queue.clone(),
            s.seq,
            s.proto,
            s.sent_at,
            s.keys.clone(),
            s.tracking.clone(),
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
            // Misses of rules with a batch URL are loaded a batch at a time (see `batch`);
            // every other miss is fetched concurrently (each single-flight per key).
            let mut batched: Vec<(Arc<Rule>, Vec<usize>)> = Vec::new();
            let mut singles = Vec::new();
            for (i, rule) in fills {
                if rule.batch.is_none() {
                    singles.push((i, rule));
                } else if let Some((_, at)) =
                    batched.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &rule))
                {
                    at.push(i);
                } else {
                    batched.push((rule, vec![i]));
                }
            }
            let handles: Vec<_> = singles
                .into_iter()
                .map(|(i, rule)| {
                    let (w, key) = (w.clone(), keys[i].clone());
                    let h = tokio::task::spawn_local(async move {
                        vec![miss(&w, &rule, &key, sent_at).await]
                    });
                    (vec![i], h)
                })
                .chain(batched.into_iter().map(|(rule, at)| {
                    let w = w.clone();
                    let ks: Vec<Bytes> = at.iter().map(|&i| keys[i].clone()).collect();
                    let h = tokio::task::spawn_local(async move {
                        let Some(batch) = &rule.batch else {
                            return Vec::new();
                        };
                        super::batch::load(&w, &rule, batch, &ks, sent_at).await
                    });
                    (at, h)
                }))
                .collect();
            let mut elems = elems;
            let mut filled = Vec::new();
            for (at, h) in handles {
                let outcomes = h.await.unwrap_or_default();
                for (j, i) in at.into_iter().enumerate() {
                    filled.push(keys[i].clone());
                    elems[i] = match outcomes.get(j).map(|o| o.as_ref()) {
                        Some(Outcome::Value(v)) => Some(reply::bulk(v)),
                        _ => None,
                    };
                }
            }
            queue.deliver(seq, 0, build(elems));
            if let Some(t) = &tracking {
                for key in filled {
                    t.invalidate_after(seq, key);
                }
            }
        });
    }
}

/// `*2 [value, :pttl]` → (value frame, pttl).
pub(super) fn split_value_pttl(frame: &Bytes) -> Option<(Bytes, Option<i64>)> {
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
