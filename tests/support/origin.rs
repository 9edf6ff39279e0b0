//! A real HTTP/1.1 origin on loopback whose behaviour each test scripts (status, body, headers,
//! delay, hang, close) and which counts the requests it receives. A gate holds responses until
//! the test releases them, for controlled interleavings without sleeps.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
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

type Script = Box<dyn Fn(&str) -> Reply + Send + Sync>;

struct State {
    requests: AtomicUsize,
    paths: Mutex<Vec<String>>,
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            requests: AtomicUsize::new(0),
            paths: Mutex::new(Vec::new()),
            script: Mutex::new(Arc::new(Box::new(script))),
            gate_open: Mutex::new(false),
            gate: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(conn, st));
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

    /// The paths requested so far.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    /// Replaces the script.
    pub fn set_script(&self, script: impl Fn(&str) -> Reply + Send + Sync + 'static) {
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

fn serve(conn: TcpStream, st: Arc<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = conn.try_clone().unwrap();
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
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => {}
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
        let reply = script(&path);
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
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&reply.body).is_err() {
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
