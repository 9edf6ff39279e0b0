//! Argument rules of particular commands, kept next to the command table so that the
//! connection code routes on route classes and flags: what a SCAN cursor is, which options
//! make a command blocking (XREAD BLOCK), which SORT patterns or COPY targets a proxy in
//! front of shards must refuse, which CONFIG SET parameters are allowed, where a pub/sub
//! command's channels are.

use crate::resp::Request;
use crate::resp::reply;
use crate::resp::request::parse_i64;
use crate::router;

/// The commands a client may send before it authenticates (Redis's NOAUTH rule).
pub fn allowed_before_auth(name: &str) -> bool {
    matches!(name, "auth" | "hello" | "quit" | "reset")
}

/// QUIT and RESET end the connection's state: inside MULTI they run, not queued.
pub fn ends_connection_state(name: &str) -> bool {
    matches!(name, "quit" | "reset")
}

/// RESET: it drops the transaction, the watches and the subscriptions, whose connections'
/// replies in flight must arrive first.
pub fn resets_connection(name: &str) -> bool {
    name == "reset"
}

/// PING, which a RESP2 client that is subscribed gets answered as `["pong", message]`.
pub fn is_ping(name: &str) -> bool {
    name == "ping"
}

/// Arguments of a single-slot command that a proxy in front of shards refuses: SORT/SORT_RO
/// patterns whose keys may be in other slots, and COPY to another database (the shards have
/// databases the proxy does not expose). The error reply, as Redis Cluster words it.
#[inline]
pub fn refused_arguments(name: &str, req: &Request<'_>) -> Option<&'static [u8]> {
    match name {
        "sort" | "sort_ro" => sort_pattern_error(req),
        "copy" if copy_to_other_db(req) => Some(reply::COPY_OTHER_DB),
        _ => None,
    }
}

/// A SCAN cursor as Redis reads it (`strtoul`): optional spaces and sign, digits, nothing
/// after; a negative value wraps around.
pub fn parse_cursor(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v: u64 = digits.parse().ok()?;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// `COPY src dst DB n` with n ≠ 0.
pub fn copy_to_other_db(req: &Request<'_>) -> bool {
    // A non-integer index is left to the shard, which answers Redis's own error.
    (3..req.argc().saturating_sub(1)).any(|i| {
        req.arg(i).eq_ignore_ascii_case(b"db") && parse_i64(req.arg(i + 1)).is_some_and(|n| n != 0)
    })
}

/// Whether an XREAD/XREADGROUP carries the BLOCK option. Walks the options as Redis does:
/// `XREAD [COUNT n] [BLOCK ms] STREAMS …`, `XREADGROUP GROUP g c [COUNT n] [BLOCK ms]
/// [NOACK] STREAMS …` (so a group or consumer named "block" or "streams" is not an option).
pub fn has_block_option(req: &Request<'_>) -> bool {
    let mut i = 1;
    if req.arg(0).eq_ignore_ascii_case(b"xreadgroup") {
        if req.argc() < 4 || !req.arg(1).eq_ignore_ascii_case(b"group") {
            return false;
        }
        i = 4;
    }
    while i < req.argc() {
        let a = req.arg(i);
        if a.eq_ignore_ascii_case(b"streams") {
            return false;
        }
        if a.eq_ignore_ascii_case(b"block") {
            return true;
        }
        i += if a.eq_ignore_ascii_case(b"count") {
            2
        } else {
            1
        };
    }
    false
}

/// SORT's `BY` (`true`) and `GET` (`false`) patterns, in order, walking the options as
/// Redis does (LIMIT takes two arguments, STORE one).
fn sort_patterns<'r>(req: &'r Request<'_>) -> impl Iterator<Item = (bool, &'r [u8])> {
    let mut i = 2;
    std::iter::from_fn(move || {
        while i + 1 < req.argc() {
            let (opt, pat) = (req.arg(i), req.arg(i + 1));
            if opt.eq_ignore_ascii_case(b"by") || opt.eq_ignore_ascii_case(b"get") {
                i += 2;
                return Some((opt.eq_ignore_ascii_case(b"by"), pat));
            }
            i += if opt.eq_ignore_ascii_case(b"limit") {
                3
            } else if opt.eq_ignore_ascii_case(b"store") {
                2
            } else {
                1
            };
        }
        None
    })
}

/// SORT/SORT_RO with a BY or GET pattern reads keys the pattern forms; like Redis Cluster,
/// that is allowed only when those keys are in the slot of the sorted key (a `{tag}` in the
/// pattern). The error Redis Cluster gives otherwise.
pub fn sort_pattern_error(req: &Request<'_>) -> Option<&'static [u8]> {
    let key_slot = router::slot(req.arg(1));
    sort_patterns(req).find_map(|(by, pat)| {
        let other_slot = pat.contains(&b'*') && pattern_slot(pat) != Some(key_slot);
        match by {
            true if other_slot => Some(reply::SORT_BY_DENIED),
            false if other_slot && pat != b"#" => Some(reply::SORT_GET_DENIED),
            _ => None,
        }
    })
}

/// SORT's BY pattern (with a `*`) or GET reads keys the user's patterns do not cover: Redis
/// refuses both to a user without access to every key, whatever the pattern.
pub fn sort_acl_error(req: &Request<'_>) -> Option<&'static [u8]> {
    sort_patterns(req).find_map(|(by, pat)| match by {
        true if pat.contains(&b'*') => Some(reply::SORT_BY_ACL),
        true => None,
        false => Some(reply::SORT_GET_ACL),
    })
}

/// The one slot every key a SORT pattern can form hashes to (Redis's `patternHashSlot`):
/// the slot of a non-empty `{tag}` that comes before any wildcard, else `None`.
pub fn pattern_slot(p: &[u8]) -> Option<u16> {
    let mut open: Option<usize> = None;
    for (i, &c) in p.iter().enumerate() {
        match c {
            b'*' | b'?' | b'[' | b'\\' => return None,
            b'{' if open.is_none() => open = Some(i),
            b'}' if open.is_some_and(|o| i == o + 1) => return None,
            b'}' if open.is_some() => {
                let o = open.unwrap_or(0);
                return Some(router::slot(&p[o + 1..i]));
            }
            _ => {}
        }
    }
    None
}

/// CONFIG SET parameters that only tune data behaviour, identical on every shard; anything
/// else (ports, persistence, replication, ACL, directories…) is refused.
pub const CONFIG_SET_ALLOWED: &[&str] = &[
    "*-max-listpack-entries",
    "*-max-listpack-value",
    "*-max-ziplist-entries",
    "*-max-ziplist-value",
    "*-max-intset-entries",
    "active-defrag-*",
    "active-expire-effort",
    "activedefrag",
    "busy-reply-threshold",
    "hll-sparse-max-bytes",
    "hz",
    "dynamic-hz",
    "latency-monitor-threshold",
    "latency-tracking",
    "latency-tracking-info-percentiles",
    "lazyfree-lazy-*",
    "lfu-decay-time",
    "lfu-log-factor",
    "list-compress-depth",
    // The list encoding threshold, and its legacy alias (issue 13.2).
    "list-max-listpack-size",
    "list-max-ziplist-size",
    "lua-time-limit",
    "maxmemory",
    "maxmemory-eviction-tenacity",
    "maxmemory-policy",
    "maxmemory-samples",
    "notify-keyspace-events",
    "slowlog-log-slower-than",
    "slowlog-max-len",
    "stream-node-max-bytes",
    "stream-node-max-entries",
];

/// What slotgate does itself along with a command it sends to every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlsoHere {
    Nothing,
    /// CONFIG RESETSTAT: slotgate's own statistics restart from zero too.
    ResetStats,
    /// SLOWLOG RESET: slotgate's own slow log too.
    ResetSlowlog,
    /// SCRIPT … / FUNCTION …: noted, so that shards that join later get the same scripts.
    NoteScripts,
}

/// What slotgate does itself along with `name`, an all-shards command.
pub fn also_here(name: &str) -> AlsoHere {
    match name {
        "config|resetstat" => AlsoHere::ResetStats,
        "slowlog|reset" => AlsoHere::ResetSlowlog,
        n if n.starts_with("script|") || n.starts_with("function|") => AlsoHere::NoteScripts,
        _ => AlsoHere::Nothing,
    }
}

/// The first parameter of a CONFIG SET (`name`) that is not on the allowlist.
pub fn config_set_refused(name: &str, req: &Request<'_>) -> Option<String> {
    if name != "config|set" {
        return None;
    }
    (2..req.argc()).step_by(2).find_map(|i| {
        let p = String::from_utf8_lossy(req.arg(i)).to_ascii_lowercase();
        let ok = CONFIG_SET_ALLOWED
            .iter()
            .any(|a| match a.strip_prefix('*') {
                Some(suffix) => p.ends_with(suffix),
                None => match a.strip_suffix('*') {
                    Some(prefix) => p.starts_with(prefix),
                    None => p == *a,
                },
            });
        (!ok).then_some(p)
    })
}

/// For the commands that name pub/sub channels: where the channels start, and whether they
/// are patterns (PSUBSCRIBE).
pub fn channel_args(name: &str) -> Option<(usize, bool)> {
    match name {
        "subscribe" | "ssubscribe" | "publish" | "spublish" => Some((1, false)),
        "psubscribe" => Some((1, true)),
        _ => None,
    }
}

/// Where a pub/sub command (route `PubSub`) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSubRoute {
    /// Classic channels' PUBLISH and PUBSUB: they live on the first shard.
    FirstShard,
    /// PUBSUB SHARDCHANNELS: every shard's list, concatenated.
    EveryShardConcat,
    /// PUBSUB SHARDNUMSUB: every shard's counts, added up.
    EveryShardSum,
    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE, on the client's subscriber connections;
    /// `sharded` ones by the slot of their channels.
    Subscription { sharded: bool },
}

/// Where the pub/sub command `name` goes.
pub fn pubsub_route(name: &str) -> PubSubRoute {
    match name {
        "publish" | "pubsub|channels" | "pubsub|numsub" | "pubsub|numpat" | "pubsub|help" => {
            PubSubRoute::FirstShard
        }
        "pubsub|shardchannels" => PubSubRoute::EveryShardConcat,
        "pubsub|shardnumsub" => PubSubRoute::EveryShardSum,
        n => PubSubRoute::Subscription {
            sharded: matches!(n, "ssubscribe" | "sunsubscribe"),
        },
    }
}

/// Whether read-through rules apply to the single-key command `name` (GET; an MGET of
/// read-through keys is a scatter command).
#[inline]
pub fn reads_through(name: &str) -> bool {
    name == "get"
}

/// Whether `name` is EXEC (CLIENT PAUSE WRITE holds it when its transaction may write).
pub fn is_exec(name: &str) -> bool {
    name == "exec"
}
