//! Cluster mode: requests on dedicated connections follow redirects too.
//!
//! A request on a shared connection is redirected by its worker's redirector
//! (`cluster::redirector`). One on a dedicated connection belongs to its session, which
//! holds the connection (a blocked client's, a transaction's), so the session sends it again:
//! the reply's sink keeps the redirect in the session's [`Follows`] and flags the session
//! (`Attention::FOLLOW`); the session asks `cluster::next_hop` where it goes (the same
//! decision as for shared connections: MOVED and ASK hops, TRYAGAIN waits, host names,
//! nodes that just joined) and sends it there on a new dedicated connection.
//!
//! - **Blocking commands** (BLPOP …, XREAD BLOCK): a node answers `-MOVED` before it blocks,
//!   and also to a client blocked on a slot it gave away (Redis checks blocked clients
//!   about every 100 ms). The command is sent again as it was, so it waits its whole
//!   timeout again from there.
//! - **Transactions** are kept in slotgate until EXEC (each command answered `+QUEUED` once
//!   slotgate's own checks pass), then sent at once: MULTI, the commands, EXEC. A node that
//!   does not own the slot answers the commands with a redirect and EXEC with `-EXECABORT`,
//!   so nothing ran, and the whole transaction is sent where the first redirect says (behind
//!   `ASKING` for an ASK: it lasts until EXEC inside MULTI). A transaction under WATCH is not
//!   moved: the watches hold on the node that lost the slot, so EXEC answers a null array,
//!   as when a watched key changed (and moving a slot does move its keys); the client's next
//!   try WATCHes at the new owner. A WATCH answered with a redirect does the same.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::cluster::{self, Hop};
use crate::queue::{Attention, ReplyQueue, Sink, SinkRef, Slot, Target};
use crate::resp::reply;
use crate::session::Cx;
use crate::session::pinned::Blocked;
use crate::session::pubsub::Subs;
use crate::shard::{SILENT, SubscriptionsMoved, is_redirect};

const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";

/// The redirected requests of one session's dedicated connections, for the session to send
/// again.
#[derive(Default)]
pub struct Follows(RefCell<Vec<Follow>>);

/// A request a node redirected.
pub struct Follow {
    /// The redirect.
    reply: Bytes,
    /// The node that answered it.
    from: SocketAddr,
    /// MOVED and ASK redirects so far, and whether it went behind `ASKING`.
    hops: u8,
    asking: bool,
    deadline: Instant,
    /// Where it goes, once a wait or a host name look-up decided.
    to: Option<(SocketAddr, bool)>,
    again: Again,
}

/// Which connections a followed request goes on.
#[derive(Clone)]
pub enum Via {
    /// A dedicated one, held by the session (a blocking command).
    Blocking,
    /// The user's mirror connections (a script of a user with restrictions).
    Mirror(std::sync::Arc<crate::auth::User>),
}

impl Follow {
    /// Whether its redirect names another node (MOVED, ASK), as opposed to a wait on the
    /// same one (TRYAGAIN, CLUSTERDOWN).
    fn moves(&self) -> bool {
        self.reply.starts_with(b"-MOVED ") || self.reply.starts_with(b"-ASK ")
    }
}

enum Again {
    /// A request: its bytes, its reply's place in the queue, and its connections.
    Request { raw: Bytes, seq: u64, via: Via },
    /// A transaction.
    Exec(Rc<TxRun>),
    /// A (un)subscribe of sharded channels: its bytes, and the reply slot of its
    /// confirmations ([`SILENT`]: one slotgate made on its own).
    Subscribe { raw: Bytes, seq: u64 },
    /// A sharded channel its node dropped (the slot went elsewhere): the node's
    /// `sunsubscribe` message.
    Dropped { frame: Bytes },
}

impl Again {
    /// It is not sent again: `reply` is its answer (`queue` is its session's).
    fn answer(self, queue: &ReplyQueue, reply: Bytes) {
        match self {
            Again::Request { seq, .. } | Again::Subscribe { seq, .. } => {
                queue.deliver(seq, 0, reply)
            }
            Again::Exec(run) => queue.deliver(run.seq, 0, reply),
            Again::Dropped { .. } => {}
        }
    }
}

impl Follows {
    /// Forgets what is waiting (the session ends).
    pub fn clear(&self) {
        let list = std::mem::take(&mut *self.0.borrow_mut());
        drop(list);
    }

    fn push(&self, f: Follow, queue: &ReplyQueue) {
        if queue.is_closed() {
            // (Its session is gone: nothing is sent again, and nothing is kept.)
            return;
        }
        self.0.borrow_mut().push(f);
        queue.flag(Attention::FOLLOW);
    }
}

/// A followed request's reply on its way to the client; a redirect stops here.
struct FollowedReply {
    queue: Rc<ReplyQueue>,
    seq: u64,
    raw: Bytes,
    via: Via,
    follows: Rc<Follows>,
    from: SocketAddr,
    hops: u8,
    asking: bool,
    /// Until when it is sent again (a TRYAGAIN is tried again until then): a script's
    /// deadline; `None` for a blocking command, which has none: `op_timeout` after the
    /// redirect.
    follow_until: Option<Instant>,
    op_timeout: Duration,
}

impl Sink for FollowedReply {
    fn deliver(self: Rc<Self>, _idx: u32, reply: Bytes) {
        if !is_redirect(&reply) {
            return self.queue.deliver(self.seq, 0, reply);
        }
        let f = Follow {
            reply,
            from: self.from,
            hops: self.hops,
            asking: self.asking,
            deadline: self
                .follow_until
                .unwrap_or_else(|| Instant::now() + self.op_timeout),
            to: None,
            again: Again::Request {
                raw: self.raw.clone(),
                seq: self.seq,
                via: self.via.clone(),
            },
        };
        self.follows.push(f, &self.queue);
    }

    fn release(&self, _idx: u32) {
        // (Dropped undelivered: the client is not left waiting.)
        let err = reply::outcome_unknown(&self.from.to_string(), "its connection was dropped");
        self.queue.deliver(self.seq, 0, err);
    }
}

/// A transaction sent as MULTI, its commands and EXEC (see the module docs).
pub struct TxRun {
    queue: Rc<ReplyQueue>,
    /// EXEC's reply slot.
    seq: u64,
    /// MULTI, the queued commands, then EXEC.
    parts: Vec<Bytes>,
    /// The queued commands' names (INFO counts the errors in EXEC's reply against them).
    queued: Vec<&'static str>,
    /// Watches hold on its connection: a redirect answers a null array.
    watched: bool,
    proto: reply::Proto,
    follows: Rc<Follows>,
    deadline: Instant,
    run: RefCell<Run>,
}

/// One sending of a transaction.
#[derive(Default)]
struct Run {
    /// The node it went to, the redirects so far, and whether it went behind `ASKING`.
    to: Option<SocketAddr>,
    hops: u8,
    asking: bool,
    /// The first redirect its MULTI or commands got.
    redirect: Option<Bytes>,
}

impl Sink for TxRun {
    fn deliver(self: Rc<Self>, idx: u32, reply: Bytes) {
        let last = idx as usize + 1 == self.parts.len();
        let mut run = self.run.borrow_mut();
        if !last {
            if run.redirect.is_none() && is_redirect(&reply) {
                run.redirect = Some(reply);
            }
            return;
        }
        let redirect = match run.redirect.take() {
            // Nothing ran: EXEC says EXECABORT (or is redirected itself).
            Some(r) if reply.first() == Some(&b'-') => r,
            None if is_redirect(&reply) => reply,
            _ => {
                drop(run);
                count_exec_errors(&reply, &self.queued);
                return self.queue.deliver(self.seq, 0, reply);
            }
        };
        if self.watched {
            drop(run);
            if redirect.starts_with(b"-CLUSTERDOWN") {
                // (Not a moved slot: the cluster's answer.)
                return self.queue.deliver(self.seq, 0, redirect);
            }
            let null = reply::null_array(self.proto);
            return self.queue.deliver(self.seq, 0, Bytes::from_static(null));
        }
        let f = Follow {
            reply: redirect,
            from: run
                .to
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            hops: run.hops,
            asking: run.asking,
            deadline: self.deadline,
            to: None,
            again: Again::Exec(self.clone()),
        };
        drop(run);
        self.follows.push(f, &self.queue);
    }

    fn release(&self, idx: u32) {
        if idx as usize + 1 == self.parts.len() {
            // (Dropped undelivered: the client is not left waiting.)
            let to = self
                .run
                .borrow()
                .to
                .map(|a| a.to_string())
                .unwrap_or_default();
            let err = reply::outcome_unknown(&to, "its connection was dropped");
            self.queue.deliver(self.seq, 0, err);
        }
    }
}

/// A session's subscriber connections tell it here about sharded channels whose slot moved.
struct SubMoved {
    follows: Rc<Follows>,
    queue: Rc<ReplyQueue>,
}

/// How long slotgate tries to subscribe a sharded channel its node dropped again, while
/// its layout still names that node (it reads the layout again meanwhile).
const RESUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

impl SubscriptionsMoved for SubMoved {
    fn redirected(&self, seq: u64, raw: Bytes, reply: Bytes, from: SocketAddr, hops: u8) {
        let f = Follow {
            reply,
            from,
            hops,
            asking: false,
            deadline: Instant::now() + RESUBSCRIBE_WITHIN,
            to: None,
            again: Again::Subscribe { raw, seq },
        };
        self.follows.push(f, &self.queue);
    }

    fn dropped(&self, frame: Bytes, from: SocketAddr) {
        let f = Follow {
            reply: Bytes::new(),
            from,
            hops: 0,
            asking: false,
            deadline: Instant::now() + RESUBSCRIBE_WITHIN,
            to: None,
            again: Again::Dropped { frame },
        };
        self.follows.push(f, &self.queue);
    }
}

use crate::resp::scan::bulk_strings as elements;

/// Whether a command is SSUBSCRIBE.
fn command_is_ssubscribe(raw: &[u8]) -> bool {
    elements(raw)
        .first()
        .is_some_and(|n| n.eq_ignore_ascii_case(b"ssubscribe"))
}

/// Counts the errors in EXEC's reply against the commands that were `queued` (INFO
/// commandstats and errorstats), as Redis does.
pub fn count_exec_errors(reply: &Bytes, queued: &[&'static str]) {
    if reply.first() == Some(&b'*') {
        let elements = crate::resp::scan::array_elements(reply).unwrap_or_default();
        for (i, &(a, b)) in elements.iter().enumerate() {
            if reply.get(a) == Some(&b'-') {
                crate::metrics::note_error(queued.get(i).copied(), &reply[a..b], false);
            }
        }
    }
}

/// Blocking commands wait as long as the client asked: this is "no deadline".
pub const FOREVER: Duration = Duration::from_secs(86_400 * 365);

/// What a subscriber connection tells a session about moved sharded channels.
pub(crate) fn subscriptions_moved(
    follows: &Rc<Follows>,
    queue: &Rc<ReplyQueue>,
) -> Rc<dyn SubscriptionsMoved> {
    Rc::new(SubMoved {
        follows: follows.clone(),
        queue: queue.clone(),
    })
}

/// Cluster mode: a request on `up` whose redirects the session follows (a blocking command
/// on its dedicated connection, a restricted user's script on a mirror one); its reply
/// fills the next slot of the queue.
pub(crate) fn send_followed(
    cx: &Cx<'_>,
    follows: &Rc<Follows>,
    up: &crate::shard::Upstream,
    via: Via,
    raw: &[u8],
    deadline: Instant,
) {
    let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
    let follow_until = matches!(via, Via::Mirror(_)).then_some(deadline);
    let sink = Rc::new(FollowedReply {
        queue: cx.queue.clone(),
        seq,
        raw: Bytes::copy_from_slice(raw),
        via,
        follows: follows.clone(),
        from: up.addr,
        hops: 0,
        asking: false,
        follow_until,
        op_timeout: cx.w.shared.settings.op_timeout,
    });
    up.send_until(raw, Target::Sink(SinkRef::new(sink, 0)), deadline);
}

/// The context of following a session's redirects: its [`Cx`], its redirect mailbox, its
/// subscriptions (sharded channels move with their slot) and its blocking command's
/// connection (which moves with the command). The session updates its output class after.
pub(crate) struct FollowCx<'s> {
    pub(crate) cx: Cx<'s>,
    pub(crate) follows: &'s Rc<Follows>,
    pub(crate) subs: &'s mut Subs,
    pub(crate) blocked: &'s mut Option<Blocked>,
}

impl FollowCx<'_> {
    /// Sends the redirected requests of the session's dedicated connections where they go.
    #[cold]
    pub(crate) fn follow_redirects(&mut self) {
        let list = std::mem::take(&mut *self.follows.0.borrow_mut());
        for f in list {
            self.follow(f);
        }
    }

    fn follow(&mut self, f: Follow) {
        if let Again::Dropped { .. } = f.again {
            return self.resubscribe(f);
        }
        if matches!(f.again, Again::Subscribe { .. }) && !f.moves() {
            return self.subscribe_refused(f);
        }
        let Some((f, to, asking, hops)) = self.next_stop(f) else {
            return;
        };
        let Some(shard) = self.cx.w.pools().shard_index(to) else {
            // A node slotgate has no connection to yet: the next layout has it.
            if hops < cluster::MAX_HOPS && Instant::now() < f.deadline {
                self.cx.w.shared.cluster_changed.notify_one();
                let f = Follow {
                    to: Some((to, asking)),
                    hops: hops + 1,
                    ..f
                };
                return self.follow_later(f, cluster::NEW_NODE_WAIT);
            }
            return f.again.answer(
                self.cx.queue,
                reply::too_many_redirects(&format!(
                    "to {to}, a node slotgate has no connection to"
                )),
            );
        };
        let conn = match &f.again {
            Again::Request {
                via: Via::Blocking, ..
            }
            | Again::Exec(_) => match self.cx.w.dedicated().take(self.cx.proto, shard) {
                Ok(c) => Some(c),
                Err(e) => return f.again.answer(self.cx.queue, e),
            },
            _ => None,
        };
        let moves = f.moves();
        match (f.again, conn) {
            (Again::Request { raw, seq, via }, conn) => {
                let up = match (&via, &conn) {
                    (_, Some(conn)) => conn.up.clone(),
                    (Via::Mirror(user), None) => self.cx.w.pools().as_user(
                        user,
                        crate::command::refused_in_scripts(),
                        self.cx.proto,
                        shard,
                    ),
                    (Via::Blocking, None) => return,
                };
                // (A blocking command waits as long as the client asked, at any node.)
                let blocking = matches!(via, Via::Blocking);
                let wait_until = if blocking {
                    Instant::now() + FOREVER
                } else {
                    f.deadline
                };
                if asking {
                    up.send_until(ASKING, Target::Discard, wait_until);
                }
                let sink = Rc::new(FollowedReply {
                    queue: self.cx.queue.clone(),
                    seq,
                    raw: raw.clone(),
                    via,
                    follows: self.follows.clone(),
                    from: to,
                    hops,
                    asking,
                    // A blocking command sent on after a MOVED or ASK may block for long, and
                    // its next redirect gets `op_timeout` again; one tried again after a
                    // TRYAGAIN or CLUSTERDOWN keeps this one's.
                    follow_until: (!blocking || !moves).then_some(f.deadline),
                    op_timeout: self.cx.w.shared.settings.op_timeout,
                });
                up.send_until(&raw, Target::Sink(SinkRef::new(sink, 0)), wait_until);
                if let Some(conn) = conn {
                    match self.blocked {
                        Some(b) => b.moved_to(conn),
                        // (The client went on: the connection closes, and the command with
                        // it.)
                        None => drop(conn),
                    }
                }
            }
            (Again::Exec(run), Some(conn)) => {
                send_run(&run, &conn.up, hops, asking);
                // EXEC leaves the connection clean (the transaction ran, aborted or was
                // discarded).
                conn.release();
            }
            (Again::Subscribe { raw, seq }, _) => self.subscribe_at(shard, &raw, seq, hops),
            _ => {}
        }
    }

    /// A sharded (un)subscribe its node refused (`-CLUSTERDOWN` …) rather than redirected.
    fn subscribe_refused(&mut self, f: Follow) {
        let Again::Subscribe { raw, seq } = &f.again else {
            return;
        };
        // The command's answer, and nothing is subscribed. (One slotgate made on its own: the
        // client learns that the channel is gone.)
        let channels = self.forget_channels(raw).unwrap_or_default();
        if *seq == SILENT {
            for c in &channels {
                let gone =
                    crate::session::pubsub::message(self.cx.proto, b"sunsubscribe", Some(c), 0);
                self.cx.queue.push_oob(gone);
            }
        }
        let reply = f.reply.clone();
        f.again.answer(self.cx.queue, reply);
    }

    /// Where a redirected request goes next: the node, whether behind ASKING, and the hops so
    /// far; `None` when it is answered, or goes on later (a wait, a host name to look up).
    fn next_stop(&mut self, f: Follow) -> Option<(Follow, SocketAddr, bool, u8)> {
        let (to, asking, hops) = match f.to {
            Some((to, asking)) => (to, asking, f.hops),
            None => {
                match cluster::next_hop(self.cx.w, &f.reply, f.from, f.hops, f.asking, f.deadline) {
                    Hop::Answer(reply) => {
                        if let Again::Subscribe { raw, .. } = &f.again {
                            // (Not subscribed anywhere.)
                            self.forget_channels(raw);
                        }
                        f.again.answer(self.cx.queue, reply);
                        return None;
                    }
                    Hop::Again {
                        to,
                        asking,
                        wait,
                        counted,
                    } => {
                        let hops = f.hops + u8::from(counted);
                        if !wait.is_zero() {
                            let f = Follow {
                                to: Some((to, asking)),
                                hops,
                                ..f
                            };
                            self.follow_later(f, wait);
                            return None;
                        }
                        (to, asking, hops)
                    }
                    Hop::Lookup { host, asking } => {
                        let (w, follows, queue) = (
                            self.cx.w.clone(),
                            self.follows.clone(),
                            self.cx.queue.clone(),
                        );
                        tokio::task::spawn_local(async move {
                            match cluster::lookup(&w, &host).await {
                                Ok(to) => {
                                    let f = Follow {
                                        to: Some((to, asking)),
                                        hops: f.hops + 1,
                                        ..f
                                    };
                                    follows.push(f, &queue);
                                }
                                Err(reply) => f.again.answer(&queue, reply),
                            }
                        });
                        return None;
                    }
                }
            }
        };
        Some((f, to, asking, hops))
    }

    /// A (un)subscribe of sharded channels sent to `shard` after `hops` redirects: the
    /// channels it names are subscribed there from now on (or nowhere, for an unsubscribe).
    fn subscribe_at(&mut self, shard: usize, raw: &[u8], seq: u64, hops: u8) {
        let channels = self.forget_channels(raw);
        let Some(channels) = channels else {
            return;
        };
        let n = channels.len().max(1);
        if command_is_ssubscribe(raw) {
            self.subs.shard_set(shard).extend(channels);
        }
        let moved = self
            .cx
            .w
            .cluster
            .then(|| subscriptions_moved(self.follows, self.cx.queue));
        match self.subs.conn(&self.cx, &moved, shard) {
            Ok(conn) => conn.up.send_subscription_after(raw, seq, n, hops),
            Err(e) if seq != SILENT => self.cx.queue.deliver(seq, 0, e),
            Err(_) => {}
        }
    }

    /// The channels a redirected (un)subscribe names, no longer subscribed on any shard
    /// (`None` for a command without a name).
    fn forget_channels(&mut self, raw: &[u8]) -> Option<Vec<Bytes>> {
        let mut args = elements(raw);
        if args.is_empty() {
            return None;
        }
        let channels = args.split_off(1);
        for set in &mut self.subs.shard_channels {
            for c in &channels {
                set.remove(c);
            }
        }
        Some(channels)
    }

    /// A sharded channel its node dropped: subscribed again where its slot lives now, unless
    /// the client unsubscribed meanwhile. While slotgate's layout still names the node that
    /// dropped it, the layout is read again and this is tried again shortly; after
    /// [`RESUBSCRIBE_WITHIN`] the client gets the node's `sunsubscribe`, as from Redis.
    fn resubscribe(&mut self, f: Follow) {
        let Again::Dropped { frame } = &f.again else {
            return;
        };
        let Some(channel) = elements(frame).into_iter().nth(1) else {
            return;
        };
        let Some(old) = self
            .subs
            .shard_channels
            .iter()
            .position(|set| set.contains(&channel))
        else {
            // (Unsubscribed meanwhile.)
            return;
        };
        let shard = (self.cx.w.live())
            .slot_map
            .shard_of_slot(crate::router::slot(&channel));
        if self.cx.w.pools().addr(shard) == Some(f.from) || self.cx.w.pools().addr(shard).is_none()
        {
            if Instant::now() >= f.deadline {
                self.subs.shard_channels[old].remove(&channel);
                return self.cx.queue.push_oob(frame.clone());
            }
            self.cx.w.shared.cluster_changed.notify_one();
            return self.follow_later(f, cluster::NEW_NODE_WAIT);
        }
        let raw = crate::resp::request::command(&[b"SSUBSCRIBE", &channel]);
        self.subscribe_at(shard, &raw, SILENT, 0);
    }

    /// Follows `f` again after `wait`.
    fn follow_later(&mut self, f: Follow, wait: Duration) {
        let (follows, queue) = (self.follows.clone(), self.cx.queue.clone());
        tokio::task::spawn_local(async move {
            tokio::time::sleep(wait).await;
            follows.push(f, &queue);
        });
    }
}

/// Sends a transaction's parts on `up` (behind `ASKING` when `asking`).
fn send_run(run: &Rc<TxRun>, up: &crate::shard::Upstream, hops: u8, asking: bool) {
    *run.run.borrow_mut() = Run {
        to: Some(up.addr),
        hops,
        asking,
        redirect: None,
    };
    if asking {
        up.send_until(ASKING, Target::Discard, run.deadline);
    }
    for (i, part) in run.parts.iter().enumerate() {
        let sink: Rc<dyn Sink> = run.clone();
        up.send_until(
            part,
            Target::Sink(SinkRef::new(sink, i as u32)),
            run.deadline,
        );
    }
}

/// Cluster mode: a transaction's MULTI, commands and EXEC (`parts`) sent on `conn`; its
/// EXEC's reply fills the next slot of the queue, and its redirects come to `follows`.
pub(crate) fn send_tx(
    cx: &crate::session::Cx<'_>,
    follows: &Rc<Follows>,
    conn: &crate::shard::Dedicated,
    parts: Vec<Bytes>,
    queued: Vec<&'static str>,
    watched: bool,
    deadline: Instant,
) {
    let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
    let run = Rc::new(TxRun {
        queue: cx.queue.clone(),
        seq,
        parts,
        queued,
        watched,
        proto: cx.proto,
        follows: follows.clone(),
        deadline,
        run: RefCell::default(),
    });
    send_run(&run, &conn.up, 0, false);
}
