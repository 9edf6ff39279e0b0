//! Error replies and locally answered commands, byte for byte. Where Redis itself has the
//! behaviour (unknown command, arity, unknown subcommand, protocol errors, inline commands) the
//! slotgate reply is compared with a real redis-server's reply to the same bytes.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

const SENTINEL: &[u8] = b"__end_of_exchange_sentinel__";

struct Env {
    shards: Vec<RedisServer>,
    proxy: Slotgate,
    reference: RedisServer,
}

fn env() -> Env {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let reference = RedisServer::start();
    Env {
        shards,
        proxy,
        reference,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `req` followed by `ECHO <sentinel>` on a fresh connection and returns every byte that
/// arrived before the sentinel's reply (i.e. all replies to `req`). The connection must stay
/// open.
fn exchange(port: u16, req: &[u8]) -> Vec<u8> {
    let mut s = connect(port);
    let mut payload = req.to_vec();
    payload.extend(resp(&[b"ECHO", SENTINEL]));
    s.write_all(&payload).unwrap();
    let tail = format!("${}\r\n{}\r\n", SENTINEL.len(), lossy(SENTINEL)).into_bytes();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while !buf.ends_with(&tail) {
        match read_some(&mut s, &mut chunk) {
            Ok(0) => panic!(
                "port {port}: connection closed after {:?} while waiting for replies to {:?}",
                lossy(&buf),
                lossy(req)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "port {port}: {e} after {:?} while waiting for replies to {:?}",
                lossy(&buf),
                lossy(req)
            ),
        }
    }
    buf.truncate(buf.len() - tail.len());
    buf
}

/// Sends `req` on a fresh connection and reads until EOF (or 3 s pass). Returns the bytes and
/// whether the peer closed the connection.
fn exchange_until_close(port: u16, req: &[u8]) -> (Vec<u8>, bool) {
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(req).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while Instant::now() < deadline {
        match read_some(&mut s, &mut chunk) {
            Ok(0) => return (buf, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (buf, true),
            Err(_) => {}
        }
    }
    (buf, false)
}

/// Asserts slotgate and redis give identical replies to `req` (connection stays open).
fn assert_same_as_redis(e: &Env, req: &[u8]) -> Vec<u8> {
    let want = exchange(e.reference.port, req);
    let got = exchange(e.proxy.port, req);
    assert_eq!(
        lossy(&got),
        lossy(&want),
        "slotgate vs redis for {:?}",
        lossy(req)
    );
    got
}

fn assert_reply(e: &Env, req: &[u8], expected: &[u8]) {
    let got = exchange(e.proxy.port, req);
    assert_eq!(
        lossy(&got),
        lossy(expected),
        "slotgate reply to {:?}",
        lossy(req)
    );
}

fn args(s: &[&str]) -> Vec<u8> {
    let a: Vec<&[u8]> = s.iter().map(|x| x.as_bytes()).collect();
    resp(&a)
}

fn slot(key: &str) -> u16 {
    crc16(key.as_bytes()) % 16384
}

fn shard_of(key: &str) -> usize {
    let s = slot(key) as u32;
    (0..3)
        .find(|i| s >= i * 16384 / 3 && s < (i + 1) * 16384 / 3)
        .unwrap() as usize
}

// ---------------------------------------------------------------------------------------------
// Protocol errors

#[test]
fn malformed_input_gets_redis_protocol_error_then_close() {
    let e = env();
    let mut nul_before_cr = b"*\x00\r\n".to_vec();
    nul_before_cr.resize(70_000, b'x');
    let cases: &[(&[u8], &[u8])] = &[
        (
            b"*abc\r\n",
            b"-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$abc\r\n",
            b"-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n+foo\r\n",
            b"-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"SET \"a b\r\n",
            b"-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
        (
            b"*1\r\n$536870913\r\n",
            b"-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*3000000000\r\n",
            b"-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$-1\r\n",
            b"-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n:1\r\n",
            b"-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"SET \"a\"b\r\n",
            b"-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
        (
            b"ECHO 'x\r\n",
            b"-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
        // The byte is sent as it came (not as UTF-8).
        (
            b"*1\r\n\xe9\r\n",
            b"-ERR Protocol error: expected '$', got '\xe9'\r\n",
        ),
        // A NUL hides the CR from Redis's strchr: the line grows until it is too big.
        (
            &nul_before_cr,
            b"-ERR Protocol error: too big mbulk count string\r\n",
        ),
    ];
    for (req, expected) in cases {
        let (want, want_closed) = exchange_until_close(e.reference.port, req);
        assert_eq!(
            (lossy(&want), want_closed),
            (lossy(expected), true),
            "test premise: redis-server's reply to {:?}",
            lossy(req)
        );
        let (got, closed) = exchange_until_close(e.proxy.port, req);
        assert_eq!(
            lossy(&got),
            lossy(expected),
            "slotgate reply to {:?}",
            lossy(req)
        );
        assert!(
            closed,
            "slotgate must close the connection after {:?}",
            lossy(req)
        );
    }
    // The proxy is still fine for new connections.
    assert_reply(&e, b"PING\r\n", b"+PONG\r\n");
}

#[test]
fn replies_before_a_protocol_error_arrive_first() {
    let e = env();
    let mut req = Vec::new();
    req.extend(args(&["SET", "pe:a", "1"]));
    req.extend(args(&["SET", "pe:b", "2"]));
    req.extend(args(&["MGET", "pe:a", "pe:b", "pe:none"]));
    req.extend(args(&["GET", "pe:a"]));
    req.extend(b"PING\r\n");
    req.extend(b"*1\r\n+foo\r\n");
    req.extend(args(&["SET", "pe:after", "x"]));
    let expected: &[u8] = b"+OK\r\n+OK\r\n*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n$1\r\n1\r\n+PONG\r\n\
-ERR Protocol error: expected '$', got '+'\r\n";
    let (want, _) = exchange_until_close(e.reference.port, &req);
    assert_eq!(lossy(&want), lossy(expected), "test premise: redis-server");
    let (got, closed) = exchange_until_close(e.proxy.port, &req);
    assert_eq!(
        lossy(&got),
        lossy(expected),
        "replies before the protocol error, in order"
    );
    assert!(closed, "connection closed after the protocol error");
    // The command after the error was never executed.
    let mut c = e.proxy.client();
    let v: Option<String> = redis::cmd("GET").arg("pe:after").query(&mut c).unwrap();
    assert_eq!(v, None, "command after a protocol error must not run");
}

#[test]
fn inline_commands_and_ignored_empty_requests_match_redis() {
    let e = env();
    assert_reply(&e, b"PING\r\n", b"+PONG\r\n");
    assert_reply(&e, b"*0\r\n*-5\r\n\r\n\r\n  \r\nPING\r\n", b"+PONG\r\n");
    assert_reply(&e, b"*0\r\n", b"");
    assert_reply(&e, b"*-5\r\n", b"");
    assert_reply(&e, b"\r\n", b"");
    let got = assert_same_as_redis(&e, b"SET inl:foo bar\r\nGET inl:foo\r\n");
    assert_eq!(lossy(&got), "+OK\r\n$3\r\nbar\r\n", "inline SET then GET");
    for req in [
        &b"PING\r\n"[..],
        b"PING\n",
        b"ping hello\r\n",
        b"*0\r\n*-5\r\n\r\n\r\n  \r\nPING\r\n",
        b"SET \"inl:a b\" \"c\\x41d\\n\"\r\nGET \"inl:a b\"\r\n",
        b"SET 'inl:q' 'it s'\r\nGET inl:q\r\n",
        b"  SET   inl:sp   v  \r\nGET inl:sp\r\n",
        b"MGET inl:foo inl:sp {inl}none\r\n",
        b"foobar a b\r\n",
        b"GET\r\n",
        b"ECHO\r\n",
        b"DEL inl:foo inl:sp \"inl:a b\"\r\n",
    ] {
        assert_same_as_redis(&e, req);
    }
}

// ---------------------------------------------------------------------------------------------
// Unknown command, arity, subcommands

#[test]
fn unknown_command_error_matches_redis() {
    let e = env();
    assert_reply(
        &e,
        &args(&["foobar", "a", "b"]),
        b"-ERR unknown command 'foobar', with args beginning with: 'a' 'b' \r\n",
    );
    assert_reply(
        &e,
        &args(&["foobar"]),
        b"-ERR unknown command 'foobar', with args beginning with: \r\n",
    );
    let long = "x".repeat(200);
    let many: Vec<String> = (0..60).map(|i| format!("arg{i}")).collect();
    let mut many_cmd = vec!["nosuchcmd"];
    many_cmd.extend(many.iter().map(String::as_str));
    for req in [
        args(&["foobar", "a", "b"]),
        args(&["foobar"]),
        args(&["FooBar", "A"]),
        args(&["FOOBAR", "a b", "c"]),
        args(&["foobar", &long]),
        args(&["foobar", "a", &long]),
        args(&[&"y".repeat(300)]),
        args(&many_cmd),
        resp(&[b"foobar", b"a\r\nb"]),
        args(&["SHUTDOWNX"]),
        args(&["GETX", "k"]),
        args(&[""]),
    ] {
        assert_same_as_redis(&e, &req);
    }
}

#[test]
fn unknown_command_error_with_nul_bytes_matches_redis() {
    // Redis formats the name and args as C strings: they end at the first NUL byte.
    let e = env();
    for req in [
        resp(&[b"foobar", b"a\x00b", b"c"]),
        resp(&[b"foobar", b"\x00"]),
        resp(&[b"foo\x00bar", b"x"]),
    ] {
        assert_same_as_redis(&e, &req);
    }
}

#[test]
fn wrong_arity_error_matches_redis() {
    let e = env();
    assert_reply(
        &e,
        &args(&["GET"]),
        b"-ERR wrong number of arguments for 'get' command\r\n",
    );
    assert_reply(
        &e,
        &args(&["CONFIG", "GET"]),
        b"-ERR wrong number of arguments for 'config|get' command\r\n",
    );
    for req in [
        args(&["GET"]),
        args(&["gEt"]),
        args(&["GET", "a", "b"]),
        args(&["SET", "a"]),
        args(&["HSET", "a", "f"]),
        args(&["MGET"]),
        args(&["MSET", "a", "1", "b"]),
        args(&["DEL"]),
        args(&["CONFIG", "GET"]),
        args(&["config", "get"]),
        args(&["CONFIG"]),
        args(&["CLIENT"]),
        args(&["ECHO"]),
        args(&["ECHO", "a", "b"]),
        args(&["PING", "a", "b"]),
        args(&["SELECT"]),
        args(&["DBSIZE", "x"]),
        args(&["RENAME", "a"]),
        args(&["CLIENT", "SETNAME"]),
        args(&["COMMAND", "COUNT", "x"]),
    ] {
        assert_same_as_redis(&e, &req);
    }
}

#[test]
fn unknown_subcommand_matches_redis() {
    let e = env();
    assert_reply(
        &e,
        &args(&["CONFIG", "FOO"]),
        b"-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n",
    );
    for req in [
        args(&["CONFIG", "FOO"]),
        args(&["config", "foo"]),
        args(&["CLIENT", "FOO"]),
        args(&["client", "nope", "x"]),
        args(&["OBJECT", "FOO", "k"]),
    ] {
        assert_same_as_redis(&e, &req);
    }
}

// ---------------------------------------------------------------------------------------------
// CROSSSLOT

#[test]
fn multi_key_commands_across_slots_get_crossslot() {
    let e = env();
    const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_ne!(slot("a"), slot("b"));
    assert_ne!(
        shard_of("a"),
        shard_of("b"),
        "a and b must be on different shards"
    );
    // Two keys in different slots but on the same shard: still CROSSSLOT (slot, not shard).
    let same_shard = (0..10_000)
        .map(|i| format!("ss{i}"))
        .find(|k| shard_of(k) == shard_of("a") && slot(k) != slot("a"))
        .unwrap();

    let mut c = e.proxy.client();
    let _: () = redis::cmd("SET").arg("a").arg("1").query(&mut c).unwrap();
    let _: () = redis::cmd("SADD").arg("s1").arg("x").query(&mut c).unwrap();
    let _: () = redis::cmd("SADD").arg("s2").arg("y").query(&mut c).unwrap();
    let before: Vec<i64> = e
        .shards
        .iter()
        .map(|s| redis::cmd("DBSIZE").query(&mut s.client()).unwrap())
        .collect();

    for req in [
        args(&["RENAME", "a", "b"]),
        args(&["RENAME", "a", &same_shard]),
        args(&["RENAMENX", "a", "b"]),
        args(&["SUNIONSTORE", "dst", "s1", "s2"]),
        args(&["SUNIONSTORE", "s1", "s1", "s2"]),
        args(&["SINTER", "s1", "s2"]),
        args(&["SDIFF", "s1", "s2"]),
        args(&["SMOVE", "s1", "s2", "x"]),
        args(&["MSETNX", "a", "1", "b", "2"]),
        args(&["MSETNX", "a", "1", &same_shard, "2"]),
        args(&["LMOVE", "a", "b", "LEFT", "RIGHT"]),
        args(&["RPOPLPUSH", "a", "b"]),
        args(&["ZUNIONSTORE", "dst", "2", "s1", "s2"]),
        args(&["COPY", "a", "b"]),
        args(&["BITOP", "AND", "dst", "a", "b"]),
        args(&["PFMERGE", "dst", "a", "b"]),
    ] {
        assert_reply(&e, &req, CROSSSLOT);
    }
    let after: Vec<i64> = e
        .shards
        .iter()
        .map(|s| redis::cmd("DBSIZE").query(&mut s.client()).unwrap())
        .collect();
    assert_eq!(before, after, "CROSSSLOT commands must not write anything");

    // Same slot via hashtags: these work.
    assert_reply(&e, &args(&["SET", "{t}a", "1"]), b"+OK\r\n");
    assert_reply(&e, &args(&["RENAME", "{t}a", "{t}b"]), b"+OK\r\n");
    assert_reply(&e, &args(&["MSETNX", "{t}x", "1", "{t}y", "2"]), b":1\r\n");
    assert_reply(
        &e,
        &args(&["LMOVE", "{t}l1", "{t}l2", "LEFT", "RIGHT"]),
        b"$-1\r\n",
    );
    assert_reply(&e, &args(&["GET", "{t}b"]), b"$1\r\n1\r\n");
}

// ---------------------------------------------------------------------------------------------
// Refused, not-yet-supported, CLUSTER

fn shard_fingerprint(e: &Env) -> Vec<String> {
    e.shards
        .iter()
        .map(|s| {
            let mut c = s.client();
            let pong: String = redis::cmd("PING")
                .query(&mut c)
                .expect("shard must be alive");
            let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap();
            let role = info
                .lines()
                .find(|l| l.starts_with("role:"))
                .unwrap_or("")
                .to_string();
            let users: Vec<String> = redis::cmd("ACL").arg("USERS").query(&mut c).unwrap();
            format!("{pong} dbsize={n} {role} users={users:?}")
        })
        .collect()
}

#[test]
fn refused_admin_commands_are_never_forwarded() {
    let e = env();
    let mut c = e.proxy.client();
    for i in 0..30 {
        let _: () = redis::cmd("SET")
            .arg(format!("adm:{i}"))
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    let before = shard_fingerprint(&e);

    let refused = |name: &str| format!("-ERR command '{name}' is not allowed through slotgate\r\n");
    let cases: Vec<(Vec<u8>, String)> = vec![
        (args(&["SHUTDOWN"]), refused("shutdown")),
        (args(&["shutdown", "NOSAVE"]), refused("shutdown")),
        (args(&["ShutDown", "nosave", "now"]), refused("shutdown")),
        (args(&["DEBUG", "SLEEP", "0"]), refused("debug")),
        (args(&["DEBUG", "SEGFAULT"]), refused("debug")),
        (args(&["REPLICAOF", "127.0.0.1", "1"]), refused("replicaof")),
        (args(&["REPLICAOF", "NO", "ONE"]), refused("replicaof")),
        (args(&["CONFIG", "REWRITE"]), refused("config|rewrite")),
        (args(&["config", "rewrite"]), refused("config|rewrite")),
        (
            args(&["MIGRATE", "127.0.0.1", "1", "adm:1", "0", "1000"]),
            refused("migrate"),
        ),
    ];
    for (req, expected) in &cases {
        assert_reply(&e, req, expected.as_bytes());
    }
    // Container commands: the contract's naming ("module" vs "module|load") is not pinned down,
    // so accept either spelling.
    for (req, names) in [
        (
            args(&["MODULE", "LOAD", "/nonexistent.so"]),
            ["module", "module|load"],
        ),
        (
            args(&["MODULE", "UNLOAD", "x"]),
            ["module", "module|unload"],
        ),
        (
            args(&["ACL", "SETUSER", "intruder", "on"]),
            ["acl", "acl|setuser"],
        ),
    ] {
        let got = lossy(&exchange(e.proxy.port, &req));
        assert!(
            names.iter().any(|n| got == refused(n)),
            "reply to {:?} should be one of {:?}, got {got:?}",
            lossy(&req),
            names.map(refused)
        );
    }
    // SLAVEOF is REPLICAOF's alias: must not be forwarded either.
    let got = lossy(&exchange(
        e.proxy.port,
        &args(&["SLAVEOF", "127.0.0.1", "1"]),
    ));
    assert!(
        got.starts_with("-ERR command '") && got.ends_with("' is not allowed through slotgate\r\n"),
        "SLAVEOF must be refused, got {got:?}"
    );

    // A refused command forwarded anyway (SHUTDOWN, DEBUG SEGFAULT, REPLICAOF…) would show on
    // the shards only once it got there and ran; nothing observable says "it never arrives".
    // Needed: proving that nothing happens to the shards during an interval.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        shard_fingerprint(&e),
        before,
        "shards must be alive and unchanged after refused commands"
    );
    let mut c = e.proxy.client();
    let v: String = redis::cmd("GET").arg("adm:7").query(&mut c).unwrap();
    assert_eq!(v, "7", "proxy keeps working after refused commands");
}

#[test]
fn connection_controls_a_proxy_cannot_honour_are_refused() {
    let e = env();
    let refused = |name: &str| format!("-ERR command '{name}' is not allowed through slotgate\r\n");
    let mut raw = e.proxy.raw();
    // (CLIENT TRACKING is served since issue 16: see tests/tracking.rs.)
    let mut r = args(&["SCRIPT", "DEBUG", "YES"]);
    r.extend_from_slice(b"PING\r\n");
    let mut expected = refused("script|debug").into_bytes();
    expected.extend_from_slice(b"+PONG\r\n");
    raw.roundtrip(&r, &expected);
}

#[test]
fn cluster_commands_report_cluster_support_disabled() {
    let e = env();
    const DISABLED: &[u8] = b"-ERR This instance has cluster support disabled\r\n";
    for req in [
        args(&["CLUSTER", "INFO"]),
        args(&["cluster", "info"]),
        args(&["CLUSTER", "NODES"]),
        args(&["CLUSTER", "SLOTS"]),
        args(&["CLUSTER", "SHARDS"]),
        args(&["CLUSTER", "KEYSLOT", "foo"]),
        args(&["CLUSTER", "MYID"]),
    ] {
        assert_reply(&e, &req, DISABLED);
    }
    // Same as a real non-cluster redis for the common ones.
    assert_same_as_redis(&e, &args(&["CLUSTER", "INFO"]));
    assert_same_as_redis(&e, &args(&["CLUSTER", "KEYSLOT", "foo"]));
}

#[test]
fn select_only_allows_db_0() {
    let e = env();
    assert_reply(&e, &args(&["SELECT", "0"]), b"+OK\r\n");
    assert_reply(&e, &args(&["select", "0"]), b"+OK\r\n");
    assert_reply(
        &e,
        &args(&["SELECT", "1"]),
        b"-ERR DB index is out of range\r\n",
    );
    assert_reply(
        &e,
        &args(&["SELECT", "15"]),
        b"-ERR DB index is out of range\r\n",
    );
    let mut raw = e.proxy.raw();
    raw.roundtrip(
        &[
            args(&["SELECT", "1"]),
            args(&["SET", "sel:k", "v"]),
            args(&["SELECT", "0"]),
            args(&["GET", "sel:k"]),
        ]
        .concat(),
        b"-ERR DB index is out of range\r\n+OK\r\n+OK\r\n$1\r\nv\r\n",
    );
    // The key went to db 0 on its shard.
    let mut c = e.shards[shard_of("sel:k")].client();
    let v: Option<String> = redis::cmd("GET").arg("sel:k").query(&mut c).unwrap();
    assert_eq!(v.as_deref(), Some("v"));
}

// ---------------------------------------------------------------------------------------------
// Locally answered commands

#[test]
fn ping_echo_quit() {
    let e = env();
    assert_reply(&e, &args(&["PING"]), b"+PONG\r\n");
    assert_reply(&e, &args(&["ping", "hello"]), b"$5\r\nhello\r\n");
    assert_reply(&e, &resp(&[b"PING", b""]), b"$0\r\n\r\n");
    assert_reply(&e, &args(&["ECHO", "hi there"]), b"$8\r\nhi there\r\n");
    assert_reply(
        &e,
        &resp(&[b"ECHO", b"\x00\r\n\xff"]),
        b"$4\r\n\x00\r\n\xff\r\n",
    );
    assert_same_as_redis(&e, &resp(&[b"ECHO", b"\x00\r\n\xff"]));
    assert_same_as_redis(&e, &args(&["PING", "x"]));

    for req in [
        args(&["QUIT"]),
        b"QUIT\r\n".to_vec(),
        [args(&["quit"]), args(&["PING"])].concat(),
    ] {
        let (got, closed) = exchange_until_close(e.proxy.port, &req);
        assert_eq!(lossy(&got), "+OK\r\n", "QUIT reply for {:?}", lossy(&req));
        assert!(closed, "QUIT must close the connection");
    }
    // Earlier replies in the pipeline are delivered before QUIT's.
    let req = [
        args(&["SET", "q:k", "1"]),
        args(&["GET", "q:k"]),
        args(&["QUIT"]),
        args(&["GET", "q:k"]),
    ]
    .concat();
    let (got, closed) = exchange_until_close(e.proxy.port, &req);
    assert_eq!(lossy(&got), "+OK\r\n$1\r\n1\r\n+OK\r\n");
    assert!(closed);
}

fn read_reply(s: &mut TcpStream, req: &[u8]) -> Vec<u8> {
    s.write_all(req).unwrap();
    // Enough for the small replies used here: read until a complete reply is buffered.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(n) = resp2_reply_len(&buf) {
            assert_eq!(n, buf.len(), "extra bytes after reply to {:?}", lossy(req));
            return buf;
        }
        let n = read_some(s, &mut chunk)
            .unwrap_or_else(|e| panic!("no reply to {:?}: {e}", lossy(req)));
        assert!(n > 0, "closed on {:?}", lossy(req));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn time_returns_two_integers_close_to_now() {
    let e = env();
    let mut s = connect(e.proxy.port);
    let got = lossy(&read_reply(&mut s, &args(&["TIME"])));
    let parts: Vec<&str> = got.split("\r\n").collect();
    // *2 $n secs $m micros ""
    assert_eq!(parts.len(), 6, "TIME reply {got:?}");
    assert_eq!(parts[0], "*2", "TIME is an array of 2: {got:?}");
    assert!(
        parts[1].starts_with('$') && parts[3].starts_with('$'),
        "bulk strings: {got:?}"
    );
    let secs: u64 = parts[2].parse().expect("seconds integer");
    let micros: u64 = parts[4].parse().expect("microseconds integer");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs.abs_diff(now) <= 5, "TIME seconds {secs} vs now {now}");
    assert!(micros < 1_000_000, "microseconds {micros}");
}

#[test]
fn client_setname_getname_id() {
    let e = env();
    let mut s = connect(e.proxy.port);
    assert_eq!(
        lossy(&read_reply(&mut s, &args(&["CLIENT", "GETNAME"]))),
        "$-1\r\n"
    );
    assert_eq!(
        lossy(&read_reply(
            &mut s,
            &args(&["CLIENT", "SETNAME", "worker-7"])
        )),
        "+OK\r\n"
    );
    assert_eq!(
        lossy(&read_reply(&mut s, &args(&["client", "getname"]))),
        "$8\r\nworker-7\r\n"
    );
    // Names are per connection.
    let mut s2 = connect(e.proxy.port);
    assert_eq!(
        lossy(&read_reply(&mut s2, &args(&["CLIENT", "GETNAME"]))),
        "$-1\r\n"
    );
    let id1 = lossy(&read_reply(&mut s, &args(&["CLIENT", "ID"])));
    let id2 = lossy(&read_reply(&mut s2, &args(&["CLIENT", "ID"])));
    for id in [&id1, &id2] {
        assert!(
            id.starts_with(':') && id.trim_start_matches(':').trim_end().parse::<i64>().is_ok(),
            "CLIENT ID is an integer: {id:?}"
        );
    }
    assert_ne!(id1, id2, "two connections have different CLIENT IDs");
    let again = lossy(&read_reply(&mut s, &args(&["CLIENT", "ID"])));
    assert_eq!(id1, again, "CLIENT ID is stable on a connection");
    // Invalid names are rejected like Redis does.
    assert_same_as_redis(&e, &args(&["CLIENT", "SETNAME", "a b"]));
}

#[test]
fn command_count_and_config_get_come_from_a_shard() {
    let e = env();
    let mut p = connect(e.proxy.port);
    let mut shard = connect(e.shards[0].port);
    let want = read_reply(&mut shard, &args(&["COMMAND", "COUNT"]));
    let got = read_reply(&mut p, &args(&["COMMAND", "COUNT"]));
    assert_eq!(lossy(&got), lossy(&want), "COMMAND COUNT equals a shard's");
    for param in ["maxmemory-policy", "save", "appendonly", "databases"] {
        let want = read_reply(&mut shard, &args(&["CONFIG", "GET", param]));
        let got = read_reply(&mut p, &args(&["CONFIG", "GET", param]));
        assert_eq!(lossy(&got), lossy(&want), "CONFIG GET {param}");
    }
}

#[test]
fn info_reports_cluster_disabled_version_and_summed_keyspace() {
    let e = env();
    let mut c = e.proxy.client();
    let mut p = redis::pipe();
    for i in 0..57 {
        p.cmd("SET").arg(format!("info:{i}")).arg(i).ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    let per_shard: Vec<i64> = e
        .shards
        .iter()
        .map(|s| redis::cmd("DBSIZE").query(&mut s.client()).unwrap())
        .collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "keys on all shards {per_shard:?}"
    );

    let shard_info: String = redis::cmd("INFO").query(&mut e.shards[1].client()).unwrap();
    let version_line = shard_info
        .lines()
        .find(|l| l.starts_with("redis_version:"))
        .unwrap()
        .trim_end()
        .to_string();

    let info: String = redis::cmd("INFO").query(&mut c).unwrap();
    let lines: Vec<&str> = info.lines().map(str::trim_end).collect();
    assert!(
        lines.contains(&"cluster_enabled:0"),
        "INFO has cluster_enabled:0:\n{info}"
    );
    assert!(
        lines.contains(&version_line.as_str()),
        "INFO has the shards' {version_line}:\n{info}"
    );
    assert!(
        lines.contains(&"# Keyspace"),
        "INFO has # Keyspace:\n{info}"
    );
    let db0 = lines
        .iter()
        .find(|l| l.starts_with("db0:"))
        .unwrap_or_else(|| panic!("INFO has a db0: line:\n{info}"));
    assert!(
        db0.starts_with("db0:keys=57,"),
        "db0 line sums the shards' keys (57): {db0:?}"
    );
    // The Keyspace line follows the # Keyspace header.
    let ks = lines.iter().position(|l| *l == "# Keyspace").unwrap();
    let db0_pos = lines.iter().position(|l| l.starts_with("db0:")).unwrap();
    assert!(db0_pos > ks, "db0 line belongs to the Keyspace section");
}

/// CLIENT REPLY ON|OFF|SKIP (issue 13.3): the same bytes as a plain Redis for a pipeline
/// that switches replies off, on and skips one, over keys on several shards; the muted
/// commands still run.
#[test]
fn client_reply_off_on_and_skip_like_redis() {
    let e = env();
    let mut req = Vec::new();
    for cmd in [
        &["CLIENT", "REPLY", "OFF"][..],
        &["SET", "a", "1"],
        &["MSET", "b", "2", "c", "3"],
        &["GET", "a"],
        &["CLIENT", "REPLY", "ON"],
        &["MGET", "a", "b", "c"],
        &["CLIENT", "REPLY", "SKIP"],
        &["INCR", "n"],
        &["PING"],
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "OFF"],
        &["INCR", "n"],
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "ON"],
        &["GET", "n"],
        &["CLIENT", "REPLY", "MAYBE"],
    ] {
        req.extend(args(cmd));
    }
    let got = assert_same_as_redis(&e, &req);
    assert_eq!(
        lossy(&got),
        lossy(
            b"+OK\r\n*3\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n+PONG\r\n+OK\r\n$1\r\n2\r\n\
              -ERR syntax error\r\n"
        )
    );
}
