//! The HTTP origin: URL templates and the fetch (hyper 1, HTTP/1.1 keep-alive pool per
//! worker and TLS setting).
//!
//! An `https://` origin is reached with rustls (ring): the system's roots plus the rule's `ca`
//! file, SNI and certificate verification on, unless the rule says `insecure=true`
//! (development only: logged at WARN). A rule's `header=NAME:VALUE` options are sent with
//! every request; `VALUE` may be `env:VAR`, read from the environment when the configuration
//! is loaded, and header values are never printed (see [`OriginSpec`]).
//!
//! Status mapping: `200` → a value (with `Cache-Control: max-age` / `no-store`, `ETag` and
//! `Last-Modified` noted), `304` to a conditional request → not modified, `404`/`410` →
//! absent, anything else → an error. A body over the rule's cap is an error
//! and is never stored. Every fetch is bounded by the rule's timeout.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::revalidate::Validators;

/// A URL with `{key}` / `{rest}` placeholders, split once at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Key,
    Rest,
}

impl UrlTemplate {
    /// Parses `http(s)://host:port/path/{rest}`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest_of = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .ok_or_else(|| format!("origin '{s}' must start with http:// or https://"))?;
        if rest_of.is_empty() || rest_of.starts_with('/') {
            return Err(format!("origin '{s}' has no host"));
        }
        // The host and port are literal: a client's key must never choose where slotgate
        // fetches from (found by the fuzz harness: `http://{key}` used to pass).
        let authority = rest_of.split(['/', '?']).next().unwrap_or("");
        if authority.contains(['{', '}']) {
            return Err(format!(
                "origin '{s}': {{key}} and {{rest}} may appear only in the path or the query, \
                 not in the host or port"
            ));
        }
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        let b = s.as_bytes();
        while i < b.len() {
            if s[i..].starts_with("{key}") {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
                parts.push(Part::Key);
                i += 5;
            } else if s[i..].starts_with("{rest}") {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
                parts.push(Part::Rest);
                i += 6;
            } else if b[i] == b'{' || b[i] == b'}' {
                return Err(format!(
                    "origin '{s}': only {{key}} and {{rest}} may appear in braces"
                ));
            } else {
                let c = s[i..].chars().next().unwrap_or(' ');
                lit.push(c);
                i += c.len_utf8();
            }
        }
        parts.push(Part::Literal(lit));
        parts.retain(|p| !matches!(p, Part::Literal(l) if l.is_empty()));
        let t = UrlTemplate { parts };
        // The host part must be literal and valid.
        let probe = t.render(b"k", 0);
        probe
            .parse::<hyper::Uri>()
            .map_err(|e| format!("origin '{s}' is not a valid URL: {e}"))?;
        Ok(t)
    }

    /// Whether the origin is `https://`.
    pub fn is_https(&self) -> bool {
        matches!(self.parts.first(), Some(Part::Literal(l)) if l.starts_with("https://"))
    }

    /// The URL for `key`; `{rest}` is the key without its first `prefix_len` bytes. Both are
    /// percent-encoded (everything but unreserved characters).
    pub fn render(&self, key: &[u8], prefix_len: usize) -> String {
        let mut out = String::with_capacity(64);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Key => percent_encode(key, &mut out),
                Part::Rest => percent_encode(&key[prefix_len.min(key.len())..], &mut out),
            }
        }
        out
    }
}

pub(crate) fn percent_encode(b: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // "." and ".." would be dot-segments that an origin may normalise away: encode them.
    let dots = b == b"." || b == b"..";
    for &c in b {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~') || (c == b'.' && !dots) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(HEX[(c >> 4) as usize] as char);
            out.push(HEX[(c & 15) as usize] as char);
        }
    }
}

/// What the origin said about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// `200`: the body, the `max-age` if any, whether `no-store` forbids caching it, and its
    /// validators.
    Found {
        body: Bytes,
        max_age: Option<Duration>,
        no_store: bool,
        validators: Validators,
    },
    /// `304` to a conditional request: the value held is current (`max-age` and `no-store`
    /// as for `200`).
    NotModified {
        max_age: Option<Duration>,
        no_store: bool,
    },
    /// `404` or `410`.
    Absent,
}

/// Why a fetch failed. Each kind is a metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginError {
    Status(u16),
    Timeout(Duration),
    Connect(String),
    TooLarge(usize),
    Other(String),
}

impl OriginError {
    /// The low-cardinality label used in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::Status(_) => "status",
            OriginError::Timeout(_) => "timeout",
            OriginError::Connect(_) => "connect",
            OriginError::TooLarge(_) => "too_large",
            OriginError::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for OriginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OriginError::Status(s) => write!(f, "HTTP {s}"),
            OriginError::Timeout(d) => write!(f, "timed out after {d:?}"),
            OriginError::Connect(e) => write!(f, "cannot connect: {e}"),
            OriginError::TooLarge(n) => write!(f, "body larger than {n} bytes"),
            OriginError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// How a rule's origin is reached: the TLS settings of an `https://` origin, and the headers
/// sent with every request. Its `Debug` names the headers but never prints their values.
#[derive(Default, Clone)]
pub struct OriginSpec {
    /// `https://`: the roots and verifier (`None`: plain HTTP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where `tls`'s extra roots came from, and whether verification is off (for `Debug`).
    pub tls_note: String,
    /// `insecure=true`: the origin's certificate is not verified.
    pub insecure: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for OriginSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        // (A short digest of the values, so that a reload sees them change; never a value.)
        let values: Vec<&[u8]> = self.headers.iter().map(|(_, v)| v.as_bytes()).collect();
        let digest = crate::auth::sha256(&values.concat());
        f.debug_struct("OriginSpec")
            .field("tls", &self.tls_note)
            .field("headers", &names)
            .field("digest", &format!("{:02x}{:02x}", digest[0], digest[1]))
            .finish()
    }
}

impl OriginSpec {
    /// A rule's origin settings: `https` for an `https://` origin, with `ca` (a PEM file of
    /// roots added to the system's) or `insecure` (no verification); `headers` as
    /// `NAME:VALUE` or `NAME:env:VAR`. `Err` with the reason (never a header's value).
    pub fn build(
        https: bool,
        ca: Option<&str>,
        insecure: bool,
        headers: &[String],
    ) -> Result<OriginSpec, String> {
        if !https && (ca.is_some() || insecure) {
            return Err("ca and insecure apply to https:// origins only".into());
        }
        let (tls, tls_note) = if !https {
            (None, String::new())
        } else if insecure {
            (
                Some(insecure_config()?),
                "insecure (not verified)".to_string(),
            )
        } else {
            let connector = crate::tls::https_connector(ca.map(std::path::Path::new))
                .map_err(|e| e.to_string())?;
            let note = ca.map_or("system roots".to_string(), |c| {
                format!("system roots and {c}")
            });
            (Some(connector.config().clone()), note)
        };
        let mut out = Vec::new();
        for h in headers {
            // (The option is never shown: without a colon it may be all secret.)
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| "a header option is not NAME:VALUE".to_string())?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("header '{}': not a valid header name", name.trim()))?;
            let value = match value.strip_prefix("env:") {
                Some(var) => std::env::var(var).map_err(|_| {
                    format!("header {name}: the environment variable {var} is not set")
                })?,
                None => value.trim().to_string(),
            };
            let mut value = HeaderValue::from_str(value.trim())
                .map_err(|_| format!("header {name}: its value is not a valid header value"))?;
            value.set_sensitive(true);
            out.push((name, value));
        }
        Ok(OriginSpec {
            tls,
            tls_note,
            insecure,
            headers: out,
        })
    }
}

/// TLS without certificate verification (`insecure=true`, for development).
pub(crate) fn insecure_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = crate::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any server certificate (`insecure=true`); signatures are still checked, so the
/// handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A worker's HTTPS clients, one per TLS setting in force.
type HttpsClients = Rc<RefCell<Vec<(Arc<rustls::ClientConfig>, HttpsClient)>>>;

/// Keep-alive HTTP/1.1 clients (one set per worker thread): one for plain HTTP, and one per
/// TLS setting of the `https://` rules in force.
#[derive(Clone)]
pub struct OriginClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    https: HttpsClients,
}

impl Default for OriginClient {
    fn default() -> Self {
        Self::new()
    }
}

/// The TCP connector under every origin client.
fn http_connector() -> HttpConnector {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    conn
}

fn pooled<C>(conn: C) -> Client<C, Empty<Bytes>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(conn)
}

impl OriginClient {
    pub fn new() -> Self {
        OriginClient {
            client: pooled(http_connector()),
            https: Rc::default(),
        }
    }

    /// The client for `tls` (made on first use; those of rules a reload dropped go).
    fn https_client(&self, tls: &Arc<rustls::ClientConfig>) -> HttpsClient {
        let mut list = self.https.borrow_mut();
        if let Some((_, c)) = list.iter().find(|(t, _)| Arc::ptr_eq(t, tls)) {
            return c.clone();
        }
        list.retain(|(t, _)| Arc::strong_count(t) > 1);
        let mut http = http_connector();
        http.enforce_http(false);
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((**tls).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = pooled(conn);
        list.push((tls.clone(), client.clone()));
        client
    }

    /// GETs `url` within `timeout`, reading at most `max_body` bytes of body; with `cond`, a
    /// conditional GET (`If-None-Match`, `If-Modified-Since`).
    pub async fn fetch(
        &self,
        url: &str,
        spec: &OriginSpec,
        timeout: Duration,
        max_body: usize,
        cond: Option<&Validators>,
    ) -> Result<Fetched, OriginError> {
        match tokio::time::timeout(timeout, self.fetch_inner(url, spec, max_body, cond)).await {
            Ok(r) => r,
            Err(_) => Err(OriginError::Timeout(timeout)),
        }
    }

    async fn fetch_inner(
        &self,
        url: &str,
        spec: &OriginSpec,
        max_body: usize,
        cond: Option<&Validators>,
    ) -> Result<Fetched, OriginError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| OriginError::Other(format!("bad URL: {e}")))?;
        let mut req = hyper::Request::get(uri)
            .header(hyper::header::USER_AGENT, "slotgate")
            .body(Empty::<Bytes>::new())
            .map_err(|e| OriginError::Other(e.to_string()))?;
        for (name, value) in &spec.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(v) = cond {
            for (name, value) in [
                (hyper::header::IF_NONE_MATCH, &v.etag),
                (hyper::header::IF_MODIFIED_SINCE, &v.last_modified),
            ] {
                if let Some(value) = value.as_ref().and_then(|b| HeaderValue::from_bytes(b).ok()) {
                    req.headers_mut().insert(name, value);
                }
            }
        }
        let sent = match &spec.tls {
            Some(tls) => self.https_client(tls).request(req).await,
            None => self.client.request(req).await,
        };
        let resp = sent.map_err(|e| {
            if e.is_connect() {
                OriginError::Connect(source_text(&e))
            } else {
                OriginError::Other(source_text(&e))
            }
        })?;
        let status = resp.status().as_u16();
        let (max_age, no_store) = cache_control(resp.headers());
        match status {
            200 => {}
            304 if cond.is_some() => return Ok(Fetched::NotModified { max_age, no_store }),
            404 | 410 => return Ok(Fetched::Absent),
            s => return Err(OriginError::Status(s)),
        }
        let header = |name| {
            resp.headers()
                .get(name)
                .map(|v: &HeaderValue| Bytes::copy_from_slice(v.as_bytes()))
        };
        let validators = Validators {
            etag: header(hyper::header::ETAG),
            last_modified: header(hyper::header::LAST_MODIFIED),
        };
        if let Some(len) = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > max_body
        {
            return Err(OriginError::TooLarge(max_body));
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| OriginError::Other(source_text(&e)))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max_body {
                    return Err(OriginError::TooLarge(max_body));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Fetched::Found {
            body: buf.freeze(),
            max_age,
            no_store,
            validators,
        })
    }
}

/// The innermost cause of an error, which is where hyper keeps the useful text.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The longest `max-age` taken from an origin, in seconds (a year).
const MAX_AGE_CAP: u64 = 365 * 86_400;

/// `Cache-Control: max-age=N` and `no-store`.
fn cache_control(h: &hyper::HeaderMap) -> (Option<Duration>, bool) {
    let mut max_age = None;
    let mut no_store = false;
    for v in h.get_all(hyper::header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for d in v.split(',') {
            let d = d.trim().to_ascii_lowercase();
            if d == "no-store" {
                no_store = true;
            } else if let Some(n) = d.strip_prefix("max-age=") {
                // (At most a year: a huge max-age must not overflow a TTL.)
                max_age = n
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .map(|n| Duration::from_secs(n.min(MAX_AGE_CAP)));
            }
        }
    }
    (max_age, no_store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_percent_encoded() {
        let t = UrlTemplate::parse("http://127.0.0.1:8080/labels/{rest}?full={key}").unwrap();
        assert_eq!(
            t.render(b"label:PO 1/2", 6),
            "http://127.0.0.1:8080/labels/PO%201%2F2?full=label%3APO%201%2F2"
        );
        assert!(UrlTemplate::parse("https://x/{key}").unwrap().is_https());
        assert!(!UrlTemplate::parse("http://x/{key}").unwrap().is_https());
        assert!(UrlTemplate::parse("ftp://x/{key}").is_err());
        assert!(UrlTemplate::parse("http://x/{nope}").is_err());
        assert!(UrlTemplate::parse("ftp://x").is_err());
        assert!(UrlTemplate::parse("http:///path").is_err());
        // The key never chooses the host or the port (fuzzer find).
        for host_from_key in [
            "http://{key}",
            "http://h{key}/",
            "http://h:80{key}",
            "http://{rest}.example.com/x",
        ] {
            let e = UrlTemplate::parse(host_from_key).unwrap_err();
            assert!(
                e.contains("not in the host or port"),
                "{host_from_key}: {e}"
            );
        }
        assert!(UrlTemplate::parse("http://h/x?k={key}").is_ok());
        assert!(UrlTemplate::parse("http://h?k={key}").is_ok());
    }

    #[test]
    fn cache_control_directives() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::CACHE_CONTROL,
            "public, max-age=120".parse().unwrap(),
        );
        assert_eq!(cache_control(&h), (Some(Duration::from_secs(120)), false));
        h.insert(hyper::header::CACHE_CONTROL, "no-store".parse().unwrap());
        assert_eq!(cache_control(&h), (None, true));
    }
}
