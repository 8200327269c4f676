//! Policy plugins end to end: ip_filter, rate_limit (accuracy included), cors, request_limit;
//! and every plugin's bad config refused by `check` at its line.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[tokio::test]
async fn ip_filter_by_resolved_client_address() {
    let up = echo("up").await;
    let port = free_port();
    let plugins = r#"
[plugins.no-local]
kind = "ip_filter"
deny = ["127.0.0.1/32"]
[plugins.office]
kind = "ip_filter"
allow = ["10.0.0.0/8", "2001:db8::/32"]
deny = ["10.6.6.0/24"]
"#;
    let _g = plugin_gateway(
        port,
        up,
        plugins,
        &[("/deny", "\"no-local\""), ("/office", "\"office\"")],
    );
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let r = c.get(format!("{base}/deny")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "client address not allowed");
    assert_eq!(
        c.get(format!("{base}/office"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // Through the trusted proxy 127.0.0.1, the client is the address it forwarded.
    for (xff, want) in [
        ("10.1.2.3", 200),
        ("10.6.6.9", 403),
        ("192.168.1.1", 403),
        ("2001:db8::5", 200),
        ("10.1.2.3, 192.168.9.9", 403),
    ] {
        let r = c
            .get(format!("{base}/office"))
            .header("x-forwarded-for", xff)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{xff}");
    }
}

/// Sends requests from `conns` loops for `dur`, each with `x-user: user`; counts statuses.
async fn flood(url: &str, user: &'static str, conns: usize, dur: Duration) -> (usize, usize) {
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (ok, limited, url) = (ok.clone(), limited.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut n = 0;
            while Instant::now() < end && n < 20_000 {
                n += 1;
                match c.get(&url).header("x-user", user).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) if r.status() == 429 => limited.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(e) => panic!("{e}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed))
}

#[tokio::test]
async fn rate_limit_is_accurate_per_key() {
    let up = echo("up").await;
    let port = free_port();
    let plugins = r#"
[plugins.per-user]
kind = "rate_limit"
key = "header:x-user"
rate = "50/s"
[plugins.inflight]
kind = "rate_limit"
key = "route"
concurrency = 2
"#;
    let slow = serve(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        hyper::Response::new(full("slow"))
    })
    .await;
    let _g = plugin_gateway(port, up, plugins, &[("/api", "\"per-user\"")]);
    let url = format!("http://127.0.0.1:{port}/api");

    // A 3-second flood from one key, while a second key sends a request every 100 ms.
    let (flooded, other) = tokio::join!(flood(&url, "alice", 4, Duration::from_secs(3)), async {
        let c = client();
        let mut statuses = Vec::new();
        for _ in 0..25 {
            let r = c.get(&url).header("x-user", "bob").send().await.unwrap();
            statuses.push(r.status().as_u16());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        statuses
    });
    let (ok, limited) = flooded;
    eprintln!("rate_limit 50/s, 3 s flood: served {ok}, refused {limited}");
    assert!(
        (135..=165).contains(&ok),
        "served {ok} of a 3 s flood at 50/s (refused {limited})"
    );
    assert!(limited > 100, "the flood was refused {limited} times");
    assert!(
        other.iter().all(|&s| s == 200),
        "the second key was limited: {other:?}"
    );

    // A refusal carries Retry-After and the RateLimit headers.
    // One client, reused: making a client per request (TLS roots loaded each time) is slow
    // enough on a busy machine to stay under the limit forever. Bounded either way.
    let c = client();
    let mut refused = None;
    for _ in 0..1000 {
        let r = c.get(&url).header("x-user", "carol").send().await.unwrap();
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("no 429 within 1000 requests at a limit of 50/s");
    let h = r.headers();
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h["ratelimit-limit"], "50");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert!(h.contains_key("ratelimit-reset"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate limit exceeded");
    drop(_g);

    // The in-flight variant: 2 at a time on the route; 5 concurrent slow requests.
    let port = free_port();
    let _g = plugin_gateway(port, slow, plugins, &[("/slow", "\"inflight\"")]);
    let url = format!("http://127.0.0.1:{port}/slow");
    let reqs = (0..5).map(|_| {
        let url = url.clone();
        async move { client().get(&url).send().await.unwrap().status().as_u16() }
    });
    let mut statuses = futures_util::future::join_all(reqs).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
    // Slots come back when requests end.
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn cors_preflight_at_the_gateway() {
    let (up, hits) = counting_echo().await;
    let port = free_port();
    let plugins = r#"
[plugins.cors]
kind = "cors"
allow_origins = ["https://app.example.com", "https://*.example.org"]
allow_methods = ["GET", "POST"]
allow_headers = ["authorization", "content-type"]
expose_headers = ["x-request-id"]
allow_credentials = true
max_age = "10m"
"#;
    let _g = plugin_gateway(port, up, plugins, &[("/", "\"cors\"")]);
    let url = format!("http://127.0.0.1:{port}/things");
    let c = client();
    let pre = |origin: &'static str, method: &'static str| {
        c.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let r = pre("https://app.example.com", "POST").await.unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(
        h["vary"],
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    );
    let r = pre("https://shop.example.org", "GET").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        pre("https://evil.example.com", "GET")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        pre("https://app.example.com", "DELETE")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "preflights never reach the upstream"
    );

    let r = c
        .get(&url)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "x-request-id");
    assert_eq!(r.headers()["vary"], "Origin");
    let r = c
        .get(&url)
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // Without an Origin the answer still varies by it (for shared caches).
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["vary"], "Origin");
    // A plain OPTIONS (no preflight headers) is the upstream's business.
    let r = c
        .request(reqwest::Method::OPTIONS, &url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

async fn counting_echo() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let addr = serve(move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        async { hyper::Response::new(full("ok")) }
    })
    .await;
    (addr, hits)
}

/// Raw HTTP/1.1 exchange: what a client that streams its body sees.
fn raw(port: u16, head: &str, body_chunks: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    for c in body_chunks {
        if s.write_all(c).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn request_limits_on_headers_and_bodies() {
    // Reads the whole body before answering, as an upload endpoint does.
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let up = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        async move {
            use http_body_util::BodyExt;
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            hyper::Response::new(full(n.to_string()))
        }
    })
    .await;
    let port = free_port();
    let plugins = r#"
[plugins.limits]
kind = "request_limit"
max_header = "2KiB"
max_body = "1KiB"
"#;
    let _g = plugin_gateway(port, up, plugins, &[("/", "\"limits\"")]);
    let url = format!("http://127.0.0.1:{port}/up");
    let c = client();
    assert_eq!(
        c.post(&url)
            .body(vec![b'x'; 1000])
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.post(&url).body(vec![b'x'; 2000]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "request body too large");
    let r = c
        .get(&url)
        .header("x-big", "y".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Chunked, no Content-Length: cut once the count passes 1 KiB.
    let head =
        "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let answer = tokio::task::spawn_blocking(move || {
        let chunk = format!("200\r\n{}\r\n", "z".repeat(512));
        let chunks: Vec<&[u8]> = std::iter::repeat_n(chunk.as_bytes(), 4)
            .chain([&b"0\r\n\r\n"[..]])
            .collect();
        raw(port, head, &chunks)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

const BAD_PLUGINS: &str = r#"[server]
threads = 1

[upstreams.u]
peers = ["127.0.0.1:9"]

[plugins.rl]
kind = "rate_limit"
rate = "50/h"

[plugins.ip]
kind = "ip_filter"
allow = ["10.0.0.0/33"]

[plugins.jwt]
kind = "jwt_auth"
algorithms = ["HS999"]
secret = "0123456789012345678901234567890123456789"

[plugins.keys]
kind = "key_auth"
header = "x-api-key"
keys = { app = "sha256:nothex" }

[plugins.basic]
kind = "basic_auth"
htpasswd_file = "users.htpasswd"

[plugins.cors]
kind = "cors"
allow_origins = ["app.example.com"]

[plugins.fa]
kind = "forward_auth"
url = "ftp://auth.local/verify"

[plugins.lim]
kind = "request_limit"
max_body = "1 parsec"

[plugins.hdr]
kind = "headers"
request = { set = { "x-who" = "${nobody}" } }

[plugins.rl2]
kind = "rate_limit"
rate = "5/s"
concurrency = 3

[gateways.g]
listen = ["127.0.0.1:18999"]

[[routes]]
upstream = "u"
"#;

#[test]
fn bad_plugin_configs_are_refused_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, BAD_PLUGINS).unwrap();
    // An htpasswd entry that is not bcrypt.
    std::fs::write(dir.path().join("users.htpasswd"), "ann:$apr1$abc$def\n").unwrap();
    let (code, out) = check_file(&config);
    assert_ne!(code, 0);
    let line_of = |needle: &str| {
        BAD_PLUGINS
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap()
    };
    let expect = [
        ("rate = \"50/h\"", "invalid rate"),
        ("10.0.0.0/33", "invalid CIDR"),
        ("HS999", "unsupported algorithm"),
        ("sha256:nothex", "64 hex digits"),
        ("kind = \"basic_auth\"", "only bcrypt entries"),
        ("kind = \"cors\"", "must start with https://"),
        ("kind = \"forward_auth\"", "must start with http://"),
        ("1 parsec", "invalid size"),
        ("${nobody}", "unknown variable"),
        ("[plugins.rl2]", "not both"),
    ];
    for (needle, why) in expect {
        // Errors found after reading a plugin's table are reported at its `kind` line.
        let line = line_of(needle) + usize::from(needle.starts_with('['));
        let hit = out
            .lines()
            .any(|l| l.contains(&format!("bad.toml:{line}:")) && l.contains(why));
        assert!(hit, "expected `{why}` at line {line} ({needle}) in:\n{out}");
    }
}
