//! The client socket operations of the session's hot path.
//!
//! tokio's `AsyncRead`/`AsyncWrite` for a `TcpStream` run its readiness bookkeeping (the
//! cooperative budget in a thread-local, the waker check) on every call, then libc's `recv`
//! or `send`, which in a multi-threaded process enter and leave asynchronous cancellation
//! around the system call. In callgrind that is about 220 instructions per read and 180 per
//! write, for a GET that costs about 4,300 in all.
//!
//! On plain TCP the session instead asks tokio only whether the socket is ready (`try_io`:
//! one atomic load), makes the system call itself (rustix, no libc wrapper), and registers
//! its waker with tokio only when the socket is not ready. Readiness stays tokio's: a
//! `WouldBlock`, or a short read or write (the socket is drained or full, as tokio itself
//! assumes for edge-triggered epoll), clears it, so the next call waits for the next event.
//! TLS keeps the generic path: there the record layer's work dominates.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest};
use tokio::net::TcpStream;

/// Reading from a client.
pub trait ClientRead {
    /// Appends what can be read now to `buf` (which must have spare capacity): the bytes
    /// read, 0 at end of stream. `Pending` registers `cx`'s waker for readability.
    fn poll_read_vec(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>)
    -> Poll<io::Result<usize>>;

    /// The same into a `BytesMut` (the session's own buffer, for a command cut across reads).
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
}

/// Writing to a client: `AsyncWrite` for the rare paths (a full socket, shutdown), and one
/// non-blocking write for the hot path.
pub trait ClientWrite: AsyncWrite + Unpin {
    fn poll_write_now(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }
}

/// Any stream (TLS) goes through tokio's own read path.
impl<T: AsyncRead> ClientRead for tokio::io::ReadHalf<T> {
    fn poll_read_vec(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        let read = self.read_buf(buf);
        tokio::pin!(read);
        read.poll(cx)
    }

    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let read = self.read_buf(buf);
        tokio::pin!(read);
        read.poll(cx)
    }
}

impl<T: AsyncWrite> ClientWrite for tokio::io::WriteHalf<T> {}

/// The read side of a plain TCP client.
pub struct PlainRead<'a>(pub &'a TcpStream);

/// The write side of a plain TCP client.
pub struct PlainWrite<'a>(pub &'a TcpStream);

/// Runs `op` if tokio has seen the socket ready for `interest`; a `WouldBlock`, or a result
/// `short` calls short (the socket is drained or full), clears tokio's readiness. `Pending`
/// registers `cx`'s waker.
fn poll_op(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut op: impl FnMut() -> rustix::io::Result<usize>,
    short: impl Fn(usize) -> bool,
) -> Poll<io::Result<usize>> {
    loop {
        let mut done = None;
        let res = stream.try_io(interest, || {
            loop {
                match op() {
                    Ok(n) if short(n) => {
                        done = Some(n);
                        // Clears the readiness tokio recorded, as its own read and write do.
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n) => return Ok(n),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        });
        match res {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(n) = done {
                    return Poll::Ready(Ok(n));
                }
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
        // Not ready: wait for the next readiness event (or go again if one came meanwhile).
        let ready = if interest == Interest::READABLE {
            stream.poll_read_ready(cx)
        } else {
            stream.poll_write_ready(cx)
        };
        ready!(ready)?;
    }
}

impl ClientRead for PlainRead<'_> {
    fn poll_read_vec(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(buf.capacity() > buf.len());
        let stream = self.0;
        let room = buf.capacity() - buf.len();
        poll_op(
            stream,
            cx,
            Interest::READABLE,
            || {
                rustix::net::recv(
                    stream,
                    rustix::buffer::spare_capacity(buf),
                    RecvFlags::empty(),
                )
                .map(|(n, _)| n)
            },
            |n| n > 0 && n < room,
        )
    }

    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.0.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.0.poll_read_ready(cx))?;
                }
                res => return Poll::Ready(res),
            }
        }
    }
}

impl AsyncWrite for PlainWrite<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_now(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(rustix::net::shutdown(self.0, rustix::net::Shutdown::Write).map_err(Into::into))
    }
}

impl ClientWrite for PlainWrite<'_> {
    fn poll_write_now(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let stream = self.0;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        poll_op(
            stream,
            cx,
            Interest::WRITABLE,
            || rustix::net::send(stream, buf, SendFlags::NOSIGNAL),
            |n| n < buf.len(),
        )
    }
}
