//! Proxy-side authentication and permissions, with Redis's exact strings; connection limits.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use redis::Value;
use support::*;

const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOPERM_KEYS: &[u8] =
    b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n";

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// Arguments that satisfy a command's arity (Redis checks arity before authentication).
fn filler(arity: i64, fixed: usize) -> Vec<Vec<u8>> {
    let want = arity.unsigned_abs() as usize;
    (fixed..want)
        .map(|i| format!("x{i}").into_bytes())
        .collect()
}

#[test]
fn before_auth_every_command_gets_noauth_and_nothing_reaches_a_shard() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--requirepass", "pw"]);
    // Wait for the proxy to be up and to have made its own start-up request (INFO server, to
    // learn the shards' version), then reset the shards' command statistics.
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"PING"]), NOAUTH);
    wait_until(
        "the proxy's start-up INFO to reach a shard",
        Duration::from_secs(5),
        || {
            shards.iter().any(|s| {
                let list: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query(&mut s.client())
                    .unwrap();
                list.lines().any(|l| l.contains(" cmd=info "))
            })
        },
    );
    let commands: Vec<Value> = redis::cmd("COMMAND")
        .query(&mut shards[0].client())
        .unwrap();
    for s in &shards {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut s.client())
            .unwrap();
    }
    let mut requests: Vec<Vec<Vec<u8>>> = Vec::new();
    for cmd in &commands {
        let Value::Array(info) = cmd else { panic!() };
        let name = text(&info[0]);
        let Value::Int(arity) = info[1] else { panic!() };
        if matches!(name.as_str(), "auth" | "hello" | "quit" | "reset") {
            continue;
        }
        let subs = match info.get(9) {
            Some(Value::Array(s)) if !s.is_empty() => s.clone(),
            _ => Vec::new(),
        };
        if subs.is_empty() {
            let mut args = vec![name.clone().into_bytes()];
            args.extend(filler(arity, 1));
            requests.push(args);
        }
        for sub in subs {
            let Value::Array(si) = sub else { panic!() };
            let full = text(&si[0]);
            let Value::Int(sarity) = si[1] else { panic!() };
            let (container, subname) = full.split_once('|').unwrap();
            let mut args = vec![container.as_bytes().to_vec(), subname.as_bytes().to_vec()];
            args.extend(filler(sarity, 2));
            requests.push(args);
        }
    }
    assert!(requests.len() > 300, "all commands and subcommands");
    let wire: Vec<u8> = requests
        .iter()
        .flat_map(|a| resp(&a.iter().map(Vec::as_slice).collect::<Vec<_>>()))
        .collect();
    c.send(&wire);
    let replies = c.read_replies(requests.len());
    for (req, rep) in requests.iter().zip(&replies) {
        assert_eq!(
            String::from_utf8_lossy(rep),
            String::from_utf8_lossy(NOAUTH),
            "{:?}",
            String::from_utf8_lossy(&req.join(&b' '))
        );
    }
    for s in &shards {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut s.client())
            .unwrap();
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
            let name = line.split(':').next().unwrap();
            assert!(
                matches!(name, "cmdstat_config|resetstat" | "cmdstat_info"),
                "a command reached a shard before AUTH: {line}"
            );
        }
    }
    // QUIT and RESET work before AUTH.
    assert_eq!(c.call(&[b"RESET"]), b"+RESET\r\n");
    assert_eq!(c.call(&[b"QUIT"]), b"+OK\r\n");
    assert!(c.is_closed());
}

#[test]
fn unauthenticated_clients_get_redis_pre_auth_limits() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--requirepass", "pw"]);
    let mut c = proxy.raw();
    c.roundtrip(
        b"*11\r\n",
        b"-ERR Protocol error: unauthenticated multibulk length\r\n",
    );
    assert!(c.is_closed());
    let mut c = proxy.raw();
    c.roundtrip(
        b"*1\r\n$16385\r\n",
        b"-ERR Protocol error: unauthenticated bulk length\r\n",
    );
    assert!(c.is_closed());
    // After AUTH the limits are Redis's normal ones.
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"AUTH", b"pw"]), b"+OK\r\n");
    let big = vec![b'v'; 20000];
    let args: Vec<&[u8]> = vec![
        b"MSET", b"a", &big, b"b", b"1", b"c", b"1", b"d", b"1", b"e", b"1", b"f", b"1",
    ];
    assert_eq!(c.call(&args), b"+OK\r\n");
}

#[test]
fn auth_semantics_match_redis() {
    let dir = support::tls::temp_dir("auth");
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        r#"
requirepass = "defaultpw"
[[users]]
name = "alice"
password = "alicepw"
keys = ["*"]
[[users]]
name = "bob"
# sha256("bobpw")
password_sha256 = "fd4e6e5e1fc8f6bb75ff1a3ab6cfd27b4c5fe1bf9e3e6a43f34eef5a0c4d6c4e"
keys = ["*"]
[[users]]
name = "carol"
password = "carolpw"
enabled = false
keys = ["*"]
"#,
    )
    .unwrap();
    // Fix up bob's digest with the real SHA-256 (computed, not trusted from the literal).
    let digest: String = slotgate::auth::sha256(b"bobpw")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "fd4e6e5e1fc8f6bb75ff1a3ab6cfd27b4c5fe1bf9e3e6a43f34eef5a0c4d6c4e",
        &digest,
    );
    std::fs::write(&cfg, text).unwrap();
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"GET", b"k"]), NOAUTH);
    assert_eq!(
        c.call(&[b"HELLO", b"3"]),
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n"
    );
    assert_eq!(c.call(&[b"AUTH", b"nope"]), WRONGPASS);
    assert_eq!(c.call(&[b"AUTH", b"alice", b"defaultpw"]), WRONGPASS);
    assert_eq!(
        c.call(&[b"AUTH", b"carol", b"carolpw"]),
        WRONGPASS,
        "disabled user"
    );
    assert_eq!(
        c.call(&[b"AUTH", b"a", b"b", b"c"]),
        b"-ERR syntax error\r\n"
    );
    assert_eq!(c.call(&[b"AUTH", b"defaultpw"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"ACL", b"WHOAMI"]), b"$7\r\ndefault\r\n");
    // A failed AUTH after a successful one keeps the identity.
    assert_eq!(c.call(&[b"AUTH", b"alice", b"wrong"]), WRONGPASS);
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(c.call(&[b"ACL", b"WHOAMI"]), b"$7\r\ndefault\r\n");
    // Re-AUTH switches identity (the token-refresh pattern).
    assert_eq!(c.call(&[b"AUTH", b"alice", b"alicepw"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"ACL", b"WHOAMI"]), b"$5\r\nalice\r\n");
    assert_eq!(
        c.call(&[b"AUTH", b"bob", b"bobpw"]),
        b"+OK\r\n",
        "hashed password"
    );
    assert_eq!(c.call(&[b"ACL", b"WHOAMI"]), b"$3\r\nbob\r\n");
    // RESET goes back to the default user, which needs a password.
    assert_eq!(c.call(&[b"RESET"]), b"+RESET\r\n");
    assert_eq!(c.call(&[b"PING"]), NOAUTH);
    // HELLO 3 AUTH authenticates and switches protocol at once.
    let r = c.call(&[
        b"HELLO", b"3", b"AUTH", b"alice", b"alicepw", b"SETNAME", b"app",
    ]);
    assert!(r.starts_with(b"%7\r\n"), "{}", String::from_utf8_lossy(&r));
    assert_eq!(c.call(&[b"CLIENT", b"GETNAME"]), b"$3\r\napp\r\n");
    assert_eq!(c.call(&[b"GET", b"nosuch"]), b"_\r\n");
    let r = c.call(&[b"HELLO", b"2", b"AUTH", b"alice", b"bad"]);
    assert_eq!(r, WRONGPASS);
    let list = c.call(&[b"CLIENT", b"INFO"]);
    assert!(String::from_utf8_lossy(&list).contains("user=alice"));
}

#[test]
fn brute_force_closes_the_connection_and_never_logs_the_password() {
    let dir = support::tls::temp_dir("brute");
    let log = dir.join("slotgate.log");
    let shard = RedisServer::start();
    let proxy = Slotgate::start_logged(
        &[&shard],
        &["--requirepass", "right-one", "--max-auth-failures", "10"],
        Some(&log),
    );
    let mut c = proxy.raw();
    for i in 0..9 {
        let guess = format!("guess-{i}-secretish");
        assert_eq!(c.call(&[b"AUTH", guess.as_bytes()]), WRONGPASS);
    }
    // A success resets the count of consecutive failures.
    assert_eq!(c.call(&[b"AUTH", b"right-one"]), b"+OK\r\n");
    for i in 0..9 {
        let guess = format!("again-{i}-secretish");
        assert_eq!(c.call(&[b"AUTH", guess.as_bytes()]), WRONGPASS);
    }
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n", "still open after 9");
    c.send(&resp(&[b"AUTH", b"last-secretish"]));
    assert_eq!(c.read_replies(1)[0], WRONGPASS);
    assert!(c.is_closed(), "closed after the 10th consecutive failure");

    let mut admin = proxy.raw();
    assert_eq!(admin.call(&[b"AUTH", b"right-one"]), b"+OK\r\n");
    let info = admin.call(&[b"INFO", b"stats"]);
    assert!(
        String::from_utf8_lossy(&info).contains("auth_failures:19"),
        "{}",
        String::from_utf8_lossy(&info)
    );
    drop(admin);
    drop(proxy);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("AUTH failed"),
        "failures are logged: {logged}"
    );
    assert!(
        !logged.contains("secretish"),
        "no password in the log: {logged}"
    );
    assert!(
        !logged.contains("right-one"),
        "no password in the log: {logged}"
    );
}

/// Failed AUTHs are also counted per source address, over all its connections (issue 14.12):
/// past the budget, the address waits (1 s, doubling) before its next AUTH is even checked,
/// even with the right password; other clients already in are not affected.
#[test]
fn auth_failures_across_connections_make_the_address_wait() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(
        &[&shard],
        &[
            "--requirepass",
            "right",
            "--max-auth-failures-per-address",
            "5",
        ],
    );
    let mut inside = proxy.raw();
    assert_eq!(inside.call(&[b"AUTH", b"right"]), b"+OK\r\n");
    // Five connections, one wrong guess each: within the budget.
    for i in 0..5 {
        let guess = format!("guess-{i}");
        assert_eq!(proxy.raw().call(&[b"AUTH", guess.as_bytes()]), WRONGPASS);
    }
    // The sixth puts the address over it.
    assert_eq!(proxy.raw().call(&[b"AUTH", b"guess-5"]), WRONGPASS);
    let mut c = proxy.raw();
    assert_eq!(
        c.call(&[b"AUTH", b"right"]),
        b"-ERR too many failed AUTH attempts from this address: retry in 1 s\r\n"
    );
    let hello = c.call(&[b"HELLO", b"3", b"AUTH", b"default", b"right"]);
    assert!(hello.starts_with(b"-ERR too many failed AUTH"), "{hello:?}");
    assert_eq!(
        inside.call(&[b"PING"]),
        b"+PONG\r\n",
        "clients already in are not affected"
    );
    // A connection logged in already may AUTH again (a token refresh) while its address
    // waits.
    assert_eq!(inside.call(&[b"AUTH", b"right"]), b"+OK\r\n");
    // Held-back attempts count as the connection's failures: it is closed after 10.
    for _ in 0..8 {
        let r = c.call(&[b"AUTH", b"right"]);
        assert!(r.starts_with(b"-ERR too many failed AUTH"), "{r:?}");
    }
    assert!(c.is_closed(), "closed after 10 held-back attempts");
    // Once the wait is over, the right password works again.
    wait_until("the address's wait to end", Duration::from_secs(5), || {
        proxy.raw().call(&[b"AUTH", b"right"]) == b"+OK\r\n"
    });
}

/// A brute force over many connections logs about one warning a second, each with the count
/// of failures it stands for, instead of one line per failure (issue 14.12).
#[test]
fn auth_failure_warnings_are_rate_limited() {
    let log = support::tls::temp_dir("auth-log").join("slotgate.log");
    let shard = RedisServer::start();
    let proxy = Slotgate::start_logged(
        &[&shard],
        &[
            "--requirepass",
            "right",
            "--max-auth-failures-per-address",
            "0",
        ],
        Some(&log),
    );
    let started = Instant::now();
    let mut c = proxy.raw();
    for i in 0..600 {
        if i % 9 == 8 {
            c = proxy.raw(); // the connection closes after 10 consecutive failures
        }
        assert_eq!(c.call(&[b"AUTH", format!("g{i}").as_bytes()]), WRONGPASS);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let mut admin = proxy.raw();
    assert_eq!(admin.call(&[b"AUTH", b"right"]), b"+OK\r\n");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("AUTH failed")).count() as u64;
    assert!(
        (1..=seconds + 1).contains(&lines),
        "{lines} warnings for 600 failures in {seconds} s:\n{text}"
    );
    // The next line that gets through counts the failures left out.
    wait_until(
        "a warning counting the others",
        Duration::from_secs(5),
        || {
            let mut c = proxy.raw();
            assert_eq!(c.call(&[b"AUTH", b"late"]), WRONGPASS);
            let text = std::fs::read_to_string(&log).unwrap();
            text.lines()
                .any(|l| l.contains("more failed AUTHs not logged since the last line"))
        },
    );
}

#[test]
fn key_patterns_and_command_categories_are_enforced_before_forwarding() {
    let dir = support::tls::temp_dir("perms");
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        r#"
requirepass = "adminpw"
[[users]]
name = "tenantA"
password = "a"
keys = ["tenantA:*"]
read_keys = ["shared:*"]
commands = ["+@all", "-@dangerous"]
[[users]]
name = "reader"
password = "r"
keys = ["*"]
commands = ["+@read", "+@connection"]
"#,
    )
    .unwrap();
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--config", cfg.to_str().unwrap()]);
    let mut admin = proxy.raw();
    assert_eq!(admin.call(&[b"AUTH", b"adminpw"]), b"+OK\r\n");
    assert_eq!(admin.call(&[b"SET", b"shared:cfg", b"v"]), b"+OK\r\n");
    assert_eq!(admin.call(&[b"SET", b"shared:{t}src", b"s"]), b"+OK\r\n");
    assert_eq!(admin.call(&[b"SET", b"tenantB:x", b"b"]), b"+OK\r\n");

    let mut a = proxy.raw();
    assert_eq!(a.call(&[b"AUTH", b"tenantA", b"a"]), b"+OK\r\n");
    assert_eq!(a.call(&[b"SET", b"tenantA:1", b"1"]), b"+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"tenantA:1"]), b"$1\r\n1\r\n");
    assert_eq!(
        a.call(&[b"GET", b"shared:cfg"]),
        b"$1\r\nv\r\n",
        "read-only pattern"
    );
    assert_eq!(a.call(&[b"SET", b"shared:cfg", b"x"]), NOPERM_KEYS);
    assert_eq!(a.call(&[b"GET", b"tenantB:x"]), NOPERM_KEYS);
    // Multi-key and scatter commands check every key; nothing happens when one is denied.
    let many: Vec<String> = (0..30).map(|i| format!("tenantA:m{i}")).collect();
    let mut mset: Vec<&[u8]> = vec![b"MSET"];
    for k in &many {
        mset.push(k.as_bytes());
        mset.push(b"v");
    }
    mset.push(b"tenantB:x");
    mset.push(b"stolen");
    assert_eq!(a.call(&mset), NOPERM_KEYS);
    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    mget.extend(many.iter().map(|k| k.as_bytes()));
    mget.push(b"tenantB:x");
    assert_eq!(a.call(&mget), NOPERM_KEYS);
    assert_eq!(a.call(&[b"DEL", b"tenantA:1", b"tenantB:x"]), NOPERM_KEYS);
    assert_eq!(
        a.call(&[b"COPY", b"shared:{t}src", b"tenantA:{t}copy"]),
        b":1\r\n",
        "read the source, write the destination"
    );
    assert_eq!(
        admin.call(&[b"GET", b"tenantB:x"]),
        b"$1\r\nb\r\n",
        "the denied MSET/DEL changed nothing"
    );
    assert_eq!(admin.call(&[b"EXISTS", b"tenantA:m0"]), b":0\r\n");
    assert_eq!(
        a.call(&[b"KEYS", b"*"]),
        b"-NOPERM this user has no permissions to run the 'keys' command\r\n"
    );
    assert_eq!(
        a.call(&[b"FLUSHALL"]),
        b"-NOPERM this user has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(
        a.call(&[b"CONFIG", b"SET", b"hz", b"20"]),
        b"-NOPERM this user has no permissions to run the 'config|set' command\r\n"
    );
    assert_eq!(
        admin.call(&[b"DBSIZE"]),
        b":5\r\n",
        "KEYS/FLUSHALL never ran"
    );

    let mut r = proxy.raw();
    assert_eq!(r.call(&[b"AUTH", b"reader", b"r"]), b"+OK\r\n");
    assert_eq!(r.call(&[b"GET", b"tenantB:x"]), b"$1\r\nb\r\n");
    assert_eq!(
        r.call(&[b"SET", b"tenantB:x", b"no"]),
        b"-NOPERM this user has no permissions to run the 'set' command\r\n"
    );
    assert_eq!(r.call(&[b"PING"]), b"+PONG\r\n", "@connection");
}

#[test]
fn maxclients_rejects_with_redis_error() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--maxclients", "2"]);
    let mut a = proxy.raw();
    let mut b = proxy.raw();
    assert_eq!(a.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(b.call(&[b"PING"]), b"+PONG\r\n");
    let mut third = proxy.raw();
    assert_eq!(
        third.read_exact_n(b"-ERR max number of clients reached\r\n".len()),
        b"-ERR max number of clients reached\r\n"
    );
    assert!(third.is_closed());
    drop(a);
    // The place is freed when a client leaves.
    wait_until(
        "the place to be freed (a new client's PING to get +PONG)",
        Duration::from_secs(3),
        || {
            let mut c = proxy.raw();
            c.send(&resp(&[b"PING"]));
            let mut buf = [0u8; 64];
            let n = c.stream.read(&mut buf).unwrap_or(0);
            &buf[..n] == b"+PONG\r\n"
        },
    );
    assert_eq!(b.call(&[b"PING"]), b"+PONG\r\n");
}

#[test]
fn idle_clients_are_closed_after_the_idle_timeout() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--idle-timeout", "1s"]);
    let mut c = proxy.raw();
    // A client active more often than the timeout stays, however long it lives. (Paced at a
    // tenth of the timeout, so that a loaded machine's stalls do not make it idle.)
    for _ in 0..8 {
        assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
        // Needed: the client must really stay idle (for less than the timeout) between PINGs.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    let start = Instant::now();
    assert!(c.is_closed(), "closed when idle");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    // Without the option (Redis's default), an idle client stays.
    let proxy = Slotgate::start(&[&shard]);
    let mut c = proxy.raw();
    c.stream
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    assert!(!c.is_closed());
}

#[test]
fn check_config_and_info_never_show_passwords() {
    let dir = support::tls::temp_dir("secrets");
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        "[upstream]\npassword = \"upstream-sekrit\"\n[[users]]\nname = \"u\"\npassword = \"user-sekrit\"\nkeys = [\"*\"]\n",
    )
    .unwrap();
    let (ok, all) = check_config(&[
        "--config",
        cfg.to_str().unwrap(),
        "--requirepass",
        "default-sekrit",
        "--shard",
        "127.0.0.1:1",
    ]);
    assert!(ok, "{all}");
    assert!(!all.contains("sekrit"), "{all}");
    assert!(all.contains("authentication required"), "{all}");
}
