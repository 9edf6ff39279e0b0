//! Commands that pin a client to a dedicated upstream connection: transactions
//! (MULTI/EXEC/DISCARD/WATCH/UNWATCH) and blocking commands (BLPOP …, XREAD BLOCK, WAIT).
//!
//! **Transactions** run on one dedicated connection to the shard of their keys, so WATCH and
//! MULTI/EXEC have Redis's real semantics there. MULTI is answered locally and keyless
//! commands are queued locally (`+QUEUED`) until the first keyed command picks the shard;
//! then MULTI and the queued commands are replayed on the dedicated connection (their
//! replies already given are dropped) and everything after goes there as is. Every key of
//! the transaction, watched keys included, must be in one slot: otherwise the command gets
//! `-CROSSSLOT …` and the transaction is flagged, so EXEC answers `-EXECABORT …` as Redis does
//! for a queuing error. Commands that span shards (KEYS, DBSIZE, FLUSHALL, SCAN …) are refused
//! inside MULTI. After EXEC/DISCARD/UNWATCH the connection goes back to the worker's pool; a
//! client that disconnects mid-transaction closes it, so the shard forgets everything.
//!
//! In cluster mode a transaction is kept whole until EXEC and then sent at once, so that it
//! can follow a redirect (see `follow`).
//!
//! **Blocking commands** get a dedicated connection for their duration, with no op timeout
//! (the client's own timeout applies); it returns to the pool when the reply arrives, and is
//! closed if the client goes away first (the shard unblocks).
//!
//! **Order.** A client's commands to a dedicated connection run after everything it sent
//! before on the shared connections, and vice versa: switching between the two waits until
//! nothing is in flight (the command is deferred, never reordered).

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::command::{CommandSpec, Route};
use crate::queue::{ReplyQueue, Sink, SinkRef, Slot, Target};
use crate::resp::Request;
use crate::resp::reply;
use crate::session::Cx;
use crate::shard::Dedicated;

/// An open transaction.
#[derive(Default)]
pub struct Tx {
    /// The dedicated connection, once a keyed command (or EXEC) chose the shard.
    conn: Option<Dedicated>,
    /// The slot every key must be in.
    slot: Option<u16>,
    /// MULTI and keyless commands answered locally, replayed when the connection opens.
    buffered: Vec<Bytes>,
    /// A queuing error happened: EXEC answers EXECABORT.
    aborted: bool,
    /// The connection holding the WATCHes was lost before MULTI: the watched keys may have
    /// changed unseen, so EXEC answers a null array (as when a watched key was touched) and
    /// runs nothing.
    watch_lost: bool,
    /// A command that may write was queued: CLIENT PAUSE WRITE holds the EXEC.
    pub(crate) writes: bool,
    /// The queued commands, in order: INFO commandstats counts the errors in EXEC's reply
    /// against them, as Redis does.
    queued: Vec<&'static str>,
    /// Cluster mode: `conn` holds WATCHes, and nothing was sent on it for this transaction
    /// yet (everything is sent at EXEC: see `follow`).
    watched: bool,
    /// Cluster mode: what those WATCHes were answered (EXEC waits for all of them).
    watch_replies: Option<Rc<WatchReplies>>,
}

/// WATCHed keys outside MULTI: their dedicated connection and slot, and what their WATCH
/// replies said so far.
pub struct Watch {
    conn: Dedicated,
    slot: u16,
    replies: Rc<WatchReplies>,
}

/// What the WATCHes on one connection were answered: a WATCH that failed (`shard
/// unavailable`, `outcome unknown`, an error) watches nothing, as in Redis, so it must not
/// pin the next transaction to its slot.
#[derive(Default)]
struct WatchReplies {
    ok: Cell<u32>,
    failed: Cell<bool>,
    /// Cluster mode: a WATCH was redirected, so its slot moved (see `follow`).
    moved: Cell<bool>,
}

/// Where a WATCH's reply goes: to the client, noted in [`WatchReplies`] on its way.
struct WatchReply {
    queue: Rc<ReplyQueue>,
    seq: u64,
    replies: Rc<WatchReplies>,
}

impl Sink for WatchReply {
    fn deliver(self: Rc<Self>, _idx: u32, reply: Bytes) {
        if crate::shard::is_redirect(&reply) && !reply.starts_with(b"-CLUSTERDOWN") {
            // Its slot moved (or is moving) away: the keys may change unseen, so the
            // transaction's EXEC answers a null array, as when a watched key changed.
            self.replies.moved.set(true);
            return self
                .queue
                .deliver(self.seq, 0, Bytes::from_static(reply::OK));
        }
        if reply.first() == Some(&b'-') {
            self.replies.failed.set(true);
        } else {
            self.replies.ok.set(self.replies.ok.get() + 1);
        }
        self.queue.deliver(self.seq, 0, reply);
    }
}

/// What is left of a WATCH when its transaction starts (or another WATCH comes).
enum Watched {
    /// Nothing: no WATCH succeeded (the connection is closed, so a WATCH that did reach the
    /// shard late cannot stay behind).
    Nothing,
    /// Some WATCH succeeded but the connection was lost, or a later one failed: the keys may
    /// have changed unseen.
    Lost,
    /// The watches hold on this connection (so far: some replies may be still to come).
    Holds(Dedicated, u16, Rc<WatchReplies>),
}

impl WatchReplies {
    /// The watches may not hold: one was redirected, or one failed after one succeeded.
    fn lost(&self) -> bool {
        self.moved.get() || (self.failed.get() && self.ok.get() > 0)
    }
}

impl Watch {
    fn state(self) -> Watched {
        let (ok, failed) = (self.replies.ok.get(), self.replies.failed.get());
        if self.replies.moved.get() {
            Watched::Lost
        } else if ok == 0 && failed {
            Watched::Nothing
        } else if !self.conn.up.usable() || failed {
            if ok == 0 {
                Watched::Nothing
            } else {
                Watched::Lost
            }
        } else {
            Watched::Holds(self.conn, self.slot, self.replies)
        }
    }
}

/// A blocking command in flight on its dedicated connection; counted in INFO's
/// `blocked_clients` for as long as it lives.
pub struct Blocked {
    conn: Option<Dedicated>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The session's CLIENT UNBLOCK entry, set while the command waits.
    on: std::sync::Arc<crate::worker::BlockedOn>,
}

impl Blocked {
    pub(super) fn new(
        conn: Dedicated,
        count: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        on: &std::sync::Arc<crate::worker::BlockedOn>,
    ) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut on) = on.lock() {
            *on = Some(conn.shard_client());
        }
        Blocked {
            conn: Some(conn),
            count: count.clone(),
            on: on.clone(),
        }
    }

    /// Cluster mode: the command was redirected and now waits on `conn` (the one it left
    /// answered, so it is clean).
    pub fn moved_to(&mut self, conn: Dedicated) {
        if let Ok(mut on) = self.on.lock() {
            *on = Some(conn.shard_client());
        }
        if let Some(old) = self.conn.replace(conn) {
            old.release();
        }
    }

    /// The command returned: its connection goes back to the pool.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.release();
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        if let Ok(mut on) = self.on.lock() {
            *on = None;
        }
        self.count
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A command kept until the client has nothing in flight (see the module docs).
pub struct Deferred {
    pub raw: Bytes,
    pub args: Vec<(u32, u32)>,
    /// It came right after CLIENT REPLY SKIP: its reply is dropped when it runs.
    pub skip: bool,
}

impl Deferred {
    pub fn from(req: &Request<'_>) -> Self {
        Deferred {
            raw: Bytes::copy_from_slice(req.raw),
            args: req.args.to_vec(),
            skip: false,
        }
    }

    pub fn request(&self) -> Request<'_> {
        Request {
            raw: &self.raw,
            args: &self.args,
        }
    }
}

use crate::session::follow::Follows;

/// A client's transaction and watches, and the dedicated connections they hold.
#[derive(Default)]
pub(crate) struct Pinned {
    /// An open MULTI.
    pub(crate) tx: Option<Tx>,
    /// WATCHed keys outside MULTI: their dedicated connection and slot.
    pub(crate) watch: Option<Watch>,
}

/// What the transaction commands may use: the narrow context, the slot of the command's keys
/// (`Err`: they do not share one), and in cluster mode the session's mailbox for redirects (a
/// transaction sent at EXEC follows them).
pub(crate) struct TxCx<'s> {
    pub(crate) cx: Cx<'s>,
    pub(crate) slot: Result<Option<u16>, ()>,
    pub(crate) follows: Option<Rc<Follows>>,
}

/// Sends `raw` on a dedicated connection; the reply fills the next queue slot.
pub(super) fn send_dedicated(cx: &Cx<'_>, conn: &Dedicated, raw: &[u8], deadline: Instant) {
    cx.send_until(Slot::Waiting(cx.cmd), &conn.up, raw, deadline);
}

/// EXEC: its reply goes to the client as it is, and the errors in its array are counted
/// against the commands that were `queued` (INFO commandstats and errorstats).
fn send_exec(
    cx: &Cx<'_>,
    conn: &Dedicated,
    raw: &[u8],
    deadline: Instant,
    queued: Vec<&'static str>,
) {
    let count = move |parts: &[Bytes]| -> Bytes {
        let reply = parts.first().cloned().unwrap_or_default();
        crate::session::follow::count_exec_errors(&reply, &queued);
        reply
    };
    let mut g = crate::fanout::Gather::new(
        crate::fanout::GatherKind::Info(Box::new(count)),
        1,
        cx.proto,
    );
    g.cmd = cx.cmd;
    cx.send_until(Slot::Gather(Box::new(g)), &conn.up, raw, deadline);
}

fn op_deadline(cx: &Cx<'_>, now: Instant) -> Instant {
    now + cx.w.shared.settings.op_timeout
}

/// A dedicated connection to the shard owning `slot` (shard 0 for none).
pub(super) fn take_dedicated(cx: &Cx<'_>, slot: Option<u16>) -> Result<Dedicated, Bytes> {
    let shard = slot.map_or(0, |s| cx.w.live().slot_map.shard_of_slot(s));
    cx.w.dedicated().take(cx.proto, shard)
}

/// Watches on a new dedicated connection for `slot`.
fn new_watch(cx: &Cx<'_>, slot: u16) -> Result<Watch, Bytes> {
    Ok(Watch {
        conn: take_dedicated(cx, Some(slot))?,
        slot,
        replies: Rc::default(),
    })
}

impl Pinned {
    /// Whether this command will use a dedicated connection (an open transaction, a
    /// transaction command, a blocking command).
    pub(crate) fn wants_dedicated(&self, spec: &CommandSpec, req: &Request<'_>) -> bool {
        self.tx.is_some()
            || matches!(spec.route, Route::Transaction | Route::Blocking)
            || (spec.route == Route::PubSub
                && crate::session::pubsub::changes_subscriptions(spec.name))
            || (spec.has(crate::command::flags::BLOCKING)
                && crate::command::policy::has_block_option(req))
    }

    /// Flags the open transaction after a queuing error (unknown command, arity, CROSSSLOT…).
    pub(crate) fn flag_tx(&mut self) {
        if let Some(tx) = &mut self.tx {
            tx.aborted = true;
        }
    }

    fn reject(&mut self, cx: &Cx<'_>, err: Bytes) {
        self.flag_tx();
        cx.reply(err);
    }

    /// Cluster mode: EXEC waits until the client has nothing in flight: its WATCHes have been
    /// answered (one a node redirected watches nothing), and a transaction before it, which
    /// may be following a redirect, has run.
    pub(crate) fn exec_waits(&self, cluster: bool, spec: &CommandSpec) -> bool {
        cluster && self.tx.is_some() && crate::command::policy::is_exec(spec.name)
    }

    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH.
    pub(crate) fn transaction(
        &mut self,
        tc: &TxCx<'_>,
        spec: &CommandSpec,
        req: &Request<'_>,
        now: Instant,
    ) {
        let cx = &tc.cx;
        match spec.name {
            "multi" => self.multi(cx, req, now),
            "exec" => self.exec(tc, req, now),
            "discard" => self.discard(cx, req, now),
            "watch" => self.watch(cx, tc.slot, req, now),
            "unwatch" if self.tx.is_some() => self.tx_queue(tc, spec, req, now),
            "unwatch" => self.unwatch(cx, req, now),
            _ => cx.reply(reply::not_yet(spec.name)),
        }
    }

    fn multi(&mut self, cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
        if self.tx.is_some() {
            return cx.reply_static(reply::MULTI_NESTED);
        }
        let mut tx = Tx::default();
        match self.watch.take().map(Watch::state) {
            // The watches are lost (their connection went, or a WATCH failed after one had
            // succeeded): MULTI succeeds (it never fails in Redis but when nested), the
            // transaction's keys may be in any slot, and EXEC will say the watched keys may
            // have changed (a WATCH retry loop starts over).
            Some(Watched::Lost) => {
                tx.watch_lost = true;
                tx.buffered.push(Bytes::copy_from_slice(req.raw));
                cx.reply_static(reply::OK);
            }
            // Cluster mode: everything goes at EXEC, on the WATCH's connection.
            Some(Watched::Holds(conn, slot, replies)) if cx.w.cluster => {
                tx.slot = Some(slot);
                tx.watched = true;
                tx.watch_replies = Some(replies);
                tx.conn = Some(conn);
                tx.buffered.push(Bytes::copy_from_slice(req.raw));
                cx.reply_static(reply::OK);
            }
            // WATCH already chose the shard: MULTI goes there.
            Some(Watched::Holds(conn, slot, _)) => {
                tx.slot = Some(slot);
                send_dedicated(cx, &conn, req.raw, op_deadline(cx, now));
                tx.conn = Some(conn);
            }
            // No WATCH, or none that succeeded.
            None | Some(Watched::Nothing) => {
                tx.buffered.push(Bytes::copy_from_slice(req.raw));
                cx.reply_static(reply::OK);
            }
        }
        self.tx = Some(tx);
    }

    fn exec(&mut self, tc: &TxCx<'_>, req: &Request<'_>, now: Instant) {
        let cx = &tc.cx;
        let Some(tx) = self.tx.take() else {
            return cx.reply_static(reply::EXEC_WITHOUT_MULTI);
        };
        let d = op_deadline(cx, now);
        if tx.watch_lost || tx.aborted {
            // Nothing runs: the shard (if one has the transaction) discards it.
            if let Some(conn) = tx.conn {
                // (Cluster mode sent no MULTI yet, only the WATCHes.)
                let clean: &[u8] = if tx.watched {
                    b"*1\r\n$7\r\nUNWATCH\r\n"
                } else {
                    b"*1\r\n$7\r\nDISCARD\r\n"
                };
                conn.up.send_until(clean, Target::Discard, d);
                conn.release();
            }
            return if tx.aborted {
                cx.reply_static(reply::EXECABORT)
            } else {
                cx.reply_static(reply::null_array(cx.proto))
            };
        }
        if let Some(follows) = &tc.follows {
            return exec_cluster(cx, follows, tx, req, d);
        }
        let conn = match tx.conn {
            Some(c) => c,
            // Only keyless commands: any shard runs them.
            None => match take_dedicated(cx, None) {
                Ok(c) => {
                    for b in &tx.buffered {
                        c.up.send_until(b, Target::Discard, d);
                    }
                    c
                }
                Err(e) => return cx.reply(e),
            },
        };
        send_exec(cx, &conn, req.raw, d, tx.queued);
        conn.release();
    }

    fn discard(&mut self, cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
        let Some(tx) = self.tx.take() else {
            return cx.reply_static(reply::DISCARD_WITHOUT_MULTI);
        };
        if tx.watched {
            // Cluster mode: only the WATCHes are on the shard.
            if let Some(conn) = tx.conn {
                conn.up.send_until(
                    b"*1\r\n$7\r\nUNWATCH\r\n",
                    Target::Discard,
                    op_deadline(cx, now),
                );
                conn.release();
            }
            return cx.reply_static(reply::OK);
        }
        match tx.conn {
            Some(conn) => {
                send_dedicated(cx, &conn, req.raw, op_deadline(cx, now));
                conn.release();
            }
            None => cx.reply_static(reply::OK),
        }
    }

    fn watch(
        &mut self,
        cx: &Cx<'_>,
        slot: Result<Option<u16>, ()>,
        req: &Request<'_>,
        now: Instant,
    ) {
        if self.tx.is_some() {
            return cx.reply_static(reply::WATCH_IN_MULTI);
        }
        let slot = match slot {
            Ok(Some(s)) => s,
            Ok(None) => return cx.reply(reply::wrong_arity("watch")),
            Err(()) => return cx.reply_static(reply::CROSSSLOT),
        };
        let watch = match self.watch.take() {
            Some(w) if w.slot == slot => w,
            // A WATCH that failed and watches nothing gives way to this one.
            Some(w)
                if w.replies.ok.get() == 0 && (w.replies.failed.get() || !w.conn.up.usable()) =>
            {
                match new_watch(cx, slot) {
                    Ok(w) => w,
                    Err(e) => return cx.reply(e),
                }
            }
            Some(other) => {
                self.watch = Some(other);
                return cx.reply_static(reply::CROSSSLOT);
            }
            None => match new_watch(cx, slot) {
                Ok(w) => w,
                Err(e) => return cx.reply(e),
            },
        };
        let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
        let sink = Rc::new(WatchReply {
            queue: cx.queue.clone(),
            seq,
            replies: watch.replies.clone(),
        });
        watch.conn.up.send_until(
            req.raw,
            Target::Sink(SinkRef::new(sink, 0)),
            op_deadline(cx, now),
        );
        self.watch = Some(watch);
    }

    fn unwatch(&mut self, cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
        match self.watch.take().map(Watch::state) {
            Some(Watched::Holds(conn, _, _)) => {
                send_dedicated(cx, &conn, req.raw, op_deadline(cx, now));
                conn.release();
            }
            // (Lost or failed watches watch nothing any more.)
            _ => cx.reply_static(reply::OK),
        }
    }

    /// A command inside MULTI: queued on the transaction's connection (or locally while no
    /// key has chosen the shard yet).
    pub(crate) fn tx_queue(
        &mut self,
        tc: &TxCx<'_>,
        spec: &CommandSpec,
        req: &Request<'_>,
        now: Instant,
    ) {
        let cx = &tc.cx;
        match spec.route {
            Route::Refused => return self.reject(cx, reply::not_allowed(spec.name)),
            Route::NotYet => return self.reject(cx, reply::not_yet(spec.name)),
            // PUBLISH too: classic channels live on the first shard, not on the shard the
            // transaction's keys chose.
            Route::PubSub => {
                return self.reject(cx, reply::not_in_multi(spec.name, false));
            }
            Route::AllShards(_) => {
                return self.reject(cx, reply::not_in_multi(spec.name, true));
            }
            Route::Local
                if !matches!(
                    spec.name,
                    // (Not CONFIG GET: its reply is filtered of the shards' secrets.)
                    "ping" | "echo" | "time" | "command"
                ) && !spec.name.starts_with("command|") =>
            {
                return self.reject(cx, reply::not_in_multi(spec.name, false));
            }
            _ => {}
        }
        let slot = match tc.slot {
            Ok(s) => s,
            Err(()) => return self.reject(cx, Bytes::from_static(reply::CROSSSLOT)),
        };
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        if let Some(s) = slot {
            match tx.slot {
                None => tx.slot = Some(s),
                Some(t) if t != s => {
                    return self.reject(cx, Bytes::from_static(reply::CROSSSLOT));
                }
                _ => {}
            }
        }
        tx.writes |= crate::session::control::may_write(spec);
        tx.queued.push(spec.name);
        let d = op_deadline(cx, now);
        let opened = tx.conn.is_some() && !tx.watched;
        // Cluster mode keeps every command until EXEC (see `follow`); otherwise keyless ones
        // wait until a key chose the shard.
        if cx.w.cluster || (slot.is_none() && !opened) {
            tx.buffered.push(Bytes::copy_from_slice(req.raw));
            return cx.reply(Bytes::from_static(b"+QUEUED\r\n"));
        }
        if !opened {
            let conn = match take_dedicated(cx, slot) {
                Ok(c) => c,
                Err(e) => return self.reject(cx, e),
            };
            for b in &tx.buffered {
                conn.up.send_until(b, Target::Discard, d);
            }
            tx.buffered.clear();
            tx.conn = Some(conn);
        }
        if let Some(conn) = &tx.conn {
            send_dedicated(cx, conn, req.raw, d);
        }
    }
}

/// Cluster mode: the whole transaction goes now, and follows redirects (see `follow`).
fn exec_cluster(cx: &Cx<'_>, follows: &Rc<Follows>, tx: Tx, req: &Request<'_>, deadline: Instant) {
    if tx.watch_replies.is_some_and(|r| r.lost()) {
        // A WATCH was redirected (its slot moved), or failed after one succeeded: as
        // when a watched key changed.
        if let Some(conn) = tx.conn {
            conn.up
                .send_until(b"*1\r\n$7\r\nUNWATCH\r\n", Target::Discard, deadline);
            conn.release();
        }
        return cx.reply_static(reply::null_array(cx.proto));
    }
    let conn = match tx.conn {
        Some(c) => c,
        None => match take_dedicated(cx, tx.slot) {
            Ok(c) => c,
            Err(e) => return cx.reply(e),
        },
    };
    let mut parts = tx.buffered;
    parts.push(Bytes::copy_from_slice(req.raw));
    crate::session::follow::send_tx(cx, follows, &conn, parts, tx.queued, tx.watched, deadline);
    conn.release();
}
