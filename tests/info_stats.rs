//! INFO commandstats, errorstats, persistence and memory through slotgate (issue 13.2),
//! compared with a plain redis-server running the same commands.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;

/// The commands both sides run: successes, failures (WRONGTYPE, not an integer) and
/// rejections (arity, unknown command), from two connections (two workers on slotgate).
fn run_the_sequence(port: u16) {
    let mut a = RawConn::connect(port);
    let mut b = RawConn::connect(port);
    let cmds: &[&[&[u8]]] = &[
        &[b"SET", b"k", b"v"],
        &[b"GET", b"k"],
        &[b"GET", b"k"],
        &[b"INCR", b"k"],
        &[b"LPUSH", b"k", b"x"],
        &[b"GET"],
        &[b"NOSUCHCOMMAND", b"x"],
        &[b"CLIENT", b"NOSUCHSUB"],
        &[b"MGET", b"k", b"other", b"{k}x"],
        &[b"DEL", b"k"],
    ];
    for (i, args) in cmds.iter().enumerate() {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        c.call(args);
    }
}

/// `cmdstat_<name>` → (calls, rejected_calls, failed_calls), and `errorstat_<PREFIX>` → count,
/// for the commands of the sequence.
fn stats(c: &mut redis::Connection) -> BTreeMap<String, String> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .arg("errorstats")
        .query(c)
        .unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if let Some(cmd) = k.strip_prefix("cmdstat_") {
            if ![
                "set",
                "get",
                "incr",
                "lpush",
                "mget",
                "del",
                "client|nosuchsub",
            ]
            .contains(&cmd)
            {
                continue;
            }
            let field = |f: &str| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                    .unwrap_or("?")
                    .to_string()
            };
            // usec and usec_per_call exist and are numbers.
            assert!(field("usec").parse::<u64>().is_ok(), "{line}");
            assert!(field("usec_per_call").parse::<f64>().is_ok(), "{line}");
            out.insert(
                k.to_string(),
                format!(
                    "calls={} rejected={} failed={}",
                    field("calls"),
                    field("rejected_calls"),
                    field("failed_calls")
                ),
            );
        } else if k.starts_with("errorstat_") {
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

#[test]
fn commandstats_and_errorstats_count_like_redis() {
    let plain = RedisServer::start();
    let mut direct = plain.client();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut direct)
        .unwrap();
    run_the_sequence(plain.addr().rsplit(':').next().unwrap().parse().unwrap());
    let expected = stats(&mut direct);
    assert!(expected.contains_key("errorstat_WRONGTYPE"), "{expected:?}");

    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    let mut c = proxy.client();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
    run_the_sequence(proxy.addr().rsplit(':').next().unwrap().parse().unwrap());
    // The other worker publishes its counts once a second.
    let mut got = BTreeMap::new();
    wait_until(
        "the same statistics as Redis",
        Duration::from_secs(5),
        || {
            got = stats(&mut c);
            got == expected
        },
    );
    assert_eq!(got, expected);

    // Not in the default INFO (as in Redis), but in `all`; errorstats is.
    let default: String = redis::cmd("INFO").query(&mut c).unwrap();
    assert!(!default.contains("# Commandstats") && default.contains("# Errorstats"));
    let all: String = redis::cmd("INFO").arg("all").query(&mut c).unwrap();
    assert!(all.contains("# Commandstats") && all.contains("# Errorstats"));
    let st: redis::InfoDict = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
    assert!(st.get::<u64>("total_error_replies").unwrap() >= 5);
    // CONFIG RESETSTAT starts them over.
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
    assert!(stats(&mut c).is_empty(), "{:?}", stats(&mut c));
}

/// INFO persistence and memory sum or combine the shards' figures, as redis-py's `info()`
/// reads them.
#[test]
fn persistence_and_memory_combine_the_shards() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let mut c = proxy.client();
    for i in 0..20 {
        let _: () = redis::cmd("SET")
            .arg(format!("key{i}"))
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    let shard_sum = |field: &str| -> i64 {
        shards
            .iter()
            .map(|s| {
                let d: redis::InfoDict = redis::cmd("INFO").query(&mut s.client()).unwrap();
                d.get::<i64>(field).unwrap()
            })
            .sum()
    };
    let info: redis::InfoDict = redis::cmd("INFO").arg("persistence").query(&mut c).unwrap();
    assert_eq!(
        info.get::<i64>("rdb_changes_since_last_save"),
        Some(shard_sum("rdb_changes_since_last_save"))
    );
    assert_eq!(info.get::<i64>("loading"), Some(0));
    assert_eq!(
        info.get::<String>("rdb_last_bgsave_status").as_deref(),
        Some("ok")
    );
    assert!(info.get::<i64>("rdb_last_save_time").unwrap() > 1_600_000_000);
    let mem: redis::InfoDict = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used = mem.get::<i64>("used_memory").unwrap();
    assert!(used > 0 && mem.get::<i64>("proxy_used_memory_rss").unwrap() > 0);
    assert!(
        mem.get::<String>("used_memory_human")
            .unwrap()
            .ends_with('M')
    );
}
