//! Proxy-wide client controls (issue 13.3): MONITOR, CLIENT PAUSE / UNPAUSE and CLIENT UNBLOCK,
//! through slotgate on real shards and compared with a plain redis-server where Redis defines
//! the answer.

mod support;

use std::io::Read;
use std::time::Duration;

use support::*;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into()
}

fn two() -> (Vec<RedisServer>, Slotgate) {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    (shards, proxy)
}

/// Reads MONITOR lines until `n` have arrived; each with its time and client port replaced by
/// placeholders (they differ between runs), checked for their shape first.
fn monitor_lines(m: &mut RawConn, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = lossy(&buf);
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        if lines.len() >= n && text.ends_with("\r\n") {
            return lines
                .iter()
                .map(|l| {
                    let (time, rest) = l.split_once(' ').expect("a time, then the rest");
                    let (secs, micros) = time[1..].split_once('.').expect("seconds.micros");
                    assert!(
                        time.starts_with('+') && secs.len() >= 10 && micros.len() == 6,
                        "{l}"
                    );
                    let (client, args) = rest.split_once("] ").expect("[db addr] args");
                    assert!(client.starts_with("[0 127.0.0.1:"), "{l}");
                    format!("+T [0 127.0.0.1:P] {args}")
                })
                .collect();
        }
        let got = m
            .stream
            .read(&mut chunk)
            .expect("monitor lines within the timeout");
        assert!(got > 0, "monitor closed after {:?}", lossy(&buf));
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// The commands both MONITOR comparisons run, one connection each time.
fn run_the_sequence(c: &mut RawConn) {
    let cmds: &[&[&[u8]]] = &[
        &[b"SET", b"k", b"a\"b\\c\n\x01\xff d"],
        &[b"GET", b"k"],
        &[b"AUTH", b"someone", b"secret"],
        &[b"HELLO", b"2", b"AUTH", b"someone", b"secret"],
        &[b"CONFIG", b"GET", b"maxmemory"],
        &[b"CLIENT", b"LIST"],
        &[b"MULTI"],
        &[b"INCR", b"n"],
        &[b"EXEC"],
        &[b"PING"],
        &[b"CLIENT", b"SETNAME", b"seq"],
        &[b"DEL", b"k", b"n"],
    ];
    for args in cmds {
        c.call(args);
    }
}

/// MONITOR sees every command through slotgate (any worker, any shard) in Redis's line format:
/// the same lines as a plain redis-server's MONITOR for the same commands, AUTH's secrets
/// redacted, administrative commands (CONFIG, CLIENT LIST) not shown; a monitoring client
/// gets Redis's error for keyspace commands; RESET ends MONITOR mode.
#[test]
fn monitor_shows_every_command_like_redis() {
    let plain = RedisServer::start();
    let mut direct = RawConn::connect(plain.port);
    assert_eq!(lossy(&direct.call(&[b"MONITOR"])), "+OK\r\n");
    run_the_sequence(&mut RawConn::connect(plain.port));
    let expected = monitor_lines(&mut direct, 10);

    let (_shards, proxy) = two();
    let mut m = proxy.raw();
    assert_eq!(lossy(&m.call(&[b"MONITOR"])), "+OK\r\n");
    run_the_sequence(&mut proxy.raw());
    assert_eq!(monitor_lines(&mut m, 10), expected);

    // Clients on both workers, keys on both shards: all seen.
    let mut clients: Vec<RawConn> = (0..4).map(|_| proxy.raw()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.call(&[b"SET", format!("key{i}").as_bytes(), b"v"]);
    }
    let mut seen = monitor_lines(&mut m, 4);
    seen.sort();
    let want: Vec<String> = (0..4)
        .map(|i| format!("+T [0 127.0.0.1:P] \"SET\" \"key{i}\" \"v\""))
        .collect();
    assert_eq!(seen, want);

    // The monitor itself: keyspace commands refused as Redis does; others answered (and shown).
    for conn in [&mut direct, &mut m] {
        conn.send(&resp(&[b"GET", b"x"]));
        assert_eq!(
            lossy(&conn.read_exact_n(47)),
            "-ERR Replica can't interact with the keyspace\r\n"
        );
    }
    m.send(&resp(&[b"RESET"]));
    assert_eq!(lossy(&m.read_exact_n(8)), "+RESET\r\n");
    assert_eq!(lossy(&m.call(&[b"GET", b"x"])), "$-1\r\n");
}

/// A monitor that does not read is closed once its output passes the pub/sub class's hard
/// limit, rather than making slotgate hold every line; everyone else goes on.
#[test]
fn a_monitor_that_does_not_read_is_closed() {
    let shard = RedisServer::start();
    let cfg = config_file(
        "monitor-limit",
        "client_output_buffer_limit_pubsub = \"1mb 0 0\"\n",
    );
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let mut m = proxy.raw();
    assert_eq!(lossy(&m.call(&[b"MONITOR"])), "+OK\r\n");
    let mut c = proxy.raw();
    let value = vec![b'x'; 256 * 1024];
    wait_until("the monitor to be closed", Duration::from_secs(20), || {
        c.call(&[b"SET", b"big", &value]);
        clients_of(&mut c) == 1
    });
    assert!(m.is_closed(), "the monitor's connection was closed");
    assert_eq!(lossy(&c.call(&[b"PING"])), "+PONG\r\n");
}

/// How many clients slotgate's CLIENT LIST shows.
fn clients_of(c: &mut RawConn) -> usize {
    lossy(&c.call(&[b"CLIENT", b"LIST"])).matches("id=").count()
}

/// Sends `args` and asserts that no reply comes within `ms` (the command is held).
fn assert_held(c: &mut RawConn, args: &[&[u8]], ms: u64) {
    c.send(&resp(args));
    assert!(
        c.silent_for(Duration::from_millis(ms)),
        "{args:?} was not held"
    );
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
}

/// CLIENT PAUSE WRITE holds a SET (nothing reaches the shard) but not a GET, on every worker;
/// a write queued in MULTI is held too; UNPAUSE lets them go in order. Against a plain
/// redis-server first, for the same answers.
#[test]
fn client_pause_write_holds_a_set_but_not_a_get() {
    let plain = RedisServer::start();
    let (shards, proxy) = two();
    for port in [plain.port, proxy.port] {
        let mut admin = RawConn::connect(port);
        assert_eq!(lossy(&admin.call(&[b"SET", b"k", b"old"])), "+OK\r\n");
        assert_eq!(
            lossy(&admin.call(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"])),
            "+OK\r\n"
        );
        let mut writer = RawConn::connect(port);
        assert_held(&mut writer, &[b"SET", b"k", b"new"], 300);
        let mut tx = RawConn::connect(port);
        assert_eq!(lossy(&tx.call(&[b"MULTI"])), "+OK\r\n");
        assert_held(&mut tx, &[b"INCR", b"n"], 100);
        let mut publisher = RawConn::connect(port);
        assert_held(&mut publisher, &[b"PUBLISH", b"c", b"m"], 100);
        for _ in 0..4 {
            // Readers on any worker go on.
            let mut reader = RawConn::connect(port);
            assert_eq!(lossy(&reader.call(&[b"GET", b"k"])), "$3\r\nold\r\n");
            assert_eq!(
                lossy(&reader.call(&[b"EVAL_RO", b"return 1", b"0"])),
                ":1\r\n"
            );
        }
        if port == proxy.port {
            let on_shard: Option<String> = redis::cmd("GET")
                .arg("k")
                .query(&mut shards[even_shard_of(b"k", 2)].client())
                .unwrap();
            assert_eq!(
                on_shard.as_deref(),
                Some("old"),
                "the held SET reached no shard"
            );
        }
        assert_eq!(lossy(&admin.call(&[b"CLIENT", b"UNPAUSE"])), "+OK\r\n");
        assert_eq!(lossy(&writer.read_exact_n(5)), "+OK\r\n");
        assert_eq!(lossy(&tx.read_exact_n(9)), "+QUEUED\r\n");
        assert_eq!(lossy(&tx.call(&[b"EXEC"])), "*1\r\n:1\r\n");
        assert_eq!(lossy(&publisher.read_exact_n(4)), ":0\r\n");
        assert_eq!(lossy(&admin.call(&[b"GET", b"k"])), "$3\r\nnew\r\n");
        admin.call(&[b"DEL", b"n"]);
    }
}

/// CLIENT PAUSE ALL holds every command, the pausing client's too, until its timeout; a
/// second, shorter pause does not shorten it; errors are Redis's.
#[test]
fn client_pause_all_holds_everything_until_its_timeout() {
    let plain = RedisServer::start();
    let (_shards, proxy) = two();
    for port in [plain.port, proxy.port] {
        let mut admin = RawConn::connect(port);
        for (args, want) in [
            (
                &[&b"CLIENT"[..], b"PAUSE", b"abc"][..],
                "-ERR timeout is not an integer or out of range\r\n",
            ),
            (
                &[b"CLIENT", b"PAUSE", b"-1"],
                "-ERR timeout is negative\r\n",
            ),
            (
                &[b"CLIENT", b"PAUSE", b"10", b"FOO"],
                "-ERR CLIENT PAUSE mode must be WRITE or ALL\r\n",
            ),
        ] {
            assert_eq!(lossy(&admin.call(args)), want);
        }
        assert_eq!(
            lossy(&admin.call(&[b"CLIENT", b"PAUSE", b"1500", b"ALL"])),
            "+OK\r\n"
        );
        let started = std::time::Instant::now();
        let mut reader = RawConn::connect(port);
        assert_held(&mut reader, &[b"GET", b"k"], 300);
        assert_held(&mut admin, &[b"PING"], 100);
        // The GET answers once the pause is over, by itself.
        assert_eq!(lossy(&reader.read_exact_n(5)), "$-1\r\n");
        assert_eq!(lossy(&admin.read_exact_n(7)), "+PONG\r\n");
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
    }
}

/// CLIENT UNBLOCK reaches a client of slotgate blocked in BLPOP: TIMEOUT makes its BLPOP
/// return a null, ERROR an `-UNBLOCKED` error, as on a plain redis-server; a client that is not
/// blocked is answered `:0`.
#[test]
fn client_unblock_unblocks_a_client_blocked_through_slotgate() {
    let plain = RedisServer::start();
    let (_shards, proxy) = two();
    for port in [plain.port, proxy.port] {
        let mut admin = RawConn::connect(port);
        for (reason, want) in [
            (&b"TIMEOUT"[..], "*-1\r\n"),
            (
                b"ERROR",
                "-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n",
            ),
        ] {
            let mut blocked = RawConn::connect(port);
            let id = lossy(&blocked.call(&[b"CLIENT", b"ID"]));
            let id = id.trim_start_matches(':').trim_end().to_string();
            blocked.send(&resp(&[b"BLPOP", b"nothing", b"0"]));
            wait_until(
                "CLIENT UNBLOCK to find the client blocked",
                Duration::from_secs(5),
                || admin.call(&[b"CLIENT", b"UNBLOCK", id.as_bytes(), reason]) == b":1\r\n",
            );
            assert_eq!(lossy(&blocked.read_replies(1)[0]), want);
            // Not blocked any more.
            assert_eq!(
                lossy(&admin.call(&[b"CLIENT", b"UNBLOCK", id.as_bytes()])),
                ":0\r\n"
            );
            assert_eq!(lossy(&blocked.call(&[b"PING"])), "+PONG\r\n");
        }
        for (args, want) in [
            (&[&b"CLIENT"[..], b"UNBLOCK", b"99999"][..], ":0\r\n"),
            (
                &[b"CLIENT", b"UNBLOCK", b"abc"],
                "-ERR value is not an integer or out of range\r\n",
            ),
            (
                &[b"CLIENT", b"UNBLOCK", b"1", b"foo"],
                "-ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR\r\n",
            ),
        ] {
            assert_eq!(lossy(&admin.call(args)), want);
        }
    }
}

/// Review regressions: a monitor is never paused (as Redis never pauses a replica), so it can
/// lift an ALL pause; the command after CLIENT REPLY SKIP keeps its reply muted when a pause
/// held it; CLIENT REPLY OFF silences MONITOR lines too; extra arguments are refused.
#[test]
fn pause_skip_and_monitor_edges_behave_as_redis() {
    let plain = RedisServer::start();
    let (_shards, proxy) = two();
    for port in [plain.port, proxy.port] {
        let mut m = RawConn::connect(port);
        assert_eq!(lossy(&m.call(&[b"MONITOR"])), "+OK\r\n");
        let mut admin = RawConn::connect(port);
        assert_eq!(
            lossy(&admin.call(&[b"CLIENT", b"PAUSE", b"20000", b"ALL"])),
            "+OK\r\n"
        );
        let mut reader = RawConn::connect(port);
        assert_held(&mut reader, &[b"GET", b"k"], 200);
        m.send(&resp(&[b"CLIENT", b"UNPAUSE"]));
        assert_eq!(lossy(&reader.read_exact_n(5)), "$-1\r\n");
        drop(m);

        assert_eq!(
            lossy(&admin.call(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"])),
            "+OK\r\n"
        );
        let mut skipper = RawConn::connect(port);
        let mut pipeline = resp(&[b"CLIENT", b"REPLY", b"SKIP"]);
        pipeline.extend(resp(&[b"SET", b"s1", b"v"]));
        pipeline.extend(resp(&[b"PING"]));
        skipper.send(&pipeline);
        assert_eq!(lossy(&admin.call(&[b"CLIENT", b"UNPAUSE"])), "+OK\r\n");
        assert_eq!(lossy(&skipper.read_exact_n(7)), "+PONG\r\n");
        assert_eq!(lossy(&admin.call(&[b"GET", b"s1"])), "$1\r\nv\r\n");

        let mut quiet = RawConn::connect(port);
        quiet.send(&resp(&[b"CLIENT", b"REPLY", b"OFF"]));
        quiet.send(&resp(&[b"MONITOR"]));
        admin.call(&[b"SET", b"during", b"off"]);
        quiet.send(&resp(&[b"CLIENT", b"REPLY", b"ON"]));
        assert_eq!(lossy(&quiet.read_exact_n(5)), "+OK\r\n");
        admin.call(&[b"SET", b"after", b"on"]);
        // (The monitor's own CLIENT REPLY ON may come first, in a read of its own.)
        let mut lines = monitor_lines(&mut quiet, 1);
        while !lines.last().is_some_and(|l| l.contains("\"after\"")) {
            lines.extend(monitor_lines(&mut quiet, 1));
        }
        assert_eq!(
            lines[lines.len() - 1],
            "+T [0 127.0.0.1:P] \"SET\" \"after\" \"on\""
        );
        assert!(!lines.iter().any(|l| l.contains("during")), "{lines:?}");

        for args in [
            &[&b"CLIENT"[..], b"PAUSE", b"10", b"WRITE", b"extra"][..],
            &[b"CLIENT", b"UNBLOCK", b"1", b"ERROR", b"extra"],
        ] {
            let sub = String::from_utf8_lossy(args[1]).to_string();
            assert_eq!(
                lossy(&admin.call(args)),
                format!(
                    "-ERR unknown subcommand or wrong number of arguments for '{sub}'. Try CLIENT HELP.\r\n"
                )
            );
        }
        for bad in [&b"+10"[..], b"010"] {
            assert_eq!(
                lossy(&admin.call(&[b"CLIENT", b"PAUSE", bad])),
                "-ERR timeout is not an integer or out of range\r\n"
            );
        }
        admin.call(&[b"DEL", b"s1", b"during", b"after"]);
    }
}
