//! What holds or watches every client of slotgate at once: CLIENT PAUSE and MONITOR.
//!
//! Both are proxy-wide: a pause sent to one worker holds the clients of all of them, and a
//! monitor on one worker sees the commands of all. While neither is in use they cost a
//! command one relaxed load of [`Gate::bits`]; everything else here is off the hot path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::resp::Request;

/// Bytes of MONITOR lines that may wait for one monitor's worker to take them; past this,
/// that monitor is disconnected (its own output buffer has the pub/sub class's limit).
pub const MONITOR_BACKLOG: usize = 32 * 1024 * 1024;

/// CLIENT PAUSE's mode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PauseMode {
    /// Write commands, and those that may cause a write (EVAL, FCALL, PUBLISH, PFCOUNT …).
    Write,
    /// Every command.
    All,
}

/// The state of CLIENT PAUSE and the list of monitors.
pub struct Gate {
    /// [`Gate::MONITOR`] | [`Gate::PAUSE`]: the only thing a command looks at.
    bits: AtomicU8,
    pause: Mutex<Option<(PauseMode, Instant)>>,
    /// Counts pause ends; sessions holding a command wait for a change to try it again.
    resumed: watch::Sender<u64>,
    monitors: Mutex<Vec<Monitor>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            bits: AtomicU8::new(0),
            pause: Mutex::new(None),
            resumed: watch::Sender::new(0),
            monitors: Mutex::new(Vec::new()),
        }
    }
}

/// One monitoring client: where its lines go and how many wait there.
struct Monitor {
    id: u64,
    tx: mpsc::UnboundedSender<Bytes>,
    backlog: Arc<AtomicUsize>,
    /// Its session's CLIENT KILL: a monitor that falls behind is closed.
    kill: Arc<Notify>,
}

/// What a monitoring session receives its lines from (see [`Gate::add_monitor`]).
pub struct MonitorFeed {
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    pub backlog: Arc<AtomicUsize>,
}

impl Gate {
    /// At least one client is in MONITOR mode.
    pub const MONITOR: u8 = 1;
    /// A CLIENT PAUSE may be in force (see [`Gate::holds`]).
    pub const PAUSE: u8 = 2;

    /// What is in use: 0 on the hot path's usual day.
    #[inline]
    pub fn bits(&self) -> u8 {
        self.bits.load(Ordering::Relaxed)
    }

    /// CLIENT PAUSE until `until`: as Redis, a pause never gets shorter or less strict while
    /// it lasts (ALL stays ALL; the later end wins).
    pub fn pause(&self, mode: PauseMode, until: Instant) {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        *p = Some(match *p {
            Some((old, end)) if end > now => (
                if old == PauseMode::All { old } else { mode },
                end.max(until),
            ),
            _ => (mode, until),
        });
        self.bits.fetch_or(Self::PAUSE, Ordering::Relaxed);
    }

    /// CLIENT UNPAUSE (or the pause's end): held commands go on.
    pub fn unpause(&self) {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if p.take().is_some() {
            self.bits.fetch_and(!Self::PAUSE, Ordering::Relaxed);
            self.resumed.send_modify(|n| *n += 1);
        }
    }

    /// Ends the pause if its time has come (a pause's timer calls this at its end).
    pub fn expire(&self) {
        let due = self
            .pause
            .lock()
            .map(|p| p.is_some_and(|(_, end)| Instant::now() >= end))
            .unwrap_or(false);
        if due {
            self.unpause();
        }
    }

    /// Whether a command must wait now: every command while ALL is paused, the writing ones
    /// (`writes`) while WRITE is.
    pub fn holds(&self, writes: bool) -> bool {
        let state = *self.pause.lock().unwrap_or_else(|e| e.into_inner());
        match state {
            None => false,
            Some((_, end)) if Instant::now() >= end => {
                // Over, though its timer has not run yet.
                self.expire();
                false
            }
            Some((mode, _)) => mode == PauseMode::All || writes,
        }
    }

    /// Changes whenever a pause ends.
    pub fn resumed(&self) -> watch::Receiver<u64> {
        self.resumed.subscribe()
    }

    /// Adds a monitor; its session moves the lines from the feed into its own output.
    pub fn add_monitor(&self, id: u64, kill: Arc<Notify>) -> MonitorFeed {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let mut m = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        m.push(Monitor {
            id,
            tx,
            backlog: backlog.clone(),
            kill,
        });
        self.bits.fetch_or(Self::MONITOR, Ordering::Relaxed);
        MonitorFeed { rx, backlog }
    }

    /// Removes a monitor (its session left MONITOR mode or closed).
    pub fn remove_monitor(&self, id: u64) {
        let mut m = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|x| x.id != id);
        if m.is_empty() {
            self.bits.fetch_and(!Self::MONITOR, Ordering::Relaxed);
        }
    }

    /// Sends one command to every monitor, as Redis's MONITOR shows it. A monitor whose
    /// backlog would pass [`MONITOR_BACKLOG`] is dropped and its session closed.
    pub fn feed(&self, addr: &SocketAddr, req: &Request<'_>) {
        let mut m = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        // (Stamped under the lock: lines from several workers stay in time order.)
        let line = monitor_line(SystemTime::now(), addr, req);
        m.retain(|x| {
            let before = x.backlog.fetch_add(line.len(), Ordering::Relaxed);
            if before + line.len() > MONITOR_BACKLOG || x.tx.send(line.clone()).is_err() {
                tracing::warn!(
                    client = x.id,
                    "closing MONITOR client that fell {MONITOR_BACKLOG} bytes behind"
                );
                x.kill.notify_one();
                return false;
            }
            true
        });
        if m.is_empty() {
            self.bits.fetch_and(!Self::MONITOR, Ordering::Relaxed);
        }
    }
}

/// Redis's MONITOR line: `+<unix time with 6 decimals> [0 <client address>] "arg" …`, each
/// argument quoted and escaped as Redis's `sdscatrepr` does; the arguments of AUTH, and
/// HELLO's AUTH user and password, are shown as `(redacted)`.
pub fn monitor_line(at: SystemTime, addr: &SocketAddr, req: &Request<'_>) -> Bytes {
    let t = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut b = BytesMut::with_capacity(48 + req.raw.len() * 2);
    b.put_slice(format!("+{}.{:06} [0 {addr}]", t.as_secs(), t.subsec_micros()).as_bytes());
    let name = req.arg(0);
    let auth = name.eq_ignore_ascii_case(b"auth");
    let hello = name.eq_ignore_ascii_case(b"hello");
    let mut redact = 0u8;
    for i in 0..req.argc() {
        let a = req.arg(i);
        b.put_u8(b' ');
        if redact > 0 || (auth && i > 0) {
            redact = redact.saturating_sub(1);
            b.put_slice(b"\"(redacted)\"");
            continue;
        }
        if hello && i >= 2 && a.eq_ignore_ascii_case(b"auth") {
            redact = 2;
        }
        repr(&mut b, a);
    }
    b.put_slice(b"\r\n");
    b.freeze()
}

/// `a` quoted and escaped as Redis's `sdscatrepr`.
fn repr(b: &mut BytesMut, a: &[u8]) {
    b.put_u8(b'"');
    for &c in a {
        match c {
            b'\\' => b.put_slice(b"\\\\"),
            b'"' => b.put_slice(b"\\\""),
            b'\n' => b.put_slice(b"\\n"),
            b'\r' => b.put_slice(b"\\r"),
            b'\t' => b.put_slice(b"\\t"),
            7 => b.put_slice(b"\\a"),
            8 => b.put_slice(b"\\b"),
            0x20..=0x7e => b.put_u8(c),
            _ => b.put_slice(format!("\\x{c:02x}").as_bytes()),
        }
    }
    b.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, Parsed, RequestParser};

    fn line(args: &[&[u8]]) -> String {
        let raw = crate::resp::request::command(args);
        let mut p = RequestParser::new();
        let Ok(Parsed::Command { req, .. }) = p.parse(&raw, &Limits::default(), true) else {
            panic!("parse");
        };
        let at = UNIX_EPOCH + std::time::Duration::from_micros(1_796_466_998_922_824);
        let s = monitor_line(at, &"127.0.0.1:43020".parse().unwrap(), &req);
        String::from_utf8_lossy(&s).into_owned()
    }

    #[test]
    fn monitor_lines_are_those_of_redis() {
        // Bytes from a real redis-server 7.0.15 (MONITOR while another client ran these).
        assert_eq!(
            line(&[b"set", b"k", b"a\"b\\c\n\x01\xff d"]),
            "+1796466998.922824 [0 127.0.0.1:43020] \"set\" \"k\" \"a\\\"b\\\\c\\n\\x01\\xff d\"\r\n"
        );
        assert_eq!(
            line(&[b"auth", b"u", b"p"]),
            "+1796466998.922824 [0 127.0.0.1:43020] \"auth\" \"(redacted)\" \"(redacted)\"\r\n"
        );
        assert_eq!(
            line(&[b"hello", b"3", b"auth", b"u", b"p", b"setname", b"n"]),
            "+1796466998.922824 [0 127.0.0.1:43020] \"hello\" \"3\" \"auth\" \"(redacted)\" \
             \"(redacted)\" \"setname\" \"n\"\r\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_only_grows_and_ends_on_time() {
        let g = Gate::default();
        assert!(!g.holds(true));
        let now = Instant::now();
        g.pause(PauseMode::All, now + std::time::Duration::from_secs(10));
        // A shorter, weaker pause changes neither the end nor the mode.
        g.pause(PauseMode::Write, now + std::time::Duration::from_secs(1));
        assert!(g.holds(false) && g.holds(true));
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        assert!(g.holds(false));
        let resumed = g.resumed();
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert!(!g.holds(true), "the pause is over at its end");
        assert_eq!(g.bits() & Gate::PAUSE, 0);
        assert!(resumed.has_changed().unwrap());
        // WRITE holds writes only.
        g.pause(
            PauseMode::Write,
            Instant::now() + std::time::Duration::from_secs(1),
        );
        assert!(g.holds(true) && !g.holds(false));
        g.unpause();
        assert!(!g.holds(true));
    }
}
