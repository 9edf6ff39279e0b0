//! Upstream connections: one pipelined, multiplexed connection to a shard, shared by every
//! client session of one worker.
//!
//! Sessions append request bytes to the connection's output buffer and a [`Target`] to its
//! FIFO of pending replies. A writer writes everything queued since its last write in one
//! syscall (double-buffered, no allocation in steady state); a reader reads replies in bulk,
//! frames them with the resumable [`ReplyScanner`] and hands each one, as a zero-copy slice of
//! the read buffer, to the oldest pending target.
//!
//! Faults stay local to the shard: on refused/reset/EOF, or when the oldest request has waited
//! longer than `op_timeout` (a hung shard), every pending request fails with
//! `-ERR shard unavailable: …` and the connection is re-established. Reconnects back off from
//! 50 ms to at most 1 s; a request that arrives while the shard is down triggers an attempt at
//! once, so the first request after the shard returns succeeds.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::queue::Target;
use crate::resp::reply::{self, Proto};
use crate::resp::{ReplyScanner, ScanError};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Read buffer growth step (a larger reply grows it in steps, never from a claimed length).
const READ_CHUNK: usize = 16 * 1024;

/// Settings shared by the upstream connections of a worker.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub op_timeout: Duration,
    pub max_inflight: usize,
}

/// A request waiting for its reply.
struct Pending {
    target: Target,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// Request bytes not yet written.
    out: BytesMut,
    /// Targets of the requests written or queued, oldest first.
    pending: VecDeque<Pending>,
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
    wake_writer: Notify,
    /// The pending FIFO went from empty to non-empty: arm the op-timeout deadline.
    wake_reader: Notify,
}

/// Why a connection was dropped.
#[derive(Debug)]
enum Fault {
    Io(std::io::Error),
    Closed,
    TimedOut,
    Protocol(ScanError),
    Unexpected,
}

impl Fault {
    fn describe(&self, op_timeout: Duration) -> String {
        match self {
            Fault::Io(e) => e.to_string(),
            Fault::Closed => "connection closed by the shard".into(),
            Fault::TimedOut => format!("no reply within {op_timeout:?}"),
            Fault::Protocol(e) => format!("invalid reply from the shard ({e:?})"),
            Fault::Unexpected => "reply with no request".into(),
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
            wake_writer: Notify::new(),
            wake_reader: Notify::new(),
        });
        tokio::task::spawn_local(up.clone().drive());
        up
    }

    pub fn is_connected(&self) -> bool {
        self.st.borrow().connected
    }

    /// Queues one request (`raw` is a complete RESP command) whose reply goes to `target`.
    /// Fails it at once when the connection has too many requests in flight.
    pub fn send(&self, raw: &[u8], target: Target, now: Instant) {
        let mut st = self.st.borrow_mut();
        if st.pending.len() >= self.cfg.max_inflight {
            drop(st);
            target.deliver(reply::shard_unavailable(
                &self.label,
                "too many requests in flight",
            ));
            return;
        }
        let wake_writer = st.out.is_empty();
        let wake_reader = st.pending.is_empty();
        st.out.extend_from_slice(raw);
        st.pending.push_back(Pending {
            target,
            deadline: now + self.cfg.op_timeout,
        });
        drop(st);
        if wake_writer {
            self.wake_writer.notify_one();
        }
        if wake_reader {
            self.wake_reader.notify_one();
        }
    }

    /// Fails every queued and in-flight request with `why`.
    fn fail_all(&self, why: &str) {
        let failed: Vec<Pending> = {
            let mut st = self.st.borrow_mut();
            st.out.clear();
            st.connected = false;
            st.pending.drain(..).collect()
        };
        if failed.is_empty() {
            return;
        }
        let err = reply::shard_unavailable(&self.label, why);
        for p in failed {
            p.target.deliver(err.clone());
        }
    }

    /// Connects, serves until a fault, fails what was pending, backs off, repeats — for as
    /// long as the worker runs.
    async fn drive(self: Rc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let why = match tokio::time::timeout(self.cfg.op_timeout, TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(stream)) => {
                    backoff = BACKOFF_MIN;
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(shard = %self.label, "connected");
                    let fault = self.serve(stream).await;
                    let why = fault.describe(self.cfg.op_timeout);
                    tracing::warn!(shard = %self.label, "shard connection lost: {why}");
                    why
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("connect timed out after {:?}", self.cfg.op_timeout),
            };
            self.fail_all(&why);
            // Wait out the backoff unless a request arrives (then try at once).
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.wake_writer.notified() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs the reader and the writer of one established connection until either fails.
    async fn serve(&self, stream: TcpStream) -> Fault {
        {
            let mut st = self.st.borrow_mut();
            st.connected = true;
            if self.proto == Proto::Resp3 {
                // Negotiate RESP3 before anything queued while connecting.
                let mut out = BytesMut::from(&b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"[..]);
                out.extend_from_slice(&st.out);
                st.out = out;
                st.pending.push_front(Pending {
                    target: Target::Discard,
                    deadline: Instant::now() + self.cfg.op_timeout,
                });
            }
        }
        let (rd, wr) = stream.into_split();
        // Whatever was queued while connecting is written now.
        self.wake_writer.notify_one();
        tokio::select! {
            f = self.read_loop(rd) => f,
            f = self.write_loop(wr) => f,
        }
    }

    async fn write_loop(&self, mut wr: OwnedWriteHalf) -> Fault {
        let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            let idle = {
                let mut st = self.st.borrow_mut();
                let idle = st.out.is_empty();
                if !idle {
                    std::mem::swap(&mut st.out, &mut wbuf);
                }
                idle
            };
            if idle {
                self.wake_writer.notified().await;
                continue;
            }
            if let Err(e) = wr.write_all(&wbuf).await {
                return Fault::Io(e);
            }
            wbuf.clear();
        }
    }

    async fn read_loop(&self, mut rd: OwnedReadHalf) -> Fault {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut scanner = ReplyScanner::new();
        loop {
            // Hand out every complete reply.
            loop {
                match scanner.scan(&rbuf) {
                    Ok(Some(frame)) => {
                        let bytes: Bytes = rbuf.split_to(frame.len).freeze();
                        if frame.push {
                            // Out-of-band (RESP3 push): not the reply to any request.
                            continue;
                        }
                        let p = self.st.borrow_mut().pending.pop_front();
                        match p {
                            Some(p) => p.target.deliver(bytes),
                            None => return Fault::Unexpected,
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Fault::Protocol(e),
                }
            }
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                rbuf.reserve(READ_CHUNK);
            }
            let deadline = self.st.borrow().pending.front().map(|p| p.deadline);
            let read = match deadline {
                Some(d) => tokio::select! {
                    r = rd.read_buf(&mut rbuf) => r,
                    _ = tokio::time::sleep_until(d) => return Fault::TimedOut,
                },
                None => tokio::select! {
                    r = rd.read_buf(&mut rbuf) => r,
                    _ = self.wake_reader.notified() => continue,
                },
            };
            match read {
                Ok(0) => return Fault::Closed,
                Ok(_) => {}
                Err(e) => return Fault::Io(e),
            }
        }
    }
}

/// Connections indexed `[shard][connection]`.
type Grid = Vec<Vec<Rc<Upstream>>>;

/// A worker's connections to every shard: `[shard][connection]`, one set per protocol.
pub struct Pools {
    resp2: Grid,
    resp3: RefCell<Option<Grid>>,
    shards: Vec<SocketAddr>,
    per_shard: usize,
    cfg: UpstreamConfig,
}

impl Pools {
    /// Starts the RESP2 connections now; RESP3 ones start on first use (`HELLO 3`).
    pub fn start(shards: &[SocketAddr], per_shard: usize, cfg: UpstreamConfig) -> Self {
        let resp2 = Self::open(shards, per_shard, Proto::Resp2, &cfg);
        Pools {
            resp2,
            resp3: RefCell::new(None),
            shards: shards.to_vec(),
            per_shard,
            cfg,
        }
    }

    fn open(shards: &[SocketAddr], per_shard: usize, proto: Proto, cfg: &UpstreamConfig) -> Grid {
        shards
            .iter()
            .map(|&a| {
                (0..per_shard)
                    .map(|_| Upstream::start(a, proto, cfg.clone()))
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
                let pools = r3.get_or_insert_with(|| {
                    Self::open(&self.shards, self.per_shard, Proto::Resp3, &self.cfg)
                });
                pools[shard][conn % self.per_shard].clone()
            }
        }
    }

    /// Whether every RESP2 connection is up (used by INFO and readiness).
    pub fn connected(&self) -> Vec<bool> {
        self.resp2
            .iter()
            .map(|conns| conns.iter().all(|c| c.is_connected()))
            .collect()
    }
}
