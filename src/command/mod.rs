//! The command table: one row of data per Redis 7.0 command, and the lookups over it.
//!
//! Rows are generated from a real `redis-server`'s `COMMAND` reply by
//! `scripts/gen_command_table.py` (see `table.rs`), then given a [`Route`] by the lists in that
//! script. Routing code never matches on command names except for the few commands the proxy
//! answers itself ([`Route::Local`]).

pub mod keys;
pub mod policy;
mod table;

pub use table::COMMANDS;

/// Command flags, a subset of Redis's `COMMAND` flags that the proxy acts on.
pub mod flags {
    pub const WRITE: u32 = 1 << 0;
    pub const READONLY: u32 = 1 << 1;
    pub const DENYOOM: u32 = 1 << 2;
    pub const ADMIN: u32 = 1 << 3;
    pub const PUBSUB: u32 = 1 << 4;
    pub const NOSCRIPT: u32 = 1 << 5;
    pub const BLOCKING: u32 = 1 << 6;
    pub const LOADING: u32 = 1 << 7;
    pub const STALE: u32 = 1 << 8;
    pub const NO_AUTH: u32 = 1 << 9;
    pub const FAST: u32 = 1 << 10;
    pub const MOVABLEKEYS: u32 = 1 << 11;
    pub const NO_MULTI: u32 = 1 << 12;
    pub const ALLOW_BUSY: u32 = 1 << 13;
    /// Not a write, but may cause one to be replicated (EVAL, FCALL, PUBLISH, PFCOUNT …):
    /// held by CLIENT PAUSE WRITE like a write.
    pub const MAY_REPLICATE: u32 = 1 << 14;
}

/// Redis ACL categories (`@read`, `@write` …), as `COMMAND` reports them per command.
pub mod acl {
    pub const KEYSPACE: u32 = 1 << 0;
    pub const READ: u32 = 1 << 1;
    pub const WRITE: u32 = 1 << 2;
    pub const SET: u32 = 1 << 3;
    pub const SORTEDSET: u32 = 1 << 4;
    pub const LIST: u32 = 1 << 5;
    pub const HASH: u32 = 1 << 6;
    pub const STRING: u32 = 1 << 7;
    pub const BITMAP: u32 = 1 << 8;
    pub const HYPERLOGLOG: u32 = 1 << 9;
    pub const GEO: u32 = 1 << 10;
    pub const STREAM: u32 = 1 << 11;
    pub const PUBSUB: u32 = 1 << 12;
    pub const ADMIN: u32 = 1 << 13;
    pub const FAST: u32 = 1 << 14;
    pub const SLOW: u32 = 1 << 15;
    pub const BLOCKING: u32 = 1 << 16;
    pub const DANGEROUS: u32 = 1 << 17;
    pub const CONNECTION: u32 = 1 << 18;
    pub const TRANSACTION: u32 = 1 << 19;
    pub const SCRIPTING: u32 = 1 << 20;
    /// Every category.
    pub const ALL: u32 = (1 << 21) - 1;

    /// Category names without the `@`, as Redis spells them.
    pub const NAMES: &[(&str, u32)] = &[
        ("keyspace", KEYSPACE),
        ("read", READ),
        ("write", WRITE),
        ("set", SET),
        ("sortedset", SORTEDSET),
        ("list", LIST),
        ("hash", HASH),
        ("string", STRING),
        ("bitmap", BITMAP),
        ("hyperloglog", HYPERLOGLOG),
        ("geo", GEO),
        ("stream", STREAM),
        ("pubsub", PUBSUB),
        ("admin", ADMIN),
        ("fast", FAST),
        ("slow", SLOW),
        ("blocking", BLOCKING),
        ("dangerous", DANGEROUS),
        ("connection", CONNECTION),
        ("transaction", TRANSACTION),
        ("scripting", SCRIPTING),
        ("all", ALL),
    ];
}

/// The permissions a key of a key spec needs (Redis 7.0's key-spec flags `access` → read;
/// `insert`/`update`/`delete` → write; neither → either one suffices).
pub mod access {
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
}

/// How the proxy serves a command. One strategy per kind, not per command (Envoy's
/// `SimpleRequest`/`MGETRequest`/`SplitKeysSumResultRequest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Answered by the proxy itself (PING, ECHO, HELLO, SELECT, CLIENT …, COMMAND, INFO, TIME …).
    Local,
    /// All keys must hash to one slot (else `-CROSSSLOT`); forwarded to the shard owning it.
    /// A keyless command of this class goes to the first shard.
    Single,
    /// Keyless and harmless on any shard (e.g. `LOLWUT`, `MEMORY DOCTOR`): the first shard.
    AnyShard,
    /// Multi-key command split per shard and merged (MGET, MSET, DEL, EXISTS, UNLINK, TOUCH).
    Scatter(Merge),
    /// Sent to every shard and merged (DBSIZE, KEYS, FLUSHDB, FLUSHALL, CONFIG SET …).
    AllShards(Merge),
    /// Would break the proxy's model (SHUTDOWN, DEBUG, REPLICAOF, MODULE, CLUSTER …): refused.
    Refused,
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH: a transaction on a dedicated connection to the
    /// shard of its keys (see `session::tx`).
    Transaction,
    /// BLPOP and friends, WAIT: a dedicated connection for the command's duration, with the
    /// client's own timeout.
    Blocking,
    /// SUBSCRIBE and friends, PUBLISH, PUBSUB: see `pubsub`. (SPUBLISH is `Single`: its
    /// channel routes like a key.)
    PubSub,
    /// A stateful family that a later version of slotgate serves: refused with a clear error,
    /// never a hang. (None left in this version.)
    NotYet,
}

/// The command classes the dashboard and `slotgate_requests_total` count by (see
/// [`Route::class`]).
pub const CLASSES: &[&str] = &[
    "single",
    "multi_key",
    "all_shards",
    "local",
    "transaction",
    "blocking",
    "pubsub",
    "refused",
];

/// The class of the command named as the command table names it (`get`, `client|list`);
/// `refused` for a name not in the table.
pub fn class_of(name: &str) -> &'static str {
    let (container, sub) = match name.split_once('|') {
        Some((c, s)) => (c, Some(s)),
        None => (name, None),
    };
    let spec = lookup(container.as_bytes())
        .and_then(|c| sub.map_or(Some(c), |s| lookup_sub(c, s.as_bytes())));
    spec.map_or("refused", |s| s.route.class())
}

impl Route {
    /// The class a command of this route counts under: one of [`CLASSES`].
    pub fn class(&self) -> &'static str {
        CLASSES[self.class_index()]
    }

    /// The index of [`class`](Self::class) in [`CLASSES`].
    pub fn class_index(&self) -> usize {
        match self {
            Route::Single | Route::AnyShard => 0,
            Route::Scatter(_) => 1,
            Route::AllShards(_) => 2,
            Route::Local => 3,
            Route::Transaction => 4,
            Route::Blocking => 5,
            Route::PubSub => 6,
            Route::Refused | Route::NotYet => 7,
        }
    }
}

/// How the replies of several shards become one reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// One element per key, in the order of the request's keys (MGET).
    ArrayInOrder,
    /// Sum of the integer replies (DEL, EXISTS, UNLINK, TOUCH, DBSIZE).
    SumIntegers,
    /// `+OK` when every shard said `+OK`, else the first error (MSET, FLUSHDB, CONFIG SET).
    AllOk,
    /// Concatenation of the array replies, shard by shard (KEYS).
    ConcatArrays,
    /// SCAN: one shard after the other, its cursor carrying the shard (see `fanout`).
    Scan,
    /// RANDOMKEY: a shard picked at random.
    RandomKey,
    /// SLOWLOG LEN: the shards' lengths and slotgate's own, added up.
    SlowlogLen,
    /// Every shard must answer the same (SCRIPT LOAD's SHA, FUNCTION LOAD's name): that reply.
    Same,
    /// Arrays of 0/1 combined element by element with AND (SCRIPT EXISTS: loaded everywhere).
    AndIntArrays,
    /// `+OK` if any shard said OK (SCRIPT KILL: the shard running a script), else the first
    /// reply.
    AnyOk,
    /// SLOWLOG GET: the shards' entries merged newest first (see `fanout`).
    SlowlogEntries,
    /// LATENCY LATEST: the shards' events, each named `<shard>/<event>`.
    LatencyLatest,
    /// LATENCY HISTORY: the shards' samples in time order.
    LatencyHistory,
    /// LATENCY DOCTOR: the shards' reports, one after the other, each under its shard.
    LatencyDoctor,
}

/// Where a command's keys are, mirroring Redis 7 key specs (`COMMAND INFO` → key specifications).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// Bits of [`access`]: what a user needs on this spec's keys.
    pub access: u8,
    pub begin: BeginSearch,
    pub find: FindKeys,
}

/// Where the search for keys starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeginSearch {
    /// At this argument index (0 is the command name).
    Index(i32),
    /// After the first (or, with negative `startfrom`, the last) argument equal to `keyword`,
    /// case-insensitively, searching from `startfrom`.
    Keyword {
        keyword: &'static str,
        startfrom: i32,
    },
    /// Redis cannot describe it (e.g. SORT's BY/GET patterns): those keys are ignored.
    Unknown,
}

/// How many keys follow the begin point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FindKeys {
    /// Keys from the begin point up to `lastkey` (relative; negative counts from the end),
    /// every `keystep` args; `limit` > 1 means "only 1/limit of the remaining args".
    Range {
        lastkey: i32,
        keystep: i32,
        limit: i32,
    },
    /// The argument at `keynumidx` (relative to begin) holds the key count; keys start at
    /// `firstkey` (relative to begin) every `keystep` args.
    Keynum {
        keynumidx: i32,
        firstkey: i32,
        keystep: i32,
    },
    Unknown,
}

/// One row of the command table.
#[derive(Debug)]
pub struct CommandSpec {
    /// Lower-case name; a subcommand is `container|sub` (e.g. `config|get`), as Redis spells it.
    pub name: &'static str,
    /// Redis arity convention: `n` means exactly n arguments (name included), `-n` at least n.
    pub arity: i32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// Bits of [`acl`]: the command's ACL categories.
    pub acl: u32,
    /// Key specifications, in Redis order.
    pub key_specs: &'static [KeySpec],
    pub route: Route,
    /// Subcommand rows for container commands (CONFIG, CLIENT …), sorted by name.
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    /// Whether `argc` arguments (command name included) satisfy this command's arity.
    #[inline]
    pub fn arity_ok(&self, argc: usize) -> bool {
        let a = self.arity;
        if a >= 0 {
            argc == a as usize
        } else {
            argc >= a.unsigned_abs() as usize
        }
    }

    /// The Redis flag test.
    #[inline]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether the command may write its keys: a write command, or a script or function
    /// that is not read-only (EVAL, EVALSHA, FCALL: Redis does not flag them as writes, but
    /// what they do to their declared keys is up to the script).
    #[inline]
    pub fn may_write_keys(&self) -> bool {
        self.has(flags::WRITE)
            || (self.acl & acl::SCRIPTING != 0
                && !self.has(flags::READONLY)
                && !self.key_specs.is_empty())
    }

    /// Whether this row is a container command with subcommands (CONFIG, CLIENT …).
    #[inline]
    pub fn is_container(&self) -> bool {
        !self.subcommands.is_empty()
    }
    /// EVAL, EVALSHA, EVAL_RO, EVALSHA_RO, FCALL, FCALL_RO: commands that run other commands
    /// on the shard.
    pub fn runs_script(&self) -> bool {
        self.acl & acl::SCRIPTING != 0
            && (self.name.starts_with("eval") || self.name.starts_with("fcall"))
    }
}

/// Commands a script must not run through slotgate: those slotgate refuses that a script
/// could call (not `NOSCRIPT`), and `SELECT` (clients of the proxy have database 0 only). As
/// `ACL SETUSER` names: a container, or `container|sub` when only some subcommands are
/// refused.
pub fn refused_in_scripts() -> &'static [String] {
    static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let mut out = vec!["select".to_string()];
        for c in table::COMMANDS {
            let refused = |s: &CommandSpec| s.route == Route::Refused && !s.has(flags::NOSCRIPT);
            if c.subcommands.is_empty() {
                if refused(c) {
                    out.push(c.name.to_string());
                }
            } else if c.route == Route::Refused
                && c.subcommands.iter().all(|s| s.route == Route::Refused)
            {
                if c.subcommands.iter().any(refused) {
                    out.push(c.name.to_string());
                }
            } else {
                out.extend(
                    c.subcommands
                        .iter()
                        .filter(|s| refused(s))
                        .map(|s| s.name.to_string()),
                );
            }
        }
        out
    })
}

/// Case-insensitive lookup of a top-level command. No allocation: names longer than any
/// command are rejected before comparing. The probe is lowered into a stack buffer and found
/// through `INDEX`, a hash index built at compile time (a binary search over the names cost
/// about eight string comparisons per command).
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    const MAX: usize = 32;
    if name.is_empty() || name.len() > MAX {
        return None;
    }
    let mut buf = [0u8; MAX];
    let lower = &mut buf[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let lower: &[u8] = lower;
    let mut at = name_hash(lower);
    loop {
        let i = INDEX[at];
        if i == EMPTY {
            return None;
        }
        let spec = &COMMANDS[i as usize];
        if spec.name.as_bytes() == lower {
            return Some(spec);
        }
        at = (at + 1) & (INDEX_SIZE - 1);
    }
}

/// Slots of [`INDEX`]: a power of two, at least four times the number of commands, so probe
/// runs stay short.
const INDEX_SIZE: usize = 1024;
const EMPTY: u16 = u16::MAX;

/// Open-addressing hash index over [`COMMANDS`]: slot → position in the table.
static INDEX: [u16; INDEX_SIZE] = {
    assert!(COMMANDS.len() * 4 <= INDEX_SIZE);
    let mut index = [EMPTY; INDEX_SIZE];
    let mut i = 0;
    while i < COMMANDS.len() {
        let mut at = name_hash(COMMANDS[i].name.as_bytes());
        while index[at] != EMPTY {
            at = (at + 1) & (INDEX_SIZE - 1);
        }
        index[at] = i as u16;
        i += 1;
    }
    index
};

/// FNV-1a of a lowered command name, folded to an [`INDEX`] slot.
const fn name_hash(name: &[u8]) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        h ^= name[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    (h >> 16) as usize & (INDEX_SIZE - 1)
}

/// Case-insensitive lookup of `sub` among a container's subcommands.
pub fn lookup_sub(container: &'static CommandSpec, sub: &[u8]) -> Option<&'static CommandSpec> {
    let prefix = container.name.len() + 1;
    container.subcommands.iter().find(|s| {
        let tail = &s.name.as_bytes()[prefix..];
        tail.eq_ignore_ascii_case(sub)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_found_through_the_index_in_any_case() {
        for c in COMMANDS {
            assert!(std::ptr::eq(lookup(c.name.as_bytes()).unwrap(), c));
            let upper = c.name.to_ascii_uppercase();
            assert!(std::ptr::eq(lookup(upper.as_bytes()).unwrap(), c));
            let longer = format!("{}x", c.name);
            assert!(lookup(longer.as_bytes()).is_none_or(|o| o.name == longer));
        }
        assert!(lookup(&[b'a'; 33]).is_none());
    }

    #[test]
    fn table_is_sorted() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        for c in COMMANDS {
            for w in c.subcommands.windows(2) {
                assert!(w[0].name < w[1].name);
            }
        }
    }

    #[test]
    fn lookup_is_case_insensitive() {
        assert_eq!(lookup(b"GeT").unwrap().name, "get");
        assert_eq!(lookup(b"get").unwrap().arity, 2);
        assert!(lookup(b"nosuchcommand").is_none());
        assert!(lookup(b"").is_none());
        let config = lookup(b"CONFIG").unwrap();
        assert_eq!(lookup_sub(config, b"get").unwrap().name, "config|get");
        assert!(lookup_sub(config, b"nope").is_none());
    }

    #[test]
    fn arity_convention() {
        let get = lookup(b"get").unwrap();
        assert!(get.arity_ok(2) && !get.arity_ok(1) && !get.arity_ok(3));
        let mget = lookup(b"mget").unwrap();
        assert!(mget.arity_ok(2) && mget.arity_ok(10) && !mget.arity_ok(1));
    }
}
#[cfg(test)]
mod refused_tests {
    /// What a tenant's script may not do through slotgate: the commands slotgate refuses
    /// (and SELECT), not the ones it serves.
    #[test]
    fn scripts_are_denied_what_slotgate_refuses() {
        let list = super::refused_in_scripts();
        for c in [
            "select",
            "move",
            "swapdb",
            "migrate",
            "module",
            "memory|purge",
        ] {
            assert!(list.iter().any(|x| x == c), "{c} missing from {list:?}");
        }
        for c in ["get", "eval", "keys", "flushall", "config", "shutdown"] {
            assert!(!list.iter().any(|x| x == c), "{c} in {list:?}");
        }
    }
}
