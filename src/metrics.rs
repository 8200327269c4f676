//! Prometheus metrics, served as text at `GET /metrics` on the admin listener.
//!
//! Counters on the request path are the `prometheus` crate's atomics, reached through handles
//! resolved when a snapshot is built ([`RouteMetrics`], one per route and one per gateway for
//! requests no route matched, `route="-"`): recording a request is a few atomic adds, no
//! label lookup, no lock shared by workers. Labels come from the config (gateway, route,
//! upstream and peer names), the method from a fixed list and the status as its class, so
//! the number of series is bounded whatever clients send. Gauges that describe state
//! (peer health, circuit state) are read from the live snapshot when scraped.
use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::runtime::Runtime;

pub struct Families {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub connections: IntGaugeVec,
    pub peer_healthy: IntGaugeVec,
    pub circuit_open: IntGaugeVec,
    pub retries: IntCounterVec,
    pub cache: IntCounterVec,
    pub reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub plugin_refusals: IntCounterVec,
    pub plugin_duration: HistogramVec,
    pub access_log_dropped: IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub client_cuts: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub rate_limit_fallbacks: IntCounterVec,
}

/// Seconds: from 1 ms to 30 s, as a gateway's requests spread.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

// The three builders below fail only on an invalid name or label, or a name registered twice:
// all are constants of this file, and `families_build` below builds them all. Hence the
// `expect`s, allowed here alone.
#[allow(clippy::expect_used)]
fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

#[allow(clippy::expect_used)]
fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

/// Seconds per plugin call: from 5 µs (a header rewrite) to 2.5 s (an auth subrequest).
const PLUGIN_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

#[allow(clippy::expect_used)]
fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    histogram_in(r, name, help, labels, BUCKETS)
}

#[allow(clippy::expect_used)]
fn histogram_in(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

/// The process's metric families. The names and labels are fixed at build time, so creating
/// them cannot fail (the `expect`s above are on constants).
pub static METRICS: LazyLock<Families> = LazyLock::new(|| {
    let r = Registry::new();
    let f = Families {
        requests: counter(
            &r,
            "gatehouse_requests_total",
            "Requests answered, by gateway, route, method and status class",
            &["gateway", "route", "method", "status"],
        ),
        duration: histogram(
            &r,
            "gatehouse_request_duration_seconds",
            "Time from the request head to the end of the answer",
            &["gateway", "route"],
        ),
        upstream_duration: histogram(
            &r,
            "gatehouse_upstream_duration_seconds",
            "Time from sending the request upstream to the answer's head",
            &["upstream"],
        ),
        request_bytes: counter(
            &r,
            "gatehouse_request_bytes_total",
            "Request body bytes read from clients",
            &["gateway", "route"],
        ),
        response_bytes: counter(
            &r,
            "gatehouse_response_bytes_total",
            "Response body bytes sent to clients",
            &["gateway", "route"],
        ),
        connections: gauge(
            &r,
            "gatehouse_connections_active",
            "Client connections open",
            &["gateway"],
        ),
        peer_healthy: gauge(
            &r,
            "gatehouse_upstream_peer_healthy",
            "1 when the peer takes requests (healthy and not ejected), else 0",
            &["upstream", "peer"],
        ),
        circuit_open: gauge(
            &r,
            "gatehouse_upstream_circuit_open",
            "1 when the upstream's circuit breaker is open or half-open",
            &["upstream"],
        ),
        retries: counter(
            &r,
            "gatehouse_upstream_retries_total",
            "Requests tried again on another peer",
            &["upstream"],
        ),
        cache: counter(
            &r,
            "gatehouse_cache_requests_total",
            "Requests on cached routes, by what the cache did",
            &["gateway", "route", "status"],
        ),
        reloads: counter(
            &r,
            "gatehouse_config_reloads_total",
            "Config reloads, by result",
            &["result"],
        ),
        build_info: gauge(
            &r,
            "gatehouse_build_info",
            "Always 1; the version in a label",
            &["version"],
        ),
        plugin_refusals: counter(
            &r,
            "gatehouse_plugin_refusals_total",
            "Requests a plugin ended itself (auth refusals, rate-limit 429s, size limits...)",
            &["plugin", "kind", "status"],
        ),
        plugin_duration: histogram_in(
            &r,
            "gatehouse_plugin_duration_seconds",
            "Time spent in one plugin instance per call of a phase, awaits included",
            &["plugin", "kind", "phase"],
            PLUGIN_BUCKETS,
        ),
        access_log_dropped: counter(
            &r,
            "gatehouse_access_log_dropped_total",
            "Access log lines dropped because the writer was behind",
            &[],
        )
        .with_label_values(&[] as &[&str]),
        tls_handshake_failures: counter(
            &r,
            "gatehouse_tls_handshake_failures_total",
            "Client TLS handshakes that failed, by gateway and reason (crate::tls::failures)",
            &["gateway", "reason"],
        ),
        connections_refused: counter(
            &r,
            "gatehouse_connections_refused_total",
            "Client connections closed at once, by reason: max_connections, max_connections_per_ip",
            &["gateway", "reason"],
        ),
        client_cuts: counter(
            &r,
            "gatehouse_client_cuts_total",
            "Client connections (or HTTP/2 streams) the gateway let go, by reason: header_timeout, body_timeout, send_timeout, h2_flood (control frames or resets past their rate), h2_malformed (protocol errors, or too many refused streams)",
            &["gateway", "reason"],
        ),
        upstream_errors: counter(
            &r,
            "gatehouse_upstream_errors_total",
            "Upstream attempts that failed: kind=failed (no answer: connect, timeout, reset) or 5xx (an answer with a 5xx status)",
            &["upstream", "kind"],
        ),
        store_errors: counter(
            &r,
            "gatehouse_store_errors_total",
            "Errors talking to a shared store ([stores.NAME]), by kind: timeout, connect, connection, reply",
            &["store", "kind"],
        ),
        rate_limit_fallbacks: counter(
            &r,
            "gatehouse_rate_limit_fallbacks_total",
            "Requests a rate_limit with a store decided by its on_store_error policy (store down or slow)",
            &["plugin"],
        ),
        registry: r,
    };
    f.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    f
});

/// Methods with a series of their own; others count as `OTHER`.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The cache statuses of `x-cache-status`, in a fixed order.
pub const CACHE_STATUSES: [&str; 7] = [
    "HIT",
    "MISS",
    "EXPIRED",
    "STALE",
    "REVALIDATED",
    "UPDATING",
    "BYPASS",
];

/// One route's handles (or a gateway's, for requests no route matched).
pub struct RouteMetrics {
    /// `[method][class]`; the last method row is `OTHER`.
    requests: Vec<[IntCounter; 5]>,
    duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    cache: Vec<IntCounter>,
}

impl RouteMetrics {
    /// The handles of a route; `cached`: it has a cache, and cache series.
    pub fn new(gateway: &str, route: &str, cached: bool) -> RouteMetrics {
        let m = &*METRICS;
        let row = |method: &str| {
            CLASSES.map(|c| m.requests.with_label_values(&[gateway, route, method, c]))
        };
        let mut requests: Vec<[IntCounter; 5]> = METHODS.iter().map(|x| row(x)).collect();
        requests.push(row("OTHER"));
        RouteMetrics {
            requests,
            duration: m.duration.with_label_values(&[gateway, route]),
            request_bytes: m.request_bytes.with_label_values(&[gateway, route]),
            response_bytes: m.response_bytes.with_label_values(&[gateway, route]),
            cache: if cached {
                CACHE_STATUSES
                    .iter()
                    .map(|s| m.cache.with_label_values(&[gateway, route, s]))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The series of a route that a reload removed: gone from `/metrics` (a handle an
    /// in-flight request of the old snapshot still holds counts into nothing).
    pub fn forget(gateway: &str, route: &str) {
        let m = &*METRICS;
        for method in METHODS.iter().chain(["OTHER"].iter()) {
            for c in CLASSES {
                let _ = m.requests.remove_label_values(&[gateway, route, method, c]);
            }
        }
        let _ = m.duration.remove_label_values(&[gateway, route]);
        let _ = m.request_bytes.remove_label_values(&[gateway, route]);
        let _ = m.response_bytes.remove_label_values(&[gateway, route]);
        Self::forget_cache(gateway, route);
    }

    /// The cache series of a route that a reload left without a cache (or removed).
    pub fn forget_cache(gateway: &str, route: &str) {
        for s in CACHE_STATUSES {
            let _ = METRICS.cache.remove_label_values(&[gateway, route, s]);
        }
    }

    /// One finished request. `status` 0 (no answer was sent) counts nowhere but duration.
    pub fn record(
        &self,
        method: &http::Method,
        status: u16,
        seconds: f64,
        read: usize,
        sent: usize,
        cache: Option<&str>,
    ) {
        let row = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len());
        if (100..600).contains(&status) {
            self.requests[row][usize::from(status / 100 - 1)].inc();
        }
        self.duration.observe(seconds);
        self.request_bytes.inc_by(read as u64);
        self.response_bytes.inc_by(sent as u64);
        if let Some(s) = cache {
            if let Some(c) = CACHE_STATUSES
                .iter()
                .position(|c| *c == s)
                .and_then(|i| self.cache.get(i))
            {
                c.inc();
            }
        }
    }
}

/// Statuses plugins answer with, resolved once per instance: the refusal path then costs an
/// atomic add, like the rest.
const REFUSALS: [u16; 9] = [400, 401, 403, 405, 411, 413, 429, 502, 503];

/// A plugin instance's handles: a duration histogram per phase it acts in, refusal counters.
pub fn plugin_meter(
    name: &str,
    kind: &'static str,
    phases: gatehouse_plugins::Phases,
) -> gatehouse_plugins::Meter {
    use gatehouse_plugins::Phases;
    let m = &*METRICS;
    let mut duration: [Option<Histogram>; 6] = Default::default();
    for (i, (slot, phase)) in duration.iter_mut().zip(Phases::NAMES).enumerate() {
        if phases.contains(Phases::bit(i)) {
            *slot = Some(m.plugin_duration.with_label_values(&[name, kind, phase]));
        }
    }
    let refuses = phases.contains(Phases::REQUEST) || phases.contains(Phases::REQUEST_BODY);
    let refusals = if refuses {
        REFUSALS
            .iter()
            .map(|s| {
                let c = m
                    .plugin_refusals
                    .with_label_values(&[name, kind, s.to_string().as_str()]);
                (*s, c)
            })
            .collect()
    } else {
        Vec::new()
    };
    let owner = name.to_string();
    gatehouse_plugins::Meter {
        duration,
        refusals,
        other: Some(Box::new(move |s: u16| {
            METRICS
                .plugin_refusals
                .with_label_values(&[owner.as_str(), kind, s.to_string().as_str()])
                .inc()
        })),
    }
}

pub fn connections(gateway: &str) -> IntGauge {
    METRICS.connections.with_label_values(&[gateway])
}

pub fn reloaded(ok: bool) {
    METRICS
        .reloads
        .with_label_values(&[if ok { "success" } else { "failure" }])
        .inc();
}

/// A gateway's `gatehouse_tls_handshake_failures_total`, one counter per reason, in the
/// order of `crate::tls::failures::REASONS`: resolved once, so a flood of failing handshakes
/// takes no label lookup.
pub fn tls_handshake_failures(gateway: &str) -> Vec<IntCounter> {
    crate::tls::failures::REASONS
        .iter()
        .map(|r| {
            METRICS
                .tls_handshake_failures
                .with_label_values(&[gateway, r])
        })
        .collect()
}

/// The text exposition of every family, state gauges read from `rt` first.
pub fn render(rt: &Runtime) -> String {
    let m = &*METRICS;
    // Peers and upstreams of this snapshot only: a removed one must not linger as healthy.
    m.peer_healthy.reset();
    m.circuit_open.reset();
    for pool in &rt.pools {
        for (i, p) in pool.peers().iter().enumerate() {
            let up = pool.healthy(i) && !pool.ejected(i);
            m.peer_healthy
                .with_label_values(&[&*pool.name, p.addr.to_string().as_str()])
                .set(i64::from(up));
        }
        if let Some(b) = &pool.breaker {
            m.circuit_open
                .with_label_values(&[&*pool.name])
                .set(i64::from(b.state_name() != "closed"));
        }
    }
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&m.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_build() {
        let r = RouteMetrics::new("g", "r", true);
        r.record(&http::Method::GET, 204, 0.01, 3, 0, Some("HIT"));
        r.record(
            &http::Method::from_bytes(b"PURGE").unwrap(),
            502,
            0.5,
            0,
            10,
            None,
        );
        let text = {
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&METRICS.registry.gather(), &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(text.contains(
            "gatehouse_requests_total{gateway=\"g\",method=\"GET\",route=\"r\",status=\"2xx\"} 1"
        ));
        assert!(text.contains(
            "gatehouse_requests_total{gateway=\"g\",method=\"OTHER\",route=\"r\",status=\"5xx\"} 1"
        ));
        assert!(text.contains(
            "gatehouse_cache_requests_total{gateway=\"g\",route=\"r\",status=\"HIT\"} 1"
        ));
        assert!(text.contains("gatehouse_build_info{version="));
    }
}
