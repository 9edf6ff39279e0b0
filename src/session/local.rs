//! Commands the proxy answers itself: the connection handshake (HELLO, AUTH, SELECT, CLIENT …),
//! PING/ECHO/TIME/QUIT/RESET, and INFO built from the proxy's state plus the shards' INFO.
//! Introspection that only a Redis can answer correctly (COMMAND …, CONFIG GET, `* HELP`) is
//! forwarded to the first shard, whose command set is the one clients talk to.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use crate::command::CommandSpec;
use crate::fanout::GatherKind;
use crate::resp::reply::{self, Aggregate, Proto};
use crate::resp::request::parse_i64;
use crate::resp::request::push_header;
use crate::resp::{Limits, Parsed, Request, RequestParser};
use crate::session::{Cx, ReplyMode, Session, control};
use crate::worker::{ClientInfo, Shared};

/// Reported by HELLO before any shard has told its version.
const FALLBACK_VERSION: &str = "7.0.0";

impl Session {
    pub(crate) fn local(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        match spec.name {
            "ping" => match req.argc() {
                1 => self.reply_static(reply::PONG),
                2 => self.reply(reply::bulk(req.arg(1))),
                _ => self.reply(reply::wrong_arity("ping")),
            },
            "echo" => self.reply(reply::bulk(req.arg(1))),
            "quit" => {
                self.reply_static(reply::OK);
                self.closing = true;
            }
            "reset" => {
                self.name = None;
                if self.monitor.take().is_some() {
                    self.update_output_class();
                }
                // Its transaction and watches go (their connections close, so the shard forgets them).
                self.pinned = Default::default();
                // Every subscription goes (the subscriber connections close).
                self.subs = crate::session::pubsub::Subs::default();
                self.update_output_class();
                // Tracking ends (as in Redis).
                if let Some(t) = self.tracking.take() {
                    self.w.tracker.remove(t.id);
                }
                // Back to the default user: authenticated only if it needs no password.
                self.login.reset(&self.w, &self.queue);
                self.switch_proto(Proto::Resp2);
                self.update_info();
                self.reply(Bytes::from_static(b"+RESET\r\n"));
            }
            "select" => match parse_i64(req.arg(1)) {
                Some(0) => self.reply_static(reply::OK),
                Some(_) => self.reply_static(reply::DB_OUT_OF_RANGE),
                None => self.reply_static(reply::NOT_INTEGER),
            },
            "auth" => {
                let cx = cx!(self);
                if let Some(verdict) = self.login.auth(&cx, req) {
                    self.after_login(verdict);
                }
            }
            "hello" => self.hello(req),
            "time" => {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let mut a = Aggregate::array(2);
                a.bulk(t.as_secs().to_string().as_bytes())
                    .bulk(t.subsec_micros().to_string().as_bytes());
                self.reply(a.finish());
            }
            "info" => info(&cx!(self), req, now),
            name if name.starts_with("client|") => self.client(name, req, now),
            "slotgate.invalidate" => self.invalidate(req, now),
            "slotgate.status" => self.cache_status(req, now),
            "slotgate.hotkeys" => super::hotkeys::hot(&cx!(self), self.login.user.as_ref(), req),
            "slotgate.bigkeys" => super::hotkeys::big(&cx!(self), self.login.user.as_ref(), req),
            "slotgate.reload" => reload_config(&cx!(self)),
            "monitor" => self.monitor(req),
            "acl|whoami" => self.reply(reply::bulk(self.user_name().as_bytes())),
            name if name == "cluster"
                || name.starts_with("cluster|")
                || matches!(name, "readonly" | "readwrite" | "asking") =>
            {
                match self.w.shared.settings.cluster_api.clone() {
                    Some(api) => self.cluster_api(&api, name, req, now),
                    None => self.reply_static(reply::CLUSTER_DISABLED),
                }
            }
            "config|get" => fwd!(self).gather(
                GatherKind::ConfigGet,
                &[(0, Bytes::copy_from_slice(req.raw))],
                now,
            ),
            // COMMAND …, and HELP texts: the shards' own answer.
            _ => fwd!(self).forward(0, req.raw, now),
        }
    }

    /// CLIENT subcommands the proxy answers.
    fn client(&mut self, name: &str, req: &Request<'_>, now: Instant) {
        match name {
            "client|id" => self.reply(reply::integer(self.id as i64)),
            "client|getname" => match &self.name {
                Some(n) => self.reply(reply::bulk(n.as_bytes())),
                None => self.reply_static(reply::null(self.proto)),
            },
            "client|setname" => {
                let name = req.arg(2);
                if !valid_client_name(name) {
                    return self.reply_static(reply::BAD_CLIENT_NAME);
                }
                self.name = (!name.is_empty()).then(|| String::from_utf8_lossy(name).into());
                self.update_info();
                self.reply_static(reply::OK);
            }
            "client|setinfo" => {
                let attr = req.arg(2);
                if !(attr.eq_ignore_ascii_case(b"lib-name")
                    || attr.eq_ignore_ascii_case(b"lib-ver"))
                {
                    return self.reply(reply::unrecognized_option(attr));
                }
                if !valid_client_name(req.arg(3)) {
                    return self.reply(reply::bad_client_info(attr));
                }
                self.reply_static(reply::OK)
            }
            "client|no-evict" | "client|no-touch" => {
                let v = req.arg(2);
                if v.eq_ignore_ascii_case(b"on") || v.eq_ignore_ascii_case(b"off") {
                    self.reply_static(reply::OK)
                } else {
                    self.reply_static(reply::SYNTAX)
                }
            }
            "client|info" => {
                let line = client_line(&self.info_entry(), "client|info");
                self.reply(reply::verbatim(self.proto, line.as_bytes()));
            }
            "client|list" => client_list(&cx!(self), req),
            "client|reply" => {
                let cx = cx!(self);
                client_reply(&cx, &mut self.reply_mode, req)
            }
            "client|kill" => self.closing |= client_kill(&cx!(self), req),
            "client|pause" => control::client_pause(&cx!(self), req),
            "client|unpause" => control::client_unpause(&cx!(self)),
            "client|unblock" => control::client_unblock(&cx!(self), req, now),
            "client|tracking" => {
                let cx = cx!(self);
                crate::session::tracking::client_tracking(
                    &cx,
                    &mut self.tracking,
                    &self.login,
                    req,
                    now,
                );
                // (CLIENT LIST shows it.)
                self.update_info();
            }
            "client|trackinginfo" => {
                let on = self.tracking.as_deref().filter(|t| t.is_active());
                let info = crate::tracking::Client::info(on, self.proto);
                self.reply(info)
            }
            "client|getredir" => {
                let redirect = self
                    .tracking
                    .as_ref()
                    .filter(|t| t.is_active())
                    .map_or(-1, |t| t.mode.borrow().redirect as i64);
                self.reply(reply::integer(redirect))
            }
            "client|caching" => self.reply_static(crate::session::tracking::client_caching(
                self.tracking.as_deref(),
                req,
            )),
            // (The others are forwarded: `client|help`.)
            _ => fwd!(self).forward(0, req.raw, now),
        }
    }

    /// `SLOTGATE.INVALIDATE key [key …]`: deletes the keys (like DEL, split over the shards)
    /// and ends their negative entries; a fill in flight for them will not store. (The write
    /// notice happened in `dispatch`, as for every write command.) Replies the number deleted.
    fn invalidate(&mut self, req: &Request<'_>, now: Instant) {
        let mut b = bytes::BytesMut::with_capacity(req.raw.len());
        push_header(&mut b, b'*', req.argc());
        b.extend_from_slice(b"$3\r\nDEL\r\n");
        for i in 1..req.argc() {
            b.extend_from_slice(req.arg_frame(i));
        }
        let mut parser = RequestParser::new();
        let del = crate::command::lookup(b"del").expect("DEL is in the table");
        if let Ok(Parsed::Command { req, .. }) = parser.parse(&b, &Limits::default(), true) {
            crate::session::scatter::scatter(
                &mut fwd!(self),
                del,
                &req,
                crate::command::Merge::SumIntegers,
                now,
            );
        }
        // The other slotgate instances forget their own state for the keys (negative
        // entries, fills in flight): see `readthrough::invalidate`.
        let keys = (1..req.argc()).map(|i| req.arg_copy(i)).collect();
        let publish = crate::readthrough::invalidate::publish_command(
            &crate::readthrough::invalidate::Invalidation::Keys(keys),
        );
        let up = self.w.pools().get(Proto::Resp2, 0, 0);
        up.send(&publish, crate::queue::Target::Discard, now);
    }

    /// `SLOTGATE.STATUS key`: the key's read-through state (hit, stale, miss, negative,
    /// in-flight), its remaining TTL, and its age estimated from the rule's TTL.
    fn cache_status(&mut self, req: &Request<'_>, now: Instant) {
        let key = req.arg_copy(1);
        let rt = &self.w.shared.readthrough;
        let rule = self.w.live().readthrough.find(&key).cloned();
        let in_flight = rt.in_flight(&key);
        let negative = rt.negative_fresh(&key);
        let proto = self.proto;
        let build = move |parts: &[Bytes]| -> Bytes {
            let Some(pttl) = parts
                .first()
                .and_then(|p| crate::resp::scan::reply_integer(p))
            else {
                return parts.first().cloned().unwrap_or_default();
            };
            let grace = rule.as_ref().map_or(0, |r| r.grace.as_millis() as i64);
            let status = if in_flight {
                "in-flight"
            } else if pttl == -2 {
                if negative { "negative" } else { "miss" }
            } else if pttl >= 0 && pttl < grace {
                "stale"
            } else {
                "hit"
            };
            let age = match &rule {
                Some(r) if pttl >= 0 => ((r.ttl + r.grace).as_millis() as i64 - pttl).max(0),
                _ => -1,
            };
            let mut m = Aggregate::map(proto, 4);
            m.bulk(b"status").bulk(status.as_bytes());
            m.bulk(b"rule");
            match &rule {
                Some(r) => m.bulk(r.name.as_bytes()),
                None => m.raw(reply::null(proto)),
            };
            m.bulk(b"ttl_ms").integer(pttl);
            m.bulk(b"age_ms").integer(age);
            m.finish()
        };
        let shard = self.w.live().slot_map.shard_of(&key);
        let raw = crate::resp::request::command(&[b"PTTL", &key]);
        fwd!(self).gather(GatherKind::Info(Box::new(build)), &[(shard, raw)], now);
    }

    /// This session's CLIENT LIST entry as it is now.
    pub(crate) fn info_entry(&self) -> ClientInfo {
        ClientInfo {
            id: self.id,
            addr: self.addr,
            laddr: self.laddr,
            created: self.created,
            name: self.name.clone().unwrap_or_default(),
            user: self.user_name().to_string(),
            kill: self.kill.clone(),
            blocked_on: self.blocked_on.clone(),
            resp: if self.proto == Proto::Resp3 { 3 } else { 2 },
            token_exp: self.login.token.as_ref().map(|t| t.expires),
            subscribed: self.subscribed(),
            mail: self.mail.clone(),
            tracking: self.tracking.as_ref().filter(|t| t.is_active()).map(|t| {
                let m = t.mode.borrow();
                (m.bcast, m.redirect)
            }),
        }
    }

    /// Switches the reply protocol; the next command waits for in-flight replies, since it
    /// may travel over a connection of the other protocol.
    fn switch_proto(&mut self, p: Proto) {
        if self.proto != p {
            self.proto = p;
            self.barrier = true;
            if let Some(t) = &self.tracking {
                t.proto.set(p);
            }
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    fn hello(&mut self, req: &Request<'_>) {
        let hello = match Hello::parse(req, self.proto) {
            Ok(h) => h,
            Err(e) => return self.reply(e),
        };
        if let Some((user, password)) = hello.login {
            let cx = cx!(self);
            let verdict = self.login.try_login(&cx, user, password);
            let refused = matches!(verdict, crate::session::login::Verdict::Refused { .. });
            self.after_login(verdict);
            if refused {
                return;
            }
        }
        if self.login.user.is_none() {
            return self.reply_static(reply::NOAUTH_HELLO);
        }
        if let Some(n) = hello.setname {
            if !valid_client_name(n) {
                return self.reply_static(reply::BAD_CLIENT_NAME);
            }
            self.name = (!n.is_empty()).then(|| String::from_utf8_lossy(n).into());
        }
        if hello.proto != self.proto
            && (self.pinned.tx.is_some() || self.pinned.watch.is_some() || self.subscribed())
        {
            // Its dedicated connections speak the protocol they were opened with.
            return self.reply_static(reply::HELLO_SWITCH_PINNED);
        }
        self.switch_proto(hello.proto);
        self.update_info();
        self.reply(hello_reply(&cx!(self)));
    }
}

/// HELLO's arguments.
struct Hello<'r> {
    /// The protocol asked for (the current one when none is named).
    proto: Proto,
    login: Option<(&'r [u8], &'r [u8])>,
    setname: Option<&'r [u8]>,
}

impl<'r> Hello<'r> {
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, or the error reply.
    fn parse(req: &'r Request<'_>, current: Proto) -> Result<Hello<'r>, Bytes> {
        let proto = match req.argc() {
            1 => current,
            _ => match parse_i64(req.arg(1)) {
                Some(2) => Proto::Resp2,
                Some(3) => Proto::Resp3,
                Some(_) => return Err(Bytes::from_static(reply::NOPROTO)),
                None => return Err(Bytes::from_static(reply::PROTO_NOT_INTEGER)),
            },
        };
        let mut hello = Hello {
            proto,
            login: None,
            setname: None,
        };
        let mut i = 2;
        while i < req.argc() {
            let opt = req.arg(i);
            let more = req.argc() - i - 1;
            if opt.eq_ignore_ascii_case(b"auth") && more >= 2 {
                hello.login = Some((req.arg(i + 1), req.arg(i + 2)));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && more >= 1 {
                hello.setname = Some(req.arg(i + 1));
                i += 2;
            } else {
                return Err(reply::hello_syntax(opt));
            }
        }
        Ok(hello)
    }
}

/// HELLO's answer, in the protocol now in force: the shards' Redis version, and `mode
/// cluster` when slotgate announces the cluster API (as a cluster node says).
fn hello_reply(cx: &Cx<'_>) -> Bytes {
    let version = (cx.w.shared.redis_version.get()).map_or(FALLBACK_VERSION, |v| v.as_str());
    let mode: &[u8] = match cx.w.shared.settings.cluster_api {
        Some(_) => b"cluster",
        None => b"standalone",
    };
    let mut m = Aggregate::map(cx.proto, 7);
    m.bulk(b"server").bulk(b"redis");
    m.bulk(b"version").bulk(version.as_bytes());
    m.bulk(b"proto")
        .integer(if cx.proto == Proto::Resp3 { 3 } else { 2 });
    m.bulk(b"id").integer(cx.id as i64);
    m.bulk(b"mode").bulk(mode);
    m.bulk(b"role").bulk(b"master");
    m.bulk(b"modules").raw(b"*0\r\n");
    m.finish()
}

/// INFO: the proxy's own sections plus what the shards report (version, memory and a
/// keyspace summed over shards), gathered from every shard.
fn info(cx: &Cx<'_>, req: &Request<'_>, now: Instant) {
    let wanted: Vec<String> = (1..req.argc())
        .map(|i| String::from_utf8_lossy(req.arg(i)).to_ascii_lowercase())
        .collect();
    let shared = cx.w.shared.clone();
    // This worker's latest counts first (the others publish theirs once a second).
    cx.w.metrics.publish(&shared.command_totals);
    let connected = cx.w.pools().connected();
    let proto = cx.proto;
    let build = move |parts: &[Bytes]| -> Bytes {
        let text = build_info(&shared, &wanted, &connected, parts);
        reply::verbatim(proto, text.as_bytes())
    };
    // On the control connections: INFO never waits behind client traffic (or a busy
    // script), and fails at the usual op-timeout.
    let deadline = now + cx.w.shared.settings.op_timeout;
    cx.gather_on_control(
        GatherKind::Info(Box::new(build)),
        b"*1\r\n$4\r\nINFO\r\n",
        deadline,
    );
}

/// `CLIENT REPLY ON|OFF|SKIP`, as Redis: OFF and SKIP get no reply themselves; replies
/// muted are dropped by the reply queue while the commands run.
fn client_reply(cx: &Cx<'_>, now: &mut ReplyMode, req: &Request<'_>) {
    let mode = req.arg(2);
    if mode.eq_ignore_ascii_case(b"on") {
        cx.queue.unmute(cx.queue.next_seq());
        *now = ReplyMode::On;
        cx.reply_static(reply::OK);
    } else if mode.eq_ignore_ascii_case(b"off") {
        *now = ReplyMode::Off;
        cx.queue.mute(cx.queue.next_seq());
    } else if mode.eq_ignore_ascii_case(b"skip") {
        if *now == ReplyMode::On {
            *now = ReplyMode::SkipNext;
        }
    } else {
        cx.reply_static(reply::SYNTAX);
    }
}

impl Session {
    /// The cluster API's commands (`--cluster-api`, see `cluster_api`): the fleet of slotgate
    /// instances described as a Redis Cluster.
    fn cluster_api(
        &mut self,
        api: &crate::cluster_api::ClusterApi,
        name: &str,
        req: &Request<'_>,
        now: Instant,
    ) {
        // A client on the TLS listener is told the nodes' TLS ports.
        let tls = (self.w.shared.settings.tls.as_ref())
            .is_some_and(|t| t.listen.port() == self.laddr.port());
        let proto = self.proto;
        match name {
            "readonly" | "readwrite" | "asking" => self.reply_static(reply::OK),
            "cluster|slots" => self.reply(api.slots(proto, tls)),
            "cluster|shards" => self.reply(api.shards(proto)),
            "cluster|nodes" => self.reply(reply::verbatim(proto, api.nodes(tls).as_bytes())),
            "cluster|info" => self.reply(reply::verbatim(proto, api.info().as_bytes())),
            "cluster|myid" => self.reply(reply::bulk(api.me.id().as_bytes())),
            "cluster|keyslot" => self.reply(reply::integer(crate::router::slot(req.arg(2)).into())),
            "cluster|countkeysinslot" | "cluster|getkeysinslot" => {
                self.keys_in_slot(name, req, now)
            }
            // Every node is a primary with no replicas, and no node fails another.
            "cluster|links" => self.reply_static(b"*0\r\n"),
            "cluster|replicas" | "cluster|slaves" | "cluster|count-failure-reports" => {
                if !api.knows(req.arg(2)) {
                    return self.reply(reply::unknown_node(req.arg(2)));
                }
                match name {
                    "cluster|count-failure-reports" => self.reply_static(b":0\r\n"),
                    _ => self.reply_static(b"*0\r\n"),
                }
            }
            _ => self.reply(reply::not_yet(name)),
        }
    }

    /// `CLUSTER COUNTKEYSINSLOT slot` and `CLUSTER GETKEYSINSLOT slot count`: asked of the
    /// node owning the slot behind a Redis Cluster; over static shards, counted from a SCAN of
    /// the shard that owns it (as long as its keyspace is large).
    fn keys_in_slot(&mut self, name: &str, req: &Request<'_>, now: Instant) {
        let get = name == "cluster|getkeysinslot";
        let (Some(slot), Some(max)) = (
            parse_i64(req.arg(2)),
            if get { parse_i64(req.arg(3)) } else { Some(0) },
        ) else {
            return self.reply_static(reply::NOT_INTEGER);
        };
        if !(0..16384).contains(&slot) || max < 0 {
            return self.reply_static(if get {
                reply::INVALID_SLOT_OR_KEYS
            } else {
                reply::INVALID_SLOT
            });
        }
        let shard = self.w.live().slot_map.shard_of_slot(slot as u16);
        if self.w.cluster {
            return fwd!(self).forward(shard, req.raw, now);
        }
        let seq = self
            .queue
            .push_waiting(crate::queue::Slot::Waiting(self.cmd));
        let (w, queue) = (self.w.clone(), self.queue.clone());
        let max = get.then_some(max as usize);
        let deadline = now + self.w.shared.settings.op_timeout;
        tokio::task::spawn_local(async move {
            let reply = scan_slot(&w, &queue, shard, slot as u16, max, deadline).await;
            queue.deliver(seq, 0, reply);
        });
    }
}

/// Most keys a static shard may hold for COUNTKEYSINSLOT / GETKEYSINSLOT to scan it.
const SCAN_SLOT_MAX_KEYS: i64 = 100_000;

/// The keys of `slot` on a static `shard`, by SCAN: their number, or (with `max`) up to
/// `max` of them. Refused on a shard of more than [`SCAN_SLOT_MAX_KEYS`] keys; given up at
/// `deadline`, or when the client (`queue`'s other owner) is gone.
async fn scan_slot(
    w: &crate::worker::Worker,
    queue: &std::rc::Rc<crate::queue::ReplyQueue>,
    shard: usize,
    slot: u16,
    max: Option<usize>,
    deadline: Instant,
) -> Bytes {
    use crate::resp::scan::{array_elements, bulk_body, reply_integer};
    let size = w.request(shard, b"*1\r\n$6\r\nDBSIZE\r\n").await;
    match reply_integer(&size) {
        Some(n) if n > SCAN_SLOT_MAX_KEYS => {
            return reply::keys_in_slot_too_many(n, SCAN_SLOT_MAX_KEYS);
        }
        Some(_) => {}
        None => return size,
    }
    // (SCAN may return a key twice.)
    let mut seen = std::collections::HashSet::new();
    let (mut cursor, mut keys) = (b"0".to_vec(), Vec::new());
    loop {
        if Instant::now() >= deadline {
            return Bytes::from_static(reply::KEYS_IN_SLOT_TIMEOUT);
        }
        if std::rc::Rc::strong_count(queue) == 1 {
            // The client is gone.
            return Bytes::new();
        }
        let cmd = crate::resp::request::command(&[b"SCAN", &cursor, b"COUNT", b"1000"]);
        let r = w.request(shard, &cmd).await;
        let parsed = array_elements(&r).and_then(|parts| {
            let (cs, ce) = *parts.first()?;
            let (ks, ke) = *parts.get(1)?;
            Some((
                bulk_body(&r[cs..ce])?.to_vec(),
                array_elements(&r[ks..ke])?,
                ks,
            ))
        });
        let Some((next, elements, base)) = parsed else {
            // (An error, such as `shard unavailable`, is the answer.)
            return r;
        };
        for (s, e) in elements {
            let Some(key) = bulk_body(&r[base + s..base + e]) else {
                continue;
            };
            if crate::router::slot(key) != slot || !seen.insert(key.to_vec()) {
                continue;
            }
            if let Some(max) = max {
                if keys.len() >= max {
                    break;
                }
                keys.push(Bytes::copy_from_slice(key));
            }
        }
        if next == b"0" || max.is_some_and(|m| keys.len() >= m) {
            break;
        }
        cursor = next;
    }
    match max {
        None => reply::integer(seen.len() as i64),
        Some(_) => {
            let mut a = Aggregate::array(keys.len());
            for k in &keys {
                a.bulk(k);
            }
            a.finish()
        }
    }
}

/// CLIENT LIST, with its TYPE and ID filters: the sessions of every worker.
fn client_list(cx: &Cx<'_>, req: &Request<'_>) {
    let filter = match ClientFilter::parse(req) {
        Ok(f) => f,
        Err(e) => return cx.reply(e),
    };
    let mut all: Vec<ClientInfo> =
        cx.w.shared
            .clients
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
    all.retain(|c| filter.keeps(c.id));
    all.sort_by_key(|c| c.id);
    let text: String = all
        .iter()
        .map(|c| {
            let cmd = if c.id == cx.id { "client|list" } else { "NULL" };
            client_line(c, cmd)
        })
        .collect();
    cx.reply(reply::verbatim(cx.proto, text.as_bytes()));
}

/// CLIENT KILL over slotgate's own client sessions: the old form `CLIENT KILL ip:port`
/// (`+OK` or `-ERR No such client`) and the filter form (`ID`, `ADDR`, `LADDR`, `USER`,
/// `SKIPME`; replies the number killed). Shard connections are never touched. `true`:
/// the client killed itself (its connection closes once the reply is written).
fn client_kill(cx: &Cx<'_>, req: &Request<'_>) -> bool {
    let clients: Vec<ClientInfo> =
        cx.w.shared
            .clients
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
    if req.argc() == 3 {
        let addr = String::from_utf8_lossy(req.arg(2)).to_string();
        match clients.iter().find(|c| c.addr.to_string() == addr) {
            Some(c) => {
                c.kill.notify_one();
                cx.reply_static(reply::OK)
            }
            None => cx.reply_static(reply::NO_SUCH_CLIENT),
        }
        return false;
    }
    let (mut id, mut addr, mut laddr, mut user, mut skipme) = (None, None, None, None, true);
    let mut i = 2;
    while i + 1 < req.argc() {
        let v = String::from_utf8_lossy(req.arg(i + 1)).to_string();
        match req.arg(i).to_ascii_lowercase().as_slice() {
            b"id" => match parse_i64(req.arg(i + 1)) {
                Some(n) if n > 0 => id = Some(n as u64),
                _ => {
                    cx.reply_static(reply::CLIENT_ID_NOT_POSITIVE);
                    return false;
                }
            },
            b"addr" => addr = Some(v),
            b"laddr" => laddr = Some(v),
            b"user" => user = Some(v),
            b"skipme" => match v.to_ascii_lowercase().as_str() {
                "yes" => skipme = true,
                "no" => skipme = false,
                _ => {
                    cx.reply_static(reply::SYNTAX);
                    return false;
                }
            },
            _ => {
                cx.reply_static(reply::SYNTAX);
                return false;
            }
        }
        i += 2;
    }
    if i != req.argc() {
        cx.reply_static(reply::SYNTAX);
        return false;
    }
    let (mut killed, mut me) = (0, false);
    for c in &clients {
        let matches = id.is_none_or(|x| x == c.id)
            && addr.as_ref().is_none_or(|a| *a == c.addr.to_string())
            && laddr.as_ref().is_none_or(|a| *a == c.laddr.to_string())
            && user.as_ref().is_none_or(|u| *u == c.user)
            && !(skipme && c.id == cx.id);
        if matches {
            if c.id == cx.id {
                me = true;
            } else {
                c.kill.notify_one();
            }
            killed += 1;
        }
    }
    cx.reply(reply::integer(killed));
    me
}

/// `SLOTGATE.RELOAD`: reloads the configuration as SIGHUP does (see `reload`); `+OK` once
/// every worker has taken it up, or why it was refused.
fn reload_config(cx: &Cx<'_>) {
    let (answer, outcome) = tokio::sync::oneshot::channel();
    let sent = cx.w.shared.reloads.get().map(|tx| tx.send(answer));
    if !matches!(sent, Some(Ok(()))) {
        return cx.reply(reply::reload_failed("reloads are not available"));
    }
    let seq = cx.queue.push_waiting(crate::queue::Slot::Waiting(cx.cmd));
    let queue = cx.queue.clone();
    tokio::task::spawn_local(async move {
        let reply = match outcome.await {
            Ok(Ok(_)) => Bytes::from_static(reply::OK),
            Ok(Err(why)) => reply::reload_failed(&why),
            Err(_) => reply::reload_failed("the reload did not finish"),
        };
        queue.deliver(seq, 0, reply);
    });
}

/// CLIENT LIST's `TYPE` and `ID` options. Every slotgate client is of type `normal`.
struct ClientFilter {
    /// `TYPE` other than normal: nothing matches.
    none: bool,
    ids: Option<Vec<u64>>,
}

impl ClientFilter {
    fn parse(req: &Request<'_>) -> Result<Self, Bytes> {
        let mut f = ClientFilter {
            none: false,
            ids: None,
        };
        let mut i = 2;
        while i < req.argc() {
            let opt = req.arg(i);
            if opt.eq_ignore_ascii_case(b"type") && i + 1 < req.argc() {
                let t = req.arg(i + 1).to_ascii_lowercase();
                match t.as_slice() {
                    b"normal" => {}
                    b"master" | b"replica" | b"slave" | b"pubsub" => f.none = true,
                    _ => {
                        return Err(reply::unknown_client_type(req.arg(i + 1)));
                    }
                }
                i += 2;
            } else if opt.eq_ignore_ascii_case(b"id") && i + 1 < req.argc() {
                let mut ids = Vec::new();
                i += 1;
                while i < req.argc() {
                    match parse_i64(req.arg(i)) {
                        Some(n) if n > 0 => ids.push(n as u64),
                        _ => return Err(Bytes::from_static(reply::INVALID_CLIENT_ID)),
                    }
                    i += 1;
                }
                f.ids = Some(ids);
            } else {
                return Err(Bytes::from_static(reply::SYNTAX));
            }
        }
        Ok(f)
    }

    fn keeps(&self, id: u64) -> bool {
        !self.none && self.ids.as_ref().is_none_or(|ids| ids.contains(&id))
    }
}

/// Redis's rule for client names: printable ASCII without spaces.
fn valid_client_name(n: &[u8]) -> bool {
    n.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// One CLIENT LIST line, in Redis 7.0's field order.
fn client_line(c: &ClientInfo, cmd: &str) -> String {
    format!(
        "id={} addr={} laddr={} fd=-1 name={} age={} idle=0 flags={} db=0 sub=0 psub=0 ssub=0 \
         multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 \
         tot-mem=0 events=r cmd={} user={} redir={} resp={}{}\n",
        c.id,
        c.addr,
        c.laddr,
        c.name,
        c.created.elapsed().as_secs(),
        match c.tracking {
            Some((true, _)) => "tB",
            Some((false, _)) => "t",
            None => "N",
        },
        cmd,
        c.user,
        c.tracking.map_or(-1, |(_, r)| r as i64),
        c.resp,
        // slotgate's own field, at the end, only for a client authenticated with a token.
        match c.token_exp {
            Some(t) => format!(" token-exp={t}"),
            None => String::new(),
        }
    )
}

/// The text of a shard's INFO reply (RESP2 bulk or RESP3 verbatim), if it is one.
fn info_text(part: &[u8]) -> Option<&str> {
    let cr = part.iter().position(|&c| c == b'\r')?;
    let body = part.get(cr + 2..part.len().checked_sub(2)?)?;
    let body = match part.first()? {
        b'$' => body,
        b'=' => body.get(4..)?,
        _ => return None,
    };
    std::str::from_utf8(body).ok()
}

/// `field:value` from an INFO text.
fn info_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim_end)
    })
}

/// `db0:keys=1,expires=0,avg_ttl=0` → (keys, expires, avg_ttl).
fn db0(text: &str) -> (u64, u64, u64) {
    let Some(v) = info_field(text, "db0") else {
        return (0, 0, 0);
    };
    let get = |k: &str| {
        v.split(',')
            .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (get("keys"), get("expires"), get("avg_ttl"))
}

/// One INFO line per command with statistics (by name), as `line` writes it (`None`: no line).
fn per_command_lines(
    shared: &Shared,
    line: impl Fn(&str, &crate::metrics::CommandCounts) -> Option<String>,
) -> String {
    let t = shared
        .command_totals
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.commands.iter().collect();
    rows.sort_by_key(|(name, _)| **name);
    rows.into_iter()
        .filter_map(|(name, c)| line(name, c))
        .collect()
}

/// INFO's `# Commandstats`, as Redis (`cmdstat_<name>:calls=…,usec=…,usec_per_call=…,
/// rejected_calls=…,failed_calls=…`), counted by slotgate: `usec_per_call` is the mean of the
/// sampled latencies (one command in `metrics::SAMPLE_EVERY`, from reading the command to its
/// reply being written) and `usec` that mean times `calls`.
fn commandstats_info(shared: &Shared) -> String {
    per_command_lines(shared, |name, c| {
        let per_call = if c.samples > 0 {
            c.sampled_usec as f64 / c.samples as f64
        } else {
            0.0
        };
        Some(format!(
            "cmdstat_{name}:calls={},usec={},usec_per_call={per_call:.2},rejected_calls={},\
             failed_calls={}\r\n",
            c.calls,
            (per_call * c.calls as f64) as u64,
            c.rejected,
            c.failed
        ))
    })
}

/// INFO's `# Latencystats`, as Redis (`latency_percentiles_usec_<name>:p50=…,p99=…,p99.9=…`),
/// from the sampled latencies (one command in `metrics::SAMPLE_EVERY`), each percentile the
/// upper bound of its bucket (within 19%).
fn latencystats_info(shared: &Shared) -> String {
    per_command_lines(shared, |name, c| {
        let p = |q: f64| c.latency.percentile(q);
        let (p50, p99, p999) = (p(50.0)?, p(99.0)?, p(99.9)?);
        Some(format!(
            "latency_percentiles_usec_{name}:p50={p50:.3},p99={p99:.3},p99.9={p999:.3}\r\n"
        ))
    })
}

/// INFO's `# Errorstats`: `errorstat_<PREFIX>:count=…` for every error slotgate answered, its
/// own and the shards' (Redis's first-word prefix; at most 128 prefixes).
fn errorstats_info(shared: &Shared) -> String {
    let t = shared
        .command_totals
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.errors.iter().collect();
    rows.sort();
    rows.iter()
        .map(|(prefix, n)| format!("errorstat_{prefix}:count={n}\r\n"))
        .collect()
}

/// INFO's `# Memory`: the shards' figures summed where a sum means something, and slotgate's
/// own resident size as its own field.
fn memory_info(texts: &[Option<&str>]) -> String {
    let sum = |field: &str| -> u64 {
        texts
            .iter()
            .flatten()
            .filter_map(|t| info_field(t, field)?.parse::<u64>().ok())
            .sum()
    };
    let used = sum("used_memory");
    format!(
        "used_memory:{used}\r\nused_memory_human:{}\r\nused_memory_rss:{}\r\n\
         used_memory_peak:{}\r\nmaxmemory:{}\r\nused_memory_shards_sum:{used}\r\n\
         proxy_used_memory_rss:{}\r\n",
        human_bytes(used),
        sum("used_memory_rss"),
        sum("used_memory_peak"),
        sum("maxmemory"),
        own_rss_bytes()
    )
}

/// Redis's `_human` memory figures (`1.50M`).
fn human_bytes(n: u64) -> String {
    let units = [
        (1u64 << 40, 'T'),
        (1 << 30, 'G'),
        (1 << 20, 'M'),
        (1 << 10, 'K'),
    ];
    match units.iter().find(|(u, _)| n >= *u) {
        Some((u, c)) => format!("{:.2}{c}", n as f64 / *u as f64),
        None => format!("{n}B"),
    }
}

/// INFO's `# Persistence`, over the shards: counts summed, "in progress" flags and `loading`
/// set when any shard's is, the oldest `rdb_last_save_time`, and a status `err` when any
/// shard's is not `ok`.
fn persistence_info(texts: &[Option<&str>]) -> String {
    let shards: Vec<&str> = texts.iter().flatten().copied().collect();
    let nums = |field: &str| -> Vec<i64> {
        shards
            .iter()
            .filter_map(|t| info_field(t, field)?.parse::<i64>().ok())
            .collect()
    };
    let mut out = String::new();
    for field in [
        "loading",
        "async_loading",
        "rdb_bgsave_in_progress",
        "aof_enabled",
        "aof_rewrite_in_progress",
        "aof_rewrite_scheduled",
    ] {
        let v = nums(field).into_iter().max().unwrap_or(0);
        out.push_str(&format!("{field}:{v}\r\n"));
    }
    for field in ["rdb_changes_since_last_save", "rdb_saves", "aof_rewrites"] {
        let v: i64 = nums(field).into_iter().sum();
        out.push_str(&format!("{field}:{v}\r\n"));
    }
    let last_save = nums("rdb_last_save_time").into_iter().min().unwrap_or(0);
    out.push_str(&format!("rdb_last_save_time:{last_save}\r\n"));
    for field in [
        "rdb_last_bgsave_status",
        "aof_last_bgrewrite_status",
        "aof_last_write_status",
    ] {
        let ok = shards
            .iter()
            .all(|t| info_field(t, field).is_none_or(|v| v == "ok"));
        out.push_str(&format!("{field}:{}\r\n", if ok { "ok" } else { "err" }));
    }
    out
}

/// INFO's `# Stats`: slotgate's own counters.
fn stats_info(shared: &Shared) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let st = &shared.stats;
    format!(
        "total_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
         rejected_connections:{}\r\nauth_failures:{}\r\ntoken_auths:{}\r\n\
         token_auth_failures:{}\r\ntotal_error_replies:{}\r\ntracking_total_keys:{}\r\n",
        st.connections_received.load(Relaxed),
        st.commands_processed.load(Relaxed),
        st.rejected_connections.load(Relaxed),
        st.auth_failures.load(Relaxed),
        st.token_auths.load(Relaxed),
        st.token_auth_failures.load(Relaxed),
        shared.command_totals.lock().map_or(0, |t| t.total_errors),
        shared
            .tracking_keys
            .iter()
            .map(|k| k.load(Relaxed))
            .sum::<usize>()
    )
}

/// INFO's `# Keyspace`: database 0 summed over the shards (the mean of their `avg_ttl`s).
fn keyspace_info(texts: &[Option<&str>]) -> String {
    let (mut keys, mut expires, mut ttl_sum, mut ttl_n) = (0u64, 0u64, 0u64, 0u64);
    for t in texts.iter().flatten() {
        let (k, e, a) = db0(t);
        keys += k;
        expires += e;
        if a > 0 {
            ttl_sum += a;
            ttl_n += 1;
        }
    }
    if keys == 0 {
        return String::new();
    }
    format!(
        "db0:keys={keys},expires={expires},avg_ttl={}\r\n",
        ttl_sum.checked_div(ttl_n).unwrap_or(0)
    )
}

/// INFO's `# Server`, with the shards' Redis version.
fn server_info(shared: &Shared, version: &str) -> String {
    let up_secs = shared.started.elapsed().as_secs();
    let port = shared.listen_addr.get().map_or(0, |a| a.port());
    format!(
        "redis_version:{version}\r\nslotgate_version:{}\r\nredis_mode:standalone\r\n\
             os:{} {}\r\narch_bits:{}\r\nmultiplexing_api:epoll\r\nprocess_id:{}\r\n\
             run_id:{}\r\ntcp_port:{port}\r\nuptime_in_seconds:{up_secs}\r\nuptime_in_days:{}\r\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        usize::BITS,
        std::process::id(),
        shared.run_id,
        up_secs / 86400
    )
}

/// INFO's `# CPU`: slotgate's own CPU time, in Redis's fields (from /proc/self/stat; the
/// kernel counts in 1/100 s on Linux).
fn cpu_info() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces): state is the first.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let secs =
        |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) as f64 / 100.0;
    let (user, sys, cuser, csys) = (secs(11), secs(12), secs(13), secs(14));
    format!(
        "used_cpu_sys:{sys:.6}\r\nused_cpu_user:{user:.6}\r\n\
         used_cpu_sys_children:{csys:.6}\r\nused_cpu_user_children:{cuser:.6}\r\n"
    )
}

/// slotgate's own resident memory, in bytes (0 where /proc does not say).
fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// INFO's `# Replication`: to its clients slotgate is a primary without replicas (Redis
/// 7.0's fields; clients such as StackExchange.Redis read `role`).
fn replication_info(shared: &Shared) -> String {
    format!(
        "role:master\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\n\
         master_replid:{}\r\nmaster_replid2:0000000000000000000000000000000000000000\r\n\
         master_repl_offset:0\r\nsecond_repl_offset:-1\r\nrepl_backlog_active:0\r\n\
         repl_backlog_size:1048576\r\nrepl_backlog_first_byte_offset:0\r\n\
         repl_backlog_histlen:0\r\n",
        shared.run_id
    )
}

/// INFO's `# Clients`: slotgate's own clients.
fn clients_info(shared: &Shared, maxclients: usize) -> String {
    let (connected, pubsub) = match shared.clients.lock() {
        Ok(c) => (c.len(), c.values().filter(|i| i.subscribed).count()),
        Err(_) => (0, 0),
    };
    format!(
        "connected_clients:{connected}\r\ncluster_connections:0\r\nmaxclients:{maxclients}\r\n\
         blocked_clients:{}\r\ntracking_clients:{}\r\npubsub_clients:{pubsub}\r\n",
        shared
            .blocked_clients
            .load(std::sync::atomic::Ordering::Relaxed),
        shared
            .tracking_clients
            .load(std::sync::atomic::Ordering::Relaxed)
    )
}

/// INFO's `# Readthrough`: the rules and their counters.
fn readthrough_info(shared: &Shared) -> String {
    let (flights, negatives) = shared.readthrough.sizes();
    let rules = shared.live().readthrough.clone();
    let mut body = format!(
        "rules:{}\r\nfetches_tracked:{flights}\r\nnegative_entries:{negatives}\r\n",
        rules.iter().count()
    );
    // `rule_<i>:name=…`: a rule's name may contain `:` (the default name is the prefix), which
    // INFO parsers split on (issue 13.4).
    for (i, r) in rules.iter().enumerate() {
        let s = &r.stats;
        let (hits, misses) = (s.hits.get(), s.misses.get());
        let ratio = if hits + misses > 0 {
            hits as f64 / (hits + misses) as f64
        } else {
            0.0
        };
        let avoided = s.avoided();
        body.push_str(&format!(
            "rule_{i}:name={},prefix={},hits={hits},misses={misses},hit_ratio={ratio:.4},\
             origin_requests={},origin_calls_avoided={avoided},coalesced={},\
             negative_hits={},stale_serves={},origin_errors={},bytes_loaded={},stored={},\
             origin_inflight={},throttled={},lease_waits={},refreshes={},revalidated={},breaker={},\
             breaker_rejections={},\
             breaker_opens={}\r\n",
            r.name,
            String::from_utf8_lossy(&r.prefix),
            s.origin_requests.get(),
            s.coalesced.get(),
            s.negative_hits.get(),
            s.stale_serves.get(),
            s.origin_errors.get(),
            s.bytes_loaded.get(),
            s.stored.get(),
            r.guard.inflight(),
            s.throttled.get(),
            s.lease_waits.get(),
            s.refreshes.get(),
            s.revalidated.get(),
            match &r.guard.breaker {
                None => "off",
                Some(b) if b.is_open() => "open",
                Some(_) => "closed",
            },
            s.breaker_rejections.get(),
            s.breaker_opens.get()
        ));
    }
    body
}

/// INFO's `# Shards`: each shard's address, slots, status, keys and version.
fn shards_info(
    settings: &crate::settings::Settings,
    texts: &[Option<&str>],
    up: &[bool],
) -> String {
    let mut body = String::new();
    for (i, addr) in settings.shards.iter().enumerate() {
        let ranges: Vec<String> = settings
            .slot_map
            .ranges(i)
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        let text = texts.get(i).copied().flatten();
        // (INFO is asked of the shards with slots; the others are up when connected.)
        let answered = text.is_some() || i >= texts.len();
        let status = if answered && up.get(i).copied().unwrap_or(false) {
            "up"
        } else {
            "down"
        };
        // Cluster mode: the replicas reads go to come after the primaries.
        let role = match (&settings.cluster, settings.replica_of.contains(&Some(i))) {
            (None, _) => "",
            (Some(_), false) => ",role=primary",
            (Some(_), true) => ",role=replica",
        };
        body.push_str(&format!(
            "shard{i}:addr={addr},slots={},status={status},keys={},redis_version={}{role}\r\n",
            ranges.join(" "),
            text.map_or(0, |t| db0(t).0),
            text.and_then(|t| info_field(t, "redis_version"))
                .unwrap_or("?")
        ));
    }
    body
}

fn build_info(shared: &Arc<Shared>, wanted: &[String], up: &[bool], parts: &[Bytes]) -> String {
    let texts: Vec<Option<&str>> = parts.iter().map(|p| info_text(p)).collect();
    if shared.redis_version.get().is_none()
        && let Some(v) = texts
            .iter()
            .flatten()
            .find_map(|t| info_field(t, "redis_version"))
    {
        let _ = shared.redis_version.set(v.to_string());
    }
    let version = texts
        .iter()
        .flatten()
        .find_map(|t| info_field(t, "redis_version"))
        .unwrap_or(FALLBACK_VERSION);
    // As Redis: no argument or `default` is every section but commandstats and
    // latencystats; `all` and `everything` are every section.
    let all = wanted
        .iter()
        .any(|w| matches!(w.as_str(), "all" | "everything"));
    let default = all || wanted.is_empty() || wanted.iter().any(|w| w == "default");
    let want = |s: &str| {
        (default && s != "commandstats" && s != "latencystats")
            || all
            || wanted.iter().any(|w| w == s)
    };
    let settings = &*shared.live();
    let mut out = String::with_capacity(2048);
    let mut section = |name: &str, body: String| {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str("# ");
        out.push_str(name);
        out.push_str("\r\n");
        out.push_str(&body);
    };
    if want("server") {
        section("Server", server_info(shared, version));
    }
    if want("clients") {
        section("Clients", clients_info(shared, settings.maxclients));
    }
    if want("memory") {
        section("Memory", memory_info(&texts));
    }
    if want("persistence") {
        section("Persistence", persistence_info(&texts));
    }
    if want("cpu") {
        section("CPU", cpu_info());
    }
    if want("replication") {
        section("Replication", replication_info(shared));
    }
    if want("stats") {
        section("Stats", stats_info(shared));
    }
    if want("commandstats") {
        section("Commandstats", commandstats_info(shared));
    }
    if want("errorstats") {
        section("Errorstats", errorstats_info(shared));
    }
    if want("latencystats") {
        section("Latencystats", latencystats_info(shared));
    }
    if want("cluster") {
        let on = u8::from(shared.settings.cluster_api.is_some());
        section("Cluster", format!("cluster_enabled:{on}\r\n"));
    }
    if want("keyspace") {
        section("Keyspace", keyspace_info(&texts));
    }
    if want("proxy") {
        section(
            "Proxy",
            format!(
                "proxy:slotgate\r\nworkers:{}\r\nshards:{}\r\nupstream_connections_per_shard:{}\r\n\
                 op_timeout_ms:{}\r\nmax_client_pipeline:{}\r\n",
                settings.workers,
                settings.shards.len(),
                settings.upstream_connections,
                settings.op_timeout.as_millis(),
                settings.max_client_pipeline
            ),
        );
    }
    if want("readthrough") {
        section("Readthrough", readthrough_info(shared));
    }
    if want("shards") {
        let mut body = shards_info(settings, &texts, up);
        if settings.cluster.is_some() {
            body.push_str(&shared.cluster_stats.info());
        }
        section("Shards", body);
    }
    out
}
