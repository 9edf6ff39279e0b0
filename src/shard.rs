//! Upstream connections: one pipelined, multiplexed connection to a shard, shared by every
//! client session of one worker.
//!
//! Sessions append request bytes to the connection's output buffer and a [`Target`] to its
//! FIFO of pending replies. A writer writes everything queued since its last write in one
//! syscall (double-buffered, no allocation in steady state); a reader reads replies in bulk,
//! frames them with the resumable [`ReplyScanner`] and hands each one, as a zero-copy slice of
//! the read buffer, to the oldest pending target.
//!
//! Faults stay local to the shard, and every failure says whether the request reached the
//! shard. A request still in the output buffer (never written: the connection is down or the
//! shard stopped reading) fails with `-ERR shard unavailable: <addr>: …` and is removed, so it
//! is never sent later: retrying it is safe. A request that was written and got no reply fails
//! with `-ERR outcome unknown: <addr>: …`: the shard may have applied it.
//!
//! A written request that has waited `op_timeout` fails on its own; it stays in the FIFO,
//! abandoned, so that its late reply is matched and dropped, and it keeps counting against the
//! connection (and its client's pipeline) until then. The connection lives on: a slow command
//! does not cost everyone else their connection. The connection itself is replaced on
//! refused/reset/EOF, or when requests are pending and the shard has sent nothing at all for
//! `3 × op_timeout` (hung or partitioned): then every pending request fails at once.
//! Reconnects back off from 50 ms to at most 1 s; a request that arrives while the shard is
//! down triggers an attempt at once, so the first request after the shard returns succeeds.
//! Deadlines are kept while connecting too: no request waits longer than `op_timeout`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::netio::{PlainRead, PlainWrite, ReadSide, WriteSide};
use crate::notify::LocalNotify;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::queue::{Sink, SinkRef, Target};
use crate::resp::reply::{self, Proto};
use crate::resp::request::push_command;
use crate::resp::{ReplyScanner, ScanError};
use crate::tls::UpstreamTls;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Read buffer growth step (a larger reply grows it in steps, never from a claimed length).
const READ_CHUNK: usize = 16 * 1024;
/// Reads after which a shard connection's reader yields to the worker's other tasks.
const READS_BEFORE_YIELD: u32 = 64;
/// Buffers that grew beyond this for one large value are released once empty.
const KEEP_BUF: usize = 1024 * 1024;

/// A secret (password): never shown by `Debug`, logs or `--check-config`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Credentials sent with AUTH on every new connection to a shard.
#[derive(Clone, Debug)]
pub struct UpstreamAuth {
    pub username: Option<String>,
    pub password: Secret,
}

impl UpstreamAuth {
    /// `AUTH [username] password` with these credentials (the plain form without a name).
    pub fn auth_command(&self) -> Vec<&[u8]> {
        let mut c: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(u) = &self.username {
            c.push(u.as_bytes());
        }
        c.push(self.password.0.as_bytes());
        c
    }
}

/// How to reach and talk to one shard.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub op_timeout: Duration,
    pub max_inflight: usize,
    /// Request bytes queued or in flight (until their replies are read) beyond which new
    /// requests fail; one request alone may be larger.
    pub max_inflight_bytes: usize,
    /// AUTH sent first on every new connection.
    pub auth: Option<UpstreamAuth>,
    /// TLS to the shard.
    pub tls: Option<UpstreamTls>,
    /// Counts this shard's RESP2 connections that are up, over all workers (readiness).
    pub up: Arc<AtomicUsize>,
    /// A dedicated connection (transaction, blocking command): connects once, never
    /// reconnects (its server-side state would be lost), no silence detection (a blocked
    /// command is legitimately silent), and closes when its owner lets go.
    pub dedicated: bool,
    /// Run as this user's mirror: the handshake creates or updates the ACL user (with the
    /// configured credentials) and authenticates as it.
    pub mirror: Option<Arc<Mirror>>,
    /// Scripts and libraries loaded through slotgate: a new shared connection loads them
    /// again (see [`Scripts`]).
    pub scripts: Option<Arc<Scripts>>,
    /// slotgate's slow log, on the shared connections (whose requests' deadlines are their
    /// start plus `op_timeout`: see `slowlog`).
    pub slowlog: Option<Arc<crate::slowlog::SlowLog>>,
    /// A cluster replica that serves reads: `READONLY` after the handshake.
    pub readonly: bool,
    /// Cluster mode: a `-MOVED` that reaches its client (a request not sent to follow
    /// redirects) still makes slotgate read the layout again.
    pub cluster: bool,
}

/// Scripts (SCRIPT LOAD) and function libraries (FUNCTION LOAD) loaded through slotgate.
/// Every new shared connection to a shard loads them again right after its handshake, so a
/// shard that restarted empty still knows them and EVALSHA and FCALL keep working without
/// NOSCRIPT. SCRIPT FLUSH, FUNCTION FLUSH and FUNCTION DELETE forget them; at most
/// [`SCRIPTS_MAX_BYTES`] are kept.
#[derive(Debug, Default)]
pub struct Scripts {
    inner: std::sync::Mutex<ScriptsInner>,
}

#[derive(Debug, Default)]
struct ScriptsInner {
    scripts: Vec<Bytes>,
    /// (library name, code).
    libraries: Vec<(Bytes, Bytes)>,
    bytes: usize,
}

/// The most script and library bytes remembered; beyond, new ones are not (and a shard that
/// restarts loses them, as without slotgate).
pub const SCRIPTS_MAX_BYTES: usize = 16 * 1024 * 1024;

impl Scripts {
    /// Notes what a SCRIPT or FUNCTION command sent to every shard does to the set
    /// (`name` is the command's table name; `args` its arguments after the name).
    pub fn note(&self, name: &str, args: &[&[u8]]) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (name, args) {
            ("script|load", [_, body]) => s.add_script(body),
            ("script|flush", _) => {
                s.bytes -= s.scripts.iter().map(|b| b.len()).sum::<usize>();
                s.scripts.clear();
            }
            ("function|load", [.., code]) => s.add_library(code),
            ("function|delete", [_, lib]) => s.remove_library(lib),
            ("function|flush", _) => {
                s.bytes -= s.libraries.iter().map(|(_, c)| c.len()).sum::<usize>();
                s.libraries.clear();
            }
            _ => {}
        }
    }

    /// The commands that load everything again, and how many.
    fn loads(&self) -> Option<(BytesMut, usize)> {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.scripts.len() + s.libraries.len();
        if n == 0 {
            return None;
        }
        let mut out = BytesMut::with_capacity(s.bytes + 64 * n);
        for body in &s.scripts {
            push_command(&mut out, &[b"SCRIPT", b"LOAD", body]);
        }
        for (_, code) in &s.libraries {
            push_command(&mut out, &[b"FUNCTION", b"LOAD", b"REPLACE", code]);
        }
        Some((out, n))
    }
}

impl ScriptsInner {
    fn add_script(&mut self, body: &[u8]) {
        if self.scripts.iter().any(|s| s.as_ref() == body) {
            return;
        }
        if self.bytes + body.len() <= SCRIPTS_MAX_BYTES {
            self.bytes += body.len();
            self.scripts.push(Bytes::copy_from_slice(body));
        }
    }

    fn add_library(&mut self, code: &[u8]) {
        // `#!lua name=<lib>` on the first line names the library.
        let first = code.split(|&b| b == b'\n').next().unwrap_or_default();
        let Some(at) = first.windows(5).position(|w| w == b"name=") else {
            return;
        };
        let name = first[at + 5..]
            .split(|b| b.is_ascii_whitespace())
            .next()
            .unwrap_or_default();
        self.remove_library(name);
        if self.bytes + code.len() <= SCRIPTS_MAX_BYTES {
            self.bytes += code.len();
            self.libraries
                .push((Bytes::copy_from_slice(name), Bytes::copy_from_slice(code)));
        }
    }

    fn remove_library(&mut self, name: &[u8]) {
        if let Some(i) = self.libraries.iter().position(|(n, _)| n.as_ref() == name) {
            let (_, code) = self.libraries.remove(i);
            self.bytes -= code.len();
        }
    }
}

/// A `proxy.toml` user's counterpart on the shards, for running its scripts.
#[derive(Debug)]
pub struct Mirror {
    /// The `proxy.toml` user.
    pub user: String,
    /// The ACL user name on the shard: `slotgate:<user>:<digest of the rules>`, so that
    /// slotgates with different rules for one user name (a rolling change) never share, or
    /// overwrite, each other's mirror.
    pub name: String,
    /// Derived from the shard credentials and the name: the same for every worker and every
    /// slotgate sharing those shards, unknown to anyone without the shard's credentials.
    pub password: String,
    /// `ACL SETUSER` rules after the password.
    pub rules: Vec<String>,
}

impl Mirror {
    pub fn new(
        user: &crate::auth::User,
        shard_auth: Option<&UpstreamAuth>,
        deny: &[String],
        cluster: bool,
    ) -> Self {
        let mut rules = user.mirror_rules(deny);
        if cluster {
            // A script that follows an ASK goes behind ASKING (of the `@connection`
            // category a restricted user may not have).
            rules.push("+asking".into());
        }
        let digest = crate::auth::sha256(rules.join("\n").as_bytes());
        let name = format!(
            "slotgate:{}:{}",
            user.name,
            digest[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let mut seed = b"slotgate mirror\0".to_vec();
        if let Some(a) = shard_auth {
            seed.extend_from_slice(a.username.as_deref().unwrap_or("default").as_bytes());
            seed.push(0);
            seed.extend_from_slice(a.password.0.as_bytes());
        }
        seed.push(0);
        seed.extend_from_slice(name.as_bytes());
        let password = crate::auth::sha256(&seed)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Mirror {
            user: user.name.clone(),
            name,
            password,
            rules,
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    target: Target,
    deadline: Instant,
    /// Its request's length in bytes.
    len: usize,
    /// Cluster mode: the request itself, sent again if the node redirects it.
    retry: Option<Retry>,
}

/// A request that may be sent again elsewhere (cluster mode): a node that answers
/// `-MOVED`, `-ASK` or `-TRYAGAIN` did not run it (see `cluster::redirector`). One
/// allocation: the redirects it has had so far, then its bytes (a pointer in the FIFO entry,
/// which stays small for static mode).
pub struct Retry(Box<[u8]>);

impl Retry {
    /// Bit of the first byte: the request goes behind `ASKING` (an ASK sent it).
    const ASKING: u8 = 0x80;

    pub fn new(raw: &[u8], hops: u8) -> Self {
        let mut b = Vec::with_capacity(raw.len() + 1);
        b.push(hops & !Self::ASKING);
        b.extend_from_slice(raw);
        Retry(b.into_boxed_slice())
    }

    pub fn raw(&self) -> &[u8] {
        &self.0[1..]
    }

    /// Redirects it has had so far.
    pub fn hops(&self) -> u8 {
        self.0[0] & !Self::ASKING
    }

    /// One more redirect.
    pub fn hop(mut self) -> Self {
        if self.hops() < !Self::ASKING {
            self.0[0] += 1;
        }
        self
    }

    /// Whether it goes behind `ASKING` (to the node an ASK named, until it is redirected
    /// again).
    pub fn is_asking(&self) -> bool {
        self.0[0] & Self::ASKING != 0
    }

    pub fn asking(mut self, on: bool) -> Self {
        if on {
            self.0[0] |= Self::ASKING;
        } else {
            self.0[0] &= !Self::ASKING;
        }
        self
    }
}

/// A (un)subscribe command on a subscriber connection, waiting for its confirmations.
struct Confirmations {
    /// The reply slot they fill ([`SILENT`]: none, slotgate subscribed on its own).
    seq: u64,
    /// Confirmation frames still to come, and those that came.
    left: usize,
    acc: BytesMut,
    /// The command (cluster mode sends it again elsewhere when it is redirected), and the
    /// redirects it followed to get here.
    raw: Bytes,
    hops: u8,
}

/// The reply slot of a subscription slotgate makes on its own (a sharded channel whose slot
/// moved, subscribed again at its new node): its confirmation goes nowhere.
pub const SILENT: u64 = u64::MAX;

/// Cluster mode: what a subscriber connection tells its session (see `session::follow`).
pub trait SubscriptionsMoved {
    /// The (un)subscribe command `raw`, whose confirmations were to fill reply slot `seq`,
    /// was answered with the error `reply` (a redirect to follow, or its answer) by `from`,
    /// after `hops` redirects before.
    fn redirected(&self, seq: u64, raw: Bytes, reply: Bytes, from: SocketAddr, hops: u8);
    /// `from` dropped a sharded channel (its slot went to another node): `frame` is its
    /// `sunsubscribe` message.
    fn dropped(&self, frame: Bytes, from: SocketAddr);
}

/// A reply that redirects its request, handed to the worker's redirector with what it
/// needs to send the request again.
pub struct Redirected {
    /// The redirect (`-MOVED …`, `-ASK …`, `-TRYAGAIN …`).
    pub reply: Bytes,
    /// The node that answered it, and the protocol of its connection.
    pub from: SocketAddr,
    pub proto: crate::resp::Proto,
    pub retry: Retry,
    pub target: Target,
    pub deadline: Instant,
}

thread_local! {
    /// This worker's redirected requests, for its redirector (`cluster::redirector`), and
    /// whether something said the layout may have changed (see [`layout_in_doubt`]).
    static REDIRECTS: (RefCell<VecDeque<Redirected>>, Rc<tokio::sync::Notify>, Cell<bool>) =
        Default::default();
}

/// Queues a redirected request for this worker's redirector.
#[cold]
fn redirected(r: Redirected) {
    REDIRECTS.with(|(q, wake, _)| {
        q.borrow_mut().push_back(r);
        wake.notify_one();
    });
}

/// Cluster mode: the layout may have changed, and slotgate reads it again soon: a `-MOVED`
/// went to a client as it was (its request does not follow redirects), a node answered
/// `-CLUSTERDOWN`, or a connection to a node was lost.
#[cold]
fn layout_in_doubt() {
    REDIRECTS.with(|(_, wake, moved)| {
        moved.set(true);
        wake.notify_one();
    });
}

/// Waits until this worker has redirected requests (or a reason to doubt the layout), and
/// takes them; `true` with a doubt.
pub async fn next_redirects() -> (VecDeque<Redirected>, bool) {
    let wake = REDIRECTS.with(|(_, w, _)| w.clone());
    loop {
        let (got, moved) =
            REDIRECTS.with(|(q, _, m)| (std::mem::take(&mut *q.borrow_mut()), m.replace(false)));
        if !got.is_empty() || moved {
            return (got, moved);
        }
        wake.notified().await;
    }
}

/// Whether a reply is a cluster redirect, or another refusal that says the node did not run
/// the request and it may succeed later (`-CLUSTERDOWN`).
#[inline]
pub fn is_redirect(reply: &[u8]) -> bool {
    reply.first() == Some(&b'-')
        && (reply.starts_with(b"-MOVED ")
            || reply.starts_with(b"-ASK ")
            || reply.starts_with(b"-TRYAGAIN")
            || reply.starts_with(b"-CLUSTERDOWN"))
}

#[derive(Default)]
struct State {
    /// Request bytes not yet written.
    out: BytesMut,
    /// Targets of the requests written or queued, oldest first.
    pending: VecDeque<Pending>,
    /// How many requests at the front of `pending` timed out: their clients already got an
    /// error, and their replies are dropped when they arrive. (Deadlines grow along the FIFO,
    /// so the timed-out requests are always a prefix.)
    abandoned: usize,
    /// How many requests at the back of `pending` are still in `out`, not handed to the
    /// socket: `out` holds exactly their bytes, in order (unless `oob` bytes are mixed in).
    unsent: usize,
    /// Bytes of the requests in `pending`.
    inflight_bytes: usize,
    /// The new connection's handshake (AUTH, HELLO), written before anything else.
    handshake_out: BytesMut,
    /// Handshake replies still expected: requests are written only once they all came, so
    /// a refused handshake leaves them unsent (and safe to retry).
    handshaking: usize,
    connected: bool,
}

/// One multiplexed connection to one shard.
pub struct Upstream {
    pub addr: SocketAddr,
    label: String,
    proto: Proto,
    cfg: UpstreamConfig,
    st: RefCell<State>,
    /// Bytes were queued (writer) or a connect is wanted (driver while down).
    wake_writer: LocalNotify,
    /// The pending FIFO went from empty to non-empty: arm the op-timeout deadline.
    wake_reader: LocalNotify,
    /// Closed by its owner (dedicated connections): the driver stops.
    closed: std::cell::Cell<bool>,
    /// Close once nothing is in flight any more (see [`Upstream::close_when_idle`]).
    close_when_idle: std::cell::Cell<bool>,
    /// The busy probe of a silent connection (see [`Upstream::shard_is_busy`]).
    probe: Rc<std::cell::Cell<ProbeState>>,
    /// A subscriber connection: every frame after the handshake goes to this queue's
    /// out-of-band list instead of being matched to a request.
    sink: RefCell<Option<Rc<crate::queue::ReplyQueue>>>,
    /// Subscription confirmations still expected on a subscriber connection.
    confirmations: RefCell<VecDeque<Confirmations>>,
    /// Cluster mode: where a subscriber connection tells its session about sharded channels
    /// whose slot moved.
    moved: RefCell<Option<Rc<dyn SubscriptionsMoved>>>,
    /// A subscriber connection confirmed a subscription once: losing it from then on loses
    /// live subscriptions (the client is closed); before, its subscriptions never began.
    confirmed: std::cell::Cell<bool>,
    /// A dedicated connection whose one connection ended: every request fails at once.
    dead: std::cell::Cell<bool>,
    close_notify: LocalNotify,
    /// Bytes with no pending request were queued (`send_oob`): `out` no longer maps onto the
    /// unsent requests, so none is cut out of it.
    oob: std::cell::Cell<bool>,
    /// The shard's client id of a dedicated connection (0 until its `CLIENT ID` reply is in):
    /// CLIENT UNBLOCK names it.
    shard_id: Arc<std::sync::atomic::AtomicI64>,
}

/// Why a connection was dropped.
#[derive(Debug)]
enum Fault {
    Io(std::io::Error),
    /// The shard closed the connection.
    Closed,
    /// slotgate closed it (a dedicated connection its session is done with, a retired one).
    ClosedHere,
    TimedOut,
    Protocol(ScanError),
    Unexpected,
    /// Requests pending, and nothing at all read for this long; with the bytes the socket
    /// held unread then, if known (not 0 unless wake-ups were lost).
    Silent(Duration, Option<u64>),
    /// The shard refused the connection's AUTH/HELLO (its error text; no password in it).
    Handshake(String),
    Tls(String),
}

impl Fault {
    fn describe(&self, op_timeout: Duration) -> String {
        match self {
            Fault::Io(e) => e.to_string(),
            Fault::Closed => "connection closed by the shard".into(),
            Fault::ClosedHere => "closed by slotgate".into(),
            Fault::TimedOut => format!("no reply within {op_timeout:?}"),
            Fault::Silent(d, None) => format!("nothing received for {d:?} with requests pending"),
            Fault::Silent(d, Some(unread)) => format!(
                "nothing received for {d:?} with requests pending ({unread} bytes unread in the socket)"
            ),
            Fault::Protocol(e) => format!("invalid reply from the shard ({e:?})"),
            Fault::Unexpected => "reply with no request".into(),
            Fault::Handshake(e) => format!("handshake refused by the shard: {e}"),
            Fault::Tls(e) => format!("TLS handshake failed: {e}"),
        }
    }
}

impl Upstream {
    /// Creates the connection and spawns its driver on the current `LocalSet`.
    pub fn start(addr: SocketAddr, proto: Proto, cfg: UpstreamConfig) -> Rc<Self> {
        let up = Rc::new(Upstream {
            addr,
            label: addr.to_string(),
            proto,
            cfg,
            st: RefCell::new(State::default()),
            wake_writer: LocalNotify::new(),
            wake_reader: LocalNotify::new(),
            closed: std::cell::Cell::new(false),
            close_when_idle: std::cell::Cell::new(false),
            probe: Rc::new(std::cell::Cell::new(ProbeState::Idle)),
            sink: RefCell::new(None),
            confirmations: RefCell::new(VecDeque::new()),
            moved: RefCell::new(None),
            confirmed: std::cell::Cell::new(false),
            dead: std::cell::Cell::new(false),
            close_notify: LocalNotify::new(),
            oob: std::cell::Cell::new(false),
            shard_id: Arc::default(),
        });
        tokio::task::spawn_local(up.clone().drive());
        up
    }

    pub fn is_connected(&self) -> bool {
        self.st.borrow().connected
    }

    /// Requests queued or in flight on this connection.
    pub fn pending(&self) -> usize {
        self.st.borrow().pending.len()
    }

    /// Whether nothing but the connection's own requests (its handshake, a dedicated
    /// connection's `CLIENT ID`) waits for a reply: a dedicated connection can go to a new
    /// owner, who gets no reply meant for another.
    fn only_own_requests_pending(&self) -> bool {
        self.st
            .borrow()
            .pending
            .iter()
            .all(|p| matches!(p.target, Target::Handshake | Target::Sink(_)))
    }

    /// Queues one request (`raw` is a complete RESP command) whose reply goes to `target`.
    /// Fails it at once when the connection has too many requests in flight.
    /// How long a request may wait for its reply.
    pub fn op_timeout(&self) -> Duration {
        self.cfg.op_timeout
    }

    pub fn send(&self, raw: &[u8], target: Target, now: Instant) {
        self.send_until(raw, target, now + self.cfg.op_timeout)
    }

    /// Sends one request of the proxy's own and waits for its reply: the shard's, or the error
    /// a client would get (`op_timeout` applies).
    pub async fn request(&self, raw: &[u8]) -> Bytes {
        let shot = Rc::new(OneShot::default());
        let target = Target::Sink(SinkRef::new(shot.clone(), 0));
        if self.cfg.cluster {
            // (A read-through store follows redirects like a client's request.)
            let deadline = Instant::now() + self.cfg.op_timeout;
            self.send_retryable(Retry::new(raw, 0), target, deadline);
        } else {
            self.send(raw, target, Instant::now());
        }
        loop {
            if let Some(reply) = shot.reply.borrow_mut().take() {
                return reply;
            }
            shot.done.notified().await;
        }
    }

    /// Like [`send`](Self::send), with an explicit deadline (blocking commands wait as long
    /// as the client asked, not `op_timeout`).
    #[inline]
    pub fn send_until(&self, raw: &[u8], target: Target, deadline: Instant) {
        self.push(raw, target, deadline, None);
    }

    /// Cluster mode: like [`send_until`](Self::send_until), keeping the request to send it
    /// again if the node redirects it.
    pub fn send_retryable(&self, retry: Retry, target: Target, deadline: Instant) {
        self.push(&[], target, deadline, Some(retry));
    }

    /// Queues a request: `raw`, or (when that is empty) the bytes of `retry`. (Inlined into
    /// both senders: without a retry it is the plain send.)
    #[inline(always)]
    fn push(&self, raw: &[u8], target: Target, deadline: Instant, retry: Option<Retry>) {
        let raw = match &retry {
            Some(r) if raw.is_empty() => r.raw(),
            _ => raw,
        };
        if self.dead.get() || self.closed.get() {
            return target.deliver(reply::shard_unavailable(
                &self.label,
                "the dedicated connection was lost",
            ));
        }
        let mut st = self.st.borrow_mut();
        let full = if st.pending.len() >= self.cfg.max_inflight {
            Some("too many requests in flight")
        } else if st.inflight_bytes > 0
            && st.inflight_bytes + raw.len() > self.cfg.max_inflight_bytes
        {
            Some("too many bytes in flight")
        } else {
            None
        };
        if let Some(why) = full {
            drop(st);
            return target.deliver(reply::shard_unavailable(&self.label, why));
        }
        let wake_writer = st.out.is_empty();
        // The first request with a live deadline: the reader arms its timer.
        let wake_reader = st.pending.len() == st.abandoned;
        st.out.extend_from_slice(raw);
        st.unsent += 1;
        st.inflight_bytes += raw.len();
        st.pending.push_back(Pending {
            target,
            deadline,
            len: raw.len(),
            retry,
        });
        drop(st);
        if wake_writer {
            self.wake_writer.notify_one();
        }
        if wake_reader {
            self.wake_reader.notify_one();
        }
    }

    /// Fails every queued and in-flight request with `why`: those never written as
    /// unavailable (safe to retry), those written as of unknown outcome.
    fn fail_all(&self, why: &str) {
        let unsent = reply::Failure::ShardUnavailable {
            shard: &self.label,
            why,
        };
        self.fail_all_with(why, unsent);
    }

    /// [`fail_all`](Self::fail_all), answering `unsent` to the requests never written. The
    /// replies are built only when a request is there to get one (reconnect attempts to a
    /// shard that is down usually have none).
    fn fail_all_with(&self, why: &str, unsent: reply::Failure<'_>) {
        let (failed, not_written) = {
            let mut st = self.st.borrow_mut();
            st.out = BytesMut::new();
            st.connected = false;
            st.abandoned = 0;
            st.inflight_bytes = 0;
            st.handshake_out = BytesMut::new();
            st.handshaking = 0;
            let not_written = std::mem::take(&mut st.unsent);
            let failed: Vec<Pending> = st.pending.drain(..).collect();
            (failed, not_written)
        };
        if failed.is_empty() {
            return;
        }
        if !self.closed.get() {
            // (A connection slotgate closed is not a shard failure: its requests belong to a
            // session that has gone.)
            metrics::counter!(crate::metrics::SHARD_ERRORS, "shard" => self.label.clone())
                .increment(failed.len() as u64);
        }
        let sent = failed.len() - not_written;
        let unknown = reply::outcome_unknown(&self.label, why);
        let unsent_reply = unsent.to_reply();
        for (i, p) in failed.into_iter().enumerate() {
            let err = if i < sent { &unknown } else { &unsent_reply };
            p.target.deliver(err.clone());
        }
    }

    /// Fails the requests whose deadline has passed. One that was written is abandoned (its
    /// reply is still to come, and is dropped then); one still in the output buffer is taken
    /// out, so it is never sent. `Err` when the one timing out is the connection's handshake:
    /// then the connection itself is no good.
    fn expire(&self, now: Instant) -> Result<(), ()> {
        let mut abandoned = Vec::new();
        let mut removed = Vec::new();
        {
            let mut st = self.st.borrow_mut();
            let st = &mut *st;
            while st.abandoned < st.pending.len() {
                let i = st.abandoned;
                if st.pending[i].deadline > now {
                    break;
                }
                if matches!(st.pending[i].target, Target::Handshake) {
                    return Err(());
                }
                if self.cfg.slowlog.is_some() {
                    // A command that timed out took at least op_timeout: the slowest of all.
                    self.log_slow(&st.pending[i]);
                }
                let unsent = i >= st.pending.len() - st.unsent;
                // Everything before it timed out as well, so its bytes are the first in `out`.
                if unsent && !self.oob.get() && st.out.len() >= st.pending[i].len {
                    let p = st.pending.remove(i).expect("index checked above");
                    let _ = st.out.split_to(p.len);
                    st.unsent -= 1;
                    st.inflight_bytes -= p.len;
                    removed.push(p.target);
                    continue;
                }
                let t = std::mem::replace(&mut st.pending[i].target, Target::Discard);
                abandoned.push(t);
                st.abandoned += 1;
            }
        }
        let op = self.cfg.op_timeout;
        if !abandoned.is_empty() {
            let err = reply::outcome_unknown(&self.label, &format!("no reply within {op:?}"));
            let ghosts: Vec<Target> = abandoned
                .into_iter()
                .map(|t| t.expire(err.clone()))
                .collect();
            // The ghosts keep counting against their clients until the replies arrive.
            let mut st = self.st.borrow_mut();
            let first = st.abandoned - ghosts.len();
            for (i, g) in ghosts.into_iter().enumerate() {
                st.pending[first + i].target = g;
            }
        }
        if !removed.is_empty() {
            let why = if self.st.borrow().connected {
                format!("not sent within {op:?}: the shard is not reading")
            } else {
                format!("not sent within {op:?}: not connected")
            };
            let err = reply::shard_unavailable(&self.label, &why);
            for t in removed {
                t.deliver(err.clone());
            }
        }
        Ok(())
    }

    /// The deadline of the oldest request not yet failed.
    fn next_deadline(&self) -> Option<Instant> {
        let st = self.st.borrow();
        st.pending.get(st.abandoned).map(|p| p.deadline)
    }

    /// Runs `fut` (a connect, a backoff) while failing the requests whose deadline passes
    /// meanwhile: none of them can have been sent, the connection is not up.
    async fn expiring<F: std::future::Future>(&self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            let next = self.next_deadline();
            tokio::select! {
                r = &mut fut => return r,
                _ = sleep_until_some(next) => {
                    let _ = self.expire(Instant::now());
                }
                // A new request with the first live deadline.
                _ = self.wake_reader.notified() => {}
            }
        }
    }

    /// Closes this connection once nothing is in flight on it (or after `within`): a shard
    /// that left the layout gets the replies it owes, then the connection goes.
    pub async fn retire(self: Rc<Self>, within: std::time::Duration) {
        self.close_when_idle();
        tokio::time::sleep(within).await;
        self.close();
    }

    /// Closes the connection now if nothing is in flight on it, else as soon as the last
    /// reply in flight has been delivered (a dedicated connection given back right after
    /// its EXEC was sent must still deliver the EXEC's reply).
    pub fn close_when_idle(&self) {
        if self.pending() == 0 {
            self.close();
        } else {
            self.close_when_idle.set(true);
        }
    }

    /// Closes a dedicated connection: its driver stops and the socket is dropped, so the shard
    /// forgets whatever state it held (a MULTI, WATCHes, a blocked command).
    pub fn close(&self) {
        self.closed.set(true);
        self.close_notify.notify_one();
        self.wake_writer.notify_one();
    }

    /// This subscriber connection is gone. With live subscriptions the client is closed, so
    /// that it resubscribes; if none ever began (the shard was down, or refused the
    /// handshake), each (un)subscribe waiting for its confirmation gets the error instead
    /// and the session forgets what it subscribed there.
    #[cold]
    fn subscriber_lost(&self, q: &crate::queue::ReplyQueue, why: &str) {
        if self.confirmed.get() {
            return q.mark_sub_lost();
        }
        let err = reply::shard_unavailable(&self.label, why);
        for c in self.confirmations.borrow_mut().drain(..) {
            q.deliver(c.seq, 0, err.clone());
        }
        q.flag(crate::queue::Attention::SUB_FAILED);
    }

    /// Makes this dedicated connection a subscriber connection feeding `queue` (and, in
    /// cluster mode, telling `moved` about sharded channels whose slot moved).
    pub fn set_sink(
        &self,
        queue: Rc<crate::queue::ReplyQueue>,
        moved: Option<Rc<dyn SubscriptionsMoved>>,
    ) {
        *self.sink.borrow_mut() = Some(queue);
        *self.moved.borrow_mut() = moved;
    }

    /// Sends a (un)subscribe command on a subscriber connection: its `n` confirmation
    /// frames will fill reply slot `seq` of the sink queue (none for [`SILENT`]), in order
    /// with the client's other replies.
    pub fn send_subscription(&self, raw: &[u8], seq: u64, n: usize) {
        self.send_subscription_after(raw, seq, n, 0);
    }

    /// [`send_subscription`](Self::send_subscription) of a command that followed `hops`
    /// redirects (cluster mode).
    pub fn send_subscription_after(&self, raw: &[u8], seq: u64, n: usize, hops: u8) {
        self.confirmations.borrow_mut().push_back(Confirmations {
            seq,
            left: n,
            acc: BytesMut::new(),
            raw: Bytes::copy_from_slice(raw),
            hops,
        });
        self.send_oob(raw);
    }

    /// Writes `raw` with no reply expected (commands on a subscriber connection, whose
    /// answers arrive as out-of-band frames).
    pub fn send_oob(&self, raw: &[u8]) {
        self.oob.set(true);
        let mut st = self.st.borrow_mut();
        let wake = st.out.is_empty();
        st.out.extend_from_slice(raw);
        drop(st);
        if wake {
            self.wake_writer.notify_one();
        }
    }

    /// Whether the connection can take requests (not closed, not a lost dedicated one).
    pub fn usable(&self) -> bool {
        !self.closed.get() && !self.dead.get()
    }

    /// Connects, serves until a fault, fails what was pending, backs off, repeats — for as
    /// long as the worker runs.
    async fn drive(self: Rc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connect = tokio::time::timeout(self.cfg.op_timeout, TcpStream::connect(self.addr));
            let mut refused = false;
            let why = match self.expiring(connect).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(shard = %self.label, "connected");
                    let fault = self.serve(stream).await;
                    refused = matches!(fault, Fault::Handshake(_));
                    // A connection that got past its handshake starts the backoff over; a
                    // refused or failed handshake keeps growing it.
                    if !matches!(fault, Fault::Handshake(_) | Fault::Tls(_)) {
                        backoff = BACKOFF_MIN;
                    }
                    let why = fault.describe(self.cfg.op_timeout);
                    if matches!(fault, Fault::ClosedHere) {
                        tracing::debug!(shard = %self.label, "shard connection closed by slotgate");
                    } else {
                        tracing::warn!(shard = %self.label, "shard connection lost: {why}");
                        if self.cfg.cluster {
                            layout_in_doubt();
                        }
                    }
                    why
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("connect timed out after {:?}", self.cfg.op_timeout),
            };
            match &self.cfg.mirror {
                // The user's rights could not be set up on the shard: nothing runs without
                // them.
                Some(m) if refused => self.fail_all_with(
                    &why,
                    reply::Failure::MirrorRefused {
                        user: &m.user,
                        shard: &self.label,
                        why: &why,
                    },
                ),
                _ => self.fail_all(&why),
            }
            if self.cfg.dedicated || self.closed.get() {
                self.dead.set(true);
                self.fail_all(&why);
                if !self.closed.get()
                    && let Some(q) = self.sink.borrow().as_ref()
                {
                    self.subscriber_lost(q, &why);
                }
                return;
            }
            // Wait out the backoff unless a request arrives (then try at once). A mirror the
            // shard refused is tried again only for a request: it would be refused again.
            let idle_retry = !(refused && self.cfg.mirror.is_some());
            self.expiring(async {
                tokio::select! {
                    _ = tokio::time::sleep(backoff), if idle_retry => {}
                    _ = self.wake_writer.notified() => {}
                }
            })
            .await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs one established connection (after TLS, if configured) until it fails.
    async fn serve(&self, stream: TcpStream) -> Fault {
        let Some(tls) = &self.cfg.tls else {
            if let Some(ring) = crate::uring::Driver::current() {
                return match stream.into_std().and_then(|s| ring.stream(s)) {
                    Ok((rd, wr)) => self.run(rd, wr).await,
                    Err(e) => Fault::Io(e),
                };
            }
            return self.run(PlainRead(&stream), PlainWrite(&stream)).await;
        };
        let name = tls.name_for(self.addr.ip());
        match tokio::time::timeout(self.cfg.op_timeout, tls.connector.connect(name, stream)).await {
            Ok(Ok(s)) => {
                let (rd, wr) = tokio::io::split(s);
                self.run(rd, wr).await
            }
            Ok(Err(e)) => Fault::Tls(e.to_string()),
            Err(_) => Fault::TimedOut,
        }
    }

    /// Whether the shard is busy with a script (it answers `-BUSY` on a connection of its
    /// own), asked before a silent connection is given up. The probe runs as a task of its
    /// own, so that the requests of this connection keep failing at their deadlines
    /// meanwhile: `Waiting` until it has an answer (a busy shard takes commands only after
    /// its `busy-reply-threshold`, 5 s by default). Plain connections only: a TLS shard's
    /// silent connection is given up as before.
    #[cold]
    fn shard_is_busy(&self) -> Probe {
        match self.probe.get() {
            ProbeState::Running => return Probe::Waiting,
            ProbeState::Answered(busy) => {
                self.probe.set(ProbeState::Idle);
                return if busy { Probe::Busy } else { Probe::NotBusy };
            }
            ProbeState::Idle => {}
        }
        if self.cfg.tls.is_some() {
            return Probe::NotBusy;
        }
        self.probe.set(ProbeState::Running);
        let (addr, auth, cell) = (self.addr, self.cfg.auth.clone(), self.probe.clone());
        tokio::task::spawn_local(async move {
            let busy = tokio::time::timeout(CONTROL_TIMEOUT, probe_busy(addr, auth)).await;
            cell.set(ProbeState::Answered(matches!(busy, Ok(Some(true)))));
        });
        Probe::Waiting
    }

    /// The handshake every new connection starts with, written (and answered) before anything
    /// queued while connecting: `AUTH` with the configured credentials, and `HELLO 3` on RESP3
    /// connections (with the credentials in it). A mirror connection first sets its ACL user
    /// (`ACL SETUSER`, as the configured user) and then authenticates as it. The bytes, and
    /// how many replies they ask for.
    fn handshake(&self) -> Option<(BytesMut, usize)> {
        let mut cmds: Vec<Vec<&[u8]>> = Vec::new();
        let auth = self.cfg.auth.as_ref();
        let base_user = auth.map(|a| a.username.clone().unwrap_or_else(|| "default".into()));
        let pass;
        let (user, password): (Option<&str>, Option<&str>) = match &self.cfg.mirror {
            Some(m) => {
                if let Some(a) = auth {
                    cmds.push(a.auth_command());
                }
                pass = format!(">{}", m.password);
                let mut c: Vec<&[u8]> =
                    vec![b"ACL", b"SETUSER", m.name.as_bytes(), b"reset", b"on"];
                c.push(pass.as_bytes());
                c.extend(m.rules.iter().map(|r| r.as_bytes()));
                cmds.push(c);
                (Some(m.name.as_str()), Some(m.password.as_str()))
            }
            None => (base_user.as_deref(), auth.map(|a| a.password.0.as_str())),
        };
        match (self.proto, user, password) {
            (Proto::Resp2, Some(u), Some(p)) => {
                let mut c: Vec<&[u8]> = vec![b"AUTH"];
                // The plain `AUTH password` form when no user name was configured.
                if self.cfg.mirror.is_some() || auth.is_some_and(|a| a.username.is_some()) {
                    c.push(u.as_bytes());
                }
                c.push(p.as_bytes());
                cmds.push(c);
            }
            (Proto::Resp3, Some(u), Some(p)) => {
                cmds.push(vec![b"HELLO", b"3", b"AUTH", u.as_bytes(), p.as_bytes()]);
            }
            (Proto::Resp3, _, _) => cmds.push(vec![b"HELLO", b"3"]),
            (Proto::Resp2, _, _) => {}
        }
        if self.cfg.readonly {
            // A cluster replica serves reads of its primary's slots on this connection.
            cmds.push(vec![b"READONLY"]);
        }
        if cmds.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        for args in &cmds {
            push_command(&mut out, args);
        }
        Some((out, cmds.len()))
    }

    async fn run<R, W>(&self, rd: R, wr: W) -> Fault
    where
        R: ReadSide,
        W: WriteSide,
    {
        {
            let mut st = self.st.borrow_mut();
            st.connected = true;
            // No later than the requests queued behind it: they must not wait for it
            // beyond their own deadlines.
            let own = Instant::now() + self.cfg.op_timeout;
            let deadline = st.pending.front().map_or(own, |p| p.deadline.min(own));
            // Scripts and libraries loaded through slotgate, again (replies dropped), ahead
            // of the requests queued while connecting.
            let shared_conn = !self.cfg.dedicated && self.cfg.mirror.is_none();
            let loads = self
                .cfg
                .scripts
                .as_ref()
                .filter(|_| shared_conn)
                .and_then(|s| s.loads());
            if let Some((_, n)) = &loads {
                for _ in 0..*n {
                    st.pending.push_front(Pending {
                        target: Target::Discard,
                        deadline,
                        len: 0,
                        retry: None,
                    });
                }
            }
            if self.cfg.dedicated {
                // After the handshake, ahead of what was queued: the shard's id for this
                // connection, which CLIENT UNBLOCK names (the reply is not waited for).
                push_command(&mut st.handshake_out, &[b"CLIENT", b"ID"]);
                let sink = Rc::new(ShardId(self.shard_id.clone()));
                st.pending.push_front(Pending {
                    target: Target::Sink(crate::queue::SinkRef::new(sink, 0)),
                    deadline,
                    len: 0,
                    retry: None,
                });
            }
            if let Some((out, n)) = self.handshake() {
                let id = std::mem::replace(&mut st.handshake_out, out);
                st.handshake_out.extend_from_slice(&id);
                st.handshaking = n;
                for _ in 0..n {
                    st.pending.push_front(Pending {
                        target: Target::Handshake,
                        deadline,
                        len: 0,
                        retry: None,
                    });
                }
            }
            if let Some((out, _)) = loads {
                st.handshake_out.extend_from_slice(&out);
            }
        }
        // Whatever was queued while connecting is written now.
        self.wake_writer.notify_one();
        let counted =
            self.proto == Proto::Resp2 && !self.cfg.dedicated && self.cfg.mirror.is_none();
        if counted {
            self.cfg.up.fetch_add(1, Ordering::Relaxed);
        }
        let fault = tokio::select! {
            f = self.read_loop(rd) => f,
            f = self.write_loop(wr) => f,
            _ = self.close_notify.notified() => Fault::ClosedHere,
        };
        if counted {
            self.cfg.up.fetch_sub(1, Ordering::Relaxed);
        }
        if !matches!(fault, Fault::ClosedHere) {
            metrics::counter!(crate::metrics::SHARD_RECONNECTS, "shard" => self.label.clone())
                .increment(1);
        }
        fault
    }

    async fn write_loop<W: WriteSide>(&self, mut wr: W) -> Fault {
        let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            let idle = {
                let mut st = self.st.borrow_mut();
                if !st.handshake_out.is_empty() {
                    std::mem::swap(&mut st.handshake_out, &mut wbuf);
                    false
                } else if st.handshaking > 0 || st.out.is_empty() {
                    true
                } else {
                    std::mem::swap(&mut st.out, &mut wbuf);
                    // Handed to the socket: from here on, they may reach the shard.
                    st.unsent = 0;
                    false
                }
            };
            if idle {
                self.wake_writer.notified().await;
                continue;
            }
            if let Err(e) = wr.write_all(&wbuf).await {
                return Fault::Io(e);
            }
            // A no-op on TCP; pushes the last TLS record out.
            if let Err(e) = wr.flush().await {
                return Fault::Io(e);
            }
            wbuf.clear();
            if wbuf.capacity() > KEEP_BUF {
                // Give back the memory of a large request.
                wbuf = BytesMut::with_capacity(READ_CHUNK);
            }
        }
    }

    /// One reply from the shard: to the oldest pending request (or the handshake), or, on a
    /// subscriber connection, to the client's reply slot (confirmations) or out of band
    /// (messages). `Err` when the connection is no good any more.
    #[inline]
    fn on_frame(&self, bytes: Bytes, push: bool, slow: Option<Instant>) -> Result<(), Fault> {
        // (A subscriber connection sends its commands out of band: what is pending on it is
        // its handshake and its `CLIENT ID`, answered before any subscription.)
        let handshake = !self.st.borrow().pending.is_empty();
        if !handshake && let Some(q) = self.sink.borrow().as_ref() {
            // A subscriber connection: confirmations fill their reply slot,
            // messages go out of band.
            if self.cfg.cluster && self.moved.borrow().is_some() {
                return self.cluster_sub_frame(q, bytes);
            }
            let conf = self.confirmations.borrow_mut();
            self.confirm_or_pass(q, conf, bytes);
            return Ok(());
        }
        if push {
            // Out-of-band (RESP3 push): not the reply to any request.
            return Ok(());
        }
        let p = {
            let mut st = self.st.borrow_mut();
            st.abandoned = st.abandoned.saturating_sub(1);
            if let Some(cutoff) = slow
                && let Some(oldest) = st.pending.front()
                && oldest.deadline <= cutoff
            {
                self.log_slow(oldest);
            }
            let p = st.pending.pop_front();
            if let Some(p) = &p {
                st.inflight_bytes -= p.len;
            }
            p
        };
        match p {
            Some(Pending {
                target: Target::Handshake,
                ..
            }) if bytes.first() == Some(&b'-') => {
                let text = String::from_utf8_lossy(&bytes[1..]);
                return Err(Fault::Handshake(text.trim_end().to_string()));
            }
            Some(Pending {
                target: Target::Handshake,
                ..
            }) => {
                let mut st = self.st.borrow_mut();
                st.handshaking -= 1;
                if st.handshaking == 0 && !st.out.is_empty() {
                    // What was queued meanwhile goes out now.
                    drop(st);
                    self.wake_writer.notify_one();
                }
            }
            Some(p) if self.cfg.cluster => self.cluster_reply(p, bytes),
            Some(p) => self.deliver(p.target, bytes),
            None => return Err(Fault::Unexpected),
        }
        Ok(())
    }

    /// Cluster mode: a reply that redirects a request that follows redirects goes to the
    /// worker's redirector (the node did not run it); any other is delivered, and a `-MOVED`
    /// among them still makes slotgate read the layout again.
    #[inline(never)]
    fn cluster_reply(&self, p: Pending, bytes: Bytes) {
        match p {
            Pending {
                retry: Some(retry),
                target,
                deadline,
                ..
            } if is_redirect(&bytes) && !matches!(target, Target::Abandoned(_)) => {
                redirected(Redirected {
                    reply: bytes,
                    from: self.addr,
                    proto: self.proto,
                    retry,
                    target,
                    deadline,
                });
            }
            p => {
                if bytes.first() == Some(&b'-')
                    && (bytes.starts_with(b"-MOVED ") || bytes.starts_with(b"-CLUSTERDOWN"))
                {
                    layout_in_doubt();
                }
                self.deliver(p.target, bytes);
            }
        }
    }

    /// Cluster mode, a subscriber connection's frame: as in static mode, except that a
    /// redirect answering a (un)subscribe, and a `sunsubscribe` the client did not ask for
    /// (the node gave the channel's slot away), go to the session, which subscribes where
    /// the channel lives now (see `session::follow`).
    #[cold]
    #[inline(never)]
    fn cluster_sub_frame(&self, q: &crate::queue::ReplyQueue, bytes: Bytes) -> Result<(), Fault> {
        let Some(moved) = self.moved.borrow().clone() else {
            return Ok(());
        };
        let mut conf = self.confirmations.borrow_mut();
        if bytes.first() == Some(&b'-') {
            // A redirect (followed), or another error (`-CLUSTERDOWN` …: the command's
            // answer): either way the (un)subscribe did not happen here.
            match conf.pop_front() {
                Some(c) => {
                    drop(conf);
                    moved.redirected(c.seq, c.raw, bytes, self.addr, c.hops);
                }
                // (Nothing asked: never the client's.)
                None => layout_in_doubt(),
            }
            return Ok(());
        }
        if confirmation_kind(&bytes) == Some(&b"sunsubscribe"[..])
            && !conf.front().is_some_and(|c| confirms(&c.raw, &bytes))
        {
            drop(conf);
            moved.dropped(bytes, self.addr);
            return Ok(());
        }
        self.confirm_or_pass(q, conf, bytes);
        Ok(())
    }

    /// A subscriber connection's frame: a confirmation fills the reply slot of the oldest
    /// (un)subscribe once all of its confirmations came; anything else (a message) goes out
    /// of band.
    fn confirm_or_pass(
        &self,
        q: &crate::queue::ReplyQueue,
        mut conf: std::cell::RefMut<'_, VecDeque<Confirmations>>,
        bytes: Bytes,
    ) {
        match conf.front_mut() {
            Some(c) if is_confirmation(&bytes) => {
                c.acc.extend_from_slice(&bytes);
                c.left -= 1;
                if c.left == 0 {
                    self.confirmed.set(true);
                    let (seq, acc) = (c.seq, std::mem::take(&mut c.acc));
                    conf.pop_front();
                    drop(conf);
                    if seq != SILENT {
                        q.deliver(seq, 0, acc.freeze());
                    }
                }
            }
            _ => {
                drop(conf);
                q.push_oob(bytes);
            }
        }
    }

    /// A reply to its request's target; a connection that should close once idle closes.
    #[inline(always)]
    fn deliver(&self, target: Target, bytes: Bytes) {
        target.deliver(bytes);
        if self.close_when_idle.get() && self.st.borrow().pending.is_empty() {
            self.close();
        }
    }

    /// For the slow log, after a read at `read_at`: the deadline at or before which a request
    /// took at least the threshold (its start is its deadline minus `op_timeout`).
    #[inline]
    fn slow_cutoff(&self, read_at: Instant) -> Option<Instant> {
        let threshold = self.cfg.slowlog.as_ref()?.threshold()?;
        (read_at + self.cfg.op_timeout).checked_sub(threshold)
    }

    /// Logs a request whose reply, just read (or its timeout, just now), took the slow log's
    /// threshold or more.
    #[cold]
    #[inline(never)]
    fn log_slow(&self, p: &Pending) {
        let read_at = Instant::now();
        let (Some(log), Target::Client { queue, seq, .. }) = (&self.cfg.slowlog, &p.target) else {
            return;
        };
        let Some(command) = queue.slow_command(*seq) else {
            return;
        };
        let started = p
            .deadline
            .checked_sub(self.cfg.op_timeout)
            .unwrap_or(p.deadline);
        let took = read_at.saturating_duration_since(started);
        if log.threshold().is_none_or(|t| took < t) {
            return;
        }
        log.record(command, took, &self.label, queue.client());
    }

    async fn read_loop<R: ReadSide>(&self, mut rd: R) -> Fault {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut scanner = ReplyScanner::new();
        let mut last_read = Instant::now();
        let mut reads: u32 = 0;
        // (When the slow log is on: requests whose deadline is at or before this are slow.)
        let mut slow: Option<Instant> = None;
        loop {
            // Hand out every complete reply.
            loop {
                match scanner.scan(&rbuf) {
                    Ok(Some(frame)) => {
                        let bytes: Bytes = rbuf.split_to(frame.len).freeze();
                        if let Err(fault) = self.on_frame(bytes, frame.push, slow) {
                            return fault;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Fault::Protocol(e),
                }
            }
            if rbuf.is_empty() && rbuf.capacity() > KEEP_BUF {
                // Give back the memory of a large reply.
                rbuf = BytesMut::with_capacity(READ_CHUNK);
            }
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                grow(&mut rbuf);
            }
            // Two timers: the oldest live request's deadline, and "the shard has sent nothing
            // for 3 × op_timeout while requests wait" (counted from the later of the oldest
            // request's arrival and the last bytes read).
            let op = self.cfg.op_timeout;
            let timers = {
                let st = self.st.borrow();
                st.pending.front().map(|oldest| {
                    let silent_since = (oldest.deadline - op).max(last_read);
                    // Dedicated connections may be legitimately silent (a blocked BLPOP).
                    let dead_at = if self.cfg.dedicated {
                        Instant::now() + Duration::from_secs(86_400 * 365)
                    } else {
                        silent_since + op * 3
                    };
                    let live = st.pending.get(st.abandoned).map(|p| p.deadline);
                    (live.map_or(dead_at, |l| l.min(dead_at)), dead_at)
                })
            };
            let read = match timers {
                Some((wake, dead_at)) => tokio::select! {
                    r = std::future::poll_fn(|cx| rd.poll_read_bytes(cx, &mut rbuf)) => r,
                    _ = tokio::time::sleep_until(wake) => {
                        let now = Instant::now();
                        if now >= dead_at {
                            match self.shard_is_busy() {
                                // Silent because a script runs on this connection: the shard
                                // is alive, so the connection is kept (its requests still
                                // fail at their deadlines); SCRIPT KILL ends the silence.
                                Probe::Busy => {
                                    tracing::info!(
                                        shard = %self.label,
                                        "shard busy running a script: its silent connection is kept"
                                    );
                                    last_read = now
                                }
                                // Asked: look again shortly, expiring requests meanwhile.
                                Probe::Waiting => last_read = now + PROBE_POLL - op * 3,
                                Probe::NotBusy => return Fault::Silent(op * 3, rd.unread()),
                            }
                            continue;
                        }
                        if self.expire(now).is_err() {
                            return Fault::TimedOut;
                        }
                        continue;
                    }
                    // A request arrived behind abandoned ones only: its deadline is the next
                    // to watch (before, it waited for the silence timer: up to 2 × op_timeout).
                    _ = self.wake_reader.notified() => continue,
                },
                None => tokio::select! {
                    r = std::future::poll_fn(|cx| rd.poll_read_bytes(cx, &mut rbuf)) => r,
                    _ = self.wake_reader.notified() => continue,
                },
            };
            match read {
                Ok(0) => return Fault::Closed,
                Ok(_) => {
                    last_read = Instant::now();
                    slow = self.slow_cutoff(last_read);
                }
                Err(e) => return Fault::Io(e),
            }
            reads = reads.wrapping_add(1);
            if reads.is_multiple_of(READS_BEFORE_YIELD) {
                // A connection that always has more to read (a subscriber connection under a
                // flood of messages) must let the worker's sessions run: tokio's reads spent
                // its cooperative budget for this, `netio`'s do not.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The reply to one [`Upstream::request`].
#[derive(Default)]
struct OneShot {
    reply: RefCell<Option<Bytes>>,
    done: LocalNotify,
}

impl Sink for OneShot {
    fn deliver(self: Rc<Self>, _idx: u32, reply: Bytes) {
        *self.reply.borrow_mut() = Some(reply);
        self.done.notify_one();
    }

    fn release(&self, _idx: u32) {
        *self.reply.borrow_mut() = Some(reply::Failure::Dropped.to_reply());
        self.done.notify_one();
    }
}

/// Connections indexed `[shard][connection]`.
type Grid = Vec<Vec<Rc<Upstream>>>;

/// A worker's connections to every shard: `[shard][connection]`, one set per protocol.
pub struct Pools {
    resp2: Grid,
    resp3: RefCell<Option<Grid>>,
    shards: Vec<(SocketAddr, UpstreamConfig)>,
    per_shard: usize,
    /// Connections authenticated as a user's mirror, for that user's scripts: one per user,
    /// protocol and shard address, opened on first use.
    mirrors: RefCell<std::collections::HashMap<(String, Proto, SocketAddr), Rc<Upstream>>>,
    /// Per shard, a control connection, opened on first use: SCRIPT KILL and FUNCTION KILL
    /// travel on it, never behind a busy script on the shared connections.
    control: RefCell<Vec<Option<Rc<Upstream>>>>,
}

/// The answer of [`Upstream::shard_is_busy`].
enum Probe {
    Busy,
    NotBusy,
    Waiting,
}

/// Where the busy probe of a silent connection stands.
#[derive(Clone, Copy, Debug)]
enum ProbeState {
    Idle,
    Running,
    Answered(bool),
}

/// How often a silent connection looks at its busy probe while it runs.
const PROBE_POLL: Duration = Duration::from_millis(100);

/// Whether the shard at `addr` answers PING with `-BUSY` on a new connection (`None`: no
/// answer at all).
async fn probe_busy(addr: SocketAddr, auth: Option<UpstreamAuth>) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut out = BytesMut::new();
    if let Some(a) = &auth {
        push_command(&mut out, &a.auth_command());
    }
    push_command(&mut out, &[b"PING"]);
    s.write_all(&out).await.ok()?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(5).any(|w| w == b"-BUSY") {
            return Some(true);
        }
        if seen.ends_with(b"+PONG\r\n") || seen.len() > 4096 {
            return Some(false);
        }
    }
}

/// How long a request on a control connection may wait: a shard busy with a script takes
/// commands again only after its `busy-reply-threshold` (5 s by default).
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Pools {
    /// Starts the RESP2 connections now; RESP3 ones start on first use (`HELLO 3`).
    pub fn start(shards: Vec<(SocketAddr, UpstreamConfig)>, per_shard: usize) -> Self {
        let resp2 = Self::open(&shards, per_shard, Proto::Resp2);
        Pools {
            resp2,
            resp3: RefCell::new(None),
            control: RefCell::new(vec![None; shards.len()]),
            shards,
            per_shard,
            mirrors: RefCell::default(),
        }
    }

    /// Every shard of this layout, with how to reach it.
    pub fn configs(&self) -> &[(SocketAddr, UpstreamConfig)] {
        &self.shards
    }

    /// The index of the shard at `addr` in this layout.
    pub fn shard_index(&self, addr: SocketAddr) -> Option<usize> {
        self.shards.iter().position(|(a, _)| *a == addr)
    }

    /// The address of `shard`.
    pub fn addr(&self, shard: usize) -> Option<SocketAddr> {
        self.shards.get(shard).map(|(a, _)| *a)
    }

    /// The control connection to `shard` (see `control`): RESP2, its own timeout, and not
    /// counted as one of the shard's connections for readiness.
    pub fn control(&self, shard: usize) -> Rc<Upstream> {
        let mut control = self.control.borrow_mut();
        control[shard]
            .get_or_insert_with(|| {
                let (addr, cfg) = &self.shards[shard];
                let mut cfg = cfg.clone();
                cfg.op_timeout = cfg.op_timeout.max(CONTROL_TIMEOUT);
                cfg.slowlog = None;
                cfg.up = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                Upstream::start(*addr, Proto::Resp2, cfg)
            })
            .clone()
    }

    /// The connection to `shard` that runs `user`'s scripts with `user`'s rights (see
    /// [`Mirror`]); `deny` lists the commands slotgate refuses, which the mirror may not
    /// run either.
    pub fn as_user(
        &self,
        user: &crate::auth::User,
        deny: &[String],
        proto: Proto,
        shard: usize,
    ) -> Rc<Upstream> {
        let (addr, cfg) = &self.shards[shard];
        let key = (user.name.clone(), proto, *addr);
        if let Some(up) = self.mirrors.borrow().get(&key) {
            return up.clone();
        }
        let mut cfg = cfg.clone();
        cfg.mirror = Some(Arc::new(Mirror::new(
            user,
            cfg.auth.as_ref(),
            deny,
            cfg.cluster,
        )));
        let up = Upstream::start(*addr, proto, cfg);
        self.mirrors.borrow_mut().insert(key, up.clone());
        up
    }

    /// The pools of a new shard layout (a reload in static mode): the connections to shards
    /// that stay are kept (with what is in flight on them), new shards are connected. Also
    /// returns the connections to the shards that left, for their owner to retire.
    pub fn relayout(
        &self,
        shards: Vec<(SocketAddr, UpstreamConfig)>,
    ) -> (Pools, Vec<Rc<Upstream>>) {
        let old = |addr: &SocketAddr| self.shards.iter().position(|(a, _)| a == addr);
        let carry = |grid: &Grid, proto: Proto| -> Grid {
            shards
                .iter()
                .map(|(addr, cfg)| match old(addr) {
                    Some(i) => grid[i].clone(),
                    None => (0..self.per_shard)
                        .map(|_| Upstream::start(*addr, proto, cfg.clone()))
                        .collect(),
                })
                .collect()
        };
        let kept = |addr: &SocketAddr| shards.iter().any(|(a, _)| a == addr);
        let mut removed = Vec::new();
        let r3 = self.resp3.borrow();
        for (i, (addr, _)) in self.shards.iter().enumerate() {
            if !kept(addr) {
                removed.extend(self.resp2[i].iter().cloned());
                if let Some(g) = r3.as_ref() {
                    removed.extend(g[i].iter().cloned());
                }
            }
        }
        // Control connections are opened again on first use.
        removed.extend(self.control.borrow().iter().flatten().cloned());
        let mut mirrors = self.mirrors.borrow().clone();
        mirrors.retain(|(_, _, addr), up| {
            kept(addr) || {
                removed.push(up.clone());
                false
            }
        });
        let pools = Pools {
            resp2: carry(&self.resp2, Proto::Resp2),
            resp3: RefCell::new(r3.as_ref().map(|g| carry(g, Proto::Resp3))),
            control: RefCell::new(vec![None; shards.len()]),
            shards,
            per_shard: self.per_shard,
            mirrors: RefCell::new(mirrors),
        };
        (pools, removed)
    }

    fn open(shards: &[(SocketAddr, UpstreamConfig)], per_shard: usize, proto: Proto) -> Grid {
        shards
            .iter()
            .map(|(a, cfg)| {
                (0..per_shard)
                    .map(|_| Upstream::start(*a, proto, cfg.clone()))
                    .collect()
            })
            .collect()
    }

    /// The connection to `shard` for a session whose affinity index is `conn`. A session
    /// always uses the same connection per shard, so its requests to one shard stay in order.
    #[inline]
    pub fn get(&self, proto: Proto, shard: usize, conn: usize) -> Rc<Upstream> {
        match proto {
            Proto::Resp2 => self.resp2[shard][conn % self.per_shard].clone(),
            Proto::Resp3 => {
                let mut r3 = self.resp3.borrow_mut();
                let pools = r3
                    .get_or_insert_with(|| Self::open(&self.shards, self.per_shard, Proto::Resp3));
                pools[shard][conn % self.per_shard].clone()
            }
        }
    }

    /// Requests in flight per shard on this worker (all connections, both protocols).
    pub fn pending_per_shard(&self) -> Vec<usize> {
        let r3 = self.resp3.borrow();
        (0..self.resp2.len())
            .map(|s| {
                let a: usize = self.resp2[s].iter().map(|c| c.pending()).sum();
                let b: usize = r3
                    .as_ref()
                    .map_or(0, |g| g[s].iter().map(|c| c.pending()).sum());
                a + b
            })
            .collect()
    }

    /// Whether every RESP2 connection is up (used by INFO and readiness).
    pub fn connected(&self) -> Vec<bool> {
        self.resp2
            .iter()
            .map(|conns| conns.iter().all(|c| c.is_connected()))
            .collect()
    }
}

/// Where a dedicated connection's `CLIENT ID` reply goes.
struct ShardId(Arc<std::sync::atomic::AtomicI64>);

impl crate::queue::Sink for ShardId {
    fn deliver(self: Rc<Self>, _idx: u32, reply: Bytes) {
        if let Some(id) = crate::resp::scan::reply_integer(&reply) {
            self.0.store(id, Ordering::Relaxed);
        }
    }
}

/// Idle dedicated connections kept per shard and protocol, ready for the next transaction or
/// blocking command.
const IDLE_DEDICATED: usize = 16;

/// A worker's dedicated connections: handed out one per transaction or blocking command,
/// capped per shard, and reused when their owner is done with them in a clean state.
pub struct DedicatedPool {
    shards: Vec<(SocketAddr, UpstreamConfig)>,
    /// `[proto][shard]` idle connections.
    idle: RefCell<[Vec<Vec<Rc<Upstream>>>; 2]>,
    /// Per shard: dedicated connections that exist (in use or idle).
    count: RefCell<Vec<usize>>,
    max: usize,
}

impl DedicatedPool {
    pub fn new(shards: &[(SocketAddr, UpstreamConfig)], max: usize) -> Rc<Self> {
        let shards: Vec<(SocketAddr, UpstreamConfig)> = shards
            .iter()
            .map(|(a, c)| {
                let mut c = c.clone();
                c.dedicated = true;
                c.slowlog = None;
                (*a, c)
            })
            .collect();
        let n = shards.len();
        let pool = Rc::new(DedicatedPool {
            idle: RefCell::new([vec![Vec::new(); n], vec![Vec::new(); n]]),
            count: RefCell::new(vec![0; n]),
            shards,
            max,
        });
        for shard in 0..n {
            pool.add_spare(Proto::Resp2, shard);
        }
        pool
    }

    /// Opens an idle connection to `shard`, within the cap: a spare. A SUBSCRIBE (or MULTI,
    /// BLPOP) on a connection still being opened goes live only after the connect and
    /// handshake (~0.2 ms on loopback), and a message published meanwhile by a client that did
    /// not wait for the confirmation was lost (29 of 30 tries; none on Redis itself). So one
    /// connected, idle RESP2 connection per shard is kept ready from the start and replaced as
    /// soon as it is taken; a RESP3 spare once the first RESP3 one was asked for. At the cap,
    /// an idle connection is closed to make room for one that is asked for (see `take`).
    fn add_spare(&self, proto: Proto, shard: usize) {
        if self.count.borrow()[shard] >= self.max {
            return;
        }
        self.count.borrow_mut()[shard] += 1;
        let (addr, cfg) = &self.shards[shard];
        let up = Upstream::start(*addr, proto, cfg.clone());
        self.idle.borrow_mut()[proto as usize][shard].push(up);
    }

    /// A dedicated connection to `shard` (idle or new); `Err` with the error reply when the
    /// shard already has `max` of them on this worker.
    pub fn take(self: &Rc<Self>, proto: Proto, shard: usize) -> Result<Dedicated, bytes::Bytes> {
        let p = proto as usize;
        {
            let mut idle = self.idle.borrow_mut();
            let list = &mut idle[p][shard];
            // Unusable ones go; one with replies still in flight (an EXEC, an UNWATCH just
            // sent by the session that gave it back) is not handed out: the next owner would
            // get those replies (a subscriber would take them as its messages).
            let before = list.len();
            list.retain(|up| up.usable());
            self.count.borrow_mut()[shard] -= before - list.len();
            if let Some(i) = list.iter().rposition(|up| up.only_own_requests_pending()) {
                let up = list.remove(i);
                let empty = list.is_empty();
                drop(idle);
                if empty {
                    self.add_spare(proto, shard);
                }
                return Ok(Dedicated::new(up, self.clone(), shard, proto));
            }
        }
        let (addr, cfg) = &self.shards[shard];
        if self.count.borrow()[shard] >= self.max && !self.evict_idle(shard) {
            return Err(reply::Failure::TooManyDedicated {
                shard: &addr.to_string(),
                max: self.max,
            }
            .to_reply());
        }
        self.count.borrow_mut()[shard] += 1;
        let up = Upstream::start(*addr, proto, cfg.clone());
        self.add_spare(proto, shard);
        Ok(Dedicated::new(up, self.clone(), shard, proto))
    }

    /// At the cap: closes an idle connection to `shard` (a spare of the other protocol,
    /// say) to make room; whether there was one. (Not one whose last owner's replies are
    /// still in flight: they would be lost.)
    fn evict_idle(&self, shard: usize) -> bool {
        let mut idle = self.idle.borrow_mut();
        for list in idle.iter_mut() {
            let list = &mut list[shard];
            if let Some(i) = list.iter().position(|up| up.only_own_requests_pending()) {
                list.remove(i).close();
                self.count.borrow_mut()[shard] -= 1;
                return true;
            }
        }
        false
    }

    /// Dedicated connections to `shard` on this worker (in use or idle).
    pub fn count(&self, shard: usize) -> usize {
        self.count.borrow()[shard]
    }
}

/// A dedicated connection held by one session. Dropping it closes the connection (the shard
/// forgets its MULTI, WATCHes or blocked command); [`release`](Self::release) gives it back
/// to the pool instead, once its state on the shard is clean.
pub struct Dedicated {
    pub up: Rc<Upstream>,
    pool: Rc<DedicatedPool>,
    pub shard: usize,
    proto: Proto,
    reusable: bool,
}

impl Dedicated {
    fn new(up: Rc<Upstream>, pool: Rc<DedicatedPool>, shard: usize, proto: Proto) -> Self {
        Dedicated {
            up,
            pool,
            shard,
            proto,
            reusable: false,
        }
    }

    /// The shard's address, and the shard's client id for this connection (0 until known).
    pub fn shard_client(&self) -> (SocketAddr, Arc<std::sync::atomic::AtomicI64>) {
        (self.up.addr, self.up.shard_id.clone())
    }

    /// Returns the connection to the pool: everything sent on it so far leaves the shard's
    /// connection state clean (EXEC, DISCARD, UNWATCH, or a blocking command that returned).
    pub fn release(mut self) {
        self.reusable = true;
    }
}

/// A pool replaced by a new shard layout closes its idle connections once the last
/// connection it handed out is back (each holds the pool).
impl Drop for DedicatedPool {
    fn drop(&mut self) {
        for per_proto in self.idle.get_mut().iter() {
            for up in per_proto.iter().flatten() {
                up.close_when_idle();
            }
        }
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        let mut idle = self.pool.idle.borrow_mut();
        let list = &mut idle[self.proto as usize][self.shard];
        if self.reusable && self.up.usable() && list.len() < IDLE_DEDICATED {
            list.push(self.up.clone());
        } else if self.reusable {
            // Clean, but not kept: what is in flight on it (the EXEC) is answered first.
            self.up.close_when_idle();
            self.pool.count.borrow_mut()[self.shard] -= 1;
        } else {
            self.up.close();
            self.pool.count.borrow_mut()[self.shard] -= 1;
        }
    }
}

/// Whether a frame from a subscriber connection confirms a (un)subscribe (as opposed to a
/// message): `*3`/`>3` whose first element is one of the six subscription kinds.
fn is_confirmation(frame: &[u8]) -> bool {
    confirmation_kind(frame).is_some()
}

/// The kind of a subscription confirmation (`b"ssubscribe"` …), lower case.
fn confirmation_kind(frame: &[u8]) -> Option<&'static [u8]> {
    const KINDS: [&[u8]; 6] = [
        b"subscribe",
        b"unsubscribe",
        b"psubscribe",
        b"punsubscribe",
        b"ssubscribe",
        b"sunsubscribe",
    ];
    let elems = crate::resp::scan::array_elements(frame)?;
    let &(s, e) = elems.first()?;
    let first = crate::resp::scan::bulk_body(&frame[s..e])?;
    KINDS
        .iter()
        .copied()
        .find(|k| first.eq_ignore_ascii_case(k))
}

/// Whether the `sunsubscribe` message `frame` confirms the command `raw`: an SUNSUBSCRIBE of
/// every channel, or one that names the message's channel. (Any other is a node dropping a
/// channel whose slot it gave away.)
fn confirms(raw: &[u8], frame: &[u8]) -> bool {
    use crate::resp::scan::bulk_strings;
    let (args, message) = (bulk_strings(raw), bulk_strings(frame));
    let Some((name, channels)) = args.split_first() else {
        return false;
    };
    name.eq_ignore_ascii_case(b"sunsubscribe")
        && (channels.is_empty() || message.get(1).is_some_and(|c| channels.contains(c)))
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Makes room to read into. A large bulk string being received grows the buffer by doubling
/// as usual, but never past its own end: a 1 MiB value then costs 1 MiB, not the 2 MiB that
/// doubling would round it up to (each reply keeps its part of the buffer alive until the
/// client has been sent it). Growth still follows bytes received, not the claimed length.
fn grow(rbuf: &mut BytesMut) {
    let len = rbuf.len();
    match bulk_end(rbuf) {
        // The rest of it fits already.
        Some(end) if end <= rbuf.capacity() => {}
        Some(end) if end > len + READ_CHUNK / 4 => {
            let doubled = (rbuf.capacity() * 2).max(len + READ_CHUNK);
            // The last step lands on the end instead of overshooting it.
            let target = if doubled + doubled / 2 >= end {
                end
            } else {
                doubled
            };
            let mut grown = BytesMut::with_capacity(target);
            grown.extend_from_slice(rbuf);
            *rbuf = grown;
        }
        _ => rbuf.reserve(READ_CHUNK),
    }
}

/// Where the bulk string (`$`, `=` or `!`) at the start of `buf` ends, once its header is in.
fn bulk_end(buf: &[u8]) -> Option<usize> {
    if !matches!(buf.first(), Some(b'$' | b'=' | b'!')) {
        return None;
    }
    let head = &buf[1..buf.len().min(24)];
    let cr = head.iter().position(|&b| b == b'\r')?;
    let len: usize = std::str::from_utf8(&head[..cr]).ok()?.parse().ok()?;
    // Type byte, digits, CRLF, the value, CRLF.
    Some(1 + cr + 2 + len + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that gives a slot away sends `sunsubscribe` for its channels: while the
    /// client's SUNSUBSCRIBE of another channel waits, that message is not its confirmation
    /// (review: it was taken as one, and the dropped channel was never subscribed again).
    #[test]
    fn a_sunsubscribe_confirms_only_the_channels_it_names() {
        let frame = |c: &[u8]| crate::resp::request::command(&[b"sunsubscribe", c, b":1"]);
        let other = crate::resp::request::command(&[b"SUNSUBSCRIBE", b"chB"]);
        assert!(!confirms(&other, &frame(b"ch{t}")));
        assert!(confirms(&other, &frame(b"chB")));
        let all = crate::resp::request::command(&[b"sunsubscribe"]);
        assert!(confirms(&all, &frame(b"ch{t}")));
        // RESP3: the same as a push (review: it was never taken as the confirmation).
        let mut push = frame(b"chB").to_vec();
        push[0] = b'>';
        assert!(confirms(&other, &push));
        push = frame(b"ch{t}").to_vec();
        push[0] = b'>';
        assert!(!confirms(&other, &push));
        let subscribe = crate::resp::request::command(&[b"SSUBSCRIBE", b"ch{t}"]);
        assert!(!confirms(&subscribe, &frame(b"ch{t}")));
    }

    /// Receiving a 1 MiB value in 16 KiB reads ends with a buffer of the reply's size, where
    /// plain doubling would have reached 2 MiB.
    #[test]
    fn a_large_bulk_grows_the_buffer_to_its_end_only() {
        let value = vec![b'v'; 1 << 20];
        let mut reply = format!("${}\r\n", value.len()).into_bytes();
        reply.extend_from_slice(&value);
        reply.extend_from_slice(b"\r\n");
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut fed = 0;
        while fed < reply.len() {
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                grow(&mut rbuf);
            }
            let n = (rbuf.capacity() - rbuf.len())
                .min(READ_CHUNK)
                .min(reply.len() - fed);
            rbuf.extend_from_slice(&reply[fed..fed + n]);
            fed += n;
        }
        assert_eq!(&rbuf[..], &reply[..]);
        assert!(
            rbuf.capacity() < reply.len() + READ_CHUNK,
            "{}",
            rbuf.capacity()
        );
        assert_eq!(bulk_end(b"$5\r\nhel"), Some(11));
        assert_eq!(bulk_end(b"$12"), None);
        assert_eq!(bulk_end(b"*1\r\n"), None);
    }

    /// A fake shard on loopback for the upstream FIFO's unit tests: it answers each request
    /// with `:<n>` (its number, from 1) once `release` lets it, and records what it read.
    mod fake {
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::Semaphore;

        pub struct Shard {
            pub addr: std::net::SocketAddr,
            pub received: Arc<Mutex<Vec<u8>>>,
            pub release: Arc<Semaphore>,
        }

        /// `refuse_auth`: answer the first command (the handshake's AUTH) with an error.
        pub async fn start(refuse_auth: bool) -> Shard {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let received = Arc::new(Mutex::new(Vec::new()));
            let release = Arc::new(Semaphore::new(0));
            let (rec, rel) = (received.clone(), release.clone());
            tokio::task::spawn_local(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut answered = 0usize;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    // One reply per command (each starts with `*`) read so far.
                    let commands = rec.lock().unwrap().iter().filter(|&&b| b == b'*').count();
                    while answered < commands {
                        answered += 1;
                        let reply = if refuse_auth && answered == 1 {
                            b"-WRONGPASS invalid username-password pair\r\n".to_vec()
                        } else {
                            rel.acquire().await.unwrap().forget();
                            format!(":{answered}\r\n").into_bytes()
                        };
                        if s.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Shard {
                addr,
                received,
                release,
            }
        }
    }

    fn config(op_timeout: Duration, auth: bool) -> UpstreamConfig {
        UpstreamConfig {
            slowlog: None,
            readonly: false,
            cluster: false,
            op_timeout,
            max_inflight: 1000,
            max_inflight_bytes: 1 << 20,
            auth: auth.then(|| UpstreamAuth {
                username: None,
                password: Secret("pw".into()),
            }),
            tls: None,
            up: Arc::new(AtomicUsize::new(0)),
            dedicated: false,
            mirror: None,
            scripts: None,
        }
    }

    /// Sends `cmd` for the next slot of `q`.
    fn send(up: &Upstream, q: &Rc<crate::queue::ReplyQueue>, cmd: &[&[u8]]) {
        let seq = q.push_waiting(crate::queue::Slot::Waiting(None));
        let target = Target::Client {
            queue: q.clone(),
            seq,
            part: 0,
        };
        up.send(&crate::resp::request::command(cmd), target, Instant::now());
    }

    /// Waits (bounded) until `n` replies are ready at the front of `q`, and takes them.
    async fn replies(q: &crate::queue::ReplyQueue, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if q.len() - q.waiting() >= n && q.front_ready() {
                let mut out = BytesMut::new();
                q.drain_ready(&mut out, usize::MAX);
                return out.to_vec();
            }
            assert!(Instant::now() < deadline, "no {n} replies within 5 s");
            let _ = tokio::time::timeout(Duration::from_millis(50), q.notify.notified()).await;
        }
    }

    fn local(test: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, test);
    }

    /// Replies are matched to requests in order.
    #[test]
    fn replies_are_matched_to_requests_in_order() {
        local(async {
            let shard = fake::start(false).await;
            let up = Upstream::start(
                shard.addr,
                Proto::Resp2,
                config(Duration::from_secs(5), false),
            );
            let q = crate::queue::ReplyQueue::new();
            for k in [&b"a"[..], b"b", b"c"] {
                send(&up, &q, &[b"GET", k]);
            }
            shard.release.add_permits(3);
            assert_eq!(replies(&q, 3).await, b":1\r\n:2\r\n:3\r\n");
        });
    }

    /// A request that was sent and timed out says so, keeps its place in the FIFO (its late
    /// reply is dropped, not given to the next request) and keeps counting as in flight.
    #[test]
    fn a_timed_out_request_keeps_its_place_and_its_late_reply_is_dropped() {
        local(async {
            let shard = fake::start(false).await;
            let up = Upstream::start(
                shard.addr,
                Proto::Resp2,
                config(Duration::from_millis(200), false),
            );
            let q = crate::queue::ReplyQueue::new();
            send(&up, &q, &[b"GET", b"slow"]);
            let first = replies(&q, 1).await;
            assert!(
                first.starts_with(b"-ERR outcome unknown: "),
                "{}",
                String::from_utf8_lossy(&first)
            );
            assert_eq!(
                up.pending(),
                1,
                "the abandoned request is still in the FIFO"
            );
            send(&up, &q, &[b"GET", b"next"]);
            shard.release.add_permits(2);
            // `:1` was the late reply to the first request: dropped.
            assert_eq!(replies(&q, 1).await, b":2\r\n");
            assert_eq!(up.pending(), 0);
        });
    }

    /// Requests wait for the handshake; when the shard refuses it they fail as not sent, and
    /// the shard never receives them.
    #[test]
    fn a_refused_handshake_fails_requests_that_were_never_sent() {
        local(async {
            let shard = fake::start(true).await;
            let up = Upstream::start(
                shard.addr,
                Proto::Resp2,
                config(Duration::from_secs(5), true),
            );
            let q = crate::queue::ReplyQueue::new();
            send(&up, &q, &[b"SET", b"k", b"v"]);
            let r = replies(&q, 1).await;
            assert!(
                r.starts_with(b"-ERR shard unavailable: ")
                    && r.windows(9).any(|w| w == b"WRONGPASS"),
                "{}",
                String::from_utf8_lossy(&r)
            );
            let seen = shard.received.lock().unwrap().clone();
            assert!(
                !seen.windows(3).any(|w| w == b"SET"),
                "the request reached the shard: {}",
                String::from_utf8_lossy(&seen)
            );
        });
    }
}
