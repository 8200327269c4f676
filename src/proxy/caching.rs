//! The proxy's side of the response cache (see `cache.rs`): which requests use it, their key,
//! what the client's own Cache-Control asks for, the status header, tag hiding, and the
//! invalidation that a successful unsafe request causes (RFC 9111 §4.4).
use std::time::SystemTime;

use http::{header, Method};
use pingora_cache::cache_control::CacheControl;
use pingora_cache::key::CacheKey;
use pingora_cache::{
    CacheMeta, CacheOptionOverrides, ForcedFreshness, RespCacheable, VarianceBuilder,
};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use gatehouse_plugins::authority::Authority;
use gatehouse_plugins::Identity;

use super::RequestCtx;
use crate::cache::policy::CacheRoute;
use crate::cache::{self, policy, EVICTION, LOCK, PREDICTOR, STORE};

/// The request's cache settings: its route's, when it has them.
pub(super) fn route_cache(ctx: &RequestCtx, gw: usize) -> Option<&CacheRoute> {
    let rt = ctx.rt.as_ref()?;
    rt.gateways.get(gw)?.routes[ctx.route?].cache.as_deref()
}

/// What the client's Cache-Control (or HTTP/1.0 `Pragma: no-cache`) asks of the cache.
struct Asks {
    no_store: bool,
    no_cache: bool,
    max_age: Option<u32>,
    only_if_cached: bool,
}

fn asks(req: &RequestHeader) -> Asks {
    match CacheControl::from_req_headers(req) {
        Some(cc) => Asks {
            no_store: cc.no_store(),
            no_cache: cc.no_cache(),
            max_age: cc.max_age().ok().flatten(),
            only_if_cached: cc.only_if_cached(),
        },
        None => Asks {
            no_store: false,
            // §5.4: Pragma counts only without Cache-Control.
            no_cache: req
                .headers
                .get(header::PRAGMA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache")),
            max_age: None,
            only_if_cached: false,
        },
    }
}

/// Longer URLs are not cached: the URL is kept three times per entry (key, purge index,
/// LRU), and junk query strings must not turn a small answer into a large entry.
const MAX_URL: usize = 2048;

/// request_cache_filter: GET and HEAD on a cached route use the cache. Not: requests with a
/// body (it is not in the key, yet reaches the upstream), without a Host, or with a URL over
/// [`MAX_URL`]; these bypass it. A client's `no-store` is honoured at storing time.
pub(super) fn enable(session: &mut Session, ctx: &mut RequestCtx, gw: usize) {
    let Some(cfg) = route_cache(ctx, gw) else {
        return;
    };
    let (lock_timeout, max) = (cfg.lock_timeout, cfg.max_size);
    let req = session.req_header();
    if !(req.method == Method::GET || req.method == Method::HEAD) || session.is_upgrade_req() {
        return;
    }
    let has_body = req.headers.contains_key(header::TRANSFER_ENCODING)
        || req
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let long = req.uri.path_and_query().map_or(0, |p| p.as_str().len()) > MAX_URL;
    if has_body || long || ctx.plugins.authority.is_none() {
        ctx.cache_bypass = true;
        return;
    }
    ctx.cache_no_store = asks(req).no_store;
    let mut o = CacheOptionOverrides::default();
    o.wait_timeout = Some(lock_timeout);
    session.cache.enable(
        &*STORE,
        Some(&*EVICTION),
        Some(&*PREDICTOR),
        Some(LOCK.as_ref()),
        Some(o),
    );
    session.cache.set_max_file_size_bytes(max);
}

/// The URL of a request as the cache indexes it, `scheme://authority/path?query` with the
/// canonical authority (a port only when not the scheme's default): also what a purge by URL
/// names.
pub(super) fn url(tls: bool, authority: Option<&Authority>, req: &RequestHeader) -> String {
    let host = authority.map_or("", |a| a.as_str());
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{}://{host}{pq}", if tls { "https" } else { "http" })
}

/// What a trusted peer may pass on to the upstream about the original request (forwarded.rs)
/// and an upstream may build links or redirects from: each one the upstream receives is in
/// the key. From an untrusted peer they are replaced by the gateway's own values (which the
/// authority and scheme already key) or removed.
static FORWARDED_KEYED: [header::HeaderName; 5] = [
    header::HeaderName::from_static("x-forwarded-host"),
    header::HeaderName::from_static("x-forwarded-proto"),
    header::HeaderName::from_static("x-forwarded-port"),
    header::HeaderName::from_static("x-forwarded-prefix"),
    header::FORWARDED,
];

/// The key: gateway, route and upstream (routes matched by header or method, and split arms,
/// answer the same URL differently), scheme, the canonical authority (the Host the upstream
/// gets: `shop:1337` and `shop` are two keys, `Shop.` and `shop:80` one), path and query,
/// and, from a trusted peer (`forwarded`), the [`FORWARDED_KEYED`] values it passes on (they
/// reach the upstream and may shape its links; an untrusted client's are replaced, so they
/// must not split the key either). HEAD shares the GET's entry; Vary adds variance.
///
/// Hit path: the parts are hashed here, once, with the hash pingora-cache uses (Blake2b-128),
/// straight from the request (nothing is allocated), and the key carries that hash:
/// pingora-cache would otherwise hash the primary bytes again at each use (predictor, lookup,
/// eviction). The URL string purges need is built only for responses that are stored.
pub(super) fn key(
    gateway: &str,
    route: &str,
    upstream: &str,
    tls: bool,
    authority: Option<&Authority>,
    forwarded: bool,
    req: &RequestHeader,
) -> CacheKey {
    use blake2::digest::{consts::U16, Digest};
    let mut h = blake2::Blake2b::<U16>::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(gateway.as_bytes());
    part(route.as_bytes());
    part(upstream.as_bytes());
    part(if tls { b"https" } else { b"http" });
    part(authority.map_or(&b""[..], |a| a.as_str().as_bytes()));
    part(
        req.uri
            .path_and_query()
            .map_or(b"/", |p| p.as_str().as_bytes()),
    );
    // From an untrusted peer none of them goes upstream as sent: one marker says so.
    part(&[u8::from(forwarded)]);
    if forwarded {
        for name in &FORWARDED_KEYED {
            // Each field line as it goes upstream, in order, then how many there were.
            let mut n = 0u64;
            for v in req.headers.get_all(name) {
                part(v.as_bytes());
                n += 1;
            }
            part(&n.to_le_bytes());
        }
    }
    let mut key = CacheKey::new(Vec::new(), String::new());
    key.set_primary_bin_override(h.finalize().into());
    key
}

/// cache_key_callback: [`key`] for the request's gateway, route and upstream.
pub(super) fn key_for(ctx: &RequestCtx, gw: usize, session: &Session) -> Option<CacheKey> {
    let (rt, id, up) = (ctx.rt.as_ref()?, ctx.route?, ctx.upstream?);
    let g = rt.gateways.get(gw)?;
    let trusted = super::forwarded::peer_ip(session)
        .is_some_and(|ip| super::forwarded::is_trusted(&rt.trusted_proxies, ip));
    let (route, pool) = (&g.route_names[id], &rt.pools[up].name);
    Some(key(
        &g.name,
        route,
        pool,
        g.tls,
        ctx.plugins.authority.as_ref(),
        trusted,
        session.req_header(),
    ))
}

/// upstream_response_filter: a 304 refreshing a stale entry brings its own Date and Age,
/// which Pingora's merge leaves out of the stored head; kept for [`decide`].
pub(super) fn note_revalidation(session: &Session, resp: &ResponseHeader, ctx: &mut RequestCtx) {
    if resp.status != http::StatusCode::NOT_MODIFIED
        || !matches!(session.cache.phase(), pingora_cache::CachePhase::Stale)
    {
        return;
    }
    let now = SystemTime::now();
    let date = resp
        .headers
        .get(header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        // A Date in the future is our clock's or theirs: not a reason to extend.
        .map(|d| d.min(now));
    ctx.cache_revalidated = Some(super::ctx::Revalidated {
        age: policy::initial_age(resp, now),
        date,
        headers: resp.headers.clone(),
    });
}

/// §4.3.4: the fields a 304 carries replace the stored ones, but for those that describe the
/// stored body's bytes (its length and codings: the 304 has no body), `Vary` (the entry's
/// variance stays), and what the policy sets itself (`Age`, `Date`) or never stores.
fn merge_304(stored: &ResponseHeader, fields: &http::HeaderMap) -> ResponseHeader {
    let kept = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::TRANSFER_ENCODING,
        header::VARY,
        header::AGE,
        header::DATE,
        header::SET_COOKIE,
    ];
    let mut merged = stored.clone();
    for name in fields.keys() {
        if kept.contains(name) {
            continue;
        }
        merged.remove_header(name);
        for v in fields.get_all(name) {
            let _ = merged.append_header(name.clone(), v.clone());
        }
    }
    merged
}

/// cache_hit_filter: the client's `no-cache` or `max-age` can make a fresh entry too old
/// for it; it is then revalidated (and never served stale instead).
pub(super) fn hit_freshness(
    req: &RequestHeader,
    meta: &CacheMeta,
    fresh: bool,
) -> Option<ForcedFreshness> {
    if !fresh {
        return None;
    }
    let a = asks(req);
    let too_old = a
        .max_age
        .is_some_and(|m| meta.age().as_secs() > u64::from(m));
    (a.no_cache || too_old).then_some(ForcedFreshness::ForceExpired)
}

/// `only-if-cached` on a miss: the client wants no upstream request (§5.2.1.7).
pub(super) fn only_if_cached(req: &RequestHeader) -> bool {
    asks(req).only_if_cached
}

/// response_cache_filter: the route's decision on an answer. A request the chain identified
/// (`PluginCtx::identity`: a plugin verified who it is, or it carried a credential nobody
/// checked) has its answer shared only when the origin says so, as §3.5 asks for
/// Authorization, whichever plugin identified it.
pub(super) fn decide(
    ctx: &mut RequestCtx,
    gw: usize,
    req: &RequestHeader,
    resp: &ResponseHeader,
) -> RespCacheable {
    let never = RespCacheable::Uncacheable(pingora_cache::NoCacheReason::NeverEnabled);
    let (Some(rt), Some(id)) = (ctx.rt.clone(), ctx.route) else {
        return never;
    };
    let Some(g) = rt.gateways.get(gw) else {
        return never;
    };
    let Some(cfg) = g.routes[id].cache.as_deref() else {
        return never;
    };
    let asked = policy::Asked {
        authorized: ctx.plugins.identity() != Identity::Anonymous,
        no_store: ctx.cache_no_store,
        gateway_writes: g.vary_refused[id].as_deref().unwrap_or_default(),
        gateway_writes_any: g.vary_refused[id].is_none(),
        revalidated: ctx.cache_revalidated.as_ref().map(|r| (r.age, r.date)),
        url: url(g.tls, ctx.plugins.authority.as_ref(), req),
    };
    match ctx.cache_revalidated.take() {
        Some(r) => policy::decide(cfg, &asked, &merge_304(resp, &r.headers), SystemTime::now()),
        None => policy::decide(cfg, &asked, resp, SystemTime::now()),
    }
}

/// The variance of a request against a stored response's `Vary`.
pub(super) fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<[u8; 16]> {
    let mut b = VarianceBuilder::new();
    for v in meta.headers().get_all(header::VARY) {
        for name in v.as_bytes().split(|&c| c == b',') {
            let name = name.trim_ascii();
            if name.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            let value = req
                .headers
                .get_all(name.as_str())
                .iter()
                .flat_map(|v| v.as_bytes().iter().copied().chain([b',']))
                .collect::<Vec<u8>>();
            b.add_owned_name_value(name, value);
        }
    }
    b.finalize()
}

/// response_filter: the status header, the tags hidden, and §4.4 invalidation.
pub(super) fn on_response(
    cfg: &CacheRoute,
    resp: &mut ResponseHeader,
    status: Option<&'static str>,
) {
    if let (Some(h), Some(s)) = (&cfg.status_header, status) {
        let _ = resp.insert_header(h.clone(), s);
    }
    if !cfg.expose_tags {
        resp.remove_header(&cfg.tag_header);
    }
}

/// response_filter, on every route: §4.4 invalidation. Any method not defined as safe
/// (M-SEARCH, PROPPATCH, a method we do not know) may change the resource; a successful
/// answer to one drops what is stored for its URL, whichever route stored it.
pub(super) fn invalidate_after(
    session: &Session,
    resp: &ResponseHeader,
    tls: bool,
    authority: Option<&Authority>,
) {
    let req = session.req_header();
    if !req.method.is_safe() && (200..400).contains(&resp.status.as_u16()) {
        invalidate(tls, authority, req, resp);
    }
}

/// A successful unsafe request makes stored answers for its URI, and for the
/// Location/Content-Location it names on the same host, stale (here: gone).
fn invalidate(
    tls: bool,
    authority: Option<&Authority>,
    req: &RequestHeader,
    resp: &ResponseHeader,
) {
    let target = url(tls, authority, req);
    STORE.purge_url(&target);
    // The authority part, `scheme://host`, that other URLs must share.
    let origin_len = target
        .find("://")
        .and_then(|i| target[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(target.len());
    let origin = &target[..origin_len];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let other = if v.starts_with('/') && !v.starts_with("//") {
            format!("{origin}{v}")
        } else if v.len() > origin.len()
            && v[..origin.len()].eq_ignore_ascii_case(origin)
            && v.as_bytes()[origin.len()] == b'/'
        {
            format!("{origin}{}", &v[origin.len()..])
        } else {
            continue;
        };
        STORE.purge_url(&other);
    }
}

pub(super) fn status(session: &Session, ctx: &RequestCtx) -> Option<&'static str> {
    if ctx.cache_bypass {
        return Some("BYPASS");
    }
    cache::status(session.cache.phase())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use async_trait::async_trait;
    use gatehouse_plugins::{Decision, Plugin, PluginCtx};
    use pingora_cache::RespCacheable;
    use pingora_http::ResponseHeader;
    use pingora_proxy::Session;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// An auth plugin the cache has never heard of: it verifies who the client is and tells
    /// nobody in a header. Its users' answers must stay apart all the same.
    struct Toy;

    #[async_trait]
    impl Plugin for Toy {
        fn kind(&self) -> &'static str {
            "toy"
        }

        fn phases(&self) -> gatehouse_plugins::Phases {
            gatehouse_plugins::Phases::REQUEST
        }

        async fn request(
            &self,
            _s: &mut Session,
            cx: &mut PluginCtx,
        ) -> pingora_error::Result<Decision> {
            cx.identify("toy", Some("alice".into()));
            Ok(Decision::Continue)
        }
    }

    /// A real request on a real loopback connection, read by Pingora (and the client's end).
    async fn session() -> (Session, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        client
            .write_all(b"GET /me HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let stream: pingora::protocols::Stream =
            Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let mut s = Session::new_h1(stream);
        assert!(s.read_request().await.unwrap());
        (s, client)
    }

    fn answer(cache_control: &str) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("cache-control", cache_control).unwrap();
        r
    }

    #[tokio::test]
    async fn an_identity_from_any_plugin_keeps_answers_private() {
        let cfg = crate::config::load_str(
            Path::new("t.toml"),
            "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n\
             [[routes]]\nupstream = \"u\"\ncache = { ttl = \"60s\" }\n",
        )
        .unwrap();
        let rt = Arc::new(crate::runtime::Runtime::build(&cfg, None).unwrap());
        let (mut s, _client) = session().await;
        let stored = |ctx: &mut RequestCtx, s: &Session, cc: &str| {
            matches!(
                decide(ctx, 0, s.req_header(), &answer(cc)),
                RespCacheable::Cacheable(_)
            )
        };

        let mut anonymous = RequestCtx {
            rt: Some(rt.clone()),
            route: Some(0),
            ..RequestCtx::default()
        };
        assert!(stored(&mut anonymous, &s, "max-age=60"));

        let mut alice = RequestCtx {
            rt: Some(rt.clone()),
            route: Some(0),
            ..RequestCtx::default()
        };
        let d = Toy.request(&mut s, &mut alice.plugins).await.unwrap();
        assert!(matches!(d, Decision::Continue));
        assert_eq!(alice.plugins.consumer().map(|c| &**c), Some("alice"));
        assert!(
            !stored(&mut alice, &s, "max-age=60"),
            "her page, not everyone's"
        );
        // §3.5: the origin may say an authenticated answer is for everyone.
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60, must-revalidate",
        ] {
            assert!(stored(&mut alice, &s, cc), "{cc}");
        }
    }
}
