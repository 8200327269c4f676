//! The client side of a gateway's listeners: how long a client may take, and how many
//! connections a gateway holds.
//!
//! Pingora's own HTTP/1 connection loop gives each read of a request head a 60 s timeout — a
//! client that sends a byte every 59 s holds its connection forever — and keeps an idle
//! keep-alive connection without limit. Gatehouse runs that loop itself, around Pingora's
//! proxy, to bound both:
//!
//! - `max_connections` per gateway: past it, new connections are closed at once (said in the
//!   log once per episode, not per connection);
//! - `header_timeout`: the whole request head, from its first byte (from the connection's
//!   start for its first request, a TLS handshake included: `crate::tls::Handshaker` runs
//!   here, after admission); a client that has not sent it in time is disconnected quietly,
//!   before any request exists;
//! - `keepalive_timeout` (idle between requests), `body_timeout` (between request body reads),
//!   `send_timeout` (between writes to a client that does not read), and
//!   `max_requests_per_connection`.
//!
//! The head clock costs a relaxed load per read: the stream wrapper notes when the first byte
//! of a head arrives, `early_request_filter` notes when the head is complete, and a timer is
//! armed only for a head that did not arrive whole in one go.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::config::H2c;
use crate::runtime::Live;
use crate::upstream::now_ms;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;

/// Called on a worker thread when one of its connections ends: the binary sets it to hand
/// the allocator's freed memory back (see main.rs). A hook, so this crate stays free of
/// `unsafe` and of the allocator's API.
pub static CONNECTION_ENDED: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

fn connection_ended() {
    if let Some(hook) = CONNECTION_ENDED.get() {
        hook();
    }
}

mod evict;
mod h2;
mod limits;
mod per_ip;
mod stream;
pub use h2::{body_expected as h2_body_expected, body_read as h2_body_read};
pub use limits::ClientLimits;
use stream::sniff_preface;
pub use stream::Timed;

/// Where a connection's current request head is, and whether a response write is stuck: set
/// by the stream (first byte, blocked writes) and by the proxy (head complete), read by the
/// connection loop's timer.
#[derive(Debug, Default)]
pub struct HeadClock {
    /// A head is expected: the next bytes read start it.
    waiting: AtomicBool,
    /// `now_ms()` of the head's first byte; `STARTED` when it came and the timer has not
    /// taken the time yet (it is polled in the same turn); 0 while none came.
    started: AtomicU64,
    done: AtomicBool,
    /// The client left (end of stream or reset) in the middle of a head.
    gone: AtomicBool,
    /// `now_ms()` since a write to the client has been waiting for room, 0 when none waits.
    write_blocked: AtomicU64,
    /// Spaces seen in the request line so far, `LINE_DONE` once its end was seen.
    line_spaces: AtomicU64,
    /// The first bytes read of the current head (up to 8, little-endian) and how many: the
    /// space count is trusted only for a line read from its start, not one begun in bytes
    /// Pingora carried over from a pipelined read.
    line_start: AtomicU64,
    line_start_len: AtomicU64,
    /// HTTP/2: bytes read so far (the preface and SETTINGS must come within header_timeout).
    h2_read: AtomicU64,
    /// HTTP/2: `now_ms()` since a header block has been coming, 0 while none is.
    h2_head_since: AtomicU64,
    /// HTTP/2: the client sent control frames or resets past their rate.
    h2_abuse: AtomicBool,
    /// HTTP/2: a header block began, or abuse: wakes the connection loop.
    h2_event: tokio::sync::Notify,
    /// Overload (`evict.rs`): where the connection sits in the registry, whether it was asked
    /// to close, the task to wake when it is, whether it ever completed a head, and when it
    /// was opened (`now_ms()`).
    reg_slot: AtomicUsize,
    evict: AtomicBool,
    evict_waker: futures::task::AtomicWaker,
    had_request: AtomicBool,
    opened: AtomicU64,
    /// HTTP/1: the most one read from the socket may return (0: no cap), set while the proxy
    /// buffers a request body of unknown length (`request_buffering`), so no read overflows
    /// what Pingora keeps of it.
    read_cap: AtomicUsize,
}

const LINE_DONE: u64 = u64::MAX;

/// A head's first byte came; its time is not read yet.
const STARTED: u64 = u64::MAX;

impl HeadClock {
    fn arm(&self) {
        self.gone.store(false, Relaxed);
        self.line_spaces.store(0, Relaxed);
        self.line_start_len.store(0, Relaxed);
        self.started.store(0, Relaxed);
        self.done.store(false, Relaxed);
        self.waiting.store(true, Relaxed);
    }

    /// The head is complete: no deadline until the next one.
    pub fn head_done(&self) {
        self.waiting.store(false, Relaxed);
        self.done.store(true, Relaxed);
        self.had_request.store(true, Relaxed);
    }

    fn on_read(&self, bytes: &[u8]) {
        if !self.waiting.load(Relaxed) {
            return;
        }
        // No clock read here (one per request showed in profiles): the timer, polled in the
        // same turn, takes the time only for a head that did not arrive whole.
        if self.started.load(Relaxed) == 0 {
            self.started.store(STARTED, Relaxed);
        }
        // The request line's spaces, as sent: Pingora percent-encodes a target with a raw
        // space in it (`GET /a b HTTP/1.1` becomes `/a%20b`) before any hook runs. A valid
        // line has two, and so has any piece of it (a head begun in pipelined bytes).
        let spaces = self.line_spaces.load(Relaxed);
        if spaces == LINE_DONE {
            return;
        }
        if self.line_start_len.load(Relaxed) == 0 {
            let n = bytes.len().min(8);
            let mut first = [0u8; 8];
            first[..n].copy_from_slice(&bytes[..n]);
            self.line_start.store(u64::from_le_bytes(first), Relaxed);
            self.line_start_len.store(n as u64, Relaxed);
        }
        let line = match memchr::memchr(b'\n', bytes) {
            Some(i) => &bytes[..i],
            None => bytes,
        };
        // A plain count (no early exit) compiles to vector instructions.
        let n = spaces + line.iter().filter(|&&b| b == b' ').count() as u64;
        let done = line.len() < bytes.len();
        self.line_spaces
            .store(if done && n <= 2 { LINE_DONE } else { n }, Relaxed);
    }

    /// Whether the current request line of `method`, as sent, had a space more than a request
    /// line has (counted only for a line read from its start: `METHOD SP`).
    pub fn extra_space(&self, method: &str) -> bool {
        let n = self.line_spaces.load(Relaxed);
        if n == LINE_DONE || n <= 2 {
            return false;
        }
        let len = self.line_start_len.load(Relaxed) as usize;
        let first = self.line_start.load(Relaxed).to_le_bytes();
        let mut want = [0u8; 8];
        let m = method.as_bytes();
        let k = (m.len() + 1).min(8).min(len);
        for (i, w) in want.iter_mut().enumerate().take(k) {
            *w = m.get(i).copied().unwrap_or(b' ');
        }
        k > 0 && first[..k] == want[..k]
    }

    /// Caps each socket read at `cap` bytes (0: no cap again).
    pub fn cap_reads(&self, cap: usize) {
        self.read_cap.store(cap, Relaxed);
    }

    fn on_write(&self, blocked: bool) {
        let since = self.write_blocked.load(Relaxed);
        if blocked && since == 0 {
            self.write_blocked.store(now_ms().max(1), Relaxed);
        } else if !blocked && since != 0 {
            self.write_blocked.store(0, Relaxed);
        }
    }
}

/// Writes GOAWAY(PROTOCOL_ERROR) and closes with a lingering close: bytes of the request left
/// unread would make the close a reset, which may reach the client before the GOAWAY does.
async fn goaway_and_close(mut stream: Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(&stream::GOAWAY_PROTOCOL_ERROR).await;
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

/// Reads a connection's first request head into `got` (after what is there already): true
/// once it is complete, or more than `max` bytes came without its end (Pingora refuses it),
/// false if the client left first. Nothing is allocated before the first byte comes (it is
/// read alone, into the future's one byte), then `got` grows as the head does.
async fn first_head(stream: &mut Stream, got: &mut Vec<u8>, max: usize) -> bool {
    use tokio::io::AsyncReadExt;
    if got.is_empty() {
        let mut first = [0u8; 1];
        match stream.read(&mut first).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {
                // Small until the head needs more (it doubles): a trickled head holds little.
                got.reserve(256);
                got.push(first[0]);
            }
        }
    }
    let mut from: usize = 0;
    loop {
        // Blank lines before a request line are skipped, as Pingora's parser skips them.
        let start = got
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(got.len());
        let head = &got[start..];
        let from_here = from.saturating_sub(start);
        // Its end: an empty line, CRLF or bare LF (`\r\n\r\n` holds `\n\r\n`).
        if memchr::memmem::find(&head[from_here.min(head.len())..], b"\n\r\n").is_some()
            || memchr::memmem::find(&head[from_here.min(head.len())..], b"\n\n").is_some()
            || got.len() > max + 8192
        {
            return true;
        }
        // A first line that is no request line is Pingora's to refuse, at once.
        if let Some(eol) = memchr::memchr(b'\n', head) {
            let line = head[..eol].strip_suffix(b"\r").unwrap_or(&head[..eol]);
            if !(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")) {
                return true;
            }
        }
        from = got.len().saturating_sub(2);
        if got.len() == got.capacity() {
            got.reserve(got.len());
        }
        match stream.read_buf(got).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// Resolves when the connection is asked to close to make room (`evict.rs`).
struct Evicted<'a>(&'a HeadClock);

impl Future for Evicted<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.evict_waker.register(cx.waker());
        if self.0.evict.load(Relaxed) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Resolves when the connection has been idle past `keepalive_timeout`, its current head is
/// overdue, or a write to the client has waited for room longer than `send_timeout`.
///
/// One timer per connection, on Pingora's timer wheel (a Tokio timer left armed makes every
/// park of the worker thread look at it: ~600 instructions per request by callgrind), and
/// nothing per request on a busy connection: idleness is counted in ticks of a quarter of
/// `keepalive_timeout` (a connection that served no request for four ticks in a row is idle,
/// so it goes between 1 and 1.25 × `keepalive_timeout` after its last request), and a later
/// deadline is not armed at once (the timer fires early, finds it, and moves on). Pingora's
/// own keep-alive timeout armed a timer, and read the clock, for every request.
struct HeadTimer<'a> {
    clock: &'a HeadClock,
    state: &'a mut TimerState,
    /// The first request's head is due at `first_deadline`, however late its first byte.
    first: bool,
    first_deadline: Instant,
    header_timeout: Duration,
    send_timeout: Duration,
    tick: Duration,
    base: Instant,
}

/// The connection timer, kept across requests.
#[derive(Default)]
struct TimerState {
    armed: Option<Armed>,
    /// Requests begun on the connection, and as many as the last tick saw.
    served: u64,
    seen: u64,
    /// Ticks in a row without a request.
    quiet: u32,
    /// The connection's task is registered to be woken when it is asked to close.
    registered: bool,
}

impl TimerState {
    /// Polls the armed timer; `Ready` when it has fired (and is gone).
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        let fired = self.armed.as_ref().is_some_and(|a| a.poll_fired(cx));
        if fired {
            self.armed = None;
        }
        fired
    }

    /// Ready once `want` has passed.
    fn deadline(&mut self, want: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.armed.as_ref().is_none_or(|a| want < a.at) {
                self.armed = Some(Armed::at(want, false));
            }
            let at = self.armed.as_ref().map_or(want, |a| a.at);
            if !self.fired(cx) {
                return Poll::Pending;
            }
            if want <= at {
                return Poll::Ready(());
            }
            // Fired at an earlier deadline than today's: move on to today's.
        }
    }

    /// Ready after four ticks in a row without a request.
    fn idle(&mut self, tick: Duration, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.armed.is_none() {
                self.armed = Some(Armed::at(Instant::now() + tick, true));
            }
            if !self.fired(cx) {
                return Poll::Pending;
            }
            if self.served != self.seen {
                self.seen = self.served;
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= 4 {
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl Future for HeadTimer<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.clock.gone.load(Relaxed) {
            return Poll::Ready(());
        }
        if !self.state.registered {
            // Once per connection: its task (and so its waker) is the same for all requests.
            self.clock.evict_waker.register(cx.waker());
            self.state.registered = true;
        }
        if self.clock.evict.load(Relaxed) && !self.clock.done.load(Relaxed) {
            return Poll::Ready(());
        }
        if self.clock.done.load(Relaxed) {
            // A response under way: only a write the client leaves stuck is bounded (Pingora's
            // own write timeout would arm a timer for every write).
            return match self.clock.write_blocked.load(Relaxed) {
                0 => Poll::Pending,
                since => {
                    let want = self.base + Duration::from_millis(since) + self.send_timeout;
                    self.state.deadline(want, cx)
                }
            };
        }
        let mut started = self.clock.started.load(Relaxed);
        if started == STARTED {
            started = now_ms().max(1);
            self.clock.started.store(started, Relaxed);
        }
        // A connection's first head is due header_timeout after the connection came; later
        // heads, header_timeout after their first byte; before that, the keep-alive idles.
        if self.first {
            let want = self.first_deadline;
            return self.state.deadline(want, cx);
        }
        match started {
            0 => {
                let tick = self.tick;
                self.state.idle(tick, cx)
            }
            t => {
                let want = self.base + Duration::from_millis(t) + self.header_timeout;
                self.state.deadline(want, cx)
            }
        }
    }
}

/// A timer armed for a deadline: a small task sleeps on Pingora's timer wheel and raises a
/// flag. Checking the flag is an atomic load, where polling the sleep itself went through a
/// Notify (~250 instructions per request, as the connection's task is polled twice each).
struct Armed {
    at: Instant,
    /// For an idle tick (kept across requests), not a head or write deadline (dropped when
    /// its request is done, so the next idle wait ticks from then).
    tick: bool,
    fired: Arc<Fired>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Fired {
    done: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl Armed {
    fn at(at: Instant, tick: bool) -> Armed {
        let after = at.saturating_duration_since(Instant::now());
        let fired = Arc::new(Fired::default());
        let signal = fired.clone();
        let task = tokio::spawn(async move {
            pingora_timeout::fast_timeout::fast_sleep(after).await;
            signal.done.store(true, Release);
            signal.waker.wake();
        });
        Armed {
            at,
            tick,
            fired,
            task,
        }
    }

    /// Whether it fired; registers the task to be woken when it does.
    fn poll_fired(&self, cx: &Context<'_>) -> bool {
        if self.fired.done.load(Acquire) {
            return true;
        }
        self.fired.waker.register(cx.waker());
        self.fired.done.load(Acquire)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway's listeners: Pingora's HTTP proxy (`A`: any HTTP app; the gateway's is
/// `HttpProxy<proxy::GatewayProxy>`), run under the client limits.
pub struct Front<A> {
    pub proxy: Arc<A>,
    pub live: Live,
    pub name: Arc<str>,
    active: AtomicUsize,
    saturated: AtomicBool,
    /// `gatehouse_connections_active{gateway}`.
    gauge: prometheus::IntGauge,
    /// `grace_period`: how long a shutdown or upgrade drains.
    grace: Duration,
    /// Whether plain connections speak HTTP/2 with prior knowledge.
    h2c: H2c,
    /// A TLS gateway's handshakes, done here once a connection is admitted.
    tls: Option<crate::tls::Handshaker>,
    /// Connections per client address (`max_connections_per_ip`).
    per_ip: per_ip::PerIp,
    /// In an episode of per-address refusals (said once at its start).
    ip_refusing: AtomicBool,
    /// `gatehouse_connections_refused_total{gateway,reason}`: max_connections, per_ip.
    refused: [prometheus::IntCounter; 2],
    /// `gatehouse_client_cuts_total{gateway,reason}`, by `CUT_REASONS`.
    cuts: [prometheus::IntCounter; CUT_REASONS.len()],
    /// The HTTP/1 connections, for closing one waiting for a head at max_connections.
    waiting: evict::Registry,
    /// The process is about to exit: connections still waiting for a head are closed.
    draining: AtomicBool,
}

/// Why the gateway let a client connection or stream go: the `reason` label of
/// `gatehouse_client_cuts_total` (`h2::CUT_BODY` indexes body_timeout).
const CUT_REASONS: [&str; 6] = [
    "header_timeout",
    "body_timeout",
    "send_timeout",
    "h2_flood",
    "h2_malformed",
    "overload",
];

/// Holds one of the gateway's connection slots.
struct Slot<'a, A>(&'a Front<A>);

impl<A> Drop for Slot<'_, A> {
    fn drop(&mut self) {
        let before = self.0.active.fetch_sub(1, Relaxed);
        self.0.gauge.dec();
        // Said again only once well below the limit, not at every close of a full gateway.
        let max = self.0.live.load().client.max_connections;
        let calm = before <= max - max / 10;
        if calm && self.0.saturated.load(Relaxed) && self.0.saturated.swap(false, Relaxed) {
            log::info!(
                "gateway \"{}\": below max_connections again, accepting connections",
                self.0.name
            );
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Front<A> {
    pub fn new(
        proxy: A,
        live: Live,
        name: Arc<str>,
        grace: Duration,
        h2c: H2c,
        tls: Option<crate::tls::Handshaker>,
    ) -> Front<A> {
        Front {
            grace,
            h2c,
            tls,
            proxy: Arc::new(proxy),
            live,
            active: AtomicUsize::new(0),
            saturated: AtomicBool::new(false),
            gauge: crate::metrics::connections(&name),
            per_ip: per_ip::PerIp::default(),
            ip_refusing: AtomicBool::new(false),
            refused: ["max_connections", "max_connections_per_ip"].map(|r| {
                crate::metrics::METRICS
                    .connections_refused
                    .with_label_values(&[&name, r])
            }),
            waiting: evict::Registry::default(),
            draining: AtomicBool::new(false),
            cuts: CUT_REASONS.map(|r| {
                crate::metrics::METRICS
                    .client_cuts
                    .with_label_values(&[&name, r])
            }),
            name,
        }
    }

    /// A connection waiting for a head was asked to close: to make room at max_connections,
    /// or because the process is about to exit (then it is no cut).
    fn evicted(&self) {
        if !self.draining.load(Relaxed) {
            self.cut("overload");
            log::debug!(
                "gateway \"{}\": at max_connections, closing a connection waiting for a head",
                self.name
            );
        }
    }

    /// Counts a connection (or HTTP/2 stream) let go for `reason`, one of `CUT_REASONS`.
    fn cut(&self, reason: &str) {
        if let Some(i) = CUT_REASONS.iter().position(|r| *r == reason) {
            self.cuts[i].inc();
        }
    }

    fn admit(&self, max: usize) -> Option<Slot<'_, A>> {
        if self.active.fetch_add(1, Relaxed) >= max {
            if !self.saturated.swap(true, Relaxed) {
                log::warn!(
                    "gateway \"{}\": max_connections ({max}) reached: new connections are admitted by closing those that wait longest for a request head, refused when none waits",
                    self.name
                );
            }
            // Room is made, not waited for: the chosen connection closes at once, and the
            // count is over max by the connections being closed meanwhile.
            if !self.waiting.evict_one() {
                self.active.fetch_sub(1, Relaxed);
                self.refused[0].inc();
                return None;
            }
        }
        self.gauge.inc();
        Some(Slot(self))
    }

    /// Pingora's HTTP/1 keep-alive loop, with the head clock and the limits.
    async fn serve_h1(
        &self,
        stream: Stream,
        replay: Vec<u8>,
        clock: Arc<HeadClock>,
        conn_start: Instant,
        shutdown: &ShutdownWatch,
        limits: ClientLimits,
    ) {
        let base = conn_start - Duration::from_millis(now_ms());
        let mut stream = stream;
        let mut replay = replay;
        // The first head is read here, into a buffer the size of what came, before Pingora's
        // session exists: a connection that sends nothing, or trickles its head, holds no
        // session, head buffer or proxy state meanwhile (10,000 of them held 440 MB that way).
        let first_head = first_head(&mut stream, &mut replay, limits.max_header_size);
        let deadline = conn_start + limits.header_timeout;
        tokio::select! {
            biased;
            done = tokio::time::timeout_at(deadline.into(), first_head) => match done {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    self.cut("header_timeout");
                    log::debug!(
                        "gateway \"{}\": request head not complete within header_timeout, closing",
                        self.name
                    );
                    return;
                }
            },
            _ = Evicted(&clock) => {
                self.evicted();
                return;
            }
        }
        // Boxed, and so allocated only now: the session and the loop's state.
        Box::pin(self.keepalive_loop(stream, replay, clock, conn_start, base, shutdown, limits))
            .await
    }

    /// The connection's requests, its first head read.
    #[allow(clippy::too_many_arguments)]
    async fn keepalive_loop(
        &self,
        stream: Stream,
        replay: Vec<u8>,
        clock: Arc<HeadClock>,
        conn_start: Instant,
        base: Instant,
        shutdown: &ShutdownWatch,
        limits: ClientLimits,
    ) {
        let mut session = ServerSession::new_http1(Box::new(Timed {
            inner: stream,
            clock: clock.clone(),
            quiet_exit: true,
            replay,
            h2c: false,
            frames: None,
        }));
        session.set_keepalive_reuses_remaining(Some(
            limits.max_requests_per_connection.saturating_sub(1),
        ));
        let mut timer_state = TimerState::default();
        let tick = (limits.keepalive_timeout / 4).max(Duration::from_millis(10));
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            // The head has its own clock (header_timeout for the whole head, keepalive_timeout
            // before it starts): no per-read timeout while it comes, or a gap between two head
            // reads longer than body_timeout would end in Pingora's ERROR line. The proxy arms
            // body_timeout once the head is in (early_request_filter).
            session.set_read_timeout(None);
            clock.arm();
            timer_state.served += 1;
            let timer = HeadTimer {
                clock: &clock,
                state: &mut timer_state,
                first,
                first_deadline: conn_start + limits.header_timeout,
                header_timeout: limits.header_timeout,
                send_timeout: limits.send_timeout,
                tick,
                base,
            };
            let reused = tokio::select! {
                biased;
                r = self.proxy.process_new_http(session, shutdown) => r,
                _ = timer => {
                    if clock.evict.load(Relaxed) && !clock.done.load(Relaxed) {
                        self.evicted();
                        return;
                    }
                    if !first && clock.started.load(Relaxed) == 0 && !clock.done.load(Relaxed) {
                        // Idle past keepalive_timeout: the usual end of a keep-alive.
                        return;
                    }
                    if clock.gone.load(Relaxed) {
                        log::debug!("gateway \"{}\": the client left mid-head", self.name);
                    } else if clock.done.load(Relaxed) {
                        self.cut("send_timeout");
                        log::debug!(
                            "gateway \"{}\": the client took nothing for send_timeout, closing",
                            self.name
                        );
                    } else {
                        self.cut("header_timeout");
                        log::debug!(
                            "gateway \"{}\": request head not complete within header_timeout, closing",
                            self.name
                        );
                    }
                    return;
                }
            };
            let Some((stream, settings)) = reused.map(|r| r.consume()) else {
                return;
            };
            if timer_state.armed.as_ref().is_some_and(|a| !a.tick) {
                timer_state.armed = None;
            }
            session = ServerSession::new_http1(stream);
            if let Some(s) = settings {
                s.apply_to_session(&mut session);
            }
            first = false;
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.live.load().client;
        // Per address first: a client over its own cap must not make room by closing others'.
        let _ip_slot = match limits.max_connections_per_ip {
            0 => None,
            max => {
                let peer = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().cloned())
                    .and_then(|a| a.as_inet().map(|a| a.ip()));
                match peer {
                    Some(ip) => match self.per_ip.admit(ip, max) {
                        Some(s) => {
                            if self.ip_refusing.load(Relaxed) {
                                self.ip_refusing.store(false, Relaxed);
                            }
                            Some(s)
                        }
                        None => {
                            self.refused[1].inc();
                            if !self.ip_refusing.swap(true, Relaxed) {
                                log::warn!(
                                    "gateway \"{}\": {ip} holds max_connections_per_ip ({max}); refusing its new connections",
                                    self.name
                                );
                            }
                            connection_ended();
                            return None;
                        }
                    },
                    None => None,
                }
            }
        };
        let _slot = self.admit(limits.max_connections)?;
        let conn_start = Instant::now();
        // From admission on, the connection waits for a head (its TLS handshake and h2c
        // preface included): one that sends nothing can be closed to make room.
        let clock = Arc::new(HeadClock::default());
        clock.opened.store(now_ms(), Relaxed);
        clock.arm();
        let registered = self.waiting.register(&clock);
        let mut stream = stream;
        if let Some(tls) = &self.tls {
            // Within header_timeout of the connection's start, as the head that follows.
            let deadline = (conn_start + limits.header_timeout).into();
            let accepted = tokio::select! {
                biased;
                done = tokio::time::timeout_at(deadline, Box::pin(tls.accept(stream))) => done,
                _ = Evicted(&clock) => {
                    self.evicted();
                    connection_ended();
                    return None;
                }
            };
            match accepted {
                Ok(Some(s)) => stream = s,
                done => {
                    if done.is_err() {
                        tls.failed("timeout");
                        log::debug!(target: "gatehouse::tls", "handshake not done within header_timeout");
                    }
                    connection_ended();
                    return None;
                }
            }
        }
        let mut h2c = false;
        let mut replay = Vec::new();
        if self.h2c != H2c::Off && stream.get_ssl_digest().is_none() {
            // A client that does not finish its first bytes in header_timeout is let go,
            // as one that does not finish its head.
            let sniffed = tokio::select! {
                biased;
                done = tokio::time::timeout(limits.header_timeout, sniff_preface(&mut stream)) => done,
                _ = Evicted(&clock) => {
                    self.evicted();
                    connection_ended();
                    return None;
                }
            };
            match sniffed {
                Ok(Some(s)) => (h2c, replay) = s,
                Ok(None) => {
                    connection_ended();
                    return None;
                }
                Err(_) => {
                    self.cut("header_timeout");
                    connection_ended();
                    return None;
                }
            }
            if !h2c && self.h2c == H2c::Only {
                // RFC 9113 §3.4: a server that receives anything but the preface may send
                // GOAWAY(PROTOCOL_ERROR) and must close. The HTTP/1 client reads it as garbage
                // and gives up; nothing it sent was read as a request.
                // Boxed: its buffer would otherwise be part of every connection's state.
                Box::pin(goaway_and_close(stream)).await;
                connection_ended();
                return None;
            }
        }
        if h2c || matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 connections are bounded by their own limits, not closed to make room.
            drop(registered);
            let clock = Arc::new(HeadClock::default());
            let stream: Stream = Box::new(Timed {
                inner: stream,
                clock: clock.clone(),
                quiet_exit: false,
                replay,
                h2c,
                frames: Some(h2::FrameScan::new()),
            });
            // Boxed: its state would otherwise be part of every connection's, HTTP/1 ones too.
            Box::pin(self.serve_h2(stream, clock, conn_start, shutdown, limits)).await;
            connection_ended();
            return None;
        }
        self.serve_h1(stream, replay, clock, conn_start, shutdown, limits)
            .await;
        drop(registered);
        connection_ended();
        None
    }

    /// Called when the listeners stop accepting (shutdown, upgrade). Pingora's cleanup drops
    /// every connection waiting for its next request at once, and a request already on its
    /// way on one of them fails (the client sees the connection close). So during the grace
    /// period those connections stay: each answer says `Connection: close` (serve_h1), and
    /// only the connections still idle shortly before the process exits are dropped (a
    /// second before, or a quarter of a shorter grace period: with `grace_period = "1s"`,
    /// "a second before" was at once, and a request racing the close failed).
    async fn cleanup(&self) {
        let spare = (self.grace / 4).min(Duration::from_secs(1));
        tokio::time::sleep(self.grace - spare).await;
        // Our connection loop's waits (a first head, a keep-alive) are closed here, Pingora's
        // own sessions by its cleanup.
        self.draining.store(true, Relaxed);
        self.waiting.evict_all();
        self.proxy.http_cleanup().await
    }
}
