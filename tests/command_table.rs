//! The generated command table and the key-spec interpreter, checked against a real
//! `redis-server`: every row against `COMMAND INFO` (a stale `table.rs` fails here), and a corpus
//! of concrete commands against `COMMAND GETKEYS`.

mod support;

use std::collections::BTreeMap;

use redis::Value;
use slotgate::command::keys::{KeysError, key_indices};
use slotgate::command::{
    BeginSearch, COMMANDS, CommandSpec, FindKeys, KeySpec, access, acl, flags, lookup, lookup_sub,
};
use support::RedisServer;

/// Rows the 7.0 server lacks; added by the generator.
const SYNTHETIC: &[&str] = &["client|no-touch", "client|setinfo"];

/// Key specs the generator replaces on purpose (see `KEYSPEC_OVERRIDES` in the script).
const OVERRIDDEN_SPECS: &[(&str, usize)] = &[("sort", 2)];

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".to_string(),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        other => panic!("expected an array, got {other:?}"),
    }
}

/// A RESP2 flat key/value array (or a RESP3 map) as a map.
fn pairs(v: &Value) -> BTreeMap<String, Value> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        Value::Array(a) => a
            .chunks(2)
            .map(|kv| (text(&kv[0]), kv[1].clone()))
            .collect(),
        other => panic!("expected key/value pairs, got {other:?}"),
    }
}

fn redis_key_spec(v: &Value) -> KeySpec {
    let spec = pairs(v);
    let bs = pairs(&spec["begin_search"]);
    let fk = pairs(&spec["find_keys"]);
    let i32_of = |m: &BTreeMap<String, Value>, k: &str| int(&m[k]) as i32;
    let begin = match text(&bs["type"]).as_str() {
        "index" => BeginSearch::Index(i32_of(&pairs(&bs["spec"]), "index")),
        "keyword" => {
            let s = pairs(&bs["spec"]);
            BeginSearch::Keyword {
                // Leaked: a test process, a few dozen short strings.
                keyword: Box::leak(text(&s["keyword"]).into_boxed_str()),
                startfrom: i32_of(&s, "startfrom"),
            }
        }
        "unknown" => BeginSearch::Unknown,
        other => panic!("begin_search type {other}"),
    };
    let find = match text(&fk["type"]).as_str() {
        "range" => {
            let s = pairs(&fk["spec"]);
            FindKeys::Range {
                lastkey: i32_of(&s, "lastkey"),
                keystep: i32_of(&s, "keystep"),
                limit: i32_of(&s, "limit"),
            }
        }
        "keynum" => {
            let s = pairs(&fk["spec"]);
            FindKeys::Keynum {
                keynumidx: i32_of(&s, "keynumidx"),
                firstkey: i32_of(&s, "firstkey"),
                keystep: i32_of(&s, "keystep"),
            }
        }
        "unknown" => FindKeys::Unknown,
        other => panic!("find_keys type {other}"),
    };
    let kflags: Vec<String> = array(&spec["flags"])
        .iter()
        .map(|f| text(f).to_lowercase())
        .collect();
    let mut need = 0;
    if kflags.iter().any(|f| f == "access") {
        need |= access::READ;
    }
    if kflags
        .iter()
        .any(|f| matches!(f.as_str(), "insert" | "update" | "delete"))
    {
        need |= access::WRITE;
    }
    KeySpec {
        access: need,
        begin,
        find,
    }
}

fn redis_acl(v: &Value) -> u32 {
    array(v)
        .iter()
        .map(|c| {
            let c = text(c).to_lowercase();
            let name = c.trim_start_matches('@');
            acl::NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("unknown ACL category {c}"))
                .1
        })
        .fold(0, |a, b| a | b)
}

fn redis_flags(v: &Value) -> u32 {
    array(v)
        .iter()
        .map(|f| match text(f).as_str() {
            "write" => flags::WRITE,
            "readonly" => flags::READONLY,
            "denyoom" => flags::DENYOOM,
            "admin" => flags::ADMIN,
            "pubsub" => flags::PUBSUB,
            "noscript" => flags::NOSCRIPT,
            "blocking" => flags::BLOCKING,
            "loading" => flags::LOADING,
            "stale" => flags::STALE,
            "no_auth" => flags::NO_AUTH,
            "fast" => flags::FAST,
            "movablekeys" => flags::MOVABLEKEYS,
            "no_multi" => flags::NO_MULTI,
            "allow_busy" => flags::ALLOW_BUSY,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// Compares one row (and, recursively, its subcommands) with a `COMMAND INFO` entry.
fn check_row(row: &CommandSpec, info: &Value, problems: &mut Vec<String>) {
    let info = array(info);
    let name = text(&info[0]);
    if row.name != name {
        problems.push(format!("{}: Redis names it {name}", row.name));
    }
    let arity = int(&info[1]);
    if i64::from(row.arity) != arity {
        problems.push(format!(
            "{}: arity {} vs Redis {arity}",
            row.name, row.arity
        ));
    }
    // MAY_REPLICATE is not in Redis 7.0's COMMAND reply: these six have it from Redis's
    // command JSON files (see scripts/gen_command_table.py).
    let may_replicate = ["eval", "evalsha", "fcall", "pfcount", "publish", "spublish"];
    let rflags = redis_flags(&info[2])
        | if may_replicate.contains(&row.name) {
            flags::MAY_REPLICATE
        } else {
            0
        };
    if row.flags != rflags {
        problems.push(format!(
            "{}: flags {:#x} vs Redis {rflags:#x}",
            row.name, row.flags
        ));
    }
    let racl = redis_acl(&info[6]);
    if row.acl != racl {
        problems.push(format!(
            "{}: ACL categories {:#x} vs Redis {racl:#x}",
            row.name, row.acl
        ));
    }
    let specs: Vec<KeySpec> = array(&info[8]).iter().map(redis_key_spec).collect();
    if row.key_specs.len() != specs.len() {
        problems.push(format!(
            "{}: {} key specs vs Redis {}",
            row.name,
            row.key_specs.len(),
            specs.len()
        ));
    } else {
        for (i, (ours, theirs)) in row.key_specs.iter().zip(&specs).enumerate() {
            if OVERRIDDEN_SPECS.contains(&(row.name, i)) {
                continue;
            }
            if ours != theirs {
                problems.push(format!(
                    "{} key spec #{i}: {ours:?} vs Redis {theirs:?}",
                    row.name
                ));
            }
        }
    }
    let subs: BTreeMap<String, &Value> = array(&info[9])
        .iter()
        .map(|s| (text(&array(s)[0]), s))
        .collect();
    for sub in row.subcommands {
        match subs.get(sub.name) {
            Some(s) => check_row(sub, s, problems),
            None if SYNTHETIC.contains(&sub.name) => {}
            None => problems.push(format!("{}: unknown to Redis", sub.name)),
        }
    }
    for name in subs.keys() {
        if !row.subcommands.iter().any(|s| s.name == name) {
            problems.push(format!("{name}: missing from the table"));
        }
    }
}

#[test]
fn table_matches_command_info() {
    let redis = RedisServer::start();
    let mut con = redis.client();

    // slotgate's own commands (SLOTGATE.*) are not Redis's.
    let redis_rows: Vec<&CommandSpec> = COMMANDS
        .iter()
        .filter(|c| !c.name.starts_with("slotgate."))
        .collect();
    assert_eq!(
        COMMANDS.len() - redis_rows.len(),
        5,
        "SLOTGATE.INVALIDATE, STATUS, RELOAD, HOTKEYS and BIGKEYS"
    );
    let count: i64 = redis::cmd("COMMAND").arg("COUNT").query(&mut con).unwrap();
    assert_eq!(redis_rows.len() as i64, count, "top-level command count");

    let mut info = redis::cmd("COMMAND");
    info.arg("INFO");
    for row in &redis_rows {
        info.arg(row.name);
    }
    let reply: Value = info.query(&mut con).unwrap();
    let reply = array(&reply);
    assert_eq!(reply.len(), redis_rows.len());

    let mut problems = Vec::new();
    for (row, entry) in redis_rows.iter().copied().zip(reply) {
        if *entry == Value::Nil {
            problems.push(format!("{}: unknown to Redis", row.name));
        } else {
            check_row(row, entry, &mut problems);
        }
    }
    for name in SYNTHETIC {
        let (container, sub) = name.split_once('|').unwrap();
        let row = lookup(container.as_bytes()).and_then(|c| lookup_sub(c, sub.as_bytes()));
        assert!(row.is_some(), "synthetic row {name} missing");
    }
    assert!(
        problems.is_empty(),
        "stale table (rerun scripts/gen_command_table.py):\n{}",
        problems.join("\n")
    );
}

/// Concrete commands whose keys must be what `COMMAND GETKEYS` says. Covers every movablekeys
/// command of Redis 7.0 plus ordinary and subcommand shapes.
const CORPUS: &[&[&str]] = &[
    // Ordinary single-key and fixed-position commands.
    &["GET", "k"],
    &["SET", "k", "v", "EX", "10"],
    &["SET", "k", "v", "GET"],
    &["GETEX", "k", "PERSIST"],
    &["GETDEL", "k"],
    &["INCRBY", "k", "2"],
    &["EXPIRE", "k", "10"],
    &["DUMP", "k"],
    &["RESTORE", "k", "0", "payload"],
    &["HSET", "h", "f", "v", "f2", "v2"],
    &["LPOS", "l", "x", "RANK", "1"],
    &["SMISMEMBER", "s", "a", "b"],
    &["BITFIELD", "k", "GET", "u8", "0"],
    &["BITFIELD_RO", "k", "GET", "u8", "0"],
    &["XADD", "s", "*", "f", "v"],
    &["XCLAIM", "s", "g", "c", "0", "0-1"],
    // Multi-key, fixed shape.
    &["MSET", "a", "1", "b", "2", "c", "3"],
    &["MGET", "a", "b", "c"],
    &["DEL", "a", "b"],
    &["EXISTS", "a", "b", "a"],
    &["UNLINK", "a"],
    &["TOUCH", "a", "b"],
    &["RENAME", "a", "b"],
    &["RENAMENX", "a", "b"],
    &["COPY", "a", "b", "REPLACE"],
    &["LMOVE", "a", "b", "LEFT", "RIGHT"],
    &["BLMOVE", "a", "b", "LEFT", "RIGHT", "0"],
    &["RPOPLPUSH", "a", "b"],
    &["BRPOPLPUSH", "a", "b", "0"],
    &["SMOVE", "a", "b", "m"],
    &["BITOP", "AND", "dst", "a", "b", "c"],
    &["PFMERGE", "dst", "a", "b"],
    &["PFCOUNT", "a", "b"],
    &["SINTERSTORE", "dst", "a", "b"],
    &["SUNION", "a", "b"],
    &["SDIFFSTORE", "dst", "a", "b", "c"],
    &["LCS", "a", "b"],
    &["ZRANGESTORE", "dst", "src", "0", "-1"],
    &["BLPOP", "a", "b", "0"],
    &["BRPOP", "a", "1"],
    &["BZPOPMIN", "a", "b", "0"],
    &["WATCH", "a", "b"],
    &[
        "GEOSEARCHSTORE",
        "dst",
        "src",
        "FROMMEMBER",
        "m",
        "BYRADIUS",
        "1",
        "km",
    ],
    &["GEOSEARCH", "src", "FROMMEMBER", "m", "BYRADIUS", "1", "km"],
    // Subcommands.
    &["OBJECT", "ENCODING", "k"],
    &["OBJECT", "FREQ", "k"],
    &["MEMORY", "USAGE", "k", "SAMPLES", "5"],
    &["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"],
    &["XGROUP", "DESTROY", "s", "g"],
    &["XINFO", "STREAM", "s", "FULL"],
    &["XINFO", "GROUPS", "s"],
    // Movablekeys: numkeys.
    &["ZUNIONSTORE", "dst", "2", "a", "b", "WEIGHTS", "1", "2"],
    &["ZINTERSTORE", "dst", "2", "a", "b", "AGGREGATE", "MAX"],
    &["ZDIFFSTORE", "dst", "2", "a", "b"],
    &["ZUNION", "2", "a", "b", "WITHSCORES"],
    &["ZINTER", "3", "a", "b", "c"],
    &["ZDIFF", "2", "a", "b"],
    &["ZINTERCARD", "2", "a", "b", "LIMIT", "5"],
    &["SINTERCARD", "3", "a", "b", "c"],
    &["LMPOP", "2", "a", "b", "LEFT", "COUNT", "2"],
    &["BLMPOP", "0", "2", "a", "b", "RIGHT"],
    &["ZMPOP", "2", "a", "b", "MIN"],
    &["BZMPOP", "1.5", "1", "a", "MAX", "COUNT", "3"],
    &["EVAL", "return 1", "2", "k1", "k2", "a1"],
    &["EVAL", "return 1", "0"],
    &["EVAL", "return 1", "0", "a1"],
    &[
        "EVALSHA",
        "0123456789abcdef0123456789abcdef01234567",
        "1",
        "k",
        "a",
    ],
    &["EVAL_RO", "return 1", "1", "k"],
    &[
        "EVALSHA_RO",
        "0123456789abcdef0123456789abcdef01234567",
        "2",
        "a",
        "b",
    ],
    &["FCALL", "f", "2", "a", "b", "x"],
    &["FCALL", "f", "0"],
    &["FCALL_RO", "f", "1", "a"],
    // Movablekeys: keywords.
    &["XREAD", "COUNT", "1", "STREAMS", "s1", "s2", "0", "0"],
    &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "COUNT",
        "1",
        "STREAMS",
        "s1",
        "s2",
        ">",
        ">",
    ],
    &["SORT", "k"],
    &[
        "SORT", "k", "BY", "w_*", "LIMIT", "0", "10", "GET", "#", "ALPHA", "STORE", "dst",
    ],
    &["SORT", "k", "STORE", "dst", "DESC"],
    &["SORT_RO", "k", "BY", "nosort"],
    &["MIGRATE", "h", "6379", "k", "0", "5000"],
    &["MIGRATE", "h", "6379", "k", "0", "5000", "COPY", "REPLACE"],
    &["GEORADIUS", "g", "1", "2", "3", "km"],
    &["GEORADIUS", "g", "1", "2", "3", "km", "STORE", "dst"],
    &[
        "GEORADIUS",
        "g",
        "1",
        "2",
        "3",
        "km",
        "WITHDIST",
        "STOREDIST",
        "dst",
    ],
    &["GEORADIUS_RO", "g", "1", "2", "3", "km"],
    &["GEORADIUSBYMEMBER", "g", "m", "3", "km", "STORE", "dst"],
    &["GEORADIUSBYMEMBER", "g", "m", "3", "km", "ASC"],
    &["GEORADIUSBYMEMBER_RO", "g", "m", "3", "km"],
    // Keyless.
    &["PING", "hello"],
    &["PUBLISH", "ch", "msg"],
    &["CONFIG", "GET", "maxmemory"],
];

/// Commands where we knowingly differ from `COMMAND GETKEYS`, with the keys we find.
/// MIGRATE's KEYS spec is INCOMPLETE, so Redis uses `migrateGetKeys`, which drops the empty
/// key at index 3; the spec interpreter keeps it (MIGRATE is refused by the proxy anyway).
const DIVERGENT: &[(&[&str], &[&str])] = &[(
    &[
        "MIGRATE", "h", "6379", "", "0", "5000", "AUTH", "pw", "KEYS", "a", "b",
    ],
    &["", "a", "b"],
)];

/// Arguments whose key positions are undeterminable: we must say `Err`, Redis must not find
/// keys either (an error, or "no keys" for commands whose keys are optional).
const INVALID: &[&[&str]] = &[
    &["ZUNIONSTORE", "dst", "abc", "a"],
    &["ZUNIONSTORE", "dst", "5", "a", "b"],
    &["ZUNION", "-1", "a"],
    &["LMPOP", "3", "a", "LEFT"],
    &["EVAL", "return 1", "-1", "a"],
    &["EVAL", "return 1", "3", "a"],
    &["SINTERCARD", "99999999999999999999", "a"],
    &["XREAD", "COUNT", "1", "STREAMS", "s1"],
];

fn row_for(cmd: &[&str]) -> &'static CommandSpec {
    let row = lookup(cmd[0].as_bytes()).unwrap_or_else(|| panic!("unknown command {cmd:?}"));
    if row.is_container() {
        lookup_sub(row, cmd[1].as_bytes()).unwrap_or_else(|| panic!("unknown subcommand {cmd:?}"))
    } else {
        row
    }
}

fn our_keys(cmd: &[&str]) -> Result<Vec<String>, KeysError> {
    let mut out = Vec::new();
    key_indices(row_for(cmd), cmd.len(), |i| cmd[i].as_bytes(), &mut out)?;
    Ok(out.iter().map(|&i| cmd[i].to_string()).collect())
}

/// `COMMAND GETKEYS`: the keys, or the error text. "No key arguments" counts as no keys.
fn redis_keys(con: &mut redis::Connection, cmd: &[&str]) -> Result<Vec<String>, String> {
    let reply: redis::RedisResult<Value> = redis::cmd("COMMAND").arg("GETKEYS").arg(cmd).query(con);
    match reply {
        Ok(v) => Ok(array(&v).iter().map(text).collect()),
        Err(e) if e.to_string().contains("no key arguments") => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn key_indices_match_command_getkeys() {
    let redis = RedisServer::start();
    let mut con = redis.client();
    assert!(CORPUS.len() >= 60);

    // Every movablekeys command (and subcommand) of the server is in the corpus.
    for row in COMMANDS {
        for r in std::iter::once(row).chain(row.subcommands) {
            if r.has(flags::MOVABLEKEYS) {
                let covered = CORPUS.iter().any(|c| std::ptr::eq(row_for(c), r));
                assert!(covered, "movablekeys command {} not in the corpus", r.name);
            }
        }
    }

    let mut problems = Vec::new();
    for cmd in CORPUS {
        let theirs = redis_keys(&mut con, cmd);
        let ours = our_keys(cmd);
        match (&ours, &theirs) {
            (Ok(o), Ok(t)) if o == t => {}
            _ => problems.push(format!("{cmd:?}: ours {ours:?}, Redis {theirs:?}")),
        }
    }
    for (cmd, expected) in DIVERGENT {
        let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        let ours = our_keys(cmd);
        if ours.as_ref() != Ok(&expected) {
            problems.push(format!("{cmd:?}: ours {ours:?}, expected {expected:?}"));
        }
        let theirs = redis_keys(&mut con, cmd);
        if theirs.as_ref() != Ok(&expected[1..].to_vec()) {
            problems.push(format!("{cmd:?}: Redis now says {theirs:?}"));
        }
    }
    for cmd in INVALID {
        let theirs = redis_keys(&mut con, cmd);
        let ours = our_keys(cmd);
        let redis_agrees = theirs.is_err() || matches!(&theirs, Ok(k) if k.is_empty());
        if ours.is_ok() || !redis_agrees {
            problems.push(format!("{cmd:?}: ours {ours:?}, Redis {theirs:?}"));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
