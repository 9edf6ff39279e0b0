//! A real HTTP/1.1 origin on loopback whose behaviour each test scripts (status, body, headers,
//! delay, hang, close) and which counts the requests it receives. A gate holds responses until
//! the test releases them, for controlled interleavings without sleeps.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the origin answers to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    /// Never answer (until the origin is dropped).
    pub hang: bool,
    /// Close the connection without answering.
    pub close: bool,
    /// Wait for [`Origin::release`] before answering.
    pub gated: bool,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            body: body.into(),
            headers: Vec::new(),
            delay: Duration::ZERO,
            hang: false,
            close: false,
            gated: false,
        }
    }

    pub fn status(status: u16) -> Self {
        Reply {
            status,
            ..Reply::ok(format!("status {status}"))
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }
}

/// The script: the reply to a request, from its path and headers (lower-case names).
type Script = Box<dyn Fn(&str, &[(String, String)]) -> Reply + Send + Sync>;

struct State {
    requests: AtomicUsize,
    paths: Mutex<Vec<String>>,
    /// Each request's headers, lower-case names.
    headers: Mutex<Vec<Vec<(String, String)>>>,
    script: Mutex<Arc<Script>>,
    gate_open: Mutex<bool>,
    gate: Condvar,
    stop: AtomicBool,
}

/// The origin server. Stops (and releases every held or hung request) on drop.
pub struct Origin {
    pub port: u16,
    state: Arc<State>,
}

impl Origin {
    /// Starts an origin answering every request with `script(path)`.
    pub fn start(script: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Origin {
        Self::start_with(None, script)
    }

    /// [`start`](Self::start) over HTTPS, with the certificate and key in these PEM files.
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        script: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
        Self::start_with(Some(Arc::new(config)), script)
    }

    fn start_with(
        tls: Option<Arc<rustls::ServerConfig>>,
        script: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            requests: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
            script: Mutex::new(Arc::new(Box::new(move |p, _| script(p)))),
            gate_open: Mutex::new(false),
            gate: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, tls) = (st.clone(), tls.clone());
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        std::thread::spawn(move || match tls {
                            Some(cfg) => {
                                if let Ok(tls) = rustls::ServerConnection::new(cfg) {
                                    serve(rustls::StreamOwned::new(tls, conn), st);
                                }
                            }
                            None => serve(conn, st),
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Origin { port, state }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// `https://localhost:PORT` + `path` (for an origin started with [`start_tls`]).
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// The values of header `name` (lower case) of each request so far, in order (`None`
    /// where a request did not have it).
    pub fn header_values(&self, name: &str) -> Vec<Option<String>> {
        self.state
            .headers
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .collect()
    }

    /// The paths requested so far.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    /// Replaces the script.
    pub fn set_script(&self, script: impl Fn(&str) -> Reply + Send + Sync + 'static) {
        self.set_script_with_headers(move |p, _| script(p));
    }

    /// Replaces the script with one that also sees each request's headers (lower-case names).
    pub fn set_script_with_headers(
        &self,
        script: impl Fn(&str, &[(String, String)]) -> Reply + Send + Sync + 'static,
    ) {
        *self.state.script.lock().unwrap() = Arc::new(Box::new(script));
    }

    /// Lets every held (gated) response go, and every later gated one at once.
    pub fn release(&self) {
        *self.state.gate_open.lock().unwrap() = true;
        self.state.gate.notify_all();
    }

    /// Closes the gate again for the next gated responses.
    pub fn hold(&self) {
        *self.state.gate_open.lock().unwrap() = false;
    }

    /// Polls until at least `n` requests arrived; panics after `within`.
    pub fn wait_for_requests(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.requests() < n {
            assert!(
                Instant::now() < deadline,
                "origin got {} requests, expected {n}",
                self.requests()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.release();
    }
}

fn serve<S: Read + Write>(conn: S, st: Arc<State>) {
    let mut reader = BufReader::new(conn);
    loop {
        // Request line and headers (GET only: no body).
        let mut line = String::new();
        let path = loop {
            if st.stop.load(Ordering::Relaxed) {
                return;
            }
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let l = line.trim_end();
                    if l.is_empty() {
                        continue;
                    }
                    break l.split_whitespace().nth(1).unwrap_or("/").to_string();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(_) => return,
            }
        };
        let mut headers = Vec::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => {
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
        st.paths.lock().unwrap().push(path.clone());
        let script = st.script.lock().unwrap().clone();
        let reply = script(&path, &headers);
        st.headers.lock().unwrap().push(headers);
        st.requests.fetch_add(1, Ordering::SeqCst);
        if reply.gated {
            let mut open = st.gate_open.lock().unwrap();
            while !*open && !st.stop.load(Ordering::Relaxed) {
                open = st
                    .gate
                    .wait_timeout(open, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
        }
        if reply.hang {
            while !st.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        if reply.close {
            return;
        }
        std::thread::sleep(reply.delay);
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let writer = reader.get_mut();
        if writer.write_all(head.as_bytes()).is_err()
            || writer.write_all(&reply.body).is_err()
            || writer.flush().is_err()
        {
            return;
        }
    }
}

/// A reply that never comes.
pub fn hang() -> Reply {
    Reply {
        hang: true,
        ..Reply::ok("")
    }
}

/// A connection closed without a reply.
pub fn close() -> Reply {
    Reply {
        close: true,
        ..Reply::ok("")
    }
}
