//! What an operator relies on around the data path: the listen backlog (issue 14.11).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::*;

/// Connections the kernel completes for a listener whose process is stopped (so nothing is
/// accepted), up to `most`: the accept queue's length plus one.
fn connections_queued_while_stopped(proxy: &Slotgate, most: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let mut queued = Vec::new();
    proxy.signal("STOP");
    while queued.len() < most {
        // Beyond the queue the kernel drops the SYN: the connect does not complete.
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
    }
    proxy.signal("CONT");
    queued
}

#[test]
fn the_accept_queue_is_tcp_backlog_long() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--tcp-backlog", "20"]);
    let queued = connections_queued_while_stopped(&proxy, 100);
    assert_eq!(queued.len(), 21, "a backlog of 20 queues 21 connections");
    drop(queued);

    // The default is Redis's 511.
    let proxy = Slotgate::start_with(&[&shard], &[]);
    let queued = connections_queued_while_stopped(&proxy, 400);
    assert_eq!(
        queued.len(),
        400,
        "the default backlog queues 400 connections"
    );
    // Once running again, slotgate serves them all.
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
}

// --- Hot reload (issue 14.10) ---

const ADMIN: &str = "[[users]]\nname = \"admin\"\npassword = \"a1\"\n\n";

fn auth(c: &mut RawConn, user: &str, pw: &str) -> Vec<u8> {
    c.call(&[b"AUTH", user.as_bytes(), pw.as_bytes()])
}

fn app_user(password: &str, keys: &str) -> String {
    format!(
        "[[users]]\nname = \"app\"\npassword = \"{password}\"\nkeys = [{keys}]\n\
         commands = [\"+@all\", \"-@dangerous\"]\n\n"
    )
}

#[test]
fn sighup_reloads_users_and_permissions_and_clients_stay_connected() {
    let shard = RedisServer::start();
    let file = config_file(
        "reload-users",
        &format!("{ADMIN}{}", app_user("p1", "\"app:*\"")),
    );
    let mut proxy = Slotgate::start_with(
        &[&shard],
        &["--config", file.to_str().unwrap(), "--workers", "2"],
    );
    let mut app = proxy.raw();
    assert_eq!(auth(&mut app, "app", "p1"), b"+OK\r\n");
    assert_eq!(app.call(&[b"GET", b"app:1"]), b"$-1\r\n");
    assert!(app.call(&[b"GET", b"other:1"]).starts_with(b"-NOPERM"));

    // More keys, a new password, a new user.
    std::fs::write(
        &file,
        format!(
            "{ADMIN}{}[[users]]\nname = \"new\"\npassword = \"n1\"\n",
            app_user("p2", "\"app:*\", \"other:*\"")
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    wait_until("the new user to exist", Duration::from_secs(5), || {
        auth(&mut proxy.raw(), "new", "n1") == b"+OK\r\n"
    });
    assert!(proxy.is_running(), "SIGHUP does not end slotgate");
    // The connected client has its new rights once its worker has taken the reload up (a
    // SIGHUP has no reply to wait for; the new user's check may have run on the other
    // worker), and was not disconnected.
    wait_until(
        "the connected client's new rights",
        Duration::from_secs(5),
        || app.call(&[b"GET", b"other:1"]) == b"$-1\r\n",
    );
    // New connections need the new password.
    assert!(auth(&mut proxy.raw(), "app", "p1").starts_with(b"-WRONGPASS"));
    assert_eq!(auth(&mut proxy.raw(), "app", "p2"), b"+OK\r\n");

    // A removed user's clients are closed (as Redis does for a deleted ACL user), even idle.
    std::fs::write(&file, ADMIN).unwrap();
    proxy.signal("HUP");
    assert!(app.is_closed(), "the removed user's client is closed");
    assert!(auth(&mut proxy.raw(), "app", "p2").starts_with(b"-WRONGPASS"));
}

#[test]
fn sighup_without_a_config_file_or_tls_keeps_slotgate_running() {
    let shard = RedisServer::start();
    let mut proxy = Slotgate::start_with(&[&shard], &[]);
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    proxy.signal("HUP");
    proxy.signal("HUP");
    // Still serving the same connection and new ones.
    assert_eq!(c.call(&[b"GET", b"k"]), b"$1\r\nv\r\n");
    assert_eq!(proxy.raw().call(&[b"GET", b"k"]), b"$1\r\nv\r\n");
    assert!(proxy.is_running());
}

#[test]
fn slotgate_reload_answers_once_applied_and_refuses_invalid_files() {
    let shard = RedisServer::start();
    let file = config_file(
        "reload-cmd",
        &format!("{ADMIN}{}", app_user("p1", "\"app:*\"")),
    );
    let proxy = Slotgate::start_with(
        &[&shard],
        &["--config", file.to_str().unwrap(), "--workers", "2"],
    );
    let mut admin = proxy.raw();
    assert_eq!(auth(&mut admin, "admin", "a1"), b"+OK\r\n");
    let mut app = proxy.raw();
    assert_eq!(auth(&mut app, "app", "p1"), b"+OK\r\n");
    // A restricted user may not reload (it is @admin and @dangerous).
    assert!(app.call(&[b"SLOTGATE.RELOAD"]).starts_with(b"-NOPERM"));

    // An invalid file: the error, and the running configuration stays.
    std::fs::write(&file, "maxclients = \"many\"\n").unwrap();
    let reply = String::from_utf8(admin.call(&[b"SLOTGATE.RELOAD"])).unwrap();
    assert!(
        reply.starts_with("-ERR reload failed, the running configuration stays: "),
        "{reply}"
    );
    assert_eq!(auth(&mut proxy.raw(), "app", "p1"), b"+OK\r\n");

    // A valid one is in force on every worker when the reply comes: no polling needed.
    std::fs::write(&file, format!("{ADMIN}{}", app_user("p9", "\"app:*\""))).unwrap();
    assert_eq!(admin.call(&[b"SLOTGATE.RELOAD"]), b"+OK\r\n");
    for _ in 0..4 {
        let mut c = proxy.raw();
        assert_eq!(auth(&mut c, "app", "p9"), b"+OK\r\n");
    }
    // The restricted client is still connected and still restricted.
    assert!(app.call(&[b"GET", b"other"]).starts_with(b"-NOPERM"));
}

#[test]
fn reload_changes_rules_limits_and_the_log_level() {
    use support::origin::{Origin, Reply};
    let shard = RedisServer::start();
    let origin = Origin::start(|_| Reply::ok("loaded"));
    let log = support::tls::temp_dir("reload-rules").join("slotgate.log");
    let file = config_file("reload-rules", "log_level = \"warn\"\n");
    let path = file.to_str().unwrap();
    let proxy = Slotgate::start_logged(
        &[&shard],
        &["--config", path, LOG_LEVEL_FROM_FILE],
        Some(&log),
    );
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"GET", b"label:1"]), b"$-1\r\n", "no rule yet");
    let mut second = proxy.raw();
    assert_eq!(second.call(&[b"PING"]), b"+PONG\r\n");

    std::fs::write(
        &file,
        format!(
            "log_level = \"info\"\nmaxclients = 2\n\n[[readthrough]]\nprefix = \"label:\"\n\
             origin = \"{}\"\n",
            origin.url("/labels/{rest}")
        ),
    )
    .unwrap();
    assert_eq!(c.call(&[b"SLOTGATE.RELOAD"]), b"+OK\r\n");
    // The new rule loads a miss; the new limit refuses a third client; the log, now at
    // info, shows the reload.
    assert_eq!(c.call(&[b"GET", b"label:1"]), b"$6\r\nloaded\r\n");
    assert_eq!(origin.requests(), 1);
    let mut third = proxy.raw();
    assert_eq!(
        third.read_replies(1),
        vec![b"-ERR max number of clients reached\r\n".to_vec()]
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("configuration reloaded (SLOTGATE.RELOAD): changed: read-through rules, limits, log level"),
        "{text}"
    );
    // Back to no rule: the key is a plain miss again (the stored value aside).
    std::fs::write(&file, "log_level = \"info\"\n").unwrap();
    assert_eq!(c.call(&[b"SLOTGATE.RELOAD"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"label:2"]), b"$-1\r\n");
    assert_eq!(origin.requests(), 1);
}

/// A key whose slot is in the upper half (owned by the second of two evenly split shards).
fn upper_half_key(i: usize) -> String {
    (0..)
        .map(|n| format!("k{i}-{n}"))
        .find(|k| crc16(k.as_bytes()) % 16384 >= 8192)
        .unwrap()
}

fn shard_layout(shards: &[&RedisServer]) -> String {
    shards
        .iter()
        .map(|s| format!("[[shards]]\naddr = \"{}\"\n", s.addr()))
        .collect()
}

fn connected_clients(shard: &RedisServer) -> usize {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut shard.client())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn reload_moves_to_a_new_shard_layout_and_drains_the_removed_shard() {
    let (a, b, c) = (
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    );
    let file = config_file("reload-layout", &shard_layout(&[&a, &b]));
    let admin_port = free_port();
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let proxy = Slotgate::start_with(
        &[],
        &[
            "--config",
            file.to_str().unwrap(),
            "--op-timeout",
            "10s",
            "--admin-listen",
            &admin_addr,
        ],
    );
    wait_for_own_port(admin_port, proxy.pid());
    let mut client = proxy.raw();
    let key = upper_half_key(0);
    assert_eq!(client.call(&[b"SET", key.as_bytes(), b"on-b"]), b"+OK\r\n");
    let on_b: Option<String> = redis::cmd("GET").arg(&key).query(&mut b.client()).unwrap();
    assert_eq!(on_b.as_deref(), Some("on-b"));
    let mut subscriber = proxy.raw();
    subscriber.call(&[b"SUBSCRIBE", b"news"]);

    // A request in flight to B when the layout changes.
    b.pause();
    let mut waiting = proxy.raw();
    waiting.send(&resp(&[b"GET", key.as_bytes()]));
    let label = format!(
        "slotgate_shard_inflight_requests{{shard=\"{}\"}} 1",
        b.addr()
    );
    wait_until(
        "the GET to be in flight to B",
        Duration::from_secs(5),
        || http_get(admin_port, "/metrics").1.contains(&label),
    );
    std::fs::write(&file, shard_layout(&[&a, &c])).unwrap();
    let mut admin = proxy.raw();
    assert_eq!(admin.call(&[b"SLOTGATE.RELOAD"]), b"+OK\r\n");

    // New requests route by the new map: the upper half is C's now.
    let key2 = upper_half_key(1);
    assert_eq!(client.call(&[b"SET", key2.as_bytes(), b"on-c"]), b"+OK\r\n");
    let on_c: Option<String> = redis::cmd("GET").arg(&key2).query(&mut c.client()).unwrap();
    assert_eq!(on_c.as_deref(), Some("on-c"));
    assert_eq!(
        client.call(&[b"GET", key.as_bytes()]),
        b"$-1\r\n",
        "B is no longer asked"
    );
    // The subscriber is closed (it subscribes again, on the new layout).
    assert!(subscriber.is_closed());

    // B comes back: the request it owed is answered, then slotgate's connections to it go.
    b.resume();
    assert_eq!(waiting.read_replies(1), vec![b"$4\r\non-b\r\n".to_vec()]);
    wait_until(
        "slotgate's connections to the removed shard to close",
        Duration::from_secs(10),
        || connected_clients(&b) == 1, // the probe itself
    );
    assert_eq!(
        client.call(&[b"PING"]),
        b"+PONG\r\n",
        "clients stayed connected"
    );
}

/// Clients that leave while on a dedicated connection (subscribed, blocked, in MULTI) make
/// slotgate close that connection: not a shard failure, so no WARN and no disconnect or error
/// counted (issue 13.4).
#[test]
fn clients_leaving_dedicated_connections_are_not_shard_failures() {
    let shard = RedisServer::start();
    let log = support::tls::temp_dir("leaving").join("slotgate.log");
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let proxy = Slotgate::start_logged(&[&shard], &["--admin-listen", &admin], Some(&log));
    wait_for_own_port(admin_port, proxy.pid());
    let before = (
        metric_sum(admin_port, "slotgate_shard_disconnects_total"),
        metric_sum(admin_port, "slotgate_shard_errors_total"),
    );
    for i in 0..50 {
        let mut c = proxy.raw();
        c.call(&[b"SUBSCRIBE", format!("ch{i}").as_bytes()]);
    }
    let blocked: Vec<RawConn> = (0..10)
        .map(|_| {
            let mut c = proxy.raw();
            c.send(&resp(&[b"BLPOP", b"nothing", b"0"]));
            c
        })
        .collect();
    wait_until(
        "the ten BLPOPs to block on the shard",
        Duration::from_secs(5),
        || clients_running(&shard, "blpop") == 10,
    );
    drop(blocked);
    for _ in 0..10 {
        let mut c = proxy.raw();
        assert_eq!(c.call(&[b"MULTI"]), b"+OK\r\n");
        assert_eq!(c.call(&[b"SET", b"k", b"v"]), b"+QUEUED\r\n");
    }
    // Every one of those connections has been closed on the shard's side too.
    wait_until(
        "the shard to see only the shared connection and the probe",
        Duration::from_secs(10),
        || connected_clients(&shard) <= 3,
    );
    let after = (
        metric_sum(admin_port, "slotgate_shard_disconnects_total"),
        metric_sum(admin_port, "slotgate_shard_errors_total"),
    );
    assert_eq!(after, before);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("shard connection lost"), "{text}");
}

/// A reload that only moves slot ranges (same shards) routes by the new ranges, and closes
/// the clients whose transaction, blocking command or subscriptions sit on the old owner
/// (adversarial review: an EXEC after the reload wrote where GET no longer looked, and an
/// SSUBSCRIBE stayed deaf).
#[test]
fn a_slot_range_change_closes_pinned_clients_and_routes_by_the_new_ranges() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let layout = |split: u32| {
        format!(
            "[[shards]]\naddr = \"{}\"\nslots = \"0-{split}\"\n[[shards]]\naddr = \"{}\"\nslots = \"{}-16383\"\n",
            a.addr(),
            b.addr(),
            split + 1
        )
    };
    let file = config_file("reload-slots", &layout(8191));
    let proxy = Slotgate::start_with(&[], &["--config", file.to_str().unwrap()]);
    // A key in the slots that move from B to A.
    let key = (0..)
        .map(|n| format!("moving{n}"))
        .find(|k| (8192..=16000).contains(&(crc16(k.as_bytes()) % 16384)))
        .unwrap();
    let mut watching = proxy.raw();
    assert_eq!(watching.call(&[b"WATCH", key.as_bytes()]), b"+OK\r\n");
    let mut blocked = proxy.raw();
    blocked.send(&resp(&[b"BLPOP", key.as_bytes(), b"0"]));
    wait_until("the BLPOP to block on B", Duration::from_secs(5), || {
        clients_running(&b, "blpop") == 1
    });
    let mut sharded = proxy.raw();
    sharded.call(&[b"SSUBSCRIBE", key.as_bytes()]);
    let mut plain = proxy.raw();
    assert_eq!(plain.call(&[b"PING"]), b"+PONG\r\n");

    std::fs::write(&file, layout(16000)).unwrap();
    assert_eq!(plain.call(&[b"SLOTGATE.RELOAD"]), b"+OK\r\n");
    assert!(sharded.is_closed(), "the sharded subscriber is closed");
    assert!(blocked.is_closed(), "the blocked client is closed");
    // The watching client is closed at its next command, before it runs.
    watching.send(&resp(&[b"MULTI"]));
    assert!(watching.is_closed(), "the watching client is closed");
    // New requests go to the new owner; the other client stayed.
    assert_eq!(plain.call(&[b"SET", key.as_bytes(), b"v"]), b"+OK\r\n");
    let on_a: Option<String> = redis::cmd("GET").arg(&key).query(&mut a.client()).unwrap();
    assert_eq!(on_a.as_deref(), Some("v"));
}

/// SLOWLOG through slotgate (issue 13.3): every shard's entries, newest first, each with an
/// id unique over the shards and its shard's address in place of the client address;
/// LEN sums, RESET empties them all.
#[test]
fn slowlog_is_gathered_from_every_shard() {
    let shards: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start_with(&["--slowlog-log-slower-than", "0"]))
        .collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &[]);
    let mut c = proxy.client();
    for i in 0..40 {
        let _: () = redis::cmd("SET")
            .arg(format!("slow{i}"))
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut c).unwrap();
    assert!(len >= 40, "{len}");
    type Entry = (i64, i64, i64, Vec<String>, String, String);
    let recent: Vec<Entry> = redis::cmd("SLOWLOG").arg("GET").query(&mut c).unwrap();
    assert_eq!(recent.len(), 10, "10 by default, as in Redis");
    let all: Vec<Entry> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert!(all.len() as i64 >= 40);
    // Newest first, ids unique, every entry names its shard, both shards present.
    assert!(all.windows(2).all(|w| w[0].1 >= w[1].1), "newest first");
    let mut ids: Vec<i64> = all.iter().map(|e| e.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "unique ids");
    for s in &shards {
        assert!(
            all.iter().any(|e| e.4 == s.addr()),
            "entries of {}",
            s.addr()
        );
    }
    assert!(all.iter().all(|e| shards.iter().any(|s| e.4 == s.addr())));
    assert!(
        all.iter()
            .any(|e| e.3.first().map(String::as_str) == Some("SET"))
    );
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut c).unwrap();
    let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut c).unwrap();
    assert!(len <= 2, "emptied on every shard: {len}");
}

/// LATENCY through slotgate (issue 13.3): LATEST names each event with its shard, HISTORY
/// merges the shards' samples in time order, DOCTOR gives each shard's report, RESET sums.
#[test]
fn latency_is_gathered_from_every_shard() {
    let shards: Vec<RedisServer> = (0..2)
        .map(|_| {
            RedisServer::start_with(&[
                "--latency-monitor-threshold",
                "1",
                "--enable-debug-command",
                "yes",
            ])
        })
        .collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &[]);
    // A latency event on each shard (directly: DEBUG is not allowed through slotgate).
    for s in &shards {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.01")
            .query(&mut s.client())
            .unwrap();
    }
    let mut c = proxy.client();
    let latest: Vec<(String, i64, i64, i64)> =
        redis::cmd("LATENCY").arg("LATEST").query(&mut c).unwrap();
    for s in &shards {
        let name = format!("{}/command", s.addr());
        assert!(
            latest.iter().any(|e| e.0 == name && e.2 >= 10),
            "{name} in {latest:?}"
        );
    }
    let history: Vec<(i64, i64)> = redis::cmd("LATENCY")
        .arg("HISTORY")
        .arg("command")
        .query(&mut c)
        .unwrap();
    assert_eq!(history.len(), 2, "one sample from each shard: {history:?}");
    assert!(history[0].0 <= history[1].0, "in time order");
    let doctor: String = redis::cmd("LATENCY").arg("DOCTOR").query(&mut c).unwrap();
    for s in &shards {
        assert!(doctor.contains(&format!("# {}", s.addr())), "{doctor}");
    }
    let reset: i64 = redis::cmd("LATENCY").arg("RESET").query(&mut c).unwrap();
    assert_eq!(reset, 2, "one event reset on each shard");
}
