//! Pipelined command streams through slotgate give exactly the replies a single plain Redis
//! gives for the same stream: same values, same order, same errors (WRONGTYPE, not an integer…).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::Value;
use support::*;

/// `read` that retries when a signal interrupts it (EINTR).
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Shard index (even split of 3) of a key without hashtags.
fn shard_of_plain_key(key: &str) -> usize {
    even_shard_of(key.as_bytes(), 3)
}

type Command = Vec<Vec<u8>>;

fn show(cmd: &Command) -> String {
    cmd.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random mix of string/list/hash commands over a small key pool with prefix `prefix`, so
/// keys collide across types (WRONGTYPE errors, INCR on non-integers, …).
fn gen_commands(rng: &mut StdRng, prefix: &str, n: usize) -> Vec<Command> {
    let pool: Vec<String> = (0..40).map(|i| format!("{prefix}k{i}")).collect();
    let shards: std::collections::HashSet<usize> =
        pool.iter().map(|k| shard_of_plain_key(k)).collect();
    assert_eq!(shards.len(), 3, "key pool must cover all 3 shards");
    let key = |rng: &mut StdRng| pool[rng.random_range(0..pool.len())].clone().into_bytes();
    let val = |rng: &mut StdRng| -> Vec<u8> {
        match rng.random_range(0..4) {
            0 => rng.random_range(-5i64..1000).to_string().into_bytes(),
            1 => format!("val-{}", rng.random_range(0..1_000_000)).into_bytes(),
            2 => (0..rng.random_range(0..64))
                .map(|_| rng.random::<u8>())
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let c: Command = match rng.random_range(0..100) {
            0..=11 => vec![b"SET".to_vec(), key(rng), val(rng)],
            12..=25 => vec![b"GET".to_vec(), key(rng)],
            26..=35 => vec![b"INCR".to_vec(), key(rng)],
            36..=45 => vec![b"LPUSH".to_vec(), key(rng), val(rng), val(rng)],
            46..=53 => vec![
                b"LRANGE".to_vec(),
                key(rng),
                b"0".to_vec(),
                rng.random_range(-1i64..15).to_string().into_bytes(),
            ],
            54..=63 => vec![
                b"HSET".to_vec(),
                key(rng),
                format!("f{}", rng.random_range(0..6)).into_bytes(),
                val(rng),
            ],
            64..=70 => vec![b"HGETALL".to_vec(), key(rng)],
            71..=76 => {
                let mut c = vec![b"DEL".to_vec()];
                for _ in 0..rng.random_range(1..4) {
                    c.push(key(rng));
                }
                c
            }
            77..=83 => {
                let mut c = vec![b"EXISTS".to_vec()];
                for _ in 0..rng.random_range(1..5) {
                    c.push(key(rng));
                }
                c
            }
            84..=93 => {
                let mut c = vec![b"MGET".to_vec()];
                for _ in 0..rng.random_range(1..8) {
                    c.push(key(rng));
                }
                c
            }
            // explicit wrong-type operations
            94..=96 => vec![b"LLEN".to_vec(), key(rng)],
            _ => vec![b"HGET".to_vec(), key(rng), b"f1".to_vec()],
        };
        out.push(c);
    }
    out
}

/// Runs `cmds` on `con` as pipelines of random depth (1..=400), errors kept as values.
fn run_pipelined(con: &mut redis::Connection, cmds: &[Command], rng: &mut StdRng) -> Vec<Value> {
    let mut out = Vec::with_capacity(cmds.len());
    let mut i = 0;
    while i < cmds.len() {
        let depth = rng.random_range(1..=400).min(cmds.len() - i);
        let mut p = redis::pipe();
        p.ignore_errors();
        for c in &cmds[i..i + depth] {
            let mut rc = redis::cmd(std::str::from_utf8(&c[0]).unwrap());
            for a in &c[1..] {
                rc.arg(a.as_slice());
            }
            p.add_command(rc);
        }
        let replies: Vec<Value> = p
            .query(con)
            .unwrap_or_else(|e| panic!("pipeline of {depth} commands at #{i} failed: {e}"));
        assert_eq!(replies.len(), depth, "one reply per pipelined command");
        out.extend(replies);
        i += depth;
    }
    out
}

fn compare(label: &str, cmds: &[Command], got: &[Value], want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{label}: reply count");
    let mismatches: Vec<String> = cmds
        .iter()
        .zip(got.iter().zip(want))
        .enumerate()
        .filter(|(_, (_, (g, w)))| g != w)
        .take(10)
        .map(|(i, (c, (g, w)))| {
            format!(
                "#{i} `{}`:\n   slotgate: {g:?}\n   redis:    {w:?}",
                show(c)
            )
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{label}: replies differ from a single Redis (first mismatches):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn four_concurrent_connections_get_same_replies_as_single_redis() {
    let base_seed = seed("pipeline_order");
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    let reference = RedisServer::start();

    const PER_CONN: usize = 2600;
    let lists: Vec<Vec<Command>> = (0..4)
        .map(|c| {
            let mut rng = StdRng::seed_from_u64(base_seed.wrapping_add(c));
            gen_commands(&mut rng, &format!("c{c}:"), PER_CONN)
        })
        .collect();
    assert!(lists.iter().map(Vec::len).sum::<usize>() >= 10_000);

    let t = Instant::now();
    let got: Vec<Vec<Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = lists
            .iter()
            .enumerate()
            .map(|(c, cmds)| {
                let proxy = &proxy;
                s.spawn(move || {
                    let mut con = proxy.client();
                    con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut rng = StdRng::seed_from_u64(base_seed ^ (0x5eed + c as u64));
                    run_pipelined(&mut con, cmds, &mut rng)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    eprintln!(
        "slotgate: {} commands on 4 connections in {:?}",
        PER_CONN * 4,
        t.elapsed()
    );

    let mut direct = reference.client();
    for (c, cmds) in lists.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(base_seed ^ (0xabc + c as u64));
        let want = run_pipelined(&mut direct, cmds, &mut rng);
        compare(&format!("connection {c}"), cmds, &got[c], &want);
    }

    // Sanity: the test exercised errors, and all shards hold data.
    let errors = got
        .iter()
        .flatten()
        .filter(|v| matches!(v, Value::ServerError(_)))
        .count();
    assert!(
        errors > 100,
        "expected many WRONGTYPE/not-an-integer errors, got {errors}"
    );
    for (i, s) in shards.iter().enumerate() {
        let n: i64 = redis::cmd("DBSIZE").query(&mut s.client()).unwrap();
        assert!(n > 0, "shard {i} received no keys");
    }
}

/// Length of the first complete RESP2 reply in `buf`, or `None` if it is incomplete.
fn reply_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
        let end = buf.windows(2).position(|w| w == b"\r\n")?;
        Some((&buf[1..end], end + 2))
    }
    let first = *buf.first()?;
    let (body, used) = line(buf)?;
    match first {
        b'+' | b'-' | b':' => Some(used),
        b'$' => {
            let n: i64 = std::str::from_utf8(body).unwrap().parse().unwrap();
            if n < 0 {
                return Some(used);
            }
            let total = used + n as usize + 2;
            (buf.len() >= total).then_some(total)
        }
        b'*' => {
            let n: i64 = std::str::from_utf8(body).unwrap().parse().unwrap();
            let mut off = used;
            for _ in 0..n.max(0) {
                off += reply_len(&buf[off..])?;
            }
            Some(off)
        }
        other => panic!(
            "not a RESP2 reply (type byte {:?}): {:?}",
            other as char,
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ),
    }
}

/// Offsets of each reply in a stream holding exactly `n` complete replies.
fn split_replies(buf: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut off = 0;
    while out.len() < n && off < buf.len() {
        match reply_len(&buf[off..]) {
            Some(l) => {
                out.push(&buf[off..off + l]);
                off += l;
            }
            None => {
                out.push(&buf[off..]);
                break;
            }
        }
    }
    out
}

/// Writes `payload` in one `write_all` from a helper thread while reading `n` replies.
fn send_all_read_replies(port: u16, payload: &[u8], n: usize) -> Vec<u8> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let payload = payload.to_vec();
    let w = std::thread::spawn(move || writer.write_all(&payload));
    let mut reader = stream;
    let mut buf = Vec::new();
    let mut off = 0;
    let mut count = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while count < n {
        while count < n {
            match reply_len(&buf[off..]) {
                Some(l) => {
                    off += l;
                    count += 1;
                }
                None => break,
            }
        }
        if count == n {
            break;
        }
        let r = read_some(&mut reader, &mut chunk)
            .unwrap_or_else(|e| panic!("after {count} of {n} replies: {e}"));
        assert!(r > 0, "connection closed after {count} of {n} replies");
        buf.extend_from_slice(&chunk[..r]);
    }
    w.join().unwrap().expect("write of the pipeline");
    assert_eq!(off, buf.len(), "bytes beyond the {n} expected replies");
    buf
}

#[test]
fn giant_single_write_of_2000_commands_gets_byte_identical_replies() {
    let mut rng = StdRng::seed_from_u64(seed("pipeline_order"));
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let reference = RedisServer::start();

    const N: usize = 2000;
    let cmds = gen_commands(&mut rng, "raw:", N);
    let mut payload = Vec::new();
    for c in &cmds {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_slice()).collect();
        payload.extend_from_slice(&resp(&args));
    }
    eprintln!("pipeline payload: {} bytes", payload.len());

    let want = send_all_read_replies(reference.port, &payload, N);

    let mut raw = proxy.raw();
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = raw.stream.try_clone().unwrap();
    let payload2 = payload.clone();
    let w = std::thread::spawn(move || writer.write_all(&payload2));
    let got = raw.read_exact_n(want.len());
    w.join()
        .unwrap()
        .expect("write of the pipeline to slotgate");

    if got != want {
        let g = split_replies(&got, N);
        let e = split_replies(&want, N);
        let i = (0..N)
            .find(|&i| g.get(i) != e.get(i))
            .unwrap_or(N.min(g.len()));
        panic!(
            "reply #{i} to `{}` differs:\n   slotgate: {:?}\n   redis:    {:?}",
            cmds.get(i).map(show).unwrap_or_default(),
            g.get(i).map(|b| String::from_utf8_lossy(b)),
            e.get(i).map(|b| String::from_utf8_lossy(b)),
        );
    }
    // Nothing extra after the 2000 replies: the next reply is the PING's.
    raw.roundtrip(b"PING\r\n", b"+PONG\r\n");
}

#[test]
fn interleaved_small_pipelines_keep_order_across_shards() {
    // Replies must come back in request order even when an early command goes to a slow
    // path (multi-shard MGET) and later ones to single shards.
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let mut raw = proxy.raw();
    let keys: Vec<String> = (0..30).map(|i| format!("order:{i}")).collect();
    let mut req = Vec::new();
    let mut expected = Vec::new();
    for k in &keys {
        req.extend(resp(&[b"SET", k.as_bytes(), k.as_bytes()]));
        expected.extend_from_slice(b"+OK\r\n");
    }
    for round in 0..20 {
        let mut mget: Vec<&[u8]> = vec![b"MGET"];
        mget.extend(keys.iter().map(|k| k.as_bytes()));
        req.extend(resp(&mget));
        expected.extend(format!("*{}\r\n", keys.len()).into_bytes());
        for k in &keys {
            expected.extend(format!("${}\r\n{k}\r\n", k.len()).into_bytes());
        }
        for k in keys.iter().skip(round % 3).step_by(3) {
            req.extend(resp(&[b"GET", k.as_bytes()]));
            expected.extend(format!("${}\r\n{k}\r\n", k.len()).into_bytes());
        }
        req.extend(resp(&[b"PING", format!("r{round}").as_bytes()]));
        expected.extend(format!("${}\r\nr{round}\r\n", format!("r{round}").len()).into_bytes());
    }
    raw.roundtrip(&req, &expected);
}

/// Commands cut into many small writes (so reads end mid-command, and a partial command stays
/// buffered while the rest arrives) get the same replies as in one write.
#[test]
fn commands_cut_across_many_small_writes_are_answered_in_order() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start(&[&shard]);
    let mut c = proxy.raw();
    c.stream.set_nodelay(true).unwrap();
    let n = 300;
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for i in 0..n {
        let v = vec![b'a' + (i % 26) as u8; 1 + (i * 37) % 3000];
        let k = format!("cut{i}");
        wire.extend_from_slice(&resp(&[b"SET", k.as_bytes(), &v]));
        wire.extend_from_slice(&resp(&[b"GET", k.as_bytes()]));
        want.push(b"+OK\r\n".to_vec());
        let mut g = format!("${}\r\n", v.len()).into_bytes();
        g.extend_from_slice(&v);
        g.extend_from_slice(b"\r\n");
        want.push(g);
    }
    let mut x: u64 = seed("commands_cut_across_many_small_writes");
    let mut at = 0;
    let mut writes = 0;
    while at < wire.len() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (1 + (x >> 33) as usize % 700).min(wire.len() - at);
        c.send(&wire[at..at + len]);
        at += len;
        writes += 1;
        if writes % 8 == 0 {
            // Needed: slow-writer pacing, so that the proxy's reads end mid-command.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let got = c.read_replies(2 * n);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "reply {i}");
    }
}
