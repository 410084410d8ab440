//! Frames over a byte stream. Generic over the stream, so one implementation serves a
//! quinn stream and a TLS-over-TCP stream.
//!
//! [`FrameReader`] reads a length prefix, checks it against [`wire::MAX_FRAME`] before
//! reserving anything, reads the frame and decodes it; packet payloads come out as slices
//! of the read buffer. [`FrameWriter`] encodes a frame's head into a small reused buffer and
//! hands the payload to the sink as its own `Bytes`, so a sink that can take ownership
//! (quinn's `write_chunk`) sends it without a copy.
//!
//! A byte stream that carries several framed streams one after another (a reused
//! TLS-over-TCP connection) ends each with [`wire::END_MARK`], a length prefix no frame
//! can have; [`EndMarks`] says whether a stream accepts it.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::filter::{Attached, FrameAction, park};
use crate::wire::{self, Frame, WireError};

/// Why a framed stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FramedError {
    /// The peer sent bytes that are not a valid frame; the stream is unusable.
    #[error("malformed frame: {0}")]
    Malformed(#[from] WireError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("stream: {0}")]
    Io(#[from] io::Error),
}

/// A byte stream under a [`FrameReader`] that may end a framed stream with
/// [`wire::END_MARK`] and carry more after it. The defaults refuse the mark (a zero length
/// prefix is then a malformed frame).
pub trait EndMarks {
    /// Whether an end mark ends the framed stream on this byte stream.
    fn accepts_end_mark(&self) -> bool {
        false
    }
    /// Called once the end mark was read; `rest` holds the bytes read after it, which the
    /// byte stream may take (they belong to whatever it carries next).
    fn end_marked(&mut self, rest: &mut BytesMut) {
        let _ = rest;
    }
    /// Called when the reader is dropped before the end mark, with the bytes it read but
    /// did not decode (the byte stream may still need them to find the mark).
    fn unread(&mut self, buf: &mut BytesMut) {
        let _ = buf;
    }
}

impl EndMarks for tokio::io::DuplexStream {}
impl<T> EndMarks for tokio::io::ReadHalf<T> {}
impl EndMarks for quinn::RecvStream {}

/// Reads frames from an `AsyncRead`.
#[derive(Debug)]
pub struct FrameReader<R: EndMarks> {
    inner: R,
    buf: BytesMut,
    /// The end mark was read: the stream is over, whatever follows is not ours.
    ended: bool,
}

impl<R: AsyncRead + EndMarks + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        Self::with_buffer(inner, BytesMut::new())
    }

    /// Wraps a stream whose first bytes were already read into `buf`.
    pub(crate) fn with_buffer(inner: R, buf: BytesMut) -> Self {
        FrameReader {
            inner,
            buf,
            ended: false,
        }
    }

    /// The next frame, or `None` when the stream ended cleanly between frames (the byte
    /// stream ended, or an end mark where the byte stream accepts one).
    pub async fn recv(&mut self) -> Result<Option<Frame>, FramedError> {
        loop {
            if self.try_end() {
                return Ok(None);
            }
            if self.buf.len() >= wire::LEN_PREFIX {
                let prefix: [u8; wire::LEN_PREFIX] =
                    self.buf[..wire::LEN_PREFIX].try_into().unwrap_or_default();
                let need = wire::LEN_PREFIX + wire::frame_len(prefix)?;
                if self.buf.len() >= need {
                    return Ok(wire::decode_frame(&mut self.buf)?);
                }
                // The limit is checked; reserving the rest of this frame is bounded.
                self.buf.reserve(need - self.buf.len());
            } else {
                self.buf.reserve(64 << 10);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FramedError::Truncated)
                };
            }
        }
    }

    /// Whether the stream has ended at an end mark, taking a mark that is already
    /// buffered (no IO). A service that knows the peer sent its last frame calls this
    /// right before it ends its own half and lets go of the stream: on a reused TCP
    /// connection the opener then hears with that end that the connection is kept, and
    /// may start its next stream on it at once (which waits until this one is dropped).
    pub fn try_end(&mut self) -> bool {
        if !self.ended && self.buf.starts_with(&wire::END_MARK) && self.inner.accepts_end_mark() {
            bytes::Buf::advance(&mut self.buf, wire::LEN_PREFIX);
            self.ended = true;
            self.inner.end_marked(&mut self.buf);
        }
        self.ended
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: EndMarks> Drop for FrameReader<R> {
    fn drop(&mut self) {
        if !self.ended && !self.buf.is_empty() {
            self.inner.unread(&mut self.buf);
        }
    }
}

/// Where [`FrameWriter`] puts bytes: an owned-buffer sink.
pub trait ByteSink: Send {
    /// Sends all of `bytes`; a sink may hold them until [`flush_bytes`](Self::flush_bytes)
    /// or [`finish`](Self::finish).
    fn send_bytes(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Pushes out anything buffered.
    fn flush_bytes(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Pushes out anything held and ends the stream (no more frames).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Any tokio `AsyncWrite` as a [`ByteSink`] (copies into the writer, as TLS must anyway).
#[derive(Debug)]
pub struct IoSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> ByteSink for IoSink<W> {
    async fn send_bytes(&mut self, bytes: Bytes) -> io::Result<()> {
        self.0.write_all(&bytes).await
    }
    async fn flush_bytes(&mut self) -> io::Result<()> {
        self.0.flush().await
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

impl ByteSink for quinn::SendStream {
    async fn send_bytes(&mut self, bytes: Bytes) -> io::Result<()> {
        self.write_chunk(bytes).await.map_err(io::Error::from)
    }
    async fn flush_bytes(&mut self) -> io::Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        quinn::SendStream::finish(self).map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))
    }
}

/// Writes frames to a [`ByteSink`].
#[derive(Debug)]
pub struct FrameWriter<S> {
    /// `None` once a test filter stalled (parked) or killed the stream.
    inner: Option<S>,
    head: BytesMut,
    filter: Option<Attached>,
    stalled: bool,
}

fn killed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "stream killed by a test filter")
}

impl<S: ByteSink + 'static> FrameWriter<S> {
    /// Wraps a sink.
    pub fn new(inner: S) -> Self {
        FrameWriter {
            inner: Some(inner),
            head: BytesMut::with_capacity(4096),
            filter: None,
            stalled: false,
        }
    }

    /// Puts a test filter on this stream's frames.
    pub(crate) fn with_filter(mut self, filter: Option<Attached>) -> Self {
        self.filter = filter;
        self
    }

    fn sink(&mut self) -> io::Result<&mut S> {
        self.inner.as_mut().ok_or_else(killed)
    }

    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), FramedError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Sends one frame and ends the stream: the last thing a side has to say. A link that
    /// holds what it is fed (TLS over TCP) writes the frame and the end mark at once.
    pub async fn send_last(&mut self, frame: &Frame) -> Result<(), FramedError> {
        self.feed(frame).await?;
        self.finish().await
    }

    /// Sends one frame without flushing (for a batch; call [`flush`](Self::flush) after).
    pub async fn feed(&mut self, frame: &Frame) -> Result<(), FramedError> {
        if self.stalled {
            return Ok(());
        }
        let mut altered = None;
        if let Some(a) = &self.filter {
            match a.filter.on_frame(a.hop, frame) {
                FrameAction::Pass => {}
                FrameAction::Delay(d) => tokio::time::sleep(d).await,
                FrameAction::Drop => return Ok(()),
                FrameAction::Corrupt => altered = corrupt(frame),
                FrameAction::Stall => {
                    self.stalled = true;
                    if let Some(sink) = self.inner.take() {
                        park(Box::new(sink));
                    }
                    return Ok(());
                }
                FrameAction::Kill => {
                    self.inner = None;
                    return Err(killed().into());
                }
            }
        }
        let frame = altered.as_ref().unwrap_or(frame);
        if self.head.capacity() < 4096 {
            self.head.reserve(4096);
        }
        let payload = frame.encode_head(&mut self.head);
        let head = self.head.split().freeze();
        let sink = self.sink()?;
        sink.send_bytes(head).await?;
        if let Some(p) = payload.filter(|p| !p.is_empty()) {
            sink.send_bytes(p).await?;
        }
        Ok(())
    }

    /// Flushes frames fed so far.
    pub async fn flush(&mut self) -> Result<(), FramedError> {
        if self.stalled {
            return Ok(());
        }
        Ok(self.sink()?.flush_bytes().await?)
    }

    /// Ends the stream after the frames sent so far.
    pub async fn finish(&mut self) -> Result<(), FramedError> {
        if self.stalled {
            return Ok(());
        }
        Ok(self.sink()?.finish().await?)
    }

    /// The underlying sink; `None` once a test filter stalled or killed the stream.
    pub fn get_mut(&mut self) -> Option<&mut S> {
        self.inner.as_mut()
    }
}

/// A packet with one payload byte flipped; `None` for other frames.
fn corrupt(frame: &Frame) -> Option<Frame> {
    let Frame::Packet(p) = frame else { return None };
    if p.payload.is_empty() {
        return None;
    }
    let mut p = p.clone();
    let mut data = p.payload.to_vec();
    let mid = data.len() / 2;
    data[mid] ^= 0x5a;
    p.payload = Bytes::from(data);
    Some(Frame::Packet(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockId, GenStamp};
    use crate::wire::{Ack, ErrorFrame, Packet, PacketFlags, ReadBlock, Status, TrafficClass};

    #[tokio::test]
    async fn frames_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(IoSink(a));
        let mut r = FrameReader::new(b);
        let frames = vec![
            Frame::Ack(Ack {
                seq: 1,
                statuses: vec![Status::Success],
            }),
            Frame::Packet(Packet {
                seq: 2,
                offset: 0,
                flags: PacketFlags::default(),
                data_len: 100_000,
                crcs: vec![0; 25],
                payload: Bytes::from(vec![7u8; 100_000]),
            }),
            Frame::ReadBlock(ReadBlock {
                block: BlockId(1),
                genstamp: GenStamp(1),
                offset: 0,
                len: 1,
                class: TrafficClass::Read,
                compression: wire::Compression::None,
            }),
            Frame::Error(ErrorFrame {
                status: Status::Rejected,
                message: "no".into(),
            }),
        ];
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in &sent {
                w.send(f).await.unwrap();
            }
            w.finish().await.unwrap();
        });
        for f in &frames {
            assert_eq!(r.recv().await.unwrap().as_ref(), Some(f));
        }
        assert!(r.recv().await.unwrap().is_none(), "clean end");
        writer.await.unwrap();
    }

    /// A pipe that takes end marks and keeps what came after one.
    struct Marked(tokio::io::DuplexStream, Option<BytesMut>);

    impl AsyncRead for Marked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl EndMarks for Marked {
        fn accepts_end_mark(&self) -> bool {
            true
        }
        fn end_marked(&mut self, rest: &mut BytesMut) {
            self.1 = Some(rest.split());
        }
    }

    #[tokio::test]
    async fn an_end_mark_already_read_is_taken_without_io() {
        let ack = Frame::Ack(Ack {
            seq: 1,
            statuses: vec![Status::Success],
        });
        let mut bytes = BytesMut::new();
        ack.encode(&mut bytes);
        // Two frames, the end mark, and what the peer sends next, in one write.
        let mut all = [&bytes[..], &bytes[..], &wire::END_MARK[..], b"next"].concat();
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&all).await.unwrap();
        let mut r = FrameReader::new(Marked(b, None));
        assert!(!r.try_end(), "nothing read yet");
        assert_eq!(r.recv().await.unwrap().as_ref(), Some(&ack));
        assert!(!r.try_end(), "a frame before the mark");
        assert_eq!(r.inner.1, None);
        assert_eq!(r.recv().await.unwrap().as_ref(), Some(&ack));
        assert!(r.try_end());
        assert_eq!(
            r.inner.1.as_deref(),
            Some(&b"next"[..]),
            "bytes after the mark"
        );
        assert!(r.try_end(), "ended stays ended");
        assert!(r.recv().await.unwrap().is_none());
        // A pipe that takes no end marks: the same bytes are no end.
        all.truncate(2 * bytes.len() + wire::LEN_PREFIX);
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&all).await.unwrap();
        let mut r = FrameReader::new(b);
        r.recv().await.unwrap();
        r.recv().await.unwrap();
        assert!(!r.try_end());
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(matches!(
            r.recv().await,
            Err(FramedError::Malformed(WireError::FrameLength { .. }))
        ));

        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        a.write_all(&[10, 0, 0, 0, 1, 3]).await.unwrap();
        drop(a);
        assert!(matches!(r.recv().await, Err(FramedError::Truncated)));
    }
}
