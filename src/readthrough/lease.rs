//! Single-flight across slotgate instances (issue 15.3): a lease in the owning shard, in the
//! spirit of memcache leases.
//!
//! The instance that leads a miss first takes the key's lease, `SET lease token NX PX
//! timeout+margin`, where the lease key is `__slotgate:lease:` and the key, with a hash tag
//! that keeps it in the key's slot (see [`lease_key`]). It fetches, then stores the value only
//! if it still holds the lease (one script: the no-stale-set guarantee across instances, since
//! a write of the key through any instance deletes its lease), and ends the lease. For a
//! `404` (or a value it did not store) it leaves the outcome in the lease for a moment
//! (`=absent`, `=value …`); after an error it ends the lease, and the next miss tries again.
//! An instance that finds the lease taken does not call the origin: it polls the key and the
//! lease together every 15 ms until a value or an outcome shows, and takes the lease itself
//! if it disappears with neither (the holder died: the lease expires), all within the
//! rule's timeout, like a local waiter.

use super::*;

/// The prefix of every lease key.
pub const PREFIX: &[u8] = b"__slotgate:lease:";
/// How long a lease outlives its holder's timeout.
const MARGIN: Duration = Duration::from_millis(500);
/// How often a waiting instance looks.
const POLL: Duration = Duration::from_millis(15);
/// How long a `404` (or a value not stored) stays in the lease for the instances waiting.
const OUTCOME_KEPT: Duration = Duration::from_millis(500);

/// Stores the fill if the lease is still this holder's, and ends the lease.
const STORE: &str = "if redis.call('get',KEYS[2])==ARGV[1] then \
    redis.call('del',KEYS[2]) \
    return redis.call('set',KEYS[1],ARGV[2],'PX',ARGV[3],'NX') end return false";
/// Replaces the holder's lease with the fetch's outcome, for a moment.
const OUTCOME: &str = "if redis.call('get',KEYS[1])==ARGV[1] then \
    return redis.call('set',KEYS[1],ARGV[2],'PX',ARGV[3]) end return false";
/// Ends the holder's lease.
const END: &str = "if redis.call('get',KEYS[1])==ARGV[1] then \
    return redis.call('del',KEYS[1]) end return 0";

/// The lease key of `key`, in the key's slot: `__slotgate:lease:` and the key, whose own hash
/// tag then still decides the slot, or, for a key without one, the key inside braces. `None`
/// for an empty key and one that has a `}` but no hash tag (braces around it would make a
/// different tag).
pub fn lease_key(key: &[u8]) -> Option<Vec<u8>> {
    side_key(PREFIX, key)
}

/// A key of slotgate's own beside `key`, in its slot: `prefix` and the key, tagged as
/// [`lease_key`] says (also used for a value's validators, see `revalidate`).
pub(super) fn side_key(prefix: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let mut k = prefix.to_vec();
    let tagged = key.iter().position(|&b| b == b'{').is_some_and(|open| {
        key[open + 1..]
            .iter()
            .position(|&b| b == b'}')
            .is_some_and(|len| len > 0)
    });
    if tagged {
        k.extend_from_slice(key);
    } else if key.is_empty() || key.contains(&b'}') {
        return None;
    } else {
        k.push(b'{');
        k.extend_from_slice(key);
        k.push(b'}');
    }
    Some(k)
}

/// What the lease said.
pub(super) enum Lease {
    /// This instance holds it (with this token): fetch.
    Held(Bytes),
    /// Another instance's fetch ended with this.
    Settled(Outcome),
}

/// Takes `key`'s lease, or waits for the instance that holds it; `None` when the key can
/// have no lease (local single-flight only).
pub(super) async fn acquire(w: &dyn Context, rule: &Rule, key: &[u8]) -> Option<Lease> {
    let lease = lease_key(key)?;
    let deadline = Instant::now() + rule.timeout;
    let (token, take) = take_command(rule, &lease);
    loop {
        let r = w.request_for_key(key, &take).await;
        if r.starts_with(b"+OK") {
            return Some(Lease::Held(token));
        }
        if r.first() == Some(&b'-') {
            // (The shard refused: no lease, the fetch goes on as on one instance.)
            return None;
        }
        rule.stats.lease_waits.add(1);
        // Another instance holds it: its result shows in the key or the lease.
        loop {
            if Instant::now() + POLL >= deadline {
                return Some(Lease::Settled(super::fill::timeout_error(rule)));
            }
            tokio::time::sleep(POLL).await;
            let look = command(&[b"MGET", key, &lease]);
            let r = w.request_for_key(key, &look).await;
            let parts = crate::resp::scan::array_elements(&r)?;
            let part = |i: usize| {
                parts
                    .get(i)
                    .and_then(|&(s, e)| crate::resp::scan::bulk_body(&r[s..e]))
            };
            if let Some(v) = part(0) {
                return Some(Lease::Settled(Outcome::Value(Bytes::copy_from_slice(v))));
            }
            match part(1) {
                Some(b"=absent") => return Some(Lease::Settled(Outcome::Absent)),
                Some(v) if v.starts_with(b"=value ") => {
                    return Some(Lease::Settled(Outcome::Value(Bytes::copy_from_slice(
                        &v[b"=value ".len()..],
                    ))));
                }
                Some(_) => continue,
                // Gone without a result: the holder died (or its fill was not stored):
                // this instance takes over.
                None => break,
            }
        }
    }
}

/// One try at `key`'s lease (a background refresh): `Ok(Some(token))` taken, `Ok(None)` the
/// key can have no lease (refresh anyway), `Err(())` another instance holds it.
pub(super) async fn try_take(
    w: &dyn Context,
    rule: &Rule,
    key: &[u8],
) -> Result<Option<Bytes>, ()> {
    let Some(lease) = lease_key(key) else {
        return Ok(None);
    };
    let (token, take) = take_command(rule, &lease);
    let r = w.request_for_key(key, &take).await;
    match r.first() {
        Some(b'+') => Ok(Some(token)),
        Some(b'-') => Ok(None),
        _ => Err(()),
    }
}

/// Ends the holder's lease.
pub(super) async fn end(w: &dyn Context, key: &[u8], token: &[u8]) {
    if let Some(lease) = lease_key(key) {
        let cmd = command(&[b"EVAL", END.as_bytes(), b"1", &lease, token]);
        let _ = w.request_for_key(key, &cmd).await;
    }
}

/// The holder stores `body` for `px` if it still holds the lease, and ends it; whether it
/// stored.
pub(super) async fn store(
    w: &dyn Context,
    key: &[u8],
    token: &[u8],
    body: &[u8],
    px: &[u8],
) -> bool {
    let Some(lease) = lease_key(key) else {
        return false;
    };
    let cmd = command(&[
        b"EVAL",
        STORE.as_bytes(),
        b"2",
        key,
        &lease,
        token,
        body,
        px,
    ]);
    w.request_for_key(key, &cmd).await.starts_with(b"+OK")
}

/// The holder leaves the fetch's outcome (`404`, a value it did not store) in the lease for
/// the instances waiting on it, or ends the lease after an error (the next miss, here or
/// elsewhere, tries the origin again, as on one instance).
pub(super) async fn settle(w: &dyn Context, key: &[u8], token: &[u8], outcome: &Outcome) {
    let Some(lease) = lease_key(key) else {
        return;
    };
    let left: Vec<u8> = match outcome {
        Outcome::Absent => b"=absent".to_vec(),
        Outcome::Value(v) => [b"=value ".as_slice(), v].concat(),
        Outcome::Error(_) => return end(w, key, token).await,
    };
    let px = OUTCOME_KEPT.as_millis().to_string();
    let cmd = command(&[
        b"EVAL",
        OUTCOME.as_bytes(),
        b"1",
        &lease,
        token,
        &left,
        px.as_bytes(),
    ]);
    let _ = w.request_for_key(key, &cmd).await;
}

/// A write of `key` through slotgate: any instance's fill in flight for it loses its lease,
/// so it does not store.
pub fn release_command(key: &[u8]) -> Option<Bytes> {
    lease_key(key).map(|l| command(&[b"DEL", &l]))
}

/// A new token, and the command that takes `lease` with it for the rule's timeout plus
/// the margin.
fn take_command(rule: &Rule, lease: &[u8]) -> (Bytes, Bytes) {
    let token = Bytes::from(format!("{:016x}", random_token()));
    let px = (rule.timeout + MARGIN).as_millis().to_string();
    let take = command(&[b"SET", lease, &token, b"NX", b"PX", px.as_bytes()]);
    (token, take)
}

/// A lease token: random enough that two instances never share one.
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lives_in_its_keys_slot() {
        for key in [&b"label:1"[..], b"{user1}:x", b"a{b", b"x{y}{z}", b"{a}}"] {
            let lease = lease_key(key).unwrap();
            assert_eq!(
                crate::router::slot(&lease),
                crate::router::slot(key),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        for key in [&b"a}b"[..], b"", b"x{}y", b"{}", b"x{}y{z}"] {
            assert_eq!(lease_key(key), None, "{}", String::from_utf8_lossy(key));
        }
    }
}
