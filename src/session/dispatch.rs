//! Dispatch: each command looked up, checked (arity, authentication, permissions, CLIENT
//! PAUSE, MONITOR, MULTI, subscribed mode) and handed to its route class's handler with the
//! narrow context that handler needs: a [`Cx`] or [`Fwd`](super::cx::Fwd) and the state it
//! owns (`Pinned`, `Subs`, `Login` …). This file and `mod.rs` (the session's life) are the
//! only places that see the whole `Session`, with `state.rs` for the commands that change
//! the connection itself (HELLO, AUTH, RESET, CLIENT SETNAME …).

use std::rc::Rc;

use bytes::Bytes;
use tokio::time::Instant;

use super::follow::{self, FOREVER, FollowCx, Follows};
use super::pinned::{Blocked, TxCx, send_dedicated, take_dedicated};
use super::{Lane, Session, all_shards, readthrough, scatter, single};
use crate::command::policy::{PubSubRoute, has_block_option};
use crate::command::{self, CommandSpec, Route, flags, keys};
use crate::fanout::GatherKind;
use crate::gate::Gate;
use crate::queue::{Slot, Target};
use crate::resp::Request;
use crate::resp::reply::{self, Proto};

impl Session {
    /// Looks the command up, checks arity and routes it.
    pub(super) fn dispatch(&mut self, req: &Request<'_>, now: Instant) {
        let spec = match self.check(req) {
            Ok(spec) => spec,
            Err(e) => {
                // A queuing error inside MULTI makes EXEC fail, as in Redis.
                self.pinned.flag_tx();
                crate::metrics::note_error(self.cmd.map(|c| c.name), &e, true);
                return self.queue.push_ready(e);
            }
        };
        // CLIENT PAUSE and MONITOR: one load while neither is in use.
        let gate = self.w.shared.gate.bits();
        if gate != 0 && self.gated(spec, req) {
            return;
        }
        // Switching between shared and dedicated connections waits for what is in flight, and
        // so does anything after a blocking command (the connection is "blocked", as in Redis).
        let dedicated = if self.login.restricted && self.pinned.tx.is_none() && spec.runs_script() {
            Lane::Mirror
        } else if self.pinned.wants_dedicated(spec, req) {
            Lane::Dedicated
        } else {
            Lane::Shared
        };
        // RESET closes dedicated connections: their replies in flight must arrive first.
        let resets_pinned = command::policy::resets_connection(spec.name)
            && (self.pinned.tx.is_some() || self.pinned.watch.is_some() || self.subscribed());
        if dedicated != self.on_dedicated
            || self.blocked.is_some()
            || resets_pinned
            || self.pinned.exec_waits(self.w.cluster, spec)
        {
            if self.queue.waiting() > 0 {
                self.deferred = Some(crate::session::pinned::Deferred::from(req));
                return;
            }
            self.on_dedicated = dedicated;
        }
        self.w.metrics.command(spec.name);
        if self.w.hot.tick() {
            // (Inside MULTI the reply is +QUEUED: no size to learn.)
            let probe = self.pinned.tx.is_none();
            self.w.sample(spec, req, &self.queue, now.into_std(), probe);
        }
        if gate & crate::gate::Gate::MONITOR != 0 {
            self.feed_monitors(spec, req);
        }
        self.dispatched += 1;
        if self.dispatched.is_multiple_of(crate::metrics::SAMPLE_EVERY) {
            let seq = self.queue.next_seq();
            self.sampled
                .push_back((seq, std::time::Instant::now(), spec));
        }
        if spec.may_write_keys() && self.w.has_rules.get() {
            readthrough::note_writes(&mut fwd!(self), spec, req);
        }
        if let Some(t) = &self.tracking {
            if t.is_active() {
                let in_multi = self.pinned.tx.is_some();
                self.w.tracker.command(t, spec, req, in_multi);
            } else {
                self.tracking = None;
            }
        }
        if self.pinned.tx.is_some()
            && spec.route != Route::Transaction
            && !command::policy::ends_connection_state(spec.name)
        {
            if self.login.restricted && spec.runs_script() {
                self.pinned.flag_tx();
                return self.reply_static(reply::NOPERM_SCRIPT_IN_MULTI);
            }
            return self.tx_queue(spec, req, now);
        }
        if self.proto == Proto::Resp2 && self.subscribed() {
            if !crate::session::pubsub::allowed_while_subscribed(spec.name) {
                // Refused before running, as Redis counts it: a rejected call.
                self.w.metrics.uncount(spec.name);
                let e = reply::not_while_subscribed(spec.name);
                crate::metrics::note_error(Some(spec.name), &e, true);
                return self.queue.push_ready(e);
            }
            if command::policy::is_ping(spec.name) {
                return crate::session::pubsub::subscribed_ping(&cx!(self), req);
            }
        }
        if dedicated == Lane::Mirror {
            return self.script_as_user(spec, req, now);
        }
        match spec.route {
            Route::PubSub => self.pubsub(spec, req, now),
            Route::Transaction => self.transaction(spec, req, now),
            Route::Blocking => self.blocking(spec, req, now),
            // XREAD/XREADGROUP … BLOCK: a blocking command.
            Route::Single if spec.has(flags::BLOCKING) && has_block_option(req) => {
                self.blocking(spec, req, now)
            }
            Route::Single => single::single(&mut fwd!(self), spec, req, now),
            Route::Local => self.local(spec, req, now),
            Route::AnyShard => fwd!(self).forward(0, req.raw, now),
            Route::Scatter(m) => scatter::scatter(&mut fwd!(self), spec, req, m, now),
            Route::AllShards(m) => all_shards::all_shards(&fwd!(self), spec, req, m, now),
            Route::Refused => self.reply(reply::not_allowed(spec.name)),
            Route::NotYet => self.reply(reply::not_yet(spec.name)),
        }
    }

    /// Looks the command up and checks arity, authentication and permissions: the command's
    /// row, or the error reply.
    fn check(&mut self, req: &Request<'_>) -> Result<&'static CommandSpec, Bytes> {
        let name = req.arg(0);
        let mut spec = match self.last_command {
            // Clients mostly repeat a few commands: one short comparison instead of a lookup.
            Some(last)
                if last.name.len() == name.len()
                    && last.name.as_bytes().eq_ignore_ascii_case(name) =>
            {
                last
            }
            _ => {
                let Some(spec) = command::lookup(name) else {
                    self.cmd = None;
                    let mut args = (1..req.argc()).map(|i| req.arg(i));
                    return Err(reply::unknown_command(name, &mut args));
                };
                self.last_command = Some(spec);
                spec
            }
        };
        // A container takes a subcommand, except where its own arity allows none (bare
        // `COMMAND`, which answers the whole table).
        if spec.is_container() && !(req.argc() == 1 && spec.arity_ok(1)) {
            if req.argc() < 2 {
                self.cmd = Some(spec);
                return Err(reply::wrong_arity(spec.name));
            }
            match command::lookup_sub(spec, req.arg(1)) {
                Some(sub) => spec = sub,
                None => {
                    // (No commandstats line, as in Redis; errorstats counts it.)
                    self.cmd = None;
                    return Err(reply::unknown_subcommand(spec.name, req.arg(1)));
                }
            }
        }
        self.cmd = Some(spec);
        if !spec.arity_ok(req.argc()) {
            return Err(reply::wrong_arity(spec.name));
        }
        if self.login.user.is_none() {
            // Before AUTH, nothing reaches a shard (Redis's NOAUTH rule).
            if !command::policy::allowed_before_auth(spec.name) {
                return Err(Bytes::from_static(reply::NOAUTH));
            }
        } else if self.login.restricted {
            self.permitted(spec, req)?;
        }
        Ok(spec)
    }

    /// The user's command and key permissions for this command: `Err` is the NOPERM reply.
    /// Every key is checked, including each key of a scatter command.
    fn permitted(&mut self, spec: &CommandSpec, req: &Request<'_>) -> Result<(), Bytes> {
        let Some(user) = self.login.user.clone() else {
            return Ok(());
        };
        if !user.may_run(spec) {
            return Err(reply::noperm_command(spec.name));
        }
        if let Some(decided) = crate::auth::special_permission(&user, spec.name, req) {
            return decided.map_err(Bytes::from_static);
        }
        self.access.clear();
        if keys::key_access(spec, req.argc(), |i| req.arg(i), &mut self.access).is_err() {
            // Key positions undeterminable: a restricted user gets no benefit of the doubt.
            return Err(Bytes::from_static(reply::NOPERM_KEYS));
        }
        if self
            .access
            .iter()
            .all(|&(i, need)| user.may_access(req.arg(i), need))
        {
            Ok(())
        } else {
            Err(Bytes::from_static(reply::NOPERM_KEYS))
        }
    }

    /// A script or function of a user with restrictions: to the shard of its keys, over a
    /// connection authenticated as the user's mirror ([`crate::shard::Mirror`]), so that it
    /// runs with the user's rights rather than slotgate's.
    fn script_as_user(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        let shard = match fwd!(self).slot_of(spec, req) {
            Ok(slot) => slot.map_or(0, |s| self.w.live().slot_map.shard_of_slot(s)),
            Err(()) => return self.reply_static(reply::CROSSSLOT),
        };
        let Some(user) = self.login.user.clone() else {
            return;
        };
        let up = self
            .w
            .pools()
            .as_user(&user, command::refused_in_scripts(), self.proto, shard);
        if self.w.cluster {
            let via = crate::session::follow::Via::Mirror(user);
            let follows = self.follows();
            let deadline = now + up.op_timeout();
            return follow::send_followed(&cx!(self), &follows, &up, via, req.raw, deadline);
        }
        let seq = self.queue.push_waiting(Slot::Waiting(self.cmd));
        up.send(
            req.raw,
            Target::Client {
                queue: self.queue.clone(),
                seq,
                part: 0,
            },
            now,
        );
    }

    /// While a pause or a monitor exists: holds a command that a CLIENT PAUSE covers (it is
    /// tried again when the pause ends; the client's later commands wait behind it, as in
    /// Redis), and refuses keyspace commands from a monitoring client. `true` when the
    /// command must not go on now.
    #[cold]
    #[inline(never)]
    pub(super) fn gated(&mut self, spec: &CommandSpec, req: &Request<'_>) -> bool {
        let gate = &self.w.shared.gate;
        // (A monitor is never paused, as Redis never pauses a replica: it can lift a pause.)
        if gate.bits() & Gate::PAUSE != 0 && self.monitor.is_none() {
            let writes = super::control::may_write(spec)
                || (command::policy::is_exec(spec.name)
                    && self.pinned.tx.as_ref().is_some_and(|t| t.writes));
            if gate.holds(writes) {
                self.deferred = Some(crate::session::pinned::Deferred::from(req));
                self.held = true;
                return true;
            }
        }
        if self.monitor.is_some() && spec.has(flags::READONLY | flags::WRITE | flags::MAY_REPLICATE)
        {
            self.reply_static(reply::MONITOR_KEYSPACE);
            return true;
        }
        false
    }

    /// Whether the command this session holds must go on waiting (a pause may be in force;
    /// `gated` decides when it is tried).
    pub(super) fn pause_holds(&self) -> bool {
        self.w.shared.gate.bits() & Gate::PAUSE != 0
    }

    /// Shows a command to the monitors, as Redis does: not the administrative ones (CONFIG,
    /// CLIENT LIST, MONITOR …), and AUTH's secrets redacted.
    #[cold]
    #[inline(never)]
    pub(super) fn feed_monitors(&self, spec: &CommandSpec, req: &Request<'_>) {
        if !spec.has(flags::ADMIN) {
            self.w.shared.gate.feed(&self.addr, req);
        }
    }

    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH (see [`Pinned::transaction`]).
    pub(crate) fn transaction(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        self.on_pinned(spec, req, now, false);
    }

    /// A command inside MULTI (see [`Pinned::tx_queue`]).
    pub(crate) fn tx_queue(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        self.on_pinned(spec, req, now, true);
    }

    /// Runs a transaction command (or, `queued`, a command inside MULTI) on the `Pinned`
    /// state, with its context: the slot of its keys and, in cluster mode, the redirect
    /// mailbox.
    fn on_pinned(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant, queued: bool) {
        let slot = fwd!(self).slot_of(spec, req);
        let follows = self.w.cluster.then(|| self.follows());
        let tc = TxCx {
            cx: cx!(self),
            slot,
            follows,
        };
        if queued {
            self.pinned.tx_queue(&tc, spec, req, now);
        } else {
            self.pinned.transaction(&tc, spec, req, now);
        }
    }

    /// A blocking command outside MULTI: its own dedicated connection, no op timeout.
    pub(crate) fn blocking(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        let slot = match fwd!(self).slot_of(spec, req) {
            Ok(s) => s,
            Err(()) => return self.reply_static(reply::CROSSSLOT),
        };
        let conn = match take_dedicated(&cx!(self), slot) {
            Ok(c) => c,
            Err(e) => return self.reply(e),
        };
        if self.w.cluster {
            let via = crate::session::follow::Via::Blocking;
            let follows = self.follows();
            follow::send_followed(&cx!(self), &follows, &conn.up, via, req.raw, now + FOREVER);
        } else {
            send_dedicated(&cx!(self), &conn, req.raw, now + FOREVER);
        }
        self.blocked = Some(Blocked::new(
            conn,
            &self.w.shared.blocked_clients,
            &self.blocked_on,
        ));
    }

    /// Pub/sub commands: subscriptions change on the client's subscriber connections (see
    /// [`Subs::change`]); classic channels' PUBLISH and PUBSUB live on the first shard.
    pub(crate) fn pubsub(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        match command::policy::pubsub_route(spec.name) {
            PubSubRoute::FirstShard => fwd!(self).forward(0, req.raw, now),
            PubSubRoute::EveryShardConcat => {
                fwd!(self).gather_from_every_shard(GatherKind::ConcatArrays, req.raw, now)
            }
            PubSubRoute::EveryShardSum => {
                let kind = GatherKind::Info(Box::new(super::pubsub::sum_pair_counts));
                fwd!(self).gather_from_every_shard(kind, req.raw, now)
            }
            PubSubRoute::Subscription { sharded } => {
                let slot = match sharded && req.argc() > 1 {
                    true => fwd!(self).slot_of(spec, req),
                    false => Ok(None),
                };
                let moved = (self.w.cluster)
                    .then(|| follow::subscriptions_moved(&self.follows(), &self.queue));
                let cx = cx!(self);
                self.subs.change(&cx, &moved, spec, req, slot);
            }
        }
        self.update_output_class();
    }

    /// Cluster mode: the session's mailbox of redirected requests (see `follow`).
    pub(crate) fn follows(&mut self) -> Rc<Follows> {
        self.follows.get_or_insert_with(Rc::default).clone()
    }

    /// Sends the redirected requests of this session's dedicated connections where they go.
    #[cold]
    pub(crate) fn follow_redirects(&mut self) {
        let Some(follows) = self.follows.clone() else {
            return;
        };
        FollowCx {
            cx: cx!(self),
            follows: &follows,
            subs: &mut self.subs,
            blocked: &mut self.blocked,
        }
        .follow_redirects();
        self.update_output_class();
    }
}
