//! The io_uring data path (`--io uring`) where it differs from epoll underneath: short reads,
//! partial writes, a client closing in the middle of a reply, a client that does not read,
//! 10,000 idle connections, and the fallback to epoll when the kernel refuses io_uring. (The
//! whole end-to-end suite also runs on this path: `SLOTGATE_IO=uring` in `scripts/test.sh`.)

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// slotgate on the io_uring path in front of two shards.
fn uring_slotgate(shards: &[&RedisServer], extra: &[&str]) -> Slotgate {
    let mut args = vec!["--io", "uring"];
    args.extend_from_slice(extra);
    Slotgate::start_with(shards, &args)
}

fn value(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Waits until slotgate counts `n` clients (INFO's `connected_clients`, asked on `c`).
fn wait_for_clients(c: &mut RawConn, n: u64, what: &str, within: Duration) {
    wait_until(what, within, || {
        let info = String::from_utf8(c.call(&[b"INFO", b"clients"])).unwrap();
        info_u64(&info, "connected_clients") == n
    });
}

/// The resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A command that reaches slotgate a few bytes at a time (many short reads) and a 4 MiB
/// value read back through a small receive buffer (many partial sends) arrive intact, for
/// several keys on both shards.
#[test]
fn short_reads_and_partial_writes_keep_every_byte() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let sg = uring_slotgate(&[&a, &b], &[]);
    for (i, key) in [&b"big:a"[..], b"big:b", b"big:c"].iter().enumerate() {
        let v = value(4 << 20, i as u8);
        let cmd = resp(&[b"SET", key, &v]);
        let mut c = TcpStream::connect(("127.0.0.1", sg.port)).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The header and the first bytes of the value in 7-byte writes, then the rest.
        for piece in cmd[..700].chunks(7) {
            c.write_all(piece).unwrap();
        }
        c.write_all(&cmd[700..]).unwrap();
        let mut ok = [0u8; 5];
        c.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"+OK\r\n");

        // (The receive buffer is made small before connecting: shrunk after, the window
        // already advertised can stall the connection.)
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
        let sock = sock.unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], sg.port).into();
        sock.connect(&addr.into()).unwrap();
        let mut r = RawConn::from_stream(sock.into());
        r.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reply = r.call(&[b"GET", key]);
        let header = format!("${}\r\n", v.len());
        assert!(reply.starts_with(header.as_bytes()));
        assert!(
            reply[header.len()..reply.len() - 2] == v[..],
            "value {i} intact"
        );
    }
}

/// A client that asks for big replies and closes before reading them: slotgate drops its
/// session (the client count comes back), and serves the others meanwhile.
#[test]
fn a_client_closing_mid_reply_is_dropped_and_others_go_on() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let sg = uring_slotgate(&[&a, &b], &[]);
    let mut c = sg.raw();
    assert_eq!(c.call(&[b"SET", b"big", &value(2 << 20, 1)]), b"+OK\r\n");
    for _ in 0..5 {
        let mut gone = TcpStream::connect(("127.0.0.1", sg.port)).unwrap();
        let get = resp(&[b"GET", b"big"]);
        for _ in 0..8 {
            gone.write_all(&get).unwrap();
        }
        let mut first = [0u8; 1000];
        gone.read_exact(&mut first).unwrap();
        drop(gone);
        assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    }
    wait_for_clients(
        &mut c,
        1,
        "the closed clients' sessions to end",
        Duration::from_secs(10),
    );
}

/// A client that pipelines GETs of a big value without reading is closed by its output
/// buffer limit (the bytes the ring holds for it are bounded too), while another client is
/// served throughout; slotgate's memory comes back down.
#[test]
fn a_client_that_does_not_read_is_bounded_and_closed() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let conf = config_file(
        "uring-obuf",
        "client_output_buffer_limit_normal = \"8mb 4mb 1\"\n",
    );
    let sg = uring_slotgate(&[&a, &b], &["--config", conf.to_str().unwrap()]);
    let mut c = sg.raw();
    assert_eq!(c.call(&[b"SET", b"big", &value(1 << 20, 2)]), b"+OK\r\n");
    let before = rss_kib(sg.pid());
    let hog = TcpStream::connect(("127.0.0.1", sg.port)).unwrap();
    let mut w = hog.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let get = resp(&[b"GET", b"big"]);
        // (Fails once slotgate closes the connection.)
        for _ in 0..400 {
            if w.write_all(&get).is_err() {
                break;
            }
        }
    });
    for _ in 0..50 {
        assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    }
    // (Not read from until slotgate has closed it: reading would drain its replies.)
    wait_for_clients(
        &mut c,
        1,
        "the client that does not read to be closed",
        Duration::from_secs(20),
    );
    writer.join().unwrap();
    hog.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(RawConn::from_stream(hog).is_closed());
    wait_until(
        "slotgate's memory to come back",
        Duration::from_secs(20),
        || rss_kib(sg.pid()) < before + 64 * 1024,
    );
    assert_eq!(c.call(&[b"GET", b"nothing"]), b"$-1\r\n");
}

/// 10,000 idle connections cost little memory on the ring (no receive buffer is held while
/// a connection is idle: buffers come from the pool as data arrives), and every one of them
/// is still served.
#[test]
fn ten_thousand_idle_connections() {
    let a = RedisServer::start();
    let sg = uring_slotgate(&[&a], &["--maxclients", "10100"]);
    let mut c = sg.raw();
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    let before = rss_kib(sg.pid());
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let s = TcpStream::connect(("127.0.0.1", sg.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        idle.push(RawConn::from_stream(s));
    }
    wait_for_clients(&mut c, 10_001, "10,001 clients", Duration::from_secs(30));
    let per_conn = (rss_kib(sg.pid()).saturating_sub(before)) * 1024 / 10_000;
    eprintln!("io_uring: {per_conn} bytes of RSS per idle connection");
    assert!(per_conn < 8 * 1024, "{per_conn} bytes per idle connection");
    // Each still answers (the first and last hundred, and every hundredth).
    for (i, s) in idle.iter_mut().enumerate() {
        if !(100..9_900).contains(&i) || i % 100 == 0 {
            assert_eq!(s.call(&[b"PING"]), b"+PONG\r\n", "connection {i}");
        }
    }
}

/// Connections that once read a big reply and then sit idle give its buffers back (the
/// review found 2,000 of them holding 170 MB, against 20 MB on epoll).
#[test]
fn idle_connections_keep_no_big_buffers() {
    let a = RedisServer::start();
    let sg = uring_slotgate(&[&a], &[]);
    let mut c = sg.raw();
    assert_eq!(c.call(&[b"SET", b"v64", &value(64 << 10, 3)]), b"+OK\r\n");
    let before = rss_kib(sg.pid());
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        let mut r = sg.raw();
        let get = resp(&[b"GET", b"v64"]);
        r.send(&[&get[..], &get[..]].concat());
        assert_eq!(r.read_replies(2)[1].len(), (64 << 10) + 10);
        idle.push(r);
    }
    // (Freed memory goes back to the system within about a second: jemalloc's purging.)
    wait_until(
        "idle connections to give their buffers back",
        Duration::from_secs(20),
        || {
            let per_conn = rss_kib(sg.pid()).saturating_sub(before) * 1024 / 1_000;
            per_conn < 16 * 1024
        },
    );
}

/// Where the kernel refuses io_uring (here: a seccomp filter that fails `io_uring_setup`
/// with ENOSYS, as a container runtime's profile may), slotgate says so once and serves on
/// epoll.
#[cfg(target_arch = "x86_64")]
#[test]
fn refused_io_uring_falls_back_to_epoll_once() {
    use std::os::unix::process::CommandExt;
    let a = RedisServer::start();
    let port = free_port();
    let log = std::env::temp_dir().join(format!("slotgate-uring-refused-{port}.log"));
    let mut cmd = std::process::Command::new(slotgate_bin());
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--shard",
        &a.addr(),
    ])
    .args(["--workers", "2", "--admin-listen", "none", "--io", "uring"])
    .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: between fork and exec only async-signal-safe calls (prctl) on data prepared
    // before the fork.
    unsafe { cmd.pre_exec(deny_io_uring_setup) };
    let mut child = cmd.spawn().unwrap();
    let _kill = KillOnDrop(child.id());
    wait_for_own_port(port, child.id());
    let mut c = RawConn::connect(port);
    assert_eq!(c.call(&[b"SET", b"k", b"v"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"k"]), b"$1\r\nv\r\n");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("io_uring is not available"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for two workers:\n{text}");
    assert!(lines[0].contains("using epoll"), "{}", lines[0]);
    let _ = child.kill();
    let _ = child.wait();
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.to_string())
            .status();
    }
}

/// Installs a seccomp filter in this (forked) process: `io_uring_setup` fails with ENOSYS,
/// everything else is allowed.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_setup() -> std::io::Result<()> {
    const IO_URING_SETUP: u32 = 425;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let ld_arch = libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: 4, // seccomp_data.arch
    };
    let ld_nr = libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: 0, // seccomp_data.nr
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k: u32| libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        ld_arch,
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(libc::SECCOMP_RET_ALLOW),
        ld_nr,
        jeq(IO_URING_SETUP, 0, 1),
        ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ret(libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with valid arguments; `prog` and `filter` outlive the calls (the kernel
    // copies the filter).
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
