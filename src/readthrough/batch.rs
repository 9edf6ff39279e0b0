//! Batch loading (issue 15.4): a rule with a `batch_url` loads the misses of one MGET with
//! one origin request per `batch_max` keys instead of one per key. The URL's `{keys}` is the
//! missing ids (the keys without the rule's prefix, percent-encoded) joined by `batch_sep`;
//! the origin answers a JSON object keyed by id, whose values are stored as their JSON text;
//! an id the object does not have is a `404` for its key. Each key is still single-flight on
//! this instance: a key another request is already loading is waited for, not asked again.
//!
//! With a `batch_window`, single GETs are batched too: the misses this worker leads within
//! the window (each after taking its key's lease, as an unbatched miss does) are loaded with
//! one request, sent when the window ends or holds `batch_max` ids; each miss then stores its
//! own value as before.

use super::*;
use fill::Loaded;

/// A batch answer: the JSON text of each id's value.
type Answer = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;

/// The longest `batch_window`.
const MAX_WINDOW: Duration = Duration::from_millis(100);

/// The id of `key`: the key without the rule's prefix.
fn id_of<'k>(rule: &Rule, key: &'k [u8]) -> &'k [u8] {
    &key[rule.prefix.len().min(key.len())..]
}

/// The ids of `keys`.
fn ids<'k>(rule: &Rule, keys: impl Iterator<Item = &'k Bytes>) -> Vec<&'k [u8]> {
    keys.map(|k| id_of(rule, k)).collect()
}

/// A batch request's answer, parsed: each id's value and how long to store it, or the error
/// for every key.
fn parse_answer(rule: &Rule, loaded: Loaded) -> Result<(Answer, Option<Duration>), Outcome> {
    match loaded {
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
    }
}

/// The JSON text of `id`'s value in `answer` (the batch body was counted as loaded).
fn value_of(answer: &Answer, id: &[u8]) -> Option<Bytes> {
    let v = answer.get(std::str::from_utf8(id).ok()?)?;
    Some(Bytes::copy_from_slice(v.get().as_bytes()))
}

/// Whether `key` can be in a batch: its id must be UTF-8, as the answer's JSON keys are (two
/// different ids must never name one entry).
pub(super) fn batchable(rule: &Rule, key: &[u8]) -> bool {
    std::str::from_utf8(id_of(rule, key)).is_ok()
}

/// A miss in a window: its key, the end of its time, and where its result goes.
type Gathered = (Bytes, Instant, tokio::sync::oneshot::Sender<Loaded>);

/// The misses gathered in each rule's open window on this worker.
#[derive(Default)]
struct Window {
    /// Counts windows, so that a window's timer does not send the next one.
    id: u64,
    keys: Vec<Gathered>,
}

thread_local! {
    /// This worker's open windows, by rule (the `Arc<Rule>`'s address: a reloaded rule gets
    /// windows of its own).
    static WINDOWS: RefCell<std::collections::HashMap<usize, Window>> = RefCell::default();
}

/// Loads `key` (a single GET's miss that this instance leads) with the misses of the same
/// rule in its window: one origin request for all of them.
pub(super) async fn windowed(
    w: &Rc<dyn Context>,
    rule: &Arc<Rule>,
    batch: &BatchUrl,
    key: &Bytes,
    deadline: Instant,
) -> Loaded {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let at = Arc::as_ptr(rule) as usize;
    let (opened, full) = WINDOWS.with(|m| {
        let mut m = m.borrow_mut();
        let win = m.entry(at).or_default();
        win.keys.push((key.clone(), deadline, tx));
        let opened = (win.keys.len() == 1).then_some(win.id);
        let full = (win.keys.len() >= batch.max).then(|| close(win));
        (opened, full)
    });
    if let Some(keys) = full {
        if opened.is_some() {
            // (Opened and closed at once, `batch_max=1`: no timer will tidy it.)
            WINDOWS.with(|m| m.borrow_mut().remove(&at));
        }
        send(w, rule, batch, keys).await;
    } else if let Some(id) = opened {
        let (w, rule, batch) = (w.clone(), rule.clone(), batch.clone());
        tokio::task::spawn_local(async move {
            tokio::time::sleep(batch.window).await;
            let keys = WINDOWS.with(|m| {
                let mut m = m.borrow_mut();
                let win = m.get_mut(&at)?;
                let keys = (win.id == id).then(|| close(win));
                if win.keys.is_empty() {
                    m.remove(&at);
                }
                keys
            });
            if let Some(keys) = keys {
                send(&w, &rule, &batch, keys).await;
            }
        });
    }
    rx.await
        .unwrap_or_else(|_| Loaded::Failed(fill::timeout_error(rule)))
}

/// Ends a window: its misses, to be sent.
fn close(win: &mut Window) -> Vec<Gathered> {
    win.id += 1;
    std::mem::take(&mut win.keys)
}

/// One origin request for a window's misses; each gets its own result.
async fn send(w: &Rc<dyn Context>, rule: &Rule, batch: &BatchUrl, keys: Vec<Gathered>) {
    let url = batch.render(&ids(rule, keys.iter().map(|(k, ..)| k)));
    // (Within the time of the miss that has the most left: one whose time went waiting on
    // another instance's lease must not fail the others.)
    let deadline = keys.iter().map(|&(_, d, _)| d).max();
    let deadline = deadline.unwrap_or_else(|| Instant::now() + rule.timeout);
    let loaded = fill::fetch_url(w.as_ref(), rule, &url, deadline, None).await;
    let answer = parse_answer(rule, loaded);
    for (key, _, tx) in keys {
        let one = match &answer {
            Err(o) => Loaded::Failed(o.clone()),
            Ok((map, store_for)) => match value_of(map, id_of(rule, &key)) {
                Some(body) => Loaded::Value {
                    body,
                    store_for: *store_for,
                    validators: Default::default(),
                },
                None => Loaded::Absent,
            },
        };
        let _ = tx.send(one);
    }
}

/// A batch URL: `{keys}` between two literal parts.
#[derive(Debug, Clone)]
pub struct BatchUrl {
    before: String,
    after: String,
    pub sep: String,
    pub max: usize,
    /// How long single GETs' misses are gathered (zero: not batched).
    pub window: Duration,
}

impl BatchUrl {
    /// `http(s)://host/path?ids={keys}`, with the separator and the largest batch.
    pub fn parse(s: &str, sep: &str, max: usize, window: Duration) -> Result<BatchUrl, String> {
        if max == 0 {
            return Err("batch_max must be > 0".into());
        }
        if window > MAX_WINDOW {
            return Err(format!(
                "batch_window {window:?}: at most {MAX_WINDOW:?} (every miss waits for it)"
            ));
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
            window,
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
    let (mut leaders, mut waiters, mut singles) = (Vec::new(), Vec::new(), Vec::new());
    for (i, k) in keys.iter().enumerate() {
        if rt.negative_fresh(k) {
            rule.stats.negative_hits.add(1);
            out[i] = Some(Arc::new(Outcome::Absent));
            continue;
        }
        match rt.join(k, sent_at) {
            Join::Done(o) => out[i] = Some(o),
            Join::Waiter(f) => waiters.push((i, f)),
            Join::Leader(f) if batchable(rule, k) => leaders.push((i, f)),
            Join::Leader(f) => singles.push((i, f)),
        }
    }
    // (Ids that are not UTF-8 are loaded one by one, with the rule's URL.)
    let singles: Vec<_> = singles
        .into_iter()
        .map(|(i, f)| {
            let (w, rule, key) = (w.clone(), rule.clone(), keys[i].clone());
            let h = tokio::task::spawn_local(async move {
                let o = Arc::new(fill::lead(&w, &rule, &key, &f).await);
                w.readthrough().finish(&f, o.clone());
                o
            });
            (i, h)
        })
        .collect();
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
    for (i, h) in singles {
        out[i] = h.await.ok();
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
    let ids = ids(rule, keys.iter());
    let url = batch.render(&ids);
    let loaded = fill::fetch_url(w.as_ref(), rule, &url, Instant::now() + rule.timeout, None).await;
    let mut outcomes = Vec::with_capacity(keys.len());
    let values = parse_answer(rule, loaded);
    for ((key, id), flight) in keys.iter().zip(&ids).zip(flights) {
        let outcome = match &values {
            Err(o) => o.clone(),
            Ok((map, store_for)) => match value_of(map, id) {
                Some(body) => {
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
