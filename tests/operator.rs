//! The operator's window (issue 18): hot keys under a skewed load, big replies, the
//! permission filter, the admin endpoints (`/hotkeys`, `/bigkeys`, `/overview`, the
//! dashboard at `/`, its bearer token), every metric exported from start-up, and the Grafana
//! dashboard and alert rules checked against the metrics slotgate exports.

mod support;

use std::collections::HashMap;

use redis::Value;
use support::*;

/// Field → value of one entry of SLOTGATE.HOTKEYS / BIGKEYS (RESP2: a flat array).
fn entries(v: &Value) -> Vec<HashMap<String, Value>> {
    let Value::Array(items) = v else {
        panic!("not an array: {v:?}")
    };
    items
        .iter()
        .map(|e| {
            let Value::Array(kv) = e else {
                panic!("entry: {e:?}")
            };
            kv.chunks(2)
                .map(|p| {
                    (
                        redis::from_redis_value::<String>(p[0].clone()).unwrap(),
                        p[1].clone(),
                    )
                })
                .collect()
        })
        .collect()
}

fn text(v: &Value) -> String {
    redis::from_redis_value(v.clone()).unwrap()
}

fn int(v: &Value) -> u64 {
    redis::from_redis_value(v.clone()).unwrap()
}

/// Draws ranks 0.. from a Zipf distribution over `n` keys with exponent `s`
/// (deterministic: a xorshift generator).
struct Zipf {
    cdf: Vec<f64>,
    x: u64,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let w: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let cdf = w
            .iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect();
        Zipf {
            cdf,
            x: 0x2545_F491_4F6C_DD1D,
        }
    }

    fn next(&mut self) -> usize {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        let u = (self.x >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// Sends `cmds` pipelined in batches and reads every reply.
fn pipeline(conns: &mut [RawConn], cmds: &[Vec<u8>]) {
    for (i, batch) in cmds.chunks(2_000).enumerate() {
        let c = &mut conns[i % conns.len()];
        c.send(&batch.concat());
        let _ = c.read_replies(batch.len());
    }
}

#[test]
fn hot_keys_of_a_zipf_load_are_found_within_20_percent() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    // 400,000 commands over 1,000 keys (Zipf, s = 1.1); one in ten a SET.
    let mut zipf = Zipf::new(1_000, 1.1);
    let mut truth = vec![(0u64, 0u64); 1_000];
    let cmds: Vec<Vec<u8>> = (0..400_000)
        .map(|i| {
            let r = zipf.next();
            let key = format!("item:{r}");
            if i % 10 == 0 {
                truth[r].1 += 1;
                resp(&[b"SET", key.as_bytes(), b"v"])
            } else {
                truth[r].0 += 1;
                resp(&[b"GET", key.as_bytes()])
            }
        })
        .collect();
    let mut conns = [proxy.raw(), proxy.raw()];
    pipeline(&mut conns, &cmds);

    let mut c = proxy.client();
    let v: Value = redis::cmd("SLOTGATE.HOTKEYS")
        .arg("COUNT")
        .arg(10)
        .query(&mut c)
        .unwrap();
    let got = entries(&v);
    assert_eq!(got.len(), 10, "{v:?}");
    let by_key: HashMap<String, &HashMap<String, Value>> =
        got.iter().map(|e| (text(&e["key"]), e)).collect();
    let shard_addrs: Vec<String> = shards.iter().map(|s| s.addr()).collect();
    for (r, &(reads, writes)) in truth.iter().enumerate().take(10) {
        let key = format!("item:{r}");
        let e = by_key
            .get(&key)
            .unwrap_or_else(|| panic!("{key} (rank {r}) missing from {:?}", by_key.keys()));
        let want = (reads + writes) as f64;
        let requests = int(&e["requests"]) as f64;
        assert!(
            (requests - want).abs() <= 0.2 * want,
            "{key}: {requests} requests estimated, {want} made"
        );
        assert_eq!(int(&e["reads"]) + int(&e["writes"]), requests as u64);
        assert!(shard_addrs.contains(&text(&e["shard"])), "{:?}", e["shard"]);
        let rps: f64 = text(&e["rps"]).parse().unwrap();
        assert!(rps > 0.0);
    }
    // The read/write split of the hottest key (one request in ten is a SET).
    let top = by_key["item:0"];
    let share = int(&top["writes"]) as f64 / int(&top["requests"]) as f64;
    assert!((0.06..0.14).contains(&share), "write share {share}");
    // The order is by requests; COUNT bounds the answer; a WINDOW is accepted.
    let requests: Vec<u64> = got.iter().map(|e| int(&e["requests"])).collect();
    assert!(requests.windows(2).all(|w| w[0] >= w[1]), "{requests:?}");
    let three: Value = redis::cmd("SLOTGATE.HOTKEYS")
        .arg("WINDOW")
        .arg("5m")
        .arg("COUNT")
        .arg(3)
        .query(&mut c)
        .unwrap();
    assert_eq!(entries(&three).len(), 3);

    // Options are checked as Redis checks options.
    let mut raw = proxy.raw();
    for (args, want) in [
        (
            &[&b"SLOTGATE.HOTKEYS"[..], b"COUNT", b"x"][..],
            &b"-ERR value is not an integer or out of range\r\n"[..],
        ),
        (
            &[b"SLOTGATE.HOTKEYS", b"COUNT", b"0"],
            b"-ERR value is out of range, must be positive\r\n",
        ),
        (
            &[b"SLOTGATE.HOTKEYS", b"WINDOW", b"2h"],
            b"-ERR WINDOW must be 10s, 1m or 5m\r\n",
        ),
        (
            &[b"SLOTGATE.BIGKEYS", b"LIMIT", b"1"],
            b"-ERR syntax error\r\n",
        ),
        (&[b"SLOTGATE.HOTKEYS", b"COUNT"], b"-ERR syntax error\r\n"),
    ] {
        assert_eq!(
            String::from_utf8_lossy(&raw.call(args)),
            String::from_utf8_lossy(want)
        );
    }
}

#[test]
fn big_replies_are_listed_largest_first_with_their_shards() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    let mut c = proxy.client();
    let sizes = [
        ("big:a", 100_000usize),
        ("big:b", 30_000),
        ("big:c", 5_000),
        ("small", 10),
    ];
    for (k, n) in sizes {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("x".repeat(n))
            .query(&mut c)
            .unwrap();
        let _: () = redis::cmd("RPUSH")
            .arg(format!("list:{k}"))
            .arg("x".repeat(n))
            .query(&mut c)
            .unwrap();
    }
    // One read in 16 is sampled: 300 reads of each leave a chance of 4e-9 to miss one.
    let mut cmds = Vec::new();
    for _ in 0..300 {
        for (k, _) in sizes {
            cmds.push(resp(&[b"GET", k.as_bytes()]));
            cmds.push(resp(&[
                b"LRANGE",
                format!("list:{k}").as_bytes(),
                b"0",
                b"-1",
            ]));
        }
    }
    let mut conns = [proxy.raw(), proxy.raw()];
    pipeline(&mut conns, &cmds);
    let v: Value = redis::cmd("SLOTGATE.BIGKEYS")
        .arg("COUNT")
        .arg(6)
        .query(&mut c)
        .unwrap();
    let got = entries(&v);
    let names: Vec<String> = got.iter().map(|e| text(&e["key"])).collect();
    assert_eq!(
        names,
        [
            "list:big:a",
            "big:a",
            "list:big:b",
            "big:b",
            "list:big:c",
            "big:c"
        ],
    );
    // Sizes are the replies' bytes as framed: `$100000\r\n` + value + `\r\n`.
    assert_eq!(int(&got[1]["bytes"]), 100_000 + 11);
    assert_eq!(int(&got[0]["bytes"]), 100_000 + 11 + b"*1\r\n".len() as u64);
    assert_eq!(int(&got[3]["bytes"]), 30_000 + 10);
    for e in &got {
        let key = text(&e["key"]);
        let owner = shards.iter().find(|s| {
            let n: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query(&mut s.client())
                .unwrap();
            n == 1
        });
        assert_eq!(text(&e["shard"]), owner.unwrap().addr(), "{key}");
    }
}
