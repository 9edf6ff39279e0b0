//! Issue 14's failures, each reproduced against real shards: hangs, holes and unbounded
//! memory that an adversarial review found. Every test here failed before its fix.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Point 1: a pipelined batch of large replies (several MB) used to stall forever: the
/// session consumed the "replies arrived" wake-up while it waited on the client's full
/// socket, so the replies stayed queued until the client sent something else.
#[test]
fn pipelined_large_replies_flow_as_the_client_reads() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let value = vec![b'x'; 256 * 1024];
    let mut c = proxy.raw();
    for i in 0..10 {
        let key = format!("big:{i}");
        assert_eq!(c.call(&[b"SET", key.as_bytes(), &value]), b"+OK\r\n");
    }
    // 20 GETs of 256 KiB per batch (5 MiB of replies), read only after the whole batch
    // was sent, as `redis-benchmark -P 20` does.
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.extend_from_slice(&resp(&[b"GET", format!("big:{}", i % 10).as_bytes()]));
    }
    for round in 0..40 {
        c.send(&batch);
        let replies = c.read_replies(20);
        for r in &replies {
            assert_eq!(
                r.len(),
                value.len() + 11,
                "round {round}: {}",
                lossy(&r[..20])
            );
        }
    }
}

/// Point 1 as the review ran it: redis-benchmark with 256 KiB values at pipeline 20.
#[test]
fn redis_benchmark_with_large_pipelined_values_finishes() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let port = proxy.port.to_string();
    let run = |args: &[&str]| {
        let mut cmd = Command::new("redis-benchmark");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-q"]).args(args);
        match run_bounded(&mut cmd, Duration::from_secs(60)) {
            Ok(f) => assert_eq!(f.code, Some(0), "{args:?}: {}", f.stderr),
            Err(f) => panic!("redis-benchmark {args:?} hung: {}", f.stdout),
        }
    };
    run(&["-t", "set", "-d", "262144", "-n", "10"]);
    run(&["-t", "get", "-P", "20", "-c", "1", "-n", "2000"]);
}

/// Point 4: bare `COMMAND` (clients call it at start-up) used to fail with a wrong-arity
/// error. It answers Redis's whole table, as do its subcommands.
#[test]
fn bare_command_answers_the_whole_table() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut direct = RawConn::connect(shard.port);
    let mut c = proxy.raw();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let table = c.call(&[b"COMMAND"]);
    assert!(
        table.starts_with(b"*"),
        "{}",
        lossy(&table[..40.min(table.len())])
    );
    let want = direct.call(&[b"COMMAND"]);
    assert_eq!(
        table.len(),
        want.len(),
        "the same table as a redis-server's"
    );
    let count = c.call(&[b"COMMAND", b"COUNT"]);
    let n: usize = lossy(&count[1..count.len() - 2]).parse().unwrap();
    assert!(n > 200, "COMMAND COUNT {n}");
    assert!(table.starts_with(format!("*{n}\r\n").as_bytes()));
    for args in [
        &[&b"COMMAND"[..], b"INFO", b"get"][..],
        &[b"COMMAND", b"DOCS", b"get"],
        &[b"COMMAND", b"LIST"],
        &[b"COMMAND", b"GETKEYS", b"SET", b"k", b"v"],
        &[b"command"],
    ] {
        assert_eq!(lossy(&c.call(args)), lossy(&direct.call(args)), "{args:?}");
    }
}

/// Point 2: a reply nested deeper than 512 (a Lua table returned by EVAL) made the reply
/// framer give up and drop the shared shard connection, failing other clients' requests.
/// Any depth Redis produces is framed, and nobody else notices.
#[test]
fn deep_replies_are_framed_and_fail_nobody_else() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut direct = RawConn::connect(shard.port);
    let mut setup = proxy.raw();
    assert_eq!(setup.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    // Two other clients pipeline GETs on the same (only) worker all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            let mut c = proxy.raw();
            std::thread::spawn(move || {
                let batch: Vec<u8> = resp(&[b"GET", b"k"]).repeat(50);
                let mut batches = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || batches < 3 {
                    c.send(&batch);
                    for r in c.read_replies(50) {
                        assert_eq!(lossy(&r), "$1\r\nv\r\n", "after {batches} batches");
                    }
                    batches += 1;
                }
                batches
            })
        })
        .collect();
    for depth in [600, 1_000, 5_000] {
        let script = format!("local t={{1}}; for i=1,{depth} do t={{t}} end; return t");
        let args: [&[u8]; 3] = [b"EVAL", script.as_bytes(), b"0"];
        let want = direct.call(&args);
        assert!(want.starts_with(b"*1\r\n*1\r\n"), "{}", lossy(&want[..20]));
        for _ in 0..5 {
            assert_eq!(lossy(&setup.call(&args)), lossy(&want), "depth {depth}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in others {
        assert!(t.join().expect("no other client saw an error") >= 3);
    }
}
