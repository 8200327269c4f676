//! Property tests of the canonical request path: making a path canonical is idempotent, and
//! every spelling of a path (extra slashes, `.` segments, `x/..` detours, percent-encoded
//! unreserved characters in any case) is made the same canonical path, so it is routed as
//! that path is.
use std::path::Path;

use gatehouse::proxy::canonical::{canonical_path, Options};
use gatehouse::router::Router;
use http::{HeaderMap, Method};
use proptest::prelude::*;

const ROUTES: &str = r#"
[upstreams.u]
peers = ["127.0.0.1:1"]
[gateways.g]
listen = ["127.0.0.1:1"]
[[routes]]
name = "root"
upstream = "u"
[[routes]]
name = "admin"
path = "/admin"
upstream = "u"
[[routes]]
name = "admin-users"
path = "/admin/users"
upstream = "u"
[[routes]]
name = "exact"
path = "= /api/v1/health"
upstream = "u"
[[routes]]
name = "api"
path = "/api"
upstream = "u"
[[routes]]
name = "items"
path = "~ ^/items/[0-9]+$"
upstream = "u"
"#;

fn canon(p: &str) -> Option<String> {
    canonical_path(p.as_bytes(), Options::default())
        .ok()
        .map(|c| c.into_owned())
}

/// A canonical path: segments of unreserved characters, drawn so that route prefixes come up.
fn canonical() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("admin".to_string()),
        Just("api".to_string()),
        Just("users".to_string()),
        Just("v1".to_string()),
        Just("health".to_string()),
        Just("items".to_string()),
        "[0-9]{1,3}",
        "[A-Za-z0-9._~-]{1,6}".prop_filter("not a dot segment", |s| s != "." && s != ".."),
    ];
    (prop::collection::vec(seg, 0..5), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = String::new();
        for s in &segs {
            p.push('/');
            p.push_str(s);
        }
        if p.is_empty() || slash {
            p.push('/');
        }
        p
    })
}

/// Another spelling of `path`, by the given choices.
fn respell(path: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    let mut k = 0;
    let mut next = || {
        k += 1;
        choices[k % choices.len()]
    };
    for seg in path.split('/').skip(1) {
        out.push('/');
        match next() % 4 {
            0 => out.push('/'),
            1 => out.push_str("./"),
            2 => out.push_str("zz/../"),
            _ => {}
        }
        for c in seg.chars() {
            if next() % 3 == 0 {
                let hex = format!("%{:02X}", c as u32);
                out.push_str(&if next() % 2 == 0 {
                    hex.to_lowercase()
                } else {
                    hex
                });
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// Why the canonical form refuses `raw` (with the default options), said independently of
/// its code: a `;` parameter, a space, a broken escape, or an escape of a control character,
/// a slash or a backslash.
fn refusal(raw: &str) -> Option<&'static str> {
    let b = raw.as_bytes();
    if b.contains(&b';') {
        return Some("parameter");
    }
    if b.contains(&b' ') {
        return Some("space");
    }
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            else {
                return Some("broken escape");
            };
            if v < 0x20 || v == 0x7f || v == b'/' || v == b'\\' {
                return Some("escaped control or separator");
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    None
}

#[test]
fn the_refusal_oracle_says_what_it_should() {
    assert_eq!(refusal("/a/b"), None);
    assert_eq!(refusal("/a%41"), None);
    assert_eq!(refusal("/a;b"), Some("parameter"));
    assert_eq!(refusal("/a%2"), Some("broken escape"));
    assert_eq!(refusal("/a%zz"), Some("broken escape"));
    assert_eq!(refusal("/a%2f"), Some("escaped control or separator"));
    assert_eq!(refusal("/a%5C"), Some("escaped control or separator"));
    assert_eq!(refusal("/a%00"), Some("escaped control or separator"));
    for (raw, refused) in [
        ("/a%2f", true),
        ("/a;x", true),
        ("/a%", true),
        ("/%7e", false),
    ] {
        assert_eq!(canon(raw).is_none(), refused, "{raw}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn canonical_paths_stay_as_they_are(p in canonical()) {
        prop_assert_eq!(canon(&p), Some(p.clone()));
    }

    /// Every input gets the one right verdict: refused exactly when it holds what the
    /// canonical form refuses, and otherwise made canonical once and for all.
    #[test]
    fn canonical_is_idempotent(raw in "(/[A-Za-z0-9._~%;:@!$&'()*+,=/ -]{0,12}){1,4}") {
        match canon(&raw) {
            Some(once) => {
                prop_assert_eq!(refusal(&raw), None, "accepted {}", raw);
                prop_assert_eq!(canon(&once), Some(once.clone()), "from {}", raw);
            }
            None => prop_assert!(refusal(&raw).is_some(), "refused {} for no reason", raw),
        }
    }

    #[test]
    fn every_spelling_routes_as_the_path(p in canonical(), choices in prop::collection::vec(any::<u8>(), 1..16)) {
        let cfg = gatehouse::config::load_str(Path::new("t.toml"), ROUTES).unwrap();
        let routes = &cfg.gateways[0].routes;
        let router = Router::new(routes);
        let spelled = respell(&p, &choices);
        let c = canon(&spelled);
        prop_assert_eq!(c.as_deref(), Some(p.as_str()), "spelled {}", spelled);
        let h = HeaderMap::new();
        let direct = router.find(routes, Some("a"), &p, &Method::GET, &h);
        let via = router.find(routes, Some("a"), c.as_deref().unwrap_or(""), &Method::GET, &h);
        prop_assert_eq!(direct, via);
    }
}
