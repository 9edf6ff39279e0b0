//! The proxy-wide controls a client can use on all of slotgate's clients: MONITOR, CLIENT
//! PAUSE / UNPAUSE (their state is the worker-shared [`Gate`](crate::gate::Gate)), and CLIENT UNBLOCK.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{AbortOnDrop, Cx};
use crate::command::{CommandSpec, flags};
use crate::gate::PauseMode;
use crate::queue::Slot;
use crate::resp::Request;
use crate::resp::reply;
use crate::resp::request::parse_i64;

/// Whether CLIENT PAUSE WRITE holds this command: a write, or one that may cause a write
/// (EVAL, EVALSHA, FCALL, PUBLISH, SPUBLISH, PFCOUNT), as Redis decides.
pub fn may_write(spec: &CommandSpec) -> bool {
    spec.has(flags::WRITE | flags::MAY_REPLICATE)
}

/// A session in MONITOR mode: its place in the gate's list, and the task moving lines into
/// its output. Dropping it (RESET, or the session's end) ends MONITOR mode.
pub struct Monitoring {
    shared: Arc<crate::worker::Shared>,
    id: u64,
    _forward: AbortOnDrop,
}

impl Monitoring {
    /// Joins the gate's monitors: every command's line goes into this client's output, out
    /// of band, as it passes through any worker. `kill` ends the client if it falls behind.
    pub(super) fn start(cx: &Cx<'_>, kill: Arc<tokio::sync::Notify>) -> Monitoring {
        let shared = cx.w.shared.clone();
        let feed = shared.gate.add_monitor(cx.id, kill);
        let queue = cx.queue.clone();
        let forward = tokio::task::spawn_local(async move {
            let (mut rx, backlog) = (feed.rx, feed.backlog);
            while let Some(line) = rx.recv().await {
                backlog.fetch_sub(line.len(), Ordering::Relaxed);
                queue.push_oob(line);
            }
        });
        Monitoring {
            shared,
            id: cx.id,
            _forward: AbortOnDrop(forward),
        }
    }
}

impl Drop for Monitoring {
    fn drop(&mut self) {
        self.shared.gate.remove_monitor(self.id);
    }
}

/// `CLIENT PAUSE timeout [WRITE|ALL]`: every client of slotgate (this one too) stops at
/// its next command that the pause covers, until the timeout or CLIENT UNPAUSE.
pub(super) fn client_pause(cx: &Cx<'_>, req: &Request<'_>) {
    if req.argc() > 4 {
        return cx.reply(reply::client_subcommand_arguments(req.arg(1)));
    }
    let mode = if req.argc() == 4 {
        let m = req.arg(3);
        if m.eq_ignore_ascii_case(b"write") {
            PauseMode::Write
        } else if m.eq_ignore_ascii_case(b"all") {
            PauseMode::All
        } else {
            return cx.reply_static(reply::PAUSE_MODE);
        }
    } else {
        PauseMode::All
    };
    let ms = match parse_i64(req.arg(2)) {
        Some(ms) if ms < 0 => return cx.reply_static(reply::TIMEOUT_NEGATIVE),
        Some(ms) => ms as u64,
        None => {
            return cx.reply_static(reply::TIMEOUT_NOT_INTEGER);
        }
    };
    let now = Instant::now();
    // (A timeout past what the clock can hold lasts until CLIENT UNPAUSE, in practice.)
    let until = now
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
    let shared = cx.w.shared.clone();
    shared.gate.pause(mode, until);
    tracing::info!(client = cx.id, ?mode, timeout_ms = ms, "CLIENT PAUSE");
    tokio::task::spawn_local(async move {
        tokio::time::sleep_until(until).await;
        shared.gate.expire();
    });
    cx.reply_static(reply::OK);
}

/// `CLIENT UNPAUSE`.
pub(super) fn client_unpause(cx: &Cx<'_>) {
    cx.w.shared.gate.unpause();
    cx.reply_static(reply::OK);
}

/// `CLIENT UNBLOCK id [TIMEOUT|ERROR]` for a client of slotgate blocked in BLPOP, XREAD
/// BLOCK, WAIT …: the shard its command waits on is asked, on the control connection, to
/// unblock that command's dedicated connection. The blocked client then gets the shard's
/// answer (a timeout's null, or `-UNBLOCKED …`); this one gets `:1`, or `:0` when the
/// client is not blocked.
pub(super) fn client_unblock(cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
    if req.argc() > 4 {
        return cx.reply(reply::client_subcommand_arguments(req.arg(1)));
    }
    let Some(id) = parse_i64(req.arg(2)) else {
        return cx.reply_static(reply::NOT_INTEGER);
    };
    let reason: &[u8] = match req.argc() {
        4 if req.arg(3).eq_ignore_ascii_case(b"timeout") => b"TIMEOUT",
        4 if req.arg(3).eq_ignore_ascii_case(b"error") => b"ERROR",
        4 => {
            return cx.reply_static(reply::UNBLOCK_REASON);
        }
        _ => b"TIMEOUT",
    };
    let on = u64::try_from(id).ok().and_then(|id| {
        let clients = cx.w.shared.clients.lock().ok()?;
        let on = clients.get(&id)?.blocked_on.lock().ok()?.clone()?;
        Some((on.0, on.1.load(Ordering::Relaxed)))
    });
    let target = on.and_then(|(addr, shard_id)| {
        let shard = cx.w.pools().shard_index(addr)?;
        (shard_id > 0).then_some((shard, shard_id))
    });
    let Some((shard, shard_id)) = target else {
        return cx.reply(reply::integer(0));
    };
    let raw = crate::resp::request::command(&[
        b"CLIENT",
        b"UNBLOCK",
        shard_id.to_string().as_bytes(),
        reason,
    ]);
    let up = cx.w.pools().control(shard);
    let deadline = now + crate::shard::CONTROL_TIMEOUT;
    cx.send_until(Slot::Waiting(cx.cmd), &up, &raw, deadline);
}
