//! Criterion benches of the pure hot paths: request parsing, reply framing, key → slot,
//! command lookup and a scatter merge. `cargo bench --bench hot_paths`.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slotgate::command;
use slotgate::fanout::{Gather, GatherKind};
use slotgate::resp::{Limits, Parsed, Proto, ReplyScanner, RequestParser};
use std::hint::black_box;

fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn parse_requests(c: &mut Criterion) {
    let value = vec![b'x'; 4096];
    let keys: Vec<String> = (0..10).map(|i| format!("key:{i:06}")).collect();
    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    mget.extend(keys.iter().map(|k| k.as_bytes()));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("get", resp(&[b"GET", b"key:000042"])),
        ("set_4k", resp(&[b"SET", b"key:000042", &value])),
        ("mget_10", resp(&mget)),
    ];
    let mut g = c.benchmark_group("parse_request");
    for (name, wire) in &cases {
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(name), wire, |b, wire| {
            let mut p = RequestParser::new();
            let limits = Limits::default();
            b.iter(|| match p.parse(black_box(wire), &limits, true).unwrap() {
                Parsed::Command { req, used } => black_box((req.argc(), used)),
                Parsed::Incomplete { .. } => unreachable!(),
            })
        });
    }
    g.finish();
}

fn frame_replies(c: &mut Criterion) {
    let mut array = b"*100\r\n".to_vec();
    for i in 0..100 {
        let v = format!("value-{i}");
        array.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    let mut bulk4k = b"$4096\r\n".to_vec();
    bulk4k.extend(std::iter::repeat_n(b'x', 4096));
    bulk4k.extend_from_slice(b"\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ok", b"+OK\r\n".to_vec()),
        (
            "bulk_100",
            [b"$100\r\n".as_slice(), &[b'v'; 100], b"\r\n"].concat(),
        ),
        ("bulk_4k", bulk4k),
        ("array_100", array),
    ];
    let mut g = c.benchmark_group("frame_reply");
    for (name, wire) in &cases {
        g.bench_with_input(BenchmarkId::from_parameter(name), wire, |b, wire| {
            let mut sc = ReplyScanner::new();
            b.iter(|| black_box(sc.scan(black_box(wire)).unwrap().unwrap().len))
        });
    }
    g.finish();
}

fn slots_and_lookup(c: &mut Criterion) {
    c.bench_function("key_slot", |b| {
        b.iter(|| slotgate::router::slot(black_box(b"user:{1000}:profile")))
    });
    c.bench_function("key_slot_plain_16b", |b| {
        b.iter(|| slotgate::router::slot(black_box(b"key:000000012345")))
    });
    c.bench_function("command_lookup_get", |b| {
        b.iter(|| command::lookup(black_box(b"get")).unwrap().arity)
    });
    c.bench_function("command_lookup_zrangebyscore", |b| {
        b.iter(|| command::lookup(black_box(b"ZRANGEBYSCORE")).unwrap().arity)
    });
}

fn merge_mget(c: &mut Criterion) {
    let part = |n: usize| {
        let mut b = format!("*{n}\r\n").into_bytes();
        for _ in 0..n {
            b.extend_from_slice(b"$10\r\n0123456789\r\n");
        }
        Bytes::from(b)
    };
    let (a, b2) = (part(5), part(5));
    c.bench_function("merge_mget_10_over_2", |b| {
        b.iter(|| {
            let kind = GatherKind::ArrayInOrder {
                positions: vec![vec![0, 2, 4, 6, 8], vec![1, 3, 5, 7, 9]],
                total: 10,
            };
            let mut g = Gather::new(kind, 2, Proto::Resp2);
            g.put(0, a.clone());
            black_box(g.put(1, b2.clone()).unwrap())
        })
    });
}

criterion_group!(
    benches,
    parse_requests,
    frame_replies,
    slots_and_lookup,
    merge_mget
);
criterion_main!(benches);
