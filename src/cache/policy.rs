//! Storability and freshness of a response for a shared cache, per RFC 9111: what may be
//! stored (§3, §3.5), how long it is fresh (§4.2.1), how old it already is (§4.2.3), and
//! when stale may be served (§4.2.4, RFC 5861). Pingora's own `resp_cacheable` leaves out
//! Age and Date, heuristics, Set-Cookie, `Vary: *` and statuses; this covers them.
use std::time::{Duration, SystemTime};

use http::{header, StatusCode};
use pingora_cache::cache_control::CacheControl;
use pingora_cache::{CacheMeta, NoCacheReason, RespCacheable};
use pingora_http::ResponseHeader;

use super::targeted::targeted;
use super::Tags;

/// The request carried credentials and the response did not allow sharing it (§3.5).
pub const AUTHORIZED: &str = "authorized request";
/// The client asked not to store (`Cache-Control: no-store`).
pub const BYPASS: &str = "bypass";
const VARY_IDENTITY: &str = "vary on a header the gateway sets";
const SET_COOKIE: &str = "set-cookie without public";
const VARY_ALL: &str = "vary: *";
const STATUS: &str = "status not cacheable";

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1).
fn heuristic_status(s: u16) -> bool {
    matches!(
        s,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn uncacheable(reason: &'static str) -> RespCacheable {
    RespCacheable::Uncacheable(NoCacheReason::Custom(reason))
}

/// Seconds of a delta-seconds directive; a malformed one counts as 0 (§4.2.1: treat as stale).
fn secs(v: pingora_error::Result<Option<u32>>) -> Option<u64> {
    match v {
        Ok(v) => v.map(u64::from),
        Err(_) => Some(0),
    }
}

/// As [`secs`], and a directive written without its value (`max-age`) is 0 too.
fn present(cc: &CacheControl, name: &str, v: pingora_error::Result<Option<u32>>) -> Option<u64> {
    secs(v).or_else(|| cc.has_key(name).then_some(0))
}

fn date(resp: &ResponseHeader, name: header::HeaderName) -> Option<SystemTime> {
    let mut values = resp.headers.get_all(name).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// The largest age or lifetime a cache must handle (RFC 9111 §1.2.2): larger values count as
/// this one, so no arithmetic on times can overflow.
pub(super) const MAX_SECS: u64 = 1 << 31;

/// How old the response was when it reached us (§4.2.3, without the response delay, which
/// on a gateway's own link is below the one-second resolution).
pub fn initial_age(resp: &ResponseHeader, now: SystemTime) -> u64 {
    // §5.1: a list is a sender's error; its first member is the value (a cache that took
    // `Age: 7200, 0` for no age would serve a stale answer as fresh). Anything but digits
    // (`10abc`, `-1`, `1.5`) is invalid, and ignored.
    let age_value = resp
        .headers
        .get(header::AGE)
        .map(|v| {
            let v = v.as_bytes();
            v[..memchr::memchr(b',', v).unwrap_or(v.len())].trim_ascii()
        })
        .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_digit))
        .map_or(0, |v| {
            // Digits only: too many of them is "very old", not an error.
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(MAX_SECS)
        })
        .min(MAX_SECS);
    let apparent = date(resp, header::DATE)
        .and_then(|d| now.duration_since(d).ok())
        .map_or(0, |d| d.as_secs());
    apparent.max(age_value).min(MAX_SECS)
}

/// A route's response cache settings (`cache = { ... }`); freshness itself comes from the
/// responses (RFC 9111), these are the defaults and bounds around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRoute {
    /// Freshness for storable responses that carry none (`0`: only what the origin marks).
    pub ttl: std::time::Duration,
    /// Larger responses go through uncached.
    pub max_size: usize,
    /// How long concurrent misses on one key wait for the first to fill it.
    pub lock_timeout: std::time::Duration,
    /// Defaults when the response says nothing (RFC 5861), in seconds.
    pub stale_while_revalidate: u32,
    pub stale_if_error: u32,
    pub tag_header: http::HeaderName,
    pub expose_tags: bool,
    pub status_header: Option<http::HeaderName>,
    /// The targeted Cache-Control field this cache obeys over Cache-Control (RFC 9213);
    /// `None`: Cache-Control only.
    pub targeted_cache_control: Option<http::HeaderName>,
}

/// What the request adds to the decision.
#[derive(Default)]
pub struct Asked<'a> {
    /// The request carried credentials (Authorization, or what the route's auth plugins read).
    pub authorized: bool,
    /// The client said `no-store`: serve from the cache, store nothing.
    pub no_store: bool,
    /// Headers the gateway may write on the upstream request (forwarded headers, trace
    /// context, consumer, claims, transforms): a `Vary` on one cannot be matched against the
    /// client's request.
    pub gateway_writes: &'a [header::HeaderName],
    /// A plugin on the route does not say what it writes: it may be any header.
    pub gateway_writes_any: bool,
    /// This decision refreshes a stale entry after a 304: the 304's age and Date, which the
    /// stored head (Pingora merges only some fields) does not carry.
    pub revalidated: Option<(u64, Option<SystemTime>)>,
    /// The request's URL as purges name it.
    pub url: String,
}

/// The route's decision on a response.
pub fn decide(
    route: &CacheRoute,
    asked: &Asked,
    resp: &ResponseHeader,
    now: SystemTime,
) -> RespCacheable {
    if asked.no_store {
        return uncacheable(BYPASS);
    }
    let authorized = asked.authorized;
    let status = resp.status.as_u16();
    // Partial content is not the representation; informational and 5xx answers (but 501)
    // are about this one exchange.
    if resp.status == StatusCode::PARTIAL_CONTENT || resp.status.is_informational() {
        return uncacheable(STATUS);
    }
    // RFC 9213: a targeted field this cache obeys, when it parses, replaces Cache-Control
    // and Expires for it (the client still gets both).
    let targeted = route
        .targeted_cache_control
        .as_ref()
        .and_then(|name| targeted(resp, name));
    let obeys_targeted = targeted.is_some();
    let cc = targeted.or_else(|| CacheControl::from_resp_headers(resp));
    let has = |f: fn(&CacheControl) -> bool| cc.as_ref().is_some_and(f);
    if has(CacheControl::no_store) || has(CacheControl::private) {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    }
    let public = has(CacheControl::public);
    let s_maxage = cc
        .as_ref()
        .and_then(|c| present(c, "s-maxage", c.s_maxage()));
    let must_revalidate = has(CacheControl::must_revalidate);
    if authorized && !(public || s_maxage.is_some() || must_revalidate) {
        return uncacheable(AUTHORIZED);
    }
    if resp.headers.contains_key(header::SET_COOKIE) && !public {
        return uncacheable(SET_COOKIE);
    }
    let vary_all = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii() == b"*")
    });
    if vary_all {
        return uncacheable(VARY_ALL);
    }
    let vary_identity = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            !t.is_empty()
                && (asked.gateway_writes_any
                    || (asked.gateway_writes.iter())
                        .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes())))
        })
    });
    if vary_identity {
        return uncacheable(VARY_IDENTITY);
    }
    // After a 304 the entry's Date is the 304's (§4.3.4), so Expires counts from it.
    let date_value = match asked.revalidated {
        Some((_, d)) => Some(d.unwrap_or(now)),
        None => date(resp, header::DATE),
    };

    // §4.2.1: s-maxage, then max-age, then Expires less Date.
    let explicit = s_maxage
        .or_else(|| cc.as_ref().and_then(|c| present(c, "max-age", c.max_age())))
        .or_else(|| {
            if obeys_targeted || !resp.headers.contains_key(header::EXPIRES) {
                return None;
            }
            // An invalid Expires (or two) means "already expired" (§5.3).
            let expires = date(resp, header::EXPIRES)?;
            let base = date_value.unwrap_or(now);
            Some(expires.duration_since(base).map_or(0, |d| d.as_secs()))
        })
        .or_else(|| (!obeys_targeted && resp.headers.contains_key(header::EXPIRES)).then_some(0))
        .map(|l| l.min(MAX_SECS));
    let lifetime = match explicit {
        // Explicit freshness makes any final status storable (§3) but server errors, which
        // speak of this one exchange.
        Some(l) if status < 500 || status == 501 => l,
        Some(_) => return uncacheable(STATUS),
        // §4.2.2: a heuristic (here the route's ttl) only for statuses that allow one, or
        // a response marked public.
        None if !route.ttl.is_zero() && (heuristic_status(status) || public) => route.ttl.as_secs(),
        None if heuristic_status(status) || public => {
            return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache)
        }
        None => return uncacheable(STATUS),
    };

    let no_cache = has(CacheControl::no_cache);
    let age = match asked.revalidated {
        Some((a, _)) => a.min(MAX_SECS),
        None => initial_age(resp, now),
    };
    let past = |secs: u64| {
        now.checked_sub(Duration::from_secs(secs))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let fresh_until = if no_cache || lifetime <= age {
        // Stored, but every use revalidates first.
        past(1)
    } else {
        now.checked_add(Duration::from_secs(lifetime - age))
            .unwrap_or(now)
    };
    // Serving stale is off when the origin forbids it (§4.2.4, §5.2.2.2, §5.2.2.8, s-maxage
    // implies proxy-revalidate).
    let strict =
        must_revalidate || has(CacheControl::proxy_revalidate) || s_maxage.is_some() || no_cache;
    let (swr, sie) = if strict {
        (0, 0)
    } else {
        let pick = |v: Option<u64>, default: u32| {
            v.map_or(default, |v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        (
            pick(
                cc.as_ref()
                    .and_then(|c| c.stale_while_revalidate().ok().flatten().map(u64::from)),
                route.stale_while_revalidate,
            ),
            pick(
                cc.as_ref()
                    .and_then(|c| c.stale_if_error().ok().flatten().map(u64::from)),
                route.stale_if_error,
            ),
        )
    };

    let mut stored = resp.clone();
    if let Some((_, Some(d))) = asked.revalidated {
        let _ = stored.insert_header(header::DATE, httpdate::fmt_http_date(d));
    }
    // A public response's cookie was meant for the client it went to, not for everyone
    // served from the copy; `private="x"` / `no-cache="x"` fields are not shared either.
    stored.remove_header(&header::SET_COOKIE);
    if let Some(c) = &cc {
        let mut named: Vec<String> = Vec::new();
        for it in [c.private_field_names(), c.no_cache_field_names()]
            .into_iter()
            .flatten()
        {
            for f in it {
                if let Ok(s) = std::str::from_utf8(f) {
                    named.push(s.trim().to_ascii_lowercase());
                }
            }
        }
        for n in named {
            stored.remove_header(n.as_str());
        }
    }
    let mut meta = CacheMeta::new(fresh_until, now, swr, sie, stored);
    meta.set_epoch_override(past(age));
    let tags: Vec<Box<str>> = resp
        .headers
        .get_all(&route.tag_header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_ascii_whitespace)
        .filter(|t| t.len() <= 256)
        .take(64)
        .map(Box::from)
        .collect();
    meta.extensions_mut().insert(Tags {
        url: asked.url.clone().into_boxed_str(),
        tags,
    });
    RespCacheable::Cacheable(meta)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::cache) fn route(ttl: u64) -> CacheRoute {
        CacheRoute {
            ttl: Duration::from_secs(ttl),
            max_size: 1 << 20,
            lock_timeout: Duration::from_secs(5),
            stale_while_revalidate: 0,
            stale_if_error: 0,
            tag_header: http::HeaderName::from_static("surrogate-key"),
            expose_tags: false,
            status_header: None,
            targeted_cache_control: Some(http::HeaderName::from_static("cdn-cache-control")),
        }
    }

    pub(in crate::cache) fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    /// Seconds of freshness left, or None when not stored.
    pub(in crate::cache) fn fresh(
        route: &CacheRoute,
        auth: bool,
        r: &ResponseHeader,
    ) -> Option<i64> {
        let now = SystemTime::now();
        let asked = Asked {
            authorized: auth,
            ..Asked::default()
        };
        match decide(route, &asked, r, now) {
            RespCacheable::Cacheable(m) => Some(match m.fresh_until().duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(_) => -1,
            }),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn storability() {
        let r = route(60);
        assert_eq!(
            fresh(&r, false, &resp(200, &[])),
            Some(60),
            "route ttl as default"
        );
        assert_eq!(
            fresh(&route(0), false, &resp(200, &[])),
            None,
            "ttl 0: origin must say"
        );
        assert_eq!(
            fresh(
                &route(0),
                false,
                &resp(200, &[("cache-control", "max-age=30")])
            ),
            Some(30)
        );
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(200, &[("cache-control", "max-age=5, s-maxage=20")])
            ),
            Some(20)
        );
        assert_eq!(
            fresh(&r, false, &resp(200, &[("cache-control", "no-store")])),
            None
        );
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(200, &[("cache-control", "private, max-age=60")])
            ),
            None
        );
        assert_eq!(
            fresh(&r, false, &resp(200, &[("cache-control", "no-cache")])),
            Some(-1),
            "stored, revalidated each time"
        );
        assert_eq!(fresh(&r, false, &resp(500, &[])), None);
        assert_eq!(
            fresh(&r, false, &resp(502, &[("cache-control", "max-age=60")])),
            None
        );
        assert_eq!(fresh(&r, false, &resp(404, &[])), Some(60));
        assert_eq!(
            fresh(&r, false, &resp(302, &[])),
            None,
            "no heuristic for 302"
        );
        assert_eq!(
            fresh(&r, false, &resp(206, &[("cache-control", "max-age=60")])),
            None
        );
        assert_eq!(fresh(&r, false, &resp(200, &[("vary", "Accept, *")])), None);
        // Credentials (§3.5) and cookies.
        assert_eq!(
            fresh(&r, true, &resp(200, &[("cache-control", "max-age=60")])),
            None
        );
        assert_eq!(
            fresh(
                &r,
                true,
                &resp(200, &[("cache-control", "public, max-age=60")])
            ),
            Some(60)
        );
        assert_eq!(
            fresh(&r, true, &resp(200, &[("cache-control", "s-maxage=60")])),
            Some(60)
        );
        assert_eq!(fresh(&r, false, &resp(200, &[("set-cookie", "a=1")])), None);
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(
                    200,
                    &[
                        ("set-cookie", "a=1"),
                        ("cache-control", "public, max-age=9")
                    ]
                )
            ),
            Some(9)
        );
    }

    #[test]
    fn age_and_dates() {
        let r = route(0);
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now - Duration::from_secs(20));
        // Age carried from upstream counts against max-age.
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(200, &[("cache-control", "max-age=60"), ("age", "50")])
            ),
            Some(10)
        );
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(200, &[("cache-control", "max-age=60"), ("date", &date)])
            ),
            Some(40)
        );
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(200, &[("cache-control", "max-age=60"), ("age", "90")])
            ),
            Some(-1)
        );
        // A list counts by its first member; anything but digits is no Age at all.
        for (age, want) in [
            ("7200, 0", -1),
            ("0, 7200", 60),
            ("10abc", 60),
            ("-10", 60),
            ("1.5", 60),
            ("7200;x=y", 60),
            (" 50 ", 10),
        ] {
            let r2 = resp(200, &[("cache-control", "max-age=60"), ("age", age)]);
            assert_eq!(fresh(&r, false, &r2), Some(want), "Age: {age}");
        }
        let expires = httpdate::fmt_http_date(now + Duration::from_secs(100));
        assert_eq!(
            fresh(
                &r,
                false,
                &resp(
                    200,
                    &[
                        ("expires", &expires),
                        ("date", &httpdate::fmt_http_date(now))
                    ]
                )
            ),
            Some(100)
        );
        assert_eq!(
            fresh(&r, false, &resp(200, &[("expires", "0")])),
            Some(-1),
            "invalid Expires: stale"
        );
        // Absurd ages are very old, never an overflow; a valueless max-age is 0.
        let huge = [
            ("cache-control", "max-age=60"),
            ("age", "18446744073709551615999"),
        ];
        assert_eq!(fresh(&r, false, &resp(200, &huge)), Some(-1));
        let plus = [("cache-control", "max-age=60"), ("age", "+5")];
        assert_eq!(fresh(&r, false, &resp(200, &plus)), Some(60));
        let bare = [("cache-control", "max-age")];
        assert_eq!(fresh(&route(60), false, &resp(200, &bare)), Some(-1));
        // The age is carried into the entry, so Age on hits continues from it.
        match decide(
            &r,
            &Asked::default(),
            &resp(200, &[("cache-control", "max-age=60"), ("age", "50")]),
            now,
        ) {
            RespCacheable::Cacheable(m) => assert!(m.age().as_secs() >= 50),
            _ => panic!("not stored"),
        }
    }

    #[test]
    fn revalidation_counts_from_the_304() {
        let r = route(0);
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3600);
        // Stored an hour ago with Date T and Expires T+60; the 304 keeps the old Expires.
        let merged = resp(
            200,
            &[
                ("date", &httpdate::fmt_http_date(old)),
                (
                    "expires",
                    &httpdate::fmt_http_date(old + Duration::from_secs(60)),
                ),
            ],
        );
        let asked = Asked {
            revalidated: Some((0, Some(now))),
            ..Asked::default()
        };
        match decide(&r, &asked, &merged, now) {
            RespCacheable::Cacheable(m) => {
                assert!(!m.is_fresh(now), "still expired");
                assert_eq!(m.headers()["date"], httpdate::fmt_http_date(now));
            }
            _ => panic!("not stored"),
        }
        // Vary on a header the gateway sets upstream is not stored.
        let set = [http::HeaderName::from_static("x-user-id")];
        let asked = Asked {
            gateway_writes: &set,
            ..Asked::default()
        };
        let v = resp(
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("vary", "Accept, X-User-Id"),
            ],
        );
        assert!(matches!(
            decide(&r, &asked, &v, now),
            RespCacheable::Uncacheable(_)
        ));
        let asked = Asked {
            no_store: true,
            ..Asked::default()
        };
        assert!(matches!(
            decide(
                &r,
                &asked,
                &resp(200, &[("cache-control", "max-age=60")]),
                now
            ),
            RespCacheable::Uncacheable(_)
        ));
    }

    #[test]
    fn stale_permissions_and_stored_head() {
        let r = CacheRoute {
            stale_if_error: 30,
            ..route(60)
        };
        let now = SystemTime::now();
        let meta = |h: &[(&str, &str)]| match decide(&r, &Asked::default(), &resp(200, h), now) {
            RespCacheable::Cacheable(m) => m,
            _ => panic!("not stored"),
        };
        let m = meta(&[("cache-control", "max-age=5, stale-while-revalidate=10")]);
        assert_eq!(
            (m.stale_while_revalidate_sec(), m.stale_if_error_sec()),
            (10, 30)
        );
        let m = meta(&[(
            "cache-control",
            "max-age=5, must-revalidate, stale-if-error=10",
        )]);
        assert_eq!(
            (m.stale_while_revalidate_sec(), m.stale_if_error_sec()),
            (0, 0)
        );
        let m = meta(&[
            ("cache-control", "public, max-age=5, private=\"x-user\""),
            ("x-user", "ada"),
            ("set-cookie", "s=1"),
            ("surrogate-key", "users  user-1"),
        ]);
        assert!(m.headers().get("x-user").is_none());
        assert!(m.headers().get("set-cookie").is_none());
        let tags = m.extensions().get::<Tags>().unwrap();
        assert_eq!(tags.tags, vec![Box::from("users"), Box::from("user-1")]);
    }
}
