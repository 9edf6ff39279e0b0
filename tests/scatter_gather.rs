//! Multi-key commands split across shards (MGET, MSET, DEL, EXISTS, UNLINK, TOUCH) and
//! whole-keyspace commands (DBSIZE, KEYS, FLUSHDB, FLUSHALL, SCAN, RANDOMKEY) behave like one
//! plain Redis: replies are compared byte for byte with a reference redis-server.

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// `read` that retries when a signal interrupts it (EINTR).
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny RESP2 client that returns raw reply bytes.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Parses the first complete RESP2 reply of `buf`: `None` if incomplete.
fn parse(buf: &[u8]) -> Option<(Reply, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let first = *buf.first()?;
    let body = &buf[1..end];
    let text = || String::from_utf8_lossy(body).into_owned();
    let num = || -> i64 {
        std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad RESP number {:?}", String::from_utf8_lossy(body)))
    };
    let used = end + 2;
    match first {
        b'+' => Some((Reply::Status(text()), used)),
        b'-' => Some((Reply::Error(text()), used)),
        b':' => Some((Reply::Int(num()), used)),
        b'$' => {
            let n = num();
            if n < 0 {
                return Some((Reply::Bulk(None), used));
            }
            let total = used + n as usize + 2;
            if buf.len() < total {
                return None;
            }
            Some((
                Reply::Bulk(Some(buf[used..used + n as usize].to_vec())),
                total,
            ))
        }
        b'*' => {
            let n = num();
            if n < 0 {
                return Some((Reply::Array(None), used));
            }
            let mut off = used;
            let mut items = Vec::new();
            for _ in 0..n {
                let (r, l) = parse(&buf[off..])?;
                items.push(r);
                off += l;
            }
            Some((Reply::Array(Some(items)), off))
        }
        other => panic!(
            "not a RESP2 reply (type byte {:?}): {:?}",
            other as char,
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ),
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    name: &'static str,
}

impl Conn {
    fn connect(port: u16, name: &'static str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
            name,
        }
    }

    /// Sends one command and returns the raw bytes and parsed form of its reply.
    fn call(&mut self, args: &[&[u8]]) -> (Vec<u8>, Reply) {
        self.stream.write_all(&resp(args)).unwrap();
        self.read_reply(args)
    }

    fn read_reply(&mut self, args: &[&[u8]]) -> (Vec<u8>, Reply) {
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((r, n)) = parse(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..n).collect();
                return (raw, r);
            }
            let got = read_some(&mut self.stream, &mut chunk)
                .unwrap_or_else(|e| panic!("{}: no reply to {}: {e}", self.name, show(args)));
            assert!(
                got > 0,
                "{}: connection closed on {}",
                self.name,
                show(args)
            );
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

fn show(args: &[&[u8]]) -> String {
    args.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A slotgate over 3 shards plus a plain reference Redis.
struct Pair {
    shards: Vec<RedisServer>,
    _proxy: Slotgate,
    _reference: RedisServer,
    proxy: Conn,
    reference: Conn,
}

impl Pair {
    fn new() -> Self {
        let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
        let refs: Vec<&RedisServer> = shards.iter().collect();
        let proxy_proc = Slotgate::start(&refs);
        let reference = RedisServer::start();
        let proxy = Conn::connect(proxy_proc.port, "slotgate");
        let reference_conn = Conn::connect(reference.port, "redis");
        Pair {
            shards,
            _proxy: proxy_proc,
            _reference: reference,
            proxy,
            reference: reference_conn,
        }
    }

    /// Runs the command on both; asserts identical reply bytes; returns the parsed reply.
    fn same(&mut self, args: &[&[u8]]) -> Reply {
        let (want, r) = self.reference.call(args);
        let (got, _) = self.proxy.call(args);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "slotgate vs redis reply to `{}`",
            show(args)
        );
        r
    }

    fn same_str(&mut self, args: &[&str]) -> Reply {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.same(&a)
    }

    /// Runs on both; returns (slotgate, redis) parsed replies without comparing.
    fn both(&mut self, args: &[&str]) -> (Reply, Reply) {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        let (_, want) = self.reference.call(&a);
        let (_, got) = self.proxy.call(&a);
        (got, want)
    }

    fn shard_dbsizes(&self) -> Vec<i64> {
        self.shards
            .iter()
            .map(|s| redis::cmd("DBSIZE").query(&mut s.client()).unwrap())
            .collect()
    }
}

fn keys(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn cmd_with(head: &[&str], rest: &[String]) -> Vec<String> {
    head.iter()
        .map(|s| s.to_string())
        .chain(rest.iter().cloned())
        .collect()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn bulk_set(r: &Reply) -> Vec<String> {
    match r {
        Reply::Array(Some(items)) => items
            .iter()
            .map(|i| match i {
                Reply::Bulk(Some(b)) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("expected bulk string, got {other:?}"),
            })
            .collect(),
        other => panic!("expected array, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn mset_mget_across_shards_match_single_redis() {
    let mut p = Pair::new();
    let ks = keys(200, "sg:k");
    let mut mset = vec!["MSET".to_string()];
    for k in &ks {
        mset.push(k.clone());
        mset.push(format!("value-of-{k}"));
    }
    assert_eq!(p.same_str(&as_strs(&mset)), Reply::Status("OK".into()));
    let sizes = p.shard_dbsizes();
    assert!(
        sizes.iter().all(|&n| n > 0) && sizes.iter().sum::<i64>() == 200,
        "MSET of 200 keys must spread over all shards: {sizes:?}"
    );

    // 1 key, 200 keys, missing keys interleaved, duplicates.
    p.same_str(&["MGET", "sg:k0"]);
    p.same_str(&["MGET", "sg:missing"]);
    p.same_str(&as_strs(&cmd_with(&["MGET"], &ks)));
    let r = p.same_str(&[
        "MGET", "sg:k5", "nope1", "sg:k5", "sg:k199", "nope2", "sg:k0", "sg:k5",
    ]);
    assert_eq!(
        r,
        Reply::Array(Some(vec![
            Reply::Bulk(Some(b"value-of-sg:k5".to_vec())),
            Reply::Bulk(None),
            Reply::Bulk(Some(b"value-of-sg:k5".to_vec())),
            Reply::Bulk(Some(b"value-of-sg:k199".to_vec())),
            Reply::Bulk(None),
            Reply::Bulk(Some(b"value-of-sg:k0".to_vec())),
            Reply::Bulk(Some(b"value-of-sg:k5".to_vec())),
        ]))
    );
    let mut rev: Vec<String> = ks.iter().rev().cloned().collect();
    rev.extend(keys(50, "sg:absent"));
    p.same_str(&as_strs(&cmd_with(&["MGET"], &rev)));

    // Wrong types: MGET returns nil for non-string keys.
    p.same_str(&["RPUSH", "sg:list", "a", "b"]);
    p.same_str(&["HSET", "sg:hash", "f", "v"]);
    p.same_str(&["SADD", "sg:set", "m"]);
    let r = p.same_str(&["MGET", "sg:k1", "sg:list", "sg:hash", "sg:set", "sg:k2"]);
    assert_eq!(
        r,
        Reply::Array(Some(vec![
            Reply::Bulk(Some(b"value-of-sg:k1".to_vec())),
            Reply::Bulk(None),
            Reply::Bulk(None),
            Reply::Bulk(None),
            Reply::Bulk(Some(b"value-of-sg:k2".to_vec())),
        ])),
        "MGET of list/hash/set keys returns nil for them"
    );

    // MSET overwriting existing keys of other types, with duplicates (last one wins).
    p.same_str(&[
        "MSET",
        "sg:list",
        "now-a-string",
        "sg:k7",
        "first",
        "sg:k7",
        "second",
        "sg:k150",
        "x",
    ]);
    p.same_str(&["MGET", "sg:list", "sg:k7", "sg:k150"]);
    p.same_str(&["TYPE", "sg:list"]);
    // Binary-safe values.
    p.same(&[b"MSET", b"sg:bin1", b"\x00\r\n\xff", b"sg:bin2", b""]);
    p.same(&[b"MGET", b"sg:bin1", b"sg:bin2", b"sg:bin3"]);
}

#[test]
fn mset_and_mget_argument_errors_match_redis() {
    let mut p = Pair::new();
    let r = p.same_str(&["MSET", "a", "1", "b"]);
    assert!(
        matches!(r, Reply::Error(_)),
        "MSET with odd args is an error: {r:?}"
    );
    p.same_str(&["MSET", "a"]);
    p.same_str(&["MSET"]);
    p.same_str(&["MGET"]);
    p.same_str(&["DEL"]);
    p.same_str(&["EXISTS"]);
    p.same_str(&["UNLINK"]);
    p.same_str(&["TOUCH"]);
    // Nothing was written by the failed MSETs.
    assert_eq!(p.same_str(&["DBSIZE"]), Reply::Int(0));
    assert_eq!(p.shard_dbsizes(), vec![0, 0, 0]);
}

#[test]
fn del_exists_unlink_touch_count_like_single_redis() {
    let mut p = Pair::new();
    let ks = keys(60, "dk:");
    let mut mset = vec!["MSET".to_string()];
    for k in &ks {
        mset.push(k.clone());
        mset.push("v".into());
    }
    p.same_str(&as_strs(&mset));

    assert_eq!(p.same_str(&["EXISTS", "dk:1", "dk:1"]), Reply::Int(2));
    assert_eq!(
        p.same_str(&["EXISTS", "dk:1", "dk:2", "nope", "dk:3", "dk:1"]),
        Reply::Int(4)
    );
    assert_eq!(p.same_str(&["EXISTS", "nope"]), Reply::Int(0));
    assert_eq!(
        p.same_str(&as_strs(&cmd_with(&["EXISTS"], &ks))),
        Reply::Int(60)
    );
    assert_eq!(
        p.same_str(&["TOUCH", "dk:4", "dk:4", "nope", "dk:5"]),
        Reply::Int(3)
    );
    assert_eq!(
        p.same_str(&as_strs(&cmd_with(&["TOUCH"], &ks))),
        Reply::Int(60)
    );

    assert_eq!(p.same_str(&["DEL", "dk:1", "dk:1"]), Reply::Int(1));
    assert_eq!(p.same_str(&["DEL", "dk:1"]), Reply::Int(0));
    assert_eq!(
        p.same_str(&["DEL", "dk:2", "nope", "dk:3", "dk:2", "dk:40"]),
        Reply::Int(3)
    );
    assert_eq!(
        p.same_str(&["UNLINK", "dk:6", "dk:6", "dk:7", "nope"]),
        Reply::Int(2)
    );
    assert_eq!(p.same_str(&["UNLINK", "dk:6"]), Reply::Int(0));
    // DEL of keys of other types.
    p.same_str(&["LPUSH", "dk:list", "x"]);
    p.same_str(&["HSET", "dk:hash", "f", "v"]);
    assert_eq!(
        p.same_str(&["DEL", "dk:list", "dk:hash", "dk:8"]),
        Reply::Int(3)
    );
    // Everything else at once: all remaining keys plus gone ones.
    let r = p.same_str(&as_strs(&cmd_with(&["DEL"], &ks)));
    assert_eq!(r, Reply::Int(60 - 7));
    assert_eq!(p.same_str(&["DBSIZE"]), Reply::Int(0));
    assert_eq!(p.shard_dbsizes(), vec![0, 0, 0]);

    // Single-key forms.
    p.same_str(&["SET", "one", "1"]);
    assert_eq!(p.same_str(&["EXISTS", "one"]), Reply::Int(1));
    assert_eq!(p.same_str(&["TOUCH", "one"]), Reply::Int(1));
    assert_eq!(p.same_str(&["UNLINK", "one"]), Reply::Int(1));
}

#[test]
fn dbsize_keys_flushdb_flushall_cover_every_shard() {
    let mut p = Pair::new();
    assert_eq!(p.same_str(&["DBSIZE"]), Reply::Int(0));
    assert_eq!(p.same_str(&["KEYS", "*"]), Reply::Array(Some(vec![])));

    let ks = keys(300, "key:");
    let mut mset = vec!["MSET".to_string()];
    for k in &ks {
        mset.push(k.clone());
        mset.push("v".into());
    }
    p.same_str(&as_strs(&mset));
    p.same_str(&["LPUSH", "other:list", "a"]);
    p.same_str(&["SADD", "{key:}set", "a"]);
    let sizes = p.shard_dbsizes();
    assert!(
        sizes.iter().all(|&n| n > 0),
        "keys on all shards: {sizes:?}"
    );
    assert_eq!(p.same_str(&["DBSIZE"]), Reply::Int(302));

    for pattern in [
        "*",
        "key:1*",
        "key:?",
        "other:*",
        "{key:}*",
        "nomatch*",
        "key:[12]0",
    ] {
        let (got, want) = p.both(&["KEYS", pattern]);
        let mut g = bulk_set(&got);
        let mut w = bulk_set(&want);
        let g_len = g.len();
        g.sort();
        w.sort();
        assert_eq!(g, w, "KEYS {pattern} (order free)");
        let unique: HashSet<&String> = g.iter().collect();
        assert_eq!(unique.len(), g_len, "KEYS {pattern} returned duplicates");
    }

    assert_eq!(p.same_str(&["FLUSHDB"]), Reply::Status("OK".into()));
    assert_eq!(
        p.shard_dbsizes(),
        vec![0, 0, 0],
        "FLUSHDB must empty every shard"
    );
    assert_eq!(p.same_str(&["DBSIZE"]), Reply::Int(0));

    p.same_str(&as_strs(&mset));
    assert_eq!(p.same_str(&["FLUSHALL"]), Reply::Status("OK".into()));
    assert_eq!(
        p.shard_dbsizes(),
        vec![0, 0, 0],
        "FLUSHALL must empty every shard"
    );
    assert_eq!(p.same_str(&["KEYS", "*"]), Reply::Array(Some(vec![])));

    // The ASYNC/SYNC flavours too.
    p.same_str(&as_strs(&mset));
    assert_eq!(
        p.same_str(&["FLUSHDB", "ASYNC"]),
        Reply::Status("OK".into())
    );
    assert_eq!(p.shard_dbsizes(), vec![0, 0, 0]);
    p.same_str(&as_strs(&mset));
    assert_eq!(
        p.same_str(&["FLUSHALL", "SYNC"]),
        Reply::Status("OK".into())
    );
    assert_eq!(p.shard_dbsizes(), vec![0, 0, 0]);
}

/// Iterates SCAN with `extra` args until cursor 0; returns all keys (duplicates kept).
fn full_scan(c: &mut Conn, extra: &[&str]) -> Vec<String> {
    let mut cursor = "0".to_string();
    let mut all = Vec::new();
    for _ in 0..100_000 {
        let mut args: Vec<&[u8]> = vec![b"SCAN", cursor.as_bytes()];
        args.extend(extra.iter().map(|s| s.as_bytes()));
        let (_, r) = c.call(&args);
        let Reply::Array(Some(items)) = r else {
            panic!("SCAN reply is not an array: {r:?}")
        };
        assert_eq!(items.len(), 2, "SCAN reply has [cursor, keys]");
        let Reply::Bulk(Some(next)) = &items[0] else {
            panic!("SCAN cursor is not a bulk string: {:?}", items[0])
        };
        let next = String::from_utf8(next.clone()).unwrap();
        assert!(
            next.parse::<u64>().is_ok(),
            "SCAN cursor must be an unsigned integer, got {next:?}"
        );
        all.extend(bulk_set(&items[1]));
        if next == "0" {
            return all;
        }
        cursor = next;
    }
    panic!("SCAN did not finish after 100000 calls");
}

#[test]
fn scan_iterates_every_key_of_every_shard() {
    let mut p = Pair::new();
    // Empty keyspace: one call, cursor 0.
    assert_eq!(full_scan(&mut p.proxy, &[]), Vec::<String>::new());

    let mut expected: HashSet<String> = HashSet::new();
    let mut mset = vec!["MSET".to_string()];
    for i in 0..1000 {
        let k = if i % 3 == 0 {
            format!("user:{i}")
        } else {
            format!("item:{i}")
        };
        mset.push(k.clone());
        mset.push("v".into());
        expected.insert(k);
    }
    p.same_str(&as_strs(&mset));
    for k in ["user:list", "user:{tag}a", "user:{tag}b"] {
        p.same_str(&["RPUSH", k, "x"]);
        expected.insert(k.to_string());
    }
    assert!(p.shard_dbsizes().iter().all(|&n| n > 0));

    for extra in [&[][..], &["COUNT", "10"][..], &["COUNT", "1000"][..]] {
        let got = full_scan(&mut p.proxy, extra);
        let set: HashSet<String> = got.iter().cloned().collect();
        let missing: Vec<&String> = expected.difference(&set).take(10).collect();
        let extra_keys: Vec<&String> = set.difference(&expected).take(10).collect();
        assert!(
            missing.is_empty() && extra_keys.is_empty(),
            "SCAN {extra:?}: missing {missing:?}, unexpected {extra_keys:?}"
        );
    }

    let users: HashSet<String> = expected
        .iter()
        .filter(|k| k.starts_with("user:"))
        .cloned()
        .collect();
    for extra in [
        &["MATCH", "user:*"][..],
        &["MATCH", "user:*", "COUNT", "10"][..],
    ] {
        let got: HashSet<String> = full_scan(&mut p.proxy, extra).into_iter().collect();
        assert_eq!(got, users, "SCAN {extra:?}");
    }
    let lists: HashSet<String> = full_scan(&mut p.proxy, &["TYPE", "list"])
        .into_iter()
        .collect();
    let want_lists: HashSet<String> = ["user:list", "user:{tag}a", "user:{tag}b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(lists, want_lists, "SCAN TYPE list");
}

#[test]
fn randomkey_returns_existing_key_or_nil() {
    let mut p = Pair::new();
    assert_eq!(
        p.same_str(&["RANDOMKEY"]),
        Reply::Bulk(None),
        "empty keyspace"
    );

    // A single key, on one shard only: every RANDOMKEY must return it (never nil).
    p.same_str(&["SET", "lonely", "1"]);
    for i in 0..30 {
        let (got, _) = p.both(&["RANDOMKEY"]);
        assert_eq!(
            got,
            Reply::Bulk(Some(b"lonely".to_vec())),
            "RANDOMKEY call {i}"
        );
    }

    let ks = keys(100, "rk:");
    let mut mset = vec!["MSET".to_string()];
    for k in &ks {
        mset.push(k.clone());
        mset.push("v".into());
    }
    p.same_str(&as_strs(&mset));
    let mut all: HashSet<String> = ks.iter().cloned().collect();
    all.insert("lonely".into());
    let mut seen = HashSet::new();
    for i in 0..200 {
        let (got, _) = p.both(&["RANDOMKEY"]);
        let Reply::Bulk(Some(k)) = got else {
            panic!("RANDOMKEY call {i} with 101 keys returned {got:?}")
        };
        let k = String::from_utf8(k).unwrap();
        assert!(
            all.contains(&k),
            "RANDOMKEY returned a non-existent key {k:?}"
        );
        seen.insert(k);
    }
    eprintln!("RANDOMKEY saw {} distinct keys of 101", seen.len());

    p.same_str(&["FLUSHALL"]);
    assert_eq!(
        p.same_str(&["RANDOMKEY"]),
        Reply::Bulk(None),
        "after FLUSHALL"
    );
}

#[test]
fn pipelined_scatter_gather_commands_keep_order() {
    let mut p = Pair::new();
    let mut req = Vec::new();
    let mut n = 0;
    for i in 0..50 {
        let a = format!("pp:{i}");
        let b = format!("pp:{}", i * 7 + 1);
        req.extend(resp(&[b"MSET", a.as_bytes(), b"1", b.as_bytes(), b"2"]));
        req.extend(resp(&[b"MGET", b.as_bytes(), a.as_bytes(), b"pp:none"]));
        req.extend(resp(&[b"EXISTS", a.as_bytes(), b.as_bytes(), a.as_bytes()]));
        req.extend(resp(&[b"GET", a.as_bytes()]));
        req.extend(resp(&[b"DEL", b.as_bytes(), a.as_bytes(), b"pp:none"]));
        req.extend(resp(&[b"DBSIZE"]));
        n += 6;
    }
    p.reference.stream.write_all(&req).unwrap();
    p.proxy.stream.write_all(&req).unwrap();
    for i in 0..n {
        let (want, _) = p.reference.read_reply(&[b"<pipelined>"]);
        let (got, _) = p.proxy.read_reply(&[b"<pipelined>"]);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "pipelined reply #{i}"
        );
    }
}
