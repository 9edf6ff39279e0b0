//! `SLOTGATE.HOTKEYS` and `SLOTGATE.BIGKEYS`: the keys requested most and the largest
//! replies, merged over every worker (see `hotkeys`). A user whose key patterns do not cover
//! a key is not shown it.

use std::sync::Arc;

use crate::auth::User;
use crate::command::access;
use crate::hotkeys::{Merged, Query};
use crate::resp::reply::{self, Aggregate};
use crate::resp::request::Request;
use crate::session::Cx;

/// Merges the books over the query's span; `None` after replying with the options' error.
fn merged(cx: &Cx<'_>, req: &Request<'_>) -> Option<(Arc<Merged>, Query)> {
    match Query::parse((1..req.argc()).map(|i| req.arg(i))) {
        Ok(q) => {
            let m = cx.w.shared.hot_merged.merged(
                &cx.w.shared.hot_books,
                std::time::Instant::now(),
                q.span,
            );
            Some((m, q))
        }
        Err(e) => {
            cx.reply_static(reply::hotkeys_query(e));
            None
        }
    }
}

fn shown(user: Option<&Arc<User>>, key: &[u8]) -> bool {
    user.is_none_or(|u| u.may_access(key, access::READ))
}

/// `SLOTGATE.HOTKEYS [COUNT n] [WINDOW 10s|1m|5m]`: an array of maps (key, requests, rps,
/// reads, writes, shard), most requested first.
pub(super) fn hot(cx: &Cx<'_>, user: Option<&Arc<User>>, req: &Request<'_>) {
    let Some((m, q)) = merged(cx, req) else {
        return;
    };
    let keys: Vec<_> = m
        .keys
        .iter()
        .filter(|k| shown(user, &k.key))
        .take(q.count)
        .collect();
    let mut a = Aggregate::array(keys.len());
    for k in keys {
        let mut e = Aggregate::map(cx.proto, 6);
        e.bulk(b"key").bulk(&k.key);
        e.bulk(b"requests").integer(k.requests as i64);
        e.bulk(b"rps")
            .double(cx.proto, &format!("{:.1}", m.rate(k.requests)));
        e.bulk(b"reads").integer(k.reads as i64);
        e.bulk(b"writes").integer(k.writes as i64);
        e.bulk(b"shard").bulk(k.shard.to_string().as_bytes());
        a.raw(&e.finish());
    }
    cx.reply(a.finish());
}

/// `SLOTGATE.BIGKEYS [COUNT n] [WINDOW 10s|1m|5m]`: an array of maps (key, bytes, shard),
/// largest first.
pub(super) fn big(cx: &Cx<'_>, user: Option<&Arc<User>>, req: &Request<'_>) {
    let Some((m, q)) = merged(cx, req) else {
        return;
    };
    let big: Vec<_> = m
        .big
        .iter()
        .filter(|b| shown(user, &b.key))
        .take(q.count)
        .collect();
    let mut a = Aggregate::array(big.len());
    for b in big {
        let mut e = Aggregate::map(cx.proto, 3);
        e.bulk(b"key").bulk(&b.key);
        e.bulk(b"bytes").integer(b.size as i64);
        e.bulk(b"shard").bulk(b.shard.to_string().as_bytes());
        a.raw(&e.finish());
    }
    cx.reply(a.finish());
}
