//! Invalidation from the origin's side (issue 15.6): `POST /invalidate` on the admin
//! listener and `SLOTGATE.INVALIDATE` clear keys (or every key under a prefix) in the shards,
//! and tell every slotgate instance in front of those shards, over the pub/sub channel
//! [`CHANNEL`], to drop its own state for them: negative entries, and fills in flight, which
//! then do not store their older value.
//!
//! Each instance keeps one connection of its own subscribed to the channel (on the first
//! shard; in cluster mode a PUBLISH reaches every node's subscribers), opened again a second
//! after it is lost. A message is `K` and the keys as a RESP array, or `P` and a prefix.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::OwnedFrame;

use super::ReadThrough;

/// The channel every instance listens on.
pub const CHANNEL: &str = "__slotgate:invalidate";

/// Most keys one SCAN step of a prefix invalidation asks a shard for.
const SCAN_COUNT: &[u8] = b"1000";

/// What to clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Keys(Vec<Bytes>),
    Prefix(Bytes),
}

impl Invalidation {
    /// The channel message.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            Invalidation::Keys(keys) => {
                b.extend_from_slice(b"K");
                let args: Vec<&[u8]> = keys.iter().map(|k| k.as_ref()).collect();
                crate::resp::request::push_command(&mut b, &args);
            }
            Invalidation::Prefix(p) => {
                b.extend_from_slice(b"P");
                b.extend_from_slice(p);
            }
        }
        b.freeze()
    }

    /// A channel message (`None` for one of another shape).
    pub fn decode(m: &[u8]) -> Option<Invalidation> {
        match m.split_first()? {
            (b'P', p) => Some(Invalidation::Prefix(Bytes::copy_from_slice(p))),
            (b'K', rest) => {
                crate::resp::scan::array_elements(rest)?;
                Some(Invalidation::Keys(crate::resp::scan::bulk_strings(rest)))
            }
            _ => None,
        }
    }
}

impl ReadThrough {
    /// Drops this instance's state for what `inv` names: negative entries end, and fills in
    /// flight will not store.
    pub fn forget(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Keys(keys) => keys.iter().for_each(|k| self.note_write(k)),
            Invalidation::Prefix(p) => self.note_prefix(p),
        }
    }
}

/// The PUBLISH that tells every instance.
pub fn publish_command(inv: &Invalidation) -> Bytes {
    crate::resp::request::command(&[b"PUBLISH", CHANNEL.as_bytes(), &inv.encode()])
}

/// `prefix*` as a SCAN pattern: the prefix's glob characters escaped.
pub fn match_pattern(prefix: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + 2);
    for &c in prefix {
        if matches!(c, b'*' | b'?' | b'[' | b']' | b'\\') {
            p.push(b'\\');
        }
        p.push(c);
    }
    p.push(b'*');
    p
}

/// An invalidation asked for on the admin listener, carried out by worker 0 (whose shard
/// connections follow the layout and its redirects); the number of keys deleted comes back.
pub struct Job {
    pub what: Invalidation,
    pub done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Worker 0's side: carries out each job.
pub async fn serve_jobs(
    w: std::rc::Rc<crate::worker::Worker>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
) {
    while let Some(job) = jobs.recv().await {
        let result = run(&w, &job.what).await;
        let _ = job.done.send(result);
    }
}

/// Deletes the keys (or every key under the prefix, SCAN on every primary), forgets them
/// here, and tells the other instances.
async fn run(w: &crate::worker::Worker, what: &Invalidation) -> Result<u64, String> {
    let rt = &w.shared.readthrough;
    // (Before the deletes: a fill finishing meanwhile must not store.)
    rt.forget(what);
    let mut cleared = 0u64;
    match what {
        Invalidation::Keys(keys) => {
            for k in keys {
                cleared += delete(w, k).await?;
            }
        }
        Invalidation::Prefix(prefix) => {
            // The keys, then the leases of keys under the prefix (those of keys without a
            // hash tag have it in braces).
            let lease = super::lease::PREFIX;
            let patterns = [
                (match_pattern(prefix), true),
                ([lease, &match_pattern(prefix)].concat(), false),
                ([lease, b"\\{", &match_pattern(prefix)].concat(), false),
            ];
            let primaries = w.live().slot_map.shard_count();
            for (pattern, count) in &patterns {
                for shard in 0..primaries {
                    let mut cursor = b"0".to_vec();
                    loop {
                        let scan = crate::resp::request::command(&[
                            b"SCAN", &cursor, b"MATCH", pattern, b"COUNT", SCAN_COUNT,
                        ]);
                        let r = w.request(shard, &scan).await;
                        let (next, keys) = scan_reply(&r)?;
                        for k in keys {
                            let n = delete(w, &k).await?;
                            if *count {
                                cleared += n;
                            }
                        }
                        if next == b"0" {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
    }
    rt.forget(what);
    let r = w.request(0, &publish_command(what)).await;
    if r.first() == Some(&b'-') {
        tracing::warn!(
            "read-through invalidation: telling the other instances failed: {}",
            String::from_utf8_lossy(&r).trim_end()
        );
    }
    Ok(cleared)
}

/// Deletes `key` where it lives, and its lease (a remembered `404` in it, a fill in flight:
/// see `lease`): how many keys that deleted (0 or 1; the lease is not counted).
async fn delete(w: &crate::worker::Worker, key: &[u8]) -> Result<u64, String> {
    use super::Context;
    if let Some(release) = super::lease::release_command(key) {
        let _ = w.request_for_key(key, &release).await;
    }
    let r = w
        .request_for_key(key, &crate::resp::request::command(&[b"DEL", key]))
        .await;
    match crate::resp::scan::reply_integer(&r) {
        Some(n) => Ok(n.max(0) as u64),
        None => Err(String::from_utf8_lossy(&r).trim_end().to_string()),
    }
}

/// A SCAN reply: the next cursor and the keys.
fn scan_reply(r: &[u8]) -> Result<(Vec<u8>, Vec<Bytes>), String> {
    let bad = || format!("SCAN: {}", String::from_utf8_lossy(r).trim_end());
    let el = crate::resp::scan::array_elements(r).ok_or_else(bad)?;
    let (&(cs, ce), &(ks, ke)) = (el.first().ok_or_else(bad)?, el.get(1).ok_or_else(bad)?);
    let cursor = crate::resp::scan::bulk_body(&r[cs..ce])
        .ok_or_else(bad)?
        .to_vec();
    let list = &r[ks..ke];
    crate::resp::scan::array_elements(list).ok_or_else(bad)?;
    let keys = crate::resp::scan::bulk_strings(list);
    Ok((cursor, keys))
}

/// This instance's subscriber to [`CHANNEL`], for as long as the process runs: what another
/// instance (or this one) invalidated is forgotten here too.
pub async fn listen(shared: Arc<crate::worker::Shared>) {
    loop {
        // (Without read-through rules, no connection: a reload may add some.)
        let live = shared.live();
        let node = (!live.readthrough.is_empty())
            .then(|| live.shards.first().map(|a| a.to_string()))
            .flatten();
        drop(live);
        if let Some(node) = node {
            let access = crate::cluster::Access {
                auth: shared.settings.upstream_auth.first().cloned().flatten(),
                tls: shared.settings.upstream_tls.clone(),
            };
            if let Err(e) = subscribe(&node, &access, &shared.readthrough).await {
                tracing::debug!("read-through invalidation channel on {node}: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn subscribe(
    node: &str,
    access: &crate::cluster::Access,
    rt: &ReadThrough,
) -> Result<(), String> {
    let mut s = crate::cluster::connect(node, access).await?;
    match crate::cluster::call(&mut s, &[b"SUBSCRIBE", CHANNEL.as_bytes()]).await? {
        OwnedFrame::Array(_) => {}
        other => return Err(format!("SUBSCRIBE: {other:?}")),
    }
    let mut buf = Vec::with_capacity(4096);
    loop {
        let frame = crate::cluster::read_frame(&mut s, &mut buf).await?;
        if let OwnedFrame::Array(parts) = frame
            && let [OwnedFrame::BulkString(kind), _, OwnedFrame::BulkString(m)] = parts.as_slice()
            && kind.as_slice() == b"message"
            && let Some(inv) = Invalidation::decode(m)
        {
            rt.forget(&inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_keys_and_prefixes_byte_for_byte() {
        for inv in [
            Invalidation::Keys(vec![
                Bytes::from_static(b"label:a"),
                Bytes::from_static(b"\r\n$1"),
            ]),
            Invalidation::Keys(vec![]),
            Invalidation::Prefix(Bytes::from_static(b"label:")),
        ] {
            assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
        }
        assert_eq!(Invalidation::decode(b"X"), None);
        assert_eq!(match_pattern(b"a*b?[c]\\"), b"a\\*b\\?\\[c\\]\\\\*");
    }
}
