//! Revalidation (issue 15.2): a value loaded with an `ETag` or a `Last-Modified` is refreshed
//! with a conditional request (`If-None-Match` / `If-Modified-Since`), and the origin's `304
//! Not Modified` extends its TTL without sending the body again.
//!
//! The validators live in a key of slotgate's own beside the value, in its slot:
//! `__slotgate:validator:` and the key (tagged like a lease key), stored with the value's TTL.
//! They are bound to the exact bytes they describe: the side key holds the SHA-256 of the
//! value, and a refresh uses them only when the value it is refreshing has that digest. So a
//! client's write of the key (through any instance, or straight to the shard) needs no extra
//! command to forget them: the digest no longer matches, and the refresh asks without
//! conditions. A `304` extends the value only if it is still the one that was served (one
//! script, as the refresh's compare-and-set).

use super::*;

/// The prefix of every validator key.
pub const PREFIX: &[u8] = b"__slotgate:validator:";

/// Extends the value (and its validators) by `ARGV[2]` ms if it is still `ARGV[1]`.
const EXTEND: &str = "if redis.call('get',KEYS[1])==ARGV[1] then \
    redis.call('pexpire',KEYS[1],ARGV[2]) redis.call('pexpire',KEYS[2],ARGV[2]) \
    return 1 end return 0";

/// An origin's validators for one body: its `ETag` and `Last-Modified`, sent back as
/// `If-None-Match` and `If-Modified-Since`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<Bytes>,
    pub last_modified: Option<Bytes>,
}

impl Validators {
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }

    /// The side key's value for `value`, stored for `px` ms:
    /// `hex(sha256(value))\npx\netag\nlast-modified` (header values never hold a newline).
    fn encode(&self, value: &[u8], px: &[u8]) -> Vec<u8> {
        let mut out = hex_digest(value).into_bytes();
        for v in [
            Some(px),
            self.etag.as_deref(),
            self.last_modified.as_deref(),
        ] {
            out.push(b'\n');
            out.extend_from_slice(v.unwrap_or_default());
        }
        out
    }

    /// The validators in `blob` if they describe `value`, and how long the value was stored
    /// for (a `304` that says nothing of it keeps that lifetime).
    fn decode(blob: &[u8], value: &[u8]) -> Option<(Validators, Duration)> {
        let mut parts = blob.split(|&b| b == b'\n');
        let digest = parts.next()?;
        if digest != hex_digest(value).as_bytes() {
            return None;
        }
        let px: u64 = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let mut field = || {
            parts
                .next()
                .filter(|v| !v.is_empty())
                .map(Bytes::copy_from_slice)
        };
        let v = Validators {
            etag: field(),
            last_modified: field(),
        };
        (!v.is_empty()).then_some((v, Duration::from_millis(px)))
    }
}

fn hex_digest(value: &[u8]) -> String {
    crate::auth::sha256(value)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stores `validators` of `value` (just stored in `key` for `px` ms) beside it.
pub(super) async fn remember(
    w: &dyn Context,
    key: &[u8],
    validators: &Validators,
    value: &[u8],
    px: &[u8],
) {
    let Some(vkey) = side_key(key) else { return };
    if validators.is_empty() {
        return;
    }
    let set = command(&[b"SET", &vkey, &validators.encode(value, px), b"PX", px]);
    let r = w.request_for_key(key, &set).await;
    if r.first() == Some(&b'-') {
        tracing::debug!(
            "storing validators failed: {}",
            String::from_utf8_lossy(&r).trim_end()
        );
    }
}

/// The validators stored for `key` if they describe `value` (the one being refreshed), and
/// how long it was stored for.
pub(super) async fn recall(
    w: &dyn Context,
    key: &[u8],
    value: &[u8],
) -> Option<(Validators, Duration)> {
    let vkey = side_key(key)?;
    let r = w.request_for_key(key, &command(&[b"GET", &vkey])).await;
    Validators::decode(crate::resp::scan::bulk_body(&r)?, value)
}

/// After a `304`: extends `key` (and its validators) by `px` ms if it still holds `value`;
/// whether it did.
pub(super) async fn extend(w: &dyn Context, key: &[u8], value: &[u8], px: &[u8]) -> bool {
    let Some(vkey) = side_key(key) else {
        return false;
    };
    let cmd = command(&[b"EVAL", EXTEND.as_bytes(), b"2", key, &vkey, value, px]);
    w.request_for_key(key, &cmd).await.starts_with(b":1")
}

fn side_key(key: &[u8]) -> Option<Vec<u8>> {
    lease::side_key(PREFIX, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators_describe_one_value() {
        let v = Validators {
            etag: Some(Bytes::from_static(b"W/\"v1\"")),
            last_modified: None,
        };
        let blob = v.encode(b"body", b"2500");
        assert_eq!(
            Validators::decode(&blob, b"body"),
            Some((v.clone(), Duration::from_millis(2500)))
        );
        // A value written since (by a client) has another digest: no conditions.
        assert_eq!(Validators::decode(&blob, b"other"), None);
        let both = Validators {
            etag: Some(Bytes::from_static(b"\"x\"")),
            last_modified: Some(Bytes::from_static(b"Wed, 21 Oct 2015 07:28:00 GMT")),
        };
        assert_eq!(
            Validators::decode(&both.encode(b"", b"1"), b""),
            Some((both.clone(), Duration::from_millis(1)))
        );
        assert_eq!(Validators::decode(b"garbage", b"body"), None);
        assert_eq!(
            side_key(b"label:1").unwrap(),
            b"__slotgate:validator:{label:1}"
        );
        assert_eq!(
            side_key(b"{u1}:name").unwrap(),
            b"__slotgate:validator:{u1}:name"
        );
    }
}
