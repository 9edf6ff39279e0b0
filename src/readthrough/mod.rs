//! Read-through: a GET that misses on a key owned by a rule is loaded from an HTTP origin,
//! stored in the owning shard with a TTL, and returned — the cache-aside pattern moved out of
//! every application into the proxy.
//!
//! Guarantees (each tested in `tests/readthrough.rs`):
//! - **Single-flight.** Concurrent misses for one key, from any client on any worker, make one
//!   origin request ([`ReadThrough`]'s flights, a `DashMap` shared by the workers), and so do
//!   misses on several instances in front of the same shards (a lease in the shard: see
//!   [`lease`]). Every
//!   waiter gets its result and none waits longer than the rule's timeout. A miss whose GET reached the shard
//!   before a fill stored the value (so it saw nil) but is processed after the fill completed
//!   takes that fill's result instead of starting another one.
//! - **No stale set.** The fill stores with `SET key value PX ttl NX`. A write or delete of
//!   the key through slotgate while the fill is in flight marks it dirty, and a dirty fill is
//!   returned to its waiters but not stored. Background refreshes (stale-while-revalidate)
//!   replace the value only if it is still the one that was served (compare-and-set script).
//! - **Negative caching.** `404`/`410` are remembered for `negative_ttl` in the proxy (per
//!   process, bounded). A write of the key through slotgate ends the entry at once.
//! - **Errors are clear.** Origin `5xx`, timeouts, refused connections and oversized bodies
//!   give `-ERR origin …` for GET; nothing is stored.
//! - **Stale-while-revalidate / stale-if-error** (per rule, `grace`): values are stored for
//!   `ttl + grace`; a GET reads the value and its PTTL in one round trip (a small script), and
//!   a value whose remaining PTTL is within `grace` is served at once while one background
//!   refresh runs. When the origin fails, the stale value keeps being served until the hard
//!   TTL.

mod batch;
mod fill;
mod flights;
pub mod invalidate;
pub mod lease;
pub mod origin;
mod pending;
pub mod revalidate;
mod rules;

pub use fill::*;
pub use flights::*;
pub use pending::*;
pub use rules::*;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Deserialize;
use tokio::sync::watch;

use crate::queue::{ReplyQueue, Sink, SinkRef};
use crate::resp::reply::{self, Proto};
use crate::resp::request::command;
use crate::units::parse_duration;
/// What the read-through path needs of the worker it runs on: the shared read-through state,
/// the origin client, and one request of its own to the shard owning a key (stores,
/// refreshes). The worker implements it; read-through does not know the worker.
pub trait Context {
    fn readthrough(&self) -> &ReadThrough;
    /// The rules in force (a reload may replace them at any await).
    fn rules(&self) -> Arc<Rules>;
    fn origin(&self) -> &origin::OriginClient;
    /// Sends `cmd` to the shard owning `key` and waits for the reply.
    fn request_for_key<'a>(
        &'a self,
        key: &[u8],
        cmd: &'a [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + 'a>>;
}
use origin::{Fetched, OriginError, UrlTemplate};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_any_length_are_kept_whole() {
        for n in [
            0,
            1,
            KeyBuf::INLINE - 1,
            KeyBuf::INLINE,
            KeyBuf::INLINE + 1,
            1000,
        ] {
            let key: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let k = KeyBuf::new(&key);
            assert_eq!(k.as_slice(), &key[..], "length {n}");
            assert_eq!(&k.to_bytes()[..], &key[..], "length {n}");
            assert_eq!(matches!(k, KeyBuf::Inline { .. }), n <= KeyBuf::INLINE);
        }
    }

    fn rule(prefix: &str, name: Option<&str>) -> RuleConfig {
        RuleConfig {
            name: name.map(str::to_string),
            prefix: prefix.into(),
            origin: "http://127.0.0.1:1/{rest}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn longest_prefix_wins_and_duplicates_fail() {
        let r = Rules::build(&[rule("label:", None), rule("label:vip:", Some("vip"))]).unwrap();
        assert_eq!(r.find(b"label:vip:1").unwrap().name, "vip");
        assert_eq!(r.find(b"label:1").unwrap().name, "label:");
        assert!(r.find(b"other").is_none());
        assert!(Rules::build(&[rule("a:", None), rule("a:", Some("b"))]).is_err());
        assert!(Rules::build(&[rule("a:", Some("x")), rule("b:", Some("x"))]).is_err());
        let mut bad = rule("a:", None);
        bad.ttl = Some("ten minutes".into());
        assert!(Rules::build(&[bad]).is_err());
    }

    #[test]
    fn flag_syntax() {
        let r = RuleConfig::parse_flag(
            "label:=http://127.0.0.1:8080/labels/{rest};ttl=1m;negative_ttl=5s;timeout=200ms",
        )
        .unwrap();
        assert_eq!(r.prefix, "label:");
        assert_eq!(r.origin, "http://127.0.0.1:8080/labels/{rest}");
        assert_eq!(r.ttl.as_deref(), Some("1m"));
        assert_eq!(r.timeout.as_deref(), Some("200ms"));
        assert!(RuleConfig::parse_flag("nourl").is_err());
        assert!(RuleConfig::parse_flag("a=http://x/{key};bogus=1").is_err());
    }

    #[test]
    fn join_leads_once_and_late_misses_take_the_result() {
        let rt = ReadThrough::new(Duration::from_secs(1));
        let key = Bytes::from_static(b"k");
        let before = Instant::now();
        let Join::Leader(f) = rt.join(&key, before) else {
            panic!("first miss leads")
        };
        assert!(matches!(rt.join(&key, Instant::now()), Join::Waiter(_)));
        rt.note_write(b"k");
        assert!(f.is_dirty(), "a write marks the fill dirty");
        rt.finish(&f, Arc::new(Outcome::Absent));
        // A GET sent before the fill finished takes its outcome …
        assert!(matches!(rt.join(&key, before), Join::Done(_)));
        // … one sent after it leads a new fetch.
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(rt.join(&key, Instant::now()), Join::Leader(_)));
    }
}
