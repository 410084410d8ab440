//! Reuse of TLS-over-TCP connections, one framed stream after another.
//!
//! A TCP connection carries one framed stream at a time. Each side ends its half of a
//! stream with [`wire::END_MARK`] instead of a FIN. When both halves of a stream are
//! dropped, the mark was sent, and no read or write failed or was cut short, the connection
//! is whole again ([`Halves`]):
//!
//! - the acceptor reads (and discards) up to the opener's mark if its service stopped
//!   reading early, tells the opener it keeps the connection ([`READY`]) and waits on it for
//!   the opener's next stream;
//! - the opener likewise reads up to the acceptor's mark, waits for [`READY`], and only then
//!   keeps the connection idle for its next stream to that peer. So an opener never reuses
//!   a connection the acceptor has given up on, and the setup of a stream costs no TCP or
//!   TLS handshake once a connection is idle.
//!
//! Anything else — an IO error, a half dropped without its mark, a write cut short by a
//! cancelled future, more than [`DRAIN_LIMIT`] bytes to discard, a peer slower than the
//! deadline — closes the connection, as one connection per stream always did. This module
//! knows nothing of what the frames mean.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::framed::{ByteSink, EndMarks};
use crate::wire;

/// A TLS-over-TCP connection (either side).
pub(crate) type TlsTcp = tokio_rustls::TlsStream<BufferedTcp>;

/// The socket under TLS, read through a buffer: rustls reads at most 4 KiB per call
/// (its deframer grows in 4 KiB steps), which on a bare socket is a `recvfrom` per 4 KiB
/// (256 for one 1 MiB packet, 16 for a 64 KiB one). The buffer takes whatever the socket
/// holds in one call and serves rustls from memory. Writes pass straight through.
pub(crate) type BufferedTcp = tokio::io::BufReader<TcpStream>;

/// Bytes one read from a TCP socket may take.
const TCP_READ_BUF: usize = 256 << 10;

/// Wraps a connected socket for TLS.
pub(crate) fn buffered(tcp: TcpStream) -> BufferedTcp {
    tokio::io::BufReader::with_capacity(TCP_READ_BUF, tcp)
}

/// The acceptor's word that it keeps the connection for the opener's next stream: sent
/// after its own end mark, once both halves of its stream are whole again — or with the
/// end mark itself when the opener's mark was already read by then (the usual case: a
/// service answers the last request after reading it), which saves the peers a write and
/// a wake-up per stream.
pub(crate) const READY: [u8; wire::LEN_PREFIX] = [0; wire::LEN_PREFIX];

/// Most bytes of the peer's frames a side reads and discards to reach the peer's end mark
/// (a service that stopped reading early); past this the connection is closed instead.
pub(crate) const DRAIN_LIMIT: usize = 1 << 20;

/// A connection whose stream ended cleanly in both directions.
pub(crate) struct Whole {
    /// The connection.
    pub(crate) conn: TlsTcp,
    /// `Some(bytes read after the peer's end mark)` once the mark was read; `None` when
    /// the local service stopped reading before it.
    pub(crate) rest: Option<BytesMut>,
    /// Bytes the local service read but did not decode, before the mark.
    pub(crate) unread: BytesMut,
    /// The acceptor sent [`READY`] with its end mark.
    pub(crate) ready_sent: bool,
}

type OnWhole = Box<dyn FnOnce(Whole) + Send>;

struct State {
    read: Option<ReadHalf<TlsTcp>>,
    write: Option<WriteHalf<TlsTcp>>,
    dropped: u8,
    rest: Option<BytesMut>,
    unread: BytesMut,
    sent_end: bool,
    broken: bool,
    /// This side accepted the connection: it may send [`READY`] with its end mark.
    acceptor: bool,
    ready_sent: bool,
    on_whole: Option<OnWhole>,
}

/// Where the two halves of one stream's connection meet again when they are dropped.
pub(crate) struct Halves(Mutex<State>);

impl Halves {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broken(&self) {
        self.state().broken = true;
    }

    fn dropped(&self, read: Option<ReadHalf<TlsTcp>>, write: Option<WriteHalf<TlsTcp>>) {
        let mut s = self.state();
        s.dropped += 1;
        if read.is_some() {
            s.read = read;
        }
        if write.is_some() {
            s.write = write;
        }
        if s.dropped < 2 {
            return;
        }
        let (Some(r), Some(w)) = (s.read.take(), s.write.take()) else {
            return;
        };
        let whole = s.sent_end && !s.broken;
        if !whole {
            tracing::trace!(
                sent_end = s.sent_end,
                broken = s.broken,
                "stream did not end cleanly; closing its TCP connection"
            );
        }
        let rest = s.rest.take();
        let unread = std::mem::take(&mut s.unread);
        let on_whole = s.on_whole.take();
        let ready_sent = s.ready_sent;
        drop(s);
        if whole && let Some(f) = on_whole {
            f(Whole {
                conn: r.unsplit(w),
                rest,
                unread,
                ready_sent,
            });
        }
    }
}

/// Splits `conn` into the two halves of a stream; `on_whole` gets the connection back if
/// the stream ends cleanly in both directions. `acceptor`: this side accepted the
/// connection (it tells the opener when it keeps it).
pub(crate) fn split(
    conn: TlsTcp,
    acceptor: bool,
    on_whole: impl FnOnce(Whole) + Send + 'static,
) -> (TcpSource, TcpSink) {
    let (r, w) = tokio::io::split(conn);
    let halves = Arc::new(Halves(Mutex::new(State {
        read: None,
        write: None,
        dropped: 0,
        rest: None,
        unread: BytesMut::new(),
        sent_end: false,
        broken: false,
        acceptor,
        ready_sent: false,
        on_whole: Some(Box::new(on_whole)),
    })));
    (
        TcpSource {
            half: Some(r),
            halves: halves.clone(),
        },
        TcpSink {
            half: Some(w),
            halves,
            held: Vec::new(),
            held_bytes: 0,
            writing: false,
            ended: false,
        },
    )
}

/// The receiving half of a stream on a TLS-over-TCP connection.
pub struct TcpSource {
    half: Option<ReadHalf<TlsTcp>>,
    halves: Arc<Halves>,
}

impl AsyncRead for TcpSource {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(half) = this.half.as_mut() else {
            return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
        };
        let before = buf.filled().len();
        let r = Pin::new(half).poll_read(cx, buf);
        match &r {
            // The peer closed (or failed): nothing more can be carried.
            Poll::Ready(Err(_)) => this.halves.broken(),
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.halves.broken()
            }
            _ => {}
        }
        r
    }
}

impl EndMarks for TcpSource {
    fn accepts_end_mark(&self) -> bool {
        true
    }
    fn end_marked(&mut self, rest: &mut BytesMut) {
        self.halves.state().rest = Some(rest.split());
    }
    fn unread(&mut self, buf: &mut BytesMut) {
        self.halves.state().unread = buf.split();
    }
}

impl Drop for TcpSource {
    fn drop(&mut self) {
        self.halves.dropped(self.half.take(), None);
    }
}

/// The sending half of a stream on a TLS-over-TCP connection.
///
/// Bytes sent are held (shared, not copied) until a flush, the end of the stream, or
/// 256 KiB, and then go out in one vectored write: TLS over TCP writes to the
/// socket on every write call, so a frame's head and payload, or a last frame and the
/// end mark, sent one by one cost a syscall and a TLS record each, and could wake the
/// peer once for each.
pub struct TcpSink {
    half: Option<WriteHalf<TlsTcp>>,
    halves: Arc<Halves>,
    /// Sent but not yet written.
    held: Vec<Bytes>,
    held_bytes: usize,
    /// A write is under way; still set when its future was dropped half done.
    writing: bool,
    ended: bool,
}

/// Bytes a [`TcpSink`] holds before it writes them out without waiting for a flush.
const SINK_HOLD: usize = 256 << 10;

impl TcpSink {
    fn hold(&mut self, bytes: Bytes) -> std::io::Result<()> {
        if self.ended {
            return Err(ended());
        }
        if !bytes.is_empty() {
            self.held_bytes += bytes.len();
            self.held.push(bytes);
        }
        Ok(())
    }

    /// Writes out what is held, then flushes if asked.
    async fn write_held(&mut self, flush: bool) -> std::io::Result<()> {
        let half = self.half.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        self.writing = true;
        let mut r = Ok(());
        while r.is_ok() && !self.held.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> =
                self.held.iter().map(|b| std::io::IoSlice::new(b)).collect();
            r = match half.write_vectored(&slices).await {
                Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    consume(&mut self.held, n);
                    self.held_bytes -= n;
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        if r.is_ok() && flush {
            r = half.flush().await;
        }
        if r.is_err() {
            self.halves.broken();
        }
        self.writing = false;
        r
    }
}

fn ended() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "stream already ended")
}

/// Drops the first `n` bytes of `held`.
fn consume(held: &mut Vec<Bytes>, mut n: usize) {
    let mut whole = 0;
    for b in held.iter_mut() {
        if n < b.len() {
            bytes::Buf::advance(b, n);
            break;
        }
        n -= b.len();
        whole += 1;
    }
    held.drain(..whole);
}

impl ByteSink for TcpSink {
    async fn send_bytes(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.hold(bytes)?;
        if self.held_bytes >= SINK_HOLD {
            self.write_held(false).await?;
        }
        Ok(())
    }
    async fn flush_bytes(&mut self) -> std::io::Result<()> {
        if self.ended {
            return Err(ended());
        }
        self.write_held(true).await
    }
    async fn finish(&mut self) -> std::io::Result<()> {
        self.hold(Bytes::from_static(&wire::END_MARK))?;
        // The opener's half already ended at its mark with nothing after it (it sends its
        // next stream only after READY), and nothing read or written failed: once this
        // write is out, the stream is whole whatever the service does next.
        let ready = {
            let s = self.halves.state();
            s.acceptor && !s.broken && s.rest.as_ref().is_some_and(|r| r.is_empty())
        };
        if ready {
            self.hold(Bytes::from_static(&READY))?;
        }
        self.write_held(true).await?;
        self.ended = true;
        let mut s = self.halves.state();
        s.sent_end = true;
        s.ready_sent = ready;
        Ok(())
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        if self.writing {
            self.halves.broken();
        }
        self.halves.dropped(None, self.half.take());
    }
}

/// Reads up to the peer's end mark (skipping whole frames, at most [`DRAIN_LIMIT`] bytes
/// of them) within `within`; the connection and the bytes after the mark, or `None` to
/// close it.
pub(crate) async fn finish_reading(w: Whole, within: Duration) -> Option<(TlsTcp, BytesMut)> {
    if let Some(rest) = w.rest {
        return Some((w.conn, rest));
    }
    let (mut conn, mut buf) = (w.conn, w.unread);
    let skipped = tokio::time::timeout(within, async {
        let mut skipped = 0usize;
        loop {
            while buf.len() < wire::LEN_PREFIX {
                if conn.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
            let prefix: [u8; wire::LEN_PREFIX] = buf[..wire::LEN_PREFIX].try_into().ok()?;
            bytes::Buf::advance(&mut buf, wire::LEN_PREFIX);
            if prefix == wire::END_MARK {
                return Some(());
            }
            let mut left = wire::frame_len(prefix).ok()?;
            skipped += left;
            if skipped > DRAIN_LIMIT {
                return None;
            }
            while left > 0 {
                if buf.is_empty() && conn.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
                let n = left.min(buf.len());
                bytes::Buf::advance(&mut buf, n);
                left -= n;
            }
        }
    })
    .await;
    matches!(skipped, Ok(Some(()))).then_some((conn, buf))
}

/// The opener's side: waits for the acceptor's [`READY`] (exactly, nothing after it)
/// within `within`.
pub(crate) async fn await_ready(conn: &mut TlsTcp, mut rest: BytesMut, within: Duration) -> bool {
    let got = tokio::time::timeout(within, async {
        while rest.len() < READY.len() {
            if conn.read_buf(&mut rest).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    matches!(got, Ok(Ok(()))) && rest[..] == READY
}

/// The acceptor's side: tells the opener the connection is kept (unless `ready_sent`
/// with the end mark), then waits up to `idle` for the first bytes of its next stream.
/// The connection and those bytes, or `None` once the opener closed it or stayed silent.
pub(crate) async fn await_next(
    mut conn: TlsTcp,
    mut rest: BytesMut,
    idle: Duration,
    ready_sent: bool,
) -> Option<(TlsTcp, BytesMut)> {
    if !rest.is_empty() {
        // The opener sends its next stream only after READY.
        return None;
    }
    if !ready_sent {
        conn.write_all(&READY).await.ok()?;
        conn.flush().await.ok()?;
    }
    match tokio::time::timeout(idle, conn.read_buf(&mut rest)).await {
        Ok(Ok(n)) if n > 0 => Some((conn, rest)),
        _ => None,
    }
}

/// Whether an idle connection still looks open: nothing to read, no FIN, no error (a
/// peer that closed or restarted has sent a FIN or a reset by now).
pub(crate) fn looks_open(conn: &TlsTcp) -> bool {
    let buffered = conn.get_ref().0;
    if !buffered.buffer().is_empty() {
        // Bytes after the stream's end: not a connection to reuse.
        return false;
    }
    let tcp = buffered.get_ref();
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(parts: &[&'static [u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn a_partial_vectored_write_keeps_exactly_the_unwritten_bytes() {
        // (`hold` never keeps an empty buffer.)
        let all: &[&'static [u8]] = &[b"head", b"payload", b"end"];
        let whole: Vec<u8> = all.concat();
        for n in 0..=whole.len() {
            let mut h = held(all);
            consume(&mut h, n);
            let rest: Vec<u8> = h.iter().flat_map(|b| b.iter().copied()).collect();
            assert_eq!(rest, whole[n..], "after {n} bytes written");
            assert!(
                h.first().is_none_or(|b| !b.is_empty()),
                "after {n}: a written-out buffer stays at the front"
            );
        }
    }
}
