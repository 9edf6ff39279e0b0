//! A worker's invalidation link to one shard: a RESP3 connection of its own with
//! `CLIENT TRACKING ON BCAST`, on which the shard pushes every key modified (and a null after
//! a flush). It reconnects with a backoff until it is stopped; each time it goes down and
//! each time it comes back, the worker's tracking clients that may have cached something
//! are flushed (see [`super::Tracker::flush_cached`]).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::notify::LocalNotify;
use crate::resp::request::push_command;
use crate::resp::scan::{ReplyScanner, array_elements, bulk_body, bulk_strings};
use crate::shard::UpstreamConfig;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the link PINGs its shard, and how many PINGs may go unanswered.
const KEEPALIVE: Duration = Duration::from_millis(500);
const KEEPALIVE_MISSES: u32 = 6;
/// Most bytes one frame from the shard may take (a push of many keys).
const FRAME_MAX: usize = 64 * 1024 * 1024;

pub struct Link {
    addr: SocketAddr,
    up: Cell<bool>,
    refused: std::cell::RefCell<Option<String>>,
    stopped: Cell<bool>,
    stop: LocalNotify,
    /// Ends the backoff at once (a client asks for tracking while the link is refused).
    wake: LocalNotify,
}

impl Link {
    /// Starts the link's task on the worker.
    pub fn start(addr: SocketAddr, cfg: UpstreamConfig, tracker: Weak<super::Tracker>) -> Rc<Self> {
        let link = Rc::new(Link {
            addr,
            up: Cell::new(false),
            refused: Default::default(),
            stopped: Cell::new(false),
            stop: LocalNotify::new(),
            wake: LocalNotify::new(),
        });
        tokio::task::spawn_local(link.clone().run(cfg, tracker));
        link
    }

    pub fn is_up(&self) -> bool {
        self.up.get()
    }

    pub fn stop(&self) {
        self.stopped.set(true);
        self.stop.notify_one();
    }

    async fn run(self: Rc<Self>, cfg: UpstreamConfig, tracker: Weak<super::Tracker>) {
        let mut backoff = BACKOFF_MIN;
        while !self.stopped.get() {
            // (A refusal is news only until the next attempt: the shard may allow it now.)
            *self.refused.borrow_mut() = None;
            let why = tokio::select! {
                why = self.connect(&cfg, &tracker) => why,
                _ = self.stop.notified() => return,
            };
            let was_up = self.up.replace(false);
            if was_up {
                backoff = BACKOFF_MIN;
                tracing::warn!(shard = %self.addr, "invalidation link lost: {why}; tracking clients flushed");
            } else if why.starts_with("handshake refused") {
                // (A shard without RESP3 or tracking, or a user without CLIENT TRACKING:
                // nothing would be invalidated.)
                tracing::warn!(shard = %self.addr, "invalidation link failed: {why}");
            } else {
                tracing::debug!(shard = %self.addr, "invalidation link failed: {why}");
            }
            // While the link is down, writes on its shard go unreported: clients that cached
            // something since the last flush are flushed at each attempt (at least every
            // BACKOFF_MAX), and again when it is back.
            if let Some(t) = tracker.upgrade() {
                t.flush_cached();
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.wake.notified() => {}
                _ = self.stop.notified() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects (TLS when the shards use it) and serves the link until it fails: why.
    async fn connect(&self, cfg: &UpstreamConfig, tracker: &Weak<super::Tracker>) -> String {
        let stream = match tokio::time::timeout(cfg.op_timeout, TcpStream::connect(self.addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("connect timed out after {:?}", cfg.op_timeout),
        };
        let _ = stream.set_nodelay(true);
        match &cfg.tls {
            None => self.serve(stream, cfg, tracker).await,
            Some(tls) => {
                let name = tls.name_for(self.addr.ip());
                match tokio::time::timeout(cfg.op_timeout, tls.connector.connect(name, stream))
                    .await
                {
                    Ok(Ok(s)) => self.serve(s, cfg, tracker).await,
                    Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                    Err(_) => "TLS handshake timed out".into(),
                }
            }
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
        cfg: &UpstreamConfig,
        tracker: &Weak<super::Tracker>,
    ) -> String {
        let (mut rd, mut wr) = tokio::io::split(s);
        let mut out = BytesMut::new();
        let mut answers = 2;
        if let Some(a) = &cfg.auth {
            push_command(&mut out, &a.auth_command());
            answers += 1;
        }
        push_command(&mut out, &[b"HELLO", b"3"]);
        push_command(&mut out, &[b"CLIENT", b"TRACKING", b"ON", b"BCAST"]);
        if let Err(e) = wr.write_all(&out).await {
            return e.to_string();
        }
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut scanner = ReplyScanner::new();
        // A PING every KEEPALIVE, so that the shard's idle `timeout` never closes the link
        // and a link that stopped answering is noticed.
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        let mut unanswered = 0u32;
        loop {
            // Every complete frame in the buffer.
            loop {
                let frame = match scanner.scan(&buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return format!("invalid frame from the shard ({e:?})"),
                };
                let f = buf.split_to(frame.len).freeze();
                let Some(t) = tracker.upgrade() else {
                    return "stopped".into();
                };
                if frame.push {
                    if let Some(keys) = invalidation(&f) {
                        t.invalidated(keys);
                    }
                } else if answers > 0 {
                    answers -= 1;
                    if let Err(why) = self.handshake_reply(&f, answers, &t) {
                        return why;
                    }
                } else {
                    unanswered = unanswered.saturating_sub(1);
                }
            }
            if buf.len() > FRAME_MAX {
                return "frame from the shard too large".into();
            }
            buf.reserve(16 * 1024);
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => return "connection closed by the shard".into(),
                    Ok(_) => {}
                    Err(e) => return e.to_string(),
                },
                _ = keepalive.tick() => {
                    if unanswered >= KEEPALIVE_MISSES {
                        return format!("no answer to PING within {:?}", KEEPALIVE * KEEPALIVE_MISSES);
                    }
                    if answers == 0 {
                        unanswered += 1;
                        if let Err(e) = wr.write_all(b"*1\r\n$4\r\nPING\r\n").await {
                            return e.to_string();
                        }
                    }
                }
            }
        }
    }

    /// One reply to the handshake (`left` more to come): an error refuses the link (noted,
    /// so that CLIENT TRACKING ON can say why); the last one brings it up.
    fn handshake_reply(&self, f: &[u8], left: usize, t: &super::Tracker) -> Result<(), String> {
        if f.first() == Some(&b'-') {
            let text = String::from_utf8_lossy(&f[1..f.len() - 2]).into_owned();
            let why = format!("handshake refused by the shard {}: {text}", self.addr);
            *self.refused.borrow_mut() = Some(why.clone());
            t.link_up.notify_waiters();
            return Err(why);
        }
        if left == 0 {
            self.up.set(true);
            *self.refused.borrow_mut() = None;
            tracing::debug!(shard = %self.addr, "invalidation link up");
            // Writes while it was down (or before it first came up) were not reported.
            t.flush_cached();
            t.link_up.notify_waiters();
        }
        Ok(())
    }

    /// A link the shard refused tries again now (the shard may allow it by now): until that
    /// attempt says otherwise, it is not taken as refused.
    pub fn retry_if_refused(&self) {
        if self.refused.borrow_mut().take().is_some() {
            self.wake.notify_one();
        }
    }

    /// Why the shard refused the link's last handshake, if it did.
    pub fn refused(&self) -> Option<String> {
        self.refused.borrow().clone()
    }
}

/// The keys of an `invalidate` push (`Some(None)`: a flush), or `None` for another push.
fn invalidation(f: &Bytes) -> Option<Option<Vec<Bytes>>> {
    let el = array_elements(f)?;
    let (&(s0, e0), &(s1, e1)) = (el.first()?, el.get(1)?);
    if bulk_body(&f[s0..e0]) != Some(b"invalidate") {
        return None;
    }
    let keys = &f[s1..e1];
    Some(match keys.first() {
        Some(b'*') => Some(bulk_strings(keys)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidate_pushes_are_read() {
        let keys = Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\na\r\n$2\r\nbc\r\n");
        assert_eq!(
            invalidation(&keys),
            Some(Some(vec![Bytes::from("a"), Bytes::from("bc")]))
        );
        let flush = Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n_\r\n");
        assert_eq!(invalidation(&flush), Some(None));
        let other = Bytes::from_static(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n");
        assert_eq!(invalidation(&other), None);
    }
}
