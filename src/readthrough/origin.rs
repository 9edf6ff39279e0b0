//! The HTTP origin: URL templates and the fetch (hyper 1, HTTP/1.1 keep-alive pool).
//!
//! Status mapping: `200` → a value (with `Cache-Control: max-age` / `no-store` noted),
//! `404`/`410` → absent, anything else → an error. A body over the rule's cap is an error
//! and is never stored. Every fetch is bounded by the rule's timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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
    /// Parses `http://host:port/path/{rest}`. Only `http://` origins are supported.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest_of = s.strip_prefix("http://").ok_or_else(|| {
            format!("origin '{s}' must start with http:// (https is not supported yet)")
        })?;
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

fn percent_encode(b: &[u8], out: &mut String) {
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
    /// `200`: the body, the `max-age` if any, and whether `no-store` forbids caching it.
    Found {
        body: Bytes,
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

/// A keep-alive HTTP/1.1 client (one per worker thread).
#[derive(Clone)]
pub struct OriginClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for OriginClient {
    fn default() -> Self {
        Self::new()
    }
}

impl OriginClient {
    pub fn new() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(conn);
        OriginClient { client }
    }

    /// GETs `url` within `timeout`, reading at most `max_body` bytes of body.
    pub async fn fetch(
        &self,
        url: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Fetched, OriginError> {
        match tokio::time::timeout(timeout, self.fetch_inner(url, max_body)).await {
            Ok(r) => r,
            Err(_) => Err(OriginError::Timeout(timeout)),
        }
    }

    async fn fetch_inner(&self, url: &str, max_body: usize) -> Result<Fetched, OriginError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| OriginError::Other(format!("bad URL: {e}")))?;
        let req = hyper::Request::get(uri)
            .header(hyper::header::USER_AGENT, "slotgate")
            .body(Empty::<Bytes>::new())
            .map_err(|e| OriginError::Other(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                OriginError::Connect(source_text(&e))
            } else {
                OriginError::Other(source_text(&e))
            }
        })?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            404 | 410 => return Ok(Fetched::Absent),
            s => return Err(OriginError::Status(s)),
        }
        let (max_age, no_store) = cache_control(resp.headers());
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
                max_age = n.trim().parse::<u64>().ok().map(Duration::from_secs);
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
        assert!(UrlTemplate::parse("https://x/{key}").is_err());
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
