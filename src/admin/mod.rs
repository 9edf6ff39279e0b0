//! The admin HTTP listener: the dashboard (`/`, see `dashboard.html`) and its data
//! (`/overview`, `/hotkeys`, `/bigkeys`: JSON), `/metrics` (Prometheus text), `/healthz` (the
//! process answers), `/readyz` (every shard has all its connections up), `POST /invalidate`
//! (read-through invalidation, with its own bearer token). With `admin_token` set, everything
//! but `/healthz`, `/readyz` and `/invalidate` asks for it (`Authorization: Bearer …`, or
//! `?token=…` for a browser). HTTP/1.1 with hyper, on the acceptor's runtime; never on a worker.

mod views;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::metrics as m;
use crate::worker::Shared;

/// Serves admin requests until the process exits.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    if req.uri().path() == "/invalidate" {
                        return Ok::<_, Infallible>(invalidate(&shared, req).await);
                    }
                    Ok::<_, Infallible>(handle(&shared, &req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn typed(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    typed(status, "text/plain; charset=utf-8", body)
}

fn json(body: &serde_json::Value) -> Response<Full<Bytes>> {
    typed(StatusCode::OK, "application/json", body.to_string())
}

/// The dashboard: one page, no external scripts or fonts.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Whether the request carries the admin token (or none is configured): `Authorization:
/// Bearer <token>` (the scheme in any case), or `token=<token>` in the query
/// (percent-decoded, as the page's address gives it).
fn authorized<B>(shared: &Shared, req: &Request<B>) -> bool {
    let Some(token) = shared.live().admin_token.clone() else {
        return true;
    };
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].to_vec());
    let query = views::pairs(req.uri().query())
        .into_iter()
        .find(|(k, _)| k == b"token")
        .map(|(_, v)| v);
    [header, query]
        .into_iter()
        .flatten()
        .any(|given| crate::auth::constant_time_eq(&given, token.as_bytes()))
}

fn handle<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    if !matches!(path, "/healthz" | "/readyz") && !authorized(shared, req) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: admin_token is set\n",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    match path {
        "/" => typed(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        "/overview" => json(&views::overview(shared)),
        "/hotkeys" | "/bigkeys" => match views::query(req.uri().query()) {
            Ok(q) if path == "/hotkeys" => json(&views::hot_keys(shared, q)),
            Ok(q) => json(&views::big_keys(shared, q)),
            Err(e) => {
                let why = crate::resp::reply::hotkeys_query(e);
                let why = String::from_utf8_lossy(&why[1..why.len() - 2]).into_owned();
                text(StatusCode::BAD_REQUEST, format!("{why}\n"))
            }
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let down = shared.shards_down();
            if *shared.draining.borrow() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                )
            } else if down.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: shard(s) without connections: {}\n",
                        down.join(", ")
                    ),
                )
            }
        }
        "/metrics" => match &shared.prometheus {
            Some(h) => {
                refresh_gauges(shared);
                text(StatusCode::OK, h.render())
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: / /overview /hotkeys /bigkeys /metrics /healthz /readyz /invalidate\n",
        ),
    }
}

/// Largest `POST /invalidate` body read.
const MAX_INVALIDATE_BODY: usize = 1 << 20;

/// `POST /invalidate` with `Authorization: Bearer <SLOTGATE_INVALIDATE_TOKEN>` and a JSON body
/// `{"keys": [...]}` or `{"prefix": "..."}`: the keys are deleted from the shards and every
/// instance forgets its state for them (see `readthrough::invalidate`); `200 {"cleared": N}`.
/// Without a configured token the endpoint does not exist (404).
async fn invalidate(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use crate::readthrough::invalidate::{Invalidation, Job};
    use http_body_util::BodyExt;
    let Some(token) = &shared.invalidate_token else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: /invalidate needs SLOTGATE_INVALIDATE_TOKEN\n",
        );
    };
    if req.method() != hyper::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if !crate::auth::constant_time_eq(given, token.as_bytes()) {
        return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_INVALIDATE_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large or cut\n"),
    };
    let what = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(o)) => match (o.get("keys"), o.get("prefix")) {
            (Some(serde_json::Value::Array(keys)), None) => keys
                .iter()
                .map(|k| k.as_str().map(|k| Bytes::copy_from_slice(k.as_bytes())))
                .collect::<Option<Vec<Bytes>>>()
                .map(Invalidation::Keys),
            (None, Some(serde_json::Value::String(p))) if !p.is_empty() => {
                Some(Invalidation::Prefix(Bytes::copy_from_slice(p.as_bytes())))
            }
            _ => None,
        },
        _ => None,
    };
    let Some(what) = what else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected {\"keys\": [\"k1\", …]} or {\"prefix\": \"p\"}\n",
        );
    };
    // Only what read-through rules own: the token deletes nothing else.
    let rules = shared.live().readthrough.clone();
    let owned = match &what {
        Invalidation::Keys(keys) => keys.iter().all(|k| rules.find(k).is_some()),
        Invalidation::Prefix(p) => rules.find(p).is_some(),
    };
    if !owned {
        return text(
            StatusCode::BAD_REQUEST,
            "only keys (or a prefix) of a read-through rule can be invalidated\n",
        );
    }
    let (done, result) = tokio::sync::oneshot::channel();
    let sent = shared
        .invalidations
        .get()
        .is_some_and(|jobs| jobs.send(Job { what, done }).is_ok());
    match (sent, result.await) {
        (true, Ok(Ok(n))) => typed(
            StatusCode::OK,
            "application/json",
            format!("{{\"cleared\": {n}}}\n"),
        ),
        (true, Ok(Err(e))) => text(
            StatusCode::BAD_GATEWAY,
            format!("invalidation failed: {e}\n"),
        ),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

/// Copies the process counters and gauges kept as atomics into the registry.
fn refresh_gauges(shared: &Shared) {
    let st = &shared.stats;
    metrics::gauge!(m::CONNECTIONS).set(shared.connected.load(Ordering::Relaxed) as f64);
    metrics::counter!(m::CONNECTIONS_TOTAL)
        .absolute(st.connections_received.load(Ordering::Relaxed));
    metrics::counter!(m::REJECTED).absolute(st.rejected_connections.load(Ordering::Relaxed));
    metrics::counter!(m::AUTH_FAILURES).absolute(st.auth_failures.load(Ordering::Relaxed));
    metrics::counter!(m::TOKEN_AUTHS).absolute(st.token_auths.load(Ordering::Relaxed));
    if shared.settings.cluster.is_some() {
        shared.cluster_stats.publish();
    }
    for rule in shared.live().readthrough.iter() {
        rule.stats.publish();
        rule.stats.publish_guard(&rule.name, &rule.guard);
    }
    let addrs = shared.live().shards.clone();
    let shards: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    m::register_at_zero(&shards, crate::command::CLASSES);
    metrics::counter!(m::OBUF_CLOSES).absolute(st.obuf_closes.load(Ordering::Relaxed));
    {
        let t = shared
            .command_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        metrics::counter!(m::ERROR_REPLIES).absolute(t.total_errors);
        for (class, (calls, _)) in views::per_class(&t) {
            metrics::counter!(m::REQUESTS, "class" => class).absolute(calls);
        }
    }
    let hot = shared.hot_merged.merged(
        &shared.hot_books,
        std::time::Instant::now(),
        std::time::Duration::from_secs(60),
    );
    for (&addr, shard) in addrs.iter().zip(shards) {
        let share = hot.hottest_share(addr);
        metrics::gauge!(m::HOTKEY_SHARE, "shard" => shard.clone()).set(share);
        metrics::gauge!(m::SHARD_RPS, "shard" => shard.clone()).set(hot.shard_rate(addr));
        let up = shared.shard_is_up(addr);
        metrics::gauge!(m::SHARD_UP, "shard" => shard.clone()).set(if up { 1.0 } else { 0.0 });
        let inflight = shared.shard_inflight(addr);
        metrics::gauge!(m::SHARD_INFLIGHT, "shard" => shard).set(inflight as f64);
    }
}
