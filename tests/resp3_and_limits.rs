//! RESP3 after `HELLO 3` (replies from shards are RESP3, byte for byte what Redis sends), the
//! per-client and per-connection bounds, CONFIG SET's allowlist, and several upstream
//! connections per shard.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use support::*;

/// Bytes received and not yet read by their owner, summed over the established loopback TCP
/// sockets on local port `local` (and remote port `remote`, when given), from /proc/net/tcp.
fn unread_bytes(local: u16, remote: Option<u16>) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let l = format!(":{local:04X}");
    let r = remote.map(|p| format!(":{p:04X}"));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // f[1] local addr:port, f[2] remote addr:port, f[3] state (01 = ESTABLISHED),
            // f[4] tx_queue:rx_queue in hex.
            let matches = f.len() > 4
                && f[1].ends_with(&l)
                && r.as_ref().is_none_or(|r| f[2].ends_with(r))
                && f[3] == "01";
            matches.then(|| u64::from_str_radix(f[4].split_once(':')?.1, 16).ok())?
        })
        .sum()
}

/// Sends `cmds` as one pipeline and reads until `expected_replies` complete replies arrived,
/// using the proxy's own framer to count them.
fn pipeline(conn: &mut RawConn, cmds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let wire: Vec<u8> = cmds.concat();
    conn.send(&wire);
    conn.read_replies(cmds.len())
}

fn direct(server: &RedisServer) -> RawConn {
    RawConn::connect(server.port)
}

#[test]
fn resp3_replies_match_a_single_redis_byte_for_byte() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let reference = RedisServer::start();

    let setup: Vec<Vec<u8>> = vec![
        resp(&[b"HSET", b"h", b"f1", b"v1", b"f2", b"v2"]),
        resp(&[b"SADD", b"s", b"m"]),
        resp(&[b"ZADD", b"z", b"1.5", b"a"]),
        resp(&[b"SET", b"k1", b"v1"]),
        resp(&[b"SET", b"k2", b"v2"]),
    ];
    let probe: Vec<Vec<u8>> = vec![
        resp(&[b"HGETALL", b"h"]),
        resp(&[b"SMEMBERS", b"s"]),
        resp(&[b"ZSCORE", b"z", b"a"]),
        resp(&[b"ZRANGE", b"z", b"0", b"-1", b"WITHSCORES"]),
        resp(&[b"GET", b"missing"]),
        resp(&[b"MGET", b"k1", b"missing", b"k2", b"h"]),
        resp(&[b"HRANDFIELD", b"nosuch", b"-5", b"WITHVALUES"]),
        resp(&[b"DEL", b"k1", b"missing", b"k2"]),
        resp(&[b"PING"]),
        resp(&[b"ECHO", b"hi"]),
        // Doubles, big numbers, maps and sets made by scripts, and the RESP3 null.
        resp(&[b"EVAL", b"redis.setresp(3); return {double=3.14}", b"0"]),
        resp(&[
            b"EVAL",
            b"redis.setresp(3); return {big_number='12345678901234567890'}",
            b"0",
        ]),
        resp(&[b"EVAL", b"redis.setresp(3); return {map={a=1}}", b"0"]),
        resp(&[b"EVAL", b"redis.setresp(3); return {set={a=true}}", b"0"]),
        resp(&[
            b"EVAL",
            b"redis.setresp(3); return redis.call('GET', KEYS[1])",
            b"1",
            b"missing",
        ]),
    ];
    let hello3 = resp(&[b"HELLO", b"3"]);

    let mut via = proxy.raw();
    let mut dir = direct(&reference);
    for c in [&mut via, &mut dir] {
        let r = pipeline(c, std::slice::from_ref(&hello3));
        assert_eq!(r[0][0], b'%', "HELLO 3 replies with a RESP3 map");
        pipeline(c, &setup);
    }
    let got = pipeline(&mut via, &probe);
    let want = pipeline(&mut dir, &probe);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(g),
            String::from_utf8_lossy(w),
            "RESP3 reply {i} differs"
        );
    }
    assert!(got[0].starts_with(b"%2\r\n"), "HGETALL is a map in RESP3");
    assert_eq!(got[4], b"_\r\n", "RESP3 null");

    // Back to RESP2: nil is $-1 again and HGETALL a flat array.
    let back = pipeline(
        &mut via,
        &[
            resp(&[b"HELLO", b"2"]),
            resp(&[b"GET", b"missing"]),
            resp(&[b"HGETALL", b"h"]),
        ],
    );
    assert_eq!(back[0][0], b'*', "HELLO 2 replies with a flat array");
    assert_eq!(back[1], b"$-1\r\n");
    assert!(back[2].starts_with(b"*4\r\n"));
}

#[test]
fn hello_reports_the_shards_version_and_rejects_bad_versions() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut c = proxy.raw();
    let r = pipeline(&mut c, &[resp(&[b"HELLO", b"2"])]);
    let text = String::from_utf8_lossy(&r[0]);
    assert!(
        text.contains("$7\r\n7.0.15\r\n") || text.contains("$6\r\n7."),
        "{text}"
    );
    assert!(text.contains("standalone"), "{text}");
    let r = pipeline(&mut c, &[resp(&[b"HELLO", b"4"])]);
    assert_eq!(r[0], b"-NOPROTO unsupported protocol version\r\n");
    let r = pipeline(&mut c, &[resp(&[b"HELLO", b"3", b"BOGUS"])]);
    assert_eq!(r[0], b"-ERR Syntax error in HELLO option 'BOGUS'\r\n");
}

#[test]
fn a_client_that_pipelines_without_reading_is_bounded_and_loses_nothing() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--max-client-pipeline", "64"]);
    let mut c = proxy.raw();
    let n = 20_000;
    let mut wire = Vec::new();
    for i in 0..n {
        wire.extend_from_slice(&resp(&[
            b"SET",
            format!("k{i}").as_bytes(),
            format!("{i}").as_bytes(),
        ]));
        wire.extend_from_slice(&resp(&[b"GET", format!("k{i}").as_bytes()]));
    }
    // Write everything before reading anything (a writer thread, so neither side deadlocks).
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        w.write_all(&wire).unwrap();
    });
    // Its unread replies fill the socket and the proxy has to stop at its pipeline bound.
    // Needed: the client really does not read for a while (the behaviour under test).
    std::thread::sleep(Duration::from_millis(200));
    let replies = c.read_replies(2 * n);
    writer.join().unwrap();
    for i in 0..n {
        assert_eq!(replies[2 * i], b"+OK\r\n");
        let v = i.to_string();
        assert_eq!(
            replies[2 * i + 1],
            format!("${}\r\n{v}\r\n", v.len()).into_bytes(),
            "GET k{i}"
        );
    }
}

/// The session stops parsing at `--max-client-pipeline`; when every reply in flight has
/// already arrived by the time it writes them, the commands still buffered must be parsed
/// without waiting for more bytes from the client (which has sent everything and is reading).
#[test]
fn commands_buffered_beyond_the_pipeline_bound_are_answered_without_more_input() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--max-client-pipeline", "4"]);
    for round in 0..20 {
        let mut c = proxy.raw();
        let n = 300;
        let mut wire = Vec::new();
        for i in 0..n {
            wire.extend_from_slice(&resp(&[b"ECHO", format!("{round}-{i}").as_bytes()]));
        }
        c.send(&wire);
        let replies = c.read_replies(n);
        for (i, r) in replies.iter().enumerate() {
            let v = format!("{round}-{i}");
            assert_eq!(r, &format!("${}\r\n{v}\r\n", v.len()).into_bytes());
        }
    }
}

#[test]
fn in_flight_cap_per_connection_fails_fast_with_shard_unavailable() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(
        &[&shard],
        &["--max-inflight-per-connection", "2", "--op-timeout", "2s"],
    );
    shard.pause();
    let mut c = proxy.raw();
    let started = Instant::now();
    let (get_a, get_b) = (resp(&[b"GET", b"a"]), resp(&[b"GET", b"b"]));
    c.send(&[get_a.clone(), get_b.clone(), resp(&[b"GET", b"c"])].concat());
    // The third request fails at once; the first two wait for the hung shard. Slotgate has read
    // all three (routing them as it parses them), and the first two wait, unread, at the shard.
    let own_port = c.stream.local_addr().unwrap().port();
    let forwarded = (get_a.len() + get_b.len()) as u64;
    wait_until(
        "slotgate to have read the three GETs and sent two to the stopped shard",
        Duration::from_secs(5),
        || {
            unread_bytes(proxy.port, Some(own_port)) == 0
                && unread_bytes(shard.port, None) == forwarded
        },
    );
    shard.resume();
    let r = c.read_replies(3);
    assert_eq!(r[0], b"$-1\r\n");
    assert_eq!(r[1], b"$-1\r\n");
    let third = String::from_utf8_lossy(&r[2]);
    assert!(
        third.starts_with("-ERR shard unavailable")
            && third.contains("too many requests in flight"),
        "{third}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn config_set_is_broadcast_for_allowed_parameters_only() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let mut c = proxy.raw();
    c.roundtrip(
        &resp(&[b"CONFIG", b"SET", b"hash-max-listpack-entries", b"77"]),
        b"+OK\r\n",
    );
    for s in &shards {
        let v: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("hash-max-listpack-entries")
            .query(&mut s.client())
            .unwrap();
        assert_eq!(v[1], "77", "every shard got the CONFIG SET");
    }
    // The list encoding threshold and its legacy alias, like the hash and zset ones.
    for (param, value) in [
        (&b"list-max-listpack-size"[..], &b"-3"[..]),
        (b"list-max-ziplist-size", b"-4"),
        (b"zset-max-ziplist-entries", b"99"),
    ] {
        c.roundtrip(&resp(&[b"CONFIG", b"SET", param, value]), b"+OK\r\n");
    }
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("list-max-listpack-size")
        .query(&mut shards[1].client())
        .unwrap();
    assert_eq!(v[1], "-4", "the alias set the same parameter");
    c.roundtrip(
        &resp(&[b"CONFIG", b"SET", b"port", b"1"]),
        b"-ERR CONFIG SET parameter 'port' is not allowed through slotgate\r\n",
    );
    c.roundtrip(
        &resp(&[
            b"CONFIG",
            b"SET",
            b"maxmemory-policy",
            b"allkeys-lru",
            b"dir",
            b"/tmp",
        ]),
        b"-ERR CONFIG SET parameter 'dir' is not allowed through slotgate\r\n",
    );
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut shards[0].client())
        .unwrap();
    assert_eq!(
        policy[1], "noeviction",
        "a refused CONFIG SET changes nothing"
    );
}

#[test]
fn several_upstream_connections_keep_each_clients_order() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--upstream-connections", "3", "--workers", "2"]);
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut c = RawConn::connect(port);
                let mut cmds = Vec::new();
                for i in 0..500 {
                    cmds.push(resp(&[b"INCR", format!("t{t}:c{}", i % 7).as_bytes()]));
                }
                let r = pipeline(&mut c, &cmds);
                for (i, reply) in r.iter().enumerate() {
                    let want = format!(":{}\r\n", i / 7 + 1);
                    assert_eq!(
                        String::from_utf8_lossy(reply),
                        want,
                        "thread {t} command {i}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// `client_query_buffer_limit` counts input not parsed yet: a command larger than the limit
/// closes its client (and only that client), while a value under the limit and a pipeline of
/// small commands larger in total than the limit both go through.
#[test]
fn the_query_buffer_limit_closes_only_a_client_whose_unparsed_input_exceeds_it() {
    let dir = support::tls::temp_dir("qbuf");
    let cfg = dir.join("proxy.toml");
    std::fs::write(&cfg, "client_query_buffer_limit = 1048576\n").unwrap();
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let mut other = proxy.raw();
    assert_eq!(other.call(&[b"SET", b"other", b"1"]), b"+OK\r\n");

    // 900 KB in one value: under the limit, sent in small writes.
    let mut c = proxy.raw();
    let value = vec![b'v'; 900 * 1024];
    for piece in resp(&[b"SET", b"big", &value]).chunks(7000) {
        c.send(piece);
    }
    assert_eq!(c.read_replies(1)[0], b"+OK\r\n");

    // 2 MB of small commands in one pipeline: each is parsed as it arrives.
    let n = 40_000;
    let mut wire = Vec::new();
    for i in 0..n {
        wire.extend_from_slice(&resp(&[b"ECHO", format!("{i:045}").as_bytes()]));
    }
    assert!(wire.len() > 2 * 1024 * 1024);
    let mut w = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || w.write_all(&wire).unwrap());
    let replies = c.read_replies(n);
    sender.join().unwrap();
    assert_eq!(
        replies[n - 1],
        format!("$45\r\n{:045}\r\n", n - 1).into_bytes()
    );

    // A 4 MB value: closed once 1 MB of it is buffered.
    let mut big = proxy.raw();
    big.send(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$4194304\r\n");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < 2 * 1024 * 1024 {
        if big.stream.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(big.is_closed(), "the client over the limit is closed");
    assert_eq!(other.call(&[b"GET", b"other"]), b"$1\r\n1\r\n");
    assert_eq!(
        c.call(&[b"STRLEN", b"big"]),
        format!(":{}\r\n", 900 * 1024).into_bytes()
    );
}
