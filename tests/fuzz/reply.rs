//! The reply framer (`ReplyScanner`, on every shard connection), RESP2 and RESP3, and the
//! scatter/gather merges that take shard replies apart (`fanout::Gather`). Shard replies are
//! input too: a buggy or hostile shard must not crash the proxy or shift replies onto the
//! wrong requests.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use slotgate::fanout::{Gather, GatherKind};
use slotgate::resp::scan::{array_elements, reply_integer};
use slotgate::resp::{Proto, ReplyScanner, ScanError};

use crate::wire::{self, R};
use crate::{Ctx, cuts, hex_short, short_list};

pub fn generate(r: &mut R) -> Vec<u8> {
    wire::traffic(r, wire::replies)
}

/// How a stream of replies was framed: each frame's length and push flag, then how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Framing {
    frames: Vec<(usize, bool)>,
    /// `Ok(n)`: waiting for more bytes, `n` of them left over; `Err`: not RESP.
    end: Result<usize, ScanError>,
}

impl Framing {
    fn summary(&self) -> String {
        let lens: Vec<usize> = self.frames.iter().map(|f| f.0).collect();
        format!("frames {} then {:?}", short_list(&lens), self.end)
    }
}

/// Frames `input` as a shard connection does, the bytes arriving in chunks that end at each
/// of `ends`: scan the buffer after every read, hand out each complete frame, keep the rest.
fn frame_stream(input: &[u8], ends: &[usize]) -> Result<Framing, String> {
    let mut sc = ReplyScanner::new();
    // The buffer holds input[start..fed]: what has arrived and is not handed out yet.
    let mut start = 0;
    let mut frames = Vec::new();
    for &fed in ends {
        loop {
            let buf = &input[start..fed];
            match sc.scan(buf) {
                Ok(Some(f)) => {
                    if f.len == 0 || f.len > buf.len() {
                        return Err(format!(
                            "a frame of {} bytes in a buffer of {}",
                            f.len,
                            buf.len()
                        ));
                    }
                    frames.push((f.len, f.push));
                    start += f.len;
                }
                Ok(None) => break,
                Err(e) => {
                    return Ok(Framing {
                        frames,
                        end: Err(e),
                    });
                }
            }
        }
    }
    Ok(Framing {
        frames,
        end: Ok(input.len() - start),
    })
}

pub fn check(input: &[u8], seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let mut r = R::new(seed);
    let whole = cx.ours(|| frame_stream(input, &[input.len()]))?;
    // The same frames whatever the read boundaries (the resumable path against the one-pass
    // fast path, and against itself).
    let mut splits = vec![cuts(&mut r, input.len()), cuts(&mut r, input.len())];
    if input.len() <= 256 {
        splits.push((1..=input.len()).collect());
    }
    for ends in &splits {
        let split = cx.ours(|| frame_stream(input, ends))?;
        if split != whole {
            return Err(format!(
                "framing depends on read boundaries (reads ending at {}): whole {}, split {}",
                short_list(ends),
                whole.summary(),
                split.summary()
            ));
        }
    }
    cx.count("frames", whole.frames.len() as u64);
    if whole.end.is_err() {
        cx.count("invalid streams", 1);
    }
    let mut at = 0;
    for &(len, push) in &whole.frames {
        let f = &input[at..at + len];
        cx.ours(|| frame_alone(f, push))?;
        at += len;
    }
    compare_with_redis_protocol(input, &whole, cx)
}

/// A frame does not depend on what follows it, and is the shortest complete prefix; its
/// elements (as the merges and pub/sub see them) are frames of their own.
fn frame_alone(f: &[u8], push: bool) -> Result<(), String> {
    let got = ReplyScanner::new().scan(f);
    if got.map(|o| o.map(|x| (x.len, x.push))) != Ok(Some((f.len(), push))) {
        return Err(format!(
            "a frame scanned alone gives {got:?}: {}",
            hex_short(f)
        ));
    }
    let short = ReplyScanner::new().scan(&f[..f.len() - 1]);
    if short != Ok(None) {
        return Err(format!(
            "a frame minus its last byte gives {short:?}, not incomplete: {}",
            hex_short(f)
        ));
    }
    if let Some(elems) = array_elements(f) {
        let mut prev = None;
        for &(s, e) in &elems {
            if s > e || e > f.len() || prev.is_some_and(|p| p != s) {
                return Err(format!(
                    "array_elements gives ranges {elems:?} in a frame of {} bytes",
                    f.len()
                ));
            }
            prev = Some(e);
            let el = ReplyScanner::new().scan(&f[s..e]);
            if el.map(|o| o.map(|x| x.len)) != Ok(Some(e - s)) {
                return Err(format!("element {s}..{e} is not one frame: {el:?}"));
            }
        }
        if prev.is_some_and(|p| p != f.len()) {
            return Err(format!(
                "array_elements' last element ends at {prev:?}, the frame at {}",
                f.len()
            ));
        }
    }
    if reply_integer(f).is_some() && f[0] != b':' {
        return Err("reply_integer read a non-integer frame".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Agreement with redis-protocol

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oracle {
    Complete(usize),
    Incomplete,
    Invalid,
    /// Outside what the comparison covers (or the decoder panicked).
    Unknown,
}

/// redis-protocol's decoders recurse once per nesting level: past this many aggregate
/// headers they are not asked (the framer itself has no such limit).
const ORACLE_MAX_AGGREGATES: usize = 64;

fn resp2_oracle(b: &[u8]) -> Oracle {
    match catch_unwind(|| redis_protocol::resp2::decode::decode_range(b)) {
        Ok(Ok(Some((_, n)))) => Oracle::Complete(n),
        Ok(Ok(None)) => Oracle::Incomplete,
        Ok(Err(_)) => Oracle::Invalid,
        Err(_) => Oracle::Unknown,
    }
}

/// RESP3: a complete frame, or a top-level streamed one (its header, its chunks or elements,
/// its end), whose total length is the frame's.
fn resp3_oracle(b: &[u8]) -> Oracle {
    use redis_protocol::resp3::decode::streaming::decode_range;
    use redis_protocol::resp3::types::{DecodedRangeFrame, FrameKind};
    let step = |at: usize| catch_unwind(|| decode_range(&b[at..]));
    let (kind, mut at) = match step(0) {
        // A chunk, stream end or HELLO inside a frame: redis-protocol reads them anywhere, the
        // framer only where a stream allows them.
        Ok(Ok(Some((DecodedRangeFrame::Complete(f), _)))) if stream_marker_inside(&f) => {
            return Oracle::Unknown;
        }
        Ok(Ok(Some((DecodedRangeFrame::Complete(_), n)))) => return Oracle::Complete(n),
        Ok(Ok(Some((DecodedRangeFrame::Streaming(s), n)))) => (s.kind, n),
        Ok(Ok(None)) => return Oracle::Incomplete,
        Ok(Err(_)) => return Oracle::Invalid,
        Err(_) => return Oracle::Unknown,
    };
    // redis-protocol reads `$-1`/`*-1` in RESP3 as streamed headers; not compared.
    if b.get(1) != Some(&b'?') {
        return Oracle::Unknown;
    }
    loop {
        match step(at) {
            Ok(Ok(Some((DecodedRangeFrame::Complete(f), n)))) => {
                let chunk = b[at] == b';';
                // Chunks belong in a streamed string, frames and `.` in an aggregate.
                if chunk != (kind == FrameKind::BlobString) {
                    return Oracle::Unknown;
                }
                at += n;
                if f.kind() == FrameKind::EndStream {
                    return Oracle::Complete(at);
                }
            }
            Ok(Ok(Some((DecodedRangeFrame::Streaming(_), _)))) => return Oracle::Unknown,
            Ok(Ok(None)) => return Oracle::Incomplete,
            Ok(Err(_)) => return Oracle::Invalid,
            Err(_) => return Oracle::Unknown,
        }
    }
}

/// Whether a decoded frame holds a chunk, a stream end or a HELLO (its elements, map entries
/// and attributes included).
fn stream_marker_inside(f: &redis_protocol::resp3::types::RangeFrame) -> bool {
    use redis_protocol::resp3::types::RangeFrame as F;
    let pairs = |m: &redis_protocol::resp3::types::RangeAttributes| {
        m.iter()
            .any(|(k, v)| stream_marker_inside(k) || stream_marker_inside(v))
    };
    let attributes = match f {
        F::ChunkedString(_) | F::Hello { .. } => return true,
        F::Null => return false,
        F::Array { data, attributes } | F::Push { data, attributes } => {
            if data.iter().any(stream_marker_inside) {
                return true;
            }
            attributes
        }
        F::Set { data, attributes } => {
            if data.iter().any(stream_marker_inside) {
                return true;
            }
            attributes
        }
        F::Map { data, attributes } => {
            if pairs(data) {
                return true;
            }
            attributes
        }
        F::BlobString { attributes, .. }
        | F::BlobError { attributes, .. }
        | F::SimpleString { attributes, .. }
        | F::SimpleError { attributes, .. }
        | F::Boolean { attributes, .. }
        | F::Number { attributes, .. }
        | F::Double { attributes, .. }
        | F::BigNumber { attributes, .. }
        | F::VerbatimString { attributes, .. } => attributes,
    };
    attributes.as_ref().is_some_and(pairs)
}

/// A deliberate difference from redis-protocol explains a disagreement on `b`.
fn excused(b: &[u8]) -> Option<&'static str> {
    // Lines end at their first CR; the byte after it is not checked (as Redis reads
    // requests). redis-protocol looks for CRLF, so a lone CR ends a line for one and not
    // the other. Redis never sends one in a line.
    if lone_cr(b) {
        return Some("lone CR");
    }
    // Counts and lengths are read as Redis's string2ll does: no `+`, no leading zero, no
    // `-0`. redis-protocol uses Rust's integer parsing, which takes them.
    if non_canonical_number(b) {
        return Some("non-canonical length");
    }
    // A RESP3 stream end (`.`), chunk (`;`) or HELLO (`H`) is not a reply on its own, and a
    // stream end or chunk is framed only where a stream allows it (redis-protocol takes
    // them anywhere, e.g. `.` as an element of a set).
    if b.first().is_some_and(|c| b".;H".contains(c)) {
        return Some("stream marker or HELLO at top level");
    }
    let mut lines = b.split(|&c| c == b'\n');
    if lines.any(|l| l.starts_with(b";") || l.starts_with(b".") || l.get(1) == Some(&b'?')) {
        return Some("streamed RESP3");
    }
    None
}

/// A CR not followed by LF (a CR at the very end is just incomplete).
pub fn lone_cr(b: &[u8]) -> bool {
    b.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n')
}

/// A count or length line whose number Rust parses but Redis's `string2ll` does not.
pub fn non_canonical_number(b: &[u8]) -> bool {
    for (i, &c) in b.iter().enumerate() {
        if !b"$*%~>|=!;".contains(&c) || !(i == 0 || b[i - 1] == b'\n') {
            continue;
        }
        let rest = &b[i + 1..];
        let Some(cr) = rest.iter().position(|&c| c == b'\r') else {
            continue;
        };
        let t = &rest[..cr];
        let rust = std::str::from_utf8(t)
            .ok()
            .is_some_and(|s| s.parse::<i128>().is_ok());
        if rust && slotgate::resp::request::parse_i64(t).is_none() {
            return true;
        }
    }
    false
}

fn compare_with_redis_protocol(input: &[u8], whole: &Framing, cx: &mut Ctx) -> Result<(), String> {
    let aggregates = input.iter().filter(|c| b"*%~>|".contains(c)).count();
    if input.is_empty() || aggregates > ORACLE_MAX_AGGREGATES {
        return Ok(());
    }
    let (o2, o3) = (resp2_oracle(input), resp3_oracle(input));
    let ours = match (whole.frames.first(), whole.end) {
        (Some(&(n, _)), _) => Oracle::Complete(n),
        (None, Ok(_)) => Oracle::Incomplete,
        (None, Err(_)) => Oracle::Invalid,
    };
    let expected = match (o2, o3) {
        (Oracle::Complete(n), _) | (_, Oracle::Complete(n)) => Some(n),
        _ => None,
    };
    // Where the decoder reads a whole frame, the framer reads the same one; where the framer
    // reads one, the decoder does not wait for more bytes. (The framer checks framing only,
    // so it takes frames the decoder rejects for their content: `:abc`, `#x`, a map key
    // that is an array …)
    let disagree = match expected {
        Some(n) => ours != Oracle::Complete(n),
        None => {
            matches!(ours, Oracle::Complete(_))
                && o2 == Oracle::Incomplete
                && o3 == Oracle::Incomplete
        }
    };
    if !disagree {
        cx.count(
            if expected.is_some() {
                "agree with redis-protocol"
            } else {
                "not decoded by redis-protocol"
            },
            1,
        );
        return Ok(());
    }
    let span = match (ours, expected) {
        (Oracle::Complete(a), Some(b)) => a.max(b),
        (Oracle::Complete(a), None) => a,
        (_, Some(b)) => b,
        _ => input.len(),
    };
    if let Some(why) = excused(&input[..span.min(input.len())]) {
        cx.count(why, 1);
        return Ok(());
    }
    Err(format!(
        "framer and redis-protocol disagree on the first frame: ours {ours:?}, \
         redis-protocol RESP2 {o2:?}, RESP3 {o3:?}"
    ))
}

// ---------------------------------------------------------------------------------------
// Scatter/gather merges

/// Up to four shard replies (the complete frames at the front of the input) merged by every
/// kind of gather, in RESP2 and RESP3: no panic, and the client gets exactly one frame.
pub fn check_gather(input: &[u8], seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let mut r = R::new(seed);
    let framing = frame_stream(input, &[input.len()])?;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut at = 0;
    for &(len, _) in framing.frames.iter().take(4) {
        parts.push(Bytes::copy_from_slice(&input[at..at + len]));
        at += len;
    }
    if parts.is_empty() {
        return Ok(());
    }
    let n = parts.len();
    for proto in [Proto::Resp2, Proto::Resp3] {
        let kinds: Vec<(&str, GatherKind, usize)> = vec![
            ("in order", in_order(&mut r, &parts), n),
            ("sum", GatherKind::SumIntegers, n),
            ("all ok", GatherKind::AllOk, n),
            ("concat", GatherKind::ConcatArrays, n),
            ("same", GatherKind::Same, n),
            ("and", GatherKind::AndIntArrays, n),
            ("any ok", GatherKind::AnyOk, n),
            (
                "scan",
                {
                    let shards = 1 + r.below(4) as u64;
                    let shard = r.below(shards as usize) as u64;
                    let shards = if r.one_in(8) { u64::MAX } else { shards };
                    GatherKind::Scan { shard, shards }
                },
                1,
            ),
            ("random key", GatherKind::RandomKey { pick: r.below(8) }, n),
            ("config get", GatherKind::ConfigGet, 1),
        ];
        for (name, kind, parts_n) in kinds {
            let order: Vec<usize> = {
                let mut o: Vec<usize> = (0..parts_n).collect();
                for i in (1..o.len()).rev() {
                    o.swap(i, r.below(i + 1));
                }
                o
            };
            let merged = cx.ours(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    let mut g = Gather::new(kind, parts_n, proto);
                    let mut out = None;
                    for &i in &order {
                        out = g.put(i, parts[i].clone());
                    }
                    out
                }))
            });
            let merged = match merged {
                Ok(m) => m,
                Err(p) => {
                    return Err(format!(
                        "gather '{name}' ({proto:?}) panicked on parts {}: {}",
                        parts_hex(&parts[..parts_n]),
                        crate::panic_text(&p)
                    ));
                }
            };
            let Some(m) = merged else {
                return Err(format!("gather '{name}' gave nothing after its last part"));
            };
            let f = ReplyScanner::new().scan(&m);
            if f.map(|o| o.map(|x| x.len)) != Ok(Some(m.len())) {
                return Err(format!(
                    "gather '{name}' ({proto:?}) built a reply that is not one frame ({f:?}): \
                     {} from parts {}",
                    hex_short(&m),
                    parts_hex(&parts[..parts_n])
                ));
            }
            cx.count("merges", 1);
        }
    }
    Ok(())
}

fn parts_hex(parts: &[Bytes]) -> String {
    parts
        .iter()
        .map(|p| hex_short(p))
        .collect::<Vec<_>>()
        .join(", ")
}

/// MGET's merge: each part's elements belong to some of the keys, in a random key order;
/// usually as many keys as the part has elements, sometimes not.
fn in_order(r: &mut R, parts: &[Bytes]) -> GatherKind {
    let counts: Vec<usize> = parts
        .iter()
        .map(|p| match array_elements(p) {
            Some(e) if !r.one_in(6) => e.len().min(64),
            _ => r.below(4),
        })
        .collect();
    let total: usize = counts.iter().sum();
    let mut keys: Vec<u32> = (0..total as u32).collect();
    for i in (1..keys.len()).rev() {
        keys.swap(i, r.below(i + 1));
    }
    let mut positions = Vec::new();
    let mut at = 0;
    for c in counts {
        positions.push(keys[at..at + c].to_vec());
        at += c;
    }
    GatherKind::ArrayInOrder { positions, total }
}
