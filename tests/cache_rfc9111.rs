//! The cache against the parts of RFC 9111 and RFC 9213 a conformance suite found missing:
//! a 304 updates every stored field it carries (§4.3.4), a new validator included; any
//! unsafe method's success invalidates (§4.4); CDN-Cache-Control rules this cache over
//! Cache-Control, and the client still gets both.
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// An upstream whose `/r/…` answers are fresh for a second, then answered with 304s that
/// carry new fields; `/m/…` answers every method with 200, public for a minute; `/cdn/…`
/// says `no-store` to everyone but `max-age=60` to CDNs.
async fn upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let seen = n.clone();
    let addr = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let path = req.uri().path().to_string();
            let b = hyper::Response::builder();
            if path.starts_with("/r/") {
                if req.headers().contains_key("if-none-match") {
                    // A 304 for another representation names another ETag.
                    let etag = if path.contains("other") {
                        "\"v9\""
                    } else {
                        "\"v1\""
                    };
                    return b
                        .status(304)
                        .header("cache-control", "max-age=60")
                        .header("etag", etag)
                        .header("x-test", "B")
                        .header("content-type", "text/plain;charset=utf-8")
                        // Hop-by-hop: this connection's, never the stored answer's.
                        .header("connection", "x-node")
                        .header("x-node", "b7")
                        .body(full(""))
                        .unwrap();
                }
                return b
                    .header("cache-control", "max-age=1")
                    .header("etag", "\"v1\"")
                    .header("x-test", "A")
                    .header("content-type", "text/plain")
                    .body(full(format!("body {n}")))
                    .unwrap();
            }
            if path.starts_with("/cdn/") {
                return b
                    .header("cache-control", "no-store")
                    .header("cdn-cache-control", "max-age=60")
                    .body(full(format!("body {n}")))
                    .unwrap();
            }
            b.header("cache-control", "public, max-age=60")
                .body(full(format!("{} {n}", req.method())))
                .unwrap()
        }
    })
    .await;
    (addr, n)
}

struct Got {
    status: u16,
    cache: String,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn call(method: &str, url: &str) -> Got {
    let r = client()
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let cache = headers
        .get("x-cache-status")
        .map_or("", |v| v.to_str().unwrap())
        .to_string();
    Got {
        status,
        cache,
        headers,
        body: r.text().await.unwrap(),
    }
}

fn start(up: std::net::SocketAddr) -> (Gatehouse, u16) {
    let port = free_port();
    let g = Gatehouse::start(
        &format!(
            "[upstreams.up]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/\"\nupstream = \"up\"\ncache = {{ ttl = \"0s\" }}\n\
             [[routes]]\npath = \"/cdn/off\"\nupstream = \"up\"\n\
             cache = {{ ttl = \"0s\", targeted_cache_control = \"\" }}\n"
        ),
        &[port],
    );
    (g, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_updates_the_stored_fields_it_carries() {
    let (up, _) = upstream().await;
    let (_g, port) = start(up);
    let url = format!("http://127.0.0.1:{port}/r/page");
    let first = call("GET", &url).await;
    assert_eq!(
        (first.cache.as_str(), first.body.as_str()),
        ("MISS", "body 1")
    );
    assert_eq!(first.headers["x-test"], "A");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = call("GET", &url).await;
    assert_eq!(again.cache, "REVALIDATED");
    // The 304's fields, the stored body (with its own length).
    assert_eq!(again.body, "body 1");
    assert_eq!(again.headers["x-test"], "B");
    assert_eq!(again.headers["content-type"], "text/plain;charset=utf-8");
    assert_eq!(again.headers["etag"], "\"v1\"");
    assert_eq!(again.headers["content-length"], "6");
    assert!(
        again.headers.get("x-node").is_none(),
        "a hop-by-hop field stored"
    );
    // And stored so: the next client gets a hit with the new fields and validator.
    let hit = call("GET", &url).await;
    assert_eq!((hit.cache.as_str(), hit.body.as_str()), ("HIT", "body 1"));
    assert_eq!(hit.headers["x-test"], "B");
    assert_eq!(hit.headers["etag"], "\"v1\"");
    assert!(hit.headers.get("x-node").is_none());

    // §4.3.4: a 304 naming another ETag validated another representation: the stored one
    // is not refreshed by it, and the next request asks the origin again.
    let other = format!("http://127.0.0.1:{port}/r/other");
    assert_eq!(call("GET", &other).await.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let first = call("GET", &other).await.cache;
    let second = call("GET", &other).await.cache;
    // Both go to the origin: the first's 304 did not make the entry fresh again (a HIT
    // the second time is what the refresh did before).
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("REVALIDATED", "REVALIDATED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_unsafe_method_that_succeeds_invalidates() {
    let (up, _) = upstream().await;
    let (_g, port) = start(up);
    for method in ["M-SEARCH", "PROPPATCH", "PURGEALL", "POST"] {
        let url = format!("http://127.0.0.1:{port}/m/{method}");
        call("GET", &url).await;
        assert_eq!(call("GET", &url).await.cache, "HIT", "{method}");
        let r = call(method, &url).await;
        assert_eq!(r.status, 200, "{method}");
        assert_eq!(
            call("GET", &url).await.cache,
            "MISS",
            "{method} invalidates"
        );
    }
    // Safe methods change nothing.
    let url = format!("http://127.0.0.1:{port}/m/safe");
    call("GET", &url).await;
    call("OPTIONS", &url).await;
    assert_eq!(call("GET", &url).await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_cache_control_rules_this_cache() {
    let (up, _) = upstream().await;
    let (_g, port) = start(up);
    let url = format!("http://127.0.0.1:{port}/cdn/page");
    let a = call("GET", &url).await;
    let b = call("GET", &url).await;
    assert_eq!((a.cache.as_str(), b.cache.as_str()), ("MISS", "HIT"));
    assert_eq!(b.body, a.body);
    // The client gets both fields, as the origin wrote them.
    assert_eq!(b.headers["cache-control"], "no-store");
    assert_eq!(b.headers["cdn-cache-control"], "max-age=60");
    // Turned off on a route: Cache-Control's no-store rules.
    let off = format!("http://127.0.0.1:{port}/cdn/off");
    call("GET", &off).await;
    assert_eq!(call("GET", &off).await.cache, "MISS");
}

/// §4.4 on the gateway, not the route: a successful POST on an uncached route drops what a
/// cached route of the same gateway stored for that URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_method_on_another_route_invalidates() {
    let (up, _) = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.up]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/m\"\nmethods = [\"GET\"]\nupstream = \"up\"\ncache = {{ ttl = \"0s\" }}\n\
             [[routes]]\npath = \"/m\"\nmethods = [\"POST\"]\nupstream = \"up\"\n"
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/m/item");
    call("GET", &url).await;
    assert_eq!(call("GET", &url).await.cache, "HIT");
    assert_eq!(call("POST", &url).await.status, 200);
    assert_eq!(call("GET", &url).await.cache, "MISS");
}
