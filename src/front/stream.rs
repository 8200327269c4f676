//! The client stream of a gateway's connection, wrapped: it tells the head clock when a
//! request head starts and when a write to the client is stuck, gives back the bytes read
//! while looking for the HTTP/2 preface (`h2c`), and says h2 by ALPN for an h2c connection.
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::HeadClock;

/// The client stream, noting when a request head starts.
#[derive(Debug)]
pub struct Timed {
    pub(super) inner: Stream,
    pub clock: Arc<HeadClock>,
    /// HTTP/1: a client that leaves mid-head is let go quietly by the connection loop
    /// (Pingora would log each one as an error) instead of seeing the end of stream.
    pub(super) quiet_exit: bool,
    /// Bytes read while looking for the HTTP/2 preface (`h2c`), given back before the socket's.
    pub(super) replay: Vec<u8>,
    /// The connection began with the HTTP/2 preface: reported as ALPN h2 so Pingora speaks h2.
    pub(super) h2c: bool,
    /// HTTP/2: the frames read, for the connection loop's limits.
    pub(super) frames: Option<super::h2::FrameScan>,
}

impl Timed {
    /// The head clock of the connection a session reads from, when it is one of ours.
    pub fn clock_of(stream: &Stream) -> Option<&HeadClock> {
        (**stream)
            .as_any()
            .downcast_ref::<Timed>()
            .map(|t| &*t.clock)
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let cap = self.clock.read_cap.load(Relaxed);
        let r = if cap > 0 && buf.remaining() > cap && self.replay.is_empty() {
            capped_read(Pin::new(&mut self.inner), cx, buf, cap)
        } else if self.replay.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.drain(..n);
            if self.replay.is_empty() {
                // Given back whole: an idle connection keeps no buffer.
                self.replay = Vec::new();
            }
            Poll::Ready(Ok(()))
        };
        let Poll::Ready(res) = &r else {
            return r;
        };
        let read_some = res.is_ok() && buf.filled().len() > before;
        if read_some && !self.quiet_exit {
            // HTTP/2: the frames, for the connection loop (see Front::serve_h2).
            let this = &mut *self;
            let got = &buf.filled()[before..];
            if let Some(frames) = this.frames.as_mut() {
                frames.scan(got, &this.clock);
            }
        } else if read_some {
            self.clock.on_read(&buf.filled()[before..]);
        } else if self.quiet_exit
            && self.clock.waiting.load(Relaxed)
            && self.clock.started.load(Relaxed) != 0
        {
            // Mid-head: the connection loop, polled right after this, ends it quietly.
            self.clock.gone.store(true, Relaxed);
            return Poll::Pending;
        }
        r
    }
}

/// Reads at most `cap` bytes (and at most 16 KiB) into `buf`. Out of line: its buffer would
/// otherwise grow every read's stack frame.
#[inline(never)]
fn capped_read(
    inner: Pin<&mut Stream>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    cap: usize,
) -> Poll<std::io::Result<()>> {
    let mut tmp = [0u8; 16 * 1024];
    let n = cap.min(tmp.len());
    let mut small = ReadBuf::new(&mut tmp[..n]);
    match inner.poll_read(cx, &mut small) {
        Poll::Ready(Ok(())) => {
            buf.put_slice(small.filled());
            Poll::Ready(Ok(()))
        }
        other => other,
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.clock.on_write(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.clock.on_write(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.clock.on_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Timed {
    async fn shutdown(&mut self) {
        (*self.inner).shutdown().await
    }
}

impl UniqueID for Timed {
    fn id(&self) -> UniqueIDType {
        (*self.inner).id()
    }
}

impl Ssl for Timed {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        (*self.inner).get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        (*self.inner).get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        if self.h2c {
            return Some(ALPN::H2);
        }
        (*self.inner).selected_alpn_proto()
    }
}

impl GetTimingDigest for Timed {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        (*self.inner).get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        (*self.inner).get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        (*self.inner).get_write_pending_time()
    }
}

impl GetProxyDigest for Timed {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        (*self.inner).get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        (*self.inner).set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Timed {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        (*self.inner).get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        (*self.inner).set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Timed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        (*self.inner).try_peek(buf).await
    }
}

/// GOAWAY, last stream 0, PROTOCOL_ERROR: the answer of an HTTP/2-only listener to bytes
/// that are not the preface.
pub(super) const GOAWAY_PROTOCOL_ERROR: [u8; 17] =
    [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes are the HTTP/2 preface or cannot be: (is h2, bytes read).
/// Pingora's own check waits for 24 bytes, which a short HTTP/1.0 request never sends.
/// `None`: the client left first.
pub(super) async fn sniff_preface(stream: &mut Stream) -> Option<(bool, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 24];
    loop {
        let want = H2_PREFACE.len() - got.len();
        let n = stream.read(&mut buf[..want]).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        if !H2_PREFACE.starts_with(&got) {
            return Some((false, got));
        }
        if got.len() == H2_PREFACE.len() {
            return Some((true, got));
        }
    }
}

/// Writes GOAWAY(PROTOCOL_ERROR) and closes with a lingering close: bytes of the request left
/// unread would make the close a reset, which may reach the client before the GOAWAY does.
pub(super) async fn goaway_and_close(mut stream: Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(&GOAWAY_PROTOCOL_ERROR).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 512];
    let drain = async {
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}
