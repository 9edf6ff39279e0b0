//! Socket reads and writes on the hot path: clients' and shards'.
//!
//! tokio's `AsyncRead`/`AsyncWrite` for a `TcpStream` run its readiness bookkeeping (the
//! cooperative budget in a thread-local, the waker check) on every call, then libc's `recv`
//! or `send`, which in a multi-threaded process enter and leave asynchronous cancellation
//! around the system call. In callgrind that is about 220 instructions per read and 180 per
//! write, for a GET that costs about 4,300 in all.
//!
//! On plain TCP, sessions and shard connections instead ask tokio only whether the socket is
//! ready (`try_io`: one atomic load), make the system call themselves (rustix, no libc
//! wrapper, where the buffer allows), and register their waker with tokio only when the
//! socket is not ready. Readiness stays tokio's: a
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

/// The read side of a connection.
pub trait ReadSide {
    /// Appends what can be read now to `buf` (which must have spare capacity): the bytes
    /// read, 0 at end of stream. `Pending` registers `cx`'s waker for readability.
    fn poll_read_vec(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>)
    -> Poll<io::Result<usize>>;

    /// The same into a `BytesMut` (a session's own buffer for a command cut across reads; a
    /// shard connection's buffer, whose replies are handed out as `Bytes`).
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;

    /// Bytes received and not yet read, where the transport can tell (a diagnostic).
    fn unread(&self) -> Option<u64> {
        None
    }
}

/// The write side of a connection: `AsyncWrite`, and one non-blocking write for the hot path.
pub trait WriteSide: AsyncWrite + Unpin {
    fn poll_write_now(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }
}

/// Any other stream (TLS) goes through tokio's own read path.
impl<T: AsyncRead> ReadSide for tokio::io::ReadHalf<T> {
    fn poll_read_vec(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        poll_read_buf(self, cx, buf)
    }

    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        poll_read_buf(self, cx, buf)
    }
}

/// One poll of tokio's `read_buf` into any growable buffer.
fn poll_read_buf<R: AsyncRead + Unpin, B: bytes::BufMut>(
    rd: &mut R,
    cx: &mut Context<'_>,
    buf: &mut B,
) -> Poll<io::Result<usize>> {
    let read = rd.read_buf(buf);
    tokio::pin!(read);
    read.poll(cx)
}

impl<T: AsyncWrite> WriteSide for tokio::io::WriteHalf<T> {}

/// The read side of a plain TCP connection.
pub struct PlainRead<'a>(pub &'a TcpStream);

/// The write side of a plain TCP connection.
pub struct PlainWrite<'a>(pub &'a TcpStream);

/// Runs `op` if tokio has seen the socket ready for `interest`. A `WouldBlock`, or a result
/// that `short` calls short (the socket is drained, or full), clears tokio's readiness, as
/// tokio's own reads and writes do. `Pending` registers `cx`'s waker.
#[inline]
fn poll_op(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<usize>,
    short: impl Fn(usize) -> bool,
) -> Poll<io::Result<usize>> {
    loop {
        let mut done = None;
        let res = stream.try_io(interest, || {
            loop {
                match op() {
                    Ok(n) if short(n) => {
                        done = Some(n);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
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

/// A rustix result as a std one.
fn std_io(r: rustix::io::Result<usize>) -> io::Result<usize> {
    r.map_err(Into::into)
}

impl ReadSide for PlainRead<'_> {
    fn unread(&self) -> Option<u64> {
        rustix::io::ioctl_fionread(self.0).ok()
    }

    #[inline]
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
                let spare = rustix::buffer::spare_capacity(buf);
                std_io(rustix::net::recv(stream, spare, RecvFlags::empty()).map(|(n, _)| n))
            },
            |n| n > 0 && n < room,
        )
    }

    #[inline]
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        // tokio's `try_read_buf` fills the uninitialized spare capacity (through libc's recv);
        // `poll_op` around it handles readiness as above.
        let stream = self.0;
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let room = buf.capacity() - buf.len();
        poll_op(
            stream,
            cx,
            Interest::READABLE,
            || stream.try_read_buf(buf),
            |n| n > 0 && n < room,
        )
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
        let r = rustix::net::shutdown(self.0, rustix::net::Shutdown::Write);
        Poll::Ready(r.map_err(Into::into))
    }
}

impl WriteSide for PlainWrite<'_> {
    #[inline]
    fn poll_write_now(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let stream = self.0;
        poll_op(
            stream,
            cx,
            Interest::WRITABLE,
            || std_io(rustix::net::send(stream, buf, SendFlags::NOSIGNAL)),
            |n| n < buf.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout(Duration::from_secs(5), f)
    }

    /// A short read clears tokio's readiness; bytes that arrive later must still wake the
    /// reader (a lost wake-up would hang here), into either buffer type. The reader runs in
    /// its own task, so only its own waker can wake it.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_after_a_short_read_are_woken() {
        let (server, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut rd = PlainRead(&server);
            let mut buf = Vec::with_capacity(1024);
            let n = std::future::poll_fn(|cx| rd.poll_read_vec(cx, &mut buf)).await?;
            assert_eq!((n, &buf[..]), (3, &b"abc"[..]));
            let mut bytes = BytesMut::new();
            let n = std::future::poll_fn(|cx| rd.poll_read_bytes(cx, &mut bytes)).await?;
            assert_eq!((n, &bytes[..]), (4, &b"defg"[..]));
            buf.clear();
            // End of stream reads as 0.
            std::future::poll_fn(|cx| rd.poll_read_vec(cx, &mut buf)).await
        });
        client.write_all(b"abc").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"defg").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.shutdown().await.unwrap();
        assert_eq!(within(reader).await.unwrap().unwrap().unwrap(), 0);
    }

    /// A write that fills the socket waits, and completes once the peer reads: nothing is
    /// lost or duplicated across the short writes. The writer runs in its own task.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_to_a_full_socket_resume_when_the_peer_reads() {
        let (server, mut client) = pair().await;
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut wr = PlainWrite(&server);
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        // Let the writer fill the socket buffers first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        within(client.read_to_end(&mut got)).await.unwrap().unwrap();
        within(writer).await.unwrap().unwrap();
        assert!(
            got == data,
            "{} bytes of {} arrived intact",
            got.len(),
            data.len()
        );
    }
}
