//! A connection's head clock: where its current request head is, whether a response write
//! to it is stuck, and the timers that act on them (one per connection, see `HeadTimer`); and
//! the read of a connection's first head before Pingora's session exists (`first_head`).
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::protocols::Stream;

use crate::upstream::now_ms;

/// Where a connection's current request head is, and whether a response write is stuck: set
/// by the stream (first byte, blocked writes) and by the proxy (head complete), read by the
/// connection loop's timer.
#[derive(Debug, Default)]
pub struct HeadClock {
    /// A head is expected: the next bytes read start it.
    pub(super) waiting: AtomicBool,
    /// `now_ms()` of the head's first byte; `STARTED` when it came and the timer has not
    /// taken the time yet (it is polled in the same turn); 0 while none came.
    pub(super) started: AtomicU64,
    pub(super) done: AtomicBool,
    /// The client left (end of stream or reset) in the middle of a head.
    pub(super) gone: AtomicBool,
    /// `now_ms()` since a write to the client has been waiting for room, 0 when none waits.
    pub(super) write_blocked: AtomicU64,
    /// Spaces seen in the request line so far, `LINE_DONE` once its end was seen.
    pub(super) line_spaces: AtomicU64,
    /// The first bytes read of the current head (up to 8, little-endian) and how many: the
    /// space count is trusted only for a line read from its start, not one begun in bytes
    /// Pingora carried over from a pipelined read.
    pub(super) line_start: AtomicU64,
    pub(super) line_start_len: AtomicU64,
    /// HTTP/2: `now_ms()` since a header block has been coming, 0 while none is.
    pub(super) h2_head_since: AtomicU64,
    /// HTTP/2: the client sent control frames or resets past their rate.
    pub(super) h2_abuse: AtomicBool,
    /// HTTP/2: a header block began, or abuse: wakes the connection loop.
    pub(super) h2_event: tokio::sync::Notify,
    /// Overload (`evict.rs`): where the connection sits in the registry, whether it was asked
    /// to close, the task to wake when it is, whether it ever completed a head, and when it
    /// was opened (`now_ms()`).
    pub(super) reg_slot: AtomicUsize,
    pub(super) evict: AtomicBool,
    pub(super) evict_waker: futures::task::AtomicWaker,
    pub(super) had_request: AtomicBool,
    pub(super) opened: AtomicU64,
    /// HTTP/1: the most one read from the socket may return (0: no cap), set while the proxy
    /// buffers a request body of unknown length (`request_buffering`), so no read overflows
    /// what Pingora keeps of it.
    pub(super) read_cap: AtomicUsize,
}

const LINE_DONE: u64 = u64::MAX;

/// A head's first byte came; its time is not read yet.
pub(super) const STARTED: u64 = u64::MAX;

impl HeadClock {
    pub(super) fn arm(&self) {
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

    pub(super) fn on_read(&self, bytes: &[u8]) {
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

    pub(super) fn on_write(&self, blocked: bool) {
        let since = self.write_blocked.load(Relaxed);
        if blocked && since == 0 {
            self.write_blocked.store(now_ms().max(1), Relaxed);
        } else if !blocked && since != 0 {
            self.write_blocked.store(0, Relaxed);
        }
    }
}

/// Reads a connection's first request head into `got` (after what is there already): true
/// once it is complete, or more than `max` bytes came without its end (Pingora refuses it),
/// false if the client left first. Nothing is allocated before the first byte comes (it is
/// read alone, into the future's one byte), then `got` grows as the head does.
pub(super) async fn first_head(stream: &mut Stream, got: &mut Vec<u8>, max: usize) -> bool {
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
pub(super) struct Evicted<'a>(pub(super) &'a HeadClock);

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
pub(super) struct HeadTimer<'a> {
    pub(super) clock: &'a HeadClock,
    pub(super) state: &'a mut TimerState,
    /// The first request's head is due at `first_deadline`, however late its first byte.
    pub(super) first: bool,
    pub(super) first_deadline: Instant,
    pub(super) header_timeout: Duration,
    pub(super) send_timeout: Duration,
    pub(super) tick: Duration,
    pub(super) base: Instant,
}

/// The connection timer, kept across requests.
#[derive(Default)]
pub(super) struct TimerState {
    pub(super) armed: Option<Armed>,
    /// Requests begun on the connection, and as many as the last tick saw.
    pub(super) served: u64,
    pub(super) seen: u64,
    /// Ticks in a row without a request.
    pub(super) quiet: u32,
    /// The connection's task is registered to be woken when it is asked to close.
    pub(super) registered: bool,
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
pub(super) struct Armed {
    pub(super) at: Instant,
    /// For an idle tick (kept across requests), not a head or write deadline (dropped when
    /// its request is done, so the next idle wait ticks from then).
    pub(super) tick: bool,
    pub(super) fired: Arc<Fired>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub(super) struct Fired {
    pub(super) done: AtomicBool,
    pub(super) waker: futures::task::AtomicWaker,
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
