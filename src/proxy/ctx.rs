//! Per-request state carried through Pingora's phases.
use std::net::SocketAddr;
use std::sync::Arc;

use gatehouse_plugins::PluginCtx;

use crate::router::RouteId;
use crate::upstream::{InFlight, Tried};

use super::mirror::MirrorState;
use crate::runtime::Runtime;

#[derive(Default)]
pub struct RequestCtx {
    /// The snapshot this request started on; kept to its end, whatever reloads happen.
    pub rt: Option<Arc<Runtime>>,
    pub route: Option<RouteId>,
    pub plugins: PluginCtx,
    /// The peer chosen for the current try (for `preserve_host = false`).
    pub peer: Option<SocketAddr>,
    /// Set once a reply has been written by the gateway itself.
    pub replied: bool,
    /// The upstream (pool index) this request goes to, chosen once (splits pick it).
    pub upstream: Option<usize>,
    /// The peer of the current try, its index in the pool.
    pub peer_idx: Option<usize>,
    pub tried: Tried,
    /// Retries granted by the retry policy so far.
    pub retries: usize,
    pub inflight: Option<InFlight>,
    /// The circuit breaker let this request through (as its half-open probe when `probe`).
    pub admitted: bool,
    pub probe: Option<u64>,
    /// The breaker has this request's verdict already (a probe's, from its response head).
    pub recorded: bool,
    /// The last try failed in a way the breaker counts.
    pub upstream_failed: bool,
    /// upstream_response_filter raised a retry for the upstream's status.
    pub status_retry: bool,
    /// The one retry on a new connection after a dead pooled one was taken.
    pub fresh_retry: bool,
    /// The whole request body was read before the first try (`request_buffering`): it can
    /// be sent again.
    pub body_held: bool,
    pub mirror: Option<MirrorState>,
    /// A WebSocket handshake's expected `Sec-WebSocket-Accept`.
    pub ws_accept: Option<String>,
    /// Request body bytes sent in this try, and the most any try has sent: a retry replays
    /// the body from its start, which the body hooks and the mirror must not see twice.
    pub body_try: u64,
    pub body_seen: u64,
    /// When the request's head was in (early_request_filter): its duration's start.
    pub start: Option<std::time::Instant>,
    /// The gateway's span of this request (W3C trace context).
    pub span: Option<crate::trace::TraceCtx>,
    /// When the current try's request went upstream.
    pub upstream_sent: Option<std::time::Instant>,
    /// From sending the last try upstream to its response head (the access log's).
    pub upstream_time: Option<std::time::Duration>,
    /// The request could not use the cache (a body, no Host, a very long URL).
    pub cache_bypass: bool,
    /// The client said `no-store`: hits are served, nothing is stored.
    pub cache_no_store: bool,
    /// An upstream 304 refreshing a stale entry: its age, Date and fields (Pingora's merge
    /// keeps only a few of them).
    pub cache_revalidated: Option<Revalidated>,
}

/// What a 304 said about a stale entry.
#[derive(Debug)]
pub struct Revalidated {
    /// Its age (§4.2.3) and Date: the refreshed entry's freshness counts from them.
    pub age: u64,
    pub date: Option<std::time::SystemTime>,
    /// Its header fields, hop-by-hop ones removed: they replace the stored ones (§4.3.4).
    pub headers: http::HeaderMap,
}
