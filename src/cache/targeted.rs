//! Targeted cache fields (RFC 9213): `CDN-Cache-Control`, or a field the operator names for
//! this cache alone (`targeted_cache_control`). When one parses, it is this cache's
//! Cache-Control and Expires (policy.rs reads it in their place); the client still gets every
//! field as the origin wrote it.
use http::header;
use pingora_cache::cache_control::CacheControl;
use pingora_http::ResponseHeader;

use super::policy::MAX_SECS;

/// A targeted Cache-Control field (RFC 9213 §2.1): a Structured Fields dictionary whose
/// lines join into one. It counts only when it parses and each directive with seconds has a
/// non-negative integer; otherwise the cache falls back to Cache-Control, as §2.2 says.
/// Directives it does not know are skipped (§2.1 leaves room for extensions); `no-store`,
/// `private` and `no-cache` count whatever their value (with field names, as a whole: this
/// cache never stores a response in part). The directives are read back through
/// pingora-cache's Cache-Control parser, so both fields mean the same.
pub(super) fn targeted(resp: &ResponseHeader, name: &header::HeaderName) -> Option<CacheControl> {
    let mut joined = Vec::new();
    for v in resp.headers.get_all(name) {
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if joined.is_empty() {
        return None;
    }
    let dict = sfv::Parser::parse_dictionary(&joined).ok()?;
    let mut cc = String::new();
    for (key, entry) in &dict {
        let sfv::ListEntry::Item(item) = entry else {
            return None;
        };
        let seconds = matches!(
            key.as_str(),
            "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
        );
        let restricts = matches!(key.as_str(), "no-store" | "private" | "no-cache");
        let known_flag = matches!(
            key.as_str(),
            "public" | "must-revalidate" | "proxy-revalidate"
        );
        let word = match (&item.bare_item, seconds) {
            (sfv::BareItem::Integer(n), true) if *n >= 0 => {
                format!("{key}={}", (*n as u64).min(MAX_SECS))
            }
            (_, true) => return None,
            // `private=?0`: not said.
            (sfv::BareItem::Boolean(false), false) => continue,
            (_, false) if restricts => key.clone(),
            (sfv::BareItem::Boolean(true), false) if known_flag => key.clone(),
            _ => continue,
        };
        if !cc.is_empty() {
            cc.push_str(", ");
        }
        cc.push_str(&word);
    }
    let mut h = http::HeaderMap::new();
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_str(&cc).ok()?,
    );
    // An empty dictionary says nothing: Cache-Control then.
    CacheControl::from_headers_named("cache-control", &h)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::super::policy::tests::{fresh, resp, route};

    /// RFC 9213: CDN-Cache-Control, when it parses, is this cache's Cache-Control and
    /// Expires; otherwise Cache-Control is.
    #[test]
    fn targeted_cache_control() {
        let r = route(0);
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(600));
        for (headers, want) in [
            (
                vec![
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=60"),
                ],
                Some(60),
            ),
            (
                vec![
                    ("cache-control", "max-age=3600"),
                    ("cdn-cache-control", "max-age=5"),
                ],
                Some(5),
            ),
            (
                vec![
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store"),
                ],
                None,
            ),
            (
                vec![
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "private"),
                ],
                None,
            ),
            (
                vec![("expires", &past), ("cdn-cache-control", "max-age=30")],
                Some(30),
            ),
            // Not a valid dictionary, or seconds that are not an integer: Cache-Control rules.
            (
                vec![
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=\"60\""),
                ],
                None,
            ),
            // An extension is skipped; a restriction counts whatever its value.
            (
                vec![
                    ("cache-control", "public, max-age=600"),
                    ("cdn-cache-control", "no-store, ext=1"),
                ],
                None,
            ),
            (
                vec![
                    ("cache-control", "public, max-age=600"),
                    ("cdn-cache-control", "max-age=60, x=\"y\""),
                ],
                Some(60),
            ),
            (
                vec![
                    ("cache-control", "public, max-age=600"),
                    ("cdn-cache-control", "private=\"x-user\", max-age=60"),
                ],
                None,
            ),
            (
                vec![
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-cache=\"set-cookie\", max-age=60"),
                ],
                Some(-1),
            ),
            (
                vec![
                    ("cache-control", "max-age=10"),
                    ("cdn-cache-control", "max-age=-1"),
                ],
                Some(10),
            ),
            (
                vec![
                    ("cache-control", "max-age=10"),
                    ("cdn-cache-control", "max-age=1.5"),
                ],
                Some(10),
            ),
            (
                vec![
                    ("cache-control", "max-age=10"),
                    ("cdn-cache-control", "max-age=60,,"),
                ],
                Some(10),
            ),
        ] {
            assert_eq!(fresh(&r, false, &resp(200, &headers)), want, "{headers:?}");
        }
        // Two lines are one dictionary.
        let two = resp(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "public"),
                ("cdn-cache-control", "max-age=20"),
            ],
        );
        assert_eq!(fresh(&r, false, &two), Some(20));
        // Off, or another field named: CDN-Cache-Control is nothing to this cache.
        let mut off = route(0);
        off.targeted_cache_control = None;
        let both = resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("cdn-cache-control", "max-age=60"),
            ],
        );
        assert_eq!(fresh(&off, false, &both), Some(10));
        off.targeted_cache_control = Some(http::HeaderName::from_static("gatehouse-cache-control"));
        assert_eq!(fresh(&off, false, &both), Some(10));
        let own = resp(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("gatehouse-cache-control", "max-age=90"),
            ],
        );
        assert_eq!(fresh(&off, false, &own), Some(90));
    }
}
