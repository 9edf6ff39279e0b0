//! A session's client-side caching commands (CLIENT TRACKING, CLIENT CACHING) and its
//! mailbox of redirected invalidations; the tracking itself is `crate::tracking`'s.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::queue::Slot;
use crate::resp::Request;
use crate::resp::reply;
use crate::session::Cx;
use crate::session::login::Login;
use crate::session::pubsub::Subs;
use crate::tracking::{self, Client, Mail, Switch};

/// `CLIENT TRACKING ON|OFF …`. Turning it on waits (up to the op timeout) for this worker's
/// invalidation links to every shard, so that no write after the `+OK` goes unreported.
pub(crate) fn client_tracking(
    cx: &Cx<'_>,
    this: &mut Option<Rc<Client>>,
    login: &Login,
    req: &Request<'_>,
    now: Instant,
) {
    if this.as_ref().is_some_and(|t| !t.is_active()) {
        *this = None;
    }
    let current = this.as_ref().map(|t| t.mode.borrow().clone());
    let exists = |id: u64| {
        cx.w.shared
            .clients
            .lock()
            .is_ok_and(|c| c.contains_key(&id))
    };
    let mode = match tracking::parse(req, current.as_ref(), &exists) {
        Err(e) => return cx.reply(e),
        Ok(Switch::Off) => {
            if let Some(t) = this.take() {
                cx.w.tracker.remove(t.id);
            }
            return cx.reply_static(reply::OK);
        }
        Ok(Switch::On(mode)) => mode,
    };
    let target = match mode.redirect {
        0 => None,
        id => {
            let mail =
                cx.w.shared
                    .clients
                    .lock()
                    .ok()
                    .and_then(|c| c.get(&id).map(|info| Arc::downgrade(&info.mail)));
            match mail {
                Some(m) => Some(m),
                None => return cx.reply_static(reply::TRACKING_NO_TARGET),
            }
        }
    };
    let c = this
        .get_or_insert_with(|| Client::new(cx.id, cx.queue.clone(), cx.proto))
        .clone();
    c.set_mode(mode, target);
    sync_user(this, login);
    let tracker = cx.w.tracker.clone();
    tracker.add(&c);
    tracker.ensure_links(&cx.w.primaries());
    if let Some(answer) = links_answer(&tracker, &c) {
        return cx.reply(answer);
    }
    let seq = cx.queue.push_waiting(Slot::Waiting(cx.cmd));
    let queue = cx.queue.clone();
    let deadline = now + cx.w.shared.settings.op_timeout;
    tokio::task::spawn_local(async move {
        let answer = loop {
            let up = tracker.link_up.notified();
            if let Some(answer) = links_answer(&tracker, &c) {
                break answer;
            }
            if tokio::time::timeout_at(deadline, up).await.is_err() {
                // (A shard down: the client is flushed at each attempt to reach it, and
                // when it is back.)
                break Bytes::from_static(reply::OK);
            }
        };
        queue.deliver(seq, 0, answer);
    });
}

/// CLIENT TRACKING ON's answer once the links say: `+OK` when all are up, an error (and
/// tracking off again) when a shard refused its link; `None` while they are coming up.
fn links_answer(tracker: &tracking::Tracker, c: &Client) -> Option<Bytes> {
    if tracker.links_up() {
        return Some(Bytes::from_static(reply::OK));
    }
    let why = tracker.refused_link()?;
    tracker.remove(c.id);
    c.deactivate();
    Some(reply::tracking_unavailable(&why))
}

/// `CLIENT CACHING YES|NO`: whether the next command's reads are tracked (OPTIN/OPTOUT).
pub(crate) fn client_caching(this: Option<&Client>, req: &Request<'_>) -> &'static [u8] {
    let Some(t) = this.filter(|t| t.is_active()) else {
        return reply::CACHING_NOT_TRACKING;
    };
    let m = t.mode.borrow();
    let opt = req.arg(2);
    let allowed = if opt.eq_ignore_ascii_case(b"yes") {
        m.optin.then_some(()).ok_or(reply::CACHING_YES_NOT_OPTIN)
    } else if opt.eq_ignore_ascii_case(b"no") {
        m.optout.then_some(()).ok_or(reply::CACHING_NO_NOT_OPTOUT)
    } else {
        Err(reply::SYNTAX)
    };
    match allowed {
        Ok(()) => {
            t.cache_next();
            reply::OK
        }
        Err(e) => e,
    }
}

/// The tracking client is told only of keys its user may read (a user with restrictions).
pub(crate) fn sync_user(this: &Option<Rc<Client>>, login: &Login) {
    if let Some(t) = this {
        *t.user.borrow_mut() = login.user.clone().filter(|_| login.restricted);
    }
}

/// Writes what the mailbox holds: invalidations of the clients that redirect theirs here.
pub(crate) fn read_mail(cx: &Cx<'_>, mail: &Mail, subs: &Subs, login: &Login) {
    // (Any subscription will do, as in Redis: the messages name `__redis__:invalidate`.)
    let subscribed = subs.active();
    let user = login.user.as_deref().filter(|_| login.restricted);
    for f in tracking::delivered(mail.take(), cx.proto, subscribed, user) {
        cx.queue.push_oob_always(f);
    }
}
