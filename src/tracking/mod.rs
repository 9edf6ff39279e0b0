//! Client-side caching through the proxy (`CLIENT TRACKING`, Redis 7 semantics).
//!
//! - **Where invalidations come from.** Each worker keeps one *invalidation link* per shard
//!   (see [`link`]) while any of its clients tracks keys: a RESP3 connection with
//!   `CLIENT TRACKING ON BCAST`, on which the shard reports every key modified, by anyone
//!   (through this slotgate, another instance, or directly on the shard), and a flush as a
//!   null. The shards' own tracking tables stay empty: their shared connections to slotgate
//!   are not tracked, so clients without tracking cost the shards nothing.
//! - **Who is told.** The worker's [`Tracker`] remembers which of its tracking clients read
//!   which key (default mode; bounded by `tracking_table_max_keys`, an evicted key is
//!   invalidated), and which prefixes its BCAST clients follow. A reported key goes to those
//!   clients: a RESP3 `invalidate` push, or, for a client that named a `REDIRECT` target,
//!   to that connection (a RESP3 push, or a message on `__redis__:invalidate` for a RESP2
//!   subscriber), on whichever worker it lives.
//! - **Loss.** While a link is down, writes on its shard go unreported: when it goes down,
//!   at each attempt to bring it back and when it is back, every client that may have
//!   cached something gets a null invalidation (flush everything), as Redis does when a
//!   redirect connection goes away.
//! - **Races.** A report can overtake the reply of a read that ran before the write (they
//!   travel on different connections): a key reported while a client's read of it is on its
//!   way is invalidated again right after that read's reply (see [`Client::written`]).
//!
//! Clients without tracking pay one branch per command (`Session::tracking` is `None`) and
//! one per write turn.

pub mod link;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::auth::User;
use crate::command::{CommandSpec, flags, keys};
use crate::queue::ReplyQueue;
use crate::resp::Request;
use crate::resp::reply::{self, Aggregate, Proto};
use crate::shard::UpstreamConfig;

/// The channel a RESP2 connection subscribes to, to receive the invalidations of the clients
/// that redirect theirs to it.
pub const CHANNEL: &[u8] = b"__redis__:invalidate";

/// The prefix of the keys slotgate keeps beside clients' keys (read-through leases and
/// validators): never reported to BCAST clients.
const INTERNAL: &[u8] = b"__slotgate:";

/// Redis's default `tracking-table-max-keys`.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Invalidations waiting in a redirect target's mailbox beyond which they are replaced by
/// one flush (the target is not taking them).
const MAILBOX_MAX: usize = 10_000;

/// CLIENT TRACKING ON's options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    pub bcast: bool,
    pub optin: bool,
    pub optout: bool,
    pub noloop: bool,
    /// The client id invalidations go to (0: the client itself).
    pub redirect: u64,
    /// BCAST prefixes (sorted; the empty prefix when none was named).
    pub prefixes: Vec<Bytes>,
}

/// CLIENT TRACKING's request.
#[derive(Debug, PartialEq, Eq)]
pub enum Switch {
    /// The mode to take up (a client already in BCAST keeps its prefixes, and adds these).
    On(Mode),
    Off,
}

/// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p …] [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`,
/// checked against the client's mode now (`None`: off) as Redis checks it, in its order: a
/// redirect target must `exist` as soon as it is named (even with OFF).
pub fn parse(
    req: &Request<'_>,
    now: Option<&Mode>,
    exists: &dyn Fn(u64) -> bool,
) -> Result<Switch, Bytes> {
    let on = req.arg(2);
    let on = if on.eq_ignore_ascii_case(b"on") {
        true
    } else if on.eq_ignore_ascii_case(b"off") {
        false
    } else {
        return Err(Bytes::from_static(reply::SYNTAX));
    };
    let mut mode = Mode::default();
    let mut prefixes = Vec::new();
    let mut j = 3;
    while j < req.argc() {
        let opt = req.arg(j);
        let more = j + 1 < req.argc();
        let is = |name: &[u8]| opt.eq_ignore_ascii_case(name);
        if is(b"redirect") && more {
            j += 1;
            if mode.redirect != 0 {
                return Err(Bytes::from_static(reply::TRACKING_ONE_REDIRECT));
            }
            mode.redirect = match crate::resp::request::parse_i64(req.arg(j)) {
                Some(id) => id as u64,
                None => return Err(Bytes::from_static(reply::NOT_INTEGER)),
            };
            if !exists(mode.redirect) {
                return Err(Bytes::from_static(reply::TRACKING_NO_TARGET));
            }
        } else if is(b"bcast") {
            mode.bcast = true;
        } else if is(b"optin") {
            mode.optin = true;
        } else if is(b"optout") {
            mode.optout = true;
        } else if is(b"noloop") {
            mode.noloop = true;
        } else if is(b"prefix") && more {
            j += 1;
            prefixes.push(Bytes::copy_from_slice(req.arg(j)));
        } else {
            return Err(Bytes::from_static(reply::SYNTAX));
        }
        j += 1;
    }
    if !on {
        return Ok(Switch::Off);
    }
    if !mode.bcast && !prefixes.is_empty() {
        return Err(Bytes::from_static(reply::TRACKING_PREFIX_NEEDS_BCAST));
    }
    if now.is_some_and(|now| now.bcast != mode.bcast) {
        return Err(Bytes::from_static(reply::TRACKING_BCAST_SWITCH));
    }
    if mode.bcast && (mode.optin || mode.optout) {
        return Err(Bytes::from_static(reply::TRACKING_OPT_BCAST));
    }
    if mode.optin && mode.optout {
        return Err(Bytes::from_static(reply::TRACKING_OPTIN_OPTOUT));
    }
    if let Some(now) = now
        && ((mode.optin && now.optout) || (mode.optout && now.optin))
    {
        return Err(Bytes::from_static(reply::TRACKING_OPT_SWITCH));
    }
    if mode.bcast {
        let existing: &[Bytes] = now.map_or(&[], |n| &n.prefixes);
        check_prefixes(existing, &prefixes)?;
        let mut all = existing.to_vec();
        all.extend(prefixes.iter().cloned());
        if all.is_empty() {
            all.push(Bytes::new());
        }
        all.sort();
        all.dedup();
        mode.prefixes = all;
    }
    Ok(Switch::On(mode))
}

/// Two prefixes overlap when one starts the other (both would report one key).
fn check_prefixes(existing: &[Bytes], given: &[Bytes]) -> Result<(), Bytes> {
    let overlap = |a: &[u8], b: &[u8]| {
        let n = a.len().min(b.len());
        a[..n] == b[..n]
    };
    for (i, p) in given.iter().enumerate() {
        if let Some(e) = existing.iter().find(|e| overlap(e, p)) {
            return Err(reply::prefix_overlap(p, e, true));
        }
        if let Some(q) = given[i + 1..].iter().find(|q| overlap(p, q)) {
            return Err(reply::prefix_overlap(p, q, false));
        }
    }
    Ok(())
}

/// Where a tracking client's invalidations go when it names another connection
/// (`REDIRECT id`): that connection's mailbox, emptied by its own session (which knows its
/// protocol and subscriptions) on its worker. Every session has one.
#[derive(Default)]
pub struct Mail {
    inbox: Mutex<Vec<Option<Vec<Bytes>>>>,
    pub notify: tokio::sync::Notify,
}

impl std::fmt::Debug for Mail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mail")
    }
}

impl Mail {
    /// Posts invalidated keys (`None`: everything).
    pub fn post(&self, keys: Option<Vec<Bytes>>) {
        if let Ok(mut inbox) = self.inbox.lock() {
            if inbox.len() >= MAILBOX_MAX {
                inbox.clear();
                inbox.push(None);
            } else {
                inbox.push(keys);
            }
        }
        self.notify.notify_one();
    }

    pub fn take(&self) -> Vec<Option<Vec<Bytes>>> {
        self.inbox
            .lock()
            .map(|mut i| std::mem::take(&mut *i))
            .unwrap_or_default()
    }
}

/// One tracking client, shared by its session and its worker's [`Tracker`].
pub struct Client {
    pub id: u64,
    queue: Rc<ReplyQueue>,
    pub proto: Cell<Proto>,
    pub mode: RefCell<Mode>,
    /// CLIENT CACHING YES|NO was given: for the next command that is not a CLIENT one (or
    /// for a whole transaction).
    caching: Cell<bool>,
    /// The redirect target went away.
    pub broken: Cell<bool>,
    redirect: RefCell<Option<Weak<Mail>>>,
    /// Its user's key permissions (`None`: all keys): a BCAST client is told only of keys it
    /// may read.
    pub user: RefCell<Option<Arc<User>>>,
    /// It may have cached something since it was last flushed.
    cached: Cell<bool>,
    /// Tracking is on (off after a CLIENT TRACKING ON that a shard's refusal undid).
    active: Cell<bool>,
    /// Its tracked reads whose replies it has not been written yet.
    inflight: RefCell<Inflight>,
    /// Invalidations (`None`: a flush) to send again once the reply with the given sequence
    /// number is written, one per key. A key reported while a read of it is on its way may
    /// have been written after the read ran on the shard: the reply could bring the old value
    /// after the first invalidation, so a second one follows it (see [`Client::written`]).
    deferred: RefCell<HashMap<Option<Bytes>, u64>>,
}

/// A tracking client's reads on their way: each read's reply sequence number in its queue
/// (`u64::MAX` while queued in a transaction), in order, and per key the last one, so that
/// a report of many keys costs one lookup per key.
#[derive(Default)]
struct Inflight {
    order: VecDeque<(u64, Bytes)>,
    last: HashMap<Bytes, u64>,
}

impl Client {
    pub fn new(id: u64, queue: Rc<ReplyQueue>, proto: Proto) -> Rc<Self> {
        Rc::new(Client {
            id,
            queue,
            proto: Cell::new(proto),
            mode: RefCell::default(),
            caching: Cell::new(false),
            broken: Cell::new(false),
            redirect: RefCell::new(None),
            user: RefCell::new(None),
            cached: Cell::new(false),
            active: Cell::new(true),
            inflight: RefCell::default(),
            deferred: RefCell::default(),
        })
    }

    /// Takes up `mode`, with `target` the mailbox of its redirect (if any).
    pub fn set_mode(&self, mode: Mode, target: Option<Weak<Mail>>) {
        *self.mode.borrow_mut() = mode;
        *self.redirect.borrow_mut() = target;
        self.broken.set(false);
        self.active.set(true);
    }

    /// Whether tracking is on (see [`Client::deactivate`]).
    pub fn is_active(&self) -> bool {
        self.active.get()
    }

    /// A CLIENT TRACKING ON that could not be honoured: off again.
    pub fn deactivate(&self) {
        self.active.set(false);
    }

    /// CLIENT CACHING YES|NO.
    pub fn cache_next(&self) {
        self.caching.set(true);
    }

    /// Notes a tracked read of `key` whose reply takes sequence number `seq`.
    fn note_read(&self, seq: u64, key: Bytes) {
        let mut f = self.inflight.borrow_mut();
        f.last.insert(key.clone(), seq);
        f.order.push_back((seq, key));
    }

    /// Forgets the reads whose replies have been written.
    fn prune(&self) {
        let base = self.queue.base();
        let f = &mut *self.inflight.borrow_mut();
        while let Some((seq, _)) = f.order.front()
            && *seq < base
        {
            let (seq, key) = f.order.pop_front().expect("a front");
            if f.last.get(&key) == Some(&seq) {
                f.last.remove(&key);
            }
        }
    }

    /// Tells the client that `keys` changed (`None`: everything) now, and again after the
    /// replies of its reads of them that are still on their way.
    fn invalidate(&self, keys: Option<&[Bytes]>) {
        self.invalidate_framed(keys, None);
    }

    fn invalidate_framed(&self, keys: Option<&[Bytes]>, push: Option<&Bytes>) {
        self.send_framed(keys, push);
        self.prune();
        let f = self.inflight.borrow();
        let mut d = self.deferred.borrow_mut();
        let mut defer = |key: Option<Bytes>, seq: u64| {
            let at = d.entry(key).or_insert(seq);
            *at = (*at).max(seq);
        };
        match keys {
            // (Sequence numbers grow: the last read is the one that ends last.)
            None => {
                if let Some(&(seq, _)) = f.order.back() {
                    defer(None, seq);
                }
            }
            Some(keys) => {
                for k in keys {
                    if let Some(&seq) = f.last.get(k) {
                        defer(Some(k.clone()), seq);
                    }
                }
            }
        }
    }

    /// `key` is invalidated once the reply with sequence number `seq` is written (an answer
    /// that no shard holds: nothing would report it changing).
    pub fn invalidate_after(&self, seq: u64, key: Bytes) {
        let mut d = self.deferred.borrow_mut();
        let at = d.entry(Some(key)).or_insert(seq);
        *at = (*at).max(seq);
        drop(d);
        // (The reply may be written already: then now.)
        self.written();
    }

    /// The session wrote its replies up to its queue's base: the invalidations that waited
    /// for them go now (after those replies).
    pub fn written(&self) {
        if self.deferred.borrow().is_empty() {
            return;
        }
        let base = self.queue.base();
        let due: Vec<Option<Bytes>> = {
            let mut d = self.deferred.borrow_mut();
            let due = d
                .iter()
                .filter(|&(_, &s)| s < base)
                .map(|(k, _)| k.clone())
                .collect();
            d.retain(|_, s| *s >= base);
            due
        };
        self.send_due(due);
    }

    /// EXEC (its reply's sequence number) or DISCARD (`None`) of the reads queued in a
    /// transaction.
    fn settle_transaction(&self, exec: Option<u64>) {
        let f = &mut *self.inflight.borrow_mut();
        match exec {
            Some(seq) => {
                for (s, _) in f.order.iter_mut().rev() {
                    if *s != u64::MAX {
                        break;
                    }
                    *s = seq;
                }
                f.last
                    .values_mut()
                    .filter(|s| **s == u64::MAX)
                    .for_each(|s| *s = seq);
            }
            None => {
                let mut dropped = Vec::new();
                while f.order.back().is_some_and(|(s, _)| *s == u64::MAX) {
                    dropped.extend(f.order.pop_back().map(|(_, k)| k));
                }
                f.last.retain(|_, s| *s != u64::MAX);
                // A key also read before the transaction is still on its way there.
                for k in dropped {
                    if !f.last.contains_key(&k)
                        && let Some(&(seq, _)) = f.order.iter().rev().find(|(_, x)| *x == k)
                    {
                        f.last.insert(k, seq);
                    }
                }
            }
        }
        match exec {
            Some(seq) => self
                .deferred
                .borrow_mut()
                .values_mut()
                .filter(|s| **s == u64::MAX)
                .for_each(|s| *s = seq),
            // Discarded: their invalidations need not wait for anything.
            None => {
                let due: Vec<Option<Bytes>> = {
                    let mut d = self.deferred.borrow_mut();
                    let due = d
                        .iter()
                        .filter(|&(_, &s)| s == u64::MAX)
                        .map(|(k, _)| k.clone());
                    let due = due.collect();
                    d.retain(|_, s| *s != u64::MAX);
                    due
                };
                self.send_due(due);
            }
        }
    }

    /// Sends invalidations that were waiting: a flush if one is among them, else one push
    /// of their keys.
    fn send_due(&self, due: Vec<Option<Bytes>>) {
        if due.is_empty() {
            return;
        }
        if due.iter().any(Option::is_none) {
            return self.send(None);
        }
        let keys: Vec<Bytes> = due.into_iter().flatten().collect();
        self.send(Some(&keys));
    }

    fn may_read(&self, key: &[u8]) -> bool {
        self.user
            .borrow()
            .as_ref()
            .is_none_or(|u| u.may_access(key, crate::command::access::READ))
    }

    /// Tells the client (or its redirect target) that `keys` changed (`None`: everything).
    fn send(&self, keys: Option<&[Bytes]>) {
        self.send_framed(keys, None);
    }

    /// [`send`](Self::send), with the RESP3 push already built when given (the same for
    /// many clients).
    fn send_framed(&self, keys: Option<&[Bytes]>, push: Option<&Bytes>) {
        let target = self.redirect.borrow().clone();
        match target {
            Some(weak) => match weak.upgrade() {
                Some(mail) => mail.post(keys.map(<[Bytes]>::to_vec)),
                None => {
                    self.broken.set(true);
                    if self.proto.get() == Proto::Resp3 {
                        let redirect = self.mode.borrow().redirect;
                        self.queue.push_oob_always(redirect_broken(redirect));
                    }
                }
            },
            // (Written under CLIENT REPLY OFF too, as Redis writes its pushes.)
            None if self.proto.get() == Proto::Resp3 => self
                .queue
                .push_oob_always(push.cloned().unwrap_or_else(|| frame(Proto::Resp3, keys))),
            // (RESP2 without a redirect: Redis has no way to tell it either.)
            None => {}
        }
    }

    /// CLIENT TRACKINGINFO.
    pub fn info(this: Option<&Client>, proto: Proto) -> Bytes {
        let mut flags: Vec<&[u8]> = Vec::new();
        let (redirect, prefixes) = match this {
            None => {
                flags.push(b"off");
                (-1, Vec::new())
            }
            Some(c) => {
                let m = c.mode.borrow();
                flags.push(b"on");
                let caching = c.caching.get();
                for (on, name) in [
                    (m.bcast, &b"bcast"[..]),
                    (m.optin, b"optin"),
                    (m.optout, b"optout"),
                    (m.optin && caching, b"caching-yes"),
                    (m.optout && caching, b"caching-no"),
                    (m.noloop, b"noloop"),
                    (c.broken.get(), b"broken_redirect"),
                ] {
                    if on {
                        flags.push(name);
                    }
                }
                (m.redirect as i64, m.prefixes.clone())
            }
        };
        let mut set = Aggregate::set(proto, flags.len());
        for f in &flags {
            set.bulk(f);
        }
        let mut p = Aggregate::array(prefixes.len());
        for x in &prefixes {
            p.bulk(x);
        }
        let mut m = Aggregate::map(proto, 3);
        m.bulk(b"flags").raw(&set.finish());
        m.bulk(b"redirect").integer(redirect);
        m.bulk(b"prefixes").raw(&p.finish());
        m.finish()
    }
}

/// The invalidation of `keys` (`None`: everything) as a RESP3 push, or as the RESP2
/// `__redis__:invalidate` message of a redirect target.
pub fn frame(proto: Proto, keys: Option<&[Bytes]>) -> Bytes {
    let mut a = match proto {
        Proto::Resp3 => {
            let mut a = Aggregate::push(2);
            a.bulk(b"invalidate");
            a
        }
        Proto::Resp2 => {
            let mut a = Aggregate::array(3);
            a.bulk(b"message").bulk(CHANNEL);
            a
        }
    };
    match keys {
        None => a.raw(reply::null(proto)),
        Some(keys) => {
            let mut k = Aggregate::array(keys.len());
            for key in keys {
                k.bulk(key);
            }
            a.raw(&k.finish())
        }
    };
    a.finish()
}

/// `>2 tracking-redir-broken <id>`: the redirect target of a RESP3 client is gone.
fn redirect_broken(id: u64) -> Bytes {
    let mut a = Aggregate::push(2);
    a.bulk(b"tracking-redir-broken").integer(id as i64);
    a.finish()
}

/// One worker's tracking: its tracking clients, the keys they read, and the invalidation
/// links to the shards.
pub struct Tracker {
    /// Key → the tracking clients (ids) that read it (default mode).
    table: RefCell<HashMap<Bytes, Vec<u64>>>,
    clients: RefCell<HashMap<u64, Rc<Client>>>,
    /// The BCAST clients among them (every reported key is matched against their prefixes).
    bcast: RefCell<Vec<Rc<Client>>>,
    links: RefCell<HashMap<SocketAddr, Rc<link::Link>>>,
    /// Most keys in `table` (0: no limit).
    max_keys: usize,
    /// Tracking clients over all workers (INFO's `tracking_clients`).
    total: Arc<AtomicUsize>,
    /// Keys in `table` (published for INFO's `tracking_total_keys`).
    keys_now: Arc<AtomicUsize>,
    /// Key positions of the command being looked at.
    scratch: RefCell<Vec<usize>>,
    /// Woken when a link comes up.
    pub link_up: tokio::sync::Notify,
}

impl Tracker {
    pub fn new(max_keys: usize, total: Arc<AtomicUsize>, keys_now: Arc<AtomicUsize>) -> Rc<Self> {
        Rc::new(Tracker {
            table: RefCell::default(),
            clients: RefCell::default(),
            bcast: RefCell::default(),
            links: RefCell::default(),
            max_keys,
            total,
            keys_now,
            scratch: RefCell::default(),
            link_up: tokio::sync::Notify::new(),
        })
    }

    /// A client turned tracking on (again, perhaps in another mode).
    pub fn add(&self, c: &Rc<Client>) {
        if self.clients.borrow_mut().insert(c.id, c.clone()).is_none() {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        let mut bcast = self.bcast.borrow_mut();
        bcast.retain(|b| b.id != c.id);
        if c.mode.borrow().bcast {
            bcast.push(c.clone());
        }
    }

    /// A client turned tracking off or went away. Its entries in the key table go lazily
    /// (when their keys are invalidated or evicted), as in Redis.
    pub fn remove(&self, id: u64) {
        let empty = {
            let mut clients = self.clients.borrow_mut();
            if clients.remove(&id).is_some() {
                self.total.fetch_sub(1, Ordering::Relaxed);
            }
            clients.is_empty()
        };
        self.bcast.borrow_mut().retain(|b| b.id != id);
        if empty {
            // Nobody left to tell: the shards need not report writes to this worker.
            for (_, l) in self.links.borrow_mut().drain() {
                l.stop();
            }
            self.table.borrow_mut().clear();
            self.keys_now.store(0, Ordering::Relaxed);
        }
    }

    /// The links this worker needs: one per shard of `shards` (the primaries), started if
    /// missing; links to shards no longer there are stopped.
    pub fn ensure_links(self: &Rc<Self>, shards: &[(SocketAddr, UpstreamConfig)]) {
        if self.clients.borrow().is_empty() {
            return;
        }
        let mut links = self.links.borrow_mut();
        links.retain(|addr, l| {
            let keep = shards.iter().any(|(a, _)| a == addr);
            if !keep {
                l.stop();
            }
            keep
        });
        for l in links.values() {
            l.retry_if_refused();
        }
        for (addr, cfg) in shards {
            links
                .entry(*addr)
                .or_insert_with(|| link::Link::start(*addr, cfg.clone(), Rc::downgrade(self)));
        }
    }

    /// Why a shard refused its link's last handshake, if one did.
    pub fn refused_link(&self) -> Option<String> {
        self.links.borrow().values().find_map(|l| l.refused())
    }

    /// Whether every link is up.
    pub fn links_up(&self) -> bool {
        self.links.borrow().values().all(|l| l.is_up())
    }

    /// The shard layout changed: keys may now live where no link watched them before.
    pub fn relayout(self: &Rc<Self>, shards: &[(SocketAddr, UpstreamConfig)]) {
        if self.clients.borrow().is_empty() {
            return;
        }
        self.ensure_links(shards);
        self.flush_cached();
    }

    /// What a tracking client's command means for tracking: a read remembers its keys (as
    /// OPTIN/OPTOUT and CLIENT CACHING decide); so does a script or function, for the keys
    /// it declares (it may read them: Redis tracks the keys its reads touch). CLIENT CACHING
    /// holds until a command that is not a CLIENT one has run, or through a transaction
    /// (`in_multi`: one is open), as in Redis. NOLOOP changes nothing here: the shard's report
    /// of a write does not say which client made it, so a NOLOOP client is told of its own
    /// writes too (an invalidation too many; forgetting the key at the write would miss the
    /// next one when the write changed nothing, e.g. a SET NX that did not set).
    pub fn command(&self, c: &Client, spec: &CommandSpec, req: &Request<'_>, in_multi: bool) {
        let caching = c.caching.get();
        let keeps = spec.name.starts_with("client|")
            || spec.name == "multi"
            || (in_multi && !matches!(spec.name, "exec" | "discard"));
        if !keeps {
            c.caching.set(false);
        }
        match spec.name {
            "exec" => c.settle_transaction(Some(c.queue.next_seq())),
            "discard" => c.settle_transaction(None),
            _ => {}
        }
        let reads = (spec.has(flags::READONLY) && !spec.has(flags::PUBSUB)) || spec.runs_script();
        if !reads {
            return;
        }
        let m = c.mode.borrow();
        c.cached.set(true);
        if (m.optin && !caching) || (m.optout && caching) {
            return;
        }
        let mut idx = self.scratch.borrow_mut();
        idx.clear();
        if keys::key_indices(spec, req.argc(), |i| req.arg(i), &mut idx).is_err() {
            return;
        }
        let seq = if in_multi {
            u64::MAX
        } else {
            c.queue.next_seq()
        };
        c.prune();
        for &i in idx.iter() {
            let key = Bytes::copy_from_slice(req.arg(i));
            if !m.bcast {
                self.remember(key.clone(), c.id);
            }
            c.note_read(seq, key);
        }
    }

    fn remember(&self, key: Bytes, id: u64) {
        let mut t = self.table.borrow_mut();
        if let Some(r) = t.get_mut(&key) {
            if !r.contains(&id) {
                if r.len() >= 8 && r.len().is_power_of_two() {
                    // A key read by many clients that came and went (never written): their
                    // ids go, so its list stays as long as its live readers.
                    let clients = self.clients.borrow();
                    r.retain(|x| clients.contains_key(x));
                }
                r.push(id);
            }
            return;
        }
        if self.max_keys != 0 && t.len() >= self.max_keys {
            // Full: a key goes, and whoever read it is told (Redis's tracking-table-max-keys).
            if let Some(old) = t.keys().next().cloned()
                && let Some(readers) = t.remove(&old)
            {
                self.tell(&readers, &old);
            }
        }
        t.insert(key, vec![id]);
        self.keys_now.store(t.len(), Ordering::Relaxed);
    }

    fn tell(&self, readers: &[u64], key: &Bytes) {
        let clients = self.clients.borrow();
        for id in readers {
            if let Some(c) = clients.get(id)
                && !c.mode.borrow().bcast
            {
                c.invalidate(Some(std::slice::from_ref(key)));
            }
        }
    }

    /// A link reported `keys` modified (`None`: the shard was flushed).
    pub fn invalidated(&self, keys: Option<Vec<Bytes>>) {
        let Some(keys) = keys else {
            return self.flush_all();
        };
        let mut out: HashMap<u64, Vec<Bytes>> = HashMap::new();
        {
            let mut t = self.table.borrow_mut();
            for k in &keys {
                if let Some(readers) = t.remove(k) {
                    for id in readers {
                        out.entry(id).or_default().push(k.clone());
                    }
                }
            }
            self.keys_now.store(t.len(), Ordering::Relaxed);
        }
        // A BCAST client of every key without key restrictions (the usual one) gets the same
        // push as every other such client: built once.
        let everything = !keys.iter().any(|k| k.starts_with(INTERNAL));
        let mut shared_push: Option<Bytes> = None;
        for c in self.bcast.borrow().iter() {
            let m = c.mode.borrow();
            if everything && c.user.borrow().is_none() && m.prefixes.iter().any(|p| p.is_empty()) {
                let push = shared_push.get_or_insert_with(|| frame(Proto::Resp3, Some(&keys)));
                c.invalidate_framed(Some(&keys), Some(push));
                continue;
            }
            for k in &keys {
                // (slotgate's own side keys, such as read-through leases, are not news.)
                if !k.starts_with(INTERNAL)
                    && m.prefixes.iter().any(|p| k.starts_with(p))
                    && c.may_read(k)
                {
                    out.entry(c.id).or_default().push(k.clone());
                }
            }
        }
        let clients = self.clients.borrow();
        for (id, ks) in out {
            if let Some(c) = clients.get(&id) {
                c.invalidate(Some(&ks));
            }
        }
    }

    /// FLUSHALL/FLUSHDB on a shard: every tracking client is told to drop everything.
    fn flush_all(&self) {
        self.flush(true);
    }

    /// A link went down or came back: every client that may have cached something since its
    /// last flush drops everything.
    pub fn flush_cached(&self) {
        self.flush(false);
    }

    fn flush(&self, everyone: bool) {
        for c in self.clients.borrow().values() {
            if c.cached.replace(false) || everyone {
                c.invalidate(None);
            }
        }
        self.table.borrow_mut().clear();
        self.keys_now.store(0, Ordering::Relaxed);
    }
}

/// The frames a session writes for what its mailbox holds: a RESP3 push, or (RESP2) a
/// message when it is subscribed to [`CHANNEL`]; keys its user may not read are left out.
pub fn delivered(
    inbox: Vec<Option<Vec<Bytes>>>,
    proto: Proto,
    subscribed: bool,
    user: Option<&User>,
) -> Vec<Bytes> {
    if proto == Proto::Resp2 && !subscribed {
        return Vec::new();
    }
    inbox
        .into_iter()
        .filter_map(|keys| match keys {
            None => Some(frame(proto, None)),
            Some(mut keys) => {
                if let Some(u) = user {
                    keys.retain(|k| u.may_access(k, crate::command::access::READ));
                }
                (!keys.is_empty()).then(|| frame(proto, Some(&keys)))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, Parsed, RequestParser};
    use bytes::BytesMut;

    /// Runs `args` through the tracker as client `c`'s command.
    fn run(t: &Tracker, c: &Client, args: &[&[u8]]) {
        let raw = crate::resp::request::command(args);
        let mut p = RequestParser::new();
        let Ok(Parsed::Command { req, .. }) = p.parse(&raw, &Limits::default(), true) else {
            panic!("parse");
        };
        let mut spec = crate::command::lookup(args[0]).unwrap();
        if spec.is_container() {
            spec = crate::command::lookup_sub(spec, args[1]).unwrap();
        }
        t.command(c, spec, &req, false);
    }

    fn pushes(q: &ReplyQueue) -> Vec<u8> {
        let mut out = BytesMut::new();
        q.drain_pushes(&mut out);
        out.to_vec()
    }

    fn tracker(max: usize) -> Rc<Tracker> {
        Tracker::new(max, Arc::default(), Arc::default())
    }

    fn client(t: &Tracker, id: u64, mode: Mode) -> (Rc<Client>, Rc<ReplyQueue>) {
        let q = ReplyQueue::new();
        let c = Client::new(id, q.clone(), Proto::Resp3);
        c.set_mode(mode, None);
        t.add(&c);
        (c, q)
    }

    fn keys(k: &[&str]) -> Option<Vec<Bytes>> {
        Some(
            k.iter()
                .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn a_reported_key_goes_to_the_clients_that_read_it_once() {
        let t = tracker(0);
        let (a, qa) = client(&t, 1, Mode::default());
        let (_b, qb) = client(&t, 2, Mode::default());
        run(&t, &a, &[b"GET", b"k"]);
        run(&t, &a, &[b"MGET", b"k", b"j"]);
        t.invalidated(keys(&["k", "x"]));
        assert_eq!(pushes(&qa), frame(Proto::Resp3, keys(&["k"]).as_deref()));
        assert!(pushes(&qb).is_empty());
        // Told once: the key left the table.
        t.invalidated(keys(&["k"]));
        assert!(pushes(&qa).is_empty());
        t.invalidated(None);
        assert_eq!(pushes(&qa), b">2\r\n$10\r\ninvalidate\r\n_\r\n");
        assert_eq!(pushes(&qb), b">2\r\n$10\r\ninvalidate\r\n_\r\n");
    }

    /// A key reported while the client's read of it is on its way: the write may have come
    /// after the read ran, and the reply bring the old value after the invalidation. A second
    /// invalidation follows the reply.
    #[test]
    fn a_report_during_a_read_is_sent_again_after_its_reply() {
        let t = tracker(0);
        let (a, qa) = client(&t, 1, Mode::default());
        run(&t, &a, &[b"GET", b"k"]);
        let seq = qa.push_waiting(crate::queue::Slot::Waiting(None));
        t.invalidated(keys(&["k"]));
        let push = frame(Proto::Resp3, keys(&["k"]).as_deref());
        assert_eq!(pushes(&qa), push);
        a.written();
        assert!(pushes(&qa).is_empty(), "not before the reply");
        qa.deliver(seq, 0, Bytes::from_static(b"$3\r\nold\r\n"));
        let mut out = BytesMut::new();
        qa.drain_ready(&mut out, usize::MAX);
        a.written();
        qa.drain_pushes(&mut out);
        let mut want = b"$3\r\nold\r\n".to_vec();
        want.extend_from_slice(&push);
        assert_eq!(out.to_vec(), want);
        // Once only.
        a.written();
        assert!(pushes(&qa).is_empty());
    }

    /// A client's reads queued in an open transaction, and reports of their keys: one
    /// re-invalidation waits per key, however many reports come (the review saw one per
    /// report, and a scan of every read per reported key).
    #[test]
    fn reports_during_a_transaction_keep_one_deferred_invalidation_per_key() {
        let t = tracker(0);
        let (a, qa) = client(&t, 1, Mode::default());
        let many: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(many.iter().map(|k| k.as_bytes()));
        let raw = crate::resp::request::command(&args);
        let mut p = RequestParser::new();
        let Ok(Parsed::Command { req, .. }) = p.parse(&raw, &Limits::default(), true) else {
            panic!("parse");
        };
        t.command(&a, crate::command::lookup(b"MGET").unwrap(), &req, true);
        let all: Vec<Bytes> = many
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
            .collect();
        let started = std::time::Instant::now();
        for _ in 0..5 {
            a.invalidate(Some(&all));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(a.deferred.borrow().len(), 20_000);
        // DISCARD: due at once.
        a.settle_transaction(None);
        a.written();
        let n = pushes(&qa)
            .windows(10)
            .filter(|w| w == b"invalidate")
            .count();
        assert_eq!(
            n,
            5 + 1,
            "the five reports, then the waiting keys in one push"
        );
        assert!(a.deferred.borrow().is_empty());
    }

    #[test]
    fn a_full_table_evicts_a_key_and_invalidates_it() {
        let t = tracker(2);
        let (a, qa) = client(&t, 1, Mode::default());
        for k in ["a", "b", "c"] {
            run(&t, &a, &[b"GET", k.as_bytes()]);
        }
        assert_eq!(t.table.borrow().len(), 2);
        let p = String::from_utf8(pushes(&qa)).unwrap();
        assert!(
            p.starts_with(">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\n"),
            "{p}"
        );
    }

    #[test]
    fn readers_that_left_are_pruned_and_a_noloop_client_is_told_of_its_own_writes() {
        let t = tracker(0);
        // (The last one out empties the worker's tables: one client stays.)
        let _stays = client(&t, 100, Mode::default());
        for id in 1..=8 {
            let (c, _) = client(&t, id, Mode::default());
            run(&t, &c, &[b"GET", b"hot"]);
            t.remove(id);
        }
        assert_eq!(t.table.borrow()[&b"hot"[..]].len(), 8);
        let (c, q) = client(
            &t,
            9,
            Mode {
                noloop: true,
                ..Mode::default()
            },
        );
        run(&t, &c, &[b"GET", b"hot"]);
        assert_eq!(t.table.borrow()[&b"hot"[..]], vec![9]);
        // (A SET NX that sets nothing is not reported: the key must stay tracked.)
        run(&t, &c, &[b"SET", b"hot", b"v", b"NX"]);
        assert_eq!(t.table.borrow()[&b"hot"[..]], vec![9]);
        t.invalidated(keys(&["hot"]));
        assert_eq!(pushes(&q), frame(Proto::Resp3, keys(&["hot"]).as_deref()));
    }

    #[test]
    fn bcast_clients_follow_their_prefixes_but_never_slotgates_own_keys() {
        let t = tracker(0);
        let (_a, qa) = client(
            &t,
            1,
            Mode {
                bcast: true,
                prefixes: vec![Bytes::from_static(b"user:")],
                ..Mode::default()
            },
        );
        let (_b, qb) = client(
            &t,
            2,
            Mode {
                bcast: true,
                prefixes: vec![Bytes::new()],
                ..Mode::default()
            },
        );
        t.invalidated(keys(&["user:1", "__slotgate:lease:{user:1}", "other"]));
        assert_eq!(
            pushes(&qa),
            frame(Proto::Resp3, keys(&["user:1"]).as_deref())
        );
        assert_eq!(
            pushes(&qb),
            frame(Proto::Resp3, keys(&["user:1", "other"]).as_deref())
        );
    }

    #[test]
    fn optin_tracks_only_after_caching_yes() {
        let t = tracker(0);
        let (a, _) = client(
            &t,
            1,
            Mode {
                optin: true,
                ..Mode::default()
            },
        );
        run(&t, &a, &[b"GET", b"skipped"]);
        a.cache_next();
        run(&t, &a, &[b"CLIENT", b"TRACKINGINFO"]);
        run(&t, &a, &[b"GET", b"cached"]);
        run(&t, &a, &[b"GET", b"skipped2"]);
        let table = t.table.borrow();
        assert!(table.contains_key(&b"cached"[..]));
        assert_eq!(table.len(), 1);
    }
}
