//! The io_uring data path (`--io uring`): one ring per worker thread, inside the worker's
//! tokio runtime, under the same [`ReadSide`]/[`WriteSide`] traits as the epoll path, so that
//! sessions and shard connections run unchanged on top of it.
//!
//! - **Batching.** A read or write queues a submission entry and returns; the first entry of
//!   a turn wakes the driver task ([`drive`]), which the worker's `LocalSet` runs after every
//!   task already runnable, so one `io_uring_enter` submits the whole turn's reads and writes.
//!   The completions that enter produced are reaped at once; later ones make the ring's fd
//!   readable in tokio's epoll (the ring shares the worker's one epoll wait with timers, TLS
//!   and the admin listener). tokio's `on_thread_park` hook is not used: tokio skips it while
//!   the runtime is busy (`park_yield`), so it cannot be the flush point.
//! - **Reads** are a completion adapted to readiness: one receive is in flight per connection
//!   while nothing received is unread, into a buffer the kernel picks from the worker's pool
//!   of provided buffers (a buffer ring) when data arrives, so an idle connection holds no
//!   buffer. `poll_read_*` copies what was received to the caller and arms the next receive.
//!   A connection with unread input has no receive in flight, so the kernel's socket buffer
//!   and TCP flow control push back as on the epoll path, and no connection holds more than
//!   one buffer of the pool. When the pool is empty, the receive is armed again into a buffer
//!   of the connection's own, freed once read: no connection can starve the others.
//! - **Writes** copy the caller's bytes into the connection's outgoing buffer (at most
//!   [`WRITE_BOUND`] bytes; `Pending` beyond) and send them; a short send sends the rest.
//! - **Ownership**, which makes the `unsafe` below sound: every buffer the kernel may touch
//!   (the pool, a connection's own receive buffer, its outgoing buffer being sent) belongs to
//!   the driver, never to a stream, and a connection's slot (its buffers and fd) is freed only
//!   when no operation of it is in flight, after the last completion that names it. Dropping a
//!   stream cancels its receive; bytes already accepted are still sent, for at most
//!   [`LINGER`], then cancelled (a peer that never reads cannot pin a slot).
//! - **Fallback.** [`Driver::new`] fails where the kernel refuses io_uring (older than 5.19,
//!   `io_uring_disabled`, seccomp); the worker then logs it once and uses epoll.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::io::AsyncWrite;
use tokio::io::unix::AsyncFd;

use crate::netio::{ReadSide, WriteSide};

/// Operation kinds, in the low byte of a completion's `user_data`.
const RECV: u64 = 1;
const SEND: u64 = 2;
const CANCEL: u64 = 3;
const LINGER_TIMER: u64 = 4;

/// Submission queue entries per ring (the completion queue has four times as many).
const RING_ENTRIES: u32 = 1024;
/// Buffers in a worker's pool, and their size: 4 MiB per worker.
const POOL_BUFS: u16 = 256;
const POOL_BUF_SIZE: usize = 16 * 1024;
/// `IORING_ENTER_GETEVENTS` (io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// `IORING_RECVSEND_POLL_FIRST` (io_uring.h).
const POLL_FIRST: u16 = 1;
/// The pool's buffer group id.
const POOL_GROUP: u16 = 0;
/// Outgoing bytes a connection may hold (in flight and queued) before `poll_write_now` is
/// `Pending`, as a full socket send buffer would be.
pub const WRITE_BOUND: usize = 64 * 1024;
/// Outgoing buffers larger than this are freed once everything is sent.
const KEEP_OUT: usize = 4096;
/// How long the bytes of a dropped stream may take to be sent before they are cancelled.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(5);
static LINGER_TS: types::Timespec = types::Timespec::new().sec(LINGER.as_secs());

fn user_data(idx: usize, generation: u32, kind: u64) -> u64 {
    ((generation as u64) << 32) | ((idx as u64) << 8) | kind
}

/// Where received, unread bytes are.
enum Held {
    /// Buffer `bid` of the pool (the kernel does not touch it until it is recycled).
    Pool(u16),
    /// The connection's own buffer (the pool was empty).
    Own(Box<[u8]>),
}

/// One connection's state in the driver.
struct Conn {
    generation: u32,
    fd: OwnedFd,
    /// A receive is in flight (into the pool, or into `own` when `own` is set).
    recv_inflight: bool,
    /// The connection's own receive buffer while a receive into it is in flight.
    own: Option<Box<[u8]>>,
    /// Received and not yet read: where, and the unread range.
    held: Option<(Held, usize, usize)>,
    read_eof: bool,
    read_err: Option<i32>,
    read_waker: Option<Waker>,
    /// `wsending[wsent..]` is read by the kernel while `send_inflight`: it is neither moved,
    /// grown nor changed then; new bytes go to `wnext`.
    wsending: Vec<u8>,
    wsent: usize,
    wnext: Vec<u8>,
    send_inflight: bool,
    write_err: Option<i32>,
    write_waker: Option<Waker>,
    /// The write side was shut down while sends were pending: shut it once they are done.
    shut_after_send: bool,
    /// A [`LINGER`] timer runs for the sends of a dropped stream.
    linger_inflight: bool,
    /// The stream was dropped: the slot is freed once no operation is in flight.
    dropped: bool,
}

impl Conn {
    fn idle(&self) -> bool {
        !self.recv_inflight && !self.send_inflight && !self.linger_inflight
    }

    fn outgoing(&self) -> usize {
        self.wsending.len() - self.wsent + self.wnext.len()
    }
}

/// A worker's ring, its connections and its buffer pool.
struct State {
    // (Dropped before `pool`, after every operation completed: see `Drop for State`.)
    ring: IoUring,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    next_generation: u32,
    unsubmitted: usize,
    driver_waker: Option<Waker>,
    pool: BufRing,
    cqe_scratch: Vec<(u64, i32, u32)>,
}

impl State {
    /// Queues one entry (submitting at once if the queue is full), and wakes the driver task
    /// at the first entry of a turn.
    ///
    /// # Safety
    /// Every buffer `sqe` points to must stay valid, and not be written by us, until its
    /// completion has been reaped (callers: buffers owned by a slot that is not freed while
    /// the operation is in flight).
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: forwarded to the caller (see above).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            let mut wakers = Vec::new();
            self.submit(&mut wakers);
            wake_all(wakers);
        }
        self.unsubmitted += 1;
        // (The driver registers again each time it runs: one wake-up per turn, and none lost
        // if a submit left entries behind.)
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }

    /// Submits what is queued (one `io_uring_enter`).
    fn submit(&mut self, wakers: &mut Vec<Waker>) {
        if self.unsubmitted == 0 {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reap, then submit again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.reap(wakers)
                }
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
        }
        self.unsubmitted = self.ring.submission().len();
    }

    /// Moves completions the kernel kept back (the queue was full) into the queue, and
    /// handles them.
    #[cold]
    fn flush_overflow(&mut self, wakers: &mut Vec<Waker>) {
        while self.ring.submission().cq_overflow() {
            // SAFETY: no argument pointer (`None`); nothing to submit.
            let r = unsafe {
                (self.ring.submitter()).enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
            };
            if let Err(e) = r
                && e.raw_os_error() != Some(libc::EINTR)
            {
                break;
            }
            self.reap(wakers);
        }
    }

    /// Handles every completion there is (no system call: the queue is shared memory).
    fn reap(&mut self, wakers: &mut Vec<Waker>) {
        // Copied out first: completing one may queue an entry, which needs `&mut self`.
        let mut cqes = std::mem::take(&mut self.cqe_scratch);
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags, wakers);
        }
        cqes.clear();
        self.cqe_scratch = cqes;
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32, wakers: &mut Vec<Waker>) {
        let kind = ud & 0xff;
        let idx = ((ud >> 8) & 0xff_ffff) as usize;
        if kind == CANCEL {
            return;
        }
        let generation = (ud >> 32) as u32;
        if self
            .conns
            .get(idx)
            .is_none_or(|c| c.as_ref().is_none_or(|c| c.generation != generation))
        {
            // Never expected: a slot is freed (and reused) only after its last completion, so
            // no completion names a freed slot or an earlier connection of a reused one.
            return;
        }
        match kind {
            RECV => self.received(idx, res, flags, wakers),
            SEND => self.sent(idx, res, wakers),
            LINGER_TIMER => {
                let c = self.conn(idx);
                c.linger_inflight = false;
                if res == -libc::ETIME && c.send_inflight {
                    // The peer did not take the bytes in time: cancel the send.
                    let generation = c.generation;
                    self.cancel(idx, generation, SEND);
                }
            }
            _ => unreachable!("unknown io_uring operation {kind}"),
        }
        self.maybe_free(idx);
    }

    fn received(&mut self, idx: usize, res: i32, flags: u32, wakers: &mut Vec<Waker>) {
        let bid = cqueue::buffer_select(flags);
        let c = self.conns[idx].as_mut().expect("live slot");
        c.recv_inflight = false;
        let own = c.own.take();
        if res > 0 && !c.dropped {
            let held = match (bid, own) {
                (Some(bid), _) => Held::Pool(bid),
                (None, Some(own)) => Held::Own(own),
                (None, None) => unreachable!("a receive without a buffer"),
            };
            c.held = Some((held, 0, res as usize));
        } else {
            if let Some(bid) = bid {
                self.pool.recycle(bid);
            }
            let c = self.conn(idx);
            match -res {
                0 => c.read_eof = true,
                libc::ENOBUFS if !c.dropped => {
                    // The pool is empty: this connection receives into a buffer of its own.
                    return self.arm_recv(idx, true);
                }
                libc::ECANCELED | libc::EINTR | libc::EAGAIN | libc::ENOBUFS => {
                    if !c.dropped {
                        return self.arm_recv(idx, false);
                    }
                }
                e => c.read_err = Some(e),
            }
        }
        if let Some(w) = self.conn(idx).read_waker.take() {
            wakers.push(w);
        }
    }

    fn sent(&mut self, idx: usize, res: i32, wakers: &mut Vec<Waker>) {
        let c = self.conn(idx);
        c.send_inflight = false;
        if res >= 0 {
            c.wsent += res as usize;
            if c.wsent == c.wsending.len() {
                c.wsending.clear();
                c.wsent = 0;
                std::mem::swap(&mut c.wsending, &mut c.wnext);
            }
        } else if res != -libc::EINTR && res != -libc::EAGAIN {
            c.write_err = Some(-res);
            c.wsending = Vec::new();
            c.wsent = 0;
            c.wnext = Vec::new();
        }
        if let Some(w) = c.write_waker.take() {
            wakers.push(w);
        }
        if c.write_err.is_none() && c.wsent < c.wsending.len() {
            // A short send, or bytes queued meanwhile: send the rest.
            return self.arm_send(idx);
        }
        if c.outgoing() == 0 {
            // An idle connection keeps no big buffers (a reply of 64 KiB once would otherwise
            // hold 128 KiB for the connection's life).
            if c.wsending.capacity() > KEEP_OUT {
                c.wsending = Vec::new();
            }
            if c.wnext.capacity() > KEEP_OUT {
                c.wnext = Vec::new();
            }
            if c.shut_after_send {
                c.shut_after_send = false;
                let _ = rustix::net::shutdown(&c.fd, rustix::net::Shutdown::Write);
            }
            if c.linger_inflight {
                // Everything was sent: the timer's job is done.
                let generation = c.generation;
                self.cancel(idx, generation, LINGER_TIMER);
            }
        }
    }

    fn conn(&mut self, idx: usize) -> &mut Conn {
        self.conns[idx].as_mut().expect("live slot")
    }

    /// Cancels operation `kind` of slot `idx`; its completion arrives as usual.
    fn cancel(&mut self, idx: usize, generation: u32, kind: u64) {
        let sqe = opcode::AsyncCancel::new(user_data(idx, generation, kind))
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request references no buffer.
        unsafe { self.push(sqe) };
    }

    /// Arms the next receive: into the pool, or into a buffer of the connection's own.
    fn arm_recv(&mut self, idx: usize, own: bool) {
        let c = self.conns[idx].as_mut().expect("live slot");
        debug_assert!(!c.recv_inflight && !c.dropped && c.held.is_none());
        c.recv_inflight = true;
        let fd = types::Fd(c.fd.as_raw_fd());
        let ud = user_data(idx, c.generation, RECV);
        let sqe = if own {
            let buf = c.own.insert(vec![0u8; POOL_BUF_SIZE].into_boxed_slice());
            // (The box's heap block does not move when the slot or `conns` moves.)
            opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                .build()
                .user_data(ud)
        } else {
            // POLL_FIRST: a receive is armed right after the last input was read, so the
            // kernel waits for data instead of trying (and failing) to receive first.
            opcode::Recv::new(fd, std::ptr::null_mut(), POOL_BUF_SIZE as u32)
                .ioprio(POLL_FIRST)
                .buf_group(POOL_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(ud)
        };
        // SAFETY: a pool receive writes into a buffer the kernel takes from the registered
        // pool, which outlives every operation (`Drop for State`). An own receive writes into
        // `own`, a boxed slice held by slot `idx` that nobody reads or replaces while
        // `recv_inflight`, and the slot is freed only when `idle()`, after this completion.
        unsafe { self.push(sqe) };
    }

    fn arm_send(&mut self, idx: usize) {
        let c = self.conn(idx);
        debug_assert!(!c.send_inflight && c.wsent < c.wsending.len());
        c.send_inflight = true;
        let rest = &c.wsending[c.wsent..];
        let sqe = opcode::Send::new(
            types::Fd(c.fd.as_raw_fd()),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(idx, c.generation, SEND));
        // SAFETY: `wsending` is held by slot `idx` and is not changed, grown, swapped or
        // dropped while `send_inflight` (new bytes go to `wnext`; the swap happens only at
        // this send's completion); the slot is freed only when `idle()`.
        unsafe { self.push(sqe) };
    }

    /// Frees slot `idx` (closing its fd) once its stream is dropped and nothing of it is in
    /// flight.
    fn maybe_free(&mut self, idx: usize) {
        let Some(c) = &mut self.conns[idx] else {
            return;
        };
        if c.dropped && c.idle() {
            if let Some((Held::Pool(bid), _, _)) = c.held.take() {
                self.pool.recycle(bid);
            }
            // No entry naming the fd is in flight or queued any more: closing it is safe.
            self.conns[idx] = None;
            self.free.push(idx);
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Buffers of operations in flight must outlive them: cancel everything and wait for
        // every completion before the slots and the pool are freed.
        let live: Vec<(usize, u32, [bool; 3])> = (self.conns.iter().enumerate())
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                Some((
                    i,
                    c.generation,
                    [c.recv_inflight, c.send_inflight, c.linger_inflight],
                ))
            })
            .collect();
        for (i, generation, inflight) in live {
            self.conn(i).dropped = true;
            for (on, kind) in inflight.into_iter().zip([RECV, SEND, LINGER_TIMER]) {
                if on {
                    self.cancel(i, generation, kind);
                }
            }
        }
        let mut wakers = Vec::new();
        while self.conns.iter().flatten().any(|c| !c.idle()) {
            if self.ring.submit_and_wait(1).is_err() {
                // (The pool's memory is then leaked rather than freed under the kernel.)
                return;
            }
            self.unsubmitted = 0;
            self.reap(&mut wakers);
        }
        // (Wakers of a runtime being torn down are dropped, not woken.)
        if self
            .ring
            .submitter()
            .unregister_buf_ring(POOL_GROUP)
            .is_ok()
        {
            self.pool.registered = false;
        }
    }
}

/// A provided-buffer ring: `entries` buffers of `size` bytes in one allocation, and the ring
/// of descriptors through which they are handed to the kernel.
struct BufRing {
    entries: u16,
    size: usize,
    ring: *mut types::BufRingEntry,
    ring_layout: std::alloc::Layout,
    bufs: *mut u8,
    bufs_layout: std::alloc::Layout,
    tail: u16,
    registered: bool,
}

impl BufRing {
    fn new(uring: &IoUring, entries: u16, size: usize) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two() && size > 0 && size <= u32::MAX as usize);
        let ring_layout = std::alloc::Layout::from_size_align(
            entries as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        let bufs_layout = std::alloc::Layout::from_size_align(entries as usize * size, 64)
            .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size.
        let (ring, bufs) = unsafe {
            (
                std::alloc::alloc_zeroed(ring_layout) as *mut types::BufRingEntry,
                std::alloc::alloc(bufs_layout),
            )
        };
        if ring.is_null() || bufs.is_null() {
            std::alloc::handle_alloc_error(ring_layout);
        }
        let mut br = BufRing {
            entries,
            size,
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            tail: 0,
            registered: false,
        };
        // SAFETY: `ring` is page-aligned, zeroed and `entries` descriptors long; it stays
        // allocated until `Drop for BufRing`, which frees it only once it is unregistered (and
        // `State` unregisters it only after every operation completed).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, entries, POOL_GROUP, 0)?
        };
        br.registered = true;
        for bid in 0..entries {
            br.recycle(bid);
        }
        Ok(br)
    }

    /// The bytes `from..to` of buffer `bid`, which a completion handed to us.
    fn data(&self, bid: u16, from: usize, to: usize) -> &[u8] {
        assert!(bid < self.entries && from <= to && to <= self.size);
        // SAFETY: in bounds (asserted); buffer `bid` was handed to us by a completion and is
        // not in the ring, so the kernel does not write it until `recycle(bid)`; the slice
        // covers only that buffer, not the ones the kernel may be writing.
        unsafe {
            std::slice::from_raw_parts(self.bufs.add(bid as usize * self.size + from), to - from)
        }
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries);
        let mask = self.entries - 1;
        // SAFETY: the descriptor at `tail` is inside the ring and not the kernel's (it only
        // consumes descriptors below the tail we published); the new tail is published with
        // a release store after the descriptor is written, as liburing's
        // `io_uring_buf_ring_advance` does.
        unsafe {
            let e = &mut *self.ring.add((self.tail & mask) as usize);
            e.set_addr(self.bufs.add(bid as usize * self.size) as u64);
            e.set_len(self.size as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // Never free memory the kernel may still use: leaked instead.
            return;
        }
        // SAFETY: allocated in `new` with these layouts, and no longer registered.
        unsafe {
            std::alloc::dealloc(self.ring as *mut u8, self.ring_layout);
            std::alloc::dealloc(self.bufs, self.bufs_layout);
        }
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for w in wakers {
        w.wake();
    }
}

thread_local! {
    static CURRENT: RefCell<Weak<RefCell<State>>> = const { RefCell::new(Weak::new()) };
}

/// A worker thread's ring. Cheap to clone; `!Send`.
#[derive(Clone)]
pub struct Driver {
    state: Rc<RefCell<State>>,
}

/// A duplicate of the ring's fd, owned by the `AsyncFd` that watches it.
struct RingFd(OwnedFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Driver {
    /// Sets up this thread's ring and its buffer pool, and starts the driver task on the
    /// current `LocalSet`. Fails where the kernel refuses io_uring or lacks what this path
    /// needs (provided buffer rings: Linux 5.19), so that the caller can use epoll.
    pub fn start() -> io::Result<Driver> {
        Self::start_with(POOL_BUFS)
    }

    /// [`start`](Self::start) with a pool of `pool_bufs` buffers (a power of two).
    fn start_with(pool_bufs: u16) -> io::Result<Driver> {
        // SINGLE_ISSUER (6.0): only this thread submits, so the kernel skips some locking;
        // without it on older kernels.
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .setup_single_issuer()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(RING_ENTRIES * 4)
                    .build(RING_ENTRIES)
            })?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let ops = [
            opcode::Recv::CODE,
            opcode::Send::CODE,
            opcode::AsyncCancel::CODE,
            opcode::Timeout::CODE,
        ];
        if !ops.iter().all(|&op| probe.is_supported(op)) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let pool = BufRing::new(&ring, pool_bufs, POOL_BUF_SIZE)?;
        // SAFETY: the ring's fd is open for as long as `ring` lives, beyond this call.
        let ring_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        let dup = rustix::io::fcntl_dupfd_cloexec(ring_fd, 0)?;
        let state = Rc::new(RefCell::new(State {
            ring,
            conns: Vec::new(),
            free: Vec::new(),
            next_generation: 0,
            unsubmitted: 0,
            driver_waker: None,
            pool,
            cqe_scratch: Vec::new(),
        }));
        // SAFETY: `RingFd` owns the fd, which so stays open, and the same fd, for the whole
        // life of the `AsyncFd`, and `as_raw_fd` always returns it.
        let afd =
            unsafe { AsyncFd::register_with_interest(RingFd(dup), tokio::io::Interest::READABLE) }?;
        let task_state = state.clone();
        tokio::task::spawn_local(async move {
            poll_fn(|cx| drive(&task_state, &afd, cx)).await;
        });
        CURRENT.with(|c| *c.borrow_mut() = Rc::downgrade(&state));
        Ok(Driver { state })
    }

    /// This thread's ring, if the worker runs the io_uring path.
    pub fn current() -> Option<Driver> {
        CURRENT.with(|c| c.borrow().upgrade().map(|state| Driver { state }))
    }

    /// Takes a connected TCP socket over; its two halves are read and written through the
    /// ring. The socket is switched to blocking mode (io_uring answers EAGAIN for a
    /// non-blocking one rather than waiting).
    pub fn stream(&self, s: std::net::TcpStream) -> io::Result<(UringRead, UringWrite)> {
        s.set_nonblocking(false)?;
        let fd: OwnedFd = s.into();
        let mut st = self.state.borrow_mut();
        st.next_generation = st.next_generation.wrapping_add(1);
        let conn = Conn {
            generation: st.next_generation,
            fd,
            recv_inflight: false,
            own: None,
            held: None,
            read_eof: false,
            read_err: None,
            read_waker: None,
            wsending: Vec::new(),
            wsent: 0,
            wnext: Vec::new(),
            send_inflight: false,
            write_err: None,
            write_waker: None,
            shut_after_send: false,
            linger_inflight: false,
            dropped: false,
        };
        let idx = match st.free.pop() {
            Some(i) => {
                st.conns[i] = Some(conn);
                i
            }
            None if st.conns.len() >= 1 << 24 => {
                return Err(io::Error::other("too many io_uring connections"));
            }
            None => {
                st.conns.push(Some(conn));
                st.conns.len() - 1
            }
        };
        // The first receive is armed now: input that comes before the first read is there.
        st.arm_recv(idx, false);
        drop(st);
        let handle = Rc::new(Handle {
            state: self.state.clone(),
            idx,
        });
        Ok((UringRead(handle.clone()), UringWrite(handle)))
    }
}

/// The driver task: submits what the turn queued, reaps completions and wakes their tasks,
/// then waits for the ring's fd (more completions) or the next turn's first entry.
fn drive(state: &Rc<RefCell<State>>, afd: &AsyncFd<RingFd>, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        let mut wakers = Vec::new();
        {
            let mut st = state.borrow_mut();
            // Registered first: an entry queued by the reap below (the rest of a short send)
            // wakes this task again, to submit it after the tasks it is about to wake.
            match &st.driver_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.driver_waker = Some(cx.waker().clone()),
            }
            st.submit(&mut wakers);
            st.reap(&mut wakers);
            if st.ring.submission().cq_overflow() {
                // Completions that did not fit the queue wait in the kernel until an enter
                // flushes them (nothing else would: the ring's fd stays quiet).
                st.flush_overflow(&mut wakers);
            }
        }
        wake_all(wakers);
        match afd.poll_read_ready(cx) {
            // Cleared, then reaped again: a completion posted after this sets it again.
            Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
            Poll::Ready(Err(e)) => panic!("io_uring: polling the ring's fd failed: {e}"),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// One connection's slot, shared by its two halves; dropping the last half drops the stream.
struct Handle {
    state: Rc<RefCell<State>>,
    idx: usize,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let Ok(mut st) = self.state.try_borrow_mut() else {
            return;
        };
        let idx = self.idx;
        let c = st.conn(idx);
        c.dropped = true;
        c.read_waker = None;
        c.write_waker = None;
        let (generation, recv, send) = (c.generation, c.recv_inflight, c.send_inflight);
        if recv {
            // It would wait for the peer forever. Its completion frees the slot.
            st.cancel(idx, generation, RECV);
        }
        if send {
            // Bytes accepted are sent, as close(2) would leave them to the kernel, but for
            // at most `LINGER`.
            st.conn(idx).linger_inflight = true;
            let sqe = opcode::Timeout::new(&LINGER_TS)
                .build()
                .user_data(user_data(idx, generation, LINGER_TIMER));
            // SAFETY: the timespec is a static.
            unsafe { st.push(sqe) };
        }
        st.maybe_free(idx);
    }
}

/// The read side of a connection on the ring.
pub struct UringRead(Rc<Handle>);

/// The write side of a connection on the ring.
pub struct UringWrite(Rc<Handle>);

impl UringRead {
    /// Copies unread input out with `put` (at most `room` bytes), or registers the waker.
    fn poll_read_with(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]),
    ) -> Poll<io::Result<usize>> {
        let h = &self.0;
        let mut st = h.state.borrow_mut();
        let st = &mut *st;
        let c = st.conns[h.idx].as_mut().expect("live slot");
        if let Some((held, from, to)) = &mut c.held {
            let data = match held {
                Held::Pool(bid) => st.pool.data(*bid, *from, *to),
                Held::Own(buf) => &buf[*from..*to],
            };
            let n = room.min(data.len());
            put(&data[..n]);
            *from += n;
            if from == to {
                if let Some((Held::Pool(bid), _, _)) = c.held.take() {
                    st.pool.recycle(bid);
                }
                if !c.read_eof && c.read_err.is_none() {
                    st.arm_recv(h.idx, false);
                }
            }
            return Poll::Ready(Ok(n));
        }
        if let Some(e) = c.read_err {
            return Poll::Ready(Err(io::Error::from_raw_os_error(e)));
        }
        if c.read_eof {
            return Poll::Ready(Ok(0));
        }
        match &c.read_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => c.read_waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl ReadSide for UringRead {
    fn unread(&self) -> Option<u64> {
        let h = &self.0;
        let st = h.state.borrow();
        let c = st.conns[h.idx].as_ref()?;
        let held = c.held.as_ref().map_or(0, |(_, from, to)| to - from) as u64;
        Some(rustix::io::ioctl_fionread(&c.fd).ok()? + held)
    }

    fn poll_read_vec(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        let room = buf.capacity() - buf.len();
        debug_assert!(
            room > 0,
            "a read into a full buffer would look like the end of stream"
        );
        self.poll_read_with(cx, room, |b| buf.extend_from_slice(b))
    }

    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let room = buf.capacity() - buf.len();
        self.poll_read_with(cx, room, |b| buf.extend_from_slice(b))
    }
}

impl WriteSide for UringWrite {
    fn poll_write_now(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let h = &self.0;
        let mut st = h.state.borrow_mut();
        let c = st.conn(h.idx);
        if let Some(e) = c.write_err {
            return Poll::Ready(Err(io::Error::from_raw_os_error(e)));
        }
        let queued = c.outgoing();
        if queued >= WRITE_BOUND {
            c.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(WRITE_BOUND - queued);
        if c.send_inflight {
            c.wnext.extend_from_slice(&buf[..n]);
        } else {
            c.wsending.extend_from_slice(&buf[..n]);
            st.arm_send(h.idx);
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for UringWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_now(cx, buf)
    }

    /// Ready at once, as on a plain TCP socket: what was accepted is the ring's to send (a
    /// write error shows at the next write). Waiting for the sends here would hold a shard
    /// connection's writer back a turn after every write, behind requests written later on
    /// other connections (a SUBSCRIBE would then reach its shard after a PUBLISH sent after
    /// it).
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let h = &self.0;
        let st = h.state.borrow();
        let c = st.conns[h.idx].as_ref().expect("live slot");
        match c.write_err {
            Some(e) => Poll::Ready(Err(io::Error::from_raw_os_error(e))),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Shuts the write side once what was accepted is sent, without waiting for it (as
    /// shutdown(2) leaves what is in the socket's buffer to the kernel): a client that does
    /// not read never holds its session up.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let h = &self.0;
        let mut st = h.state.borrow_mut();
        let c = st.conn(h.idx);
        if c.outgoing() > 0 && c.write_err.is_none() {
            c.shut_after_send = true;
            return Poll::Ready(Ok(()));
        }
        let r = rustix::net::shutdown(&c.fd, rustix::net::Shutdown::Write);
        Poll::Ready(r.map_err(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Runs `f` on a current-thread runtime in a `LocalSet` (as a worker does) with a ring
    /// whose pool has `pool_bufs` buffers.
    fn run<F: std::future::Future<Output = ()>>(pool_bufs: u16, f: impl FnOnce(Driver) -> F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let d = Driver::start_with(pool_bufs).expect("io_uring on this kernel");
            tokio::time::timeout(Duration::from_secs(20), f(d))
                .await
                .expect("within 20 s");
        });
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (s, c)
    }

    fn live(d: &Driver) -> usize {
        d.state.borrow().conns.iter().flatten().count()
    }

    async fn read_vec(r: &mut UringRead, buf: &mut Vec<u8>) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        poll_fn(|cx| r.poll_read_vec(cx, buf)).await
    }

    /// Polls until `cond` holds (the driver task runs in between).
    async fn until(mut cond: impl FnMut() -> bool) {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Input that arrives in pieces is read in pieces, into both buffer kinds, through
    /// reads smaller than what arrived; then the end of stream reads as 0.
    #[test]
    fn short_reads_and_end_of_stream() {
        run(POOL_BUFS, |d| async move {
            let (s, mut peer) = pair();
            let (mut rd, _wr) = d.stream(s).unwrap();
            peer.write_all(b"abc").unwrap();
            let mut buf = Vec::with_capacity(2);
            assert_eq!(read_vec(&mut rd, &mut buf).await.unwrap(), 2);
            assert_eq!(read_vec(&mut rd, &mut buf).await.unwrap(), 1);
            peer.write_all(b"defg").unwrap();
            let mut bytes = BytesMut::new();
            let n = poll_fn(|cx| rd.poll_read_bytes(cx, &mut bytes))
                .await
                .unwrap();
            assert_eq!((&buf[..], &bytes[..n]), (&b"abc"[..], &b"defg"[..]));
            drop(peer);
            assert_eq!(read_vec(&mut rd, &mut buf).await.unwrap(), 0);
        });
    }

    /// 8 MiB written through the bound (Pending beyond 64 KiB, woken as sends complete)
    /// arrive intact at a peer that starts reading late; shutdown ends the stream after them.
    #[test]
    fn big_writes_are_bounded_and_arrive_intact() {
        run(POOL_BUFS, |d| async move {
            let (s, mut peer) = pair();
            let (_rd, mut wr) = d.stream(s).unwrap();
            let data: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
            let expect = data.clone();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                peer.read_to_end(&mut got).unwrap();
                got
            });
            let first = poll_fn(|cx| wr.poll_write_now(cx, &data)).await;
            assert_eq!(first.unwrap(), WRITE_BOUND, "accepted up to the bound");
            let pending = poll_fn(|cx| Poll::Ready(wr.poll_write_now(cx, &data[WRITE_BOUND..])));
            assert!(
                pending.await.is_pending(),
                "nothing more until sends complete"
            );
            wr.write_all(&data[WRITE_BOUND..]).await.unwrap();
            wr.shutdown().await.unwrap();
            let got = tokio::task::spawn_blocking(move || reader.join().unwrap());
            let got = got.await.unwrap();
            assert!(got == expect, "{} of {} bytes", got.len(), expect.len());
        });
    }

    /// With the pool empty (two buffers, both held by connections whose input is unread), a
    /// third connection still receives, into a buffer of its own, and the pool is used again
    /// once the held buffers are read.
    #[test]
    fn an_empty_pool_starves_no_one() {
        run(2, |d| async move {
            let mut conns = Vec::new();
            for i in 0..3u8 {
                let (s, mut peer) = pair();
                let (rd, wr) = d.stream(s).unwrap();
                peer.write_all(&[b'a' + i; 100]).unwrap();
                conns.push((rd, wr, peer));
            }
            let held = |own: bool| {
                let st = d.state.borrow();
                let held = st.conns.iter().flatten().filter_map(|c| c.held.as_ref());
                held.filter(|h| matches!(h.0, Held::Own(_)) == own).count()
            };
            until(|| held(false) + held(true) == 3).await;
            assert_eq!(
                (held(false), held(true)),
                (2, 1),
                "two in the pool, one its own"
            );
            for (i, (rd, _, _)) in conns.iter_mut().enumerate().rev() {
                let mut buf = Vec::with_capacity(1000);
                let n = read_vec(rd, &mut buf).await.unwrap();
                assert_eq!(&buf[..n], &[b'a' + i as u8; 100][..], "connection {i}");
            }
            let (rd, _, peer) = &mut conns[0];
            peer.write_all(b"again").unwrap();
            let mut buf = Vec::with_capacity(100);
            assert_eq!(read_vec(rd, &mut buf).await.unwrap(), 5);
            assert_eq!(&buf, b"again");
        });
    }

    /// A peer that resets the connection is a read error; one that goes away while bytes are
    /// being sent to it is a write error.
    #[test]
    fn resets_are_errors() {
        run(POOL_BUFS, |d| async move {
            let (s, peer) = pair();
            let (mut rd, mut wr) = d.stream(s).unwrap();
            let (r, mut w) = (peer.try_clone().unwrap(), peer);
            w.write_all(b"unread").unwrap();
            socket2::SockRef::from(&r)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop((r, w));
            let mut buf = Vec::with_capacity(64);
            let mut read = read_vec(&mut rd, &mut buf).await;
            if read.as_ref().is_ok_and(|&n| n > 0) {
                read = read_vec(&mut rd, &mut buf).await;
            }
            let e = read.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET));
            let data = vec![7u8; 1 << 20];
            let mut failed = None;
            for _ in 0..100 {
                if let Err(e) = wr.write_all(&data).await {
                    failed = Some(e);
                    break;
                }
            }
            let e = failed.expect("writes to a closed peer fail");
            assert!(
                matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
                "{e}"
            );
        });
    }

    /// Dropping a stream whose receive waits cancels it and closes the socket (the peer sees
    /// the end); bytes accepted before the drop are delivered first.
    #[test]
    fn drop_delivers_what_was_accepted_then_closes() {
        run(POOL_BUFS, |d| async move {
            let (s, mut peer) = pair();
            let (rd, mut wr) = d.stream(s).unwrap();
            let data: Vec<u8> = (0..WRITE_BOUND).map(|i| (i % 13) as u8).collect();
            let mut off = 0;
            while off < data.len() {
                off += poll_fn(|cx| wr.poll_write_now(cx, &data[off..]))
                    .await
                    .unwrap();
            }
            drop((rd, wr));
            let got = tokio::task::spawn_blocking(move || {
                let mut v = Vec::new();
                peer.read_to_end(&mut v).unwrap();
                v
            });
            assert!(got.await.unwrap() == data);
            until(|| live(&d) == 0).await;
        });
    }

    /// A dropped stream whose peer never reads is not kept for ever: after `LINGER` its send
    /// is cancelled and the slot freed (the linger is the kernel's timer, so this test takes
    /// the real 5 s).
    #[test]
    fn a_stuck_send_is_cancelled_after_the_linger() {
        run(POOL_BUFS, |d| async move {
            let (s, _peer) = pair();
            let (rd, mut wr) = d.stream(s).unwrap();
            let data = vec![1u8; 1 << 20];
            // Fill the peer's window and the socket's send buffer, then the ring's bound.
            while poll_fn(|cx| Poll::Ready(wr.poll_write_now(cx, &data)))
                .await
                .is_ready()
            {
                tokio::task::yield_now().await;
            }
            drop((rd, wr));
            let start = std::time::Instant::now();
            until(|| live(&d) == 0).await;
            assert!(start.elapsed() >= LINGER - Duration::from_millis(100));
        });
    }
}
