//! Pub/sub through the proxy.
//!
//! - **Classic channels and patterns** (SUBSCRIBE, PSUBSCRIBE, PUBLISH) all live on one
//!   designated shard, the first one. Every slotgate process publishes and subscribes there,
//!   so a message published through any slotgate connection reaches every subscriber
//!   connected through any slotgate exactly once.
//! - **Sharded channels** (SSUBSCRIBE, SPUBLISH) live on the shard that owns the channel's
//!   slot, as in Redis Cluster; the channels of one SSUBSCRIBE must share a slot.
//!
//! A subscribing client gets a dedicated subscriber connection per shard it subscribes on.
//! Everything the shard sends on it (confirmations, messages) is written to the client as it
//! arrives. In RESP2 a subscribed client may only use (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, PING,
//! QUIT and RESET, as with Redis; in RESP3 pushes interleave with ordinary replies. If a
//! subscriber connection is lost, the client is disconnected so that it resubscribes.

use std::collections::HashSet;
use std::rc::Rc;

use bytes::Bytes;

use crate::command::CommandSpec;
use crate::resp::Request;
use crate::resp::reply::{self, Aggregate, Proto};
use crate::session::Cx;
use crate::shard::Dedicated;
use crate::shard::SubscriptionsMoved;

/// A client's subscriptions and subscriber connections.
#[derive(Default)]
pub struct Subs {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    /// Per shard, the sharded channels subscribed there.
    pub(crate) shard_channels: Vec<HashSet<Bytes>>,
    /// Per shard, the subscriber connection (created on first use).
    conns: Vec<Option<Dedicated>>,
}

impl Subs {
    pub fn active(&self) -> bool {
        !(self.channels.is_empty()
            && self.patterns.is_empty()
            && self.shard_channels.iter().all(|s| s.is_empty()))
    }

    pub(crate) fn shard_set(&mut self, shard: usize) -> &mut HashSet<Bytes> {
        if self.shard_channels.len() <= shard {
            self.shard_channels.resize_with(shard + 1, HashSet::new);
        }
        &mut self.shard_channels[shard]
    }
}

/// The (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE commands: they change the subscriptions, which
/// live on the client's subscriber (dedicated) connections.
pub fn changes_subscriptions(name: &str) -> bool {
    matches!(
        name,
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe"
    )
}

/// The commands a RESP2 client may use while subscribed.
pub fn allowed_while_subscribed(name: &str) -> bool {
    changes_subscriptions(name) || matches!(name, "ping" | "quit" | "reset")
}

/// `[kind, channel|nil, count]` as a RESP2 array or a RESP3 push.
pub(crate) fn message(proto: Proto, kind: &[u8], channel: Option<&[u8]>, count: i64) -> Bytes {
    let mut a = match proto {
        Proto::Resp2 => Aggregate::array(3),
        Proto::Resp3 => Aggregate::push(3),
    };
    a.bulk(kind);
    match channel {
        Some(c) => a.bulk(c),
        None => a.raw(reply::null(proto)),
    };
    a.integer(count);
    a.finish()
}

impl Subs {
    /// The subscriber connection to `shard`, opened on first use (in cluster mode it tells
    /// `moved` of the channels its node gives away).
    pub(crate) fn conn(
        &mut self,
        cx: &Cx<'_>,
        moved: &Option<Rc<dyn SubscriptionsMoved>>,
        shard: usize,
    ) -> Result<&Dedicated, Bytes> {
        if self.conns.len() <= shard {
            self.conns.resize_with(shard + 1, || None);
        }
        if self.conns[shard].is_none() {
            let conn = cx.w.dedicated().take(cx.proto, shard)?;
            conn.up.set_sink(cx.queue.clone(), moved.clone());
            self.conns[shard] = Some(conn);
        }
        Ok(self.conns[shard].as_ref().expect("opened above"))
    }

    /// Sends a subscription command on the subscriber connection to `shard`; its `frames`
    /// confirmations become this command's reply, in order with the client's other replies.
    fn send(
        &mut self,
        cx: &Cx<'_>,
        moved: &Option<Rc<dyn SubscriptionsMoved>>,
        shard: usize,
        raw: &[u8],
        frames: usize,
    ) -> Result<(), Bytes> {
        let conn = self.conn(cx, moved, shard)?;
        let seq = cx.queue.push_waiting(crate::queue::Slot::Waiting(cx.cmd));
        conn.up.send_subscription(raw, seq, frames.max(1));
        Ok(())
    }

    /// Subscriber connections that failed before their subscriptions began (their
    /// (un)subscribes were answered with the error): what was subscribed on them is
    /// forgotten, and the client is no longer subscribed there.
    #[cold]
    pub(crate) fn drop_failed(&mut self) {
        for shard in 0..self.conns.len() {
            if self.conns[shard].as_ref().is_some_and(|c| !c.up.usable()) {
                self.conns[shard] = None;
                if shard == 0 {
                    self.channels.clear();
                    self.patterns.clear();
                }
                if let Some(set) = self.shard_channels.get_mut(shard) {
                    set.clear();
                }
            }
        }
    }

    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE. `slot` is the slot of a sharded command's
    /// channels (`Err`: they do not share one).
    pub(crate) fn change(
        &mut self,
        cx: &Cx<'_>,
        moved: &Option<Rc<dyn SubscriptionsMoved>>,
        spec: &CommandSpec,
        req: &Request<'_>,
        slot: Result<Option<u16>, ()>,
    ) {
        let args: Vec<Bytes> = (1..req.argc()).map(|i| req.arg_copy(i)).collect();
        // The shard of a sharded command's channels.
        let shard = || match slot {
            Ok(Some(s)) => Ok(cx.w.live().slot_map.shard_of_slot(s)),
            Ok(None) => Err(reply::wrong_arity(spec.name)),
            Err(()) => Err(Bytes::from_static(reply::CROSSSLOT)),
        };
        match spec.name {
            "subscribe" | "psubscribe" => {
                if let Err(e) = self.send(cx, moved, 0, req.raw, args.len()) {
                    return cx.reply(e);
                }
                let set = if spec.name == "subscribe" {
                    &mut self.channels
                } else {
                    &mut self.patterns
                };
                set.extend(args);
            }
            "ssubscribe" => {
                let shard = match shard() {
                    Ok(s) => s,
                    Err(e) => return cx.reply(e),
                };
                if let Err(e) = self.send(cx, moved, shard, req.raw, args.len()) {
                    return cx.reply(e);
                }
                self.shard_set(shard).extend(args);
            }
            "unsubscribe" | "punsubscribe" => {
                let kind = spec.name.as_bytes();
                let has_conn = self.conns.first().is_some_and(|c| c.is_some());
                let set = if spec.name == "unsubscribe" {
                    &mut self.channels
                } else {
                    &mut self.patterns
                };
                // Redis confirms each named channel, or each subscribed one for "all".
                let frames = if args.is_empty() {
                    set.len()
                } else {
                    args.len()
                };
                if args.is_empty() {
                    set.clear();
                } else {
                    for a in &args {
                        set.remove(a);
                    }
                }
                if has_conn {
                    let _ = self.send(cx, moved, 0, req.raw, frames);
                } else {
                    unsubscribe_locally(cx, kind, &args);
                }
            }
            "sunsubscribe" => {
                if args.is_empty() {
                    // Every shard where sharded channels are subscribed confirms each one.
                    let shards: Vec<(usize, usize)> = (0..self.shard_channels.len())
                        .map(|s| (s, self.shard_channels[s].len()))
                        .filter(|&(_, n)| n > 0)
                        .collect();
                    self.shard_channels.clear();
                    if shards.is_empty() {
                        return unsubscribe_locally(cx, b"sunsubscribe", &args);
                    }
                    for (s, n) in shards {
                        let _ = self.send(cx, moved, s, req.raw, n);
                    }
                    return;
                }
                let shard = match shard() {
                    Ok(s) => s,
                    Err(e) => return cx.reply(e),
                };
                for a in &args {
                    self.shard_set(shard).remove(a);
                }
                if self.conns.get(shard).is_some_and(|c| c.is_some()) {
                    let _ = self.send(cx, moved, shard, req.raw, args.len());
                } else {
                    unsubscribe_locally(cx, b"sunsubscribe", &args);
                }
            }
            _ => cx.reply(reply::not_yet(spec.name)),
        }
    }
}

/// Unsubscribing with no subscriber connection: Redis's replies, answered here.
fn unsubscribe_locally(cx: &Cx<'_>, kind: &[u8], args: &[Bytes]) {
    if args.is_empty() {
        return cx.reply(message(cx.proto, kind, None, 0));
    }
    for a in args {
        cx.reply(message(cx.proto, kind, Some(a), 0));
    }
}

/// PING while subscribed in RESP2: `["pong", message]`, as Redis answers.
pub(crate) fn subscribed_ping(cx: &Cx<'_>, req: &Request<'_>) {
    let mut a = Aggregate::array(2);
    a.bulk(b"pong");
    a.bulk(if req.argc() > 1 { req.arg(1) } else { b"" });
    cx.reply(a.finish());
}

/// PUBSUB SHARDNUMSUB over all shards: each answers `[ch, n, ch, n …]` for the same
/// channels; the counts are added up.
pub(super) fn sum_pair_counts(parts: &[Bytes]) -> Bytes {
    if let Some(e) = parts.iter().find(|p| p.first() == Some(&b'-')) {
        return e.clone();
    }
    let Some(first) = parts.first() else {
        return Bytes::from_static(b"*0\r\n");
    };
    let Some(base) = crate::resp::scan::array_elements(first) else {
        return first.clone();
    };
    let mut counts = vec![0i64; base.len() / 2];
    for p in parts {
        let Some(el) = crate::resp::scan::array_elements(p) else {
            continue;
        };
        for (i, c) in counts.iter_mut().enumerate() {
            if let Some(&(s, e)) = el.get(2 * i + 1) {
                // (Saturating: a hostile shard's counts must not overflow.)
                *c = c.saturating_add(crate::resp::scan::reply_integer(&p[s..e]).unwrap_or(0));
            }
        }
    }
    let mut a = Aggregate::array(base.len());
    for (i, c) in counts.iter().enumerate() {
        let (s, e) = base[2 * i];
        a.raw(&first[s..e]).integer(*c);
    }
    a.finish()
}
