//! HTTP/2 from clients (TLS with ALPN h2, or h2c): the connection's accept loop, run here
//! instead of Pingora's so the gateway's client limits hold as they do for HTTP/1.
//!
//! Pingora's loop applies none of them: no `header_timeout` (a HEADERS block whose bytes trickle
//! in holds the connection), no `body_timeout` (an h2 session has no read timeout: a stream
//! that sends a DATA byte a minute holds its upstream connection), no request limit per
//! connection, and Pingora's own stream and header-list defaults. Here:
//!
//! - the h2 codec's settings come from `[server]`: `h2_max_concurrent_streams`,
//!   `max_header_size` (the decoded header list: a larger one gets h2's 431), 64 KiB stream
//!   and connection windows (what one client can make the gateway buffer of its bodies) and a
//!   64 KiB send buffer per stream (what a slow reader makes it hold of an answer);
//! - `FrameScan` (in the stream wrapper) reads the frame headers as they pass: a header block
//!   (HEADERS and its CONTINUATIONs) must be complete within `header_timeout` of its first
//!   byte, and control frames (SETTINGS, PING, PRIORITY, unknown types) and client resets
//!   have a rate; past it, GOAWAY(ENHANCE_YOUR_CALM). The h2 crate bounds the rest: resets
//!   before accept (rapid reset), streams it resets itself (MadeYouReset), CONTINUATION
//!   count, empty and tiny DATA frames, one pending PING and SETTINGS answer;
//! - each stream's task carries a `StreamClock`: once the gateway starts reading a request
//!   body (the proxy, connected upstream; request_buffering; an aggregate), a stream whose
//!   body has not moved for `body_timeout` is reset. Requests answered without their body
//!   (static files, cache hits, plugins' answers) are never timed. While the proxy waits for
//!   the upstream to take what it read (Pingora reads no more then), the clock runs too: an
//!   upstream slower than `body_timeout` to take a piece, within its own `write_timeout`, is
//!   taken for a stalled client;
//! - after `max_requests_per_connection` streams, a graceful GOAWAY;
//! - idle (no stream open) for `keepalive_timeout`: closed.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{default_h2_options, handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use tokio::sync::Notify;

use super::{ClientLimits, Front, HeadClock};
use crate::upstream::now_ms;

/// What one stream may make the gateway buffer: its window for request bodies, the send
/// buffer for answers.
const STREAM_BUFFER: u32 = 64 * 1024;
/// Control frames (SETTINGS, PING, PRIORITY, unknown types) a client may send in a second.
const CONTROLS_PER_SEC: u32 = 1000;
/// Streams a client may reset in a second: a browser leaving a page cancels what it had open
/// (up to h2_max_concurrent_streams, 128 by default); rapid reset sends thousands.
const RESETS_PER_SEC: u32 = 400;
/// Streams refused at acceptance (a forbidden byte in the target, bad framing) per connection.
const MALFORMED_PER_CONN: u32 = 32;
/// Streams the gateway may reset for a client's protocol error (and refusals past the stream
/// limit) over a connection's life, h2 counting them; past it, GOAWAY.
const LOCAL_RESETS_PER_CONN: usize = 256;
/// How long a connection closed for cause has to flush its GOAWAY.
const DRAIN: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The request body clock of the HTTP/2 stream the current task serves.
    static STREAM: Arc<StreamClock>;
}

/// When an HTTP/2 stream's request body last moved.
#[derive(Default)]
struct StreamClock {
    /// A body is expected and not complete.
    open: AtomicBool,
    last: AtomicU64,
    opened: Notify,
}

/// The proxy has the request head of an HTTP/2 stream: whether a body follows. Nothing
/// outside an HTTP/2 stream's task.
pub fn body_expected(yes: bool) {
    if yes {
        let _ = STREAM.try_with(|s| {
            s.last.store(now_ms(), Relaxed);
            s.open.store(true, Relaxed);
            s.opened.notify_one();
        });
    }
}

/// The proxy read a piece of an HTTP/2 stream's request body (`end`: its last).
pub fn body_read(end: bool) {
    let _ = STREAM.try_with(|s| {
        if end {
            s.open.store(false, Relaxed);
        } else {
            s.last.store(now_ms(), Relaxed);
        }
    });
}

/// Resolves once a body expected on the stream has not moved for `timeout`.
async fn body_stalled(s: &StreamClock, timeout: Duration) {
    let limit = timeout.as_millis() as u64;
    loop {
        if !s.open.load(Relaxed) {
            s.opened.notified().await;
            continue;
        }
        let due = s.last.load(Relaxed) + limit;
        let now = now_ms();
        if now >= due {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due - now)).await;
    }
}

/// The frames of an HTTP/2 connection, read as they pass (headers only, no payload copied).
#[derive(Debug)]
pub(super) struct FrameScan {
    preface_left: u8,
    head: [u8; 9],
    head_len: u8,
    payload_left: u32,
    kind: u8,
    flags: u8,
    /// Inside a header block: from a HEADERS frame's first byte to the end of the frame
    /// (HEADERS or CONTINUATION) that has END_HEADERS.
    in_block: bool,
    /// A HEADERS frame began in the current read (blocks do not interleave: the block open at
    /// a read's end is the last one begun).
    began: bool,
    controls: u32,
    resets: u32,
    /// `now_ms()` when the current rate window began.
    window: u64,
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

impl FrameScan {
    pub(super) fn new() -> FrameScan {
        FrameScan {
            preface_left: 24,
            head: [0; 9],
            head_len: 0,
            payload_left: 0,
            kind: 0,
            flags: 0,
            in_block: false,
            began: false,
            controls: 0,
            resets: 0,
            window: now_ms(),
        }
    }

    pub(super) fn scan(&mut self, mut bytes: &[u8], clock: &HeadClock) {
        let was_open = self.in_block;
        self.began = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = bytes.len().min(self.preface_left as usize);
                self.preface_left -= n as u8;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_end();
                }
            } else {
                let at = self.head_len as usize;
                let n = bytes.len().min(9 - at);
                self.head[at..at + n].copy_from_slice(&bytes[..n]);
                self.head_len += n as u8;
                bytes = &bytes[n..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    let h = self.head;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    self.kind = h[3];
                    self.flags = h[4];
                    self.frame_start(clock);
                    if self.payload_left == 0 {
                        self.frame_end();
                    }
                }
            }
        }
        if self.in_block && (self.began || !was_open) {
            // A block still open at the end of this read, begun in it: its clock starts now
            // (one begun in an earlier read keeps its time).
            clock.h2_head_since.store(now_ms().max(1), Relaxed);
            clock.h2_event.notify_one();
        } else if !self.in_block && was_open {
            clock.h2_head_since.store(0, Relaxed);
        }
    }

    fn frame_start(&mut self, clock: &HeadClock) {
        match self.kind {
            HEADERS => {
                self.in_block = true;
                self.began = true;
            }
            DATA | CONTINUATION | WINDOW_UPDATE | GOAWAY => {}
            RST_STREAM => {
                self.resets += 1;
                if self.resets >= RESETS_PER_SEC {
                    self.rate_check(clock);
                }
            }
            SETTINGS | PING if self.flags & ACK != 0 => {}
            _ => {
                self.controls += 1;
                if self.controls >= CONTROLS_PER_SEC {
                    self.rate_check(clock);
                }
            }
        }
    }

    fn frame_end(&mut self) {
        if matches!(self.kind, HEADERS | CONTINUATION) && self.flags & END_HEADERS != 0 {
            self.in_block = false;
        }
    }

    /// A count reached its limit: abuse if within a second of the window's start, else a new
    /// window.
    fn rate_check(&mut self, clock: &HeadClock) {
        let now = now_ms();
        if now < self.window + 1000 {
            clock.h2_abuse.store(true, Relaxed);
            clock.h2_event.notify_one();
        } else {
            self.window = now;
            self.controls = 0;
            self.resets = 0;
        }
    }
}

/// Resolves when the connection sent frames past their rate, or a header block has been
/// coming for longer than `header_timeout`.
async fn heads_overdue(clock: &HeadClock, header_timeout: Duration) {
    let limit = header_timeout.as_millis() as u64;
    loop {
        if clock.h2_abuse.load(Relaxed) {
            return;
        }
        match clock.h2_head_since.load(Relaxed) {
            0 => clock.h2_event.notified().await,
            since => {
                let now = now_ms();
                if now >= since + limit {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(since + limit - now)).await;
            }
        }
    }
}

/// Streams in progress on a connection, for its idle timeout.
#[derive(Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

struct Guard(Arc<Active>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_one();
        }
    }
}

async fn idle_for(active: &Active, timeout: Duration) {
    loop {
        while active.count.load(Relaxed) != 0 {
            active.idle.notified().await;
        }
        tokio::time::sleep(timeout).await;
        if active.count.load(Relaxed) == 0 {
            return;
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Front<A> {
    /// One HTTP/2 connection, `stream` wrapped in `Timed` with a `FrameScan` that reports to
    /// `clock`.
    pub(super) async fn serve_h2(
        &self,
        stream: Stream,
        clock: Arc<HeadClock>,
        conn_start: Instant,
        shutdown: &ShutdownWatch,
        limits: ClientLimits,
    ) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let mut options = default_h2_options();
        options
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(limits.max_header_size as u32)
            .initial_window_size(STREAM_BUFFER)
            .initial_connection_window_size(STREAM_BUFFER)
            .max_send_buffer_size(STREAM_BUFFER as usize)
            // Streams the server resets for a client's protocol error (MadeYouReset): h2's
            // default lets 1024 reach the upstream first.
            .max_local_error_reset_streams(Some(LOCAL_RESETS_PER_CONN));
        // The client preface is due within header_timeout of the connection's start (TLS
        // handshake and h2c sniffing included), and its SETTINGS frame with it.
        let deadline = conn_start + limits.header_timeout;
        let mut conn = match tokio::time::timeout_at(
            deadline.into(),
            handshake(stream, Some(options)),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                log::debug!("gateway \"{}\": HTTP/2 handshake: {e}", self.name);
                return;
            }
            Err(_) => {
                self.cut("header_timeout");
                return;
            }
        };
        // No keep-alive at all (0s) still lets a connection send its first request.
        let idle = match limits.keepalive_timeout {
            t if t.is_zero() => limits.header_timeout,
            t => t,
        };
        let active = Arc::new(Active::default());
        let mut shutdown_watch = shutdown.clone();
        let mut closing = false;
        let mut served = 0u32;
        let mut malformed = 0u32;
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown_watch.changed(), if !closing => {
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
                _ = heads_overdue(&clock, limits.header_timeout) => {
                    let (reason, why) = if clock.h2_abuse.load(Relaxed) {
                        (h2::Reason::ENHANCE_YOUR_CALM, "h2_flood")
                    } else {
                        (h2::Reason::NO_ERROR, "header_timeout")
                    };
                    log::debug!("gateway \"{}\": HTTP/2 connection closed: {why}", self.name);
                    self.cut(why);
                    conn.abrupt_shutdown(reason);
                    break;
                }
                // The first request is due within header_timeout of the connection's start,
                // as over HTTP/1 (a client that sends the preface and nothing more included).
                _ = idle_for(&active, if served == 0 {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    idle
                }) => {
                    if served == 0 {
                        self.cut("header_timeout");
                    }
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    break;
                }
                next = HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
            };
            match next {
                Err(e) => {
                    // Mostly clients that close without GOAWAY, and the h2 crate's own
                    // refusals (floods, malformed frames), each with its GOAWAY sent.
                    if let Some(why) = refusal(&e) {
                        self.cut(why);
                    }
                    log::debug!("gateway \"{}\": HTTP/2 connection: {e}", self.name);
                    return;
                }
                Ok(None) => return,
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MALFORMED_PER_CONN {
                        self.cut("h2_malformed");
                        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        break;
                    }
                }
                Ok(Some(H2Accept::Session(session))) => {
                    served += 1;
                    if served >= limits.max_requests_per_connection && !closing {
                        conn.graceful_shutdown();
                        closing = true;
                    }
                    active.count.fetch_add(1, Relaxed);
                    let guard = Guard(active.clone());
                    let app = self.proxy.clone();
                    let shutdown = shutdown.clone();
                    let body_timeout = limits.body_timeout;
                    let name = self.name.clone();
                    let cut = self.cuts[CUT_BODY].clone();
                    let sc = Arc::new(StreamClock::default());
                    // Spread as Pingora spreads them (its runtimes without work stealing too).
                    pingora_runtime::current_handle().spawn(STREAM.scope(sc.clone(), async move {
                        let _guard = guard;
                        let session = ServerSession::new_http2(session);
                        tokio::select! {
                            _ = app.process_new_http(session, &shutdown) => {}
                            _ = body_stalled(&sc, body_timeout) => {
                                // Dropping the session resets the stream (CANCEL) and the
                                // upstream connection with it.
                                cut.inc();
                                log::debug!(
                                    "gateway \"{name}\": HTTP/2 request body idle for body_timeout, stream reset"
                                );
                            }
                        }
                    }));
                }
            }
        }
        let closed = futures::future::poll_fn(|cx| conn.poll_closed(cx));
        let _ = tokio::time::timeout(DRAIN, closed).await;
    }
}

/// The h2 crate ended the connection with its own GOAWAY: a flood it bounds
/// (ENHANCE_YOUR_CALM), or a client's protocol error.
fn refusal(e: &pingora::Error) -> Option<&'static str> {
    let h2e = e.cause.as_ref()?.downcast_ref::<h2::Error>()?;
    if !h2e.is_go_away() || h2e.is_remote() {
        return None;
    }
    match h2e.reason()? {
        h2::Reason::ENHANCE_YOUR_CALM => Some("h2_flood"),
        h2::Reason::NO_ERROR => None,
        _ => Some("h2_malformed"),
    }
}

/// Index of `body_timeout` in `Front::cuts`.
pub(super) const CUT_BODY: usize = 1;
