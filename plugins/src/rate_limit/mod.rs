//! `rate_limit`: requests per second or minute per key, or requests in flight per key, on
//! pingora-limits.
//!
//! Rates count in two-slot windows of pingora-limits' `Estimator` (a count-min sketch per
//! window: fixed memory whatever the number of keys) with a sliding-window estimate, `previous × (1 − elapsed) + current`,
//! so a client cannot double its rate across a window boundary. Two such windows are checked:
//! the whole period (at most `rate + burst` requests in any period) and a slice of it (a tenth,
//! or less for rates under 10 per period: at most `rate / slices + burst` per slice), so a
//! flood is spread over the period as nginx's `limit_req` spreads it, instead of the whole
//! period's allowance going out at once. Refused requests are not counted. Keys that collide
//! in the sketch share a count: with many thousands of active keys a client may be limited
//! slightly early, never late. IPv6 clients are counted per /64. A `header:NAME` key is what
//! the client says: use it behind authentication (or for fairness, not for protection).
//!
//! Refusals are 429 with `Retry-After` and the IETF `RateLimit-Limit`, `RateLimit-Remaining`,
//! `RateLimit-Reset` headers (draft-ietf-httpapi-ratelimit-headers); `headers = true` adds the
//! three to every response.
//!
//! So `rate = "50/s"` with `burst = 0` paces a client at one request per 20 ms (a 3-second
//! flood gets ~150 through), and `burst = 10` lets 10 more through at once on top, as nginx's
//! `limit_req rate=50r/s burst=10 nodelay`. `spread = false` counts the period alone: the
//! whole allowance may go at once (a quota, as Kong's and APISIX's counters).
//!
//! With `store = "NAME"` the count is shared by every replica that names the same store
//! (`[stores.NAME]`, Redis): the same two windows, counted atomically by one script on the
//! store, one round trip per request; a key the store refused is refused locally, with no
//! round trip, until it has room again. When the store does not answer within its timeout
//! (or is backing off after errors), `on_store_error` decides: `local` (the default) counts
//! here at the limit divided by `replicas` (when set), `allow` lets the request through,
//! `deny` answers 503. Each such request counts in `gatehouse_rate_limit_fallbacks_total`.
//!
//! `sync_every` (approximate mode, for very hot keys) takes the store off the request path:
//! each replica counts here on top of the fleet's totals as of the last sync, and a task sends
//! its counts and takes the totals back every `sync_every`. Between two syncs each replica
//! assumes the others let through as many as it did (`replicas`), so the fleet overshoots by
//! what arrives unevenly within one interval; when no sync has been answered for three
//! intervals, `on_store_error` applies.
//!
//! ```toml
//! [plugins.per-ip]
//! kind = "rate_limit"
//! key = "client_ip"          # client_ip | consumer | header:NAME | route
//! rate = "50/s"              # N/s or N/m
//! burst = 10
//! spread = true              # false: a quota per period, no pacing within it
//! # or, instead of rate: concurrency = 20   (requests in flight per key)
//! store = "shared"           # count across replicas ([stores.shared])
//! on_store_error = "local"   # local | allow | deny
//! replicas = 4               # the local fallback counts limit / 4
//! ```
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_limits::inflight::Inflight;
use pingora_proxy::Session;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::store::{BuildEnv, SharedCounter, WindowRule};

mod approx;
mod window;

use crate::{refuse, Decision, Phases, Plugin, PluginCtx};
use approx::Approx;
use window::Window;

/// What requests are counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBy {
    ClientIp,
    /// The authenticated consumer; requests without one are counted by client address.
    Consumer,
    /// A request header's value; requests without it are counted by client address.
    Header(HeaderName),
    /// All requests of the route together.
    Route,
}

impl<'de> Deserialize<'de> for KeyBy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "client_ip" => KeyBy::ClientIp,
            "consumer" => KeyBy::Consumer,
            "route" => KeyBy::Route,
            _ => match s.strip_prefix("header:") {
                Some(h) => KeyBy::Header(HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    de::Error::custom(format!("invalid header name {h:?} in key {s:?}"))
                })?),
                None => {
                    return Err(de::Error::custom(format!(
                        "invalid key {s:?}: expected client_ip, consumer, header:NAME or route"
                    )))
                }
            },
        })
    }
}

/// `"50/s"`, `"600/m"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    pub count: u32,
    pub per: Duration,
}

impl<'de> Deserialize<'de> for RateSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            de::Error::custom(format!(
                "invalid rate {s:?} (write e.g. \"50/s\" or \"600/m\")"
            ))
        };
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(de::Error::custom(
                "a rate of 0 refuses everything; use ip_filter to block",
            ));
        }
        Ok(RateSpec { count, per })
    }
}

fn default_key() -> KeyBy {
    KeyBy::ClientIp
}

/// What a rate limit with a store does while the store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Count here, at the limit divided by `replicas` (when set).
    #[default]
    Local,
    /// Let requests through, uncounted.
    Allow,
    /// Refuse them (503).
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_key")]
    pub key: KeyBy,
    pub rate: Option<RateSpec>,
    #[serde(default)]
    pub burst: u32,
    pub concurrency: Option<u32>,
    /// Send the RateLimit-* headers on every response, not only on 429.
    #[serde(default)]
    pub headers: bool,
    /// Spread the allowance over the period (the default), or let it all go at once as a
    /// quota (`false`: Kong's and APISIX's per-minute counters do so).
    #[serde(default = "crate::config::default_true")]
    pub spread: bool,
    /// A `[stores.NAME]` to count in, shared with the other replicas.
    pub store: Option<String>,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// How many replicas share the store: the `local` fallback counts `limit / replicas`.
    pub replicas: Option<u32>,
    /// Approximate mode: count here and tell the store every so often (no round trip on the
    /// request path); the fleet may overshoot by what the replicas let through in between.
    pub sync_every: Option<crate::config::Dur>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        match (self.rate, self.concurrency) {
            (None, None) => Err("set `rate` (e.g. \"50/s\") or `concurrency`".into()),
            (Some(_), Some(_)) => Err("set either `rate` or `concurrency`, not both \
                                       (use two rate_limit plugins for both)"
                .into()),
            (None, Some(0)) => Err("`concurrency = 0` refuses everything".into()),
            (None, Some(_)) if self.burst > 0 => Err("`burst` applies to `rate` only".into()),
            (None, Some(_)) if self.store.is_some() => Err("`store` applies to `rate` only \
                                                             (requests in flight are counted per replica)"
                .into()),
            _ if self.store.is_none() && self.replicas.is_some() => {
                Err("`replicas` applies with a `store` only".into())
            }
            _ if self.replicas == Some(0) => Err("`replicas` must be at least 1".into()),
            _ if self.store.is_none() && self.sync_every.is_some() => {
                Err("`sync_every` applies with a `store` only".into())
            }
            _ if self
                .sync_every
                .as_ref()
                .is_some_and(|d| d.0 < Duration::from_millis(10) || d.0 > Duration::from_secs(10)) =>
            {
                Err("`sync_every` must be between 10ms and 10s".into())
            }
            _ => Ok(()),
        }
    }
}

enum Limiter {
    Rate {
        period: Window,
        slice: Window,
        slice_limit: f64,
        spec: RateSpec,
    },
    Concurrency {
        inflight: Inflight,
        max: isize,
    },
}

pub struct RateLimit {
    key: KeyBy,
    /// Counting here: the limiter, or with a store its `local` fallback.
    limiter: Limiter,
    /// What `limiter` allows per period (what the headers report when it decides).
    limit: u32,
    headers: bool,
    shared: Option<Shared>,
}

/// Counting in a store, with every replica that names it.
struct Shared {
    store: Arc<dyn SharedCounter>,
    rule: WindowRule,
    limit: u32,
    period: Duration,
    on_error: OnStoreError,
    /// `rl:PLUGIN:`: every replica with the same config counts under the same keys.
    prefix: Vec<u8>,
    /// Keys the store refused, until they have room again: refused here, no round trip.
    over: quick_cache::sync::Cache<u64, Instant>,
    fallbacks: Option<prometheus::IntCounter>,
    /// `sync_every`: counted here, synced in the background.
    approx: Option<Arc<Approx>>,
}

/// IPv6 clients are counted per /64: one site gets a whole /64 and could otherwise rotate
/// addresses to escape its limit. IPv4 addresses count one by one (IPv4-mapped ones too).
/// The core counts connections per address the same way (`max_connections_per_ip`).
pub fn per_site(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// The counted key, borrowed from the request: hashing it needs no allocation.
#[derive(Hash)]
enum Key<'a> {
    Ip(Option<IpAddr>),
    Text(&'a [u8]),
}

/// Keys longer than this are hashed in the store (a header may be kilobytes).
const STORE_KEY_MAX: usize = 96;

impl Key<'_> {
    fn hash64(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// The key's name in the store after `prefix`: readable when short (`ip:10.0.0.1`,
    /// `k:alice`), a SHA-256 when long; the same on every replica and version.
    fn store_key(&self, prefix: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(prefix.len() + 48);
        out.extend_from_slice(prefix);
        match self {
            Key::Ip(Some(ip)) => {
                let _ = write!(out, "ip:{ip}");
            }
            Key::Ip(None) => out.extend_from_slice(b"ip:-"),
            // Braces would make a Redis Cluster hash tag: a client could pick the slot.
            Key::Text(t)
                if t.len() <= STORE_KEY_MAX && !t.iter().any(|b| matches!(b, b'{' | b'}')) =>
            {
                out.extend_from_slice(b"k:");
                out.extend_from_slice(t);
            }
            Key::Text(t) => {
                use sha2::Digest;
                out.extend_from_slice(b"h:");
                out.extend_from_slice(hex::encode(sha2::Sha256::digest(t)).as_bytes());
            }
        }
        out
    }
}

impl Shared {
    /// The store's verdict, or `None` when the store cannot answer (then `on_error`).
    async fn decide(&self, key: &Key<'_>, hash: u64) -> Option<Verdict> {
        if let Some(a) = &self.approx {
            let (ok, remaining) = a.decide(key, hash, &self.prefix)?;
            return Some(if ok {
                Verdict {
                    ok,
                    remaining,
                    reset_secs: 1,
                }
            } else {
                // Room comes back when a sync says the window moved.
                self.refused(a.every.as_millis() as u64)
            });
        }
        let now = Instant::now();
        if let Some(until) = self.over.get(&hash) {
            if until > now {
                return Some(self.refused((until - now).as_millis() as u64));
            }
            self.over.remove(&hash);
        }
        let v = self
            .store
            .hit(&key.store_key(&self.prefix), &self.rule, 1, false)
            .await
            .ok()?;
        if v.ok {
            return Some(Verdict {
                ok: true,
                remaining: v.remaining,
                reset_secs: v
                    .retry_ms
                    .div_ceil(1000)
                    .clamp(1, self.period.as_secs().max(1)),
            });
        }
        let retry = v.retry_ms.max(1);
        self.over.insert(hash, now + Duration::from_millis(retry));
        Some(self.refused(retry))
    }

    fn refused(&self, retry_ms: u64) -> Verdict {
        Verdict {
            ok: false,
            remaining: 0,
            // Whole seconds, rounded up: a client waiting this long finds room.
            reset_secs: retry_ms
                .div_ceil(1000)
                .clamp(1, self.period.as_secs().max(1)),
        }
    }
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// The verdict for one request, with what the headers report.
struct Verdict {
    ok: bool,
    remaining: u64,
    reset_secs: u64,
}

/// How many slices a period is cut into: a tenth each, fewer for rates under 10 per period,
/// one (the period itself) when the allowance is not spread.
fn slices(spec: RateSpec, spread: bool) -> u32 {
    if spread {
        spec.count.clamp(1, 10)
    } else {
        1
    }
}

fn local_limiter(spec: RateSpec, burst: u32, spread: bool) -> (Limiter, u32) {
    let slices = slices(spec, spread);
    (
        Limiter::Rate {
            period: Window::new(spec.per),
            slice: Window::new(spec.per / slices),
            slice_limit: f64::from(spec.count) / f64::from(slices) + f64::from(burst),
            spec,
        },
        spec.count.saturating_add(burst),
    )
}

/// Distinct keys remembered as over their limit, per plugin: a flood of fresh keys evicts
/// old entries (they then cost a round trip again), never grows memory.
const OVER_KEYS: usize = 16 * 1024;

impl RateLimit {
    pub fn new(c: Config, env: &BuildEnv) -> Self {
        let store = c.store.as_ref().and_then(|n| env.stores.get(n).cloned());
        let (limiter, limit) = match (c.rate, c.concurrency) {
            (Some(spec), _) => match (&store, c.replicas) {
                // The local fallback of a shared limit: this replica's share.
                (Some(_), Some(n)) if n > 1 => local_limiter(
                    RateSpec {
                        count: spec.count.div_ceil(n),
                        per: spec.per,
                    },
                    c.burst.div_ceil(n),
                    c.spread,
                ),
                _ => local_limiter(spec, c.burst, c.spread),
            },
            (None, max) => {
                let max = max.unwrap_or(1);
                (
                    Limiter::Concurrency {
                        inflight: Inflight::new(),
                        max: max as isize,
                    },
                    max,
                )
            }
        };
        let shared = match (store, c.rate) {
            (Some(store), Some(spec)) => {
                let slices = slices(spec, c.spread);
                let period_ms = spec.per.as_millis() as u64;
                let slice_limit = f64::from(spec.count) / f64::from(slices) + f64::from(c.burst);
                let mut prefix = b"rl:".to_vec();
                prefix.extend_from_slice(env.name.as_bytes());
                prefix.push(b':');
                let rule = WindowRule {
                    period_ms,
                    limit: u64::from(spec.count) + u64::from(c.burst),
                    slice_ms: period_ms / u64::from(slices),
                    slice_limit_milli: (slice_limit * 1000.0).round() as u64,
                };
                Some(Shared {
                    store: store.clone(),
                    rule,
                    limit: spec.count.saturating_add(c.burst),
                    period: spec.per,
                    on_error: c.on_store_error,
                    prefix,
                    over: quick_cache::sync::Cache::new(OVER_KEYS),
                    fallbacks: env.fallbacks.clone(),
                    approx: c.sync_every.as_ref().map(|d| {
                        Arc::new(Approx::new(
                            store.clone(),
                            rule,
                            d.0,
                            u64::from(c.replicas.unwrap_or(1)),
                            OVER_KEYS,
                        ))
                    }),
                })
            }
            _ => None,
        };
        RateLimit {
            key: c.key,
            limiter,
            limit,
            headers: c.headers,
            shared,
        }
    }

    fn key<'a>(&'a self, s: &'a Session, cx: &'a PluginCtx) -> Key<'a> {
        match &self.key {
            KeyBy::ClientIp => Key::Ip(cx.client_ip.map(per_site)),
            KeyBy::Consumer => match cx.consumer() {
                Some(c) => Key::Text(c.as_bytes()),
                None => Key::Ip(cx.client_ip.map(per_site)),
            },
            KeyBy::Header(h) => match s.req_header().headers.get(h) {
                Some(v) => Key::Text(v.as_bytes()),
                None => Key::Ip(cx.client_ip.map(per_site)),
            },
            KeyBy::Route => Key::Text(cx.route.as_deref().unwrap_or("").as_bytes()),
        }
    }

    fn check(&self, key: u64, cx: &mut PluginCtx) -> Verdict {
        match &self.limiter {
            Limiter::Rate {
                period,
                slice,
                slice_limit,
                spec,
            } => {
                let limit = f64::from(self.limit);
                let (estimate, left, period_slot) = period.estimate(key);
                let (in_slice, slice_left, slice_slot) = slice.estimate(key);
                let period_ok = estimate < limit;
                let ok = period_ok && in_slice < *slice_limit;
                if ok {
                    period.add(period_slot, key);
                    slice.add(slice_slot, key);
                }
                // When only the slice refused, room comes back when the slice moves on.
                let wait = if period_ok { slice_left } else { left };
                Verdict {
                    ok,
                    remaining: if ok {
                        (limit - estimate - 1.0).max(0.0) as u64
                    } else {
                        0
                    },
                    // Whole seconds, rounded up: a client waiting this long finds room.
                    reset_secs: (wait.ceil() as u64).clamp(1, spec.per.as_secs().max(1)),
                }
            }
            Limiter::Concurrency { inflight, max } => {
                let (guard, n) = inflight.incr(key, 1);
                let ok = n <= *max;
                if ok {
                    cx.keep(self, guard);
                }
                Verdict {
                    ok,
                    remaining: (*max - n).max(0) as u64,
                    reset_secs: 1,
                }
            }
        }
    }

    fn header_values(&self, limit: u32, v: &Verdict) -> [(HeaderName, HeaderValue); 3] {
        [
            (RATELIMIT_LIMIT.clone(), HeaderValue::from(limit)),
            (RATELIMIT_REMAINING.clone(), HeaderValue::from(v.remaining)),
            (RATELIMIT_RESET.clone(), HeaderValue::from(v.reset_secs)),
        ]
    }
}

/// What `headers = true` reports on the response, kept from the request hook.
struct Reported([(HeaderName, HeaderValue); 3]);

#[async_trait]
impl Plugin for RateLimit {
    fn kind(&self) -> &'static str {
        "rate_limit"
    }

    fn phases(&self) -> Phases {
        if self.headers {
            Phases::REQUEST.union(Phases::RESPONSE)
        } else {
            Phases::REQUEST
        }
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let key = self.key(s, cx);
        let hash = key.hash64();
        let (limit, v) = match &self.shared {
            None => (self.limit, self.check(hash, cx)),
            Some(sh) => match sh.decide(&key, hash).await {
                Some(v) => (sh.limit, v),
                None => {
                    if let Some(c) = &sh.fallbacks {
                        c.inc();
                    }
                    match sh.on_error {
                        OnStoreError::Local => (self.limit, self.check(hash, cx)),
                        OnStoreError::Allow => return Ok(Decision::Continue),
                        OnStoreError::Deny => {
                            return Ok(refuse(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "rate limit store unavailable",
                                cx,
                                vec![(http::header::RETRY_AFTER, HeaderValue::from_static("1"))],
                            ))
                        }
                    }
                }
            },
        };
        if v.ok {
            if self.headers {
                cx.keep(self, Reported(self.header_values(limit, &v)));
            }
            return Ok(Decision::Continue);
        }
        let mut headers = self.header_values(limit, &v).to_vec();
        headers.push((http::header::RETRY_AFTER, HeaderValue::from(v.reset_secs)));
        Ok(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded",
            cx,
            headers,
        ))
    }

    async fn response(
        &self,
        _s: &mut Session,
        resp: &mut ResponseHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        if resp.status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(());
        }
        if let Some(r) = cx.kept::<_, Reported>(self) {
            for (n, v) in &r.0 {
                let _ = resp.insert_header(n.clone(), v.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, StrDeserializer};
    use serde::de::IntoDeserializer;

    fn de<T: for<'a> Deserialize<'a>>(s: &str) -> Result<T, DeError> {
        let d: StrDeserializer<DeError> = s.into_deserializer();
        T::deserialize(d)
    }

    #[test]
    fn store_keys_are_readable_or_hashed() {
        let p = b"rl:x:";
        assert_eq!(Key::Text(b"alice").store_key(p), b"rl:x:k:alice");
        let ip = Key::Ip(Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ip.store_key(p), b"rl:x:ip:10.0.0.1");
        // Braces would pick a Redis Cluster slot; long values are hashed too.
        for t in [&b"{slot}"[..], &[b'a'; 200][..]] {
            let k = Key::Text(t).store_key(p);
            assert!(k.starts_with(b"rl:x:h:") && k.len() == 7 + 64, "{k:?}");
        }
    }

    #[test]
    fn parses_rates_and_keys() {
        assert_eq!(de::<RateSpec>("50/s").unwrap().count, 50);
        assert_eq!(
            de::<RateSpec>("600/m").unwrap().per,
            Duration::from_secs(60)
        );
        assert!(de::<RateSpec>("50").is_err());
        assert!(de::<RateSpec>("50/h").is_err());
        assert!(de::<RateSpec>("0/s").is_err());
        assert_eq!(de::<KeyBy>("route").unwrap(), KeyBy::Route);
        assert_eq!(
            de::<KeyBy>("header:X-User").unwrap(),
            KeyBy::Header(HeaderName::from_static("x-user"))
        );
        assert!(de::<KeyBy>("cookie:x").is_err());
    }
}
