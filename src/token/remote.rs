//! An issuer's keys from `jwks_url`: downloaded over HTTPS (HTTP/1.1, system roots plus an
//! optional `jwks_ca_file`) before slotgate accepts clients, again every `jwks_refresh`, and
//! at once when a token names a key the issuer does not have (such downloads at most once
//! every [`WAKE_AT_MOST_EVERY`]). A failed download keeps the keys slotgate has and is retried with
//! a growing wait (1 s, doubling, up to a minute or `jwks_refresh`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{Issuer, KeySet, Source, parse_jwks};

/// How long one download may take (connect, TLS, request, body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_JWKS: usize = 1024 * 1024;
/// How soon after the last download an unknown `kid` caused it may cause another.
pub(super) const WAKE_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// Where an issuer's keys are downloaded from.
pub(super) struct Remote {
    pub(super) url: String,
    host: String,
    port: u16,
    /// Path and query of the request.
    path: String,
    ca: Option<PathBuf>,
    tls: tokio_rustls::TlsConnector,
    pub(super) every: Duration,
    /// An unknown `kid` asks for a download now.
    pub(super) wake: Arc<Notify>,
    /// Dropped with the issuer (a reload replaced it): its refresher ends.
    stop: watch::Sender<()>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CA {:?}, every {:?})", self.url, self.ca, self.every)
    }
}

impl Remote {
    /// Checks `url` (https only: keys over plain HTTP could be anyone's) and builds the TLS
    /// client. Contacts nothing.
    pub(super) fn new(url: &str, ca: Option<&Path>, every: Duration) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("jwks_url '{url}': {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("jwks_url '{url}' must be an https:// URL"));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("jwks_url '{url}' has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = crate::tls::https_connector(ca).map_err(|e| e.to_string())?;
        Ok(Remote {
            url: url.to_string(),
            port: uri.port_u16().unwrap_or(443),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            host,
            ca: ca.map(Path::to_path_buf),
            tls,
            every,
            wake: Arc::new(Notify::new()),
            stop: watch::channel(()).0,
        })
    }

    /// Downloads and parses the keys.
    pub(super) async fn fetch(&self) -> Result<KeySet, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.download())
            .await
            .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
        parse_jwks(&body)
    }

    async fn download(&self) -> Result<Bytes, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| format!("server name: {e}"))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        let request = hyper::Request::get(&self.path)
            .header(hyper::header::HOST, self.authority())
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "slotgate")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let response = send
                .send_request(request)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            if response.status() != hyper::StatusCode::OK {
                return Err(format!("HTTP status {}", response.status()));
            }
            Limited::new(response.into_body(), MAX_JWKS)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("body: {e}"))
        };
        // The connection is driven alongside the exchange; the exchange decides.
        tokio::pin!(conn);
        tokio::pin!(exchange);
        tokio::select! {
            r = &mut exchange => r,
            r = &mut conn => {
                r.map_err(|e| format!("HTTP: {e}"))?;
                exchange.await
            }
        }
    }

    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Downloads the keys of `issuer` now (start-up): whether it worked.
pub(super) async fn fetch_now(issuer: &Issuer) -> bool {
    let Source::Url(remote) = &issuer.source else {
        return true;
    };
    match remote.fetch().await {
        Ok(keys) => {
            tracing::info!(
                issuer = %issuer.name,
                keys = keys.len(),
                "token issuer keys downloaded from {}",
                remote.url
            );
            issuer.set_keys(keys);
            true
        }
        Err(e) => {
            tracing::warn!(
                issuer = %issuer.name,
                "cannot download the token issuer's keys from {}: {e}; retrying",
                remote.url
            );
            false
        }
    }
}

/// Keeps one issuer's keys fresh for as long as the issuer is in use. `due` is when the
/// first download is due.
pub(super) async fn keep_fresh(issuer: Weak<Issuer>, mut due: Instant) {
    let (wake, mut stop) = {
        let Some(i) = issuer.upgrade() else { return };
        let Source::Url(remote) = &i.source else {
            return;
        };
        (remote.wake.clone(), remote.stop.subscribe())
    };
    // When an unknown `kid` last caused a download.
    let mut woken: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = wake.notified() => {
                // An unknown key: download now, but not more often than allowed.
                if let Some(soonest) = woken.map(|t| t + WAKE_AT_MOST_EVERY)
                    && soonest > Instant::now()
                {
                    tokio::select! {
                        _ = tokio::time::sleep_until(soonest.min(due)) => {}
                        _ = stop.changed() => return,
                    }
                }
                woken = Some(Instant::now());
            }
            _ = stop.changed() => return,
        }
        let Some(i) = issuer.upgrade() else { return };
        let Source::Url(remote) = &i.source else {
            return;
        };
        let every = remote.every;
        due = if fetch_now(&i).await {
            failures = 0;
            Instant::now() + every
        } else {
            failures = failures.saturating_add(1);
            // 1 s after the first failure, doubling up to a minute.
            let backoff =
                Duration::from_secs(1 << (failures - 1).min(6)).min(Duration::from_secs(60));
            Instant::now() + backoff.min(every)
        };
    }
}
