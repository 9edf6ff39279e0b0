//! Scatter/gather: commands split over several shards, and how their replies merge.
//!
//! One strategy per kind ([`Merge`]), implemented once here: a [`Gather`] collects one reply
//! per part and, when the last arrives, builds the client's reply. A part that failed (a
//! shard error such as `-ERR shard unavailable` or `-WRONGTYPE`) makes the whole reply that
//! error, as Redis Cluster proxies do.

use bytes::{Bytes, BytesMut};

use crate::command::Merge;
use crate::resp::reply::{self, Proto};
use crate::resp::request::push_header;
use crate::resp::scan::{array_elements, reply_integer};

/// How the parts of a gathered reply combine.
pub enum GatherKind {
    /// MGET: `positions[part]` lists, for each element of that part's array, its index in the
    /// client's key order; `total` keys in all.
    ArrayInOrder {
        positions: Vec<Vec<u32>>,
        total: usize,
    },
    SumIntegers,
    AllOk,
    ConcatArrays,
    Same,
    AndIntArrays,
    AnyOk,
    /// SCAN on one shard: rewrite the cursor so it also names the shard.
    Scan {
        shard: u64,
        shards: u64,
    },
    /// RANDOMKEY over all shards: one of the non-nil replies, chosen by `pick`.
    RandomKey {
        pick: usize,
    },
    /// INFO: the shards' INFO texts, turned into the proxy's INFO by `build`.
    Info(InfoBuilder),
    /// CONFIG GET on one shard, without the shard's secrets.
    ConfigGet,
    /// SLOWLOG GET: every shard's entries and slotgate's own (`own`), newest first, at most
    /// `count` (`None`: all), each with an id unique over them (`id × (shards + 1) + source`)
    /// and the shard's address in place of the client address (slotgate's own, on a shard).
    /// slotgate's own entries name the client in the client-name field, as
    /// `slotgate client=<address>`, and their arguments are the command's name.
    Slowlog {
        count: Option<usize>,
        shards: Vec<String>,
        own: Vec<crate::slowlog::Entry>,
    },
    /// LATENCY LATEST / HISTORY / DOCTOR over every shard (see [`merge_latency`]).
    Latency {
        which: Merge,
        shards: Vec<String>,
    },
}

/// Builds the client's INFO reply from the shards' INFO replies.
pub type InfoBuilder = Box<dyn FnOnce(&[Bytes]) -> Bytes>;

impl GatherKind {
    /// The gather kind for a table merge.
    pub fn from_merge(m: Merge) -> Option<GatherKind> {
        Some(match m {
            Merge::SumIntegers => GatherKind::SumIntegers,
            Merge::AllOk => GatherKind::AllOk,
            Merge::ConcatArrays => GatherKind::ConcatArrays,
            Merge::Same => GatherKind::Same,
            Merge::AndIntArrays => GatherKind::AndIntArrays,
            Merge::AnyOk => GatherKind::AnyOk,
            Merge::ArrayInOrder
            | Merge::Scan
            | Merge::RandomKey
            | Merge::SlowlogLen
            | Merge::SlowlogEntries
            | Merge::LatencyLatest
            | Merge::LatencyHistory
            | Merge::LatencyDoctor => return None,
        })
    }
}

/// Replies collected so far for one split command.
pub struct Gather {
    /// The command, for INFO's `failed_calls` (set by the session).
    pub cmd: Option<&'static crate::command::CommandSpec>,
    /// slotgate's slow log has this command already (one entry, whatever its parts).
    pub slow_logged: bool,
    kind: GatherKind,
    parts: Vec<Option<Bytes>>,
    missing: usize,
    proto: Proto,
}

impl Gather {
    pub fn new(kind: GatherKind, parts: usize, proto: Proto) -> Self {
        Gather {
            cmd: None,
            slow_logged: false,
            kind,
            parts: vec![None; parts],
            missing: parts,
            proto,
        }
    }

    /// Stores part `i`; returns the merged reply once every part is in.
    pub fn put(&mut self, i: usize, reply: Bytes) -> Option<Bytes> {
        let slot = self.parts.get_mut(i)?;
        if slot.is_some() {
            return None;
        }
        *slot = Some(reply);
        self.missing -= 1;
        if self.missing > 0 {
            return None;
        }
        let parts: Vec<Bytes> = self.parts.iter_mut().map(|p| p.take().unwrap()).collect();
        Some(self.merge(parts))
    }

    fn merge(&mut self, parts: Vec<Bytes>) -> Bytes {
        // Any error part is the reply (the first one, in shard order).
        if !matches!(
            self.kind,
            GatherKind::RandomKey { .. } | GatherKind::Info(_) | GatherKind::AnyOk
        ) && let Some(e) = parts.iter().find(|p| p.first() == Some(&b'-'))
        {
            return e.clone();
        }
        match std::mem::replace(&mut self.kind, GatherKind::AllOk) {
            GatherKind::ArrayInOrder { positions, total } => {
                merge_in_order(&parts, &positions, total)
            }
            GatherKind::SumIntegers => {
                let mut sum: i64 = 0;
                for p in &parts {
                    match reply_integer(p) {
                        Some(n) => sum = sum.saturating_add(n),
                        None => return unexpected(p),
                    }
                }
                reply::integer(sum)
            }
            GatherKind::AllOk => match parts.iter().find(|p| p.as_ref() != reply::OK) {
                Some(other) => other.clone(),
                None => Bytes::from_static(reply::OK),
            },
            GatherKind::ConcatArrays => {
                let mut total = 0usize;
                let mut bodies = Vec::with_capacity(parts.len());
                for p in &parts {
                    match array_body(p) {
                        Some((n, body)) => {
                            total += n;
                            bodies.push(body);
                        }
                        None => return unexpected(p),
                    }
                }
                let mut out =
                    BytesMut::with_capacity(bodies.iter().map(|b| b.len()).sum::<usize>() + 16);
                push_header(&mut out, b'*', total);
                for b in bodies {
                    out.extend_from_slice(b);
                }
                out.freeze()
            }
            GatherKind::Scan { shard, shards } => rewrite_scan(&parts[0], shard, shards),
            GatherKind::ConfigGet => hide_secrets(&parts[0]),
            GatherKind::Same => match parts.iter().find(|p| **p != parts[0]) {
                None => parts[0].clone(),
                Some(_) => reply::Failure::ShardsDisagree.to_reply(),
            },
            GatherKind::AndIntArrays => {
                let mut acc: Option<Vec<bool>> = None;
                for p in &parts {
                    let Some(elems) = array_elements(p) else {
                        return unexpected(p);
                    };
                    let bits: Vec<bool> =
                        elems.iter().map(|&(s, e)| &p[s..e] == b":1\r\n").collect();
                    acc = Some(match acc {
                        None => bits,
                        Some(a) => a.iter().zip(&bits).map(|(x, y)| *x && *y).collect(),
                    });
                }
                let acc = acc.unwrap_or_default();
                let mut out = BytesMut::with_capacity(8 + acc.len() * 4);
                push_header(&mut out, b'*', acc.len());
                for b in acc {
                    out.extend_from_slice(if b { b":1\r\n" } else { b":0\r\n" });
                }
                out.freeze()
            }
            // SCRIPT KILL, FUNCTION KILL: OK if a shard killed one; else an error other than
            // NOTBUSY (UNKILLABLE, an unavailable shard) if there is one; else NOTBUSY.
            GatherKind::AnyOk => parts
                .iter()
                .find(|p| p.as_ref() == reply::OK)
                .or_else(|| parts.iter().find(|p| !p.starts_with(b"-NOTBUSY")))
                .unwrap_or(&parts[0])
                .clone(),
            GatherKind::Slowlog { count, shards, own } => {
                merge_slowlog(&parts, count, &shards, &own)
            }
            GatherKind::Latency { which, shards } => {
                merge_latency(&parts, which, &shards, self.proto)
            }
            GatherKind::RandomKey { pick } => {
                let keys: Vec<&Bytes> = parts
                    .iter()
                    .filter(|p| p.first() == Some(&b'$') && p.as_ref() != reply::NULL_RESP2)
                    .collect();
                if keys.is_empty() {
                    // All empty (or failing): a shard error wins over nil.
                    match parts.iter().find(|p| p.first() == Some(&b'-')) {
                        Some(e) => e.clone(),
                        None => Bytes::from_static(reply::null(self.proto)),
                    }
                } else {
                    keys[pick % keys.len()].clone()
                }
            }
            GatherKind::Info(build) => build(&parts),
        }
    }
}

/// Places each part's array elements at their original key positions.
fn merge_in_order(parts: &[Bytes], positions: &[Vec<u32>], total: usize) -> Bytes {
    let order = match order_elements(parts, positions, total) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let len: usize = order.iter().map(|&(_, s, e)| e - s).sum();
    let mut out = BytesMut::with_capacity(len + 16);
    push_header(&mut out, b'*', total);
    for (p, s, e) in order {
        out.extend_from_slice(&parts[p][s..e]);
    }
    out.freeze()
}

/// Where each of the `total` keys' elements is, in the client's key order: `(part, start,
/// end)` in that part's array reply, whose elements belong to the keys at `positions[part]`.
/// `Err` with the reply when a part is not an array of as many elements as its keys.
pub fn order_elements(
    parts: &[Bytes],
    positions: &[Vec<u32>],
    total: usize,
) -> Result<Vec<(usize, usize, usize)>, Bytes> {
    let mut order = vec![(0, 0, 0); total];
    for (part, (p, pos)) in parts.iter().zip(positions).enumerate() {
        let Some(ranges) = array_elements(p) else {
            return Err(unexpected(p));
        };
        if ranges.len() != pos.len() {
            return Err(unexpected(p));
        }
        for (&(s, e), &i) in ranges.iter().zip(pos) {
            order[i as usize] = (part, s, e);
        }
    }
    Ok(order)
}

/// Parameters whose values are the shards' secrets (their password, replication and TLS key
/// credentials): slotgate's clients are not the shards' administrators.
const SECRET_PARAMETERS: &[&[u8]] = &[
    b"requirepass",
    b"masterauth",
    b"masteruser",
    b"tls-key-file-pass",
    b"tls-client-key-file-pass",
];

/// A CONFIG GET reply (name/value pairs: an array, or a RESP3 map) without the secret
/// parameters.
fn hide_secrets(p: &Bytes) -> Bytes {
    let Some(elems) = array_elements(p) else {
        return p.clone();
    };
    let mut kept = Vec::with_capacity(elems.len());
    for pair in elems.chunks(2) {
        let name = bulk_text(&p[pair[0].0..pair[0].1]);
        if !SECRET_PARAMETERS
            .iter()
            .any(|s| name.eq_ignore_ascii_case(s))
        {
            kept.extend_from_slice(pair);
        }
    }
    if kept.len() == elems.len() {
        return p.clone();
    }
    let mut out = BytesMut::with_capacity(p.len());
    if p[0] == b'%' {
        push_header(&mut out, b'%', kept.len() / 2);
    } else {
        push_header(&mut out, p[0], kept.len());
    }
    for (s, e) in kept {
        out.extend_from_slice(&p[s..e]);
    }
    out.freeze()
}

/// SLOWLOG GET's merge (see [`GatherKind::Slowlog`]); a shard's error is the reply.
fn merge_slowlog(
    parts: &[Bytes],
    count: Option<usize>,
    shards: &[String],
    own: &[crate::slowlog::Entry],
) -> Bytes {
    if let Some(e) = parts.iter().find(|p| p.first() == Some(&b'-')) {
        return e.clone();
    }
    // slotgate's own entries, encoded as a shard's would be, from source `shards.len()`.
    let mut own_parts = BytesMut::new();
    push_header(&mut own_parts, b'*', own.len());
    for e in own {
        let client = format!(
            "slotgate client={}",
            e.client.map(|a| a.to_string()).unwrap_or_default()
        );
        // (Its arguments: the command's name, split as Redis's are: `slowlog`, `len`.)
        let words: Vec<&str> = e.command.split('|').collect();
        own_parts.extend_from_slice(
            format!("*6\r\n:{}\r\n:{}\r\n:{}\r\n", e.id, e.time, e.micros).as_bytes(),
        );
        push_header(&mut own_parts, b'*', words.len());
        for w in words.iter().chain([&e.shard.as_str(), &client.as_str()]) {
            push_header(&mut own_parts, b'$', w.len());
            own_parts.extend_from_slice(w.as_bytes());
            own_parts.extend_from_slice(b"\r\n");
        }
    }
    let own_parts = own_parts.freeze();
    let sources = shards.len() + 1;
    // (timestamp, id, shard, the entry and its element ranges)
    let mut entries = Vec::new();
    for (shard, p) in parts.iter().chain([&own_parts]).enumerate() {
        for (s, e) in array_elements(p).unwrap_or_default() {
            let entry = p.slice(s..e);
            let Some(el) = array_elements(&entry) else {
                continue;
            };
            let int = |i: usize| {
                el.get(i)
                    .and_then(|&(a, b)| reply_integer(&entry[a..b]))
                    .unwrap_or(0)
            };
            entries.push((int(1), int(0), shard, entry, el));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse((e.0, e.1)));
    entries.truncate(count.unwrap_or(usize::MAX));
    let mut out = BytesMut::new();
    push_header(&mut out, b'*', entries.len());
    for (_, id, shard, entry, el) in &entries {
        push_header(&mut out, b'*', el.len());
        for (i, &(a, b)) in el.iter().enumerate() {
            match i {
                0 => {
                    let unique = id.saturating_mul(sources as i64) + *shard as i64;
                    out.extend_from_slice(format!(":{unique}\r\n").as_bytes());
                }
                4 if *shard < shards.len() => {
                    let addr = shards.get(*shard).map_or("", String::as_str);
                    push_header(&mut out, b'$', addr.len());
                    out.extend_from_slice(addr.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                _ => out.extend_from_slice(&entry[a..b]),
            }
        }
    }
    out.freeze()
}

/// LATENCY over every shard; a shard's error is the reply.
/// - LATEST: every shard's `[event, time, latest, max]` entries, the event named
///   `<shard>/<event>`;
/// - HISTORY: every shard's `[time, latency]` samples, oldest first;
/// - DOCTOR: each shard's report under a `# <shard>` line.
fn merge_latency(parts: &[Bytes], which: Merge, shards: &[String], proto: Proto) -> Bytes {
    if let Some(e) = parts.iter().find(|p| p.first() == Some(&b'-')) {
        return e.clone();
    }
    let shard = |i: usize| shards.get(i).map_or("", String::as_str);
    match which {
        Merge::LatencyDoctor => {
            let mut text = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                text.extend_from_slice(format!("# {}\n", shard(i)).as_bytes());
                let t = bulk_text(p);
                // (A RESP3 verbatim string starts with its format.)
                text.extend_from_slice(t.strip_prefix(b"txt:").unwrap_or(t));
                text.push(b'\n');
            }
            reply::verbatim(proto, &text)
        }
        Merge::LatencyHistory => {
            let mut samples: Vec<(i64, Bytes)> = Vec::new();
            for p in parts {
                for (s, e) in array_elements(p).unwrap_or_default() {
                    let sample = p.slice(s..e);
                    let time = array_elements(&sample)
                        .and_then(|el| el.first().and_then(|&(a, b)| reply_integer(&sample[a..b])))
                        .unwrap_or(0);
                    samples.push((time, sample));
                }
            }
            samples.sort_by_key(|(t, _)| *t);
            let mut out = BytesMut::new();
            push_header(&mut out, b'*', samples.len());
            for (_, s) in &samples {
                out.extend_from_slice(s);
            }
            out.freeze()
        }
        _ => {
            let mut out = BytesMut::new();
            let mut entries = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                for (s, e) in array_elements(p).unwrap_or_default() {
                    entries.push((i, p.slice(s..e)));
                }
            }
            push_header(&mut out, b'*', entries.len());
            for (i, entry) in &entries {
                let el = array_elements(entry).unwrap_or_default();
                push_header(&mut out, b'*', el.len());
                for (k, &(a, b)) in el.iter().enumerate() {
                    if k == 0 {
                        let name = format!(
                            "{}/{}",
                            shard(*i),
                            String::from_utf8_lossy(bulk_text(&entry[a..b]))
                        );
                        push_header(&mut out, b'$', name.len());
                        out.extend_from_slice(name.as_bytes());
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(&entry[a..b]);
                    }
                }
            }
            out.freeze()
        }
    }
}

/// The text of a bulk or simple string reply (empty for anything else, a null bulk
/// `$-1` included: found by the fuzzer, it used to panic).
fn bulk_text(f: &[u8]) -> &[u8] {
    let end = f.len().saturating_sub(2);
    let text = match f.first() {
        Some(b'$') => f
            .iter()
            .position(|&b| b == b'\n')
            .and_then(|i| f.get(i + 1..end)),
        Some(b'+') => f.get(1..end),
        _ => None,
    };
    text.unwrap_or_default()
}

/// `(element count, bytes after the header)` of an array reply.
fn array_body(p: &[u8]) -> Option<(usize, &[u8])> {
    if p.first() != Some(&b'*') && p.first() != Some(&b'~') {
        return None;
    }
    let cr = p.iter().position(|&c| c == b'\r')?;
    let n = crate::resp::request::parse_i64(&p[1..cr])?;
    Some((n.max(0) as usize, &p[cr + 2..]))
}

/// SCAN's reply `*2 $cursor *keys` with the shard's cursor re-encoded to name the shard:
/// proxy cursor = shard_cursor * shards + shard; a finished shard moves on to the next one,
/// and the last one ends the iteration with 0.
fn rewrite_scan(p: &Bytes, shard: u64, shards: u64) -> Bytes {
    let Some(elems) = array_elements(p) else {
        return unexpected(p);
    };
    if elems.len() != 2 {
        return unexpected(p);
    }
    let (cs, ce) = elems[0];
    let cursor_frame = &p[cs..ce];
    let Some(cursor) = bulk_u64(cursor_frame) else {
        return unexpected(p);
    };
    let next = if cursor == 0 {
        if shard + 1 < shards { shard + 1 } else { 0 }
    } else {
        match cursor
            .checked_mul(shards)
            .and_then(|c| c.checked_add(shard))
        {
            Some(c) => c,
            None => return Bytes::from_static(reply::SCAN_CURSOR_TOO_LARGE),
        }
    };
    let mut buf = itoa::Buffer::new();
    let c = buf.format(next);
    let mut out = BytesMut::with_capacity(p.len() + 8);
    out.extend_from_slice(b"*2\r\n");
    push_header(&mut out, b'$', c.len());
    out.extend_from_slice(c.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&p[elems[1].0..elems[1].1]);
    out.freeze()
}

/// The unsigned integer inside a `$n\r\n<digits>\r\n` frame.
fn bulk_u64(frame: &[u8]) -> Option<u64> {
    let cr = frame.iter().position(|&c| c == b'\r')?;
    let body = frame.get(cr + 2..frame.len().checked_sub(2)?)?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// A shard reply of an unexpected shape (should not happen with a real Redis).
fn unexpected(p: &[u8]) -> Bytes {
    reply::Failure::UnexpectedReply(p).to_reply()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    #[test]
    fn config_get_tolerates_null_and_odd_elements() {
        // A shard's (or a buggy shard's) CONFIG GET reply with a null name, and one with an
        // odd element count: passed through, no panic (fuzzer finds).
        for reply in ["*2\r\n$-1\r\n*0\r\n", "*1\r\n$-1\r\n", "*2\r\n+\r\n$-1\r\n"] {
            let r = b(reply);
            assert_eq!(hide_secrets(&r), r, "{reply:?}");
        }
        let r = b("*4\r\n$-1\r\n$1\r\nx\r\n$11\r\nrequirepass\r\n$2\r\npw\r\n");
        assert_eq!(&hide_secrets(&r)[..], b"*2\r\n$-1\r\n$1\r\nx\r\n");
    }

    #[test]
    fn mget_merges_in_key_order() {
        let mut g = Gather::new(
            GatherKind::ArrayInOrder {
                positions: vec![vec![0, 2], vec![1]],
                total: 3,
            },
            2,
            Proto::Resp2,
        );
        assert!(g.put(1, b("*1\r\n$1\r\nb\r\n")).is_none());
        let m = g.put(0, b("*2\r\n$1\r\na\r\n$-1\r\n")).unwrap();
        assert_eq!(&m[..], b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n");
    }

    #[test]
    fn sums_and_errors() {
        let mut g = Gather::new(GatherKind::SumIntegers, 3, Proto::Resp2);
        g.put(0, b(":2\r\n"));
        g.put(1, b(":0\r\n"));
        assert_eq!(&g.put(2, b(":5\r\n")).unwrap()[..], b":7\r\n");
        let mut g = Gather::new(GatherKind::SumIntegers, 2, Proto::Resp2);
        g.put(0, b(":2\r\n"));
        assert_eq!(&g.put(1, b("-ERR x\r\n")).unwrap()[..], b"-ERR x\r\n");
    }

    #[test]
    fn scan_cursor_names_the_shard() {
        let reply = b("*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n");
        assert_eq!(
            &rewrite_scan(&reply, 1, 3)[..],
            b"*2\r\n$2\r\n52\r\n*1\r\n$1\r\nk\r\n"
        );
        let done = b("*2\r\n$1\r\n0\r\n*0\r\n");
        assert_eq!(&rewrite_scan(&done, 0, 3)[..], b"*2\r\n$1\r\n1\r\n*0\r\n");
        assert_eq!(&rewrite_scan(&done, 2, 3)[..], b"*2\r\n$1\r\n0\r\n*0\r\n");
    }

    #[test]
    fn keys_concatenate() {
        let mut g = Gather::new(GatherKind::ConcatArrays, 2, Proto::Resp2);
        g.put(0, b("*1\r\n$1\r\na\r\n"));
        let m = g.put(1, b("*0\r\n")).unwrap();
        assert_eq!(&m[..], b"*1\r\n$1\r\na\r\n");
    }
}
