//! Test support: real `redis-server` processes and a real `slotgate` process on loopback.
//!
//! Everything started here is killed on `Drop`, by PID, so a failing test leaves nothing behind.
//! Ports come from the kernel (bind `127.0.0.1:0`, read the port, close), then the child binds it;
//! `wait_for_port` polls with a deadline instead of sleeping.

#![allow(dead_code)]

pub mod cluster;
pub mod jwt;
pub mod origin;
pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// Polls until something accepts connections on `port`, or panics after `within`.
/// Writes `text` as `proxy.toml` in a fresh temporary directory; its path.
pub fn config_file(tag: &str, text: &str) -> PathBuf {
    let path = tls::temp_dir(tag).join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Polls `cond` every 10 ms until it holds; panics after `within`, naming `what`. Tests wait
/// for an observable condition with this rather than sleeping a fixed time.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`wait_until`], returning the first value `probe` produces.
pub fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {within:?}");
}

/// A `redis-server` child on a free loopback port, without persistence. Killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `["--cluster-enabled", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A free port can be taken by a parallel test between our probe and the child's bind:
        // retry until the listener on the port is our own child.
        for _ in 0..20 {
            let port = free_port();
            let mut child = spawn_redis(port, &extra);
            if listener_is(port, &mut child) {
                return RedisServer { port, child, extra };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server on a free port");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it; the port is then closed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh server on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.port, &self.extra);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Stops the process with SIGSTOP, so it accepts TCP connections but answers nothing.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A direct synchronous connection that bypasses the proxy.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(format!("redis://{}/", self.addr()))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        self.kill();
    }
}

/// Waits until `child` listens on `127.0.0.1:port` (read from /proc: the listening socket's
/// inode is among the child's file descriptors). False if the child exited first, or another
/// process owns the port (a parallel test took it between our probe and the child's bind).
/// Starts `spawn(port)` on a free port, again on another port while the child does not end up
/// listening on its own (a parallel test can take a probed port before the child binds it).
pub fn spawn_on_free_port(mut spawn: impl FnMut(u16) -> Child) -> (Child, u16) {
    for _ in 0..20 {
        let port = free_port();
        let mut child = spawn(port);
        if listener_is(port, &mut child) {
            return (child, port);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a listener on a free port");
}

fn listener_is(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Some(inode) = listening_inode(port) {
            return owns_socket(child.id(), inode);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits until `child` listens on `port` (e.g. a second, TLS, port); panics otherwise.
pub fn wait_for_own_port(port: u16, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(inode) = listening_inode(port) {
            assert!(
                owns_socket(pid, inode),
                "port {port} is taken by another process"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} does not listen on {port}");
}

/// The inode of the TCP socket listening on `port` (IPv4), from /proc/net/tcp.
fn listening_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!(":{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // f[1] = local addr:port, f[3] = state (0A = LISTEN), f[9] = inode
        (f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A")
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

fn owns_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want))
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn spawn_redis(port: u16, extra: &[String]) -> Child {
    let dir = std::env::temp_dir().join(format!("slotgate-test-redis-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    // A fresh server: a cluster replica that used this port before left the data set it
    // synced here, which redis-server would load at start (a SCAN test found another test's
    // keys).
    let _ = std::fs::remove_file(dir.join("dump.rdb"));
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ])
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install -y redis-server)")
}

/// The `slotgate` binary built by cargo for this test run.
/// Among [`Slotgate::start_with`]'s arguments: no `--log-level` flag, so that the
/// configuration file's `log_level` is in force (and a reload can change it).
pub const LOG_LEVEL_FROM_FILE: &str = "<log level from the file>";

pub fn slotgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slotgate"))
}

/// A running `slotgate` process listening on a free loopback port. Killed on drop.
pub struct Slotgate {
    pub port: u16,
    child: Child,
}

impl Slotgate {
    /// Starts slotgate in front of `shards` (slots split evenly), one worker unless `extra`
    /// says otherwise.
    pub fn start(shards: &[&RedisServer]) -> Self {
        Self::start_with(shards, &[])
    }

    pub fn start_with(shards: &[&RedisServer], extra: &[&str]) -> Self {
        Self::start_logged(shards, extra, None)
    }

    /// Like [`start_with`](Self::start_with), with stderr (the log) written to `log`.
    pub fn start_logged(shards: &[&RedisServer], extra: &[&str], log: Option<&Path>) -> Self {
        Self::start_env(shards, extra, log, &[])
    }

    /// Like [`start_logged`](Self::start_logged), with these environment variables set.
    pub fn start_env(
        shards: &[&RedisServer],
        extra: &[&str],
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Self {
        for _ in 0..20 {
            let port = free_port();
            let mut child = Self::spawn(port, shards, extra, log, env);
            if listener_is(port, &mut child) {
                return Slotgate { port, child };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start slotgate on a free port");
    }

    /// Starts slotgate listening on `port` (chosen beforehand, e.g. because other instances
    /// must be told it); `None` when the port turned out to be taken.
    pub fn start_on(port: u16, shards: &[&RedisServer], extra: &[&str]) -> Option<Self> {
        let mut child = Self::spawn(port, shards, extra, None, &[]);
        if listener_is(port, &mut child) {
            return Some(Slotgate { port, child });
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn spawn(
        port: u16,
        shards: &[&RedisServer],
        extra: &[&str],
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Child {
        let mut cmd = Command::new(slotgate_bin());
        cmd.envs(env.iter().copied());
        cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        for s in shards {
            cmd.arg("--shard").arg(s.addr());
        }
        if !extra.contains(&"--workers") {
            cmd.args(["--workers", "1"]);
        }
        if !extra.contains(&"--admin-listen") {
            cmd.args(["--admin-listen", "none"]);
        }
        if !extra.contains(&"--log-level") && !extra.contains(&LOG_LEVEL_FROM_FILE) {
            cmd.args(["--log-level", "warn"]);
        }
        cmd.args(extra.iter().filter(|a| **a != LOG_LEVEL_FROM_FILE));
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("create log file")),
            None => Stdio::inherit(),
        };
        cmd.stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn slotgate")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "HUP") to the slotgate process.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    /// Waits for the process to exit by itself; its status, or `None` if it is still running
    /// after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A synchronous `redis` crate connection through the proxy.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// A raw TCP connection through the proxy, for byte-exact assertions.
    pub fn raw(&self) -> RawConn {
        RawConn::connect(self.port)
    }
}

impl Drop for Slotgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw RESP connection with a read timeout, for asserting exact bytes.
pub struct RawConn {
    pub stream: TcpStream,
    /// Bytes read past the last reply returned (a push that came in the same segment as a
    /// reply): the next read starts with them.
    pending: Vec<u8>,
}

impl RawConn {
    pub fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self::from_stream(stream)
    }

    /// A connection already made (its read timeout is the caller's).
    pub fn from_stream(stream: TcpStream) -> Self {
        RawConn {
            stream,
            pending: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads until exactly `n` bytes arrived (or panics on timeout/EOF).
    pub fn read_exact_n(&mut self, n: usize) -> Vec<u8> {
        let have = self.pending.len().min(n);
        let mut buf: Vec<u8> = self.pending.drain(..have).collect();
        buf.resize(n, 0);
        self.stream.read_exact(&mut buf[have..]).unwrap();
        buf
    }

    /// Sends `req` and reads exactly `expected.len()` bytes, asserting they equal `expected`.
    pub fn roundtrip(&mut self, req: &[u8], expected: &[u8]) {
        self.send(req);
        let got = self.read_exact_n(expected.len());
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "reply to {:?}",
            String::from_utf8_lossy(req)
        );
    }

    /// Reads exactly `n` complete RESP replies (framed by slotgate's own reply scanner).
    pub fn read_replies(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        let mut scanner = slotgate::resp::ReplyScanner::new();
        let mut chunk = vec![0u8; 1 << 16];
        while out.len() < n {
            if let Some(f) = scanner.scan(&buf).expect("valid RESP") {
                out.push(buf.drain(..f.len).collect());
                continue;
            }
            let got = match self.stream.read(&mut chunk) {
                // A signal (the SIGCHLD of a `kill` the test ran) is not a timeout: read on.
                // (`failed_and_lost_watches` failed on it now and then.)
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("reply within the timeout"),
            };
            assert!(got > 0, "connection closed after {} replies", out.len());
            buf.extend_from_slice(&chunk[..got]);
        }
        self.pending = buf;
        out
    }

    /// Sends one command and returns its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(&resp(args));
        self.read_replies(1).remove(0)
    }

    /// Whether nothing more arrives within `within` (nothing already read and kept either).
    /// The read timeout is `within` afterwards.
    pub fn silent_for(&mut self, within: Duration) -> bool {
        self.stream.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 64];
        self.pending.is_empty()
            && matches!(self.stream.read(&mut buf), Err(e) if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ))
    }

    /// Whether the peer closed the connection (EOF) within the read timeout, after reading and
    /// discarding anything still buffered.
    pub fn is_closed(&mut self) -> bool {
        self.pending.clear();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
}

/// `GET path` on an HTTP listener (the admin port): status code and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_request(port, "GET", path, &[], "")
}

/// An HTTP/1.0 request to `127.0.0.1:port` with these headers and body: its status and body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: x\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(s, "{head}Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The sum of a Prometheus counter's samples in /metrics (0 when it has none yet).
pub fn metric_sum(admin_port: u16, name: &str) -> f64 {
    http_get(admin_port, "/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many of `shard`'s clients run `cmd` now (`cmd=…` in its CLIENT LIST), e.g. are
/// blocked in `blpop`.
pub fn clients_running(shard: &RedisServer, cmd: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut shard.client())
        .unwrap();
    list.matches(&format!("cmd={cmd} ")).count()
}

/// What a finished child process printed.
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` to completion with both streams captured. A child still running after `limit`
/// is killed, and what it printed is returned as `Err`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Finished, Finished> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the command");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let (code, killed) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break (st.code(), false);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let f = Finished {
        code,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed: start.elapsed(),
    };
    if killed { Err(f) } else { Ok(f) }
}

/// The length of the first complete RESP2 reply in `buf`, if it is all there (an oracle
/// written independently of slotgate's framer).
pub fn resp2_reply_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let n = || {
        std::str::from_utf8(&buf[1..end])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("bad RESP header in {:?}", String::from_utf8_lossy(buf)))
    };
    match buf[0] {
        b'+' | b'-' | b':' => Some(end + 2),
        b'$' => {
            let total = if n() < 0 {
                end + 2
            } else {
                end + 2 + n() as usize + 2
            };
            (buf.len() >= total).then_some(total)
        }
        b'*' => {
            let mut off = end + 2;
            for _ in 0..n().max(0) {
                off += resp2_reply_len(&buf[off..])?;
            }
            Some(off)
        }
        other => panic!(
            "bad reply type {:?} in {:?}",
            other as char,
            String::from_utf8_lossy(buf)
        ),
    }
}

/// A random seed for a test, from `SLOTGATE_TEST_SEED` or the clock; printed so that a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("SLOTGATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test} seed: {seed} (set SLOTGATE_TEST_SEED={seed} to reproduce)");
    seed
}

/// CRC16/XMODEM as Redis Cluster uses it (poly 0x1021, init 0), written here independently of
/// slotgate's so that tests can pick keys for given slots; the reference slot of a key is
/// always Redis's own `CLUSTER KEYSLOT` (tests/slot_parity.rs).
/// The shard that owns `key` (no hashtag) when `shards` shards split the slots evenly: shard
/// `i` owns slots `i*16384/n ..= (i+1)*16384/n - 1`, as slotgate's default layout.
pub fn even_shard_of(key: &[u8], shards: usize) -> usize {
    let slot = (crc16(key) % 16384) as usize;
    (0..shards)
        .find(|i| slot < (i + 1) * 16384 / shards)
        .expect("every slot has a shard")
}

pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Encodes a command as a RESP2 multibulk.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    slotgate::resp::request::command(args).to_vec()
}

/// Runs `slotgate --check-config ARGS` (bounded): whether it passed, and its stdout and
/// stderr together.
pub fn check_config(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(slotgate_bin());
    cmd.arg("--check-config").args(args);
    let done = run_bounded(&mut cmd, Duration::from_secs(10));
    let ok = matches!(&done, Ok(f) if f.code == Some(0));
    let (Ok(f) | Err(f)) = done;
    (ok, format!("{}{}", f.stdout, f.stderr))
}

/// The integer field `field` of an INFO text (`field:123`).
pub fn info_u64(info: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .parse()
        .unwrap()
}
