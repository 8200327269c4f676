//! Aggregate routes from the outside: parts in parallel, dependent parts, failure policies,
//! header forwarding, limits, and `check` on bad aggregates.
mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::Response;

/// A JSON upstream that answers after `ms`: its name, the path and query it was asked, the
/// headers it saw, and a Set-Cookie the client must never get.
async fn slow(name: &'static str, ms: u64) -> std::net::SocketAddr {
    serve(
        move |req: hyper::Request<hyper::body::Incoming>| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let body = serde_json::json!({
                "name": name,
                "path": req.uri().path(),
                "query": req.uri().query(),
                "account": { "id": format!("{name}/7") },
                "authorization": h("authorization"),
                "cookie": h("cookie"),
                "request_id": h("x-request-id"),
                "traceparent": h("traceparent"),
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("set-cookie", "session=from-a-part")
                .body(full(body.to_string()))
                .unwrap()
        },
    )
    .await
}

fn config(port: u16, ups: &[(&str, String)], route: &str) -> String {
    let mut t = String::new();
    for (name, peer) in ups {
        t.push_str(&format!(
            "[upstreams.{name}]\npeers = [\"{peer}\"]\nconnect_timeout = \"500ms\"\n"
        ));
    }
    t.push_str(&format!(
        "[plugins.rid]\nkind = \"request_id\"\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\nplugins = [\"rid\"]\n{route}"
    ));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_run_in_parallel_and_a_dependent_part_gets_its_value() {
    let (a, b, c, d) = (
        slow("users", 300).await,
        slow("orders", 300).await,
        slow("products", 300).await,
        slow("reviews", 0).await,
    );
    let port = free_port();
    let toml = config(
        port,
        &[
            ("users", a.to_string()),
            ("orders", b.to_string()),
            ("products", c.to_string()),
            ("reviews", d.to_string()),
        ],
        r#"
[[routes]]
name = "home"
path = "~ ^/screens/home/(?P<id>[^/]+)$"
[routes.aggregate.parts]
user = "users:/users/{id}"
orders = "orders:/orders?lang={query.lang}"
products = { upstream = "products", path = "/products" }
reviews = { upstream = "reviews", path = "/reviews?account={user.account.id}&first={orders/account/id}" }
"#,
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let t = Instant::now();
    let (status, headers, body) = get(
        &format!("http://127.0.0.1:{port}/screens/home/a%20b?lang=fr%26x"),
        &[("authorization", "Bearer t0k"), ("cookie", "secret=1")],
    )
    .await;
    let took = t.elapsed();
    assert_eq!(status, 200, "{body}");
    // Three parts of 300 ms side by side, the fourth after two of them: not 900 ms.
    assert!(took < Duration::from_millis(600), "{took:?}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["user"]["path"], "/users/a%20b",
        "a value is percent-encoded into its segment"
    );
    assert_eq!(
        v["orders"]["query"], "lang=fr%26x",
        "a query value cannot add a parameter"
    );
    assert_eq!(v["products"]["path"], "/products");
    assert_eq!(v["reviews"]["query"], "account=users%2F7&first=orders%2F7");
    assert!(v.get("errors").is_none());
    // Chosen headers go to every part; others (cookie) do not; parts' cookies stay behind.
    for p in ["user", "orders", "products", "reviews"] {
        assert_eq!(v[p]["authorization"], "Bearer t0k");
        assert_eq!(v[p]["cookie"], serde_json::Value::Null);
        assert_eq!(
            v[p]["request_id"].as_str(),
            headers["x-request-id"].to_str().ok()
        );
        assert!(v[p]["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")));
    }
    assert!(headers.get("set-cookie").is_none());
    assert_eq!(headers["content-type"], "application/json");
    // Only GET and HEAD unless `methods` says more.
    let post = client()
        .post(format!("http://127.0.0.1:{port}/screens/home/1"))
        .send()
        .await
        .unwrap();
    assert!(
        post.status() == 405 || post.status() == 404,
        "{}",
        post.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_and_partial_say_which_part_and_why() {
    let ok = slow("users", 0).await;
    let slowpoke = slow("orders", 3000).await;
    let down = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let route = |policy: &str, path: &str| {
        format!(
            r#"
[[routes]]
path = "{path}"
[routes.aggregate]
on_error = "{policy}"
partial_status = 207
[routes.aggregate.parts]
user = "users:/u"
orders = {{ upstream = "orders", path = "/o", timeout = "300ms" }}
stock = "stock:/s"
after = "users:/after/{{stock.account.id}}"
"#
        )
    };
    let toml = config(
        port,
        &[
            ("users", ok.to_string()),
            ("orders", slowpoke.to_string()),
            ("stock", down),
        ],
        &(route("partial", "/partial") + &route("fail", "/fail")),
    );
    let _g = Gatehouse::start(&toml, &[port]);

    let t = Instant::now();
    let (status, _, body) = get(&format!("http://127.0.0.1:{port}/partial"), &[]).await;
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(status, 207, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["user"]["path"], "/u");
    assert_eq!(v["orders"], serde_json::Value::Null);
    assert_eq!(v["stock"], serde_json::Value::Null);
    assert_eq!(v["after"], serde_json::Value::Null);
    assert_eq!(v["errors"]["orders"]["error"], "timeout", "{body}");
    assert_eq!(v["errors"]["stock"]["error"], "connect", "{body}");
    assert_eq!(v["errors"]["after"]["error"], "skipped", "{body}");
    assert!(v["errors"]["after"]["message"]
        .as_str()
        .unwrap()
        .contains("\"stock\""));
    assert!(v["errors"].get("user").is_none());

    let (status, _, body) = get(&format!("http://127.0.0.1:{port}/fail"), &[]).await;
    assert!(status == 502 || status == 504, "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let part = v["part"].as_str().unwrap();
    assert!(part == "orders" || part == "stock", "{body}");
    assert_eq!(status, if part == "orders" { 504 } else { 502 });
    assert!(v["error"].as_str().unwrap().contains(part));
    assert!(v["request_id"].as_str().is_some_and(|r| !r.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_bodies_fail_their_part() {
    let big = serve(|_| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(format!("\"{}\"", "x".repeat(5000))))
            .unwrap()
    })
    .await;
    let text = serve(|_| async { Response::builder().body(full("plain words")).unwrap() }).await;
    let empty = serve(|_| async { Response::builder().body(full("")).unwrap() }).await;
    let port = free_port();
    let toml = config(
        port,
        &[
            ("big", big.to_string()),
            ("text", text.to_string()),
            ("empty", empty.to_string()),
        ],
        r#"
[[routes]]
path = "/a"
[routes.aggregate]
max_part_bytes = "1KiB"
[routes.aggregate.parts]
big = "big:/"
text = "text:/"
words = { upstream = "text", path = "/", raw = true }
empty = "empty:/"
"#,
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let (status, _, body) = get(&format!("http://127.0.0.1:{port}/a"), &[]).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errors"]["big"]["error"], "too_large", "{body}");
    assert_eq!(v["errors"]["text"]["error"], "invalid_json", "{body}");
    assert_eq!(v["errors"]["empty"]["error"], "empty", "{body}");
    assert_eq!(v["words"], "plain words");
}

#[test]
fn check_refuses_cycles_unknown_parts_and_bad_templates() {
    let (code, out, _, _d) = check(
        r#"[upstreams.u]
peers = ["127.0.0.1:9"]
[gateways.g]
listen = ["127.0.0.1:8080"]
[[routes]]
path = "/x"
[routes.aggregate.parts]
a = "u:/a/{b.id}"
b = "u:/b/{c.id}"
c = "u:/c/{a.id}"
d = "u:/d/{nope.id}"
e = "u:/e/{id}"
f = "missing:/f"
"#,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":8:") && out.contains("cycle: a -> b -> c -> a"),
        "{out}"
    );
    assert!(out.contains(":11:") && out.contains("{nope.id}"), "{out}");
    assert!(
        out.contains(":12:") && out.contains("named groups need a regex path"),
        "{out}"
    );
    assert!(
        out.contains(":13:") && out.contains("unknown upstream \"missing\""),
        "{out}"
    );
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_values_bodies_head_and_explain() {
    let up = slow("users", 0).await;
    let port = free_port();
    let toml = format!(
        r#"
[upstreams.users]
peers = ["{up}"]
[plugins.keys]
kind = "key_auth"
header = "x-api-key"
keys = {{ "alice smith" = "sha256:{}" }}
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
name = "me"
path = "/me"
methods = ["GET", "HEAD", "POST"]
plugins = ["keys"]
[routes.aggregate.parts]
profile = "users:/profiles/{{consumer}}"
echo = {{ upstream = "users", path = "/echo", body = true }}
"#,
        sha256_hex("k1")
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let url = format!("http://127.0.0.1:{port}/me");
    // The route's auth runs once, before any part.
    let (status, _, _) = get(&url, &[]).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(&url, &[("x-api-key", "k1")]).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["profile"]["path"], "/profiles/alice%20smith");
    // HEAD: the same status and headers, no body.
    let head = client()
        .head(&url)
        .header("x-api-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.text().await.unwrap(), "");
    // A POST's body goes to the part marked `body`, with the client's method.
    let echo = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let m = req.method().to_string();
        let b = req.into_body().collect().await.unwrap().to_bytes();
        Response::builder()
            .body(full(
                serde_json::json!({"method": m, "body": String::from_utf8_lossy(&b)}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let port2 = free_port();
    let toml2 = toml
        .replace(&up.to_string(), &echo.to_string())
        .replace(&port.to_string(), &port2.to_string());
    let _g2 = Gatehouse::start(&toml2, &[port2]);
    let r = client()
        .post(format!("http://127.0.0.1:{port2}/me"))
        .header("x-api-key", "k1")
        .body("{\"a\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["echo"]["method"], "POST");
    assert_eq!(v["echo"]["body"], "{\"a\":1}");
    assert_eq!(v["profile"]["method"], "GET");
    assert_eq!(v["profile"]["body"], "");

    // explain names the parts, their upstreams and what they wait for.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["explain", "-c"])
        .arg(&cfg)
        .args(["GET", "http://localhost/me"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("aggregate of 2 parts"), "{text}");
    assert!(
        text.contains("profile: users /profiles/{consumer}"),
        "{text}"
    );
}

#[test]
fn check_bounds_the_number_of_parts() {
    let mut parts = String::new();
    for i in 0..5 {
        parts.push_str(&format!("p{i} = \"u:/{i}\"\n"));
    }
    let (code, out, _, _d) = check(&format!(
        "[server]\nmax_aggregate_parts = 4\n[upstreams.u]\npeers = [\"127.0.0.1:9\"]\n[gateways.g]\nlisten = [\"127.0.0.1:8080\"]\n[[routes]]\npath = \"/x\"\n[routes.aggregate.parts]\n{parts}"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("5 parts: at most 4"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_retries_truncated_bodies_and_open_circuits() {
    let up = slow("orders", 0).await;
    let down = format!("127.0.0.1:{}", free_port());
    // Says 100 bytes, sends 10, closes: a truncated answer.
    let cut = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":12345")
                    .await;
            }
        });
        a
    };
    let port = free_port();
    let secret = "a-shared-secret-that-is-long-enough-0123456789";
    let toml = format!(
        r#"
[upstreams.orders]
peers = ["{down}", "{up}"]
retries = 1
connect_timeout = "500ms"
[upstreams.cut]
peers = ["{cut}"]
[upstreams.dead]
peers = ["{down}"]
circuit_breaker = {{ failures = 1, open_for = "30s" }}
[plugins.jwt]
kind = "jwt_auth"
algorithms = ["HS256"]
secret = "{secret}"
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/a"
plugins = ["jwt"]
[routes.aggregate.parts]
mine = "orders:/orders?tenant={{jwt.tenant}}&n={{jwt.n}}"
cut = "cut:/"
dead = {{ upstream = "dead", path = "/", optional = true }}
"#
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "u1", "tenant": "acme & co", "n": 7, "exp": 4_000_000_000u64 }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let auth = format!("Bearer {token}");
    for round in 0..4 {
        let (status, _, body) = get(
            &format!("http://127.0.0.1:{port}/a"),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Round robin over a dead peer and a live one: the part is retried on the live one.
        assert_eq!(
            v["mine"]["query"], "tenant=acme%20%26%20co&n=7",
            "round {round}: {body}"
        );
        assert_eq!(v["errors"]["cut"]["error"], "upstream", "{body}");
        // The first call fails and opens the circuit; the next ones are not even tried.
        let want = if round == 0 {
            "connect"
        } else {
            "circuit_open"
        };
        assert_eq!(v["errors"]["dead"]["error"], want, "round {round}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_cannot_reshape_a_path_and_client_slowness_blames_no_upstream() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let counted = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Response::builder()
                .body(full(
                    serde_json::json!({ "path": req.uri().path() }).to_string(),
                ))
                .unwrap()
        }
    })
    .await;
    let parent = slow("parent", 250).await;
    let port = free_port();
    let toml = format!(
        r#"
[upstreams.b]
peers = ["{counted}"]
circuit_breaker = {{ failures = 1, open_for = "30s" }}
[upstreams.parent]
peers = ["{parent}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/u"
[routes.aggregate]
on_error = "fail"
[routes.aggregate.parts]
user = "b:/users/{{query.id}}/orders"
[[routes]]
path = "/late"
[routes.aggregate]
timeout = "300ms"
[routes.aggregate.parts]
parent = "parent:/p"
child = "b:/after/{{parent.name}}"
[[routes]]
path = "/direct"
[routes.aggregate.parts]
b = "b:/direct"
"#
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let base = format!("http://127.0.0.1:{port}");
    for q in ["id=..", "id=.", "id=", "id=a%2Fb", "id=a%5Cb", "x=1"] {
        let (status, _, body) = get(&format!("{base}/u?{q}"), &[]).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body.contains("\"part\":\"user\""), "{body}");
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "never sent"
    );
    let (status, _, body) = get(&format!("{base}/u?id=a.b%20c"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/users/a.b%20c/orders"), "{body}");

    // The child starts after a 250 ms parent with 50 ms of the route's 300 left, and its
    // upstream takes 100 ms: cut by the route's deadline, which is no verdict on `b`.
    for _ in 0..2 {
        let (status, _, body) = get(&format!("{base}/late"), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"child\":{\"error\":\"timeout\""), "{body}");
    }
    let (status, _, body) = get(&format!("{base}/direct"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"path\":\"/direct\""),
        "the circuit of b stays closed: {body}"
    );
}

#[test]
fn check_refuses_what_would_break_the_answer() {
    let (code, out, _, _d) = check(
        r#"[upstreams.u]
peers = ["127.0.0.1:9"]
[gateways.g]
listen = ["127.0.0.1:8080"]
[[routes]]
path = "/x"
[routes.aggregate]
partial_status = 204
forward_headers = ["content-length"]
[routes.aggregate.parts]
errors = "u:/e"
maybe = { upstream = "u", path = "/m", optional = true }
needs = "u:/n/{maybe.id}"
"#,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":8:") && out.contains("partial_status"),
        "{out}"
    );
    assert!(
        out.contains(":9:") && out.contains("content-length"),
        "{out}"
    );
    assert!(out.contains(":11:") && out.contains("\"errors\""), "{out}");
    assert!(out.contains(":13:") && out.contains("`optional`"), "{out}");
}

/// Parts are told about the client as the proxied path tells its upstream: behind a trusted
/// load balancer, X-Forwarded-For is the client and then the balancer, the balancer's
/// X-Forwarded-Proto/-Host pass, and without one X-Forwarded-Host is the canonical authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_get_the_forwarded_headers_of_the_client_request() {
    let up = echo("part").await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [upstreams.u]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/agg\"\n[routes.aggregate.parts]\np = \"u:/p\"\n"
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/agg");
    // From the trusted balancer, which names the client and the original host and scheme.
    let (status, _, body) = get(
        &url,
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example.com"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let part = &v["p"];
    assert_eq!(seen(part, "x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(seen(part, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(part, "x-forwarded-host"), ["shop.example.com"]);
    // Without the balancer's word: the request's own authority, canonical.
    let r = client()
        .get(&url)
        .header("host", "Shop.Example.com.:80")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen(&v["p"], "x-forwarded-host"), ["shop.example.com"]);
    assert_eq!(seen(&v["p"], "x-forwarded-for"), ["127.0.0.1"]);
}
