//! Read-through rules: their configuration (`[[readthrough]]`, `--readthrough`), the
//! prefix match, and their counters.

use super::*;

/// A `[[readthrough]]` table (or one `--readthrough` flag).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name used in metrics and INFO; default: the prefix.
    pub name: Option<String>,
    /// Keys this rule owns.
    pub prefix: String,
    /// `http://host:port/path/{rest}` (`{key}` = whole key, `{rest}` = key minus the prefix).
    pub origin: String,
    /// How long a loaded value is cached [default: 10m].
    pub ttl: Option<String>,
    /// Use the origin's `Cache-Control: max-age` instead of `ttl` when present [default: false].
    #[serde(default)]
    pub honor_max_age: bool,
    /// How long a 404/410 is remembered [default: 30s].
    pub negative_ttl: Option<String>,
    /// Longest wait for the origin [default: 500ms].
    pub timeout: Option<String>,
    /// Largest body accepted, in bytes [default: 16 MiB].
    pub max_body: Option<usize>,
    /// Stale-while-revalidate / stale-if-error window after `ttl` [default: 0s = off].
    pub grace: Option<String>,
    /// A PEM file of root certificates for an `https://` origin, added to the system's.
    pub ca: Option<String>,
    /// `https://` without certificate verification (development only) [default: false].
    #[serde(default)]
    pub insecure: bool,
    /// Request headers, `NAME:VALUE` or `NAME:env:VAR` (read from the environment).
    #[serde(default)]
    pub header: Vec<String>,
    /// Most origin requests of this rule in flight at once, over the whole process
    /// [default: no limit].
    pub max_origin_concurrency: Option<usize>,
    /// `N/COOLDOWN`: after N consecutive failed fetches, the origin is not called for
    /// COOLDOWN [default: off].
    pub breaker: Option<String>,
    /// Single-flight across instances with a lease in the shard [default: true].
    pub lease: Option<bool>,
    /// Refresh a value in the background once this fraction of its TTL has passed (e.g.
    /// 0.8), so that a hot key never misses [default: off].
    pub refresh_ahead: Option<f64>,
    /// An MGET's misses are loaded with this URL, `{keys}` = the ids joined by `batch_sep`
    /// [default: one request per key].
    pub batch_url: Option<String>,
    /// [default: ","]
    pub batch_sep: Option<String>,
    /// Most ids in one batch request [default: 100].
    pub batch_max: Option<usize>,
    /// Concurrent single GETs that miss within this window (at most 100ms; keep it ≤ 1ms)
    /// are loaded with one `batch_url` request [default: off].
    pub batch_window: Option<String>,
}

impl RuleConfig {
    /// `PREFIX=URL_TEMPLATE[;ttl=10m][;negative_ttl=30s][;timeout=500ms][;grace=1m]
    /// [;name=N][;max_body=BYTES][;honor_max_age=true][;ca=FILE][;insecure=true]
    /// [;header=NAME:VALUE]…[;max_origin_concurrency=N][;breaker=N/COOLDOWN][;lease=false]
    /// [;refresh_ahead=F][;batch_url=URL][;batch_sep=S][;batch_max=N][;batch_window=D]`,
    /// split at the first
    /// `=` so the prefix may contain colons.
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        let (prefix, rest) = s.split_once('=').ok_or_else(|| {
            format!("--readthrough '{s}': expected PREFIX=URL_TEMPLATE[;opt=value…]")
        })?;
        let mut parts = rest.split(';');
        let mut rc = RuleConfig {
            prefix: prefix.to_string(),
            origin: parts.next().unwrap_or("").trim().to_string(),
            ..Default::default()
        };
        for opt in parts.map(str::trim).filter(|o| !o.is_empty()) {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("--readthrough option '{opt}': expected name=value"))?;
            let v = v.trim().to_string();
            match k.trim() {
                "ttl" => rc.ttl = Some(v),
                "negative_ttl" => rc.negative_ttl = Some(v),
                "timeout" => rc.timeout = Some(v),
                "grace" => rc.grace = Some(v),
                "name" => rc.name = Some(v),
                "max_body" => {
                    rc.max_body = Some(v.parse().map_err(|_| format!("max_body '{v}': bytes"))?)
                }
                "honor_max_age" => {
                    rc.honor_max_age = v.parse().map_err(|_| format!("honor_max_age '{v}'"))?
                }
                "ca" => rc.ca = Some(v),
                "insecure" => rc.insecure = v.parse().map_err(|_| format!("insecure '{v}'"))?,
                "header" => rc.header.push(v),
                "max_origin_concurrency" => {
                    rc.max_origin_concurrency = Some(
                        v.parse()
                            .map_err(|_| format!("max_origin_concurrency '{v}': a number"))?,
                    )
                }
                "breaker" => rc.breaker = Some(v),
                "lease" => rc.lease = Some(v.parse().map_err(|_| format!("lease '{v}'"))?),
                "batch_url" => rc.batch_url = Some(v),
                "batch_sep" => rc.batch_sep = Some(v),
                "batch_window" => rc.batch_window = Some(v),
                "batch_max" => {
                    rc.batch_max = Some(
                        v.parse()
                            .map_err(|_| format!("batch_max '{v}': a number"))?,
                    )
                }
                "refresh_ahead" => {
                    rc.refresh_ahead = Some(
                        v.parse()
                            .map_err(|_| format!("refresh_ahead '{v}': a fraction, e.g. 0.8"))?,
                    )
                }
                other => return Err(format!("--readthrough: unknown option '{other}'")),
            }
        }
        Ok(rc)
    }
}

/// A validated rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub prefix: Vec<u8>,
    pub template: UrlTemplate,
    /// TLS and headers of its origin.
    pub origin: origin::OriginSpec,
    /// Its origin's protection: a concurrency limit and a circuit breaker.
    pub guard: OriginGuard,
    /// Single-flight across instances (see `lease`).
    pub lease: bool,
    /// Batch loading of an MGET's misses (see `batch`).
    pub batch: Option<batch::BatchUrl>,
    /// A value whose remaining PTTL is below this is refreshed in the background (its grace
    /// period, and the part of its TTL after `refresh_ahead`); zero: never.
    pub refresh_below: Duration,
    pub ttl: Duration,
    pub honor_max_age: bool,
    pub negative_ttl: Duration,
    pub timeout: Duration,
    pub max_body: usize,
    pub grace: Duration,
    /// Shared with the rule of the same name that a reload replaced (see
    /// [`Rules::keep_counters_of`]).
    pub stats: Arc<RuleStats>,
}

/// Per-rule counters: atomics for INFO, copied into the metrics registry when it is scraped
/// ([`RuleStats::publish`]), so a hit costs one atomic add.
#[derive(Debug)]
pub struct RuleStats {
    pub hits: Stat,
    pub misses: Stat,
    pub origin_requests: Stat,
    pub coalesced: Stat,
    pub negative_hits: Stat,
    pub stale_serves: Stat,
    pub origin_errors: Stat,
    pub bytes_loaded: Stat,
    pub stored: Stat,
    pub store_skipped: Stat,
    /// Fetches that waited for `max_origin_concurrency`, and fetches the open breaker
    /// refused.
    pub throttled: Stat,
    /// Misses that waited for another instance's lease instead of calling the origin.
    pub lease_waits: Stat,
    /// Background refreshes of hits (refresh-ahead and grace) started here.
    pub refreshes: Stat,
    /// Refreshes the origin answered `304 Not Modified` to, which extended the value.
    pub revalidated: Stat,
    pub breaker_rejections: Stat,
    pub breaker_opens: Stat,
    errors_by_kind: [metrics::Counter; 5],
    pub(super) latency: metrics::Histogram,
}

/// A counter readable for INFO and exported to Prometheus (see [`RuleStats::publish`]).
#[derive(Debug)]
pub struct Stat {
    value: AtomicU64,
    counter: metrics::Counter,
}

impl Stat {
    fn new(name: &'static str, rule: &str) -> Self {
        Stat {
            value: AtomicU64::new(0),
            counter: metrics::counter!(name, "rule" => rule.to_string()),
        }
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl RuleStats {
    /// Origin calls avoided: answers the cache gave (hits, coalesced misses, remembered
    /// 404s, values served in their grace period).
    pub fn avoided(&self) -> u64 {
        self.hits.get() + self.coalesced.get() + self.negative_hits.get() + self.stale_serves.get()
    }

    fn new(rule: &str) -> Self {
        use crate::metrics as m;
        let kinds = ["status", "timeout", "connect", "too_large", "other"];
        RuleStats {
            hits: Stat::new(m::RT_HITS, rule),
            misses: Stat::new(m::RT_MISSES, rule),
            origin_requests: Stat::new(m::RT_ORIGIN_REQUESTS, rule),
            coalesced: Stat::new(m::RT_COALESCED, rule),
            negative_hits: Stat::new(m::RT_NEGATIVE_HITS, rule),
            stale_serves: Stat::new(m::RT_STALE_SERVES, rule),
            origin_errors: Stat::new(m::RT_ORIGIN_ERRORS_ALL, rule),
            bytes_loaded: Stat::new(m::RT_BYTES_LOADED, rule),
            stored: Stat::new(m::RT_STORED, rule),
            store_skipped: Stat::new(m::RT_STORE_SKIPPED, rule),
            throttled: Stat::new(m::RT_THROTTLED, rule),
            lease_waits: Stat::new(m::RT_LEASE_WAITS, rule),
            refreshes: Stat::new(m::RT_REFRESHES, rule),
            revalidated: Stat::new(m::RT_REVALIDATED, rule),
            breaker_rejections: Stat::new(m::RT_BREAKER_REJECTIONS, rule),
            breaker_opens: Stat::new(m::RT_BREAKER_OPENS, rule),
            errors_by_kind: kinds.map(
                |k| metrics::counter!(m::RT_ORIGIN_ERRORS, "rule" => rule.to_string(), "kind" => k),
            ),
            latency: metrics::histogram!(m::RT_ORIGIN_LATENCY, "rule" => rule.to_string()),
        }
    }

    /// Copies the counters into the metrics registry (before `/metrics` renders it).
    pub fn publish(&self) {
        for s in [
            &self.hits,
            &self.misses,
            &self.origin_requests,
            &self.coalesced,
            &self.negative_hits,
            &self.stale_serves,
            &self.origin_errors,
            &self.bytes_loaded,
            &self.stored,
            &self.store_skipped,
            &self.throttled,
            &self.lease_waits,
            &self.refreshes,
            &self.revalidated,
            &self.breaker_rejections,
            &self.breaker_opens,
        ] {
            s.counter.absolute(s.get());
        }
    }

    /// The rule's gauges (breaker open, origin requests in flight), into the registry.
    pub fn publish_guard(&self, rule: &str, guard: &OriginGuard) {
        use crate::metrics as m;
        let open = guard.breaker.as_ref().is_some_and(Breaker::is_open);
        metrics::gauge!(m::RT_BREAKER_OPEN, "rule" => rule.to_string()).set(if open {
            1.0
        } else {
            0.0
        });
        metrics::gauge!(m::RT_ORIGIN_INFLIGHT, "rule" => rule.to_string())
            .set(guard.inflight() as f64);
    }

    pub(super) fn origin_error(&self, e: &OriginError) {
        self.origin_errors.add(1);
        let i = match e.kind() {
            "status" => 0,
            "timeout" => 1,
            "connect" => 2,
            "too_large" => 3,
            _ => 4,
        };
        self.errors_by_kind[i].increment(1);
    }
}

/// The rules, longest prefix first.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Arc<Rule>>,
}

impl Rules {
    /// Validates the rules: well-formed URL templates and durations, distinct prefixes and
    /// names. Nested prefixes are allowed; the longest one wins.
    pub fn build(configs: &[RuleConfig]) -> Result<Self, String> {
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        for c in configs {
            if c.prefix.is_empty() {
                return Err("a read-through rule needs a non-empty prefix".into());
            }
            let name = c.name.clone().unwrap_or_else(|| c.prefix.clone());
            let what = |k: &str| format!("read-through rule '{name}': {k}");
            let dur = |v: &Option<String>, default: &str, k: &str| {
                parse_duration(v.as_deref().unwrap_or(default))
                    .map_err(|e| format!("{}: {e}", what(k)))
            };
            let template = UrlTemplate::parse(&c.origin).map_err(|e| what(&e))?;
            let origin = origin::OriginSpec::build(
                template.is_https(),
                c.ca.as_deref(),
                c.insecure,
                &c.header,
            )
            .map_err(|e| what(&e))?;
            let guard = OriginGuard::build(c.max_origin_concurrency, c.breaker.as_deref())
                .map_err(|e| what(&e))?;
            let batch = match &c.batch_url {
                // (Fetched with the origin's TLS settings.)
                Some(u) if u.starts_with("https://") != template.is_https() => {
                    return Err(what(
                        "batch_url must use the origin's scheme (http or https)",
                    ));
                }
                Some(u) => Some(
                    batch::BatchUrl::parse(
                        u,
                        c.batch_sep.as_deref().unwrap_or(","),
                        c.batch_max.unwrap_or(100),
                        dur(&c.batch_window, "0s", "batch_window")?,
                    )
                    .map_err(|e| what(&e))?,
                ),
                None if c.batch_sep.is_some()
                    || c.batch_max.is_some()
                    || c.batch_window.is_some() =>
                {
                    return Err(what(
                        "batch_sep, batch_max and batch_window need a batch_url",
                    ));
                }
                None => None,
            };

            let ttl = dur(&c.ttl, "10m", "ttl")?;
            let timeout = dur(&c.timeout, "500ms", "timeout")?;
            if let Some(b) = &batch
                && b.window > timeout / 2
            {
                // (Each miss waits for its window, then for the batch request, within the
                // rule's timeout.)
                return Err(what(&format!(
                    "batch_window {:?} must be at most half the timeout ({timeout:?})",
                    b.window
                )));
            }
            if ttl.is_zero() || timeout.is_zero() {
                return Err(what("ttl and timeout must be > 0"));
            }
            let grace = dur(&c.grace, "0s", "grace")?;
            if c.refresh_ahead.is_some() && c.honor_max_age {
                // (The refresh point is a fraction of the rule's ttl, which max-age replaces.)
                return Err(what(
                    "refresh_ahead and honor_max_age cannot be used together",
                ));
            }
            let refresh_below = match c.refresh_ahead {
                None => grace,
                Some(f) if f > 0.0 && f < 1.0 => grace + ttl.mul_f64(1.0 - f),
                Some(f) => {
                    return Err(what(&format!(
                        "refresh_ahead {f}: a fraction of the TTL between 0 and 1, e.g. 0.8"
                    )));
                }
            };
            let rule = Rule {
                stats: Arc::new(RuleStats::new(&name)),
                prefix: c.prefix.as_bytes().to_vec(),
                template,
                origin,
                guard,
                lease: c.lease.unwrap_or(true),
                batch,
                refresh_below,
                ttl,
                honor_max_age: c.honor_max_age,
                negative_ttl: dur(&c.negative_ttl, "30s", "negative_ttl")?,
                timeout,
                max_body: c.max_body.unwrap_or(16 * 1024 * 1024),
                grace,
                name,
            };
            if let Some(o) = rules.iter().find(|o| o.prefix == rule.prefix) {
                return Err(format!(
                    "read-through rules '{}' and '{}' both own prefix '{}'",
                    o.name, rule.name, c.prefix
                ));
            }
            if rules.iter().any(|o| o.name == rule.name) {
                return Err(format!("two read-through rules are named '{}'", rule.name));
            }
            warn_if_insecure(&rule);
            rules.push(Arc::new(rule));
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Rules { rules })
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule owning `key`: the longest matching prefix.
    #[inline]
    pub fn find(&self, key: &[u8]) -> Option<&Arc<Rule>> {
        self.position(key).map(|i| &self.rules[i])
    }

    #[inline]
    fn position(&self, key: &[u8]) -> Option<usize> {
        self.rules.iter().position(|r| key.starts_with(&r.prefix))
    }

    /// After a reload, each rule keeps the counters of the running rule of the same name, so
    /// INFO and the metrics go on counting.
    pub fn keep_counters_of(&mut self, running: &Rules) {
        for rule in &mut self.rules {
            if let Some(old) = running.rules.iter().find(|o| o.name == rule.name)
                && let Some(rule) = Arc::get_mut(rule)
            {
                rule.stats = old.stats.clone();
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.iter()
    }
}

/// A rule's protection of its origin (issue 15.7): at most `max` fetches in flight over the
/// whole process (the others wait, within the rule's timeout), and a circuit breaker.
#[derive(Debug, Default)]
pub struct OriginGuard {
    pub limit: Option<(usize, Arc<tokio::sync::Semaphore>)>,
    pub breaker: Option<Breaker>,
}

impl OriginGuard {
    fn build(max: Option<usize>, breaker: Option<&str>) -> Result<OriginGuard, String> {
        let limit = match max {
            Some(0) => return Err("max_origin_concurrency must be > 0".into()),
            Some(n) => Some((n, Arc::new(tokio::sync::Semaphore::new(n)))),
            None => None,
        };
        let breaker = match breaker {
            None => None,
            Some(b) => {
                let bad = || format!("breaker '{b}': expected FAILURES/COOLDOWN, e.g. 5/10s");
                let (n, cooldown) = b.split_once('/').ok_or_else(bad)?;
                let threshold: u32 = n.trim().parse().map_err(|_| bad())?;
                let cooldown = parse_duration(cooldown.trim()).map_err(|_| bad())?;
                if threshold == 0 || cooldown.is_zero() {
                    return Err(bad());
                }
                Some(Breaker {
                    threshold,
                    cooldown,
                    state: Mutex::default(),
                })
            }
        };
        Ok(OriginGuard { limit, breaker })
    }

    /// Origin fetches of the rule in flight now.
    pub fn inflight(&self) -> usize {
        self.limit
            .as_ref()
            .map_or(0, |(max, sem)| max - sem.available_permits())
    }
}

/// A circuit breaker: `threshold` failed fetches in a row open it for `cooldown`, during
/// which the origin is not called; then one fetch is let through (half-open): its success
/// closes the breaker, its failure opens it again.
#[derive(Debug)]
pub struct Breaker {
    pub threshold: u32,
    pub cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    /// Half-open: the one trial fetch is in flight.
    trial: bool,
}

impl Breaker {
    /// Whether a fetch may call the origin now; `Err` with the time until it may.
    pub fn admit(&self) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match st.open_until {
            Some(until) if now < until => Err(until - now),
            Some(_) if st.trial => Err(Duration::ZERO),
            Some(_) => {
                st.trial = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A fetch that was admitted ended: `true` if the origin answered (a value or a 404),
    /// `false` if it failed. Whether the breaker opened now.
    pub fn record(&self, answered: bool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if answered {
            *st = BreakerState::default();
            return false;
        }
        st.failures = st.failures.saturating_add(1);
        if st.trial || (st.open_until.is_none() && st.failures >= self.threshold) {
            st.open_until = Some(Instant::now() + self.cooldown);
            st.trial = false;
            return true;
        }
        false
    }

    /// An admitted fetch that did not reach the origin (it waited too long for a
    /// concurrency permit): a half-open breaker lets the next fetch try.
    pub fn record_skipped(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.trial = false;
    }

    /// Whether it is open (or half-open) now.
    pub fn is_open(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.open_until.is_some()
    }
}

/// The warning for a rule with `insecure=true` (logged when its rules are built, and at
/// start-up once the log exists).
pub fn warn_if_insecure(rule: &Rule) {
    if rule.origin.insecure {
        tracing::warn!(
            rule = %rule.name,
            "read-through rule '{}': insecure=true: its origin's certificate is not verified \
             (for development only)",
            rule.name
        );
    }
}
