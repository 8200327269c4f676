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
/// else with 200; public for a minute unless the query says `cc=` (its Cache-Control) and
/// `vary=` (its Vary). The body numbers the answer and says what the request carried that an
/// application builds links from.
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
            let q: std::collections::HashMap<String, String> =
                form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let cc = q.get("cc").map_or("public, max-age=60", |v| v.as_str());
            let mut b = hyper::Response::builder()
                .header("cache-control", cc)
                .header("content-type", "application/json");
            if let Some(v) = q.get("vary") {
                b = b.header("vary", v.as_str());
            }
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

struct Case<'a> {
    name: &'static str,
    /// The route's prefix and the query (the upstream's Cache-Control and Vary).
    route: &'static str,
    query: &'static str,
    /// A's request headers, then B's.
    a: &'a [(&'a str, &'a str)],
    b: &'a [(&'a str, &'a str)],
    /// Who sends them.
    from: Ipv4Addr,
    /// B may be served A's answer.
    shared: bool,
}

const SHOP: (&str, &str) = ("Host", "shop.example.com");

const JWT_SECRET: &str = "cache-safety-secret-0123456789abcdef";

/// `Authorization: Bearer …` for `sub`.
fn bearer(sub: &str) -> String {
    format!("Bearer {}", token(sub))
}

fn token(sub: &str) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": 4_000_000_000u64 });
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// The gateway: 127.0.0.1 is a trusted proxy; cached routes without plugins (`/`), behind
/// a JWT (`/jwt`, and `/cookie` with the token in a cookie), an API key (`/key`), a headers plugin that sends the JWT's subject
/// upstream (`/hdr`) and a request id (`/rid`).
fn gateway(up: std::net::SocketAddr, port: u16) -> String {
    let sha = |k: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(k.as_bytes()));
    let route = |path: &str, plugins: &str| {
        format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"up\"\nplugins = [{plugins}]\n\
             cache = {{ ttl = \"60s\" }}\n"
        )
    };
    format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [upstreams.up]\npeers = [\"{up}\"]\n\
         [plugins.jwt]\nkind = \"jwt_auth\"\nalgorithms = [\"HS256\"]\nsecret = \"{JWT_SECRET}\"\n\
         [plugins.jwt-cookie]\nkind = \"jwt_auth\"\nalgorithms = [\"HS256\"]\nsecret = \"{JWT_SECRET}\"\ncookie = \"session\"\n\
         [plugins.keys]\nkind = \"key_auth\"\nheader = \"x-api-key\"\n\
         keys = {{ alice = \"sha256:{}\", bob = \"sha256:{}\" }}\n\
         [plugins.who]\nkind = \"headers\"\nrequest = {{ set = {{ \"x-user-id\" = \"${{jwt.sub}}\" }} }}\n\
         [plugins.rid]\nkind = \"request_id\"\n\
         [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n{}{}{}{}{}{}",
        sha("alice-key"),
        sha("bob-key"),
        route("/", ""),
        route("/jwt", "\"jwt\""),
        route("/cookie", "\"jwt-cookie\""),
        route("/key", "\"keys\""),
        route("/hdr", "\"jwt\", \"who\""),
        route("/rid", "\"rid\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_the_answer_meant_for_it() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&gateway(up, port), &[port]);
    let (alice, bob) = (bearer("alice"), bearer("bob"));
    let (alice_cookie, bob_cookie) = (
        format!("session={}", token("alice")),
        format!("session={}", token("bob")),
    );
    let cases = [
        Case {
            route: "",
            query: "",
            name: "a redirect built from Host:1337 is not served to Host without a port",
            a: &[("Host", "shop.example.com:1337")],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "another port is another authority",
            a: &[("Host", "shop.example.com:8080")],
            b: &[("Host", "shop.example.com:8081")],
            from: CLIENT,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "letter case is one authority",
            a: &[SHOP],
            b: &[("Host", "Shop.Example.COM")],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "a trailing dot is one authority",
            a: &[SHOP],
            b: &[("Host", "shop.example.com.")],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "the default port is one authority",
            a: &[SHOP],
            b: &[("Host", "shop.example.com:80")],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "a port with a leading zero is that port",
            a: &[("Host", "shop.example.com:8080")],
            b: &[("Host", "SHOP.example.com.:08080")],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "another host",
            a: &[SHOP],
            b: &[("Host", "admin.example.com")],
            from: CLIENT,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a client's X-Forwarded-Host is replaced, so it splits nothing",
            a: &[SHOP, ("X-Forwarded-Host", "evil.example")],
            b: &[SHOP, ("X-Forwarded-Host", "other.example")],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "a client's X-Forwarded-Prefix is dropped, so it splits nothing",
            a: &[SHOP, ("X-Forwarded-Prefix", "/evil")],
            b: &[SHOP],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "a client's Forwarded is dropped, so it splits nothing",
            a: &[SHOP, ("Forwarded", "host=evil.example")],
            b: &[SHOP],
            from: CLIENT,
            shared: true,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's X-Forwarded-Host reaches the upstream: keyed",
            a: &[SHOP, ("X-Forwarded-Host", "a.example")],
            b: &[SHOP, ("X-Forwarded-Host", "b.example")],
            from: PROXY,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's X-Forwarded-Proto: keyed",
            a: &[SHOP, ("X-Forwarded-Proto", "http")],
            b: &[SHOP, ("X-Forwarded-Proto", "https")],
            from: PROXY,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's X-Forwarded-Port: keyed",
            a: &[SHOP, ("X-Forwarded-Port", "80")],
            b: &[SHOP, ("X-Forwarded-Port", "8443")],
            from: PROXY,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's X-Forwarded-Prefix: keyed",
            a: &[SHOP, ("X-Forwarded-Prefix", "/a")],
            b: &[SHOP, ("X-Forwarded-Prefix", "/b")],
            from: PROXY,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's Forwarded: keyed",
            a: &[SHOP, ("Forwarded", "host=a.example;proto=https")],
            b: &[SHOP, ("Forwarded", "host=b.example;proto=https")],
            from: PROXY,
            shared: false,
        },
        Case {
            route: "",
            query: "",
            name: "a trusted proxy's same values share",
            a: &[SHOP, ("X-Forwarded-Host", "a.example")],
            b: &[
                ("Host", "SHOP.example.com"),
                ("X-Forwarded-Host", "a.example"),
            ],
            from: PROXY,
            shared: true,
        },
        // Who the client is: the chain's one verdict, whichever plugin reached it.
        Case {
            name: "two JWT users: a page that does not say public is each one's own",
            route: "/jwt",
            query: "cc=max-age%3D60",
            a: &[SHOP, ("Authorization", &alice)],
            b: &[SHOP, ("Authorization", &bob)],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "two JWT users: a page the origin says is public is shared (RFC 9111 §3.5)",
            route: "/jwt",
            query: "cc=public%2C%20max-age%3D60",
            a: &[SHOP, ("Authorization", &alice)],
            b: &[SHOP, ("Authorization", &bob)],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "two API keys",
            route: "/key",
            query: "cc=max-age%3D60",
            a: &[SHOP, ("X-Api-Key", "alice-key")],
            b: &[SHOP, ("X-Api-Key", "bob-key")],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "two JWT users in a session cookie",
            route: "/cookie",
            query: "cc=max-age%3D60",
            a: &[SHOP, ("Cookie", &alice_cookie)],
            b: &[SHOP, ("Cookie", &bob_cookie)],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "an Authorization no plugin checks is still a credential",
            route: "",
            query: "cc=max-age%3D60",
            a: &[SHOP, ("Authorization", "Basic YWxpY2U6cHc=")],
            b: &[SHOP, ("Authorization", "Basic Ym9iOnB3")],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "a page for a credential is not served to an anonymous client",
            route: "",
            query: "cc=max-age%3D60",
            a: &[SHOP, ("Authorization", "Basic YWxpY2U6cHc=")],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "an anonymous public page is shared",
            route: "",
            query: "cc=max-age%3D60",
            a: &[SHOP],
            b: &[SHOP],
            from: CLIENT,
            shared: true,
        },
        Case {
            name: "a session cookie no plugin reads, and Vary: Cookie",
            route: "",
            query: "vary=Cookie",
            a: &[SHOP, ("Cookie", "sid=alice")],
            b: &[SHOP, ("Cookie", "sid=bob")],
            from: CLIENT,
            shared: false,
        },
        // Vary against what the upstream saw: a header the gateway writes is never matched
        // by the client's value.
        Case {
            name: "Vary on a header the headers plugin sets from the JWT",
            route: "/hdr",
            query: "vary=X-User-Id",
            a: &[SHOP, ("Authorization", &alice)],
            b: &[SHOP, ("Authorization", &bob)],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "Vary on the request id",
            route: "/rid",
            query: "vary=X-Request-Id",
            a: &[SHOP],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "Vary on X-Forwarded-For",
            route: "",
            query: "vary=X-Forwarded-For",
            a: &[SHOP],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "Vary on traceparent",
            route: "",
            query: "vary=Traceparent",
            a: &[SHOP],
            b: &[SHOP],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "Vary on a client header: other values, other entries",
            route: "",
            query: "vary=Accept-Language",
            a: &[SHOP, ("Accept-Language", "en")],
            b: &[SHOP, ("Accept-Language", "fr")],
            from: CLIENT,
            shared: false,
        },
        Case {
            name: "Vary on a client header: the same value, the same entry",
            route: "",
            query: "vary=Accept-Language",
            a: &[SHOP, ("Accept-Language", "en")],
            b: &[SHOP, ("Accept-Language", "en")],
            from: CLIENT,
            shared: true,
        },
    ];
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let path = match c.query {
            "" => format!("{}/case{i}/docs", c.route),
            q => format!("{}/case{i}?{q}", c.route),
        };
        let a = ask(port, c.from, &path, c.a).await;
        assert!(matches!(a.status, 200 | 301), "{}: {}", c.name, a.status);
        assert_eq!(a.cache, "MISS", "{}", c.name);
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
