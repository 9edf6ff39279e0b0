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
    // 6,000,000 commands over 1,000 keys (Zipf, s = 1.1), one in ten a SET, pipelined over
    // two connections (two workers). With one command in 32 sampled (the default), the 10th
    // key (about 79,000 requests) gets about 2,500 samples: 2% of noise, while the 11th is
    // 10% less requested, so the true top 10 is told apart with a margin of 3.5 standard
    // deviations.
    let mut zipf = Zipf::new(1_000, 1.1);
    let mut truth = vec![(0u64, 0u64); 1_000];
    let mut conns = [proxy.raw(), proxy.raw()];
    let mut i = 0u64;
    for batch in 0..3_000 {
        let mut buf = Vec::with_capacity(2_000 * 40);
        for _ in 0..2_000 {
            let r = zipf.next();
            let key = format!("item:{r}");
            if i.is_multiple_of(10) {
                truth[r].1 += 1;
                buf.extend_from_slice(&resp(&[b"SET", key.as_bytes(), b"v"]));
            } else {
                truth[r].0 += 1;
                buf.extend_from_slice(&resp(&[b"GET", key.as_bytes()]));
            }
            i += 1;
        }
        let c = &mut conns[batch % 2];
        c.send(&buf);
        let _ = c.read_replies(2_000);
    }

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
    // One read in 32 is sampled: 800 reads of each leave a chance of 1e-11 to miss one.
    let mut cmds = Vec::new();
    for _ in 0..800 {
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

/// The metric names in `text` (a Prometheus exposition): histogram series under their
/// family's name.
fn exported(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

/// `slotgate_…` names in a dashboard query or rule expression (`rate(x[5m])`, `x{…}`).
fn named(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("slotgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        out.push(
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string(),
        );
        rest = &tail[end..];
    }
    out
}

fn admin_proxy(shards: &[&RedisServer], extra: &[&str], env: &[(&str, &str)]) -> (Slotgate, u16) {
    for _ in 0..10 {
        let admin = free_port();
        let a = format!("127.0.0.1:{admin}");
        let mut args = vec!["--admin-listen", &a];
        args.extend_from_slice(extra);
        let proxy = Slotgate::start_env(shards, &args, None, env);
        if std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok() {
            return (proxy, admin);
        }
    }
    panic!("no admin listener");
}

#[test]
fn every_metric_is_exported_from_start_up_and_grafana_and_alerts_name_only_those() {
    let shard = RedisServer::start();
    let (_proxy, admin) = admin_proxy(
        &[&shard],
        &[
            "--readthrough",
            "item:=http://127.0.0.1:9/{rest};ttl=1m;name=items",
        ],
        &[],
    );
    // Before any client connected.
    let (status, text) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let have = exported(&text);
    // Every metric slotgate declares, except the two whose label is the command (their
    // series come with each command's first call).
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let declared: Vec<String> = src
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"slotgate_"))
        .map(|l| l.split('"').nth(1).unwrap().to_string())
        .filter(|n| n != "slotgate_commands_total" && n != "slotgate_command_duration_seconds")
        .collect();
    assert!(declared.len() >= 40, "{declared:?}");
    let missing: Vec<&String> = declared.iter().filter(|n| !have.contains(*n)).collect();
    assert!(missing.is_empty(), "not exported at start-up: {missing:?}");
    // Labelled series are there for each shard and each class.
    assert!(
        text.contains(&format!(
            "slotgate_hotkey_share{{shard=\"{}\"}} 0",
            shard.addr()
        )),
        "{text}"
    );
    assert!(text.contains("slotgate_requests_total{class=\"single\"} 0"));

    // The Grafana dashboard: valid JSON, and every metric of every query exported.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/grafana/slotgate.json"
        ))
        .unwrap(),
    )
    .expect("the Grafana dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let names = named(e);
        assert!(!names.is_empty(), "a query without a slotgate metric: {e}");
        used.extend(names);
    }
    let unknown: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics slotgate does not export: {unknown:?}"
    );

    // The alert rules: each has an expression over exported metrics and a severity; the
    // issue's five alerts are there.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/prometheus/slotgate-alerts.yml"
    ))
    .unwrap();
    let alerts: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    let names: Vec<&str> = alerts
        .iter()
        .map(|a| a.lines().next().unwrap().trim())
        .collect();
    for want in [
        "SlotgateShardDown",
        "SlotgateErrorRate",
        "SlotgateOriginBreakerOpen",
        "SlotgateHitRatioDrop",
        "SlotgateClientOutputBufferCloses",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for a in &alerts {
        let expr = a
            .split("expr:")
            .nth(1)
            .expect("expr")
            .split("labels:")
            .next()
            .unwrap();
        let names = named(expr);
        assert!(!names.is_empty(), "{a}");
        for n in names {
            assert!(
                have.contains(&n),
                "alert names {n}, which slotgate does not export"
            );
        }
        assert!(a.contains("severity:"), "{a}");
    }
}

#[test]
fn hot_and_big_keys_are_filtered_by_the_users_key_patterns() {
    let cfg = config_file(
        "hotkeys-perms",
        r#"
requirepass = "adminpw"
[[users]]
name = "tenant"
password = "t"
keys = ["tenant:*"]
commands = ["+@all"]
"#,
    );
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let (proxy, admin) = admin_proxy(
        &refs,
        &["--config", cfg.to_str().unwrap(), "--hotkeys-sample", "1"],
        &[],
    );
    let mut a = proxy.raw();
    assert_eq!(a.call(&[b"AUTH", b"adminpw"]), b"+OK\r\n");
    let value = "v".repeat(2_000);
    for k in ["tenant:a", "other:b"] {
        a.call(&[b"SET", k.as_bytes(), value.as_bytes()]);
        for _ in 0..20 {
            a.call(&[b"GET", k.as_bytes()]);
        }
    }
    let keys = |c: &mut RawConn, cmd: &[u8]| -> Vec<String> {
        let reply = c.call(&[cmd]);
        let v: Value = redis::parse_redis_value(&reply).unwrap();
        entries(&v).iter().map(|e| text(&e["key"])).collect()
    };
    // The admin (every key) sees both; the tenant only its own.
    assert_eq!(keys(&mut a, b"SLOTGATE.HOTKEYS"), ["other:b", "tenant:a"]);
    assert_eq!(keys(&mut a, b"SLOTGATE.BIGKEYS"), ["other:b", "tenant:a"]);
    let mut t = proxy.raw();
    assert_eq!(t.call(&[b"AUTH", b"tenant", b"t"]), b"+OK\r\n");
    assert_eq!(keys(&mut t, b"SLOTGATE.HOTKEYS"), ["tenant:a"]);
    assert_eq!(keys(&mut t, b"SLOTGATE.BIGKEYS"), ["tenant:a"]);
    // In RESP3 an entry is a map and its rate a double.
    let mut r3 = proxy.raw();
    r3.call(&[b"HELLO", b"3", b"AUTH", b"default", b"adminpw"]);
    let reply = r3.call(&[b"SLOTGATE.HOTKEYS", b"COUNT", b"1"]);
    assert!(
        reply.starts_with(b"*1\r\n%6\r\n"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        reply.windows(10).any(|w| w == b"$3\r\nrps\r\n,"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // With every command sampled the counts are exact: 21 each (a SET and 20 GETs, plus
    // the tenant's reads now counted nowhere: HOTKEYS has no key).
    let (status, body) = http_get(admin, "/hotkeys?count=5&window=10s");
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["window"], "10s");
    assert_eq!(j["sample"], 1);
    let ks = j["keys"].as_array().unwrap();
    assert_eq!(ks.len(), 2, "{body}");
    for k in ks {
        assert_eq!(k["requests"], 21, "{body}");
        assert_eq!(k["reads"], 20);
        assert_eq!(k["writes"], 1);
    }
    // Inside MULTI a read's reply is +QUEUED: no size is taken from it.
    let tx_value = "t".repeat(5_000);
    a.call(&[b"SET", b"other:tx", tx_value.as_bytes()]);
    a.call(&[b"MULTI"]);
    a.call(&[b"GET", b"other:tx"]);
    let exec = a.call(&[b"EXEC"]);
    assert!(exec.starts_with(b"*1\r\n$5000\r\n"));
    assert!(!keys(&mut a, b"SLOTGATE.BIGKEYS").contains(&"other:tx".to_string()));
    let (_, body) = http_get(admin, "/bigkeys");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        j["keys"][0]["bytes"],
        2_000 + b"$2000\r\n\r\n".len(),
        "{body}"
    );
    assert_eq!(http_get(admin, "/hotkeys?window=1h").0, 400);
}

/// Debian's `chromium` (scripts/test.sh installs it).
fn chromium() -> std::path::PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|d| std::path::Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .expect("a headless browser: apt-get install chromium (scripts/test.sh does)")
}

/// Runs headless chromium on `url` with `args` (e.g. `--dump-dom`); its stdout.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = support::tls::temp_dir("chromium-profile");
    let mut cmd = std::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        // Time in the page runs ahead: its reads every 2 s happen within the budget.
        "--virtual-time-budget=9000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    let done = run_bounded(&mut cmd, std::time::Duration::from_secs(90))
        .unwrap_or_else(|f| panic!("chromium did not finish: {}", f.stderr));
    assert_eq!(done.code, Some(0), "chromium: {}", done.stderr);
    done.stdout
}

#[test]
fn an_empty_admin_token_variable_keeps_the_files_token() {
    let cfg = config_file("admin-token", "admin_token = \"from+the/file=\"\n");
    let shard = RedisServer::start();
    let (_proxy, admin) = admin_proxy(
        &[&shard],
        &["--config", cfg.to_str().unwrap()],
        &[("SLOTGATE_ADMIN_TOKEN", "")],
    );
    assert_eq!(http_get(admin, "/overview").0, 401);
    let ok = [("Authorization", "Bearer from+the/file=")];
    assert_eq!(http_request(admin, "GET", "/overview", &ok, "").0, 200);
    // The scheme in any case; in the address, percent-encoded as a browser sends it.
    let lower = [("Authorization", "bearer from+the/file=")];
    assert_eq!(http_request(admin, "GET", "/overview", &lower, "").0, 200);
    assert_eq!(
        http_get(admin, "/overview?token=from%2Bthe%2Ffile%3D").0,
        200
    );
    assert_eq!(http_get(admin, "/overview?token=from+the/file=").0, 401);
    assert_eq!(http_request(admin, "POST", "/overview", &ok, "").0, 405);
}

#[test]
fn the_dashboard_loads_in_a_headless_browser_behind_the_admin_token() {
    let origin = support::origin::Origin::start(|p| {
        support::origin::Reply::ok(format!("{{\"label\":\"{p}\"}}"))
    });
    let rule = format!("label:={};name=labels", origin.url("/{rest}"));
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let token = "s3cret+admin/=";
    let in_address = "s3cret%2Badmin%2F%3D";
    let (proxy, admin) = admin_proxy(
        &refs,
        &[
            "--readthrough",
            &rule,
            "--hotkeys-sample",
            "1",
            "--workers",
            "2",
        ],
        &[("SLOTGATE_ADMIN_TOKEN", token)],
    );
    let mut c = proxy.raw();
    c.call(&[b"SET", b"blob:big", "x".repeat(50_000).as_bytes()]);
    for i in 0..60 {
        c.call(&[b"GET", b"user:hot"]);
        c.call(&[b"GET", format!("label:{}", i % 5).as_bytes()]);
    }
    c.call(&[b"GET", b"blob:big"]);

    // The token guards everything but the probes.
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    for path in ["/", "/overview", "/hotkeys", "/bigkeys", "/metrics"] {
        assert_eq!(http_get(admin, path).0, 401, "{path} without the token");
        let wrong = [("Authorization", "Bearer nope")];
        assert_eq!(
            http_request(admin, "GET", path, &wrong, "").0,
            401,
            "{path}"
        );
        assert_eq!(http_request(admin, "GET", path, &auth, "").0, 200, "{path}");
    }
    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let (status, page) = http_get(admin, &format!("/?token={in_address}"));
    assert_eq!(status, 200);
    // Self-contained: nothing loaded from elsewhere.
    for external in [
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
        "//fonts.",
    ] {
        assert!(!page.contains(external), "the page loads {external}");
    }

    // The data the page reads.
    let overview = wait_for(
        "the commands published",
        std::time::Duration::from_secs(10),
        || {
            let (_, body) = http_request(admin, "GET", "/overview", &auth, "");
            let j: serde_json::Value = serde_json::from_str(&body).unwrap();
            (j["classes"]["single"]["calls"].as_u64() >= Some(121)).then_some(j)
        },
    );
    assert_eq!(overview["mode"], "static");
    let shown: Vec<&str> = overview["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["addr"].as_str().unwrap())
        .collect();
    assert_eq!(shown, [shards[0].addr(), shards[1].addr()]);
    let slots: u64 = overview["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["slots"].as_array().unwrap().clone())
        .map(|r| r[1].as_u64().unwrap() - r[0].as_u64().unwrap() + 1)
        .sum();
    assert_eq!(slots, 16384);
    assert!(overview["clients"].as_u64() >= Some(1));
    let rule = &overview["rules"][0];
    assert_eq!(rule["name"], "labels");
    assert_eq!(rule["origin_requests"], 5);
    assert_eq!(rule["avoided"], 55, "{rule}");
    assert!(
        !overview["classes"]["single"]["latency_us"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let (_, hot) = http_request(admin, "GET", "/hotkeys?count=1", &auth, "");
    let hot: serde_json::Value = serde_json::from_str(&hot).unwrap();
    assert_eq!(hot["keys"][0]["key"], "user:hot");
    assert_eq!(hot["keys"][0]["requests"], 60);
    let (_, big) = http_request(admin, "GET", "/bigkeys?count=1", &auth, "");
    let big: serde_json::Value = serde_json::from_str(&big).unwrap();
    assert_eq!(big["keys"][0]["key"], "blob:big");

    // The page in a real browser: it fills its tables from those endpoints (the token taken
    // from its address), and a screenshot of it is kept in target/.
    let url = format!("http://127.0.0.1:{admin}/?token={in_address}");
    let dom = browse(&url, &["--dump-dom"]);
    let status = dom
        .split("<span id=\"status\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_default();
    assert!(
        status.starts_with("updated "),
        "the page's status: {status:?}\n{dom}"
    );
    let body = dom.split("<script>").next().unwrap();
    for want in [
        "user:hot",
        "blob:big",
        ">labels<",
        &shards[0].addr(),
        &shards[1].addr(),
    ] {
        assert!(body.contains(want), "{want} not on the page:\n{body}");
    }
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &url,
        &[
            "--window-size=1400,1250",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}
