//! Which client gets which body from the response cache. Each case sends request A, then
//! request B for the same path, and asserts that B gets A's stored answer only when the
//! upstream would have answered B the same (the same authority and the same forwarded values
//! reached it), and its own answer otherwise. The upstream numbers its answers and builds its
//! redirects from Host, as most frameworks do, so a wrong hit shows as another client's
//! number or Location.
mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::exchange_from;
use common::*;

/// The trusted proxy (`trusted_proxies`) and a client that is not one.
const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// An upstream that answers `/…/docs` with a redirect to `http://{Host}{path}/` and anything
/// else with 200; both public for a minute. The body numbers the answer and says what the
/// request carried that an application builds links from.
async fn upstream() -> std::net::SocketAddr {
    let n = Arc::new(AtomicU64::new(0));
    serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let n = n.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let h = |name: &str| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            let host = h("host");
            let body = serde_json::json!({
                "n": n,
                "host": host,
                "x-forwarded-host": h("x-forwarded-host"),
                "x-forwarded-proto": h("x-forwarded-proto"),
                "x-forwarded-port": h("x-forwarded-port"),
                "x-forwarded-prefix": h("x-forwarded-prefix"),
                "forwarded": h("forwarded"),
            });
            let path = req.uri().path().to_string();
            let mut b = hyper::Response::builder()
                .header("cache-control", "public, max-age=60")
                .header("content-type", "application/json");
            if path.ends_with("/docs") {
                b = b
                    .status(301)
                    .header("location", format!("http://{host}{path}/"));
            }
            b.body(full(body.to_string())).unwrap()
        }
    })
    .await
}

struct Answer {
    status: u16,
    cache: String,
    location: Option<String>,
    body: serde_json::Value,
}

async fn ask(port: u16, from: Ipv4Addr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let ex = exchange_from(from, port, req.as_bytes(), 1, Duration::from_millis(50)).await;
    let a = ex
        .answers
        .first()
        .unwrap_or_else(|| panic!("no answer to {req}"));
    Answer {
        status: a.status,
        cache: a.header("x-cache-status").unwrap_or("").to_string(),
        location: a.header("location").map(str::to_string),
        body: serde_json::from_slice(&a.body).unwrap_or_default(),
    }
}

struct Case {
    name: &'static str,
    /// A's request headers, then B's.
    a: &'static [(&'static str, &'static str)],
    b: &'static [(&'static str, &'static str)],
    /// Who sends them.
    from: Ipv4Addr,
    /// B may be served A's answer.
    shared: bool,
}

const SHOP: (&str, &str) = ("Host", "shop.example.com");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_the_answer_meant_for_it() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [upstreams.up]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/\"\nupstream = \"up\"\ncache = {{ ttl = \"60s\" }}\n"
        ),
        &[port],
    );
    let cases = [
        Case {
            name: "a redirect built from Host:1337 is not served to Host without a port",
            a: &[("Host", "shop.example.com:1337")],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "another port is another authority",
            a: &[("Host", "shop.example.com:8080")],
            b: &[("Host", "shop.example.com:8081")],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "letter case is one authority",
            a: &[SHOP],
            b: &[("Host", "Shop.Example.COM")],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a trailing dot is one authority",
            a: &[SHOP],
            b: &[("Host", "shop.example.com.")],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "the default port is one authority",
            a: &[SHOP],
            b: &[("Host", "shop.example.com:80")],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a port with a leading zero is that port",
            a: &[("Host", "shop.example.com:8080")],
            b: &[("Host", "SHOP.example.com.:08080")],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "another host",
            a: &[SHOP],
            b: &[("Host", "admin.example.com")],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "a client's X-Forwarded-Host is replaced, so it splits nothing",
            a: &[SHOP, ("X-Forwarded-Host", "evil.example")],
            b: &[SHOP, ("X-Forwarded-Host", "other.example")],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a client's X-Forwarded-Prefix is dropped, so it splits nothing",
            a: &[SHOP, ("X-Forwarded-Prefix", "/evil")],
            b: &[SHOP],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a client's Forwarded is dropped, so it splits nothing",
            a: &[SHOP, ("Forwarded", "host=evil.example")],
            b: &[SHOP],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a trusted proxy's X-Forwarded-Host reaches the upstream: keyed",
            a: &[SHOP, ("X-Forwarded-Host", "a.example")],
            b: &[SHOP, ("X-Forwarded-Host", "b.example")],
            from: PROXY,
            shared: false,
        },
        Case {
            name: "a trusted proxy's X-Forwarded-Proto: keyed",
            a: &[SHOP, ("X-Forwarded-Proto", "http")],
            b: &[SHOP, ("X-Forwarded-Proto", "https")],
            from: PROXY,
            shared: false,
        },
        Case {
            name: "a trusted proxy's X-Forwarded-Port: keyed",
            a: &[SHOP, ("X-Forwarded-Port", "80")],
            b: &[SHOP, ("X-Forwarded-Port", "8443")],
            from: PROXY,
            shared: false,
        },
        Case {
            name: "a trusted proxy's X-Forwarded-Prefix: keyed",
            a: &[SHOP, ("X-Forwarded-Prefix", "/a")],
            b: &[SHOP, ("X-Forwarded-Prefix", "/b")],
            from: PROXY,
            shared: false,
        },
        Case {
            name: "a trusted proxy's Forwarded: keyed",
            a: &[SHOP, ("Forwarded", "host=a.example;proto=https")],
            b: &[SHOP, ("Forwarded", "host=b.example;proto=https")],
            from: PROXY,
            shared: false,
        },
        Case {
            name: "a trusted proxy's same values share",
            a: &[SHOP, ("X-Forwarded-Host", "a.example")],
            b: &[
                ("Host", "SHOP.example.com"),
                ("X-Forwarded-Host", "a.example"),
            ],
            from: PROXY,
            shared: true,
        },
    ];
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let path = format!("/case{i}/docs");
        let a = ask(port, c.from, &path, c.a).await;
        assert_eq!((a.status, a.cache.as_str()), (301, "MISS"), "{}", c.name);
        let b = ask(port, c.from, &path, c.b).await;
        let got_a = b.body["n"] == a.body["n"];
        let ok = if c.shared {
            got_a && b.cache == "HIT"
        } else {
            !got_a && b.cache == "MISS"
        };
        if !ok {
            failed.push(format!(
                "{}: B got {} ({}, Location {:?}) after A's {}",
                c.name, b.body, b.cache, b.location, a.body
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The upstream sees the one spelling: Host and X-Forwarded-Host are the canonical
/// authority, whatever the client wrote, and a redirect built from them names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_canonical_authority() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.up]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/\"\nupstream = \"up\"\n"
        ),
        &[port],
    );
    for (host, want) in [
        ("Shop.Example.COM.", "shop.example.com"),
        ("shop.example.com:80", "shop.example.com"),
        ("SHOP.example.com:01337", "shop.example.com:1337"),
        ("[::1]:80", "[::1]"),
    ] {
        let a = ask(port, CLIENT, "/x/docs", &[("Host", host)]).await;
        assert_eq!(a.body["host"], want, "{host}");
        assert_eq!(a.body["x-forwarded-host"], want, "{host}");
        assert_eq!(
            a.location.as_deref(),
            Some(format!("http://{want}/x/docs/").as_str())
        );
    }
}

/// A purge names an entry by any spelling of its authority; another port is another entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_any_spelling_of_the_authority() {
    let up = upstream().await;
    let (port, admin) = (free_port(), free_port());
    let token = "0123456789abcdef0123456789abcdef";
    let _g = Gatehouse::start(
        &format!(
            "[server]\nadmin = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n\
             [upstreams.up]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/\"\nupstream = \"up\"\ncache = {{ ttl = \"60s\" }}\n"
        ),
        &[port, admin],
    );
    let purge = |url: &'static str| async move {
        let r = client()
            .post(format!("http://127.0.0.1:{admin}/cache/purge"))
            .query(&[("url", url)])
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["purged"].clone()
    };
    ask(port, CLIENT, "/p", &[("Host", "Shop.example.com.")]).await;
    ask(port, CLIENT, "/p", &[("Host", "shop.example.com:8080")]).await;
    assert_eq!(ask(port, CLIENT, "/p", &[SHOP]).await.cache, "HIT");
    assert_eq!(purge("http://shop.example.com:9999/p").await, 0);
    assert_eq!(purge("HTTP://SHOP.example.com.:80/p").await, 1);
    assert_eq!(ask(port, CLIENT, "/p", &[SHOP]).await.cache, "MISS");
    let other = ask(port, CLIENT, "/p", &[("Host", "shop.example.com:8080")]).await;
    assert_eq!(other.cache, "HIT", "another port, another entry");
}
