//! The response cache end to end: a real upstream that counts what reaches it, the gateway,
//! a real client. Each test asserts what a client sees (status, x-cache-status, body, Age)
//! and what the upstream saw (how many requests, which conditionals). The upstream and the
//! gateway's config are in `common/cache_kit.rs`.
mod common;

use std::time::{Duration, Instant};

use common::cache_kit::*;
use common::{admin_status, client, free_port, Gatehouse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_and_what_is_never_stored() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);

    let a = get(port, "/c/fresh").await;
    assert_eq!(
        (a.status, &*a.cache, &*a.body),
        (200, "MISS", "/c/fresh #1")
    );
    let b = get(port, "/c/fresh").await;
    assert_eq!((b.status, &*b.cache, &*b.body), (200, "HIT", "/c/fresh #1"));
    assert_eq!(b.age, Some(0));
    assert!(
        b.headers.get("surrogate-key").is_none(),
        "tags are hidden by default"
    );
    assert_eq!(seen.count("/c/fresh"), 1);
    // A query is part of the key.
    assert_eq!(get(port, "/c/fresh?page=2").await.cache, "MISS");
    assert_eq!(get(port, "/c/fresh?page=2").await.cache, "HIT");
    // An untrusted client's X-Forwarded-Host is replaced on the way up: it is no new key.
    let xfh = [("x-forwarded-host", "evil.example")];
    assert_eq!(req("GET", port, "/c/fresh?page=2", &xfh).await.cache, "HIT");
    // HEAD is served from the stored GET.
    let h = req("HEAD", port, "/c/fresh", &[]).await;
    assert_eq!((h.status, &*h.cache, &*h.body), (200, "HIT", ""));
    // A conditional request is answered from the cache.
    let etag_less = req(
        "GET",
        port,
        "/c/fresh",
        &[("if-modified-since", "Sat, 01 Jan 2100 00:00:00 GMT")],
    )
    .await;
    assert_eq!(
        etag_less.status, 200,
        "no Last-Modified stored: no 304 by date"
    );
    assert_eq!(seen.count("/c/fresh"), 2, "one per query");

    // The age the upstream reported goes on: Age on hits continues from it.
    get(port, "/c/age").await;
    let hit = get(port, "/c/age").await;
    assert_eq!(hit.cache, "HIT");
    assert!(
        hit.age.is_some_and(|a| (50..55).contains(&a)),
        "{:?}",
        hit.age
    );

    // Never stored: no-store, private, Set-Cookie without public; each request goes upstream.
    for p in ["/c/nostore", "/c/private", "/c/cookie"] {
        get(port, p).await;
        let again = get(port, p).await;
        assert_eq!(again.cache, "MISS", "{p}");
        assert_eq!(seen.count(p), 2, "{p}");
    }
    // ttl = "0s": a response without freshness information is not stored...
    get(port, "/c/nomark").await;
    assert_eq!(get(port, "/c/nomark").await.cache, "MISS");
    // ...with ttl = "60s" it is, and this route names its status header itself.
    get(port, "/u/nomark").await;
    let hit = get(port, "/u/nomark").await;
    assert_eq!((&*hit.cache, &*hit.body), ("HIT", "/u/nomark #1"));
    assert!(hit.headers.get("x-cache-status").is_none());
    // A route without cache says nothing about it.
    assert!(get(port, "/plain/fresh")
        .await
        .headers
        .get("x-cache-status")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_racing_on_a_cold_key_make_one_upstream_request() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);
    let start = Instant::now();
    let (a, b) = tokio::join!(get(port, "/c/slow"), get(port, "/c/slow"));
    assert_eq!(seen.count("/c/slow"), 1, "the second waited for the first");
    assert_eq!((&*a.body, &*b.body), ("/c/slow #1", "/c/slow #1"));
    let mut statuses = [a.cache, b.cache];
    statuses.sort();
    assert_eq!(statuses, ["HIT".to_string(), "MISS".to_string()]);
    assert!(start.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_and_credentials() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(req("GET", port, "/c/vary", &en).await.body, "en #1");
    assert_eq!(req("GET", port, "/c/vary", &fr).await.body, "fr #2");
    let en_hit = req("GET", port, "/c/vary", &en).await;
    let fr_hit = req("GET", port, "/c/vary", &fr).await;
    assert_eq!((&*en_hit.cache, &*en_hit.body), ("HIT", "en #1"));
    assert_eq!((&*fr_hit.cache, &*fr_hit.body), ("HIT", "fr #2"));
    assert_eq!(seen.count("/c/vary"), 2);

    // Authorization: stored only when the response allows sharing (public, s-maxage...).
    let auth = [("authorization", "Bearer secret-of-ada")];
    req("GET", port, "/c/fresh", &auth).await;
    req("GET", port, "/c/fresh", &auth).await;
    assert_eq!(
        seen.count("/c/fresh"),
        2,
        "credentialed answers are not shared"
    );
    req("GET", port, "/c/shared", &auth).await;
    assert_eq!(req("GET", port, "/c/shared", &auth).await.cache, "HIT");
    // So with the credentials of the route's auth plugins (an API key header).
    let key = [("x-api-key", "app-key-1")];
    assert_eq!(req("GET", port, "/k/fresh", &key).await.status, 200);
    assert_eq!(req("GET", port, "/k/fresh", &key).await.cache, "MISS");
    assert_eq!(seen.count("/k/fresh"), 2);
    assert_eq!(req("GET", port, "/k/shared", &key).await.cache, "MISS");
    assert_eq!(req("GET", port, "/k/shared", &key).await.cache, "HIT");
    // Auth runs before the cache: a hit is no way around it.
    assert_eq!(get(port, "/k/shared").await.status, 401);
    // One client's credentials did not turn caching off for the URL.
    get(port, "/c/fresh").await;
    assert_eq!(get(port, "/c/fresh").await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_stale_and_client_directives() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);

    // 304 from the upstream refreshes the entry: same body, fresh again.
    assert_eq!(get(port, "/c/etag").await.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(port, "/c/etag").await;
    assert_eq!((&*r.cache, &*r.body), ("REVALIDATED", "/c/etag #1"));
    assert_eq!(
        seen.conditionals("/c/etag"),
        vec![None, Some("\"e1\"".into())]
    );
    let r = get(port, "/c/etag").await;
    assert_eq!(r.cache, "HIT", "the 304 made it fresh again");
    // Last-Modified is a validator too: If-Modified-Since upstream, 304, refreshed.
    assert_eq!(get(port, "/c/lm").await.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(port, "/c/lm").await;
    assert_eq!((&*r.cache, &*r.body), ("REVALIDATED", "/c/lm #1"));
    assert_eq!(
        seen.conditionals("/c/lm"),
        vec![None, Some("Sat, 01 Jan 2022 00:00:00 GMT".into())]
    );
    let r = req(
        "GET",
        port,
        "/c/lm",
        &[("if-modified-since", "Sat, 01 Jan 2022 00:00:00 GMT")],
    )
    .await;
    assert_eq!((r.status, &*r.cache), (304, "HIT"));
    // A client conditional is answered 304 from the cache.
    let r = req("GET", port, "/c/etag", &[("if-none-match", "\"e1\"")]).await;
    assert_eq!((r.status, &*r.cache), (304, "HIT"));
    // Client no-cache: revalidated even though fresh.
    let r = req("GET", port, "/c/etag", &[("cache-control", "no-cache")]).await;
    assert_eq!(r.cache, "REVALIDATED");
    assert_eq!(seen.count("/c/etag"), 3);
    // only-if-cached: a miss is a 504 and reaches no upstream.
    let r = req(
        "GET",
        port,
        "/c/never",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(seen.count("/c/never"), 0);
    // Client no-store: the cache is not used.
    let r = req("GET", port, "/c/fresh", &[("cache-control", "no-store")]).await;
    assert_eq!(r.cache, "BYPASS");

    // stale-while-revalidate: stale served at once, one refresh in the background.
    get(port, "/c/swr").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(port, "/c/swr").await;
    assert_eq!((&*r.cache, &*r.body), ("UPDATING", "/c/swr #1"));
    let r = until_refreshed(port, "/c/swr", &[], "/c/swr #2").await;
    assert_eq!((&*r.cache, &*r.body), ("HIT", "/c/swr #2"));
    assert_eq!(seen.count("/c/swr"), 2, "one refresh");

    // stale-if-error covers an upstream that times out (read_timeout 500 ms), not only one
    // that is down.
    assert_eq!(get(port, "/c/hang").await.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let start = Instant::now();
    let r = get(port, "/c/hang").await;
    assert_eq!(
        (r.status, &*r.cache, &*r.body),
        (200, "STALE", "/c/hang #1")
    );
    assert!(start.elapsed() < Duration::from_millis(2500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_with_the_upstream_down() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);
    assert_eq!(get(port, "/c/stale").await.cache, "MISS");
    assert_eq!(get(port, "/c/fresh").await.cache, "MISS");
    up.kill();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(port, "/c/stale").await;
    assert_eq!(
        (r.status, &*r.cache, &*r.body),
        (200, "STALE", "/c/stale #1")
    );
    // Fresh entries are served as ever.
    assert_eq!(get(port, "/c/fresh").await.cache, "HIT");

    // Without stale-if-error, an expired entry is not served in place of the error.
    let r = get(port, "/c/nomark").await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_and_tag_and_unsafe_methods() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, admin) = start(up.addr);
    let purge = |q: &str, token: Option<&str>| {
        let mut r = client().post(format!("http://127.0.0.1:{admin}/cache/purge?{q}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    req("GET", port, "/c/vary", &en).await;
    req("GET", port, "/c/vary", &fr).await;
    get(port, "/c/fresh").await;
    get(port, "/c/tagged").await;
    let tagged = get(port, "/u/tagged").await;
    assert_eq!(
        tagged
            .headers
            .get("surrogate-key")
            .map(|v| v.to_str().unwrap()),
        Some("t1 t2"),
        "expose_tags shows them"
    );

    // Refused without the token, or with another.
    let r = purge(&format!("url=http://127.0.0.1:{port}/c/fresh"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = purge("tag=t1", Some("wrong-token-0123456789abcdef"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(get(port, "/c/fresh").await.cache, "HIT");

    // By URL: every variant.
    let url = format!("http://127.0.0.1:{port}/c/vary");
    let r = purge(&format!("url={}", form(&url)), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 2, "{body}");
    assert_eq!(req("GET", port, "/c/vary", &en).await.cache, "MISS");
    assert_eq!(req("GET", port, "/c/vary", &fr).await.cache, "MISS");

    // By tag: every entry that carried it, on any route.
    let r = purge("tag=t2", Some(TOKEN)).await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 2, "{body}");
    assert_eq!(get(port, "/c/tagged").await.cache, "MISS");
    assert_eq!(get(port, "/c/fresh").await.cache, "HIT", "other tags stay");
    // A URL names its authority as requests do: another port is another authority (the
    // upstream sees it in Host and may answer by it); case and a trailing dot are not.
    let r = purge(
        &format!("url={}", form("http://127.0.0.1:1/c/fresh")),
        Some(TOKEN),
    )
    .await
    .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 0, "{body}");
    let r = purge(
        &format!("url={}", form(&format!("HTTP://127.0.0.1.:{port}/c/fresh"))),
        Some(TOKEN),
    )
    .await
    .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 1, "{body}");
    assert_eq!(get(port, "/c/fresh").await.cache, "MISS");
    let r = purge("tag=user-1", Some(TOKEN)).await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 1, "{body}");
    assert_eq!(get(port, "/c/fresh").await.cache, "MISS");

    // A successful POST invalidates its URI and the Location it names (§4.4).
    get(port, "/c/items").await;
    assert_eq!(get(port, "/c/items").await.cache, "HIT");
    assert_eq!(get(port, "/c/fresh").await.cache, "HIT");
    let r = req("POST", port, "/c/items", &[]).await;
    assert_eq!(r.status, 201);
    assert_eq!(get(port, "/c/items").await.cache, "MISS");
    assert_eq!(get(port, "/c/fresh").await.cache, "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_by_cache_size_with_lru_eviction() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            r#"
[server]
admin = "127.0.0.1:{admin}"
cache_size = "1MiB"
[upstreams.u]
peers = ["{}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
upstream = "u"
cache = {{ ttl = "60s" }}
"#,
            up.addr
        ),
        &[port, admin],
    );
    for i in 0..30 {
        assert_eq!(get(port, &format!("/big/{i}")).await.cache, "MISS");
    }
    // No admin token configured: purge is off, whatever is sent.
    let r = client()
        .post(format!("http://127.0.0.1:{admin}/cache/purge?tag=x"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = admin_status(admin).await;
    let cache = &status["cache"];
    let entries = cache["entries"].as_u64().unwrap();
    assert!(cache["bytes"].as_u64().unwrap() <= 1 << 20, "{cache}");
    assert!((5..=10).contains(&entries), "{cache}");
    assert!(cache["evicted"].as_u64().unwrap() >= 20, "{cache}");
    // What the store still holds is served, what was evicted is fetched again, and the
    // bound holds throughout. (The LRU is Pingora's sharded one, least recently used out per
    // shard, so which entries remain is not named here; a scan like this one is the case
    // where any LRU hits least.)
    let mut hits = 0;
    for i in 0..30 {
        if get(port, &format!("/big/{i}")).await.cache == "HIT" {
            hits += 1;
        }
    }
    assert!(hits <= entries, "{hits} hits, {entries} entries");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = admin_status(admin).await;
    assert!(
        status["cache"]["bytes"].as_u64().unwrap() <= 1 << 20,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_the_lock_is_bounded_by_lock_timeout() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            r#"
[upstreams.u]
peers = ["{}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/c"
upstream = "u"
cache = {{ lock_timeout = "200ms" }}
"#,
            up.addr
        ),
        &[port],
    );
    let first = tokio::spawn(async move { get(port, "/c/slower").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let second = get(port, "/c/slower").await;
    // It waited its 200 ms, then went upstream itself rather than wait the whole second.
    assert_eq!((second.status, &*second.cache), (200, "MISS"));
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(seen.count("/c/slower"), 2);
    assert_eq!(first.await.unwrap().cache, "MISS");
    assert_eq!(get(port, "/c/slower").await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_depend_on_who_asks_are_not_shared() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (_g, port, _) = start(up.addr);
    // A session cookie read by jwt_auth is a credential: A's page is not B's.
    let (a, b) = (session_cookie("ada"), session_cookie("bob"));
    let ra = req("GET", port, "/j/me", &[("cookie", &a)]).await;
    let rb = req("GET", port, "/j/me", &[("cookie", &b)]).await;
    assert_eq!((ra.status, &*ra.body), (200, "me: ada #1"));
    assert_eq!((rb.status, &*rb.body), (200, "me: bob #2"));
    // Vary on a header the gateway sets (the consumer): not stored, it cannot be matched.
    let key = [("x-api-key", "app-key-1")];
    req("GET", port, "/k/by-consumer", &key).await;
    let r = req("GET", port, "/k/by-consumer", &key).await;
    assert_eq!((&*r.cache, &*r.body), ("MISS", "app #2"));
    // A background refresh goes with the identity its request had.
    req("GET", port, "/k/swr-who", &key).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = req("GET", port, "/k/swr-who", &key).await;
    assert_eq!((&*r.cache, &*r.body), ("UPDATING", "app #1"));
    let r = until_refreshed(port, "/k/swr-who", &key, "app #2").await;
    assert_eq!(
        (&*r.cache, &*r.body),
        ("HIT", "app #2"),
        "refreshed as app, not as nobody"
    );
    // Two routes on one path (one by header) keep their answers apart.
    let v2 = req("GET", port, "/c/variant", &[("x-version", "2")]).await;
    let v1 = get(port, "/c/variant").await;
    assert_eq!((&*v2.cache, &*v1.cache), ("MISS", "MISS"));
    assert_eq!(
        req("GET", port, "/c/variant", &[("x-version", "2")])
            .await
            .cache,
        "HIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_and_answers_bypass_or_survive() {
    let seen = Seen::default();
    let up = upstream(None, seen.clone()).await;
    let (g, port, _) = start(up.addr);
    // An absurd Age is "very old", not a crash.
    let r = get(port, "/c/hugeage").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        get(port, "/c/hugeage").await.cache,
        "EXPIRED",
        "stored stale, fetched again"
    );
    // A GET with a body, or a very long URL, does not use the cache.
    let r = client()
        .get(format!("http://127.0.0.1:{port}/c/fresh"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    let long = format!("/c/fresh?{}", "q".repeat(3000));
    assert_eq!(get(port, &long).await.cache, "BYPASS");
    // no-store: a hit may be served, a miss is not stored.
    get(port, "/c/fresh").await;
    let ns = [("cache-control", "no-store")];
    assert_eq!(req("GET", port, "/c/fresh", &ns).await.cache, "HIT");
    assert_eq!(req("GET", port, "/c/items", &ns).await.cache, "BYPASS");
    assert_eq!(get(port, "/c/items").await.cache, "MISS");
    // only-if-cached means nothing on a route without a cache.
    let r = req(
        "GET",
        port,
        "/plain/fresh",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_ne!(r.status, 504, "went upstream");
    // Clients that leave in the middle of a large hit are routine, not errors in the log.
    get(port, "/c/huge").await;
    for _ in 0..5 {
        let req = b"GET /c/huge HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        let s = common::raw::answered_connection(port, req).await;
        s.set_zero_linger().unwrap();
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(port, "/c/huge").await.cache, "HIT");
    let log = g.log();
    assert!(!log.contains("Fail to serve cache"), "{log}");
    assert!(log.lines().all(|l| !l.contains("panicked")));
}
