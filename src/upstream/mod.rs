//! Upstream pools: peer selection over `pingora-load-balancing` (weighted round robin, random,
//! Ketama consistent hashing) or least connections, with active health (Pingora's health
//! registry), passive health (ejection after consecutive failures), a circuit breaker and a
//! retry budget.
//!
//! A pool outlives reloads when its definition is unchanged (see `runtime.rs`), so health,
//! ejections and breaker state are not reset by a reload.
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::upstreams::peer::HttpPeer;
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::health_check::{
    HealthCheck as PingoraCheck, HttpHealthCheck, TcpHealthCheck,
};
use pingora_load_balancing::selection::{BackendIter, BackendSelection, Consistent, RoundRobin};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};

use crate::config::{HealthKind, Selection, Upstream};

pub mod breaker;
pub mod budget;
pub mod health;
pub mod key;
pub mod resolve;

use breaker::Breaker;
use budget::RetryBudget;

/// How far a selection may look past unusable peers before giving up.
const MAX_SELECT_ITERATIONS: usize = 256;

/// Milliseconds since the process started: a cheap monotonic clock for ejections and breakers.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Round robin, random and least_conn choose over our own weighted table (no allocation, no
/// hashing per request; Pingora's iterator allocates a `HashSet` per selection); the balancer
/// then only carries the health registry. Ketama hashing is Pingora's.
enum Selector {
    Table(LoadBalancer<RoundRobin>),
    Consistent(LoadBalancer<Consistent>),
}

pub struct PeerState {
    pub addr: SocketAddr,
    pub weight: usize,
    /// `addr` as a Host header value, made once: formatting it per request showed in profiles.
    host: http::HeaderValue,
    /// SNI and the name verified on the peer's certificate (TLS upstreams).
    sni: String,
    backend: Backend,
    inflight: AtomicUsize,
    failures: AtomicU32,
    ejected_until: AtomicU64,
    /// The generation of the peer's pooled connections, mixed into the pool key of every
    /// connection made for it: bumped when a pooled connection turns out dead, so the idle
    /// ones pooled with it are never handed out again (see `Pool::drop_idle`).
    pool_epoch: AtomicU64,
}

impl PeerState {
    fn new(addr: SocketAddr, weight: usize, name: &str, sni: &str) -> PeerState {
        PeerState {
            sni: sni.to_string(),
            addr,
            weight,
            // A peer's name is an address or a host name and port, always a valid value; the
            // fallback is never taken.
            host: http::HeaderValue::try_from(name)
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
            backend: Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                weight,
                ext: Default::default(),
            },
            inflight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            pool_epoch: AtomicU64::new(0),
        }
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }
}

/// The peers one request has tried, so retries go elsewhere. Peers past the 64th are not
/// remembered (they may be tried twice).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried(u64);

impl Tried {
    pub fn insert(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1 << i;
        }
    }

    pub fn remove(&mut self, i: usize) {
        if i < 64 {
            self.0 &= !(1 << i);
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
}

/// Counts a request against its peer for `least_conn` while it lives.
pub struct InFlight {
    pool: Arc<Pool>,
    idx: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.peers[self.idx].inflight.fetch_sub(1, Relaxed);
    }
}

/// nginx's smooth weighted round robin, unrolled into one cycle of `sum(weights)` picks.
fn smooth_weighted(peers: &[PeerState]) -> Box<[u16]> {
    let total: i64 = peers.iter().map(|p| p.weight as i64).sum();
    let mut current = vec![0i64; peers.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, p) in peers.iter().enumerate() {
            current[i] += p.weight as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out.into_boxed_slice()
}

pub struct Pool {
    pub name: Arc<str>,
    pub cfg: Upstream,
    selector: Selector,
    /// Peer indexes, each `weight` times, interleaved smoothly (nginx's smooth weighted
    /// round robin) so a heavy peer does not get its share in one burst.
    weighted: Box<[u16]>,
    peers: Box<[PeerState]>,
    by_addr: HashMap<SocketAddr, usize>,
    next: AtomicUsize,
    pub breaker: Option<Breaker>,
    pub budget: RetryBudget,
    /// Set once a health-check task runs for this pool.
    pub(crate) checking: AtomicBool,
    /// Set once the first round of active health checks has finished (for `/readyz`).
    pub checked: AtomicBool,
    /// This upstream's series, resolved once (no label lookup per request).
    pub upstream_time: prometheus::Histogram,
    /// `gatehouse_upstream_errors_total`: attempts with no answer, answers with a 5xx.
    pub failed: prometheus::IntCounter,
    pub answered_5xx: prometheus::IntCounter,
    pub retries: prometheus::IntCounter,
}

fn balancer<S>(backends: &BTreeSet<Backend>, cfg: &Upstream) -> Result<LoadBalancer<S>, String>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let mut lb = LoadBalancer::<S>::from_backends(Backends::new(Static::new(backends.clone())));
    if let Some(hc) = &cfg.health_check {
        lb.set_health_check(health_check(cfg, hc));
    }
    // Static discovery answers at once; nothing here waits on I/O.
    match lb.update().now_or_never() {
        Some(Ok(())) => Ok(lb),
        Some(Err(e)) => Err(format!("building the peer set: {e}")),
        None => Err("building the peer set did not complete".into()),
    }
}

fn health_check(
    cfg: &Upstream,
    hc: &crate::config::HealthCheck,
) -> Box<dyn PingoraCheck + Send + Sync + 'static> {
    match &hc.kind {
        HealthKind::Tcp => {
            let mut c = TcpHealthCheck::new();
            c.consecutive_failure = hc.unhealthy_after;
            c.consecutive_success = hc.healthy_after;
            c.peer_template.options.connection_timeout = Some(hc.timeout);
            c
        }
        HealthKind::Http { path, host, expect } => {
            let check = |sni: &str| http_check(cfg, hc, sni, path, host.as_deref(), *expect);
            let first = cfg
                .peers
                .first()
                .map(|p| p.sni.as_str())
                .unwrap_or_default();
            if cfg.peers.iter().all(|p| p.sni == first) {
                return Box::new(check(first));
            }
            // Peers of different names: each is checked under its own (SNI, verified name,
            // Host), as its requests are; Pingora's check has one template for all.
            let checks = cfg.peers.iter().map(|p| (p.addr, check(&p.sni))).collect();
            Box::new(health::ByPeer::new(
                checks,
                hc.healthy_after,
                hc.unhealthy_after,
            ))
        }
    }
}

/// A `GET path` check of peers named `sni` (empty: an address without `sni`), passing on
/// status `expect`.
fn http_check(
    cfg: &Upstream,
    hc: &crate::config::HealthCheck,
    sni: &str,
    path: &str,
    host: Option<&str>,
    expect: u16,
) -> HttpHealthCheck {
    let host = host
        .map(str::to_string)
        .or_else(|| (!sni.is_empty()).then(|| sni.to_string()))
        .unwrap_or_else(|| "localhost".to_string());
    let mut c = HttpHealthCheck::new(&host, cfg.tls);
    c.peer_template.sni = sni.to_string();
    peer_tls(&mut c.peer_template, cfg);
    if let Ok(mut req) = pingora_http::RequestHeader::build("GET", path.as_bytes(), None) {
        let _ = req.insert_header("host", host.as_str());
        let _ = req.insert_header("user-agent", "gatehouse-health-check");
        c.req = req;
    }
    let want = expect;
    c.validator = Some(Box::new(move |resp: &pingora_http::ResponseHeader| {
        if resp.status.as_u16() == want {
            Ok(())
        } else {
            pingora_error::Error::e_explain(
                pingora_error::ErrorType::CustomCode("unexpected status", resp.status.as_u16()),
                "during http health check",
            )
        }
    }));
    c.consecutive_failure = hc.unhealthy_after;
    c.consecutive_success = hc.healthy_after;
    c.peer_template.options.connection_timeout = Some(hc.timeout);
    c.peer_template.options.read_timeout = Some(hc.timeout);
    c
}

/// The upstream's TLS and HTTP/2 settings on a peer (requests and health checks alike).
fn peer_tls(peer: &mut HttpPeer, cfg: &Upstream) {
    use pingora::protocols::ALPN;
    let t = &cfg.tls_peer;
    if cfg.http2 {
        // Over TLS the peer chooses (h2 first); over plain TCP there is no negotiation, so
        // h2 is spoken at once (prior knowledge), as gRPC servers expect.
        peer.options.alpn = if cfg.tls { ALPN::H2H1 } else { ALPN::H2 };
        // Pingora's default of one stream per connection would open a connection per request.
        peer.options.max_h2_streams = 100;
    }
    if !cfg.tls {
        return;
    }
    peer.options.verify_cert = t.verify;
    peer.options.verify_hostname = t.verify_hostname;
    peer.options.ca = t.ca.as_ref().map(|c| c.value.clone());
    peer.client_cert_key = t.client.as_ref().map(|c| c.value.clone());
    peer.group_key = t.group;
}

impl Pool {
    pub fn new(cfg: &Upstream) -> Result<Pool, String> {
        let peers: Box<[PeerState]> = cfg
            .peers
            .iter()
            .map(|p| PeerState::new(p.addr, p.weight, &p.name, &p.sni))
            .collect();
        let set: BTreeSet<Backend> = peers.iter().map(|p| p.backend.clone()).collect();
        let selector = match cfg.selection {
            Selection::ConsistentHash => Selector::Consistent(balancer(&set, cfg)?),
            _ => Selector::Table(balancer(&set, cfg)?),
        };
        if peers.len() > usize::from(u16::MAX) {
            return Err("more than 65535 peers".into());
        }
        Ok(Pool {
            name: cfg.name.as_str().into(),
            selector,
            weighted: smooth_weighted(&peers),
            by_addr: peers.iter().enumerate().map(|(i, p)| (p.addr, i)).collect(),
            peers,
            next: AtomicUsize::new(0),
            breaker: cfg.circuit_breaker.clone().map(Breaker::new),
            budget: RetryBudget::new(cfg.retry.budget_percent),
            checking: AtomicBool::new(false),
            checked: AtomicBool::new(cfg.health_check.is_none()),
            upstream_time: crate::metrics::METRICS
                .upstream_duration
                .with_label_values(&[cfg.name.as_str()]),
            retries: crate::metrics::METRICS
                .retries
                .with_label_values(&[cfg.name.as_str()]),
            failed: crate::metrics::METRICS
                .upstream_errors
                .with_label_values(&[cfg.name.as_str(), "failed"]),
            answered_5xx: crate::metrics::METRICS
                .upstream_errors
                .with_label_values(&[cfg.name.as_str(), "5xx"]),
            cfg: cfg.clone(),
        })
    }

    fn backends(&self) -> &Backends {
        match &self.selector {
            Selector::Table(lb) => lb.backends(),
            Selector::Consistent(lb) => lb.backends(),
        }
    }

    pub fn peers(&self) -> &[PeerState] {
        &self.peers
    }

    /// Whether active health checks currently count `idx` healthy (always, without checks).
    pub fn healthy(&self, idx: usize) -> bool {
        self.cfg.health_check.is_none() || self.backends().ready(&self.peers[idx].backend)
    }

    pub fn ejected(&self, idx: usize) -> bool {
        self.peers[idx].ejected(now_ms())
    }

    pub fn inflight(&self, idx: usize) -> usize {
        self.peers[idx].inflight.load(Relaxed)
    }

    /// One round of active health checks.
    pub async fn check_health(&self) {
        self.backends().run_health_check(true).await;
    }

    /// Picks a peer: healthy, not ejected, not tried yet by this request. When passive health
    /// has ejected every healthy peer, ejections are ignored rather than failing everything
    /// (Envoy's panic threshold); tried peers are never picked again.
    pub fn select(&self, key: &[u8], tried: &Tried) -> Option<usize> {
        let now = if self.cfg.passive_health.is_some() {
            now_ms()
        } else {
            0
        };
        self.pick(key, tried, now).or_else(|| {
            if now > 0 {
                self.pick(key, tried, 0)
            } else {
                None
            }
        })
    }

    fn pick(&self, key: &[u8], tried: &Tried, now: u64) -> Option<usize> {
        let usable = |i: usize| {
            !tried.contains(i) && (now == 0 || !self.peers[i].ejected(now)) && self.healthy(i)
        };
        match (&self.selector, self.cfg.selection) {
            (Selector::Consistent(lb), _) => {
                let accept = |b: &Backend, healthy: bool| {
                    healthy
                        && b.addr
                            .as_inet()
                            .and_then(|a| self.by_addr.get(a))
                            .is_some_and(|&i| {
                                !tried.contains(i) && (now == 0 || !self.peers[i].ejected(now))
                            })
                };
                let chosen = lb.select_with(key, MAX_SELECT_ITERATIONS, accept)?;
                chosen
                    .addr
                    .as_inet()
                    .and_then(|a| self.by_addr.get(a))
                    .copied()
            }
            (_, Selection::LeastConn) => self.least_conn(&usable),
            (_, Selection::Random) => {
                let n = self.weighted.len().max(1) as u64;
                self.scan((gatehouse_plugins::random_u64() % n) as usize, &usable)
            }
            _ => self.scan(self.next.fetch_add(1, Relaxed), &usable),
        }
    }

    /// The first usable peer in the weighted table from `start` on.
    fn scan(&self, start: usize, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weighted.len();
        (0..n)
            .map(|k| usize::from(self.weighted[(start + k) % n]))
            .find(|&i| usable(i))
    }

    /// Fewest requests in flight per unit of weight; ties go round robin.
    fn least_conn(&self, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.peers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed) % n;
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let p = &self.peers[i];
            if !usable(i) {
                continue;
            }
            let load = p.inflight.load(Relaxed);
            let better = match best {
                None => true,
                // load_i / w_i < load_b / w_b without division
                Some((b, lb)) => load * self.peers[b].weight < lb * p.weight,
            };
            if better {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Whether a retry could find a peer this request has not tried.
    pub fn has_untried(&self, tried: &Tried) -> bool {
        (0..self.peers.len()).any(|i| !tried.contains(i) && self.healthy(i))
    }

    /// Counts a request against peer `idx` (only `least_conn` needs it).
    pub fn start(self: &Arc<Self>, idx: usize) -> Option<InFlight> {
        if self.cfg.selection != Selection::LeastConn {
            return None;
        }
        self.peers[idx].inflight.fetch_add(1, Relaxed);
        Some(InFlight {
            pool: self.clone(),
            idx,
        })
    }

    /// Reports one try's outcome on peer `idx` for passive health.
    /// An attempt on peer `idx` that got no answer.
    pub fn no_answer(&self, idx: usize) {
        self.failed.inc();
        self.report(idx, false);
    }

    pub fn report(&self, idx: usize, ok: bool) {
        let Some(ph) = &self.cfg.passive_health else {
            return;
        };
        let p = &self.peers[idx];
        if ok {
            if p.failures.load(Relaxed) != 0 {
                p.failures.store(0, Relaxed);
            }
            return;
        }
        if p.failures.fetch_add(1, Relaxed) + 1 >= ph.failures {
            p.failures.store(0, Relaxed);
            p.ejected_until
                .store(now_ms() + ph.eject_for.as_millis() as u64, Relaxed);
            log::warn!(
                "upstream \"{}\": peer {} ejected for {:?} after {} failures",
                self.name,
                p.addr,
                ph.eject_for,
                ph.failures
            );
        }
    }

    /// Whether an upstream status counts as a failure for passive health.
    pub fn is_failure_status(&self, status: u16) -> bool {
        self.cfg
            .passive_health
            .as_ref()
            .is_some_and(|p| p.statuses.contains(&status))
    }

    pub fn addr(&self, idx: usize) -> SocketAddr {
        self.peers[idx].addr
    }

    /// The Host header for requests to peer `idx` (its name as configured), when the route
    /// does not preserve the client's.
    pub fn host(&self, idx: usize) -> http::HeaderValue {
        self.peers[idx].host.clone()
    }

    /// The Pingora peer for one try on `idx`.
    pub fn peer(&self, idx: usize) -> Box<HttpPeer> {
        let p = &self.peers[idx];
        let mut peer = HttpPeer::new(p.addr, self.cfg.tls, p.sni.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.cfg.connect_timeout);
        o.read_timeout = Some(self.cfg.read_timeout);
        o.write_timeout = Some(self.cfg.write_timeout);
        o.idle_timeout = Some(self.cfg.idle_timeout);
        peer_tls(&mut peer, &self.cfg);
        let epoch = p.pool_epoch.load(Relaxed);
        if epoch != 0 {
            peer.group_key = peer
                .group_key
                .wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        Box::new(peer)
    }

    /// A pooled connection to peer `idx` was dead (closed by the peer before any answer):
    /// the others pooled with it likely are too (a restarted or idle-closing upstream).
    /// Pingora's pool has no call to empty a peer's group, so the peer's pool key moves on:
    /// the next try connects afresh, and the idle connections left under the old key are
    /// never used again; they close when the peer closes them or at `idle_timeout`, or are
    /// evicted first when the pool is full.
    pub fn drop_idle(&self, idx: usize) {
        if let Some(p) = self.peers.get(idx) {
            p.pool_epoch.fetch_add(1, Relaxed);
        }
    }

    pub fn tls(&self) -> bool {
        self.cfg.tls
    }

    pub fn connect_timeout(&self) -> Duration {
        self.cfg.connect_timeout
    }

    pub fn read_timeout(&self) -> Duration {
        self.cfg.read_timeout
    }

    pub fn write_timeout(&self) -> Duration {
        self.cfg.write_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weights_interleave() {
        let peers: Vec<PeerState> = [5usize, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let name = format!("127.0.0.1:{}", 1000 + i);
                PeerState::new(name.parse().unwrap(), w, &name, "")
            })
            .collect();
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(&*smooth_weighted(&peers), &[0, 0, 1, 0, 2, 0, 0]);
    }
}
