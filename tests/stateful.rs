//! Transactions, scripts and functions, blocking commands and CLIENT KILL, against real shards.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into()
}

fn three() -> (Vec<RedisServer>, Slotgate) {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    (shards, proxy)
}

/// Connections in the shards' CLIENT LIST for which `pick(flags, line)` holds.
fn clients_on_shards(shards: &[RedisServer], pick: impl Fn(&str, &str) -> bool) -> usize {
    shards
        .iter()
        .map(|s| {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query(&mut s.client())
                .unwrap();
            list.lines()
                .filter(|l| {
                    let flags = l
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("flags="))
                        .unwrap_or("");
                    pick(flags, l)
                })
                .count()
        })
        .sum()
}

/// Connections on the shards that are in MULTI (flag x) or blocked (flag b), or are running a
/// command named `cmd`.
fn leftover_on_shards(shards: &[RedisServer], cmd: &str) -> usize {
    clients_on_shards(shards, |flags, l| {
        flags.contains('x') || flags.contains('b') || l.contains(&format!("cmd={cmd} "))
    })
}

/// Connections on the shards blocked (flag b) in a command named `cmd`.
fn blocked_on_shards(shards: &[RedisServer], cmd: &str) -> usize {
    clients_on_shards(shards, |flags, l| {
        flags.contains('b') && l.contains(&format!(" cmd={cmd} "))
    })
}

/// `(tx_queue, rx_queue)` of the loopback TCP socket from port `local` to port `remote`, from
/// /proc/net/tcp.
fn tcp_queues(local: u16, remote: u16) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (l, r) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // f[1] = local addr:port, f[2] = remote addr:port, f[4] = tx_queue:rx_queue (hex)
        if f.len() > 4 && f[1].ends_with(&l) && f[2].ends_with(&r) {
            let (tx, rx) = f[4].split_once(':')?;
            Some((
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            ))
        } else {
            None
        }
    })
}

#[test]
fn multi_exec_watch_and_conflicts() {
    let (_shards, proxy) = three();
    let mut c = proxy.raw();
    let replies = {
        c.send(
            &[
                resp(&[b"MULTI"]),
                resp(&[b"PING"]),
                resp(&[b"SET", b"{u}n", b"1"]),
                resp(&[b"INCR", b"{u}n"]),
                resp(&[b"GET", b"{u}n"]),
                resp(&[b"EXEC"]),
            ]
            .concat(),
        );
        c.read_replies(6)
    };
    assert_eq!(replies[0], b"+OK\r\n");
    assert_eq!(replies[1], b"+QUEUED\r\n");
    assert_eq!(
        lossy(&replies[5]),
        "*4\r\n+PONG\r\n+OK\r\n:2\r\n$1\r\n2\r\n"
    );

    // WATCH: success, then a conflict from another client makes EXEC return nil.
    assert_eq!(c.call(&[b"WATCH", b"{u}n"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"INCR", b"{u}n"]), b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]), b"*1\r\n:3\r\n");
    assert_eq!(c.call(&[b"WATCH", b"{u}n"]), b"+OK\r\n");
    let mut other = proxy.raw();
    assert_eq!(other.call(&[b"SET", b"{u}n", b"100"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"INCR", b"{u}n"]), b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]), b"*-1\r\n", "the watched key changed");
    assert_eq!(c.call(&[b"GET", b"{u}n"]), b"$3\r\n100\r\n");
    // UNWATCH, DISCARD, errors outside a transaction.
    assert_eq!(c.call(&[b"WATCH", b"{u}n"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"UNWATCH"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(
        c.call(&[b"MULTI"]),
        b"-ERR MULTI calls can not be nested\r\n"
    );
    assert_eq!(c.call(&[b"SET", b"{u}d", b"x"]), b"+QUEUED\r\n");
    assert_eq!(
        c.call(&[b"WATCH", b"{u}n"]),
        b"-ERR WATCH inside MULTI is not allowed\r\n"
    );
    assert_eq!(c.call(&[b"DISCARD"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"EXISTS", b"{u}d"]), b":0\r\n");
    assert_eq!(c.call(&[b"EXEC"]), b"-ERR EXEC without MULTI\r\n");
    assert_eq!(c.call(&[b"DISCARD"]), b"-ERR DISCARD without MULTI\r\n");
    // Only keyless commands: any shard runs them.
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"ECHO", b"hi"]), b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]), b"*1\r\n$2\r\nhi\r\n");
}

#[test]
fn cross_slot_and_queuing_errors_abort_the_transaction() {
    let (_shards, proxy) = three();
    let mut c = proxy.raw();
    let crossslot = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"SET", b"a", b"1"]), b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"SET", b"b", b"2"]), crossslot);
    assert_eq!(
        c.call(&[b"EXEC"]),
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(c.call(&[b"EXISTS", b"a", b"b"]), b":0\r\n", "nothing ran");
    // An unknown command, a bad arity and a command spanning shards abort it too.
    let bads: [&[&[u8]]; 3] = [&[b"NOSUCH"], &[b"GET"], &[b"KEYS", b"*"]];
    for bad in bads {
        assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
        assert_eq!(c.call(&[b"SET", b"a", b"1"]), b"+QUEUED\r\n");
        let r = c.call(bad);
        assert!(r.starts_with(b"-ERR"), "{}", lossy(&r));
        assert!(c.call(&[b"EXEC"]).starts_with(b"-EXECABORT"));
    }
    assert_eq!(c.call(&[b"EXISTS", b"a"]), b":0\r\n");
    // WATCH keys must share a slot too.
    assert_eq!(c.call(&[b"WATCH", b"a", b"b"]), crossslot);
    assert_eq!(c.call(&[b"WATCH", b"a"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"WATCH", b"b"]), crossslot);
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"SET", b"b", b"1"]), crossslot);
    assert!(c.call(&[b"EXEC"]).starts_with(b"-EXECABORT"));
}

#[test]
fn the_lock_pattern_under_50_clients_has_no_double_ownership() {
    let (_shards, proxy) = three();
    let owned = Arc::new(AtomicBool::new(false));
    let doubles = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let release = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
    let url = proxy.url();
    let threads: Vec<_> = (0..50)
        .map(|t| {
            let (owned, doubles, done, url) =
                (owned.clone(), doubles.clone(), done.clone(), url.clone());
            std::thread::spawn(move || {
                let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut mine = 0;
                while mine < 4 {
                    let token = format!("t{t}-{mine}");
                    wait_until(
                        &format!("client {t} to get the lock"),
                        deadline.saturating_duration_since(Instant::now()),
                        || {
                            redis::cmd("SET")
                                .arg("lock:res")
                                .arg(&token)
                                .arg("NX")
                                .arg("PX")
                                .arg(5000)
                                .query::<Option<String>>(&mut con)
                                .unwrap()
                                .is_some()
                        },
                    );
                    if owned.swap(true, Ordering::SeqCst) {
                        doubles.fetch_add(1, Ordering::SeqCst);
                    }
                    // The critical section: a read-modify-write that only a lock makes safe.
                    let n: i64 = redis::cmd("GET")
                        .arg("counter")
                        .query::<Option<i64>>(&mut con)
                        .unwrap()
                        .unwrap_or(0);
                    let _: () = redis::cmd("SET")
                        .arg("counter")
                        .arg(n + 1)
                        .query(&mut con)
                        .unwrap();
                    owned.store(false, Ordering::SeqCst);
                    let freed: i64 = redis::cmd("EVAL")
                        .arg(release)
                        .arg(1)
                        .arg("lock:res")
                        .arg(&token)
                        .query(&mut con)
                        .unwrap();
                    assert_eq!(freed, 1, "the owner releases its own lock");
                    mine += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(doubles.load(Ordering::SeqCst), 0, "two owners at once");
    let total = done.load(Ordering::SeqCst) as i64;
    assert_eq!(total, 200, "every client got the lock 4 times");
    let n: i64 = redis::cmd("GET")
        .arg("counter")
        .query(&mut proxy.client())
        .unwrap();
    assert_eq!(n, total, "no lost update");
}

#[test]
fn scripts_and_functions_loaded_once_run_for_keys_on_every_shard() {
    let (shards, proxy) = three();
    let mut con = proxy.client();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('INCR', KEYS[1])")
        .query(&mut con)
        .unwrap();
    // Keys on every shard: no NOSCRIPT anywhere.
    for i in 0..30 {
        let key = format!("s{i}");
        let v: i64 = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(1)
            .arg(&key)
            .query(&mut con)
            .unwrap();
        assert_eq!(v, 1);
    }
    for s in &shards {
        let n: i64 = redis::cmd("DBSIZE").query(&mut s.client()).unwrap();
        assert!(n > 0, "the keys are spread over the shards");
    }
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .arg("0000000000000000000000000000000000000000")
        .query(&mut con)
        .unwrap();
    assert_eq!(exists, vec![1, 0]);
    // Keys of a script must share a slot; zero keys run on one shard.
    let mut c = proxy.raw();
    assert_eq!(
        c.call(&[b"EVAL", b"return 1", b"2", b"a", b"b"]),
        b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(c.call(&[b"EVAL", b"return 7", b"0"]), b":7\r\n");
    assert_eq!(c.call(&[b"SCRIPT", b"FLUSH"]), b"+OK\r\n");
    let r = c.call(&[b"EVALSHA", sha.as_bytes(), b"1", b"s1"]);
    assert!(
        r.starts_with(b"-NOSCRIPT"),
        "flushed everywhere: {}",
        lossy(&r)
    );
    // Functions.
    let lib = "#!lua name=mylib\nredis.register_function('bump', function(keys) return redis.call('INCRBY', keys[1], 10) end)";
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(lib)
        .query(&mut con)
        .unwrap();
    assert_eq!(name, "mylib");
    for i in 0..10 {
        let v: i64 = redis::cmd("FCALL")
            .arg("bump")
            .arg(1)
            .arg(format!("f{i}"))
            .query(&mut con)
            .unwrap();
        assert_eq!(v, 10);
    }
    let list: redis::Value = redis::cmd("FUNCTION").arg("LIST").query(&mut con).unwrap();
    assert!(format!("{list:?}").contains("mylib"));
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("mylib")
        .query(&mut con)
        .unwrap();
    let err = redis::cmd("FCALL")
        .arg("bump")
        .arg(1)
        .arg("f1")
        .query::<i64>(&mut con);
    assert!(err.is_err(), "deleted on every shard");
}

#[test]
fn blocking_commands_wake_time_out_and_keep_order() {
    let (shards, proxy) = {
        let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
        let refs: Vec<&RedisServer> = shards.iter().collect();
        let proxy = Slotgate::start_with(&refs, &["--op-timeout", "200ms"]);
        (shards, proxy)
    };
    let mut waiter = proxy.raw();
    waiter.send(&resp(&[b"BLPOP", b"jobs", b"0"]));
    wait_until(
        "the BLPOP to block on a shard",
        Duration::from_secs(5),
        || blocked_on_shards(&shards, "blpop") == 1,
    );
    let mut pusher = proxy.raw();
    assert_eq!(pusher.call(&[b"LPUSH", b"jobs", b"job1"]), b":1\r\n");
    assert_eq!(
        waiter.read_replies(1)[0],
        b"*2\r\n$4\r\njobs\r\n$4\r\njob1\r\n"
    );
    // The client's timeout (1 s) is honoured, not cut by the 200 ms op timeout.
    let started = Instant::now();
    assert_eq!(waiter.call(&[b"BRPOP", b"nothing", b"1"]), b"*-1\r\n");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A pipeline: the push runs before the blocking pop that follows it, and the GET after
    // the pop waits for it.
    waiter.send(
        &[
            resp(&[b"LPUSH", b"q", b"x"]),
            resp(&[b"BLPOP", b"q", b"0"]),
            resp(&[b"LLEN", b"q"]),
        ]
        .concat(),
    );
    let r = waiter.read_replies(3);
    assert_eq!(r[0], b":1\r\n");
    assert_eq!(r[1], b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
    assert_eq!(r[2], b":0\r\n");
    // Two blocking commands in one pipeline: the second waits for the first, as on a Redis
    // connection (it must not replace the first one's connection).
    waiter.send(
        &[
            resp(&[b"BLPOP", b"q1", b"0"]),
            resp(&[b"BLPOP", b"q2", b"0"]),
        ]
        .concat(),
    );
    wait_until(
        "the first BLPOP (only) to block on a shard",
        Duration::from_secs(5),
        || blocked_on_shards(&shards, "blpop") == 1,
    );
    assert_eq!(pusher.call(&[b"LPUSH", b"q2", b"second"]), b":1\r\n");
    assert_eq!(pusher.call(&[b"LPUSH", b"q1", b"first"]), b":1\r\n");
    let r = waiter.read_replies(2);
    assert_eq!(r[0], b"*2\r\n$2\r\nq1\r\n$5\r\nfirst\r\n");
    assert_eq!(r[1], b"*2\r\n$2\r\nq2\r\n$6\r\nsecond\r\n");
    // XREAD BLOCK, woken by XADD.
    waiter.send(&resp(&[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"st", b"$"]));
    wait_until(
        "the XREAD to block on a shard",
        Duration::from_secs(5),
        || blocked_on_shards(&shards, "xread") == 1,
    );
    let id = pusher.call(&[b"XADD", b"st", b"*", b"f", b"v"]);
    assert!(id.starts_with(b"$"));
    let got = waiter.read_replies(1).remove(0);
    assert!(
        lossy(&got).contains("$1\r\nf\r\n$1\r\nv\r\n"),
        "{}",
        lossy(&got)
    );
    // Keys of a blocking command must share a slot.
    assert_eq!(
        waiter.call(&[b"BLPOP", b"a", b"b", b"0"]),
        b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
}

#[test]
fn killed_or_vanished_clients_leave_nothing_on_the_shards() {
    let (shards, proxy) = three();
    // A client that disconnects while blocked, and one that disconnects mid-MULTI.
    {
        let mut blocked = proxy.raw();
        blocked.send(&resp(&[b"BLPOP", b"gone", b"0"]));
        let mut in_tx = proxy.raw();
        assert_eq!(in_tx.call(&[b"MULTI"]), b"+OK\r\n");
        assert_eq!(in_tx.call(&[b"SET", b"k", b"v"]), b"+QUEUED\r\n");
        let n = wait_for(
            "the two clients' connections on the shards",
            Duration::from_secs(5),
            || {
                let n = leftover_on_shards(&shards, "blpop");
                (n >= 2).then_some(n)
            },
        );
        assert_eq!(n, 2, "one blocked, one in MULTI");
    }
    wait_until(
        "the shards to drop the vanished clients' connections (connections left behind)",
        Duration::from_secs(3),
        || leftover_on_shards(&shards, "blpop") == 0,
    );
    // CLIENT KILL ID closes another client's session (and so its blocked connection).
    let mut victim = proxy.raw();
    let id = victim.call(&[b"CLIENT", b"ID"]);
    let id = lossy(&id[1..id.len() - 2]);
    victim.send(&resp(&[b"BLPOP", b"gone", b"0"]));
    wait_until(
        "the victim's BLPOP to block on a shard",
        Duration::from_secs(5),
        || blocked_on_shards(&shards, "blpop") == 1,
    );
    let mut admin = proxy.raw();
    assert_eq!(
        admin.call(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()]),
        b":1\r\n"
    );
    assert!(victim.is_closed());
    wait_until(
        "the shard to drop the killed client's blocked connection (it stayed)",
        Duration::from_secs(3),
        || leftover_on_shards(&shards, "blpop") == 0,
    );
    assert_eq!(
        admin.call(&[b"CLIENT", b"KILL", b"127.0.0.1:1"]),
        b"-ERR No such client\r\n"
    );
}

/// A client that stops reading while its replies are being written is still closed by
/// CLIENT KILL at once, not after it has drained everything it asked for.
#[test]
fn client_kill_closes_a_client_that_stopped_reading() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut victim = proxy.raw();
    let big = vec![b'x'; 1 << 20];
    assert_eq!(victim.call(&[b"SET", b"big", &big]), b"+OK\r\n");
    let id = victim.call(&[b"CLIENT", b"ID"]);
    let id = lossy(&id[1..id.len() - 2]);
    let gets = 64;
    victim.send(&resp(&[b"GET", b"big"]).repeat(gets));
    // Wait until the session has filled the socket and blocks in its write: the victim's
    // receive queue is full and the proxy's send queue holds data, and neither moves.
    let me = victim.stream.local_addr().unwrap().port();
    let mut last = None;
    let mut same = 0;
    wait_until(
        "the proxy's writes to the victim to stall on a full socket",
        Duration::from_secs(10),
        || {
            let now = (tcp_queues(proxy.port, me), tcp_queues(me, proxy.port));
            let full = matches!(now, (Some((tx, _)), Some((_, rx))) if tx > 0 && rx > 0);
            same = if full && last == Some(now) {
                same + 1
            } else {
                0
            };
            last = Some(now);
            same >= 3
        },
    );
    let mut admin = proxy.raw();
    assert_eq!(
        admin.call(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()]),
        b":1\r\n"
    );
    let mut read = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match std::io::Read::read(&mut victim.stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the killed client was not closed: {e}"),
        }
    }
    assert!(
        read < gets * big.len() / 2,
        "the killed client got {read} bytes before EOF: all its replies were written first"
    );
}

#[test]
fn dedicated_connections_are_capped_per_shard() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--max-dedicated-per-shard", "2"]);
    let mut a = proxy.raw();
    let mut b = proxy.raw();
    a.send(&resp(&[b"BLPOP", b"x", b"0"]));
    b.send(&resp(&[b"BLPOP", b"y", b"0"]));
    wait_until(
        "both BLPOPs to block on the shard",
        Duration::from_secs(5),
        || blocked_on_shards(std::slice::from_ref(&shard), "blpop") == 2,
    );
    let mut c = proxy.raw();
    let r = lossy(&c.call(&[b"BLPOP", b"z", b"0"]));
    assert!(r.starts_with("-ERR too many dedicated connections"), "{r}");
    // Ordinary traffic is unaffected.
    assert_eq!(c.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
}

/// The idle spare each worker keeps counts against the cap, and is closed to make room: with
/// a cap of 1, a RESP3 client can still run a blocking command and a transaction (review
/// regression: the RESP2 spare took the only place).
#[test]
fn a_spare_makes_room_under_the_dedicated_cap() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--max-dedicated-per-shard", "1"]);
    let mut c = proxy.raw();
    assert!(c.call(&[b"HELLO", b"3"]).starts_with(b"%"));
    assert_eq!(c.call(&[b"BLPOP", b"nothing", b"0.1"]), b"_\r\n");
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"SET", b"a", b"1"]), b"+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]), b"*1\r\n+OK\r\n");
    let mut r2 = proxy.raw();
    assert_eq!(r2.call(&[b"BLPOP", b"nothing", b"0.1"]), b"*-1\r\n");
}

#[test]
fn blocked_clients_do_not_stall_other_traffic() {
    let (shards, proxy) = three();
    let mut blocked: Vec<RawConn> = (0..100)
        .map(|i| {
            let mut c = proxy.raw();
            c.send(&resp(&[b"BLPOP", format!("wait:{i}").as_bytes(), b"0"]));
            c
        })
        .collect();
    let n = wait_for(
        "100 clients blocked on the shards",
        Duration::from_secs(10),
        || {
            let n = leftover_on_shards(&shards, "blpop");
            (n >= 100).then_some(n)
        },
    );
    assert_eq!(n, 100, "100 clients blocked");
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p",
            &proxy.port.to_string(),
            "-q",
            "-n",
            "20000",
            "-c",
            "20",
            "-t",
            "set,get",
        ])
        .output()
        .unwrap();
    let text = lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("ERR"), "{text}");
    assert!(text.contains("GET:") && text.contains("SET:"), "{text}");
    // Wake them all.
    let mut p = proxy.raw();
    for i in 0..100 {
        p.call(&[b"LPUSH", format!("wait:{i}").as_bytes(), b"go"]);
    }
    for c in &mut blocked {
        let r = c.read_replies(1).remove(0);
        assert!(r.ends_with(b"$2\r\ngo\r\n"), "{}", lossy(&r));
    }
}

/// A runaway script or function is killed through slotgate (issue 13.1): SCRIPT KILL and
/// FUNCTION KILL travel on control connections, not behind the script on the shared ones,
/// answer as Redis does, and the shard serves everyone again at once.
#[test]
fn a_busy_script_or_function_is_killed_through_slotgate() {
    // Redis takes commands during a script only after busy-reply-threshold (lua-time-limit).
    let shards: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start_with(&["--lua-time-limit", "100"]))
        .collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    // (An op timeout long enough for the script's reply to wait for its killing on a loaded
    // machine: with the default 1 s, the runaway client could be told "outcome unknown".)
    let proxy = Slotgate::start_with(&refs, &["--workers", "1", "--op-timeout", "10s"]);
    let reference = RedisServer::start();
    let notbusy = RawConn::connect(reference.port).call(&[b"SCRIPT", b"KILL"]);
    assert_eq!(notbusy, b"-NOTBUSY No scripts in execution right now.\r\n");

    let mut admin = proxy.raw();
    assert_eq!(
        admin.call(&[b"SCRIPT", b"KILL"]),
        notbusy,
        "nothing to kill"
    );
    assert_eq!(admin.call(&[b"FUNCTION", b"KILL"]), notbusy);

    let busy_shard = |shard: &RedisServer| {
        let mut c = RawConn::connect(shard.port);
        c.call(&[b"PING"]).starts_with(b"-BUSY")
    };
    // A script (no keys: the first shard runs it).
    let mut runaway = proxy.raw();
    runaway.send(&resp(&[b"EVAL", b"while true do end", b"0"]));
    wait_until("the first shard to be busy", Duration::from_secs(5), || {
        busy_shard(&shards[0])
    });
    assert_eq!(admin.call(&[b"SCRIPT", b"KILL"]), b"+OK\r\n");
    let killed = lossy(&runaway.read_replies(1)[0]);
    assert!(
        killed.contains("Script killed by user with SCRIPT KILL"),
        "{killed}"
    );
    // The shard serves at once, through the connection the script held too.
    assert_eq!(runaway.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    assert_eq!(admin.call(&[b"GET", b"k"]), b"$1\r\nv\r\n");

    // A function.
    let lib =
        b"#!lua name=spinlib\nredis.register_function('spin', function() while true do end end)";
    assert_eq!(
        admin.call(&[b"FUNCTION", b"LOAD", lib]),
        b"$7\r\nspinlib\r\n"
    );
    runaway.send(&resp(&[b"FCALL", b"spin", b"0"]));
    wait_until("the first shard to be busy", Duration::from_secs(5), || {
        busy_shard(&shards[0])
    });
    // SCRIPT KILL does not kill a function: the busy shard's error is passed through (the
    // other shard's NOTBUSY does not hide it), as Redis answers it.
    let wrong_kill = lossy(&admin.call(&[b"SCRIPT", b"KILL"]));
    assert!(wrong_kill.starts_with("-BUSY"), "{wrong_kill}");
    assert_eq!(admin.call(&[b"FUNCTION", b"KILL"]), b"+OK\r\n");
    let killed = lossy(&runaway.read_replies(1)[0]);
    // (Redis 7.0 words a killed function like a killed script.)
    assert!(
        killed.contains("Script killed by user") && killed.contains("spin"),
        "{killed}"
    );
    assert_eq!(runaway.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(admin.call(&[b"SCRIPT", b"KILL"]), notbusy);
}

/// A WATCH that failed watches nothing, as in Redis: the next transaction is not pinned to its
/// slot (found by the soak: CROSSSLOT after a WATCH cut by a stopped shard). A WATCH that
/// succeeded and then lost its connection makes EXEC answer a null array: the watched key
/// may have changed unseen, and a WATCH retry loop starts over.
#[test]
fn failed_and_lost_watches() {
    let mut shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--op-timeout", "300ms"]);
    let mut c = proxy.raw();

    // WATCH cut by a stopped shard: "outcome unknown".
    shard.pause();
    let failed = lossy(&c.call(&[b"WATCH", b"{a}k"]));
    assert!(failed.starts_with("-ERR outcome unknown"), "{failed}");
    shard.resume();
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(
        c.call(&[b"INCR", b"{b}n"]),
        b"+QUEUED\r\n",
        "not pinned to {{a}}'s slot"
    );
    assert_eq!(c.call(&[b"EXEC"]), b"*1\r\n:1\r\n");

    // WATCH that succeeded, then its connection is lost (the shard restarts).
    assert_eq!(c.call(&[b"WATCH", b"{a}k"]), b"+OK\r\n");
    shard.restart();
    assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"SET", b"{a}k", b"v"]), b"+QUEUED\r\n");
    assert_eq!(
        c.call(&[b"EXEC"]),
        b"*-1\r\n",
        "the watched key may have changed"
    );
    let v: Option<String> = redis::cmd("GET")
        .arg("{a}k")
        .query(&mut shard.client())
        .unwrap();
    assert_eq!(v, None, "nothing ran");
    // And the client goes on.
    assert_eq!(c.call(&[b"SET", b"{a}k", b"w"]), b"+OK\r\n");
}

/// A shard busy with a script is alive (issue 13.1): the connection the script holds is not
/// replaced however long the script runs past 3 × op-timeout (slotgate asks the shard on a
/// connection of its own and gets BUSY); SCRIPT KILL ends it and the same connection serves on.
#[test]
fn a_long_busy_script_does_not_get_its_shard_connection_replaced() {
    let shard = RedisServer::start_with(&["--lua-time-limit", "50"]);
    let log = support::tls::temp_dir("busy").join("slotgate.log");
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let proxy = Slotgate::start_logged(
        &[&shard],
        &[
            "--op-timeout",
            "200ms",
            "--admin-listen",
            &admin,
            "--log-level",
            "info",
        ],
        Some(&log),
    );
    wait_for_own_port(admin_port, proxy.pid());
    let mut runaway = proxy.raw();
    runaway.send(&resp(&[b"EVAL", b"while true do end", b"0"]));
    wait_until("the shard to be busy", Duration::from_secs(5), || {
        RawConn::connect(shard.port)
            .call(&[b"PING"])
            .starts_with(b"-BUSY")
    });
    // The connection is judged once it has been silent for 3 × op-timeout (600 ms): wait for
    // it to have been judged, and kept, twice.
    wait_until("two busy probes", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("its silent connection is kept")
            .count()
            >= 2
    });
    // The EVAL itself failed at its op-timeout, as every request does.
    let timed_out = lossy(&runaway.read_replies(1)[0]);
    assert!(timed_out.starts_with("-ERR outcome unknown"), "{timed_out}");
    let mut admin_conn = proxy.raw();
    assert_eq!(admin_conn.call(&[b"SCRIPT", b"KILL"]), b"+OK\r\n");
    assert_eq!(runaway.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(
        metric_sum(admin_port, "slotgate_shard_disconnects_total"),
        0.0
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("shard connection lost"), "{text}");
}

/// INFO fields that clients and exporters read (issue 13.2): `blocked_clients` follows the
/// clients blocked through slotgate, `pubsub_clients` the subscribed ones, and slotgate is a
/// primary without replicas with a stable 40-hex `run_id` (redis-py's `info()` parses them).
#[test]
fn info_reports_blocked_and_subscribed_clients_role_and_run_id() {
    let (shards, proxy) = three();
    let mut c = proxy.client();
    let info = |c: &mut redis::Connection, section: &str| -> redis::InfoDict {
        redis::cmd("INFO").arg(section).query(c).unwrap()
    };
    let field = |d: &redis::InfoDict, k: &str| -> i64 { d.get(k).unwrap_or(-1) };
    assert_eq!(field(&info(&mut c, "clients"), "blocked_clients"), 0);
    let mut blocked: Vec<RawConn> = (0..3).map(|_| proxy.raw()).collect();
    for b in &mut blocked {
        b.send(&resp(&[b"BLPOP", b"jobs", b"0"]));
    }
    wait_until("three blocked clients", Duration::from_secs(5), || {
        field(&info(&mut c, "clients"), "blocked_clients") == 3
    });
    let mut sub = proxy.raw();
    sub.call(&[b"SUBSCRIBE", b"news"]);
    assert_eq!(field(&info(&mut c, "clients"), "pubsub_clients"), 1);
    let _: i64 = redis::cmd("RPUSH")
        .arg("jobs")
        .arg("a")
        .arg("b")
        .arg("c")
        .query(&mut c)
        .unwrap();
    for b in &mut blocked {
        assert!(lossy(&b.read_replies(1)[0]).starts_with("*2\r\n$4\r\njobs"));
    }
    wait_until("no blocked client", Duration::from_secs(5), || {
        field(&info(&mut c, "clients"), "blocked_clients") == 0
    });
    // A client that leaves while blocked is counted out too.
    let mut leaving = proxy.raw();
    leaving.send(&resp(&[b"BLPOP", b"jobs", b"0"]));
    wait_until("one blocked client", Duration::from_secs(5), || {
        field(&info(&mut c, "clients"), "blocked_clients") == 1
    });
    drop(leaving);
    wait_until("none again", Duration::from_secs(5), || {
        field(&info(&mut c, "clients"), "blocked_clients") == 0
    });

    let repl = info(&mut c, "replication");
    assert_eq!(repl.get::<String>("role").as_deref(), Some("master"));
    assert_eq!(field(&repl, "connected_slaves"), 0);
    let run_id: String = info(&mut c, "server").get("run_id").unwrap();
    assert_eq!(run_id.len(), 40);
    assert!(run_id.bytes().all(|b| b.is_ascii_hexdigit()), "{run_id}");
    let all = info(&mut c, "everything");
    assert_eq!(all.get::<String>("run_id"), Some(run_id.clone()), "stable");
    assert_eq!(all.get::<String>("role").as_deref(), Some("master"));
    // slotgate's own CPU time and resident memory.
    let mut busy = proxy.raw();
    wait_until(
        "slotgate's CPU time to show",
        Duration::from_secs(10),
        || {
            busy.send(&resp(&[b"PING"]).repeat(2000));
            busy.read_replies(2000);
            let cpu = info(&mut c, "cpu");
            let user: f64 = cpu.get("used_cpu_user").unwrap();
            let sys: f64 = cpu.get("used_cpu_sys").unwrap();
            user + sys > 0.0
        },
    );
    let rss: i64 = info(&mut c, "memory").get("proxy_used_memory_rss").unwrap();
    assert!(rss > 1_000_000, "{rss}");
    drop(shards);
}

/// Scripts and libraries loaded through slotgate are loaded again on a shard that restarts
/// empty (issue 13.1): EVALSHA and FCALL keep working without NOSCRIPT; SCRIPT FLUSH forgets.
#[test]
fn scripts_survive_a_shard_restart() {
    let mut shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &[]);
    let mut c = proxy.raw();
    let sha = c.call(&[b"SCRIPT", b"LOAD", b"return 'scripted'"]);
    let sha = lossy(&sha).lines().nth(1).unwrap().to_string();
    let lib = b"#!lua name=keep\nredis.register_function('kept', function() return 'fn' end)";
    assert_eq!(c.call(&[b"FUNCTION", b"LOAD", lib]), b"$4\r\nkeep\r\n");
    assert_eq!(
        c.call(&[b"EVALSHA", sha.as_bytes(), b"0"]),
        b"$8\r\nscripted\r\n"
    );

    shard.restart();
    let evalsha = wait_for(
        "EVALSHA to work after the restart",
        Duration::from_secs(10),
        || {
            let r = lossy(&c.call(&[b"EVALSHA", sha.as_bytes(), b"0"]));
            assert!(!r.contains("NOSCRIPT"), "{r}");
            (!r.starts_with("-ERR shard unavailable") && !r.starts_with("-ERR outcome unknown"))
                .then_some(r)
        },
    );
    assert_eq!(evalsha, "$8\r\nscripted\r\n");
    assert_eq!(c.call(&[b"FCALL", b"kept", b"0"]), b"$2\r\nfn\r\n");

    // Forgotten once flushed: the next restart does not bring them back.
    assert_eq!(c.call(&[b"SCRIPT", b"FLUSH"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"FUNCTION", b"DELETE", b"keep"]), b"+OK\r\n");
    shard.restart();
    let r = wait_for("the shard back", Duration::from_secs(10), || {
        let r = lossy(&c.call(&[b"EVALSHA", sha.as_bytes(), b"0"]));
        (!r.starts_with("-ERR shard unavailable") && !r.starts_with("-ERR outcome unknown"))
            .then_some(r)
    });
    assert!(r.starts_with("-NOSCRIPT"), "{r}");
}
