//! Read-through from a real HTTP origin on loopback, in front of real shards.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::origin::{Origin, Reply, close, hang};
use support::*;

fn bulk(v: &str) -> Vec<u8> {
    format!("${}\r\n{v}\r\n", v.len()).into_bytes()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into()
}

/// Three shards, an origin, and slotgate with one rule for `label:` (extra options appended).
struct Setup {
    // Dropped in this order: the proxy first, so it does not log the shards going away.
    proxy: Slotgate,
    origin: Origin,
    shards: Vec<RedisServer>,
    admin_port: u16,
}

impl Setup {
    fn new(rule_opts: &str, origin: Origin) -> Setup {
        Self::with_args(rule_opts, origin, &[])
    }

    fn with_args(rule_opts: &str, origin: Origin, extra: &[&str]) -> Setup {
        let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
        let refs: Vec<&RedisServer> = shards.iter().collect();
        let rule = format!("label:={}{rule_opts}", origin.url("/labels/{rest}"));
        let admin_port = free_port();
        let admin = format!("127.0.0.1:{admin_port}");
        let mut args = vec!["--readthrough", &rule, "--admin-listen", &admin];
        args.extend_from_slice(extra);
        let proxy = Slotgate::start_with(&refs, &args);
        wait_for_own_port(admin_port, proxy.pid());
        Setup {
            shards,
            origin,
            proxy,
            admin_port,
        }
    }

    /// The shard that owns `key` (direct connection).
    fn owner(&self, key: &str) -> redis::Connection {
        let slot = slotgate::router::slot(key.as_bytes()) as usize;
        let i = slot * self.shards.len() / 16384;
        // Even split: shard i owns i*16384/n ..= (i+1)*16384/n - 1.
        let i = (0..self.shards.len())
            .find(|&s| {
                slot >= s * 16384 / self.shards.len() && slot < (s + 1) * 16384 / self.shards.len()
            })
            .unwrap_or(i);
        self.shards[i].client()
    }

    fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").1
    }
}

/// A bare HTTP/1.0 GET: (status, body).
/// The value of a Prometheus sample `name{labels…}` whose labels contain `rule`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_miss_is_loaded_stored_with_its_ttl_and_then_hits() {
    let s = Setup::new(
        ";ttl=60s",
        Origin::start(|p| Reply::ok(format!("{{\"path\":\"{p}\"}}"))),
    );
    let mut c = s.proxy.raw();
    let want = bulk("{\"path\":\"/labels/PO12345\"}");
    assert_eq!(c.call(&[b"GET", b"label:PO12345"]), want);
    assert_eq!(s.origin.requests(), 1);
    assert_eq!(c.call(&[b"GET", b"label:PO12345"]), want, "hit");
    assert_eq!(s.origin.requests(), 1, "the second GET is a hit");
    // Stored in the shard that owns the slot, with the rule's TTL.
    let mut owner = s.owner("label:PO12345");
    let v: String = redis::cmd("GET")
        .arg("label:PO12345")
        .query(&mut owner)
        .unwrap();
    assert_eq!(v, "{\"path\":\"/labels/PO12345\"}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg("label:PO12345")
        .query(&mut owner)
        .unwrap();
    assert!((59_000..=60_000).contains(&pttl), "pttl {pttl}");
    // Keys outside the rule are plain misses; `{rest}` is percent-encoded.
    assert_eq!(c.call(&[b"GET", b"other:1"]), b"$-1\r\n");
    assert_eq!(
        c.call(&[b"GET", b"label:a b/c"]),
        bulk("{\"path\":\"/labels/a%20b%2Fc\"}")
    );
    assert!(s.origin.paths().contains(&"/labels/a%20b%2Fc".to_string()));
    assert_eq!(s.origin.requests(), 2);
}

#[test]
fn a_stampede_makes_one_origin_request_and_all_get_the_value() {
    let s = Setup::with_args(
        ";ttl=60s;timeout=5s",
        Origin::start(|_| Reply::ok("payload").delay(Duration::from_millis(200))),
        &["--workers", "2"],
    );
    // 1,000 concurrent GETs: 100 connections (spread over both workers) × 10 pipelined.
    let port = s.proxy.port;
    let barrier = Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut c = RawConn::connect(port);
                b.wait();
                c.send(&resp(&[b"GET", b"label:hot"]).repeat(10));
                c.read_replies(10)
            })
        })
        .collect();
    let mut n = 0;
    for t in threads {
        for r in t.join().unwrap() {
            assert_eq!(r, bulk("payload"));
            n += 1;
        }
    }
    assert_eq!(n, 1000);
    assert_eq!(
        s.origin.requests(),
        1,
        "exactly one origin request for 1,000 misses"
    );
    let m = s.metrics();
    let req = metric(
        &m,
        "slotgate_readthrough_origin_requests_total",
        "rule=\"label:\"",
    );
    let coalesced = metric(
        &m,
        "slotgate_readthrough_coalesced_total",
        "rule=\"label:\"",
    );
    let misses = metric(&m, "slotgate_readthrough_misses_total", "rule=\"label:\"");
    let hits = metric(&m, "slotgate_readthrough_hits_total", "rule=\"label:\"");
    assert_eq!(req, 1.0, "{m}");
    assert_eq!(hits + misses, 1000.0);
    assert_eq!(
        coalesced,
        misses - 1.0,
        "every miss but the leader coalesced"
    );
    assert!(coalesced >= 99.0, "GETs that raced the fill: {coalesced}");

    // K keys × M waiters → exactly K origin requests.
    let before = s.origin.requests();
    let threads: Vec<_> = (0..50)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = RawConn::connect(port);
                let mut wire = Vec::new();
                for k in 0..10 {
                    wire.extend(resp(&[b"GET", format!("label:k{k}").as_bytes()]));
                }
                c.send(&wire);
                (t, c.read_replies(10))
            })
        })
        .collect();
    for t in threads {
        let (_, replies) = t.join().unwrap();
        assert!(replies.iter().all(|r| r == &bulk("payload")));
    }
    assert_eq!(
        s.origin.requests() - before,
        10,
        "10 keys × 50 waiters → 10 requests"
    );
}

#[test]
fn negative_results_are_cached_and_a_client_write_ends_them() {
    let s = Setup::new(
        ";negative_ttl=30s",
        Origin::start(|p| {
            if p.ends_with("/gone") {
                Reply::status(410)
            } else {
                Reply::status(404)
            }
        }),
    );
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:missing"]), b"$-1\r\n");
    assert_eq!(c.call(&[b"GET", b"label:missing"]), b"$-1\r\n");
    assert_eq!(c.call(&[b"GET", b"label:gone"]), b"$-1\r\n");
    assert_eq!(
        s.origin.requests(),
        2,
        "the repeated GET was a negative hit"
    );
    assert_eq!(c.call(&[b"SET", b"label:missing", b"now"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"label:missing"]), bulk("now"));
    assert_eq!(c.call(&[b"DEL", b"label:missing"]), b":1\r\n");
    assert_eq!(c.call(&[b"GET", b"label:missing"]), b"$-1\r\n");
    assert_eq!(s.origin.requests(), 3, "the write ended the negative entry");
    let m = s.metrics();
    assert_eq!(
        metric(&m, "slotgate_readthrough_negative_hits_total", "label:"),
        1.0
    );
}

#[test]
fn origin_errors_are_clear_and_nothing_is_stored() {
    let s = Setup::new(
        ";timeout=300ms;max_body=1000",
        Origin::start(|p| match p {
            "/labels/e500" => Reply::status(503),
            "/labels/hang" => hang(),
            "/labels/close" => close(),
            "/labels/big" => Reply::ok(vec![b'x'; 5000]),
            "/labels/nostore" => Reply::ok("fresh").header("Cache-Control", "no-store"),
            _ => Reply::ok("v"),
        }),
    );
    let mut c = s.proxy.raw();
    assert_eq!(
        lossy(&c.call(&[b"GET", b"label:e500"])),
        "-ERR origin failed for rule 'label:': HTTP 503\r\n"
    );
    assert_eq!(
        lossy(&c.call(&[b"GET", b"label:big"])),
        "-ERR origin failed for rule 'label:': body larger than 1000 bytes\r\n"
    );
    assert!(
        lossy(&c.call(&[b"GET", b"label:close"]))
            .starts_with("-ERR origin failed for rule 'label:'")
    );
    // A hung origin: the leader and every waiter get the timeout error by timeout + 100 ms.
    let started = Instant::now();
    let mut conns: Vec<RawConn> = (0..5).map(|_| s.proxy.raw()).collect();
    for w in &mut conns {
        w.send(&resp(&[b"GET", b"label:hang"]));
    }
    for w in &mut conns {
        let r = w.read_replies(1).remove(0);
        assert_eq!(
            lossy(&r),
            "-ERR origin failed for rule 'label:': timed out after 300ms\r\n"
        );
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(400), "waited {waited:?}");
    assert_eq!(c.call(&[b"GET", b"label:nostore"]), bulk("fresh"));
    for k in [
        "label:e500",
        "label:big",
        "label:close",
        "label:hang",
        "label:nostore",
    ] {
        let exists: i64 = redis::cmd("EXISTS").arg(k).query(&mut s.owner(k)).unwrap();
        assert_eq!(exists, 0, "{k} must not be stored");
    }
    // The next miss after a timeout tries again.
    let before = s.origin.requests();
    s.origin.set_script(|_| Reply::ok("back"));
    assert_eq!(c.call(&[b"GET", b"label:hang"]), bulk("back"));
    assert_eq!(s.origin.requests(), before + 1);
    let m = s.metrics();
    assert!(
        metric(
            &m,
            "slotgate_readthrough_origin_errors_total",
            "kind=\"timeout\""
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "slotgate_readthrough_origin_errors_total",
            "kind=\"status\""
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "slotgate_readthrough_origin_errors_total",
            "kind=\"too_large\""
        ) >= 1.0
    );
    drop(s);
    // An origin that refuses connections.
    let dead = Origin::start(|_| Reply::ok(""));
    let url_port = dead.port;
    drop(dead);
    wait_until(
        "the dropped origin's port to refuse connections",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(("127.0.0.1", url_port)).is_err(),
    );
    let shard = RedisServer::start();
    let rule = format!("label:=http://127.0.0.1:{url_port}/{{rest}};timeout=1s");
    let proxy = Slotgate::start_with(&[&shard], &["--readthrough", &rule]);
    let mut c = proxy.raw();
    let r = lossy(&c.call(&[b"GET", b"label:x"]));
    assert!(
        r.starts_with("-ERR origin failed for rule 'label:': cannot connect"),
        "{r}"
    );
}

#[test]
fn max_age_is_honoured_when_the_rule_says_so() {
    let s = Setup::new(
        ";ttl=1h;honor_max_age=true",
        Origin::start(|_| Reply::ok("v").header("Cache-Control", "public, max-age=120")),
    );
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:m"]), bulk("v"));
    let pttl: i64 = redis::cmd("PTTL")
        .arg("label:m")
        .query(&mut s.owner("label:m"))
        .unwrap();
    assert!((119_000..=120_000).contains(&pttl), "pttl {pttl}");
}

/// A client's write during a fill wins: the fill's value goes to its waiters but is not
/// stored. Controlled with the origin's gate, over many random interleavings.
#[test]
fn no_stale_set_over_random_interleavings() {
    let s = Setup::with_args(
        ";ttl=60s;timeout=5s",
        Origin::start(|_| Reply::ok("origin-old").gated()),
        &["--workers", "2"],
    );
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // A function that deletes its key, on every shard.
    let lib = "#!lua name=nostale\nredis.register_function('wipe', function(keys) return redis.call('del', keys[1]) end)";
    assert_eq!(
        s.proxy.raw().call(&[b"FUNCTION", b"LOAD", lib.as_bytes()]),
        bulk("nostale")
    );
    for round in 0..90 {
        let key = format!("label:r{round}");
        s.origin.hold();
        let before = s.origin.requests();
        let port = s.proxy.port;
        let k2 = key.clone();
        let getter = std::thread::spawn(move || {
            let mut c = RawConn::connect(port);
            c.call(&[b"GET", k2.as_bytes()])
        });
        // The fill's origin request has arrived and is held.
        s.origin
            .wait_for_requests(before + 1, Duration::from_secs(5));
        let mut w = s.proxy.raw();
        // Scripts and functions write their declared keys (issue 14.8); the first rounds
        // go through every kind once, the rest at random.
        let op = if round < 8 { round as u64 } else { rnd() % 8 };
        let k = key.as_bytes();
        match op {
            0 => assert_eq!(w.call(&[b"SET", k, b"client-new"]), b"+OK\r\n"),
            1 => assert_eq!(w.call(&[b"DEL", k]), b":0\r\n"),
            2 => assert_eq!(
                w.call(&[b"MSET", k, b"client-new", b"other:x", b"1"]),
                b"+OK\r\n"
            ),
            3 => assert_eq!(w.call(&[b"SLOTGATE.INVALIDATE", k]), b":0\r\n"),
            4 => assert_eq!(
                w.call(&[b"EVAL", b"return redis.call('del',KEYS[1])", b"1", k]),
                b":0\r\n"
            ),
            5 => assert_eq!(
                w.call(&[
                    b"EVAL",
                    b"return redis.call('set',KEYS[1],ARGV[1])",
                    b"1",
                    k,
                    b"client-new"
                ]),
                b"+OK\r\n"
            ),
            6 => assert_eq!(w.call(&[b"FCALL", b"wipe", b"1", k]), b":0\r\n"),
            // A read-only script writes nothing: the fill is stored.
            _ => assert_eq!(
                w.call(&[b"EVAL_RO", b"return redis.call('exists',KEYS[1])", b"1", k]),
                b":0\r\n"
            ),
        }
        s.origin.release();
        assert_eq!(
            getter.join().unwrap(),
            bulk("origin-old"),
            "waiters get the fill's value"
        );
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query(&mut s.owner(&key))
            .unwrap();
        match op {
            0 | 2 | 5 => assert_eq!(
                stored.as_deref(),
                Some("client-new"),
                "round {round} (op {op}): the client's write wins"
            ),
            7 => assert_eq!(
                stored.as_deref(),
                Some("origin-old"),
                "round {round}: a read-only script does not stop the fill"
            ),
            _ => assert_eq!(stored, None, "round {round} (op {op}): the delete wins"),
        }
    }
    // Without a write in between, the fill is stored.
    s.origin.release();
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:plain"]), bulk("origin-old"));
    let stored: Option<String> = redis::cmd("GET")
        .arg("label:plain")
        .query(&mut s.owner("label:plain"))
        .unwrap();
    assert_eq!(stored.as_deref(), Some("origin-old"));
}

/// Polls SLOTGATE.STATUS until `key` reports `status`.
fn wait_status(c: &mut RawConn, key: &str, status: &str, within: Duration) {
    let want = format!("${}\r\n{status}\r\n", status.len());
    wait_until(&format!("{key} to become {status}"), within, || {
        lossy(&c.call(&[b"SLOTGATE.STATUS", key.as_bytes()])).contains(&want)
    });
}

#[test]
fn stale_while_revalidate_and_stale_if_error() {
    let s = Setup::new(
        ";ttl=1s;grace=3s;timeout=2s",
        Origin::start(|_| Reply::ok("v1")),
    );
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:s"]), bulk("v1"));
    assert_eq!(s.origin.requests(), 1);
    let pttl: i64 = redis::cmd("PTTL")
        .arg("label:s")
        .query(&mut s.owner("label:s"))
        .unwrap();
    assert!(
        (3_000..=4_000).contains(&pttl),
        "stored for ttl + grace: {pttl}"
    );
    wait_status(&mut c, "label:s", "hit", Duration::from_secs(1));
    wait_status(&mut c, "label:s", "stale", Duration::from_secs(3));
    // In grace: the old value at once, and one refresh (held at the origin meanwhile).
    s.origin.hold();
    s.origin.set_script(|_| Reply::ok("v2").gated());
    for _ in 0..5 {
        assert_eq!(c.call(&[b"GET", b"label:s"]), bulk("v1"));
    }
    s.origin.wait_for_requests(2, Duration::from_secs(2));
    assert_eq!(s.origin.requests(), 2, "one refresh for five stale GETs");
    s.origin.release();
    wait_until("the refresh to be stored", Duration::from_secs(3), || {
        c.call(&[b"GET", b"label:s"]) == bulk("v2")
    });
    // Origin down during grace: the stale value is served until the hard TTL.
    wait_status(&mut c, "label:s", "stale", Duration::from_secs(3));
    s.origin.set_script(|_| Reply::status(500));
    for _ in 0..3 {
        assert_eq!(c.call(&[b"GET", b"label:s"]), bulk("v2"), "stale-if-error");
    }
    wait_status(&mut c, "label:s", "miss", Duration::from_secs(5));
    assert_eq!(
        lossy(&c.call(&[b"GET", b"label:s"])),
        "-ERR origin failed for rule 'label:': HTTP 500\r\n",
        "after the hard TTL the error shows"
    );
    let m = s.metrics();
    assert!(
        metric(&m, "slotgate_readthrough_stale_serves_total", "label:") >= 8.0,
        "{m}"
    );
}

#[test]
fn mget_fills_misses_concurrently_and_keeps_order() {
    let s = Setup::new(
        "",
        Origin::start(|p| match p {
            "/labels/missing" => Reply::status(404),
            "/labels/broken" => Reply::status(500),
            p => Reply::ok(format!("o{}", &p[8..])).delay(Duration::from_millis(100)),
        }),
    );
    let mut c = s.proxy.raw();
    c.call(&[b"SET", b"label:cached", b"c"]);
    c.call(&[b"SET", b"plain", b"p"]);
    let started = Instant::now();
    let r = c.call(&[
        b"MGET",
        b"label:a",
        b"plain",
        b"label:cached",
        b"label:missing",
        b"nokey",
        b"label:b",
        b"label:broken",
        b"label:c",
    ]);
    assert_eq!(
        lossy(&r),
        "*8\r\n$2\r\noa\r\n$1\r\np\r\n$1\r\nc\r\n$-1\r\n$-1\r\n$2\r\nob\r\n$-1\r\n$2\r\noc\r\n"
    );
    assert!(
        started.elapsed() < Duration::from_millis(290),
        "three 100 ms fetches ran concurrently"
    );
    // The loaded ones are stored; a plain MGET now hits.
    assert_eq!(
        lossy(&c.call(&[b"MGET", b"label:a", b"label:b"])),
        "*2\r\n$2\r\noa\r\n$2\r\nob\r\n"
    );
    assert_eq!(s.origin.requests(), 5);
}

#[test]
fn invalidate_status_and_info() {
    let s = Setup::new(";ttl=60s", Origin::start(|_| Reply::ok("v")));
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:i"]), bulk("v"));
    let st = lossy(&c.call(&[b"SLOTGATE.STATUS", b"label:i"]));
    assert!(
        st.contains("$3\r\nhit\r\n") && st.contains("$6\r\nlabel:\r\n"),
        "{st}"
    );
    assert_eq!(
        c.call(&[b"SLOTGATE.INVALIDATE", b"label:i", b"label:none"]),
        b":1\r\n"
    );
    let st = lossy(&c.call(&[b"SLOTGATE.STATUS", b"label:i"]));
    assert!(st.contains("$4\r\nmiss\r\n"), "{st}");
    assert_eq!(c.call(&[b"GET", b"label:i"]), bulk("v"));
    assert_eq!(s.origin.requests(), 2, "invalidated, so loaded again");
    let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
    assert!(info.contains("# Readthrough"), "{info}");
    assert!(
        info.contains(
            "rule_0:name=label:,prefix=label:,hits=0,misses=2,hit_ratio=0.0000,origin_requests=2"
        ),
        "{info}"
    );
    // The admin endpoints.
    assert_eq!(http_get(s.admin_port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(s.admin_port, "/readyz").0, 200);
    // Latency is sampled (one command in 32): make enough commands.
    c.send(&resp(&[b"PING"]).repeat(64));
    c.read_replies(64);
    // Per-command counters are published once a second.
    let m = wait_for(
        "slotgate_commands_total{command=\"get\"} >= 2 in /metrics",
        Duration::from_secs(3),
        || {
            let m = s.metrics();
            (metric(&m, "slotgate_commands_total", "command=\"get\"") >= 2.0).then_some(m)
        },
    );
    assert!(m.contains("slotgate_connected_clients"), "{m}");
    assert!(m.contains("slotgate_command_duration_seconds"), "{m}");
}

#[test]
fn readyz_reports_a_down_shard() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let proxy = Slotgate::start_with(&refs, &["--admin-listen", &admin]);
    wait_for_own_port(admin_port, proxy.pid());
    wait_until("/readyz to report ready", Duration::from_secs(3), || {
        http_get(admin_port, "/readyz").0 == 200
    });
    let mut shards = shards;
    shards[1].kill();
    let body = wait_for(
        "/readyz to report not ready (503) with a shard down",
        Duration::from_secs(3),
        || {
            let (code, body) = http_get(admin_port, "/readyz");
            (code == 503).then_some(body)
        },
    );
    assert!(body.contains(&shards[1].addr()), "{body}");
}

#[test]
fn read_through_works_over_tls_too() {
    use support::tls::{TlsConn, client_config};
    let origin = Origin::start(|_| Reply::ok("tls-value"));
    let shard = RedisServer::start();
    let tls_port = free_port();
    let tls = format!("127.0.0.1:{tls_port}");
    let rule = format!("label:={}", origin.url("/{rest}"));
    let proxy = Slotgate::start_with(
        &[&shard],
        &[
            "--readthrough",
            &rule,
            "--tls-self-signed",
            "--tls-listen",
            &tls,
        ],
    );
    wait_for_own_port(tls_port, proxy.pid());
    let mut c = TlsConn::connect(tls_port, client_config(None, None, None)).unwrap();
    assert_eq!(
        c.call(&resp(&[b"GET", b"label:t"])).unwrap(),
        bulk("tls-value")
    );
    assert_eq!(origin.requests(), 1);
}

#[test]
fn bad_rules_fail_check_config() {
    for (flags, word) in [
        (vec!["--readthrough", "label:=ftp://x/{key}"], "http://"),
        (
            vec!["--readthrough", "label:=http://127.0.0.1:1/{nope}"],
            "{key}",
        ),
        (vec!["--readthrough", "nourl"], "PREFIX=URL"),
        (
            vec!["--readthrough", "a:=http://127.0.0.1:1/{key};ttl=soon"],
            "ttl",
        ),
        (
            vec![
                "--readthrough",
                "a:=http://127.0.0.1:1/{key}",
                "--readthrough",
                "a:=http://127.0.0.1:2/{key}",
            ],
            "both own prefix",
        ),
        (
            vec![
                "--readthrough",
                "a:=http://127.0.0.1:1/{key};batch_url=http://127.0.0.1:1/b?ids={keys};\
                 batch_window=1s",
            ],
            "batch_window 1s: at most 100ms",
        ),
        (
            vec![
                "--readthrough",
                "a:=http://127.0.0.1:1/{key};batch_window=1ms",
            ],
            "need a batch_url",
        ),
    ] {
        let out = std::process::Command::new(slotgate_bin())
            .args(["--check-config", "--shard", "127.0.0.1:1"])
            .args(&flags)
            .output()
            .unwrap();
        let err = lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(word), "{flags:?}: {err}");
    }
    let ok = std::process::Command::new(slotgate_bin())
        .args(["--check-config", "--shard", "127.0.0.1:1"])
        .args([
            "--readthrough",
            "label:=http://127.0.0.1:8080/labels/{rest};ttl=10m",
        ])
        .args([
            "--readthrough",
            "label:vip:=http://127.0.0.1:8080/vip/{rest}",
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "nested prefixes are fine: {}",
        lossy(&ok.stderr)
    );
}

/// Pipelined read-through GETs from several clients at once, hits and misses interleaved,
/// each get their own key's value in order (the in-flight GETs share one worker's table of
/// pending entries, whose places are reused).
#[test]
fn pipelined_read_through_gets_from_many_clients_stay_in_order() {
    let s = Setup::new(
        ";ttl=60s",
        Origin::start(|p| Reply::ok(format!("v{}", p.trim_start_matches("/labels/")))),
    );
    // Half the keys are hits (loaded once first), half are misses in the pipelines below.
    let mut warm = s.proxy.raw();
    for i in (0..200).step_by(2) {
        let k = format!("label:{i}");
        assert_eq!(warm.call(&[b"GET", k.as_bytes()]), bulk(&format!("v{i}")));
    }
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut c = s.proxy.raw();
            std::thread::spawn(move || {
                for round in 0..3 {
                    let mut wire = Vec::new();
                    let mut want = Vec::new();
                    for j in 0..200 {
                        let i = (j * 7 + t * 13 + round * 29) % 200;
                        let k = format!("label:{i}");
                        wire.extend_from_slice(&resp(&[b"GET", k.as_bytes()]));
                        want.push(bulk(&format!("v{i}")));
                        if j % 50 == 0 {
                            // A plain command in between, answered by the same shards.
                            wire.extend_from_slice(&resp(&[b"GET", b"plain:x"]));
                            want.push(b"$-1\r\n".to_vec());
                        }
                    }
                    c.send(&wire);
                    assert_eq!(c.read_replies(want.len()), want, "client {t} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every key was loaded from the origin exactly once.
    assert_eq!(s.origin.requests(), 200);
}

/// Issue 15.1–2: an `https://` origin is verified against the system roots plus the rule's
/// `ca` file, gets the rule's headers (a value from the environment), and the secret shows
/// nowhere: not in `--check-config`, INFO, or the log.
#[test]
fn https_origins_are_verified_and_get_the_rules_headers() {
    let dir = support::tls::temp_dir("rt-https");
    let ca = support::tls::Ca::new("origin test CA");
    let ca_file = ca.write(&dir, "ca");
    let (cert, key) = ca.issue(&dir, "origin", &["localhost"]);
    let origin = Origin::start_tls(&cert, &key, |path| Reply::ok(format!("secure{path}")));
    let shard = RedisServer::start();
    let secret = "s3cr3t-t0ken-value";
    let rule = format!(
        "label:={};ca={};header=Authorization:env:ORIGIN_TOKEN;header=Accept:application/json",
        origin.https_url("/labels/{rest}"),
        ca_file.display()
    );
    let log = dir.join("slotgate.log");
    let bearer = format!("Bearer {secret}");
    let proxy = Slotgate::start_env(
        &[&shard],
        &["--readthrough", &rule, "--log-level", "debug"],
        Some(&log),
        &[("ORIGIN_TOKEN", &bearer)],
    );
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:a"]), bulk("secure/labels/a"));
    assert_eq!(c.call(&[b"GET", b"label:b"]), bulk("secure/labels/b"));
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        origin.header_values("authorization"),
        [Some(bearer.clone()), Some(bearer.clone())]
    );
    assert_eq!(
        origin.header_values("accept"),
        [
            Some("application/json".into()),
            Some("application/json".into())
        ]
    );
    let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
    assert!(!info.contains(secret), "{info}");
    let (ok, out) = support::check_config(&["--readthrough", &rule, "--shard", "127.0.0.1:1"]);
    assert!(!ok, "the variable is not set for this run: {out}");
    assert!(
        out.contains("the environment variable ORIGIN_TOKEN is not set"),
        "{out}"
    );
    drop(proxy);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(secret), "the log shows the token");

    // Without the rule's CA the origin's certificate is refused (an error, never a value);
    // `insecure=true` skips the check, for development.
    let shard2 = RedisServer::start();
    let strict = format!("label:={}", origin.https_url("/labels/{rest}"));
    let proxy = Slotgate::start_with(&[&shard2], &["--readthrough", &strict]);
    let r = lossy(&proxy.raw().call(&[b"GET", b"label:c"]));
    assert!(
        r.starts_with("-ERR origin failed for rule 'label:': cannot connect")
            && r.contains("certificate"),
        "{r}"
    );
    drop(proxy);
    let lax = format!("{strict};insecure=true");
    let proxy = Slotgate::start_with(&[&shard2], &["--readthrough", &lax]);
    assert_eq!(
        proxy.raw().call(&[b"GET", b"label:c"]),
        bulk("secure/labels/c")
    );
    // `ca` and `insecure` are for https:// origins only.
    let (ok, out) = support::check_config(&[
        "--readthrough",
        "label:=http://127.0.0.1:1/{rest};insecure=true",
        "--shard",
        "127.0.0.1:1",
    ]);
    assert!(!ok && out.contains("https:// origins only"), "{out}");
}

/// Issue 15.7: a circuit breaker stops calling a failing origin for its cool-down (clients
/// get `origin unavailable` at once), then lets one request try; `max_origin_concurrency`
/// keeps the origin's requests in flight at the limit, the others waiting their turn.
#[test]
fn the_origin_is_protected_by_a_breaker_and_a_concurrency_limit() {
    let s = Setup::new(
        ";breaker=3/1s;timeout=2s",
        Origin::start(|_| Reply::status(503)),
    );
    let mut c = s.proxy.raw();
    for k in ["label:a", "label:b", "label:c"] {
        let r = lossy(&c.call(&[b"GET", k.as_bytes()]));
        assert!(
            r.starts_with("-ERR origin failed for rule 'label:': HTTP 503"),
            "{r}"
        );
    }
    let r = lossy(&c.call(&[b"GET", b"label:d"]));
    assert!(
        r.starts_with("-ERR origin unavailable for rule 'label:': its circuit breaker is open"),
        "{r}"
    );
    assert_eq!(s.origin.requests(), 3, "the open breaker called nobody");
    let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
    assert!(
        info.contains("breaker=open,breaker_rejections=1,breaker_opens=1"),
        "{info}"
    );
    // The origin is back: after the cool-down one request tries it and closes the breaker.
    s.origin.set_script(|path| Reply::ok(format!("v{path}")));
    wait_until(
        "the breaker to let a request through",
        Duration::from_secs(5),
        || c.call(&[b"GET", b"label:e"]) == bulk("v/labels/e"),
    );
    let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
    assert!(info.contains("breaker=closed"), "{info}");
    drop(s);

    let s = Setup::new(
        ";max_origin_concurrency=2;timeout=5s",
        Origin::start(|path| Reply::ok(format!("v{path}")).gated()),
    );
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let mut c = s.proxy.raw();
            std::thread::spawn(move || c.call(&[b"GET", format!("label:{i}").as_bytes()]))
        })
        .collect();
    let mut c = s.proxy.raw();
    let throttled = |c: &mut RawConn| {
        let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
        info_u64(&info.replace(',', "\r\n").replace('=', ":"), "throttled")
    };
    wait_until(
        "three fetches to wait for the limit",
        Duration::from_secs(5),
        || throttled(&mut c) == 3,
    );
    s.origin.wait_for_requests(2, Duration::from_secs(5));
    assert_eq!(s.origin.requests(), 2, "no more than two at once");
    let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
    assert!(info.contains("origin_inflight=2"), "{info}");
    s.origin.release();
    let mut got: Vec<Vec<u8>> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..5).map(|i| bulk(&format!("v/labels/{i}"))).collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(s.origin.requests(), 5);
}

/// Issue 15.6: an invalidation sent to one of three instances (over `POST /invalidate` or
/// `SLOTGATE.INVALIDATE`) clears the keys in the shards and every instance's own state for
/// them (here: their remembered 404s), over the shards' pub/sub.
#[test]
fn an_invalidation_sent_to_one_instance_reaches_all_three() {
    let published = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p = published.clone();
    let origin = Origin::start(move |path| {
        if p.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::ok(format!("v2{path}"))
        } else {
            Reply::status(404)
        }
    });
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let rule = format!("label:={};negative_ttl=1h", origin.url("/{rest}"));
    let instances: Vec<(Slotgate, u16)> = (0..3)
        .map(|_| {
            let admin = free_port();
            let listen = format!("127.0.0.1:{admin}");
            let proxy = Slotgate::start_env(
                &refs,
                &["--readthrough", &rule, "--admin-listen", &listen],
                None,
                &[("SLOTGATE_INVALIDATE_TOKEN", "tok")],
            );
            wait_for_own_port(admin, proxy.pid());
            (proxy, admin)
        })
        .collect();
    let mut first_shard = RawConn::connect(shards[0].port);
    wait_until("every instance to listen", Duration::from_secs(10), || {
        first_shard.call(&[b"PUBSUB", b"NUMSUB", b"__slotgate:invalidate"])
            == b"*2\r\n$21\r\n__slotgate:invalidate\r\n:3\r\n"
    });
    // Each instance remembers that the origin has no `label:x` or `label:z`.
    for (proxy, _) in &instances {
        let mut c = proxy.raw();
        assert_eq!(c.call(&[b"GET", b"label:x"]), b"$-1\r\n");
        assert_eq!(c.call(&[b"GET", b"label:z"]), b"$-1\r\n");
    }
    published.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(instances[1].0.raw().call(&[b"GET", b"label:x"]), b"$-1\r\n");
    // POST /invalidate to the first: every instance forgets the 404.
    let auth = [("Authorization", "Bearer tok")];
    let (status, body) = http_request(
        instances[0].1,
        "POST",
        "/invalidate",
        &auth,
        r#"{"keys": ["label:x"]}"#,
    );
    assert_eq!((status, body.as_str()), (200, "{\"cleared\": 0}\n"));
    for (proxy, _) in &instances {
        let mut c = proxy.raw();
        wait_until(
            "the instance to forget label:x",
            Duration::from_secs(5),
            || c.call(&[b"GET", b"label:x"]) == bulk("v2/x"),
        );
    }
    // SLOTGATE.INVALIDATE through the second reaches the third.
    let mut c = instances[1].0.raw();
    assert_eq!(c.call(&[b"SLOTGATE.INVALIDATE", b"label:z"]), b":0\r\n");
    let mut third = instances[2].0.raw();
    wait_until(
        "the third to forget label:z",
        Duration::from_secs(5),
        || third.call(&[b"GET", b"label:z"]) == bulk("v2/z"),
    );
    // A prefix: every key under it is deleted from the shards, and loaded again.
    for k in ["label:p:1", "label:p:2", "label:p:3"] {
        assert_eq!(c.call(&[b"SET", k.as_bytes(), b"old"]), b"+OK\r\n");
    }
    let (status, body) = http_request(
        instances[2].1,
        "POST",
        "/invalidate",
        &auth,
        r#"{"prefix": "label:p:"}"#,
    );
    assert_eq!((status, body.as_str()), (200, "{\"cleared\": 3}\n"));
    assert_eq!(c.call(&[b"GET", b"label:p:2"]), bulk("v2/p%3A2"));
    // A wrong token, a bad body, no POST.
    let admin = instances[0].1;
    let bad = [("Authorization", "Bearer nope")];
    assert_eq!(
        http_request(admin, "POST", "/invalidate", &bad, "{}").0,
        401
    );
    assert_eq!(
        http_request(admin, "POST", "/invalidate", &auth, "[1]").0,
        400
    );
    assert_eq!(http_request(admin, "GET", "/invalidate", &auth, "").0, 405);
    // Only keys of a read-through rule: the token deletes nothing else.
    assert_eq!(c.call(&[b"SET", b"other", b"1"]), b"+OK\r\n");
    let body = r#"{"keys": ["other"]}"#;
    assert_eq!(
        http_request(admin, "POST", "/invalidate", &auth, body).0,
        400
    );
    let body = r#"{"prefix": "o"}"#;
    assert_eq!(
        http_request(admin, "POST", "/invalidate", &auth, body).0,
        400
    );
    assert_eq!(c.call(&[b"GET", b"other"]), b"$1\r\n1\r\n");
}

/// Three instances in front of the same shards, each started with the same rule.
fn fleet(shards: &[RedisServer], rule: &str) -> Vec<Slotgate> {
    let refs: Vec<&RedisServer> = shards.iter().collect();
    (0..3)
        .map(|_| Slotgate::start_with(&refs, &["--readthrough", rule, "--workers", "2"]))
        .collect()
}

/// Issue 15.3: 300 clients spread over three instances miss one key at once: the instance
/// that takes the key's lease calls the origin, the others wait for its fill. One origin
/// request in all.
#[test]
fn a_stampede_over_three_instances_makes_one_origin_request() {
    let origin =
        Origin::start(|path| Reply::ok(format!("v{path}")).delay(Duration::from_millis(200)));
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let stampede = |proxies: &[Slotgate], key: &'static str| {
        let barrier = Arc::new(std::sync::Barrier::new(300));
        let clients: Vec<_> = (0..300)
            .map(|i| {
                let mut c = proxies[i % 3].raw();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    c.call(&[b"GET", key.as_bytes()])
                })
            })
            .collect();
        for t in clients {
            assert_eq!(t.join().unwrap(), bulk(&format!("v/{}", &key[6..])));
        }
    };
    // Without leases each instance single-flights on its own: one request per instance.
    let rule = format!("label:={};timeout=5s;lease=false", origin.url("/{rest}"));
    stampede(&fleet(&shards, &rule), "label:cold");
    assert_eq!(
        origin.requests(),
        3,
        "lease=false: one request per instance"
    );
    let rule = format!("label:={};timeout=5s", origin.url("/{rest}"));
    let proxies = fleet(&shards, &rule);
    stampede(&proxies, "label:hot");
    assert_eq!(
        origin.requests(),
        4,
        "one origin request for 300 misses on 3 instances"
    );
    eprintln!("stampede of 300 clients over 3 instances: 1 origin request (3 with lease=false)");
    let waits: u64 = proxies
        .iter()
        .map(|p| {
            let info = lossy(&p.raw().call(&[b"INFO", b"readthrough"]));
            info_u64(&info.replace(',', "\r\n").replace('=', ":"), "lease_waits")
        })
        .sum();
    assert!(
        waits >= 2,
        "the other instances waited on the lease ({waits})"
    );
    // The lease is gone once the value is stored.
    let mut lease_left = 0;
    for s in &shards {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("__slotgate:lease:*")
            .query(&mut s.client())
            .unwrap();
        lease_left += keys.len();
    }
    assert_eq!(lease_left, 0);
}

/// Issue 15.3: the instance holding a lease dies mid-fill; once the lease expires (the
/// rule's timeout plus a margin) another instance takes over and fills the key.
#[test]
fn when_the_lease_holder_dies_another_instance_takes_over() {
    let origin = Origin::start(|path| Reply::ok(format!("v{path}")).gated());
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let rule = format!("label:={};timeout=1s", origin.url("/{rest}"));
    let mut proxies = fleet(&shards, &rule);
    let mut holder = proxies[0].raw();
    holder.send(&resp(&[b"GET", b"label:k"]));
    origin.wait_for_requests(1, Duration::from_secs(5));
    proxies.remove(0).signal("KILL");
    origin.release();
    // Another instance waits on the dead holder's lease until the lease expires, then
    // fetches the key itself.
    let mut c = proxies[0].raw();
    wait_until(
        "another instance to fill the key",
        Duration::from_secs(10),
        || c.call(&[b"GET", b"label:k"]) == bulk("v/k"),
    );
    assert_eq!(origin.requests(), 2);
    assert_eq!(proxies[1].raw().call(&[b"GET", b"label:k"]), bulk("v/k"));
    assert_eq!(origin.requests(), 2);
}

/// Issue 15.5: a hot key is refreshed before it expires (`refresh_ahead`), by one of the
/// instances at a time (the key's lease), so that no client ever sees a miss.
#[test]
fn a_hot_key_refreshed_ahead_never_misses() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let m = n.clone();
    let origin = Origin::start(move |_| {
        Reply::ok(format!(
            "v{}",
            m.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ))
    });
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let rule = format!("label:={};ttl=1s;refresh_ahead=0.5", origin.url("/{rest}"));
    let proxies = fleet(&shards, &rule);
    // Three clients, one per instance, read the key while it is refreshed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = proxies
        .iter()
        .map(|p| {
            let (mut c, stop) = (p.raw(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c.call(&[b"GET", b"label:hot"]);
                    assert!(
                        r.starts_with(b"$2\r\nv") || r.starts_with(b"$3\r\nv"),
                        "{r:?}"
                    );
                    reads += 1;
                    // Needed: a client's pace (a read every 10 ms), not a wait for anything.
                    std::thread::sleep(Duration::from_millis(10));
                }
                reads
            })
        })
        .collect();
    // Until the key has been loaded and refreshed ten times (five TTLs or more).
    let started = std::time::Instant::now();
    // (Each refresh has half the TTL, 500 ms, to land: a loaded machine's stalls fit in it.)
    wait_until("ten refreshes", Duration::from_secs(40), || {
        origin.requests() >= 11
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed();
    let reads: usize = readers.into_iter().map(|t| t.join().unwrap()).sum();
    let stat = |field: &str| -> u64 {
        proxies
            .iter()
            .map(|p| {
                let info = lossy(&p.raw().call(&[b"INFO", b"readthrough"]));
                info_u64(&info.replace(',', "\r\n").replace('=', ":"), field)
            })
            .sum()
    };
    let (misses, refreshes) = (stat("misses"), stat("refreshes"));
    eprintln!(
        "refresh-ahead: {reads} reads in {elapsed:?}, {misses} miss(es), {refreshes} refreshes, \
         {} origin requests",
        origin.requests()
    );
    // Only the very first read of each instance could miss (the key did not exist yet).
    assert!(misses <= 3, "{misses} misses");
    assert!(refreshes >= 5, "the key was refreshed ahead ({refreshes})");
    // One instance refreshes at a time: at most one origin request per half TTL, and a few.
    assert!(
        origin.requests() as u128 <= elapsed.as_millis() / 500 + 4,
        "{} origin requests",
        origin.requests()
    );
}

/// Issue 15.2: a value loaded with an `ETag` (or a `Last-Modified`) is refreshed with a
/// conditional request, and the origin's `304` (no body) extends its TTL; a changed record is
/// loaded in full with its new validator; after a client's write the next refresh asks
/// without conditions (the validators describe the origin's bytes only).
#[test]
fn a_304_revalidation_extends_the_ttl_without_a_body() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    const LM: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
    let version = Arc::new(AtomicUsize::new(1));
    let origin = Origin::start(|_| Reply::ok(""));
    let v = version.clone();
    origin.set_script_with_headers(move |path, headers| {
        let has = |name: &str, value: &str| headers.iter().any(|(k, v)| k == name && v == value);
        let not_modified = Reply {
            body: Vec::new(),
            ..Reply::status(304)
        };
        if path.ends_with("/lm") {
            return match has("if-modified-since", LM) {
                true => not_modified,
                false => Reply::ok("dated").header("Last-Modified", LM),
            };
        }
        let etag = format!("\"v{}\"", v.load(SeqCst));
        match has("if-none-match", &etag) {
            true => not_modified,
            false => Reply::ok(format!("body-{etag}")).header("ETag", &etag),
        }
    });
    let s = Setup::new(";ttl=2s;refresh_ahead=0.5", origin);
    let mut c = s.proxy.raw();
    let revalidated = |c: &mut RawConn| {
        let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
        info_u64(&info.replace(',', "\r\n").replace('=', ":"), "revalidated")
    };
    let pttl = |key: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query(&mut s.owner(key))
            .unwrap()
    };
    let v1 = bulk("body-\"v1\"");
    assert_eq!(c.call(&[b"GET", b"label:a"]), v1);
    assert_eq!(c.call(&[b"GET", b"label:lm"]), bulk("dated"));
    assert_eq!(s.origin.requests(), 2);
    // Past the refresh point (under half the TTL left) a read starts the refresh, and the
    // origin says 304 to both.
    wait_until("both keys revalidated", Duration::from_secs(6), || {
        assert_eq!(c.call(&[b"GET", b"label:a"]), v1);
        assert_eq!(c.call(&[b"GET", b"label:lm"]), bulk("dated"));
        revalidated(&mut c) >= 2
    });
    assert_eq!(s.origin.requests(), 4, "{:?}", s.origin.paths());
    // The TTL was extended to the full 2 s again (it was under 1 s when the refresh began).
    assert!(pttl("label:a") > 1000, "{}", pttl("label:a"));
    assert!(pttl("label:lm") > 1000, "{}", pttl("label:lm"));
    let inm = s.origin.header_values("if-none-match");
    let ims = s.origin.header_values("if-modified-since");
    let paths = s.origin.paths();
    for (i, p) in paths.iter().enumerate() {
        let conditional = i >= 2;
        if p.ends_with("/a") {
            assert_eq!(inm[i].as_deref(), conditional.then_some("\"v1\""), "{i}");
        } else {
            assert_eq!(ims[i].as_deref(), conditional.then_some(LM), "{i}");
        }
    }
    // The record changes: the next refresh gets it in full, with its new ETag, which the
    // refresh after that sends.
    version.store(2, SeqCst);
    let v2 = bulk("body-\"v2\"");
    wait_until("the new version loaded", Duration::from_secs(6), || {
        c.call(&[b"GET", b"label:a"]) == v2
    });
    wait_until(
        "the new version revalidated",
        Duration::from_secs(6),
        || {
            assert_eq!(c.call(&[b"GET", b"label:a"]), v2);
            s.origin.header_values("if-none-match").last() == Some(&Some("\"v2\"".into()))
                && revalidated(&mut c) >= 3
        },
    );
    // A client's write (with a TTL, so it is refreshed too): the stored validators no longer
    // describe the value, so the refresh is unconditional.
    assert_eq!(
        c.call(&[b"SET", b"label:a", b"mine", b"PX", b"900"]),
        b"+OK\r\n"
    );
    let before = s.origin.requests();
    wait_until(
        "the client's value refreshed",
        Duration::from_secs(6),
        || {
            c.call(&[b"GET", b"label:a"]);
            s.origin.requests() > before
        },
    );
    let inm = s.origin.header_values("if-none-match");
    assert_eq!(inm[before], None, "{:?}", s.origin.paths());
}

/// Issue 15.4: an MGET of 100 missing keys of a rule with `batch_max=25` makes 4 origin
/// requests; the replies keep the keys' order, an id the origin leaves out is nil (and a
/// remembered 404), and the loaded values are stored.
#[test]
fn an_mget_of_missing_keys_is_loaded_in_batches() {
    let origin = Origin::start(|path| {
        // `/batch?ids=1,2,…`: every id but multiples of 10, each as a JSON object.
        let ids = path.split_once("ids=").map_or("", |x| x.1);
        let body: Vec<String> = ids
            .split("%2C")
            .flat_map(|i| i.split(','))
            .filter(|i| i.parse::<u32>().is_ok_and(|n| n % 10 != 0))
            .map(|i| format!("\"{i}\": {{\"id\": {i}}}"))
            .collect();
        Reply::ok(format!("{{{}}}", body.join(", "))).delay(Duration::from_millis(50))
    });
    let opts = format!(
        ";batch_url={};batch_max=25",
        origin.url("/batch?ids={keys}")
    );
    let s = Setup::new(&opts, origin);
    let keys: Vec<String> = (1..=100).map(|i| format!("label:{i}")).collect();
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.extend(keys.iter().map(|k| k.as_bytes()));
    let t = Instant::now();
    let r = s.proxy.raw().call(&args);
    let took = t.elapsed();
    let mut want = "*100\r\n".to_string();
    for i in 1..=100 {
        if i % 10 == 0 {
            want.push_str("$-1\r\n");
        } else {
            let v = format!("{{\"id\": {i}}}");
            want.push_str(&format!("${}\r\n{v}\r\n", v.len()));
        }
    }
    assert_eq!(lossy(&r), want);
    assert_eq!(s.origin.requests(), 4, "{:?}", s.origin.paths());
    eprintln!("batch load: 100 keys in {took:?} with 4 requests (50 ms each)");
    // Stored: a GET is a hit now; a left-out id is a remembered 404.
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:7"]), bulk("{\"id\": 7}"));
    assert_eq!(c.call(&[b"GET", b"label:10"]), b"$-1\r\n");
    assert_eq!(s.origin.requests(), 4);
    // The same MGET without a batch URL: one request per key (for the figure).
    let one = Setup::new(
        "",
        Origin::start(|_| Reply::ok("v").delay(Duration::from_millis(50))),
    );
    let t = Instant::now();
    let r = one.proxy.raw().call(&args);
    eprintln!(
        "the same MGET, one request per key: {:?} with {} requests",
        t.elapsed(),
        one.origin.requests()
    );
    assert!(r.starts_with(b"*100\r\n"));
}

/// Issue 15.4: with `batch_window`, the misses of concurrent single GETs (here 40 clients at
/// once) are loaded with batch requests (`batch_max` ids each) instead of one request per key,
/// each client gets its own key's value (or nil for an id the answer leaves out), and the
/// values are stored. A lone GET is loaded once its window ends.
#[test]
fn concurrent_single_gets_within_the_batch_window_share_a_request() {
    let origin = Origin::start(|path| {
        let Some((_, ids)) = path.split_once("ids=") else {
            return Reply::ok("per-key request");
        };
        let body: Vec<String> = ids
            .split("%2C")
            .flat_map(|i| i.split(','))
            .filter(|i| i.parse::<u32>().is_ok_and(|n| n % 10 != 0))
            .map(|i| format!("\"{i}\": \"v{i}\""))
            .collect();
        Reply::ok(format!("{{{}}}", body.join(", ")))
    });
    let opts = format!(
        ";batch_url={};batch_max=25;batch_window=100ms",
        origin.url("/batch?ids={keys}")
    );
    let s = Setup::new(&opts, origin);
    let start = Arc::new(std::sync::Barrier::new(40));
    let clients: Vec<_> = (1..=40)
        .map(|i| {
            let (mut c, start) = (s.proxy.raw(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (i, c.call(&[b"GET", format!("label:{i}").as_bytes()]))
            })
        })
        .collect();
    for t in clients {
        let (i, r) = t.join().unwrap();
        let want = match i % 10 {
            0 => b"$-1\r\n".to_vec(),
            _ => bulk(&format!("\"v{i}\"")),
        };
        assert_eq!(lossy(&r), lossy(&want), "label:{i}");
    }
    let paths = s.origin.paths();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().all(|p| p.contains("ids=")), "{paths:?}");
    let ids: usize = paths.iter().map(|p| p.matches(',').count() + 1).sum();
    assert_eq!(ids, 40, "{paths:?}");
    // Stored: hits now.
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:7"]), bulk("\"v7\""));
    assert_eq!(c.call(&[b"GET", b"label:41"]), bulk("\"v41\""));
    assert_eq!(s.origin.requests(), 3);
    assert!(s.origin.paths()[2].ends_with("ids=41"));
}

/// Review of the revalidation and batch-window work: what it found, each fixed.
#[test]
fn review_findings_on_revalidation_and_windows_stay_fixed() {
    // A 304 that says nothing of its lifetime keeps the one the value was stored with (here
    // the first answer's max-age, 2 s + 1 s grace), not the rule's ttl (20 s).
    let origin = Origin::start(|_| Reply::ok(""));
    origin.set_script_with_headers(|_, headers| {
        if headers.iter().any(|(k, _)| k == "if-none-match") {
            return Reply {
                body: Vec::new(),
                ..Reply::status(304)
            };
        }
        Reply::ok("short")
            .header("ETag", "\"s\"")
            .header("Cache-Control", "max-age=2")
    });
    let s = Setup::new(";ttl=20s;honor_max_age=true;grace=1s", origin);
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:m"]), bulk("short"));
    wait_until(
        "revalidated in its grace period",
        Duration::from_secs(6),
        || {
            assert_eq!(c.call(&[b"GET", b"label:m"]), bulk("short"));
            let info = lossy(&c.call(&[b"INFO", b"readthrough"]));
            info_u64(&info.replace(',', "\r\n").replace('=', ":"), "revalidated") >= 1
        },
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("label:m")
        .query(&mut s.owner("label:m"))
        .unwrap();
    assert!(pttl > 0 && pttl <= 3000, "{pttl}");
    drop(s);

    // An id that is not UTF-8 is never batched: two such ids could name one JSON entry
    // (`\xff` was read as U+FFFD, and got that id's value).
    let origin = Origin::start(|path| {
        if path.contains("ids=") {
            Reply::ok("{\"\u{FFFD}\": \"secret\", \"ok\": \"fine\"}")
        } else {
            Reply::status(404)
        }
    });
    let opts = format!(
        ";batch_url={};batch_window=5ms",
        origin.url("/batch?ids={keys}")
    );
    let s = Setup::new(&opts, origin);
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:\xff"]), b"$-1\r\n");
    assert_eq!(c.call(&[b"MGET", b"label:\xfe", b"label:ok"]), {
        let mut r = b"*2\r\n$-1\r\n".to_vec();
        r.extend(bulk("\"fine\""));
        r
    });
    let mut paths = s.origin.paths();
    paths.sort();
    assert_eq!(paths, ["/batch?ids=ok", "/labels/%FE", "/labels/%FF"]);
    drop(s);

    // A window that leaves the batch request too little of the rule's timeout is refused
    // (every miss failed without calling the origin).
    let out = std::process::Command::new(slotgate_bin())
        .args(["--check-config", "--shard", "127.0.0.1:1", "--readthrough"])
        .arg(
            "a:=http://127.0.0.1:1/{key};timeout=40ms;batch_url=http://127.0.0.1:1/b?ids={keys};\
             batch_window=60ms",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        lossy(&out.stderr).contains("must be at most half the timeout"),
        "{}",
        lossy(&out.stderr)
    );
}

/// Review of issue 15's read-through work: what it found, each fixed.
#[test]
fn review_findings_on_the_fleet_features_stay_fixed() {
    // A huge max-age is capped (a worker panicked on the TTL's overflow, and the key failed
    // until a restart).
    let s = Setup::new(
        ";honor_max_age=true;grace=5s",
        Origin::start(|_| Reply::ok("v").header("Cache-Control", "max-age=18446744073709551615")),
    );
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:big"]), bulk("v"));
    let pttl: i64 = redis::cmd("PTTL")
        .arg("label:big")
        .query(&mut s.owner("label:big"))
        .unwrap();
    assert!(pttl > 0 && pttl <= (365 * 86_400 + 5) * 1000, "{pttl}");
    drop(s);

    // A read sent after an invalidation does not get the value of a fill it made dirty.
    let s = Setup::new(";timeout=5s", Origin::start(|_| Reply::ok("old").gated()));
    let mut first = s.proxy.raw();
    first.send(&resp(&[b"GET", b"label:dj"]));
    s.origin.wait_for_requests(1, Duration::from_secs(5));
    s.origin.set_script(|_| Reply::ok("new"));
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"SLOTGATE.INVALIDATE", b"label:dj"]), b":0\r\n");
    assert_eq!(c.call(&[b"GET", b"label:dj"]), bulk("new"));
    s.origin.release();
    assert_eq!(
        first.read_replies(1)[0],
        bulk("old"),
        "it asked before the write"
    );
    drop(s);

    // A concurrency limit does not trip the breaker of a healthy origin: a turn that comes
    // too late is not sent (it was sent with a 1 ms budget, and its timeout counted).
    let s = Setup::new(
        ";timeout=1s;max_origin_concurrency=1;breaker=2/10s",
        Origin::start(|_| Reply::ok("v").delay(Duration::from_millis(300))),
    );
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let mut c = s.proxy.raw();
            std::thread::spawn(move || c.call(&[b"GET", format!("label:c{i}").as_bytes()]))
        })
        .collect();
    for t in clients {
        t.join().unwrap();
    }
    let info = lossy(&s.proxy.raw().call(&[b"INFO", b"readthrough"]));
    assert!(info.contains("breaker=closed"), "{info}");
    assert!(info.contains("breaker_opens=0"), "{info}");
    drop(s);

    // A value in its refresh window whose origin now says 404 is not fetched again by every
    // GET (there was no backoff).
    let s = Setup::new(
        ";ttl=10s;refresh_ahead=0.05",
        Origin::start(|_| Reply::ok("v")),
    );
    let mut c = s.proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:r"]), bulk("v"));
    s.origin.set_script(|_| Reply::status(404));
    // Needed: the value must get older than 5% of its TTL (0.5 s).
    std::thread::sleep(Duration::from_millis(600));
    for _ in 0..20 {
        assert_eq!(c.call(&[b"GET", b"label:r"]), bulk("v"));
    }
    assert!(
        s.origin.requests() <= 3,
        "{} origin requests",
        s.origin.requests()
    );
    drop(s);

    // Configuration errors: never a header's value; schemes and options that do not mix.
    for (rule, want) in [
        (
            "label:=http://127.0.0.1:1/{rest};header=Bearer s3cr3t",
            "not NAME:VALUE",
        ),
        (
            "label:=http://127.0.0.1:1/{rest};batch_url=https://127.0.0.1:1/b?ids={keys}",
            "the origin's scheme",
        ),
        (
            "label:=http://127.0.0.1:1/{rest};refresh_ahead=0.8;honor_max_age=true",
            "cannot be used together",
        ),
    ] {
        let (ok, out) = support::check_config(&["--readthrough", rule, "--shard", "127.0.0.1:1"]);
        assert!(!ok && out.contains(want), "{out}");
        assert!(!out.contains("s3cr3t"), "{out}");
    }
}
