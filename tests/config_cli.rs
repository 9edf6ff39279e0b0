//! CLI and config validation: `--check-config` exit codes and messages, config files, and a
//! quick non-zero exit for an invalid slot layout. `--check-config` must never contact shards,
//! so shard addresses here are ports where nothing listens.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::*;

type Outcome = Finished;

fn describe(o: &Outcome, args: &[&str]) -> String {
    format!(
        "slotgate {}\n  exit: {:?} after {:?}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        o.code,
        o.elapsed,
        o.stdout.trim(),
        o.stderr.trim()
    )
}

/// Runs the slotgate binary with `args`; kills it and panics after `limit`.
fn run(args: &[&str], limit: Duration) -> Outcome {
    match run_bounded(Command::new(slotgate_bin()).args(args), limit) {
        Ok(o) => o,
        Err(o) => panic!(
            "slotgate {} still running after {limit:?} (killed); stderr: {}",
            args.join(" "),
            o.stderr
        ),
    }
}

fn check(args: &[&str]) -> (Outcome, Vec<String>) {
    let mut all = vec!["--check-config".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    (run(&refs, Duration::from_secs(10)), all)
}

fn assert_valid(args: &[&str]) {
    let (o, all) = check(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert_eq!(
        o.code,
        Some(0),
        "expected a valid config:\n{}",
        describe(&o, &all)
    );
}

/// Asserts non-zero exit and that stderr mentions one of `words` (case-insensitive).
fn assert_invalid(args: &[&str], words: &[&str]) {
    let (o, all) = check(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "expected a non-zero exit:\n{}",
        describe(&o, &all)
    );
    let err = o.stderr.to_lowercase();
    assert!(
        words.iter().any(|w| err.contains(&w.to_lowercase())),
        "stderr should explain the problem (mention one of {words:?}):\n{}",
        describe(&o, &all)
    );
}

/// Loopback addresses where nothing listens (privileged ports, never bound in tests).
const A: &str = "127.0.0.1:2";
const B: &str = "127.0.0.1:3";
const C: &str = "127.0.0.1:4";
const LISTEN: &str = "127.0.0.1:1";

fn spec(addr: &str, slots: &str) -> String {
    format!("{addr}={slots}")
}

#[test]
fn check_config_accepts_even_split_without_contacting_shards() {
    assert_valid(&["--listen", LISTEN, "--shard", A]);
    assert_valid(&["--listen", LISTEN, "--shard", A, "--shard", B, "--shard", C]);
    // The plain listener may be off when the TLS one is on; with neither, nothing listens.
    assert_valid(&[
        "--listen",
        "none",
        "--tls-self-signed",
        "--shard",
        A,
        "--shard",
        B,
    ]);
    assert_invalid(
        &["--listen", "none", "--shard", A, "--shard", B],
        &["listener"],
    );
    assert_valid(&[
        "--listen",
        LISTEN,
        "--shard",
        A,
        "--shard",
        B,
        "--workers",
        "2",
        "--upstream-connections",
        "2",
        "--op-timeout",
        "250ms",
        "--log-level",
        "info",
    ]);
}

#[test]
fn check_config_never_connects_to_shards() {
    // Real listeners used as shard addresses: nobody may connect to them.
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let a1 = l1.local_addr().unwrap().to_string();
    let a2 = l2.local_addr().unwrap().to_string();
    assert_valid(&["--listen", LISTEN, "--shard", &a1, "--shard", &a2]);
    for l in [&l1, &l2] {
        l.set_nonblocking(true).unwrap();
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("--check-config connected to a shard (from {peer})"),
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn check_config_accepts_explicit_complete_layouts() {
    assert_valid(&["--listen", LISTEN, "--shard", &spec(A, "0-16383")]);
    assert_valid(&[
        "--listen",
        LISTEN,
        "--shard",
        &spec(A, "0-5460,5462"),
        "--shard",
        &spec(B, "5461,5463-16383"),
    ]);
    assert_valid(&[
        "--listen",
        LISTEN,
        "--shard",
        &spec(A, "0-99,200-16383"),
        "--shard",
        &spec(B, "100-199"),
    ]);
    assert_valid(&[
        "--listen",
        LISTEN,
        "--shard",
        &spec(A, "16383"),
        "--shard",
        &spec(B, "0-16382"),
    ]);
}

#[test]
fn check_config_rejects_overlapping_slots() {
    assert_invalid(
        &[
            "--listen",
            LISTEN,
            "--shard",
            &spec(A, "0-10000"),
            "--shard",
            &spec(B, "9000-16383"),
        ],
        &["slot", "overlap"],
    );
    // A single shared slot is enough.
    assert_invalid(
        &[
            "--listen",
            LISTEN,
            "--shard",
            &spec(A, "0-8192"),
            "--shard",
            &spec(B, "8192-16383"),
        ],
        &["slot", "overlap"],
    );
}

#[test]
fn check_config_rejects_missing_slots() {
    assert_invalid(
        &[
            "--listen",
            LISTEN,
            "--shard",
            &spec(A, "0-100"),
            "--shard",
            &spec(B, "200-16383"),
        ],
        &["slot"],
    );
    assert_invalid(
        &["--listen", LISTEN, "--shard", &spec(A, "0-16382")],
        &["slot"],
    );
    assert_invalid(
        &["--listen", LISTEN, "--shard", &spec(A, "1-16383")],
        &["slot"],
    );
}

#[test]
fn check_config_rejects_bad_slot_syntax() {
    for bad in [
        "abc",
        "0-abc",
        "0-16384",
        "16384",
        "0-16383x",
        "0-16383,x",
        "-5",
        "0_16383",
    ] {
        assert_invalid(
            &["--listen", LISTEN, "--shard", &spec(A, bad)],
            &["slot", bad],
        );
    }
}

#[test]
fn check_config_durations() {
    for good in ["250ms", "1s", "10m"] {
        assert_valid(&["--listen", LISTEN, "--shard", A, "--op-timeout", good]);
    }
    for bad in ["5 parsecs", "parsecs", "10x", "ms"] {
        assert_invalid(
            &["--listen", LISTEN, "--shard", A, "--op-timeout", bad],
            &["op-timeout", "duration", bad],
        );
    }
}

#[test]
fn check_config_requires_a_shard() {
    assert_invalid(&["--listen", LISTEN], &["shard"]);
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "slotgate-config-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn check_config_reads_a_config_file() {
    let good = temp_file(
        "proxy.toml",
        &format!("listen = \"{LISTEN}\"\n\n[[shards]]\naddr = \"{A}\"\nslots = \"0-16383\"\n"),
    );
    assert_valid(&["--config", good.to_str().unwrap()]);

    let two = temp_file(
        "proxy.toml",
        &format!(
            "listen = \"{LISTEN}\"\n\n[[shards]]\naddr = \"{A}\"\nslots = \"0-99,200-16383\"\n\n\
             [[shards]]\naddr = \"{B}\"\nslots = \"100-199\"\n"
        ),
    );
    assert_valid(&["--config", two.to_str().unwrap()]);

    let overlapping = temp_file(
        "proxy.toml",
        &format!(
            "listen = \"{LISTEN}\"\n\n[[shards]]\naddr = \"{A}\"\nslots = \"0-16383\"\n\n\
             [[shards]]\naddr = \"{B}\"\nslots = \"5\"\n"
        ),
    );
    assert_invalid(
        &["--config", overlapping.to_str().unwrap()],
        &["slot", "overlap"],
    );

    let missing = temp_file(
        "proxy.toml",
        &format!("listen = \"{LISTEN}\"\n\n[[shards]]\naddr = \"{A}\"\nslots = \"0-16000\"\n"),
    );
    assert_invalid(&["--config", missing.to_str().unwrap()], &["slot"]);

    let broken = temp_file(
        "proxy.toml",
        "listen = \"127.0.0.1:1\"\n[[shards]\naddr = \n",
    );
    assert_invalid(
        &["--config", broken.to_str().unwrap()],
        &["proxy.toml", "toml", "parse", "expected", "invalid"],
    );

    let absent = std::env::temp_dir().join("slotgate-no-such-dir/absent-proxy.toml");
    assert_invalid(
        &["--config", absent.to_str().unwrap()],
        &["absent-proxy.toml"],
    );
}

#[test]
fn repo_proxy_toml_passes_check_config_if_present() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    if !path.exists() {
        eprintln!("{} absent: skipped", path.display());
        return;
    }
    assert_valid(&["--config", path.to_str().unwrap()]);
}

#[test]
fn start_with_invalid_layout_exits_nonzero_quickly() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    for shards in [
        vec![spec(A, "0-100")],
        vec![spec(A, "0-10000"), spec(B, "9000-16383")],
        vec![spec(A, "0-nope")],
    ] {
        let mut args = vec!["--listen", listen.as_str()];
        for s in &shards {
            args.push("--shard");
            args.push(s);
        }
        let o = run(&args, Duration::from_secs(5));
        assert!(
            matches!(o.code, Some(c) if c != 0),
            "invalid layout must exit non-zero:\n{}",
            describe(&o, &args)
        );
        assert!(
            !o.stderr.trim().is_empty(),
            "message on stderr:\n{}",
            describe(&o, &args)
        );
        assert!(
            o.elapsed < Duration::from_secs(5),
            "exit took {:?}",
            o.elapsed
        );
    }
    // No shard at all.
    let args = ["--listen", listen.as_str()];
    let o = run(&args, Duration::from_secs(5));
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{}",
        describe(&o, &args)
    );
}

/// Like Redis, slotgate raises its soft limit on open files to what `--maxclients` needs
/// (started here with a soft limit of 256).
#[test]
fn the_open_file_limit_is_raised_for_maxclients() {
    let shard = RedisServer::start();
    let port = free_port();
    let script = format!(
        "ulimit -Sn 256 && exec '{}' --listen 127.0.0.1:{port} --shard {} --workers 1 \
         --admin-listen none --maxclients 3000",
        slotgate_bin().display(),
        shard.addr()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_own_port(port, child.id());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let hard = line.split_whitespace().nth(4).unwrap();
    let hard: u64 = hard.parse().unwrap_or(u64::MAX);
    assert!(
        soft >= 6000.min(hard),
        "soft limit {soft} (hard {hard}) too low for 3000 clients: {line}"
    );
}

/// Every `scripts/…` the README tells a reader to run exists and is executable (one was not:
/// `scripts/scale.sh`).
#[test]
fn scripts_named_in_the_readme_are_executable() {
    use std::os::unix::fs::PermissionsExt;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut named: Vec<String> = readme
        .split(|c: char| c.is_whitespace() || "`()[]|".contains(c))
        .filter(|w| w.starts_with("scripts/") && w.ends_with(".sh") && !w.contains('*'))
        .map(str::to_string)
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 4, "{named:?}");
    for s in &named {
        let meta = std::fs::metadata(root.join(s)).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{s} is not executable"
        );
    }
}

/// `log_level` takes tracing's levels, Redis's names and `target=level` directives; a bare
/// word that is none of them is an error (adversarial review: `warning` passed and then
/// silenced every log line, ERRORs included, since tracing read it as a target).
#[test]
fn log_levels_are_checked() {
    for ok in [
        "warn",
        "warning",
        "notice",
        "verbose",
        "debug",
        "off",
        "slotgate=debug,warn",
    ] {
        assert_valid(&["--shard", A, "--log-level", ok]);
    }
    for bad in ["verbose!!", "loud", "warn,chatty"] {
        assert_invalid(&["--shard", A, "--log-level", bad], &["neither a level"]);
    }
}
