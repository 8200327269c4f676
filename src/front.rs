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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
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

mod clock;
mod evict;
mod h2;
mod limits;
mod per_ip;
mod stream;
pub use clock::HeadClock;
use clock::{first_head, Evicted, HeadTimer, TimerState, STARTED};
pub use h2::{body_expected as h2_body_expected, body_read as h2_body_read};
pub use limits::ClientLimits;
pub use stream::Timed;
use stream::{goaway_and_close, sniff_preface};

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
