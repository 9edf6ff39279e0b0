//! The configuration: `proxy.toml` text, command-line flags, and read-through rule strings
//! (`--readthrough 'PREFIX=URL;opt=v…'`). Each must give settings or a clean error, never a
//! panic; settings that validate are usable (every slot has a shard, every rule renders
//! URLs for any key).

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use slotgate::config::{Cli, FileConfig};
use slotgate::readthrough::{RuleConfig, Rules};

use crate::wire::{EDGE_INTS, R};
use crate::{Ctx, hex_short};

// ---------------------------------------------------------------------------------------
// Values

const ADDRS: &[&str] = &[
    "127.0.0.1:7001",
    "127.0.0.1:7002",
    "[::1]:7003",
    "localhost:7004",
    "none",
    "NONE",
    "0.0.0.0:0",
    "127.0.0.1:99999",
    "127.0.0.1",
    ":80",
    "",
    "1.2.3.4:-1",
    "[::1]",
    "127.0.0.1:7001=0-5460",
];
const DURATIONS: &[&str] = &[
    "1s",
    "250ms",
    "10m",
    "1h",
    "500us",
    "µs",
    "0s",
    "0",
    "1.5s",
    ".5s",
    "1..2s",
    "-1s",
    "s",
    "1e9s",
    "99999999999h",
    "1 s",
    " 2m ",
    "inf",
    "NaNs",
    "1 d",
];
const SIZES: &[&str] = &[
    "256mb",
    "64mb",
    "1gb",
    "0",
    "1k",
    "1kb",
    "10G",
    "99999999999gb",
    "mb",
    "-1mb",
    "1.5mb",
    "18446744073709551615",
    "18446744073709551616b",
];
const OBUF: &[&str] = &[
    "256mb 64mb 60",
    "32mb 8mb 60",
    "0 0 0",
    "1 2",
    "1 2 3 4",
    "1gb 1gb 18446744073709551615",
    "x y z",
    "",
];
const SLOTS: &[&str] = &[
    "0-5460",
    "5461-10922",
    "10923-16383",
    "0-16383",
    "0",
    "16383",
    "16384",
    "5-3",
    "0-5460,5462",
    "-",
    "0--1",
    ",",
    "a-b",
    "0-99999999999999999999",
];
const PATHS: &[&str] = &[
    "/nonexistent/slotgate/server.crt",
    "server.key",
    "",
    "/",
    "ca.pem",
];
const LOG_LEVELS: &[&str] = &[
    "info",
    "debug",
    "slotgate=debug",
    "warn,slotgate::shard=trace",
    "nope=[",
    "[{x}]",
    "a[b{c=d}]=info",
    "=",
    "",
];
const ORIGINS: &[&str] = &[
    "http://127.0.0.1:8080/labels/{rest}",
    "http://h/{key}?full={key}&r={rest}",
    "http://[::1]:80/{key}",
    "https://x/{key}",
    "http://x/{nope}",
    "ftp://x",
    "http:///path",
    "http://",
    "http://x:99999/{key}",
    "http://x/{key}{rest}{key}",
    "http://ex ample/{key}",
    "http://x/{",
    "http://x/}",
    "http://x/%zz/{key}",
    "http://ü/{key}",
];
const PREFIXES: &[&str] = &[
    "label:",
    "a",
    "",
    "x=y",
    "ключ:",
    "l",
    "label:PO",
    "{tag}",
    " ",
];
const COMMAND_RULES: &[&str] = &[
    "+@all",
    "-@dangerous",
    "+get",
    "-config|set",
    "+config|get",
    "allcommands",
    "nocommands",
    "+@nope",
    "-nosuch",
    "+",
    "@",
    "+client|",
];
const PATTERNS: &[&str] = &["t:*", "*", "[a-", "\\", "?", "{tag}*", "", "a[^b]c"];

fn pick<'a>(r: &mut R, pool: &[&'a str]) -> &'a str {
    r.pick(pool)
}

fn quoted(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn int(r: &mut R) -> String {
    let v = pick(r, EDGE_INTS);
    if v.parse::<i128>().is_ok() && !v.starts_with('+') && !(v.len() > 1 && v.starts_with('0')) {
        v.to_string()
    } else {
        "1".into()
    }
}

fn list(r: &mut R, pool: &[&str]) -> String {
    let items: Vec<String> = (0..r.size(4)).map(|_| quoted(pick(r, pool))).collect();
    format!("[{}]", items.join(", "))
}

/// One `key = value` line of `proxy.toml`, valid or not.
fn top_level(r: &mut R) -> String {
    let (k, v) = match r.below(18) {
        0 => ("listen", quoted(pick(r, ADDRS))),
        1 => ("workers", int(r)),
        2 => ("upstream_connections", int(r)),
        3 => ("op_timeout", quoted(pick(r, DURATIONS))),
        4 => ("log_level", quoted(pick(r, LOG_LEVELS))),
        5 => ("max_client_pipeline", int(r)),
        6 => ("max_inflight_per_connection", int(r)),
        7 => (
            "max_inflight_bytes_per_connection",
            if r.one_in(2) {
                int(r)
            } else {
                quoted(pick(r, SIZES))
            },
        ),
        8 => ("max_dedicated_per_shard", int(r)),
        9 => ("client_output_buffer_limit_normal", quoted(pick(r, OBUF))),
        10 => ("client_output_buffer_limit_pubsub", quoted(pick(r, OBUF))),
        11 => ("proto_max_bulk_len", int(r)),
        12 => ("client_query_buffer_limit", int(r)),
        13 => ("requirepass", quoted(pick(r, &["secret", "", " ", "é"]))),
        14 => ("max_auth_failures", int(r)),
        15 => ("maxclients", int(r)),
        16 => ("idle_timeout", quoted(pick(r, DURATIONS))),
        _ => ("admin_listen", quoted(pick(r, ADDRS))),
    };
    format!("{k} = {v}\n")
}

fn table(r: &mut R) -> String {
    let mut t = String::new();
    match r.below(5) {
        0 => {
            t.push_str("[tls]\n");
            for _ in 0..r.size(4) {
                t.push_str(&match r.below(5) {
                    0 => format!("listen = {}\n", quoted(pick(r, ADDRS))),
                    1 => format!("cert = {}\n", quoted(pick(r, PATHS))),
                    2 => format!("key = {}\n", quoted(pick(r, PATHS))),
                    // Generating a certificate is slow: rarely.
                    3 => format!("self_signed = {}\n", r.one_in(8)),
                    _ => format!("client_ca = {}\n", quoted(pick(r, PATHS))),
                });
            }
        }
        1 => {
            t.push_str("[upstream]\n");
            for _ in 0..r.size(4) {
                t.push_str(&match r.below(5) {
                    0 => format!("username = {}\n", quoted(pick(r, &["proxy", "", "a b"]))),
                    1 => format!("password = {}\n", quoted(pick(r, &["pw", ""]))),
                    2 => format!("tls = {}\n", r.one_in(2)),
                    3 => format!("tls_ca = {}\n", quoted(pick(r, PATHS))),
                    _ => format!(
                        "tls_server_name = {}\n",
                        quoted(pick(r, &["redis.internal", "", "1.2.3.4", "a..b", "-x"]))
                    ),
                });
            }
        }
        2 => {
            for _ in 0..1 + r.size(4) {
                t.push_str("[[shards]]\n");
                t.push_str(&format!("addr = {}\n", quoted(pick(r, ADDRS))));
                if r.one_in(2) {
                    t.push_str(&format!("slots = {}\n", quoted(pick(r, SLOTS))));
                }
                if r.one_in(4) {
                    t.push_str("username = \"u\"\n");
                }
                if r.one_in(4) {
                    t.push_str("password = \"p\"\n");
                }
            }
        }
        3 => {
            t.push_str("[[users]]\n");
            t.push_str(&format!(
                "name = {}\n",
                quoted(pick(r, &["tenantA", "default", "", "a b", "x"]))
            ));
            for _ in 0..r.size(6) {
                t.push_str(&match r.below(8) {
                    0 => format!("password = {}\n", quoted(pick(r, &["pw", ""]))),
                    1 => "password = [\"a\", \"b\"]\n".to_string(),
                    2 => format!(
                        "password_sha256 = {}\n",
                        quoted(pick(
                            r,
                            &[
                                "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
                                "xyz",
                                "",
                            ]
                        ))
                    ),
                    3 => format!("nopass = {}\n", r.one_in(2)),
                    4 => format!("enabled = {}\n", r.one_in(2)),
                    5 => format!("keys = {}\n", list(r, PATTERNS)),
                    6 => format!("commands = {}\n", list(r, COMMAND_RULES)),
                    _ => format!("channels = {}\n", list(r, PATTERNS)),
                });
            }
        }
        _ => {
            t.push_str("[[readthrough]]\n");
            t.push_str(&format!("prefix = {}\n", quoted(pick(r, PREFIXES))));
            t.push_str(&format!("origin = {}\n", quoted(pick(r, ORIGINS))));
            for _ in 0..r.size(5) {
                t.push_str(&match r.below(7) {
                    0 => format!("name = {}\n", quoted(pick(r, PREFIXES))),
                    1 => format!("ttl = {}\n", quoted(pick(r, DURATIONS))),
                    2 => format!("negative_ttl = {}\n", quoted(pick(r, DURATIONS))),
                    3 => format!("timeout = {}\n", quoted(pick(r, DURATIONS))),
                    4 => format!("grace = {}\n", quoted(pick(r, DURATIONS))),
                    5 => format!("max_body = {}\n", int(r)),
                    _ => format!("honor_max_age = {}\n", r.one_in(2)),
                });
            }
        }
    }
    t
}

/// The example `proxy.toml` of the repository (the one the README documents).
fn example() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
            .unwrap_or_default()
    })
}

/// Text mutations: lines dropped, repeated or swapped, numbers replaced, TOML syntax where it
/// does not belong, deep nesting, bytes flipped.
fn mutate_text(r: &mut R, t: &mut Vec<u8>) {
    let len = t.len();
    match r.below(9) {
        0 | 1 => {
            let mut lines: Vec<Vec<u8>> = t.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
            let i = r.below(lines.len());
            match r.below(3) {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(r.below(lines.len() + 1), l);
                }
                _ => {
                    let j = r.below(lines.len());
                    lines.swap(i, j);
                }
            }
            *t = lines.join(&b'\n');
        }
        2 => {
            // A number replaced by an edge value.
            let digits: Vec<usize> = (0..len).filter(|&i| t[i].is_ascii_digit()).collect();
            if let Some(&i) = digits.get(r.below(digits.len().max(1))) {
                let mut e = i;
                while e < len && t[e].is_ascii_digit() {
                    e += 1;
                }
                let v = pick(r, EDGE_INTS).as_bytes().to_vec();
                t.splice(i..e, v);
            }
        }
        3 => {
            let at = r.below(len + 1);
            let s: &[u8] = r.pick(&[
                &b"["[..],
                b"]",
                b"[[",
                b"{",
                b"}",
                b"\"",
                b"'''",
                b"\"\"\"",
                b"=",
                b"#",
                b"\n",
                b"\r",
                b"\\u0000",
                b"\\",
                b".",
                b"\0",
                b"inf",
                b"nan",
                b"1979-05-27T07:32:00Z",
            ]);
            t.splice(at..at, s.iter().copied());
        }
        4 => {
            // Deep nesting of arrays and inline tables.
            let depth = if r.one_in(4) {
                2_000 + r.below(20_000)
            } else {
                1 + r.below(200)
            };
            let (open, close): (&[u8], &[u8]) = if r.one_in(2) {
                (b"[", b"]")
            } else {
                (b"{a=", b"}")
            };
            let mut s = b"\nx = ".to_vec();
            s.extend(open.repeat(depth));
            s.extend(close.repeat(depth));
            s.push(b'\n');
            let at = r.below(len + 1);
            t.splice(at..at, s);
        }
        5 if len > 0 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(len);
                t[i] ^= 1 << r.below(8);
            }
        }
        6 if len > 0 => {
            let at = r.below(len);
            t.truncate(at);
        }
        7 => {
            let n = r.size(32);
            let junk = r.bytes(n);
            let at = r.below(len + 1);
            t.splice(at..at, junk);
        }
        _ => {
            // A long string value.
            let at = r.below(len + 1);
            let mut s = b"\nlog_level = \"".to_vec();
            s.extend(b"a,".repeat(r.size(5_000)));
            s.extend_from_slice(b"\"\n");
            t.splice(at..at, s);
        }
    }
}

pub fn generate_toml(r: &mut R) -> Vec<u8> {
    let mut t = if r.one_in(3) {
        example().as_bytes().to_vec()
    } else {
        let mut s = String::new();
        for _ in 0..r.size(10) {
            s.push_str(&top_level(r));
        }
        for _ in 0..r.size(6) {
            s.push_str(&table(r));
        }
        s.into_bytes()
    };
    let rounds = match r.below(8) {
        0..=3 => 0,
        4..=6 => 1,
        _ => 2 + r.below(4),
    };
    for _ in 0..rounds {
        mutate_text(r, &mut t);
    }
    t
}

// ---------------------------------------------------------------------------------------
// Checks

/// A name-resolving address would make validation ask DNS (slow, and not the parser's
/// business): such inputs are parsed but not validated.
fn needs_dns(addr: &str) -> bool {
    let a = addr;
    if a.eq_ignore_ascii_case("none") || a.parse::<std::net::SocketAddr>().is_ok() {
        return false;
    }
    match a.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok()
                && host != "localhost"
                && host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_err()
        }
        None => false,
    }
}

/// Paths that could block or never end when read (devices, pipes): not read.
fn risky_path(p: &std::path::Path) -> bool {
    let s = p.to_string_lossy();
    ["/dev", "/proc", "/sys", "/run"]
        .iter()
        .any(|d| s.starts_with(d))
        || s.contains("..")
}

fn file_is_safe(f: &FileConfig) -> bool {
    let addrs = [&f.listen, &f.admin_listen, &f.tls.listen];
    let paths = [
        &f.tls.cert,
        &f.tls.key,
        &f.tls.client_ca,
        &f.upstream.tls_ca,
        &f.upstream.tls_cert,
        &f.upstream.tls_key,
    ];
    !addrs.iter().any(|a| a.as_deref().is_some_and(needs_dns))
        && !f.shards.iter().any(|s| needs_dns(s.addr.trim()))
        && !paths.iter().any(|p| p.as_deref().is_some_and(risky_path))
}

/// A scratch file for the configuration under test, one per process.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("slotgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("proxy.toml")
    })
}

pub fn remove_scratch() {
    if let Some(p) = scratch().parent() {
        let _ = std::fs::remove_dir_all(p);
    }
}

pub fn check_toml(input: &[u8], _seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let text = std::str::from_utf8(input).ok();
    let parsed = cx.ours(|| text.map(toml::from_str::<FileConfig>));
    match &parsed {
        Some(Ok(f)) if file_is_safe(f) => {}
        Some(Ok(_)) => {
            cx.count("parsed, not validated (names to resolve)", 1);
            return Ok(());
        }
        Some(Err(e)) => {
            let _ = e.to_string();
            cx.count("rejected by the TOML parser", 1);
        }
        None => cx.count("not UTF-8", 1),
    }
    // The whole path of `--config FILE --check-config`: read, parse, merge, validate.
    std::fs::File::create(scratch())
        .and_then(|mut f| f.write_all(input))
        .map_err(|e| format!("scratch file: {e}"))?;
    let cli = Cli {
        config: Some(scratch().clone()),
        ..Cli::default()
    };
    let result = cx.ours(|| cli.settings().map_err(|e| e.to_string()));
    settings_ok(result, cx)
}

fn settings_ok(
    result: Result<slotgate::config::Settings, String>,
    cx: &mut Ctx,
) -> Result<(), String> {
    match result {
        Ok(s) => {
            cx.count("valid", 1);
            let n = s.slot_map.shard_count();
            if n == 0 || n != s.shards.len() {
                return Err(format!(
                    "{n} shards in the slot map, {} listed",
                    s.shards.len()
                ));
            }
            if (0..16384u16).any(|slot| s.slot_map.shard_of_slot(slot) >= n) {
                return Err("a slot maps to no shard".into());
            }
            Ok(())
        }
        Err(msg) => {
            cx.count("invalid", 1);
            if msg.is_empty() {
                return Err("an empty error message".into());
            }
            Ok(())
        }
    }
}

const FLAGS: &[(&str, &[&str])] = &[
    ("--listen", ADDRS),
    ("--shard", ADDRS),
    (
        "--shard-list",
        &[
            "127.0.0.1:7001,127.0.0.1:7002",
            ",,",
            " ",
            "127.0.0.1:1=0-1 127.0.0.1:2=2-16383",
        ],
    ),
    ("--workers", EDGE_INTS),
    ("--upstream-connections", EDGE_INTS),
    ("--op-timeout", DURATIONS),
    ("--log-level", LOG_LEVELS),
    ("--max-client-pipeline", EDGE_INTS),
    ("--max-inflight-per-connection", EDGE_INTS),
    ("--max-inflight-bytes-per-connection", SIZES),
    ("--max-dedicated-per-shard", EDGE_INTS),
    ("--tls-listen", ADDRS),
    ("--tls-cert", PATHS),
    ("--tls-key", PATHS),
    ("--tls-client-ca", PATHS),
    ("--requirepass", &["pw", ""]),
    ("--max-auth-failures", EDGE_INTS),
    ("--maxclients", EDGE_INTS),
    ("--idle-timeout", DURATIONS),
    ("--upstream-username", &["u", ""]),
    ("--upstream-password", &["p"]),
    ("--upstream-tls-ca", PATHS),
    (
        "--upstream-tls-server-name",
        &["redis.internal", "", "1.2.3.4"],
    ),
    (
        "--readthrough",
        &[
            "label:=http://127.0.0.1:8080/labels/{rest};ttl=10m;timeout=500ms",
            "a=http://h/{key}",
            "=http://h/{key}",
            "x",
        ],
    ),
    ("--admin-listen", ADDRS),
    ("--upstream-tls", &[]),
    ("--check-config", &[]),
];

/// Command lines, NUL-separated.
pub fn generate_cli(r: &mut R) -> Vec<u8> {
    let mut args: Vec<Vec<u8>> = vec![b"slotgate".to_vec()];
    if !r.one_in(4) {
        args.push(b"--shard".to_vec());
        args.push(b"127.0.0.1:7001".to_vec());
    }
    for _ in 0..r.size(10) {
        let (flag, values) = r.pick(FLAGS);
        let v = if values.is_empty() {
            None
        } else {
            Some(pick(r, values).to_string())
        };
        match (v, r.below(6)) {
            (Some(v), 0) => args.push(format!("{flag}={v}").into_bytes()),
            (Some(v), _) => {
                args.push(flag.as_bytes().to_vec());
                args.push(v.into_bytes());
            }
            (None, _) => args.push(flag.as_bytes().to_vec()),
        }
    }
    let mut out = args.join(&0u8);
    if r.one_in(3) {
        mutate_text(r, &mut out);
    }
    out
}

pub fn check_cli(input: &[u8], _seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let args: Vec<String> = input
        .split(|&c| c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let parsed = cx.ours(|| Cli::try_parse_from(&args));
    let mut cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            cx.count("rejected by clap", 1);
            return Ok(());
        }
    };
    // Files named on a fuzzed command line are not read.
    cli.config = None;
    let flag_shards = cli.shards.iter().cloned().chain(
        cli.shard_list
            .iter()
            .flat_map(|l| l.split([',', ' ']).map(str::to_string)),
    );
    let shards_resolve = flag_shards
        .map(|s| s.split_once('=').map_or(s.clone(), |(a, _)| a.to_string()))
        .any(|a| needs_dns(a.trim()));
    let addrs = [&cli.listen, &cli.admin_listen, &cli.tls_listen];
    let paths = [
        &cli.tls_cert,
        &cli.tls_key,
        &cli.tls_client_ca,
        &cli.upstream_tls_ca,
        &cli.upstream_tls_cert,
        &cli.upstream_tls_key,
    ];
    if shards_resolve
        || addrs.iter().any(|a| a.as_deref().is_some_and(needs_dns))
        || paths.iter().any(|p| p.as_deref().is_some_and(risky_path))
    {
        cx.count("parsed, not validated (names to resolve)", 1);
        return Ok(());
    }
    let result = cx.ours(|| cli.settings().map_err(|e| e.to_string()));
    settings_ok(result, cx)
}

// ---------------------------------------------------------------------------------------
// Read-through rule strings

const RULE_OPTS: &[&str] = &[
    "ttl",
    "negative_ttl",
    "timeout",
    "grace",
    "name",
    "max_body",
    "honor_max_age",
];

/// One to three `--readthrough` values, one per line.
pub fn generate_rules(r: &mut R) -> Vec<u8> {
    let mut lines = Vec::new();
    for _ in 0..1 + r.size(2) {
        let origin = if r.one_in(4) {
            pick(r, ORIGINS)
        } else {
            pick(r, &ORIGINS[..3])
        };
        let mut s = format!("{}={origin}", pick(r, PREFIXES));
        for _ in 0..r.size(6) {
            let k = if r.one_in(20) {
                "nope"
            } else {
                pick(r, RULE_OPTS)
            };
            // Mostly valid values: the rules that build are the ones that render URLs.
            let odd = r.one_in(5);
            let v = match (k, odd) {
                ("max_body", false) => r.below(1 << 24).to_string(),
                ("max_body", true) => pick(r, EDGE_INTS).to_string(),
                ("honor_max_age", false) => pick(r, &["true", "false"]).to_string(),
                ("honor_max_age", true) => pick(r, &["yes", "", "TRUE"]).to_string(),
                ("name", _) => pick(r, PREFIXES).to_string(),
                (_, false) => pick(r, &DURATIONS[..5]).to_string(),
                (_, true) => pick(r, DURATIONS).to_string(),
            };
            let sep = if r.one_in(6) { " ; " } else { ";" };
            s.push_str(&format!("{sep}{k}={v}"));
        }
        lines.push(s.into_bytes());
    }
    let mut out = lines.join(&b'\n');
    if r.one_in(3) {
        mutate_text(r, &mut out);
    }
    out
}

/// Rules parsed and built; when they build, any key finds the longest matching prefix and
/// renders a valid URL to the rule's own host.
pub fn check_rules(input: &[u8], seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    // Durations and sizes on their own.
    cx.ours(|| {
        for w in text.split([';', '=', '\n']) {
            let _ = slotgate::units::parse_duration(w);
            let _ = slotgate::units::parse_bytes(w);
        }
    });
    let configs: Result<Vec<RuleConfig>, String> =
        cx.ours(|| text.lines().map(RuleConfig::parse_flag).collect());
    let configs = match configs {
        Ok(c) => c,
        Err(e) => {
            if e.is_empty() {
                return Err("an empty error message".into());
            }
            cx.count("rejected flags", 1);
            return Ok(());
        }
    };
    let rules = match cx.ours(|| Rules::build(&configs)) {
        Ok(r) => r,
        Err(e) => {
            if e.is_empty() {
                return Err("an empty error message".into());
            }
            cx.count("rejected rules", 1);
            return Ok(());
        }
    };
    cx.count("valid rules", 1);
    let mut r = R::new(seed);
    for _ in 0..8 {
        let mut key = match rules.iter().nth(r.below(configs.len() + 1)) {
            Some(rule) => rule.prefix.clone(),
            None => Vec::new(),
        };
        let n = r.size(40);
        key.extend(r.bytes(n));
        let found = rules.find(&key);
        let longest = rules
            .iter()
            .filter(|rule| key.starts_with(&rule.prefix))
            .map(|rule| rule.prefix.len())
            .max();
        if found.map(|f| f.prefix.len()) != longest {
            return Err(format!(
                "key {} found a rule that is not the longest prefix",
                hex_short(&key)
            ));
        }
        if let Some(rule) = found {
            // The origin is the operator's: `{key}`/`{rest}` go in the path or query, never
            // in the host or port ("the host part must be literal", UrlTemplate::parse).
            let plain = [&rule.prefix[..], b"k"].concat();
            let origin = rule.template.render(&plain, rule.prefix.len());
            let origin = origin.parse::<hyper::Uri>().ok();
            let origin = origin.as_ref().and_then(|u| u.authority());
            let url = cx.ours(|| rule.template.render(&key, rule.prefix.len()));
            let uri = url.parse::<hyper::Uri>();
            let why = match &uri {
                Err(_) => Some("an invalid URL"),
                Ok(u) if u.authority() != origin => Some("a URL to another host or port"),
                Ok(_) => None,
            };
            if let Some(why) = why {
                return Err(format!(
                    "rule '{}' renders {why} for key {}: {url}",
                    rule.name,
                    hex_short(&key)
                ));
            }
        }
    }
    Ok(())
}
