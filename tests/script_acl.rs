//! Scripts and functions run with the rights of the user who sent them, not slotgate's, and
//! pub/sub channels follow the user's channel patterns (issue 14.3). Each reply is compared
//! with a plain redis-server that has the same user in its ACL.

mod support;

use support::{RawConn, RedisServer, Slotgate};

const CONFIG: &str = r#"
requirepass = "adminpw"
[[users]]
name = "tenant"
password = "tpw"
keys = ["tenantA:*"]
commands = ["+@all", "-@dangerous"]
[[users]]
name = "reader"
password = "rpw"
keys = ["t:*"]
channels = ["news.*"]
"#;

/// The same users as ACL rules of a reference redis-server (Redis 7's default is
/// `resetchannels`).
const REFERENCE_ACL: &[&[&[u8]]] = &[
    &[
        b"ACL",
        b"SETUSER",
        b"tenant",
        b"on",
        b">tpw",
        b"~tenantA:*",
        b"resetchannels",
        b"+@all",
        b"-@dangerous",
    ],
    &[
        b"ACL",
        b"SETUSER",
        b"reader",
        b"on",
        b">rpw",
        b"~t:*",
        b"resetchannels",
        b"&news.*",
        b"+@all",
    ],
];

const WIPE_LIBRARY: &[u8] = b"#!lua name=wipelib\nredis.register_function('wipe', function(keys, args) return redis.call('del', 'victim{t}a') end)";

struct Setup {
    _shards: Vec<RedisServer>,
    proxy: Slotgate,
    reference: RedisServer,
}

fn setup(extra_config: &str, shards: Vec<RedisServer>) -> Setup {
    let cfg = support::config_file("script-acl", &format!("{CONFIG}{extra_config}"));
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--config", cfg.to_str().unwrap()]);
    let reference = RedisServer::start();
    let mut r = RawConn::connect(reference.port);
    for cmd in REFERENCE_ACL {
        assert_eq!(r.call(cmd), b"+OK\r\n");
    }
    Setup {
        _shards: shards,
        proxy,
        reference,
    }
}

fn login(port: u16, user: &[u8], pw: &[u8]) -> RawConn {
    let mut c = RawConn::connect(port);
    assert_eq!(c.call(&[b"AUTH", user, pw]), b"+OK\r\n");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command as text, for assertion messages.
fn show(cmd: &[&[u8]]) -> String {
    cmd.iter().map(|a| text(a)).collect::<Vec<_>>().join(" ")
}

#[test]
fn scripts_and_functions_run_with_the_senders_rights() {
    let s = setup("", vec![RedisServer::start(), RedisServer::start()]);
    let mut admin = login(s.proxy.port, b"default", b"adminpw");
    let mut ref_admin = RawConn::connect(s.reference.port);
    for c in [&mut admin, &mut ref_admin] {
        assert_eq!(c.call(&[b"SET", b"victim{t}a", b"keep"]), b"+OK\r\n");
        assert_eq!(c.call(&[b"SET", b"victim", b"keep"]), b"+OK\r\n");
        assert_eq!(
            c.call(&[b"FUNCTION", b"LOAD", b"REPLACE", WIPE_LIBRARY]),
            b"$7\r\nwipelib\r\n"
        );
    }
    let mut t = login(s.proxy.port, b"tenant", b"tpw");
    let mut rt = login(s.reference.port, b"tenant", b"tpw");

    // Each of these is refused by Redis with the same ACL: slotgate must answer exactly so.
    let same_as_redis: &[&[&[u8]]] = &[
        &[
            b"EVAL",
            b"return redis.call('set','victim{t}a','x')",
            b"1",
            b"tenantA:{t}a",
        ],
        &[b"EVAL", b"return redis.call('keys','*')", b"0"],
        &[b"EVAL", b"return redis.call('flushall')", b"0"],
        &[b"EVAL", b"return redis.call('swapdb',0,1)", b"0"],
        &[
            b"EVAL",
            b"return redis.call('migrate','127.0.0.1',1,'tenantA:x',0,10)",
            b"0",
        ],
        &[b"EVAL_RO", b"return redis.call('get','victim')", b"0"],
        &[b"EVAL", b"return redis.call('publish','secret','x')", b"0"],
        &[b"FCALL", b"wipe", b"1", b"tenantA:{t}a"],
        &[b"FCALL", b"wipe", b"0"],
    ];
    for cmd in same_as_redis {
        let got = t.call(cmd);
        let want = rt.call(cmd);
        assert!(
            want.starts_with(b"-"),
            "the reference refuses {}: {}",
            show(cmd),
            text(&want)
        );
        assert_eq!(text(&got), text(&want), "{}", show(cmd));
    }
    // EVALSHA of a script the admin loaded runs with the tenant's rights too.
    let sha = admin.call(&[b"SCRIPT", b"LOAD", b"return redis.call('del','victim')"]);
    let sha = &sha[sha.iter().position(|&b| b == b'\n').unwrap() + 1..sha.len() - 2];
    assert_eq!(
        rt.call(&[b"SCRIPT", b"LOAD", b"return redis.call('del','victim')"])[5..45],
        *sha
    );
    let got = t.call(&[b"EVALSHA", sha, b"0"]);
    assert_eq!(text(&got), text(&rt.call(&[b"EVALSHA", sha, b"0"])));
    // Nothing of another tenant changed.
    assert_eq!(admin.call(&[b"GET", b"victim{t}a"]), b"$4\r\nkeep\r\n");
    assert_eq!(admin.call(&[b"GET", b"victim"]), b"$4\r\nkeep\r\n");

    // What slotgate refuses directly, a script may not do either (Redis would allow these:
    // the proxy's clients have database 0 only, and MOVE/SELECT are refused by slotgate).
    for script in [
        &b"return redis.call('move',KEYS[1],5)"[..],
        b"redis.call('select',5) return redis.call('set',KEYS[1],'hidden')",
    ] {
        let got = t.call(&[b"EVAL", script, b"1", b"tenantA:m"]);
        assert!(
            got.starts_with(b"-ERR The user executing the script can't run this command"),
            "{}",
            text(&got)
        );
    }

    // The tenant's own keys work, with the reply and effect Redis gives.
    let ok: &[&[u8]] = &[
        b"EVAL",
        b"redis.call('set',KEYS[1],ARGV[1]) return redis.call('get',KEYS[1])",
        b"1",
        b"tenantA:{t}a",
        b"mine",
    ];
    assert_eq!(t.call(ok), b"$4\r\nmine\r\n");
    assert_eq!(t.call(&[b"GET", b"tenantA:{t}a"]), b"$4\r\nmine\r\n");
    assert_eq!(
        t.call(&[
            b"EVAL_RO",
            b"return redis.call('get',KEYS[1])",
            b"1",
            b"tenantA:{t}a"
        ]),
        b"$4\r\nmine\r\n"
    );
    // Pipelined with plain commands, in order: each script sees the writes sent before it.
    let mut batch = Vec::new();
    for i in 0..50 {
        let v = format!("v{i}");
        batch.extend(support::resp(&[b"SET", b"tenantA:p", v.as_bytes()]));
        batch.extend(support::resp(&[
            b"EVAL",
            b"return redis.call('get',KEYS[1])",
            b"1",
            b"tenantA:p",
        ]));
    }
    t.send(&batch);
    let replies = t.read_replies(100);
    for i in 0..50 {
        assert_eq!(replies[2 * i], b"+OK\r\n");
        let v = format!("v{i}");
        assert_eq!(
            replies[2 * i + 1],
            format!("${}\r\n{v}\r\n", v.len()).into_bytes(),
            "round {i}"
        );
    }

    // RESP3 connections run scripts as the user too.
    let mut t3 = RawConn::connect(s.proxy.port);
    let hello = t3.call(&[b"HELLO", b"3", b"AUTH", b"tenant", b"tpw"]);
    assert!(hello.starts_with(b"%"), "{}", text(&hello));
    let got = t3.call(&[b"EVAL", b"return redis.call('set','victim','x')", b"0"]);
    assert!(
        got.starts_with(b"-ERR The user executing the script can't access"),
        "{}",
        text(&got)
    );

    // A script of a restricted user inside MULTI is refused, and EXEC aborts.
    assert_eq!(t.call(&[b"MULTI"]), b"+OK\r\n");
    let got = t.call(&[b"EVAL", b"return 1", b"1", b"tenantA:x"]);
    assert!(got.starts_with(b"-NOPERM"), "{}", text(&got));
    assert!(t.call(&[b"EXEC"]).starts_with(b"-EXECABORT"));

    // The unrestricted admin's scripts keep slotgate's full rights.
    assert_eq!(
        admin.call(&[
            b"EVAL",
            b"return redis.call('set','victim','changed')",
            b"0"
        ]),
        b"+OK\r\n"
    );
}

/// A user, its password and a command.
type Case = (&'static [u8], &'static [u8], &'static [&'static [u8]]);

#[test]
fn channel_permissions_match_redis() {
    let s = setup("", vec![RedisServer::start(), RedisServer::start()]);
    let cases: &[Case] = &[
        (b"tenant", b"tpw", &[b"SUBSCRIBE", b"news.eu"]),
        (b"tenant", b"tpw", &[b"PUBLISH", b"news.eu", b"x"]),
        (b"tenant", b"tpw", &[b"SPUBLISH", b"tenantA:chan", b"x"]),
        (b"reader", b"rpw", &[b"PUBLISH", b"news.eu", b"x"]),
        (b"reader", b"rpw", &[b"PUBLISH", b"sport", b"x"]),
        (b"reader", b"rpw", &[b"SPUBLISH", b"news.eu", b"x"]),
        (b"reader", b"rpw", &[b"SPUBLISH", b"t:x", b"x"]),
        (b"reader", b"rpw", &[b"SUBSCRIBE", b"news.eu", b"sport"]),
        (b"reader", b"rpw", &[b"SUBSCRIBE", b"news.eu"]),
        (b"reader", b"rpw", &[b"SSUBSCRIBE", b"news.asia"]),
        (b"reader", b"rpw", &[b"PSUBSCRIBE", b"news.e*"]),
        (b"reader", b"rpw", &[b"PSUBSCRIBE", b"news.*"]),
        // Leaving a channel needs no permission.
        (b"tenant", b"tpw", &[b"SUNSUBSCRIBE", b"tenantA:chan"]),
        (b"tenant", b"tpw", &[b"UNSUBSCRIBE", b"news.eu"]),
        (b"tenant", b"tpw", &[b"PUNSUBSCRIBE", b"news.*"]),
    ];
    for (user, pw, cmd) in cases {
        let mut p = login(s.proxy.port, user, pw);
        let mut r = login(s.reference.port, user, pw);
        let got = p.call(cmd);
        let want = r.call(cmd);
        assert_eq!(text(&got), text(&want), "{} {}", text(user), show(cmd));
    }
    // A script of the reader may publish on its channels only.
    let mut p = login(s.proxy.port, b"reader", b"rpw");
    assert_eq!(
        p.call(&[b"EVAL", b"return redis.call('publish','news.eu','x')", b"0"]),
        b":0\r\n"
    );
    let got = p.call(&[b"EVAL", b"return redis.call('publish','sport','x')", b"0"]);
    assert!(
        got.starts_with(b"-ERR The user executing the script can't publish"),
        "{}",
        text(&got)
    );
}

/// SORT's BY and GET patterns read keys no key spec names: refused, as by Redis, to a user
/// without access to every key (they read another tenant's values before), in MULTI too.
#[test]
fn sort_patterns_need_access_to_every_key() {
    let s = setup("", vec![RedisServer::start(), RedisServer::start()]);
    let mut admin = login(s.proxy.port, b"default", b"adminpw");
    let mut ref_admin = RawConn::connect(s.reference.port);
    for c in [&mut admin, &mut ref_admin] {
        assert_eq!(
            c.call(&[b"SET", b"other:{x}secret", b"TOPSECRET"]),
            b"+OK\r\n"
        );
        assert_eq!(c.call(&[b"RPUSH", b"t:{x}l", b"secret"]), b":1\r\n");
    }
    let mut t = login(s.proxy.port, b"reader", b"rpw");
    let mut rt = login(s.reference.port, b"reader", b"rpw");
    let cases: &[&[&[u8]]] = &[
        &[b"SORT", b"t:{x}l", b"BY", b"nosort", b"GET", b"other:{x}*"],
        &[b"SORT_RO", b"t:{x}l", b"BY", b"nosort", b"GET", b"#"],
        &[b"SORT", b"t:{x}l", b"BY", b"other:{x}*", b"ALPHA"],
        &[
            b"SORT",
            b"t:{x}l",
            b"LIMIT",
            b"0",
            b"1",
            b"GET",
            b"other:{x}*",
            b"STORE",
            b"t:{x}o",
        ],
        // No pattern: allowed.
        &[b"SORT", b"t:{x}l", b"BY", b"nosort", b"ALPHA"],
    ];
    for cmd in cases {
        assert_eq!(text(&t.call(cmd)), text(&rt.call(cmd)), "{}", show(cmd));
    }
    assert_eq!(t.call(&[b"MULTI"]), b"+OK\r\n");
    let got = t.call(&[b"SORT", b"t:{x}l", b"BY", b"nosort", b"GET", b"other:{x}*"]);
    assert!(
        got.starts_with(b"-ERR GET option of SORT denied due to insufficient ACL"),
        "{}",
        text(&got)
    );
    assert!(t.call(&[b"EXEC"]).starts_with(b"-EXECABORT"));
}

/// Two slotgates with different rules for the same user name (a rolling change) each get
/// their own mirror: the wider one never widens the other's scripts.
#[test]
fn mirrors_of_different_rules_do_not_overwrite_each_other() {
    let s = setup("", vec![RedisServer::start()]);
    let cfg = support::config_file(
        "script-acl-wide",
        "[[users]]\nname = \"tenant\"\npassword = \"tpw\"\nkeys = [\"*\"]\ncommands = [\"+@all\", \"-@dangerous\"]\n",
    );
    let wide = Slotgate::start_with(&[&s._shards[0]], &["--config", cfg.to_str().unwrap()]);
    let set_victim: &[&[u8]] = &[b"EVAL", b"return redis.call('set','victim','x')", b"0"];
    let mut narrow = login(s.proxy.port, b"tenant", b"tpw");
    let got = narrow.call(set_victim);
    assert!(
        got.starts_with(b"-ERR The user executing the script can't access"),
        "{}",
        text(&got)
    );
    let mut w = login(wide.port, b"tenant", b"tpw");
    assert_eq!(w.call(set_victim), b"+OK\r\n");
    let mut fresh = login(s.proxy.port, b"tenant", b"tpw");
    for c in [&mut narrow, &mut fresh] {
        let got = c.call(set_victim);
        assert!(
            got.starts_with(b"-ERR The user executing the script can't access"),
            "{}",
            text(&got)
        );
    }
}

/// When slotgate's own shard user may not manage ACL users, a restricted user's script is
/// refused with NOPERM (never run with slotgate's rights); other commands still work.
#[test]
fn scripts_are_refused_when_the_users_rights_cannot_be_set_on_the_shard() {
    let shard = RedisServer::start();
    let mut c = RawConn::connect(shard.port);
    assert_eq!(
        c.call(&[
            b"ACL",
            b"SETUSER",
            b"proxy",
            b"on",
            b">ppw",
            b"allkeys",
            b"allchannels",
            b"+@all",
            b"-acl"
        ]),
        b"+OK\r\n"
    );
    let s = setup(
        "[upstream]\nusername = \"proxy\"\npassword = \"ppw\"\n",
        vec![shard],
    );
    let mut t = login(s.proxy.port, b"tenant", b"tpw");
    let got = t.call(&[b"EVAL", b"return redis.call('set','victim','x')", b"0"]);
    assert!(
        got.starts_with(b"-NOPERM slotgate could not run this with the rights of user 'tenant'"),
        "{}",
        text(&got)
    );
    assert_eq!(t.call(&[b"SET", b"tenantA:1", b"v"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"victim"]), b"$-1\r\n");
    // The refused mirror is not retried while nobody asks for it (it used to reconnect 20
    // times a second, forever).
    let connections = |c: &mut RawConn| -> u64 {
        let info = text(&c.call(&[b"INFO", b"stats"]));
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before = connections(&mut c);
    // Needed: proving that nothing reconnects takes an interval without requests.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let after = connections(&mut c);
    assert!(
        after <= before + 1,
        "{} new connections to the shard while idle",
        after - before
    );
    // A new script tries again (and is refused again).
    let got = t.call(&[b"EVAL", b"return 1", b"0"]);
    assert!(
        got.starts_with(b"-NOPERM slotgate could not run"),
        "{}",
        text(&got)
    );
}

/// CONFIG GET answers with the first shard's configuration, minus the shards' secrets: their
/// password (from which mirror passwords are derived) and replication/TLS credentials.
#[test]
fn config_get_does_not_show_the_shards_secrets() {
    let shard =
        RedisServer::start_with(&["--requirepass", "shardsecret", "--masterauth", "replsecret"]);
    let s = setup("[upstream]\npassword = \"shardsecret\"\n", vec![shard]);
    for (user, pw) in [(&b"default"[..], &b"adminpw"[..]), (b"reader", b"rpw")] {
        for proto in [&b"2"[..], b"3"] {
            let mut c = RawConn::connect(s.proxy.port);
            let hello = c.call(&[b"HELLO", proto, b"AUTH", user, pw]);
            assert!(!hello.starts_with(b"-"), "{}", text(&hello));
            for pattern in [&b"requirepass"[..], b"masterauth", b"*", b"*pass*"] {
                let got = text(&c.call(&[b"CONFIG", b"GET", pattern]));
                assert!(
                    !got.contains("secret"),
                    "CONFIG GET {}: {got}",
                    text(pattern)
                );
            }
            let got = text(&c.call(&[b"CONFIG", b"GET", b"maxmemory-policy", b"requirepass"]));
            assert!(
                got.contains("noeviction") && !got.contains("requirepass"),
                "{got}"
            );
        }
    }
}
