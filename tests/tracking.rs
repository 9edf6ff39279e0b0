//! Client-side caching through slotgate (issue 16.1): `CLIENT TRACKING` with real shards and
//! raw RESP2/RESP3 clients. Invalidations must come for writes made through slotgate, through
//! another connection, and directly on the shard; BCAST with prefixes, OPTIN/OPTOUT with
//! CLIENT CACHING, NOLOOP and REDIRECT behave as in Redis 7; a shard restart flushes the
//! clients; the key table is bounded.
//!
//! "Nothing was sent" is never waited for: keys that share a hash tag live on one shard and
//! are reported by it in order, so a later key's invalidation arriving first (and alone)
//! proves the earlier write was not sent.

mod support;

use std::collections::VecDeque;
use std::io::Read;
use std::time::{Duration, Instant};

use support::*;

/// A raw connection that keeps pushes apart from replies.
struct Conn {
    raw: RawConn,
    buf: Vec<u8>,
    pushes: VecDeque<Vec<u8>>,
}

impl Conn {
    fn new(port: u16) -> Self {
        Conn {
            raw: RawConn::connect(port),
            buf: Vec::new(),
            pushes: VecDeque::new(),
        }
    }

    fn resp3(port: u16) -> Self {
        let mut c = Conn::new(port);
        let hello = c.call(&[b"HELLO", b"3"]);
        assert!(hello.starts_with(b"%"), "{}", lossy(&hello));
        c
    }

    /// The next frame and whether it is a push, within `within`.
    fn frame(&mut self, within: Duration) -> Option<(Vec<u8>, bool)> {
        let deadline = Instant::now() + within;
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let mut scanner = slotgate::resp::ReplyScanner::new();
            if let Some(f) = scanner.scan(&self.buf).expect("valid RESP") {
                return Some((self.buf.drain(..f.len).collect(), f.push));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.raw
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.raw.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Sends a command and returns its reply; pushes that arrive meanwhile are kept.
    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.raw.send(&resp(args));
        loop {
            let (f, push) = self
                .frame(Duration::from_secs(5))
                .expect("a reply within 5 s");
            if !push {
                return f;
            }
            self.pushes.push_back(f);
        }
    }

    /// The next push, waiting up to `within`.
    fn push(&mut self, within: Duration) -> Option<Vec<u8>> {
        if let Some(p) = self.pushes.pop_front() {
            return Some(p);
        }
        let (f, push) = self.frame(within)?;
        assert!(push, "a reply with no request: {}", lossy(&f));
        Some(f)
    }

    /// The next push, which must come within 5 s.
    fn must_push(&mut self) -> Vec<u8> {
        self.push(Duration::from_secs(5))
            .expect("an invalidation within 5 s")
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `>2 invalidate [keys…]` as Redis pushes it.
fn invalidate(keys: &[&str]) -> Vec<u8> {
    let mut out = format!(">2\r\n$10\r\ninvalidate\r\n*{}\r\n", keys.len());
    for k in keys {
        out.push_str(&format!("${}\r\n{k}\r\n", k.len()));
    }
    out.into_bytes()
}

const FLUSH: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

fn set(port: u16, key: &str, value: &str) {
    let mut c = RawConn::connect(port);
    assert_eq!(
        c.call(&[b"SET", key.as_bytes(), value.as_bytes()]),
        b"+OK\r\n"
    );
}

fn info_field(c: &mut Conn, section: &[u8], field: &str) -> String {
    let info = lossy(&c.call(&[b"INFO", section]));
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .to_string()
}

/// A RESP3 client caches a key; a write through another slotgate connection, then one made
/// directly on the shard, each invalidate it (and only the keys it read); FLUSHALL on the
/// shard flushes it; INFO counts it.
#[test]
fn a_resp3_client_is_told_of_every_write_to_a_key_it_read() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    assert_eq!(info_field(&mut a, b"clients", "tracking_clients"), "1");
    let me = lossy(&a.call(&[b"CLIENT", b"INFO"]));
    assert!(me.contains(" flags=t ") && me.contains(" redir=0 "), "{me}");
    set(proxy.port, "{t}k", "1");
    assert_eq!(a.call(&[b"GET", b"{t}k"]), b"$1\r\n1\r\n");
    let mut latencies = Vec::new();
    // Through slotgate (another client), then directly on the shard.
    for (i, port) in [proxy.port, shard.port, proxy.port, shard.port]
        .into_iter()
        .enumerate()
    {
        // A key nobody read first: not reported (the next push is for `{t}k` alone).
        set(port, "{t}unread", "x");
        let t0 = Instant::now();
        set(port, "{t}k", &format!("v{i}"));
        assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{t}k"])));
        latencies.push(t0.elapsed());
        // Read again: tracked again.
        let v = a.call(&[b"GET", b"{t}k"]);
        assert_eq!(lossy(&v), format!("$2\r\nv{i}\r\n"));
    }
    latencies.sort();
    eprintln!("invalidation after a write: {latencies:?}");
    assert!(
        // (Prompt: well under the links' 500 ms keepalive; loose enough for a loaded machine.)
        latencies[latencies.len() / 2] < Duration::from_millis(250),
        "{latencies:?}"
    );
    // A write after the invalidation, before any new read, is not reported again.
    assert_eq!(a.push(Duration::ZERO), None);
    set(proxy.port, "{t}k", "again");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{t}k"])));
    set(proxy.port, "{t}k", "again2");
    assert_eq!(a.call(&[b"GET", b"{t}k2"]), b"_\r\n");
    set(proxy.port, "{t}k2", "x");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{t}k2"])));
    // FLUSHALL on the shard: everything.
    let mut direct = RawConn::connect(shard.port);
    assert_eq!(direct.call(&[b"FLUSHALL"]), b"+OK\r\n");
    assert_eq!(a.must_push(), FLUSH);
    // OFF: no more invalidations, and not counted.
    assert_eq!(a.call(&[b"GET", b"{t}k"]), b"_\r\n");
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"OFF"]), b"+OK\r\n");
    assert_eq!(info_field(&mut a, b"clients", "tracking_clients"), "0");
    set(proxy.port, "{t}k", "after");
    assert_eq!(a.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(a.push(Duration::ZERO), None);
}

/// BCAST with prefixes: every write under a prefix is reported (read or not), nothing
/// else; a user with key restrictions is told only of keys it may read.
#[test]
fn bcast_reports_writes_under_its_prefixes_that_the_user_may_read() {
    let dir = support::tls::temp_dir("tracking-bcast");
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        r#"
[[users]]
name = "admin"
password = "a"
keys = ["*"]
[[users]]
name = "tenant"
password = "t"
keys = ["{u}public:*"]
"#,
    )
    .unwrap();
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let login = |user: &[u8], pw: &[u8]| {
        let mut c = Conn::new(proxy.port);
        let hello = c.call(&[b"HELLO", b"3", b"AUTH", user, pw]);
        assert!(hello.starts_with(b"%"), "{}", lossy(&hello));
        c
    };
    let mut admin = login(b"admin", b"a");
    let mut tenant = login(b"tenant", b"t");
    for c in [&mut admin, &mut tenant] {
        assert_eq!(
            c.call(&[b"CLIENT", b"TRACKING", b"ON", b"BCAST", b"PREFIX", b"{u}"]),
            b"+OK\r\n"
        );
    }
    let me = lossy(&admin.call(&[b"CLIENT", b"INFO"]));
    assert!(
        me.contains(" flags=tB ") && me.contains(" redir=0 "),
        "{me}"
    );
    let info = admin.call(&[b"CLIENT", b"TRACKINGINFO"]);
    assert_eq!(
        lossy(&info),
        "%3\r\n$5\r\nflags\r\n~2\r\n$2\r\non\r\n$5\r\nbcast\r\n$8\r\nredirect\r\n:0\r\n\
         $8\r\nprefixes\r\n*1\r\n$3\r\n{u}\r\n"
    );
    let mut w = RawConn::connect(proxy.port);
    assert_eq!(w.call(&[b"AUTH", b"admin", b"a"]), b"+OK\r\n");
    // Not under the prefix: nobody is told. Under it, but secret: only the admin.
    for k in [&b"{other}x"[..], b"{u}secret", b"{u}public:1"] {
        assert_eq!(w.call(&[b"SET", k, b"v"]), b"+OK\r\n");
    }
    assert_eq!(
        lossy(&admin.must_push()),
        lossy(&invalidate(&["{u}secret"]))
    );
    assert_eq!(
        lossy(&admin.must_push()),
        lossy(&invalidate(&["{u}public:1"]))
    );
    assert_eq!(
        lossy(&tenant.must_push()),
        lossy(&invalidate(&["{u}public:1"]))
    );
    // A write made directly on the shard counts the same.
    set(shard.port, "{u}public:2", "v");
    assert_eq!(
        lossy(&tenant.must_push()),
        lossy(&invalidate(&["{u}public:2"]))
    );
}

/// OPTIN: only reads right after `CLIENT CACHING yes` are tracked. OPTOUT: every read but
/// those right after `CLIENT CACHING no`.
#[test]
fn optin_and_optout_follow_client_caching() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(
        a.call(&[b"CLIENT", b"TRACKING", b"ON", b"OPTIN"]),
        b"+OK\r\n"
    );
    a.call(&[b"GET", b"{o}skipped"]);
    assert_eq!(a.call(&[b"CLIENT", b"CACHING", b"yes"]), b"+OK\r\n");
    a.call(&[b"GET", b"{o}cached"]);
    // (CACHING yes held for one command only.)
    a.call(&[b"GET", b"{o}skipped2"]);
    for k in ["{o}skipped", "{o}skipped2", "{o}cached"] {
        set(proxy.port, k, "v");
    }
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{o}cached"])));

    let mut b = Conn::resp3(proxy.port);
    assert_eq!(
        b.call(&[b"CLIENT", b"TRACKING", b"ON", b"OPTOUT"]),
        b"+OK\r\n"
    );
    assert_eq!(b.call(&[b"CLIENT", b"CACHING", b"no"]), b"+OK\r\n");
    b.call(&[b"GET", b"{p}skipped"]);
    b.call(&[b"GET", b"{p}cached"]);
    for k in ["{p}skipped", "{p}cached"] {
        set(proxy.port, k, "v");
    }
    assert_eq!(lossy(&b.must_push()), lossy(&invalidate(&["{p}cached"])));
}

/// NOLOOP: a client's own write that changes nothing (a SET NX that does not set) leaves the
/// key tracked: another client's write is reported (the review found it forgotten). Its own
/// writes may be reported too (documented: the shard does not say who wrote).
#[test]
fn noloop_keeps_a_key_its_own_write_did_not_change() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    set(proxy.port, "{n}k", "1");
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(
        a.call(&[b"CLIENT", b"TRACKING", b"ON", b"NOLOOP"]),
        b"+OK\r\n"
    );
    assert_eq!(a.call(&[b"GET", b"{n}k"]), b"$1\r\n1\r\n");
    assert_eq!(a.call(&[b"SET", b"{n}k", b"zz", b"NX"]), b"_\r\n");
    set(proxy.port, "{n}k", "2");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{n}k"])));
}

/// Invalidations are pushed under CLIENT REPLY OFF too, as Redis pushes them (the review
/// found them dropped, with the key's entry gone: a stale cache).
#[test]
fn invalidations_are_pushed_under_client_reply_off() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    a.call(&[b"GET", b"{q}k"]);
    a.raw.send(&resp(&[b"CLIENT", b"REPLY", b"OFF"]));
    set(proxy.port, "{q}k", "v");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{q}k"])));
    assert_eq!(a.call(&[b"CLIENT", b"REPLY", b"ON"]), b"+OK\r\n");
}

/// Reads inside scripts and functions are tracked by the keys they declare, as Redis tracks
/// the keys a script's reads touch.
#[test]
fn a_scripts_declared_keys_are_tracked() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    a.call(&[b"EVAL", b"return redis.call('GET', KEYS[1])", b"1", b"{e}k"]);
    set(proxy.port, "{e}k", "v");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{e}k"])));
}

/// A shard that refuses the invalidation link (here its user may not run CLIENT TRACKING)
/// makes CLIENT TRACKING ON fail with the reason, tracking off: before, it answered `+OK`
/// and nothing was ever invalidated.
#[test]
fn a_shard_refusing_the_link_makes_tracking_on_fail_clearly() {
    let shard = RedisServer::start();
    let mut direct = RawConn::connect(shard.port);
    assert_eq!(
        direct.call(&[b"ACL", b"SETUSER", b"default", b"-client|tracking"]),
        b"+OK\r\n"
    );
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    let got = lossy(&a.call(&[b"CLIENT", b"TRACKING", b"ON"]));
    assert!(
        got.starts_with("-ERR client-side caching is unavailable through slotgate: handshake refused by the shard")
            && got.contains("NOPERM"),
        "{got}"
    );
    let info = lossy(&a.call(&[b"CLIENT", b"TRACKINGINFO"]));
    assert!(info.contains("$3\r\noff\r\n"), "{info}");
    assert_eq!(info_field(&mut a, b"clients", "tracking_clients"), "0");
    assert_eq!(a.call(&[b"GET", b"k"]), b"_\r\n");
    // Allowed again on the shard: the next CLIENT TRACKING ON tries the link at once.
    assert_eq!(
        direct.call(&[b"ACL", b"SETUSER", b"default", b"+client|tracking"]),
        b"+OK\r\n"
    );
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    a.call(&[b"GET", b"{f}k"]);
    set(proxy.port, "{f}k", "v");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["{f}k"])));
}

/// The link PINGs its shard, so the shard's idle `timeout` does not close it (and flush
/// every tracking client each time): the review saw a flush every 2–3 s with `timeout 2`.
#[test]
fn the_link_outlives_the_shards_idle_timeout() {
    let shard = RedisServer::start_with(&["--timeout", "1"]);
    let proxy = Slotgate::start(&[&shard]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    let mut direct = RawConn::connect(shard.port);
    let link_age = |direct: &mut RawConn| -> u64 {
        let list = lossy(&direct.call(&[b"CLIENT", b"LIST"]));
        list.lines()
            .filter(|l| l.contains(" flags=tB "))
            .filter_map(|l| l.split(" age=").nth(1)?.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    wait_until("a link older than 3 s", Duration::from_secs(10), || {
        // (This connection is not idle: it asks every 10 ms.)
        link_age(&mut direct) >= 3
    });
    // (A reply, so that a flush sent before it has been read.)
    assert_eq!(a.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(a.push(Duration::ZERO), None, "no flush");
}

/// RESP2: invalidations go to the connection named by REDIRECT, as messages on
/// `__redis__:invalidate`; CLIENT GETREDIR names it. When it goes away, a RESP3 client is
/// told `tracking-redir-broken` and TRACKINGINFO says `broken_redirect`.
#[test]
fn resp2_clients_get_invalidations_through_a_redirect() {
    let shard = RedisServer::start();
    // Two workers: the target may well live on the other one.
    let proxy = Slotgate::start_with(&[&shard], &["--workers", "2"]);
    let mut targets = Vec::new();
    for _ in 0..2 {
        let mut r = Conn::new(proxy.port);
        let id = lossy(&r.call(&[b"CLIENT", b"ID"]));
        let id = id.trim_start_matches(':').trim().to_string();
        assert_eq!(
            lossy(&r.call(&[b"SUBSCRIBE", b"__redis__:invalidate"])),
            "*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
        );
        targets.push((r, id));
    }
    for (i, (r, id)) in targets.iter_mut().enumerate() {
        let mut c = Conn::new(proxy.port);
        assert_eq!(
            c.call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", id.as_bytes()]),
            b"+OK\r\n"
        );
        assert_eq!(
            lossy(&c.call(&[b"CLIENT", b"GETREDIR"])),
            format!(":{id}\r\n")
        );
        let me = lossy(&c.call(&[b"CLIENT", b"INFO"]));
        assert!(me.contains(&format!(" redir={id} ")), "{me}");
        let key = format!("{{r}}k{i}");
        c.call(&[b"GET", key.as_bytes()]);
        set(proxy.port, &key, "v");
        let (msg, push) = r.frame(Duration::from_secs(5)).expect("a message");
        assert!(!push);
        assert_eq!(
            lossy(&msg),
            format!(
                "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n${}\r\n{key}\r\n",
                key.len()
            )
        );
    }
    // A target subscribed to anything (here a pattern) gets them too, as in Redis.
    let mut p = Conn::new(proxy.port);
    let pid = lossy(&p.call(&[b"CLIENT", b"ID"]));
    let pid = pid.trim_start_matches(':').trim().to_string();
    p.call(&[b"PSUBSCRIBE", b"news.*"]);
    let mut c = Conn::new(proxy.port);
    assert_eq!(
        c.call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", pid.as_bytes()]),
        b"+OK\r\n"
    );
    c.call(&[b"GET", b"{r}p"]);
    set(proxy.port, "{r}p", "v");
    let (msg, _) = p.frame(Duration::from_secs(5)).expect("a message");
    assert_eq!(
        lossy(&msg),
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$4\r\n{r}p\r\n"
    );
    // A redirect to nobody.
    let mut c = Conn::resp3(proxy.port);
    assert_eq!(
        lossy(&c.call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", b"999999"])),
        "-ERR The client ID you want redirect to does not exist\r\n"
    );
    // The target goes away: a RESP3 client hears of it at its next invalidation.
    let (r, id) = targets.pop().unwrap();
    assert_eq!(
        c.call(&[b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", id.as_bytes()]),
        b"+OK\r\n"
    );
    drop(r);
    let mut probe = Conn::new(proxy.port);
    wait_until("the target to be gone", Duration::from_secs(5), || {
        !lossy(&probe.call(&[b"CLIENT", b"LIST"])).contains(&format!("id={id} "))
    });
    c.call(&[b"GET", b"{r}gone"]);
    set(proxy.port, "{r}gone", "v");
    assert_eq!(
        lossy(&c.must_push()),
        format!(">2\r\n$21\r\ntracking-redir-broken\r\n:{id}\r\n")
    );
    let info = lossy(&c.call(&[b"CLIENT", b"TRACKINGINFO"]));
    assert!(info.contains("broken_redirect"), "{info}");
}

/// The shard behind a tracking client restarts: the client is flushed when slotgate loses
/// the shard's reports, and again once they are back (it may have cached a key of another
/// shard, or of this one, meanwhile); then invalidations flow again.
#[test]
fn a_shard_restart_flushes_tracking_clients() {
    let mut shards = [RedisServer::start(), RedisServer::start()];
    let proxy = Slotgate::start(&[&shards[0], &shards[1]]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    // One key on each shard.
    let key_on = |shard: usize| -> String {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| (slotgate::router::slot(k.as_bytes()) < 8192) == (shard == 0))
            .unwrap()
    };
    let (k0, k1) = (key_on(0), key_on(1));
    a.call(&[b"GET", k0.as_bytes()]);
    a.call(&[b"GET", k1.as_bytes()]);
    shards[0].kill();
    assert_eq!(a.must_push(), FLUSH);
    // Cached while the shard is down.
    a.call(&[b"GET", k1.as_bytes()]);
    shards[0].restart();
    assert_eq!(a.must_push(), FLUSH);
    // Reported again. The link flushes at each failed attempt and once more when it is
    // back, so a write may come as a flush (the key forgotten) until then: read the key,
    // write it, and expect its invalidation, or a flush and again.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        wait_until("the shard to serve again", Duration::from_secs(10), || {
            !a.call(&[b"GET", k0.as_bytes()]).starts_with(b"-")
        });
        while let Some(p) = a.pushes.pop_front() {
            assert_eq!(lossy(&p), lossy(FLUSH));
        }
        set(proxy.port, &k0, &format!("v{i}"));
        let p = a.must_push();
        if p == invalidate(&[&k0]) {
            break;
        }
        assert_eq!(lossy(&p), lossy(FLUSH));
        assert!(
            Instant::now() < deadline,
            "no invalidation after the restart"
        );
    }
}

/// The key table is bounded (`--tracking-table-max-keys`): a key that makes room for a new
/// one is invalidated, so no client keeps a key slotgate no longer watches.
#[test]
fn the_key_table_is_bounded_and_evicted_keys_are_invalidated() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--tracking-table-max-keys", "10"]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    for i in 0..25 {
        a.call(&[b"GET", format!("{{b}}k{i}").as_bytes()]);
    }
    let mut evicted = Vec::new();
    while let Some(p) = a.push(Duration::ZERO) {
        evicted.push(lossy(&p));
    }
    assert_eq!(evicted.len(), 15, "{evicted:?}");
    let info = lossy(&a.call(&[b"INFO", b"stats"]));
    assert!(info.contains("tracking_total_keys:10\r\n"), "{info}");
}

/// The replies and errors of the tracking commands are Redis's own, byte for byte (compared
/// with a real redis-server, in RESP2 and RESP3).
#[test]
fn tracking_commands_answer_as_redis_does() {
    let shard = RedisServer::start();
    let direct = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let script: &[&[&[u8]]] = &[
        &[b"CLIENT", b"TRACKINGINFO"],
        &[b"CLIENT", b"GETREDIR"],
        &[b"CLIENT", b"CACHING", b"yes"],
        &[b"CLIENT", b"TRACKING", b"maybe"],
        &[b"CLIENT", b"TRACKING", b"on", b"bogus"],
        &[b"CLIENT", b"TRACKING", b"on", b"PREFIX", b"a"],
        &[b"CLIENT", b"TRACKING", b"on", b"BCAST", b"OPTIN"],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTIN", b"OPTOUT"],
        &[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", b"abc"],
        &[
            b"CLIENT",
            b"TRACKING",
            b"on",
            b"BCAST",
            b"PREFIX",
            b"a",
            b"PREFIX",
            b"ab",
        ],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTIN"],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTOUT"],
        &[b"CLIENT", b"TRACKING", b"on", b"BCAST"],
        &[b"CLIENT", b"CACHING", b"no"],
        &[b"CLIENT", b"CACHING", b"maybe"],
        &[b"CLIENT", b"CACHING", b"yes"],
        &[b"CLIENT", b"TRACKINGINFO"],
        &[b"CLIENT", b"TRACKINGINFO"],
        &[b"CLIENT", b"TRACKING", b"off", b"PREFIX", b"x"],
        &[
            b"CLIENT",
            b"TRACKING",
            b"on",
            b"BCAST",
            b"PREFIX",
            b"b",
            b"PREFIX",
            b"a",
            b"NOLOOP",
        ],
        &[b"CLIENT", b"TRACKING", b"on", b"BCAST", b"PREFIX", b"bc"],
        &[b"CLIENT", b"TRACKING", b"on", b"BCAST", b"PREFIX", b"c"],
        &[b"CLIENT", b"TRACKINGINFO"],
        &[b"CLIENT", b"GETREDIR"],
        &[b"CLIENT", b"TRACKING", b"off"],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTOUT", b"NOLOOP"],
        &[b"CLIENT", b"CACHING", b"NO"],
        &[b"CLIENT", b"TRACKINGINFO"],
        &[b"CLIENT", b"CACHING", b"yes"],
        // Turning tracking on again keeps a CLIENT CACHING given before (the review).
        &[b"CLIENT", b"TRACKING", b"off"],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTIN"],
        &[b"CLIENT", b"CACHING", b"yes"],
        &[b"CLIENT", b"TRACKING", b"on", b"OPTIN"],
        &[b"CLIENT", b"TRACKINGINFO"],
        // A redirect target must exist as soon as it is named, even with OFF (the review).
        &[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", b"0"],
        &[b"CLIENT", b"TRACKING", b"off", b"REDIRECT", b"99999"],
        &[
            b"CLIENT",
            b"TRACKING",
            b"on",
            b"REDIRECT",
            b"99998",
            b"REDIRECT",
            b"99999",
        ],
        &[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", b"-3"],
        &[b"CLIENT", b"TRACKING"],
        &[b"CLIENT", b"CACHING"],
    ];
    for hello in [None, Some(&[&b"HELLO"[..], b"3"][..])] {
        let mut want = Conn::new(direct.port);
        let mut got = Conn::new(proxy.port);
        if let Some(h) = hello {
            want.call(h);
            got.call(h);
        }
        for cmd in script {
            let (w, g) = (want.call(cmd), got.call(cmd));
            assert_eq!(
                lossy(&g),
                lossy(&w),
                "{:?}",
                cmd.iter().map(|a| lossy(a)).collect::<Vec<_>>()
            );
        }
    }
}

/// node-redis 5 with `RESP: 3, clientSideCache` (tests/node/client_cache.js; `scripts/test.sh`
/// installs it): a second GET is served from the client's cache, and a SET through another
/// connection, then one made directly on the shard, each invalidate it.
#[test]
fn node_redis_client_side_cache_works_through_slotgate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/redis")
            .exists(),
        "node-redis is required: npm ci --prefix tests/node (scripts/test.sh does it)"
    );
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let out = std::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/node/client_cache.js"
        ))
        .arg(proxy.port.to_string())
        .arg(shard.port.to_string())
        .output()
        .expect("node runs");
    let (stdout, stderr) = (lossy(&out.stdout), lossy(&out.stderr));
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("node-redis client cache OK"), "{stdout}");
}

/// Read-through fills invalidate like writes (issue 16): a tracking client that read a key
/// through a miss is told when the fill stores it (it may have cached the origin's value
/// before), and when SLOTGATE.INVALIDATE deletes it. A BCAST client is told of the key, and
/// never of slotgate's own side keys (the fill's lease).
#[test]
fn read_through_fills_invalidate_tracking_clients() {
    let origin = support::origin::Origin::start(|_| support::origin::Reply::ok("v"));
    let shard = RedisServer::start();
    let rule = format!("label:={};ttl=10s", origin.url("/{rest}"));
    let proxy = Slotgate::start_with(&[&shard], &["--readthrough", &rule]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    let mut b = Conn::resp3(proxy.port);
    assert_eq!(
        b.call(&[b"CLIENT", b"TRACKING", b"ON", b"BCAST"]),
        b"+OK\r\n"
    );
    assert_eq!(a.call(&[b"GET", b"label:f"]), b"$1\r\nv\r\n");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["label:f"])));
    assert_eq!(lossy(&b.must_push()), lossy(&invalidate(&["label:f"])));
    // Read again (a hit), then invalidated by hand.
    assert_eq!(a.call(&[b"GET", b"label:f"]), b"$1\r\nv\r\n");
    let mut other = RawConn::connect(proxy.port);
    assert_eq!(other.call(&[b"SLOTGATE.INVALIDATE", b"label:f"]), b":1\r\n");
    assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["label:f"])));
    assert_eq!(lossy(&b.must_push()), lossy(&invalidate(&["label:f"])));
    assert_eq!(origin.requests(), 1);
}

/// A reload that narrows a user's keys narrows what its BCAST client is told at once (the
/// review found the old rules kept: key names leaked).
#[test]
fn a_reload_narrowing_a_users_keys_narrows_its_invalidations() {
    let dir = support::tls::temp_dir("tracking-reload");
    let cfg = dir.join("proxy.toml");
    let users = |keys: &str| {
        format!(
            "[[users]]\nname = \"admin\"\npassword = \"a\"\nkeys = [\"*\"]\n\
             [[users]]\nname = \"ub\"\npassword = \"b\"\nkeys = [{keys}]\n"
        )
    };
    std::fs::write(&cfg, users("\"*\"")).unwrap();
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let mut b = Conn::new(proxy.port);
    assert!(
        b.call(&[b"HELLO", b"3", b"AUTH", b"ub", b"b"])
            .starts_with(b"%")
    );
    assert_eq!(
        b.call(&[b"CLIENT", b"TRACKING", b"ON", b"BCAST", b"PREFIX", b"{z}"]),
        b"+OK\r\n"
    );
    std::fs::write(&cfg, users("\"{z}a*\"")).unwrap();
    proxy.signal("HUP");
    wait_until("the narrower rights", Duration::from_secs(5), || {
        b.call(&[b"GET", b"{z}b"]).starts_with(b"-NOPERM")
    });
    let mut w = RawConn::connect(proxy.port);
    assert_eq!(w.call(&[b"AUTH", b"admin", b"a"]), b"+OK\r\n");
    for k in [&b"{z}b"[..], b"{z}a1"] {
        assert_eq!(w.call(&[b"SET", k, b"v"]), b"+OK\r\n");
    }
    assert_eq!(lossy(&b.must_push()), lossy(&invalidate(&["{z}a1"])));
}

/// A read-through miss whose answer no shard holds (the origin's 404, a `no-store` value):
/// nothing would ever report it changing, so a tracking client is told right after the
/// reply, and asks again next time (the review found such a nil cached for good).
#[test]
fn a_read_through_answer_no_shard_holds_is_invalidated_after_its_reply() {
    let origin = support::origin::Origin::start(|_| support::origin::Reply::status(404));
    let shard = RedisServer::start();
    let rule = format!("gone:={};ttl=10s;negative_ttl=5s", origin.url("/{rest}"));
    let proxy = Slotgate::start_with(&[&shard], &["--readthrough", &rule]);
    let mut a = Conn::resp3(proxy.port);
    assert_eq!(a.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    for _ in 0..2 {
        // (The second answer comes from the negative entry.)
        assert_eq!(a.call(&[b"GET", b"gone:x"]), b"_\r\n");
        assert!(a.pushes.is_empty(), "told after the reply, not before");
        assert_eq!(lossy(&a.must_push()), lossy(&invalidate(&["gone:x"])));
    }
    assert_eq!(
        lossy(&a.call(&[b"MGET", b"gone:y", b"gone:z"])),
        "*2\r\n_\r\n_\r\n"
    );
    let got = lossy(&a.must_push());
    assert!(
        got == lossy(&invalidate(&["gone:y", "gone:z"]))
            || got == lossy(&invalidate(&["gone:z", "gone:y"])),
        "{got}"
    );
    assert_eq!(origin.requests(), 3);
}
