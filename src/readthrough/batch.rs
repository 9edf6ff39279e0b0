//! Batch loading (issue 15.4): a rule with a `batch_url` loads the misses of one MGET with
//! one origin request per `batch_max` keys instead of one per key. The URL's `{keys}` is the
//! missing ids (the keys without the rule's prefix, percent-encoded) joined by `batch_sep`;
//! the origin answers a JSON object keyed by id, whose values are stored as their JSON text;
//! an id the object does not have is a `404` for its key. Each key is still single-flight on
//! this instance: a key another request is already loading is waited for, not asked again.

use super::*;
use fill::Loaded;

/// A batch answer: the JSON text of each id's value.
type Answer = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;

/// A batch URL: `{keys}` between two literal parts.
#[derive(Debug, Clone)]
pub struct BatchUrl {
    before: String,
    after: String,
    pub sep: String,
    pub max: usize,
}

impl BatchUrl {
    /// `http(s)://host/path?ids={keys}`, with the separator and the largest batch.
    pub fn parse(s: &str, sep: &str, max: usize) -> Result<BatchUrl, String> {
        if max == 0 {
            return Err("batch_max must be > 0".into());
        }
        let (before, after) = s
            .split_once("{keys}")
            .ok_or_else(|| format!("batch_url '{s}' has no {{keys}}"))?;
        // The host is literal, as in an origin template (checked by its parser).
        let probe = format!("{before}k{after}");
        UrlTemplate::parse(&probe).map_err(|e| format!("batch_url: {e}"))?;
        let authority_only = before
            .split_once("://")
            .is_none_or(|(_, rest)| !rest.contains(['/', '?']));
        if after.contains("{keys}") || authority_only {
            return Err(format!(
                "batch_url '{s}': one {{keys}}, in the path or the query"
            ));
        }
        Ok(BatchUrl {
            before: before.to_string(),
            after: after.to_string(),
            sep: sep.to_string(),
            max,
        })
    }

    /// The URL for these ids.
    pub fn render(&self, ids: &[&[u8]]) -> String {
        let mut out = self.before.clone();
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.sep);
            }
            origin::percent_encode(id, &mut out);
        }
        out.push_str(&self.after);
        out
    }
}

/// The outcomes of `keys` (all of `rule`, missing in one MGET), in order.
pub(super) async fn load(
    w: &Rc<dyn Context>,
    rule: &Arc<Rule>,
    batch: &BatchUrl,
    keys: &[Bytes],
    sent_at: Instant,
) -> Vec<Arc<Outcome>> {
    let rt = w.readthrough();
    let mut out: Vec<Option<Arc<Outcome>>> = vec![None; keys.len()];
    let (mut leaders, mut waiters) = (Vec::new(), Vec::new());
    for (i, k) in keys.iter().enumerate() {
        if rt.negative_fresh(k) {
            rule.stats.negative_hits.add(1);
            out[i] = Some(Arc::new(Outcome::Absent));
            continue;
        }
        match rt.join(k, sent_at) {
            Join::Done(o) => out[i] = Some(o),
            Join::Waiter(f) => waiters.push((i, f)),
            Join::Leader(f) => leaders.push((i, f)),
        }
    }
    let chunks: Vec<_> = leaders
        .chunks(batch.max)
        .map(|chunk| {
            let at: Vec<usize> = chunk.iter().map(|(i, _)| *i).collect();
            let flights: Vec<Arc<Flight>> = chunk.iter().map(|(_, f)| f.clone()).collect();
            let ks: Vec<Bytes> = at.iter().map(|&i| keys[i].clone()).collect();
            let (w, rule, batch) = (w.clone(), rule.clone(), batch.clone());
            let h = tokio::task::spawn_local(async move {
                load_chunk(&w, &rule, &batch, &ks, &flights).await
            });
            (at, h)
        })
        .collect();
    for (at, h) in chunks {
        let outcomes = h.await.unwrap_or_default();
        for (i, o) in at.into_iter().zip(outcomes) {
            out[i] = Some(o);
        }
    }
    for (i, f) in waiters {
        rule.stats.coalesced.add(1);
        let mut rx = f.tx.subscribe();
        out[i] = Some(
            match tokio::time::timeout(rule.timeout, rx.wait_for(|o| o.is_some())).await {
                Ok(Ok(o)) => o
                    .clone()
                    .unwrap_or_else(|| Arc::new(fill::timeout_error(rule))),
                _ => Arc::new(fill::timeout_error(rule)),
            },
        );
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Arc::new(fill::timeout_error(rule))))
        .collect()
}

/// One origin request for `keys` (this instance leads each one's flight): every key's
/// outcome, stored (unless its fill went dirty) and published to its waiters.
async fn load_chunk(
    w: &Rc<dyn Context>,
    rule: &Rule,
    batch: &BatchUrl,
    keys: &[Bytes],
    flights: &[Arc<Flight>],
) -> Vec<Arc<Outcome>> {
    let ids: Vec<&[u8]> = keys
        .iter()
        .map(|k| &k[rule.prefix.len().min(k.len())..])
        .collect();
    let url = batch.render(&ids);
    let loaded = fill::fetch_url(w.as_ref(), rule, &url, Instant::now() + rule.timeout, None).await;
    let mut outcomes = Vec::with_capacity(keys.len());
    let values: Result<(Answer, Option<Duration>), Outcome> = match loaded {
        Loaded::Value {
            body, store_for, ..
        } => serde_json::from_slice(&body)
            .map(|m| (m, store_for))
            .map_err(|e| {
                Outcome::Error(
                    reply::Failure::Origin {
                        rule: &rule.name,
                        why: &format!("the batch answer is not a JSON object: {e}"),
                    }
                    .to_reply(),
                )
            }),
        Loaded::Absent => Ok((Default::default(), None)),
        Loaded::NotModified { .. } => Err(fill::unasked_304(rule)),
        Loaded::Failed(o) => Err(o),
    };
    for ((key, id), flight) in keys.iter().zip(&ids).zip(flights) {
        let outcome = match &values {
            Err(o) => o.clone(),
            Ok((map, store_for)) => match map.get(String::from_utf8_lossy(id).as_ref()) {
                Some(v) => {
                    let body = Bytes::copy_from_slice(v.get().as_bytes());
                    rule.stats.bytes_loaded.add(body.len() as u64);
                    match store_for {
                        Some(d) if !flight.is_dirty() => {
                            let px = d.as_millis().to_string();
                            let stored =
                                fill::store_nx(w.as_ref(), rule, key, &body, px.as_bytes()).await;
                            fill::count_store(rule, stored);
                        }
                        _ => rule.stats.store_skipped.add(1),
                    }
                    Outcome::Value(body)
                }
                None => {
                    if !flight.is_dirty() {
                        w.readthrough().remember_absent(key, rule.negative_ttl);
                    }
                    Outcome::Absent
                }
            },
        };
        let outcome = Arc::new(outcome);
        w.readthrough().finish(flight, outcome.clone());
        outcomes.push(outcome);
    }
    outcomes
}
