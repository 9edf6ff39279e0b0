//! Property tests of the two parsers that face untrusted or external bytes: the request parser
//! (clients) and the reply framer (shards). redis-protocol's decoder is the oracle for RESP2
//! framing.

use bytes::{Buf, BytesMut};
use proptest::prelude::*;
use redis_protocol::resp2::types::OwnedFrame;
use slotgate::resp::{Limits, Parsed, ReplyScanner, RequestParser};

/// Parses everything in `chunks`, fed one chunk at a time, into argument lists (or the error).
fn parse_chunks(chunks: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>, String> {
    let mut p = RequestParser::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match p.parse(&buf, &Limits::default(), true) {
                Ok(Parsed::Command { req, used }) => {
                    out.push((0..req.argc()).map(|i| req.arg(i).to_vec()).collect());
                    buf.advance(used);
                }
                Ok(Parsed::Incomplete { used }) => {
                    buf.advance(used);
                    break;
                }
                Err(e) => return Err(String::from_utf8_lossy(&e.message()).into_owned()),
            }
        }
    }
    Ok(out)
}

fn encode(cmds: &[Vec<Vec<u8>>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in cmds {
        out.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
        for a in c {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fn commands() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    let arg = proptest::collection::vec(any::<u8>(), 0..40);
    let cmd = proptest::collection::vec(arg, 1..8);
    proptest::collection::vec(cmd, 1..10)
}

/// A RESP2 reply of bounded depth.
fn frame() -> impl Strategy<Value = OwnedFrame> {
    let leaf = prop_oneof![
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| OwnedFrame::SimpleString(s.into_bytes())),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| OwnedFrame::Error(format!("ERR {s}"))),
        any::<i64>().prop_map(OwnedFrame::Integer),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(OwnedFrame::BulkString),
        Just(OwnedFrame::Null),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(OwnedFrame::Array)
    })
}

fn encode_frame(f: &OwnedFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    redis_protocol::resp2::encode::extend_encode(&mut buf, &f.clone().into_bytes_frame(), false)
        .unwrap();
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any split of valid input parses to the same commands as the whole.
    #[test]
    fn any_split_parses_the_same(cmds in commands(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let wire = encode(&cmds);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&wire[last..p]);
            last = p;
        }
        chunks.push(&wire[last..]);
        prop_assert_eq!(parse_chunks(&chunks).unwrap(), cmds.clone());
        prop_assert_eq!(parse_chunks(&[&wire]).unwrap(), cmds);
    }

    /// Random bytes never panic, and the parser never claims more bytes than it was given.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_chunks(&[&data]);
        let mut p = RequestParser::new();
        let used = match p.parse(&data, &Limits::default(), false) {
            Ok(Parsed::Command { req, used }) => {
                // A multibulk command is a view of its bytes (an inline one is re-encoded).
                if data[0] == b'*' {
                    prop_assert!(req.raw.len() <= used);
                }
                used
            }
            Ok(Parsed::Incomplete { used }) => used,
            Err(_) => 0,
        };
        prop_assert!(used <= data.len());
    }

    /// The reply framer finds the same frame boundary as redis-protocol's decoder, whatever
    /// the read boundaries.
    #[test]
    fn framer_agrees_with_redis_protocol(frames in proptest::collection::vec(frame(), 1..6), cut in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        let mut lens = Vec::new();
        for f in &frames {
            let e = encode_frame(f);
            let (_, n) = redis_protocol::resp2::decode::decode(&e).unwrap().unwrap();
            prop_assert_eq!(n, e.len());
            lens.push(e.len());
            wire.extend_from_slice(&e);
        }
        // Scan with a first read cut at an arbitrary point, then the rest.
        let cut = cut.index(wire.len() + 1);
        let mut sc = ReplyScanner::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut avail = cut;
        loop {
            match sc.scan(&wire[pos..avail]).unwrap() {
                Some(f) => { got.push(f.len); pos += f.len; }
                None if avail < wire.len() => avail = wire.len(),
                None => break,
            }
        }
        prop_assert_eq!(got, lens);
    }

    /// Random bytes never panic the reply framer.
    #[test]
    fn framer_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ReplyScanner::new().scan(&data);
    }
}

/// A huge claimed count or length is not trusted: the parser waits for the bytes, keeping all
/// of them (nothing is used yet), and goes on from where it was when more arrive.
#[test]
fn huge_claimed_lengths_wait_for_bytes() {
    let mut p = RequestParser::new();
    let mut buf = b"*2147483647\r\n$536870912\r\nab".to_vec();
    assert!(matches!(
        p.parse(&buf, &Limits::default(), true),
        Ok(Parsed::Incomplete { used: 0 })
    ));
    buf.extend_from_slice(b"cd");
    assert!(matches!(
        p.parse(&buf, &Limits::default(), true),
        Ok(Parsed::Incomplete { used: 0 })
    ));
}

/// 100,000 nested arrays from a shard are framed without recursion (no stack overflow):
/// incomplete until the innermost element arrives, then one frame.
#[test]
fn deep_nesting_is_framed_without_recursion() {
    let mut deep = b"*1\r\n".repeat(100_000);
    let mut sc = ReplyScanner::new();
    assert_eq!(sc.scan(&deep), Ok(None));
    deep.extend_from_slice(b"$1\r\nx\r\n");
    assert_eq!(sc.scan(&deep).unwrap().unwrap().len, deep.len());
}
