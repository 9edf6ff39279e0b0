//! TLS termination: protocol versions, mutual TLS, certificate reload without a restart,
//! plain RESP on the TLS port, TLS to the shards, and redis-benchmark over TLS.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use support::tls::{Ca, TlsConn, client_config, file_fingerprint, temp_dir};
use support::*;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Starts slotgate with a TLS listener on a free port; returns it and the TLS port.
fn start_tls(shards: &[&RedisServer], tls_args: &[&str]) -> (Slotgate, u16) {
    start_tls_logged(shards, tls_args, None)
}

/// Like [`start_tls`], with the log written to `log`.
fn start_tls_logged(
    shards: &[&RedisServer],
    tls_args: &[&str],
    log: Option<&Path>,
) -> (Slotgate, u16) {
    let tls_port = free_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let mut args = vec!["--tls-listen", &listen];
    args.extend_from_slice(tls_args);
    let proxy = Slotgate::start_logged(shards, &args, log);
    wait_for_own_port(tls_port, proxy.pid());
    (proxy, tls_port)
}

/// A child process that is killed (and reaped) when this is dropped, a failed test included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `from` to its end in a thread; what arrived so far is readable at any time.
fn collect(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (got, reader)
}

/// `openssl s_client` pinned to one protocol version (old versions re-enabled client-side,
/// so a refusal can only come from the server). Returns everything it printed.
fn openssl_ping(port: u16, version_flag: &str) -> String {
    let child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args([
            version_flag,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-quiet",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl must be installed (apt-get install -y openssl)");
    let mut child = KillOnDrop(child);
    let mut stdin = child.0.stdin.take().unwrap();
    let (stdout, out_reader) = collect(child.0.stdout.take().unwrap());
    let (stderr, err_reader) = collect(child.0.stderr.take().unwrap());
    let _ = stdin.write_all(b"PING\r\n");
    // `-quiet` implies `-ign_eof`: s_client stays connected until the server ends the
    // session, so it is done when the reply arrived or when it exited (refused).
    wait_until(
        "openssl s_client to get +PONG or to exit",
        Duration::from_secs(5),
        || {
            child.0.try_wait().unwrap().is_some()
                || String::from_utf8_lossy(&stdout.lock().unwrap()).contains("+PONG")
        },
    );
    drop(stdin);
    drop(child);
    out_reader.join().unwrap();
    err_reader.join().unwrap();
    let (stdout, stderr) = (stdout.lock().unwrap(), stderr.lock().unwrap());
    format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    )
}

#[test]
fn only_tls_1_2_and_1_3_are_accepted() {
    let shard = RedisServer::start();
    let (_proxy, port) = start_tls(&[&shard], &["--tls-self-signed"]);
    for old in ["-tls1", "-tls1_1"] {
        let out = openssl_ping(port, old);
        assert!(!out.contains("+PONG"), "{old} must be refused: {out}");
        // rustls answers alert 40 (handshake_failure) where Redis (OpenSSL) answers 70
        // (protocol_version); the README says so.
        assert!(
            out.contains("alert number 40"),
            "{old}: expected TLS alert 40 from the server: {out}"
        );
    }
    for ok in ["-tls1_2", "-tls1_3"] {
        let out = openssl_ping(port, ok);
        assert!(out.contains("+PONG"), "{ok} must work: {out}");
    }
    // And with rustls clients pinned to each version.
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut c = TlsConn::connect(port, client_config(None, None, Some(v))).unwrap();
        assert_eq!(c.call(PING).unwrap(), b"+PONG\r\n");
        assert_eq!(c.protocol(), Some(v.version));
    }
}

#[test]
fn mutual_tls_requires_a_certificate_from_the_configured_ca() {
    let dir = temp_dir("mtls");
    let ca = Ca::new("slotgate test CA");
    let other = Ca::new("some other CA");
    let ca_pem = ca.write(&dir, "ca");
    let (srv_crt, srv_key) = ca.issue(&dir, "server", &["localhost", "127.0.0.1"]);
    let (good_crt, good_key) = ca.issue(&dir, "client", &["client"]);
    let (bad_crt, bad_key) = other.issue(&dir, "stranger", &["client"]);
    let shard = RedisServer::start();
    let (_proxy, port) = start_tls(
        &[&shard],
        &[
            "--tls-cert",
            srv_crt.to_str().unwrap(),
            "--tls-key",
            srv_key.to_str().unwrap(),
            "--tls-client-ca",
            ca_pem.to_str().unwrap(),
        ],
    );
    // The server's own certificate verifies against the CA.
    let verified = client_config(Some(&ca_pem), Some((&good_crt, &good_key)), None);
    let mut c = TlsConn::connect(port, verified).expect("valid client certificate");
    assert_eq!(c.call(PING).unwrap(), b"+PONG\r\n");

    for (what, cfg) in [
        (
            "no client certificate",
            client_config(Some(&ca_pem), None, None),
        ),
        (
            "a certificate from another CA",
            client_config(Some(&ca_pem), Some((&bad_crt, &bad_key)), None),
        ),
        (
            "no client certificate over TLS 1.2",
            client_config(Some(&ca_pem), None, Some(&rustls::version::TLS12)),
        ),
    ] {
        let refused = match TlsConn::connect(port, cfg) {
            Err(_) => true,
            // TLS 1.3: the client finishes first; the refusal arrives on the first read.
            Ok(mut c) => c.call(PING).is_err(),
        };
        assert!(refused, "{what} must be refused");
    }
}

#[test]
fn certificate_reload_on_sighup_and_broken_files_keep_the_old_one() {
    let dir = temp_dir("reload");
    let ca = Ca::new("reload CA");
    let (crt, key) = ca.issue(&dir, "server", &["localhost"]);
    let first = file_fingerprint(&crt);
    let shard = RedisServer::start();
    let log = dir.join("slotgate.log");
    let (proxy, port) = start_tls_logged(
        &[&shard],
        &[
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        Some(&log),
    );
    let failed_reloads = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("TLS certificate reload failed")
            .count()
    };
    let mut old = TlsConn::connect(port, client_config(None, None, None)).unwrap();
    assert_eq!(old.peer_fingerprint(), first);

    // New certificate files, then SIGHUP: new handshakes see it, the old client keeps working.
    let (crt2, key2) = ca.issue(&dir, "server2", &["localhost"]);
    let second = file_fingerprint(&crt2);
    std::fs::copy(&crt2, &crt).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    proxy.signal("HUP");
    wait_until(
        "the new certificate to be picked up",
        Duration::from_secs(5),
        || {
            let c = TlsConn::connect(port, client_config(None, None, None)).unwrap();
            c.peer_fingerprint() == second
        },
    );
    assert_eq!(
        old.call(PING).unwrap(),
        b"+PONG\r\n",
        "existing connection survives"
    );

    // A broken file: logged, and the current certificate stays in use.
    let failed_before = failed_reloads();
    std::fs::write(&crt, "not a certificate").unwrap();
    proxy.signal("HUP");
    wait_until(
        "the reload of the broken file to fail (logged)",
        Duration::from_secs(5),
        || failed_reloads() > failed_before,
    );
    let mut c = TlsConn::connect(port, client_config(None, None, None)).unwrap();
    assert_eq!(c.peer_fingerprint(), second);
    assert_eq!(c.call(PING).unwrap(), b"+PONG\r\n");
}

#[test]
fn bad_certificate_files_fail_at_start_up_naming_the_file() {
    let dir = temp_dir("badcert");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "nothing here").unwrap();
    let missing = dir.join("missing.pem");
    for (cert, key, name) in [
        (&missing, &garbage, "missing.pem"),
        (&garbage, &garbage, "garbage.pem"),
    ] {
        let out = Command::new(slotgate_bin())
            .args(["--check-config", "--shard", "127.0.0.1:1"])
            .args([
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(name), "the error names the file: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A certificate with a key that does not belong to it.
    let ca = Ca::new("pair CA");
    let (crt, _) = ca.issue(&dir, "a", &["localhost"]);
    let (_, other_key) = ca.issue(&dir, "b", &["localhost"]);
    let out = Command::new(slotgate_bin())
        .args(["--check-config", "--shard", "127.0.0.1:1"])
        .args(["--tls-cert", crt.to_str().unwrap()])
        .args(["--tls-key", other_key.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("do not form a usable pair"), "{err}");
}

#[test]
fn plain_resp_on_the_tls_port_executes_nothing() {
    let shard = RedisServer::start();
    let (_proxy, port) = start_tls(&[&shard], &["--tls-self-signed"]);
    let mut raw = RawConn::connect(port);
    raw.send(&resp(&[b"SET", b"plain-on-tls", b"1"]));
    assert!(raw.is_closed(), "the TLS port closes a plaintext client");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("plain-on-tls")
        .query(&mut shard.client())
        .unwrap();
    assert_eq!(exists, 0, "nothing was executed");
}

#[test]
fn listen_none_serves_tls_only() {
    let shard = RedisServer::start();
    let (mut child, tls_port) = support::spawn_on_free_port(|tls_port| {
        Command::new(slotgate_bin())
            .args(["--listen", "none", "--tls-self-signed", "--workers", "1"])
            .args(["--tls-listen", &format!("127.0.0.1:{tls_port}")])
            .args(["--shard", &shard.addr(), "--log-level", "warn"])
            .args(["--admin-listen", "none"])
            .spawn()
            .unwrap()
    });
    let mut c = TlsConn::connect(tls_port, client_config(None, None, None)).unwrap();
    assert_eq!(c.call(PING).unwrap(), b"+PONG\r\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// A redis-server serving TLS only (`--port 0`), with a certificate from `ca`.
fn tls_shard(ca: &Ca, dir: &std::path::Path, extra: &[&str]) -> (RedisServer, u16) {
    let (crt, key) = ca.issue(dir, "shard", &["localhost", "127.0.0.1"]);
    let ca_pem = ca.write(dir, "shard-ca");
    let tls_port = free_port();
    let port = tls_port.to_string();
    let mut args = vec![
        "--tls-port",
        &port,
        "--tls-cert-file",
        crt.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca_pem.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let shard = RedisServer::start_with(&args);
    wait_for_own_port(tls_port, shard.pid());
    (shard, tls_port)
}

#[test]
fn tls_and_password_to_the_shards_with_a_real_handshake() {
    let dir = temp_dir("upstream");
    let ca = Ca::new("shard CA");
    let ca_pem = ca.write(&dir, "ca");
    let (client_crt, client_key) = ca.issue(&dir, "proxy-client", &["slotgate"]);
    // Two TLS shards that require a password and a client certificate.
    let extra = ["--requirepass", "up-secret", "--tls-auth-clients", "yes"];
    let (s1, t1) = tls_shard(&ca, &dir, &extra);
    let (s2, t2) = tls_shard(&ca, &dir, &extra);
    let shard_args = |pass: &'static str| {
        vec![
            "--upstream-tls".to_string(),
            "--upstream-tls-ca".into(),
            ca_pem.to_str().unwrap().into(),
            "--upstream-tls-cert".into(),
            client_crt.to_str().unwrap().into(),
            "--upstream-tls-key".into(),
            client_key.to_str().unwrap().into(),
            "--upstream-password".into(),
            pass.into(),
            "--shard".into(),
            format!("127.0.0.1:{t1}"),
            "--shard".into(),
            format!("127.0.0.1:{t2}"),
        ]
    };
    let good = shard_args("up-secret");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let proxy = Slotgate::start_with(&[], &good);
    let mut con = proxy.client();
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut con).unwrap();
    }
    let vals: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
    assert_eq!(vals, keys);
    // Both shards really got keys, over TLS with AUTH (their plain ports need the password).
    for s in [&s1, &s2] {
        let n: i64 = redis::cmd("DBSIZE")
            .query(
                &mut redis::Client::open(format!("redis://:up-secret@{}/", s.addr()))
                    .unwrap()
                    .get_connection()
                    .unwrap(),
            )
            .unwrap();
        assert!(n > 0, "every shard holds some of the keys");
    }
    // RESP3 connections authenticate with HELLO 3 AUTH.
    let mut raw = proxy.raw();
    let hello = raw.call(&[b"HELLO", b"3"]);
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 answers with a map: {}",
        String::from_utf8_lossy(&hello)
    );
    raw.roundtrip(&resp(&[b"GET", b"k1"]), b"$2\r\nk1\r\n");
    // Client-side caching: the invalidation links to the shards use TLS and AUTH too.
    assert_eq!(raw.call(&[b"CLIENT", b"TRACKING", b"ON"]), b"+OK\r\n");
    raw.roundtrip(&resp(&[b"GET", b"k1"]), b"$2\r\nk1\r\n");
    let _: () = redis::cmd("SET")
        .arg("k1")
        .arg("new")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        raw.read_replies(1)[0],
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\nk1\r\n"
    );
    drop(proxy);

    // A wrong upstream password: clear error, and the password appears nowhere.
    let bad = shard_args("wrong-pass-xyz");
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let log = dir.join("bad.log");
    let proxy = Slotgate::start_logged(&[], &bad, Some(&log));
    let mut raw = proxy.raw();
    raw.send(&resp(&[b"GET", b"k1"]));
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.ends_with(b"\r\n") {
        let n = std::io::Read::read(&mut raw.stream, &mut buf).unwrap();
        assert!(n > 0);
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("-ERR shard unavailable"), "{reply}");
    assert!(reply.contains("WRONGPASS"), "{reply}");
    assert!(!reply.contains("wrong-pass-xyz"), "{reply}");
    let info = proxy.raw().call(&[b"INFO"]);
    assert!(!String::from_utf8_lossy(&info).contains("wrong-pass-xyz"));
    drop(proxy);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("wrong-pass-xyz"), "{logged}");
}

/// `redis-benchmark --tls --insecure -q -n 20000`, its whole default test set (~40 s in a
/// debug build), through slotgate's TLS listener in front of 3 shards: no errors.
#[test]
fn redis_benchmark_over_tls_has_no_errors() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let (_proxy, port) = start_tls(&refs, &["--tls-self-signed"]);
    let out = run_bounded(
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["--tls", "--insecure", "-q", "-n", "20000", "-c", "20"]),
        Duration::from_secs(240),
    )
    .unwrap_or_else(|f| {
        panic!(
            "redis-benchmark over TLS did not finish within 240 s: {}{}",
            f.stdout, f.stderr
        )
    });
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(0), "{text}");
    let lower = text.to_lowercase();
    assert!(!text.contains("ERR") && !lower.contains("error"), "{text}");
    for t in [
        "PING_INLINE:",
        "PING_MBULK:",
        "SET:",
        "GET:",
        "INCR:",
        "LPUSH:",
        "RPUSH:",
        "LPOP:",
        "RPOP:",
        "SADD:",
        "HSET:",
        "SPOP:",
        "ZADD:",
        "ZPOPMIN:",
        "LRANGE_100",
        "LRANGE_600",
        "MSET",
    ] {
        assert!(text.contains(t), "{t} missing: {text}");
    }
}
