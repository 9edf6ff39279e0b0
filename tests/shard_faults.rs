//! Shard faults: a killed shard makes only its own slots fail (`-ERR shard unavailable…`), at
//! once; other shards keep serving correct values; a restarted shard serves again right away; a
//! hung (SIGSTOP'd) shard fails within the op timeout; no reply ever reaches the wrong request.
//!
//! Every loop is bounded by count and time; the whole file runs in well under 60 s.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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

/// A request that never reached the shard (safe to retry).
const UNAVAILABLE: &str = "-ERR shard unavailable";
/// A request that reached the shard and got no reply (it may have been applied).
const UNKNOWN: &str = "-ERR outcome unknown";

/// Shard (even split of 3) of a key without braces.
fn shard_of(key: &str) -> usize {
    assert!(!key.contains('{'));
    even_shard_of(key.as_bytes(), 3)
}

fn keys_on_shard(shard: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| shard_of(k) == shard)
        .take(n)
        .collect()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bulk(v: &str) -> String {
    format!("${}\r\n{v}\r\n", v.len())
}

/// Raw client that reads one reply at a time and reports I/O problems as `Err`.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        s.set_nodelay(true).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        self.s.write_all(&resp(args))
    }

    fn read(&mut self) -> Result<String, String> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(n) = resp2_reply_len(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..n).collect();
                return Ok(lossy(&r));
            }
            match read_some(&mut self.s, &mut chunk) {
                Ok(0) => return Err("<connection closed by slotgate>".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("<no reply: {e}>")),
            }
        }
    }

    fn call(&mut self, args: &[&str]) -> Result<String, String> {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.send(&a).map_err(|e| format!("<write failed: {e}>"))?;
        self.read()
    }
}

/// One SET+GET pair as seen by a traffic thread.
struct Event {
    key: String,
    shard: usize,
    value: String,
    phase_before: usize,
    phase_after: usize,
    set: Result<String, String>,
    get: Result<String, String>,
    latency: Duration,
}

/// Pairs seen so far that started and ended in the same phase, per phase and shard.
type Steady = Arc<Vec<AtomicUsize>>;

fn steady_count(steady: &Steady, phase: usize, shard: usize) -> usize {
    steady[phase * 3 + shard].load(Ordering::SeqCst)
}

fn traffic_thread(
    port: u16,
    keys: Vec<(String, usize)>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    steady: Steady,
) -> Vec<Event> {
    let mut c = Client::connect(port);
    let mut out = Vec::new();
    let started = Instant::now();
    for n in 0..200_000usize {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        let (key, shard) = &keys[n % keys.len()];
        let value = format!("{key}={n}");
        let phase_before = phase.load(Ordering::SeqCst);
        let t = Instant::now();
        // SET and GET pipelined in one write.
        let mut req = resp(&[b"SET", key.as_bytes(), value.as_bytes()]);
        req.extend(resp(&[b"GET", key.as_bytes()]));
        let (set, get) = match c.s.write_all(&req) {
            Err(e) => (
                Err(format!("<write failed: {e}>")),
                Err("<not sent>".into()),
            ),
            Ok(()) => {
                let set = c.read();
                let get = if set.is_ok() {
                    c.read()
                } else {
                    Err("<skipped>".into())
                };
                (set, get)
            }
        };
        let latency = t.elapsed();
        let phase_after = phase.load(Ordering::SeqCst);
        let broken = set.is_err() || get.is_err();
        if phase_before == phase_after {
            steady[phase_before * 3 + shard].fetch_add(1, Ordering::SeqCst);
        }
        out.push(Event {
            key: key.clone(),
            shard: *shard,
            value,
            phase_before,
            phase_after,
            set,
            get,
            latency,
        });
        if broken {
            c = Client::connect(port);
        }
    }
    out
}

/// Checks of one event; returns violations.
fn check_event(e: &Event, dead: usize) -> Vec<String> {
    let mut v = Vec::new();
    let ctx = format!(
        "key {} (shard {}) phases {}->{} latency {:?}: SET -> {:?}, GET -> {:?}",
        e.key, e.shard, e.phase_before, e.phase_after, e.latency, e.set, e.get
    );
    let ok_set = matches!(&e.set, Ok(r) if r == "+OK\r\n");
    let ok_get = matches!(&e.get, Ok(r) if *r == bulk(&e.value));
    let unavailable = |r: &Result<String, String>| matches!(r, Ok(s) if s.starts_with(UNAVAILABLE));

    // Never a value of another key, in any phase.
    if let Ok(g) = &e.get
        && g.starts_with('$')
        && !g.starts_with("$-1")
        && !g.contains(&format!("\r\n{}=", e.key))
    {
        v.push(format!("GET returned another key's value! {ctx}"));
    }

    if e.shard != dead {
        if !(ok_set && ok_get) {
            v.push(format!("healthy shard must always succeed: {ctx}"));
        }
        return v;
    }
    let steady = e.phase_before == e.phase_after;
    match (steady, e.phase_before) {
        (true, 0) | (true, 4) => {
            if !(ok_set && ok_get) {
                v.push(format!(
                    "shard up (phase {}): must succeed: {ctx}",
                    e.phase_before
                ));
            }
        }
        (true, 2) => {
            if !(unavailable(&e.set) && unavailable(&e.get)) {
                v.push(format!(
                    "dead shard: both replies must be `{UNAVAILABLE}…`: {ctx}"
                ));
            }
            if e.latency > Duration::from_secs(1) {
                v.push(format!(
                    "dead shard (connection refused) must fail at once: {ctx}"
                ));
            }
        }
        _ => {
            // Transition: either outcome, but a well-formed one (requests in flight when the
            // shard died were sent: their outcome is unknown).
            let failed = |r: &Result<String, String>| matches!(r, Ok(s) if s.starts_with(UNAVAILABLE) || s.starts_with(UNKNOWN));
            let set_fine = ok_set || failed(&e.set);
            let get_fine = matches!(&e.get, Ok(g) if g.starts_with('$')) || failed(&e.get);
            if !(set_fine && get_fine) {
                v.push(format!(
                    "transition: reply must be a result, `{UNAVAILABLE}…` or `{UNKNOWN}…`: {ctx}"
                ));
            }
        }
    }
    v
}

#[test]
fn killed_shard_fails_only_its_keys_and_recovers_after_restart() {
    let mut shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let proxy = {
        let refs: Vec<&RedisServer> = shards.iter().collect();
        // A long op timeout, so "fails at once" is distinguishable from "timed out".
        Slotgate::start_with(&refs, &["--op-timeout", "5s"])
    };
    const DEAD: usize = 1;
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let steady: Steady = Arc::new((0..5 * 3).map(|_| AtomicUsize::new(0)).collect());

    let handles: Vec<_> = (0..4)
        .map(|t| {
            let per_shard: Vec<Vec<String>> = (0..3)
                .map(|s| keys_on_shard(s, &format!("fault:t{t}:"), 5))
                .collect();
            // Interleave shards: s0, s1, s2, s0, …
            let mut keys = Vec::new();
            for i in 0..5 {
                for (s, ks) in per_shard.iter().enumerate() {
                    keys.push((ks[i].clone(), s));
                }
            }
            let (phase, stop, steady, port) =
                (phase.clone(), stop.clone(), steady.clone(), proxy.port);
            std::thread::spawn(move || traffic_thread(port, keys, phase, stop, steady))
        })
        .collect();

    // Phases: 0 up, 1 being killed, 2 down, 3 being restarted, 4 up again. Only pairs that
    // start and end in the same steady phase (0, 2, 4) are held to that phase's rule.
    // Traffic flows to every shard before the kill.
    wait_until(
        "20 pairs on every shard while all are up",
        Duration::from_secs(10),
        || (0..3).all(|s| steady_count(&steady, 0, s) >= 20),
    );
    phase.store(1, Ordering::SeqCst);
    shards[DEAD].kill();
    phase.store(2, Ordering::SeqCst);
    // Failures must stay immediate and well-formed for the whole outage, not only its start:
    // the shard stays down while 200 pairs per shard go through (or fail).
    wait_until(
        "200 pairs on every shard while one is down",
        Duration::from_secs(20),
        || (0..3).all(|s| steady_count(&steady, 2, s) >= 200),
    );
    phase.store(3, Ordering::SeqCst);
    shards[DEAD].restart();
    phase.store(4, Ordering::SeqCst);
    // The restarted shard must keep serving, not only answer the first requests.
    wait_until(
        "200 pairs on every shard after the restart",
        Duration::from_secs(20),
        || (0..3).all(|s| steady_count(&steady, 4, s) >= 200),
    );
    stop.store(true, Ordering::SeqCst);

    let events: Vec<Event> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("traffic thread panicked"))
        .collect();

    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let summary = format!(
        "{} pairs: dead-shard pairs in phase 0/2/4 (up/down/up again): {}/{}/{}, healthy pairs during outage: {}",
        events.len(),
        count(&|e| e.shard == DEAD && e.phase_before == 0 && e.phase_after == 0),
        count(&|e| e.shard == DEAD && e.phase_before == 2 && e.phase_after == 2),
        count(&|e| e.shard == DEAD && e.phase_before == 4 && e.phase_after == 4),
        count(&|e| e.shard != DEAD && e.phase_before == 2 && e.phase_after == 2),
    );
    eprintln!("{summary}");

    let violations: Vec<String> = events.iter().flat_map(|e| check_event(e, DEAD)).collect();
    assert!(
        violations.is_empty(),
        "{} violations ({summary}); first ones:\n{}",
        violations.len(),
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (what, n) in [
        (
            "dead-shard pairs while down",
            count(&|e| e.shard == DEAD && e.phase_before == 2 && e.phase_after == 2),
        ),
        (
            "dead-shard pairs after restart",
            count(&|e| e.shard == DEAD && e.phase_before == 4 && e.phase_after == 4),
        ),
        (
            "healthy-shard pairs during outage",
            count(&|e| e.shard != DEAD && e.phase_before == 2 && e.phase_after == 2),
        ),
    ] {
        assert!(
            n >= 20,
            "test did not exercise enough {what}: {n} ({summary})"
        );
    }
}

#[test]
fn first_request_after_restart_succeeds_without_grace_period() {
    let mut shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let proxy = {
        let refs: Vec<&RedisServer> = shards.iter().collect();
        Slotgate::start_with(&refs, &["--op-timeout", "5s"])
    };
    let k0 = keys_on_shard(0, "rs:", 1).remove(0);
    let k2 = keys_on_shard(2, "rs:", 1).remove(0);
    let k2b = keys_on_shard(2, "rs:b", 1).remove(0);
    let mut c = Client::connect(proxy.port);
    for k in [&k0, &k2] {
        assert_eq!(c.call(&["SET", k, "before"]), Ok("+OK\r\n".into()));
    }

    shards[2].kill();
    for k in [&k2, &k2b] {
        let t = Instant::now();
        let r = c.call(&["GET", k]);
        assert!(
            matches!(&r, Ok(s) if s.starts_with(UNAVAILABLE)),
            "GET {k} on killed shard: {r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "refused must fail at once: {:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        c.call(&["GET", &k0]),
        Ok(bulk("before")),
        "other shard unaffected"
    );
    // Scatter-gather touching the dead shard fails; the connection stays usable.
    let r = c.call(&["MGET", &k0, &k2]);
    assert!(
        r.is_ok() && r.as_ref().unwrap().starts_with('-'),
        "MGET over a dead shard: {r:?}"
    );
    assert_eq!(c.call(&["PING"]), Ok("+PONG\r\n".into()));

    shards[2].restart();
    let t = Instant::now();
    let first = c.call(&["GET", &k2]);
    if first != Ok("$-1\r\n".into()) {
        // Measure how long it would have taken, for the report.
        wait_until(
            &format!(
                "a GET to succeed after the restart (the first GET after the shard accepted \
                 connections again must succeed, got {first:?})"
            ),
            Duration::from_secs(5),
            || c.call(&["GET", &k2]) == Ok("$-1\r\n".into()),
        );
        panic!(
            "first GET after the shard accepted connections again must succeed (empty shard -> nil), \
             got {first:?}; it succeeded after {:?}",
            t.elapsed()
        );
    }
    assert_eq!(c.call(&["SET", &k2, "after"]), Ok("+OK\r\n".into()));
    assert_eq!(c.call(&["GET", &k2]), Ok(bulk("after")));
    let mut fresh = Client::connect(proxy.port);
    assert_eq!(
        fresh.call(&["GET", &k2b]),
        Ok("$-1\r\n".into()),
        "new client after restart"
    );
    assert_eq!(fresh.call(&["GET", &k0]), Ok(bulk("before")));
}

#[test]
fn hung_shard_times_out_within_op_timeout_and_recovers_after_resume() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--op-timeout", "300ms"]);
    const HUNG: usize = 1;
    let k: Vec<String> = (0..3)
        .map(|s| keys_on_shard(s, "hang:", 1).remove(0))
        .collect();
    let mut a = Client::connect(proxy.port);
    for (s, key) in k.iter().enumerate() {
        assert_eq!(
            a.call(&["SET", key, &format!("v{s}")]),
            Ok("+OK\r\n".into())
        );
    }
    assert_eq!(a.call(&["GET", &k[HUNG]]), Ok(bulk("v1")));

    shards[HUNG].pause();
    let limit = Duration::from_millis(300 + 700);

    // A GET on the hung shard, on connection A in another thread...
    let hung_key = k[HUNG].clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let r = a.call(&["GET", &hung_key]);
        (a, r, t.elapsed())
    });
    // ...while connection B keeps using the other shards, unaffected.
    let mut b = Client::connect(proxy.port);
    let window = Instant::now();
    let mut n = 0;
    while window.elapsed() < Duration::from_millis(600) && n < 10_000 {
        for s in [0, 2] {
            let t = Instant::now();
            let r = b.call(&["GET", &k[s]]);
            assert_eq!(
                r,
                Ok(bulk(&format!("v{s}"))),
                "shard {s} while shard {HUNG} hangs"
            );
            assert!(
                t.elapsed() < Duration::from_millis(250),
                "shard {s} slowed down by the hung shard: {:?}",
                t.elapsed()
            );
        }
        n += 1;
    }
    let (mut a, r, took) = waiter.join().unwrap();
    assert!(
        matches!(&r, Ok(s) if s.starts_with(UNKNOWN)),
        "GET on hung shard (sent, no reply) must fail with `{UNKNOWN}…`, got {r:?} after {took:?}"
    );
    assert!(
        took <= limit,
        "hung shard must fail within op timeout + slack: took {took:?}"
    );

    // Further requests to the hung shard (reconnects to a stopped process also hang) time out
    // too, and the connection stays usable for the other shards.
    for i in 0..3 {
        let t = Instant::now();
        let r = a.call(&["GET", &k[HUNG]]);
        assert!(
            matches!(&r, Ok(s) if s.starts_with(UNKNOWN) || s.starts_with(UNAVAILABLE)),
            "repeat {i}: GET on hung shard: {r:?}"
        );
        assert!(t.elapsed() <= limit, "repeat {i} took {:?}", t.elapsed());
        assert_eq!(
            a.call(&["GET", &k[0]]),
            Ok(bulk("v0")),
            "same connection, shard 0"
        );
    }
    // Pipelined: the hung shard's error keeps its place in the reply order.
    let t = Instant::now();
    let mut req = resp(&[b"GET", k[HUNG].as_bytes()]);
    req.extend(resp(&[b"GET", k[0].as_bytes()]));
    req.extend(resp(&[b"GET", k[2].as_bytes()]));
    a.s.write_all(&req).unwrap();
    let r1 = a.read();
    let r2 = a.read();
    let r3 = a.read();
    assert!(
        matches!(&r1, Ok(s) if s.starts_with(UNKNOWN) || s.starts_with(UNAVAILABLE)),
        "pipelined #1: {r1:?}"
    );
    assert_eq!(r2, Ok(bulk("v0")), "pipelined #2");
    assert_eq!(r3, Ok(bulk("v2")), "pipelined #3");
    assert!(t.elapsed() <= limit, "pipelined took {:?}", t.elapsed());

    shards[HUNG].resume();
    // The first request after resume succeeds, and stale replies to the timed-out GETs (the
    // shard answers them now) never reach later requests.
    let first = a.call(&["SET", &k[HUNG], "fresh-0"]);
    assert_eq!(first, Ok("+OK\r\n".into()), "first request after resume");
    assert_eq!(a.call(&["GET", &k[HUNG]]), Ok(bulk("fresh-0")));
    let mut c = Client::connect(proxy.port);
    for i in 1..200 {
        let v = format!("fresh-{i}");
        let conn = if i % 2 == 0 { &mut a } else { &mut c };
        assert_eq!(
            conn.call(&["SET", &k[HUNG], &v]),
            Ok("+OK\r\n".into()),
            "SET #{i} after resume"
        );
        assert_eq!(
            conn.call(&["GET", &k[HUNG]]),
            Ok(bulk(&v)),
            "GET #{i} after resume"
        );
    }
    assert_eq!(c.call(&["GET", &k[0]]), Ok(bulk("v0")));
    assert_eq!(c.call(&["GET", &k[2]]), Ok(bulk("v2")));
}
