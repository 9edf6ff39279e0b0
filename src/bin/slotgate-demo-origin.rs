//! A tiny demo HTTP origin for slotgate's read-through: `GET /labels/<id>` returns a JSON
//! shipping-label payload for ids that start with `PO`, `404` otherwise. Each request is
//! logged, so a newcomer sees a cache miss being filled once and then served from Redis.
//!
//! `slotgate-demo-origin [ADDR]` (default `127.0.0.1:8080`). Plain std threads: this is a
//! demo, not part of the proxy.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("slotgate-demo-origin: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("demo origin listening on http://{addr}/labels/<id>");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || serve(conn));
    }
}

fn serve(conn: TcpStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        // Skip the headers.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim_end().is_empty() {
                break;
            }
        }
        let (status, body) = respond(&path);
        eprintln!("origin: GET {path} -> {status}");
        // Head and body in one write: two small writes on a kept-alive connection made the
        // second wait for the client's delayed ACK (about 40 ms per request).
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn respond(path: &str) -> (&'static str, String) {
    let Some(id) = path.strip_prefix("/labels/") else {
        return ("404 Not Found", "{\"error\":\"not found\"}".into());
    };
    if !id.starts_with("PO") || !id[2..].chars().all(|c| c.is_ascii_alphanumeric()) {
        return ("404 Not Found", format!("{{\"error\":\"no label {id}\"}}"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = format!(
        "{{\"id\":\"{id}\",\"carrier\":\"DHL\",\"service\":\"express\",\
         \"weight_kg\":1.5,\"generated_at\":{now}}}"
    );
    ("200 OK", body)
}
