//! The fill: one origin fetch per key, stored with `SET … PX ttl NX` unless a write
//! came first; background refreshes for stale-while-revalidate.

use super::*;

/// A miss on a rule-owned key: negative entry, join a fetch, or lead one.
pub async fn miss(
    w: &Rc<dyn Context>,
    rule: &Arc<Rule>,
    key: &Bytes,
    sent_at: Instant,
) -> Arc<Outcome> {
    let rt = &w.readthrough();
    if rt.negative_fresh(key) {
        rule.stats.negative_hits.add(1);
        return Arc::new(Outcome::Absent);
    }
    match rt.join(key, sent_at) {
        Join::Done(o) => {
            rule.stats.coalesced.add(1);
            o
        }
        Join::Waiter(f) => {
            rule.stats.coalesced.add(1);
            let mut rx = f.tx.subscribe();
            match tokio::time::timeout(rule.timeout, rx.wait_for(|o| o.is_some())).await {
                Ok(Ok(o)) => o.clone().unwrap_or_else(|| Arc::new(timeout_error(rule))),
                _ => Arc::new(timeout_error(rule)),
            }
        }
        Join::Leader(f) => {
            let o = Arc::new(lead(w, rule, key, &f).await);
            rt.finish(&f, o.clone());
            o
        }
    }
}

pub(super) fn timeout_error(rule: &Rule) -> Outcome {
    Outcome::Error(
        reply::Failure::Origin {
            rule: &rule.name,
            why: &format!("timed out after {:?}", rule.timeout),
        }
        .to_reply(),
    )
}

/// One origin fetch, counted in the rule's metrics.
pub(super) enum Loaded {
    /// `200`: the body, how long to store it (`None`: `no-store` or a zero TTL), and its
    /// validators.
    Value {
        body: Bytes,
        store_for: Option<Duration>,
        validators: revalidate::Validators,
    },
    /// `304` to a conditional request: the value held is current; keep it for this long
    /// (`Some(None)`: not at all, `no-store`), or, `None`, for as long as it was stored for.
    NotModified { store_for: Option<Option<Duration>> },
    /// `404`/`410`.
    Absent,
    /// The error reply for the client.
    Failed(Outcome),
}

pub(super) async fn fetch(w: &dyn Context, rule: &Rule, key: &[u8], deadline: Instant) -> Loaded {
    let url = rule.template.render(key, rule.prefix.len());
    fetch_url(w, rule, &url, deadline, None).await
}

/// One origin request to `url` (a key's, or a batch's) that ends by `deadline`, through the
/// rule's breaker and concurrency limit, counted in its metrics; conditional with `cond`.
pub(super) async fn fetch_url(
    w: &dyn Context,
    rule: &Rule,
    url: &str,
    deadline: Instant,
    cond: Option<&revalidate::Validators>,
) -> Loaded {
    let stats = &rule.stats;
    if deadline.saturating_duration_since(Instant::now()) < rule.timeout / 10 {
        // (Its time went waiting on another instance's lease: not sent, and no verdict for
        // the breaker.)
        return Loaded::Failed(timeout_error(rule));
    }
    // (Held until the fetch ends: at most `max_origin_concurrency` in flight.)
    let _permit = match admit(rule, deadline).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    stats.origin_requests.add(1);
    let t0 = Instant::now();
    let left = deadline
        .saturating_duration_since(t0)
        .max(Duration::from_millis(1));
    let fetched = w
        .origin()
        .fetch(url, &rule.origin, left, rule.max_body, cond)
        .await
        .map_err(|e| match e {
            // (The rule's timeout, waiting for a turn included.)
            OriginError::Timeout(_) => OriginError::Timeout(rule.timeout),
            e => e,
        });
    stats.latency.record(t0.elapsed().as_secs_f64());
    if let Some(b) = &rule.guard.breaker
        && b.record(fetched.is_ok())
    {
        stats.breaker_opens.add(1);
        tracing::warn!(
            rule = %rule.name,
            "read-through rule '{}': the origin failed {} times in a row; not calling it for {:?}",
            rule.name,
            b.threshold,
            b.cooldown
        );
    }
    // Stored for ttl + grace: the grace period serves it stale (see the module docs).
    let store_for = |max_age: Option<Duration>, no_store: bool| {
        let ttl = match max_age {
            Some(a) if rule.honor_max_age => a,
            _ => rule.ttl,
        };
        (!no_store && !ttl.is_zero()).then_some(ttl.saturating_add(rule.grace))
    };
    match fetched {
        Ok(Fetched::Found {
            body,
            max_age,
            no_store,
            validators,
        }) => {
            stats.bytes_loaded.add(body.len() as u64);
            Loaded::Value {
                body,
                store_for: store_for(max_age, no_store),
                validators,
            }
        }
        // (A 304 that says nothing of its lifetime leaves the stored one in force, RFC 9111
        // §4.3.4: with `honor_max_age`, the first answer's `max-age` may have set it.)
        Ok(Fetched::NotModified { max_age, no_store }) => Loaded::NotModified {
            store_for: (no_store || max_age.is_some() || !rule.honor_max_age)
                .then(|| store_for(max_age, no_store)),
        },
        Ok(Fetched::Absent) => Loaded::Absent,
        Err(e) => {
            stats.origin_error(&e);
            tracing::debug!(rule = %rule.name, %url, "origin fetch failed: {e}");
            Loaded::Failed(Outcome::Error(
                reply::Failure::Origin {
                    rule: &rule.name,
                    why: &e.to_string(),
                }
                .to_reply(),
            ))
        }
    }
}

/// The rule's breaker and concurrency limit: a turn to call the origin (a permit, held until
/// the fetch ends, when the rule has a limit), or the outcome of a fetch that must not be
/// sent.
async fn admit(
    rule: &Rule,
    deadline: Instant,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Loaded> {
    let stats = &rule.stats;
    if let Some(b) = &rule.guard.breaker
        && let Err(left) = b.admit()
    {
        stats.breaker_rejections.add(1);
        let when = if left.is_zero() {
            "one request is trying it now".to_string()
        } else {
            format!(
                "it is tried again in {:?}",
                Duration::from_millis(left.as_millis() as u64)
            )
        };
        let why = format!(
            "its circuit breaker is open after {} failed fetches in a row ({when})",
            b.threshold
        );
        return Err(Loaded::Failed(Outcome::Error(
            reply::Failure::OriginUnavailable {
                rule: &rule.name,
                why: &why,
            }
            .to_reply(),
        )));
    }
    match &rule.guard.limit {
        None => Ok(None),
        Some((max, sem)) => {
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    stats.throttled.add(1);
                    let turn = sem.clone().acquire_owned();
                    tokio::time::timeout_at(deadline.into(), turn)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            };
            // A turn that comes with too little time left is no fair try of the origin
            // (its timeout would count against the breaker).
            let left = deadline.saturating_duration_since(Instant::now());
            match permit.filter(|_| left >= rule.timeout / 10) {
                Some(p) => Ok(Some(p)),
                None => {
                    if let Some(b) = &rule.guard.breaker {
                        // (A trial fetch that never ran is no verdict: let the next try.)
                        b.record_skipped();
                    }
                    let why = format!(
                        "timed out after {:?} waiting for one of its {max} origin requests \
                         (max_origin_concurrency)",
                        rule.timeout
                    );
                    Err(Loaded::Failed(Outcome::Error(
                        reply::Failure::Origin {
                            rule: &rule.name,
                            why: &why,
                        }
                        .to_reply(),
                    )))
                }
            }
        }
    }
}

/// Fetches `key` from the origin and, unless the fill went dirty, stores it with `NX`. With
/// the rule's lease (the default), only the instance that holds the key's lease fetches; the
/// others wait for its result (see `lease`).
pub(super) async fn lead(
    w: &Rc<dyn Context>,
    rule: &Arc<Rule>,
    key: &Bytes,
    flight: &Flight,
) -> Outcome {
    // (The rule's timeout counts from here, waiting on another instance's lease included.)
    let deadline = Instant::now() + rule.timeout;
    let token = match rule.lease {
        true => match lease::acquire(w.as_ref(), rule, key).await {
            Some(lease::Lease::Held(token)) => Some(token),
            Some(lease::Lease::Settled(o)) => {
                if o == Outcome::Absent && !flight.is_dirty() {
                    w.readthrough().remember_absent(key, rule.negative_ttl);
                }
                return o;
            }
            None => None,
        },
        false => None,
    };
    let stats = &rule.stats;
    let mut stored = false;
    let loaded = match &rule.batch {
        // (Gathered with other single GETs' misses: one batch request.)
        Some(b) if !b.window.is_zero() && batch::batchable(rule, key) => {
            batch::windowed(w, rule, b, key, deadline).await
        }
        _ => fetch(w.as_ref(), rule, key, deadline).await,
    };
    let outcome = match loaded {
        Loaded::Value {
            body,
            store_for,
            validators,
        } => {
            match store_for {
                Some(d) if !flight.is_dirty() => {
                    let px = d.as_millis().to_string();
                    stored = match &token {
                        Some(t) => lease::store(w.as_ref(), key, t, &body, px.as_bytes()).await,
                        None => store_nx(w.as_ref(), rule, key, &body, px.as_bytes()).await,
                    };
                    count_store(rule, stored);
                    if stored {
                        revalidate::remember(w.as_ref(), key, &validators, &body, px.as_bytes())
                            .await;
                    }
                }
                _ => stats.store_skipped.add(1),
            }
            Outcome::Value(body)
        }
        Loaded::Absent => {
            if !flight.is_dirty() {
                w.readthrough().remember_absent(key, rule.negative_ttl);
            }
            Outcome::Absent
        }
        Loaded::NotModified { .. } => unasked_304(rule),
        Loaded::Failed(o) => o,
    };
    if let Some(t) = &token
        && !stored
    {
        // (A stored value ended the lease; anything else is left in it for a moment.)
        lease::settle(w.as_ref(), key, t, &outcome).await;
    }
    outcome
}

/// A `304` to a request that was not conditional (the origin client maps it to an error
/// before this; kept as one for the match).
pub(super) fn unasked_304(rule: &Rule) -> Outcome {
    Outcome::Error(
        reply::Failure::Origin {
            rule: &rule.name,
            why: "HTTP 304 to a request that was not conditional",
        }
        .to_reply(),
    )
}

/// Stores a loaded value with `SET key body PX px NX` (a client's newer write wins);
/// whether it stored.
pub(super) async fn store_nx(
    w: &dyn Context,
    rule: &Rule,
    key: &[u8],
    body: &[u8],
    px: &[u8],
) -> bool {
    let set = command(&[b"SET", key, body, b"PX", px, b"NX"]);
    let r = w.request_for_key(key, &set).await;
    if r.first() == Some(&b'-') {
        tracing::warn!(rule = %rule.name, "storing a loaded value failed: {}",
            String::from_utf8_lossy(&r).trim_end());
    }
    r.starts_with(b"+OK")
}

/// Counts a loaded value as stored or not.
pub(super) fn count_store(rule: &Rule, stored: bool) {
    if stored {
        rule.stats.stored.add(1);
    } else {
        rule.stats.store_skipped.add(1);
    }
}

/// Starts one background refresh of a value served in its grace period or past its
/// `refresh_ahead` point (single-flight; across instances too, with the key's lease).
pub(super) fn refresh_in_background(
    w: &Rc<dyn Context>,
    rule: &Arc<Rule>,
    key: &Bytes,
    served: &Bytes,
) {
    let rt = &w.readthrough();
    if rt
        .refresh_backoff
        .get(key)
        .is_some_and(|until| *until > Instant::now())
    {
        return;
    }
    let Join::Leader(flight) = rt.join(key, Instant::now()) else {
        return;
    };
    let (w, rule, key) = (w.clone(), rule.clone(), key.clone());
    // The served frame is `$len\r\nvalue\r\n`: keep the value for the compare-and-set.
    let old = bulk_payload(served);
    tokio::task::spawn_local(async move {
        let stats = &rule.stats;
        let rt = &w.readthrough();
        // With leases, one instance refreshes: the one that takes the key's lease.
        let token = match rule.lease {
            true => match lease::try_take(w.as_ref(), &rule, &key).await {
                Ok(token) => token,
                Err(()) => {
                    rt.refresh_backoff
                        .insert(key.clone(), Instant::now() + REFRESH_BACKOFF);
                    rt.finish(&flight, Arc::new(Outcome::Value(old)));
                    return;
                }
            },
            false => None,
        };
        stats.refreshes.add(1);
        let deadline = Instant::now() + rule.timeout;
        // Conditional when the value came with validators (a `304` then extends it).
        let cond = revalidate::recall(w.as_ref(), &key, &old).await;
        let url = rule.template.render(&key, rule.prefix.len());
        let asked = cond.as_ref().map(|(v, _)| v);
        let fetched = fetch_url(w.as_ref(), &rule, &url, deadline, asked).await;
        // How long the value is kept now (`None`: it is not written).
        let keep = match &fetched {
            Loaded::NotModified { store_for } => {
                store_for.unwrap_or(cond.as_ref().map(|&(_, d)| d))
            }
            Loaded::Value { store_for, .. } => *store_for,
            Loaded::Absent | Loaded::Failed(_) => None,
        }
        .filter(|_| !flight.is_dirty())
        .map(|d| d.as_millis().to_string());
        let (outcome, written) = match fetched {
            Loaded::NotModified { .. } => {
                let ok = match &keep {
                    Some(px) => revalidate::extend(w.as_ref(), &key, &old, px.as_bytes()).await,
                    None => false,
                };
                (
                    Outcome::Value(old.clone()),
                    ok.then_some(&stats.revalidated),
                )
            }
            Loaded::Value {
                body, validators, ..
            } => {
                let mut ok = false;
                if let Some(px) = &keep {
                    let px = px.as_bytes();
                    let cas = command(&[b"EVAL", CAS_SET.as_bytes(), b"1", &key, &old, &body, px]);
                    ok = w.request_for_key(&key, &cas).await.starts_with(b"+OK");
                    if ok {
                        revalidate::remember(w.as_ref(), &key, &validators, &body, px).await;
                    }
                }
                (Outcome::Value(body), ok.then_some(&stats.stored))
            }
            // Gone at the origin: the stale value expires on its own (hard TTL).
            Loaded::Absent => (Outcome::Absent, None),
            Loaded::Failed(o) => (o, None),
        };
        match written {
            Some(stat) => stat.add(1),
            None => {
                if matches!(outcome, Outcome::Value(_)) {
                    stats.store_skipped.add(1);
                }
                backoff(rt, &key);
            }
        }
        if let Some(t) = &token {
            lease::end(w.as_ref(), &key, t).await;
        }
        rt.finish(&flight, Arc::new(outcome));
    });
}

/// A refresh that left the value as it was (the origin failed, has no such key, said
/// `no-store`, or a client wrote the key): the next one for the key waits a while, so that
/// GETs of it do not each call the origin.
fn backoff(rt: &ReadThrough, key: &Bytes) {
    rt.refresh_backoff
        .insert(key.clone(), Instant::now() + REFRESH_BACKOFF);
}

/// The payload of a `$len\r\n…\r\n` frame.
pub(super) fn bulk_payload(frame: &Bytes) -> Bytes {
    match frame.iter().position(|&c| c == b'\n') {
        Some(nl) if frame.len() >= nl + 3 => frame.slice(nl + 1..frame.len() - 2),
        _ => Bytes::new(),
    }
}
