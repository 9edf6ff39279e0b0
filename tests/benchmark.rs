//! `redis-benchmark` (default test set) through slotgate over 3 shards must run clean.
//!
//! NOTE: this file takes ~20 s (two full redis-benchmark runs of 20,000 requests per test).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const EXPECTED_TESTS: &[&str] = &[
    "PING_INLINE",
    "PING_MBULK",
    "SET",
    "GET",
    "INCR",
    "LPUSH",
    "RPUSH",
    "LPOP",
    "RPOP",
    "SADD",
    "HSET",
    "SPOP",
    "ZADD",
    "ZPOPMIN",
    "LPUSH (needed to benchmark LRANGE)",
    "LRANGE_100",
    "LRANGE_300",
    "LRANGE_500",
    "LRANGE_600",
    "MSET",
];

/// Runs redis-benchmark with `args`, killing it after `limit`. Returns (success, stdout, stderr).
fn run_benchmark(args: &[&str], limit: Duration) -> (bool, String, String) {
    match run_bounded(Command::new("redis-benchmark").args(args), limit) {
        Ok(f) => {
            eprintln!("redis-benchmark {args:?} finished in {:?}", f.elapsed);
            (f.code == Some(0), f.stdout, f.stderr)
        }
        Err(f) => panic!(
            "redis-benchmark {args:?} did not finish within {limit:?} (killed)\n\
             stdout tail: {}\nstderr: {}",
            tail(&f.stdout),
            f.stderr
        ),
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = final_lines(s);
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Lines as the terminal would show them: split on `\n` and on the `\r` progress rewrites.
fn final_lines(s: &str) -> Vec<&str> {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

fn check_run(label: &str, ok: bool, stdout: &str, stderr: &str) {
    let all: Vec<&str> = final_lines(stdout)
        .into_iter()
        .chain(final_lines(stderr))
        .collect();
    let bad: Vec<&&str> = all
        .iter()
        .filter(|l| l.contains("ERR") || l.contains("Error") || l.contains("error"))
        .take(10)
        .collect();
    assert!(
        bad.is_empty(),
        "{label}: redis-benchmark reported errors:\n{}",
        bad.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        ok,
        "{label}: redis-benchmark exit status not 0\nstdout: {}\nstderr: {stderr}",
        tail(stdout)
    );

    let results: Vec<&str> = all
        .iter()
        .copied()
        .filter(|l| l.contains("requests per second"))
        .collect();
    let missing: Vec<&str> = EXPECTED_TESTS
        .iter()
        .copied()
        .filter(|name| {
            !results.iter().any(|l| {
                // "SET: …", "LRANGE_100 (first 100 elements): …", "MSET (10 keys): …";
                // plain "LPUSH" must not be satisfied by the "LPUSH (needed …)" line.
                l.strip_prefix(name).is_some_and(|rest| {
                    rest.starts_with(':') || (*name != "LPUSH" && rest.starts_with(" ("))
                })
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{label}: no result line for {missing:?}; result lines:\n{}",
        results.join("\n")
    );
    for l in &results {
        // "NAME: 12345.67 requests per second, p50=…": a positive rate.
        let rate = l
            .split(": ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse::<f64>().ok());
        assert!(
            matches!(rate, Some(r) if r > 0.0),
            "{label}: result line without a positive rate: {l:?}"
        );
    }
}

// Takes ~20 s.
#[test]
fn redis_benchmark_default_suite_runs_clean_through_slotgate() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let port = proxy.port.to_string();
    let limit = Duration::from_secs(120);

    let (ok, out, err) = run_benchmark(&["-p", &port, "-q", "-n", "20000", "-c", "20"], limit);
    check_run("-c 20", ok, &out, &err);

    let (ok, out, err) = run_benchmark(
        &["-p", &port, "-q", "-n", "20000", "-c", "20", "-P", "16"],
        limit,
    );
    check_run("-c 20 -P 16", ok, &out, &err);

    // The proxy is still healthy and the benchmark's data is where the proxy says it is.
    let mut c = proxy.client();
    let total: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    let per_shard: i64 = shards
        .iter()
        .map(|s| redis::cmd("DBSIZE").query::<i64>(&mut s.client()).unwrap())
        .sum();
    assert!(total > 0, "benchmark keys exist");
    assert_eq!(
        total, per_shard,
        "DBSIZE through slotgate equals the shards' sum"
    );
    let len: i64 = redis::cmd("LLEN").arg("mylist").query(&mut c).unwrap();
    assert!(
        len >= 600,
        "LRANGE benchmark list exists with >= 600 elements ({len})"
    );
}

/// `redis-cli --pipe` mass insertion works through slotgate (issue 13.3): 20,000 SETs over
/// three shards, then redis-cli's own count of replies and errors.
#[test]
fn redis_cli_pipe_mass_insertion() {
    use std::io::Write;
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let input = support::tls::temp_dir("pipe").join("input.resp");
    let mut f = std::fs::File::create(&input).unwrap();
    for i in 0..20_000 {
        f.write_all(&resp(&[b"SET", format!("mass:{i}").as_bytes(), b"v"]))
            .unwrap();
    }
    drop(f);
    // (run_bounded gives the command no stdin: the shell redirects the file.)
    let line = format!("redis-cli -p {} --pipe < '{}'", proxy.port, input.display());
    let out = run_bounded(
        std::process::Command::new("sh").args(["-c", &line]),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|f| panic!("redis-cli --pipe did not finish: {}", f.stderr));
    assert!(
        out.stdout.contains("errors: 0, replies: 20000"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let keys: i64 = redis::cmd("DBSIZE").query(&mut proxy.client()).unwrap();
    assert_eq!(keys, 20_000);
}

/// The same default set through cluster mode, in front of a real 3-primary Redis Cluster
/// (issue 12): no errors, plain and pipelined.
#[test]
fn redis_benchmark_default_suite_runs_clean_in_cluster_mode() {
    let cluster = support::cluster::Cluster::start(3, 0);
    let seed = cluster.nodes[0].addr();
    let proxy = Slotgate::start_with(&[], &["--cluster", &seed]);
    let port = proxy.port.to_string();
    let limit = Duration::from_secs(120);
    let (ok, out, err) = run_benchmark(&["-p", &port, "-q", "-n", "5000", "-c", "20"], limit);
    check_run("cluster -c 20", ok, &out, &err);
    let (ok, out, err) = run_benchmark(
        &["-p", &port, "-q", "-n", "5000", "-c", "20", "-P", "16"],
        limit,
    );
    check_run("cluster -c 20 -P 16", ok, &out, &err);
}
