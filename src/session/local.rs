//! Commands the proxy answers itself: the connection handshake (HELLO, AUTH, SELECT, CLIENT …),
//! PING/ECHO/TIME/QUIT/RESET, and INFO built from the proxy's state plus the shards' INFO.
//! Introspection that only a Redis can answer correctly (COMMAND …, CONFIG GET, `* HELP`) is
//! forwarded to the first shard, whose command set is the one clients talk to.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use crate::command::CommandSpec;
use crate::fanout::GatherKind;
use crate::resp::reply::{self, Aggregate, Proto};
use crate::resp::request::parse_i64;
use crate::resp::request::push_header;
use crate::resp::{Limits, Parsed, Request, RequestParser};
use crate::session::cx::Fwd;
use crate::session::login::Login;
use crate::session::{Cx, ReplyMode, control};
use crate::worker::ClientInfo;

/// Reported by HELLO before any shard has told its version.
pub(super) const FALLBACK_VERSION: &str = "7.0.0";

/// A command the proxy answers itself, other than those that change the connection (see
/// [`state`](super::state)): with the client's narrow context, its login and the address
/// it connected to.
pub(super) fn answer(
    f: &mut Fwd<'_>,
    login: &Login,
    laddr: SocketAddr,
    spec: &CommandSpec,
    req: &Request<'_>,
    now: Instant,
) {
    let cx = &f.cx;
    match spec.name {
        "ping" => match req.argc() {
            1 => cx.reply_static(reply::PONG),
            2 => cx.reply(reply::bulk(req.arg(1))),
            _ => cx.reply(reply::wrong_arity("ping")),
        },
        "echo" => cx.reply(reply::bulk(req.arg(1))),
        "select" => match parse_i64(req.arg(1)) {
            Some(0) => cx.reply_static(reply::OK),
            Some(_) => cx.reply_static(reply::DB_OUT_OF_RANGE),
            None => cx.reply_static(reply::NOT_INTEGER),
        },
        "time" => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let mut a = Aggregate::array(2);
            a.bulk(t.as_secs().to_string().as_bytes())
                .bulk(t.subsec_micros().to_string().as_bytes());
            cx.reply(a.finish());
        }
        "info" => super::info::info(cx, req, now),
        name if name.starts_with("client|") => client(f, name, req, now),
        "slotgate.invalidate" => invalidate(f, req, now),
        "slotgate.status" => cache_status(f, req, now),
        "slotgate.hotkeys" => super::hotkeys::hot(cx, login.user.as_ref(), req),
        "slotgate.bigkeys" => super::hotkeys::big(cx, login.user.as_ref(), req),
        "slotgate.reload" => reload_config(cx),
        "acl|whoami" => cx.reply(reply::bulk(login.user_name().as_bytes())),
        name if name == "cluster"
            || name.starts_with("cluster|")
            || matches!(name, "readonly" | "readwrite" | "asking") =>
        {
            match cx.w.shared.settings.cluster_api.clone() {
                Some(api) => cluster_api(f, laddr, &api, name, req, now),
                None => cx.reply_static(reply::CLUSTER_DISABLED),
            }
        }
        "config|get" => f.gather(
            GatherKind::ConfigGet,
            &[(0, Bytes::copy_from_slice(req.raw))],
            now,
        ),
        // COMMAND …, and HELP texts: the shards' own answer.
        _ => f.forward(0, req.raw, now),
    }
}

/// CLIENT subcommands the proxy answers that leave the connection as it is.
fn client(f: &mut Fwd<'_>, name: &str, req: &Request<'_>, now: Instant) {
    let cx = &f.cx;
    match name {
        "client|id" => cx.reply(reply::integer(cx.id as i64)),
        "client|setinfo" => {
            let attr = req.arg(2);
            if !(attr.eq_ignore_ascii_case(b"lib-name") || attr.eq_ignore_ascii_case(b"lib-ver")) {
                return cx.reply(reply::unrecognized_option(attr));
            }
            if !valid_client_name(req.arg(3)) {
                return cx.reply(reply::bad_client_info(attr));
            }
            cx.reply_static(reply::OK)
        }
        "client|no-evict" | "client|no-touch" => {
            let v = req.arg(2);
            if v.eq_ignore_ascii_case(b"on") || v.eq_ignore_ascii_case(b"off") {
                cx.reply_static(reply::OK)
            } else {
                cx.reply_static(reply::SYNTAX)
            }
        }
        "client|list" => client_list(cx, req),
        "client|pause" => control::client_pause(cx, req),
        "client|unpause" => control::client_unpause(cx),
        "client|unblock" => control::client_unblock(cx, req, now),
        "client|trackinginfo" => {
            let on = f.tracking.map(|t| &**t).filter(|t| t.is_active());
            cx.reply(crate::tracking::Client::info(on, cx.proto))
        }
        "client|getredir" => {
            let redirect = (f.tracking)
                .filter(|t| t.is_active())
                .map_or(-1, |t| t.mode.borrow().redirect as i64);
            cx.reply(reply::integer(redirect))
        }
        "client|caching" => {
            let this = f.tracking.map(|t| &**t);
            cx.reply_static(crate::session::tracking::client_caching(this, req))
        }
        // (The others are forwarded: `client|help`.)
        _ => f.forward(0, req.raw, now),
    }
}

/// `SLOTGATE.INVALIDATE key [key …]`: deletes the keys (like DEL, split over the shards)
/// and ends their negative entries; a fill in flight for them will not store. (The write
/// notice happened in `dispatch`, as for every write command.) Replies the number deleted.
fn invalidate(f: &mut Fwd<'_>, req: &Request<'_>, now: Instant) {
    let mut b = bytes::BytesMut::with_capacity(req.raw.len());
    push_header(&mut b, b'*', req.argc());
    b.extend_from_slice(b"$3\r\nDEL\r\n");
    for i in 1..req.argc() {
        b.extend_from_slice(req.arg_frame(i));
    }
    let mut parser = RequestParser::new();
    let del = crate::command::lookup(b"del").expect("DEL is in the table");
    if let Ok(Parsed::Command { req, .. }) = parser.parse(&b, &Limits::default(), true) {
        crate::session::scatter::scatter(f, del, &req, crate::command::Merge::SumIntegers, now);
    }
    // The other slotgate instances forget their own state for the keys (negative
    // entries, fills in flight): see `readthrough::invalidate`.
    let keys = (1..req.argc()).map(|i| req.arg_copy(i)).collect();
    let publish = crate::readthrough::invalidate::publish_command(
        &crate::readthrough::invalidate::Invalidation::Keys(keys),
    );
    let up = f.cx.w.pools().get(Proto::Resp2, 0, 0);
    up.send(&publish, crate::queue::Target::Discard, now);
}

/// `SLOTGATE.STATUS key`: the key's read-through state (hit, stale, miss, negative,
/// in-flight), its remaining TTL, and its age estimated from the rule's TTL.
fn cache_status(f: &Fwd<'_>, req: &Request<'_>, now: Instant) {
    let key = req.arg_copy(1);
    let rt = &f.cx.w.shared.readthrough;
    let rule = f.cx.w.live().readthrough.find(&key).cloned();
    let in_flight = rt.in_flight(&key);
    let negative = rt.negative_fresh(&key);
    let proto = f.cx.proto;
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
    let shard = f.cx.w.live().slot_map.shard_of(&key);
    let raw = crate::resp::request::command(&[b"PTTL", &key]);
    f.gather(GatherKind::Info(Box::new(build)), &[(shard, raw)], now);
}

/// HELLO's answer, in the protocol now in force: the shards' Redis version, and `mode
/// cluster` when slotgate announces the cluster API (as a cluster node says).
pub(super) fn hello_reply(cx: &Cx<'_>) -> Bytes {
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

/// `CLIENT REPLY ON|OFF|SKIP`, as Redis: OFF and SKIP get no reply themselves; replies
/// muted are dropped by the reply queue while the commands run.
pub(super) fn client_reply(cx: &Cx<'_>, now: &mut ReplyMode, req: &Request<'_>) {
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

/// The cluster API's commands (`--cluster-api`, see `cluster_api`): the fleet of slotgate
/// instances described as a Redis Cluster.
fn cluster_api(
    f: &Fwd<'_>,
    laddr: SocketAddr,
    api: &crate::cluster_api::ClusterApi,
    name: &str,
    req: &Request<'_>,
    now: Instant,
) {
    // A client on the TLS listener is told the nodes' TLS ports.
    let tls =
        (f.cx.w.shared.settings.tls.as_ref()).is_some_and(|t| t.listen.port() == laddr.port());
    let proto = f.cx.proto;
    match name {
        "readonly" | "readwrite" | "asking" => f.cx.reply_static(reply::OK),
        "cluster|slots" => f.cx.reply(api.slots(proto, tls)),
        "cluster|shards" => f.cx.reply(api.shards(proto)),
        "cluster|nodes" => {
            f.cx.reply(reply::verbatim(proto, api.nodes(tls).as_bytes()))
        }
        "cluster|info" => f.cx.reply(reply::verbatim(proto, api.info().as_bytes())),
        "cluster|myid" => f.cx.reply(reply::bulk(api.me.id().as_bytes())),
        "cluster|keyslot" => {
            f.cx.reply(reply::integer(crate::router::slot(req.arg(2)).into()))
        }
        "cluster|countkeysinslot" | "cluster|getkeysinslot" => keys_in_slot(f, name, req, now),
        // Every node is a primary with no replicas, and no node fails another.
        "cluster|links" => f.cx.reply_static(b"*0\r\n"),
        "cluster|replicas" | "cluster|slaves" | "cluster|count-failure-reports" => {
            if !api.knows(req.arg(2)) {
                return f.cx.reply(reply::unknown_node(req.arg(2)));
            }
            match name {
                "cluster|count-failure-reports" => f.cx.reply_static(b":0\r\n"),
                _ => f.cx.reply_static(b"*0\r\n"),
            }
        }
        _ => f.cx.reply(reply::not_yet(name)),
    }
}

/// `CLUSTER COUNTKEYSINSLOT slot` and `CLUSTER GETKEYSINSLOT slot count`: asked of the
/// node owning the slot behind a Redis Cluster; over static shards, counted from a SCAN of
/// the shard that owns it (as long as its keyspace is large).
fn keys_in_slot(f: &Fwd<'_>, name: &str, req: &Request<'_>, now: Instant) {
    let get = name == "cluster|getkeysinslot";
    let (Some(slot), Some(max)) = (
        parse_i64(req.arg(2)),
        if get { parse_i64(req.arg(3)) } else { Some(0) },
    ) else {
        return f.cx.reply_static(reply::NOT_INTEGER);
    };
    if !(0..16384).contains(&slot) || max < 0 {
        return f.cx.reply_static(if get {
            reply::INVALID_SLOT_OR_KEYS
        } else {
            reply::INVALID_SLOT
        });
    }
    let shard = f.cx.w.live().slot_map.shard_of_slot(slot as u16);
    if f.cx.w.cluster {
        return f.forward(shard, req.raw, now);
    }
    let seq =
        f.cx.queue
            .push_waiting(crate::queue::Slot::Waiting(f.cx.cmd));
    let (w, queue) = (f.cx.w.clone(), f.cx.queue.clone());
    let max = get.then_some(max as usize);
    let deadline = now + f.cx.w.shared.settings.op_timeout;
    tokio::task::spawn_local(async move {
        let reply = scan_slot(&w, &queue, shard, slot as u16, max, deadline).await;
        queue.deliver(seq, 0, reply);
    });
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
pub(super) fn client_kill(cx: &Cx<'_>, req: &Request<'_>) -> bool {
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
pub(super) fn valid_client_name(n: &[u8]) -> bool {
    n.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// One CLIENT LIST line, in Redis 7.0's field order.
pub(super) fn client_line(c: &ClientInfo, cmd: &str) -> String {
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
