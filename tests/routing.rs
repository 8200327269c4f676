//! Routing end to end: host/path/method/header matching, specificity, rewrites, BFF gateways on
//! two ports, forwarded headers, hop-by-hop headers and the plugin chain order.
mod common;

use common::*;
use serde_json::Value;

fn config(
    gw: u16,
    gw2: u16,
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    c: std::net::SocketAddr,
) -> String {
    format!(
        r#"
[server]
threads = 1
plugins = ["rid", "chain-global"]

[upstreams.a]
peers = ["{a}"]
[upstreams.b]
peers = ["{b}"]
[upstreams.c]
peers = ["{c}"]

[plugins.rid]
kind = "request_id"
[plugins.chain-global]
kind = "headers"
request = {{ add = {{ "x-chain" = "global" }} }}
response = {{ add = {{ "x-order" = "global" }} }}
[plugins.chain-gateway]
kind = "headers"
request = {{ add = {{ "x-chain" = "gateway" }} }}
response = {{ add = {{ "x-order" = "gateway" }} }}
[plugins.chain-route]
kind = "headers"
request = {{ add = {{ "x-chain" = "route" }}, remove = ["x-secret"] }}
response = {{ add = {{ "x-order" = "route" }} }}

[gateways.web]
listen = ["127.0.0.1:{gw}"]
plugins = ["chain-gateway"]
[gateways.mobile]
listen = ["127.0.0.1:{gw2}"]
forwarded_headers = ["for"]

[[routes]]
name = "catch-all"
gateway = "web"
upstream = "a"

[[routes]]
name = "api"
gateway = "web"
path = "/api"
strip_prefix = true
upstream = "b"
plugins = ["chain-route"]

[[routes]]
name = "api-exact"
gateway = "web"
path = "= /api/status"
rewrite = "/internal/health"
upstream = "c"

[[routes]]
name = "api-write"
gateway = "web"
path = "/api"
methods = ["POST", "PUT"]
upstream = "c"

[[routes]]
name = "api-beta"
gateway = "web"
path = "/api"
headers = {{ "x-beta" = "~ ^(1|yes)$" }}
upstream = "c"

[[routes]]
name = "items"
gateway = "web"
path = "~ ^/items/(?P<id>[0-9]+)$"
rewrite = "/v2/items/${{id}}"
upstream = "b"

[[routes]]
name = "admin-host"
gateway = "web"
host = "admin.example.com"
path = "/api"
rewrite = "/admin"
upstream = "c"

[[routes]]
name = "tenant-host"
gateway = "web"
host = "*.tenants.example.com"
upstream = "c"
preserve_host = false

[[routes]]
name = "mobile-only"
gateway = "mobile"
path = "/m"
upstream = "a"
"#
    )
}

struct Setup {
    _g: Gatehouse,
    web: String,
    mobile: String,
}

async fn setup() -> Setup {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let (gw, gw2) = (free_port(), free_port());
    let g = Gatehouse::start(&config(gw, gw2, a, b, c), &[gw, gw2]);
    Setup {
        _g: g,
        web: format!("http://127.0.0.1:{gw}"),
        mobile: format!("http://127.0.0.1:{gw2}"),
    }
}

async fn get(
    url: &str,
    headers: &[(&str, &str)],
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    send(reqwest::Method::GET, url, headers).await
}

async fn send(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let mut rb = client().request(method, url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status();
    let h = resp.headers().clone();
    let body = resp.text().await.expect("body");
    (
        status,
        h,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// (method, path, request headers, expected upstream, expected upstream path)
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);

#[tokio::test]
async fn routing_matrix() {
    let s = setup().await;
    let w = &s.web;
    let cases: &[Case] = &[
        ("GET", "/", &[], "a", "/"),
        ("GET", "/apix", &[], "a", "/apix"),
        ("GET", "/api", &[], "b", "/"),
        ("GET", "/api/users/1?x=1", &[], "b", "/users/1"),
        ("GET", "/api/status", &[], "c", "/internal/health"),
        ("GET", "/api/status/more", &[], "b", "/status/more"),
        ("POST", "/api/users", &[], "c", "/api/users"),
        ("GET", "/api/users", &[("x-beta", "yes")], "c", "/api/users"),
        ("GET", "/api/users", &[("x-beta", "no")], "b", "/users"),
        ("GET", "/items/42", &[], "b", "/v2/items/42"),
        ("GET", "/items/abc", &[], "a", "/items/abc"),
        (
            "GET",
            "/api/x",
            &[("host", "admin.example.com")],
            "c",
            "/admin/x",
        ),
        (
            "GET",
            "/api/x",
            &[("host", "ADMIN.example.com:8080")],
            "c",
            "/admin/x",
        ),
        (
            "GET",
            "/other",
            &[("host", "admin.example.com")],
            "a",
            "/other",
        ),
        (
            "GET",
            "/api/x",
            &[("host", "acme.tenants.example.com")],
            "c",
            "/api/x",
        ),
    ];
    for (method, path, headers, upstream, upath) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, h, body) = send(m, &format!("{w}{path}"), headers).await;
        assert_eq!(status, 200, "{method} {path} {headers:?}: {body}");
        assert_eq!(
            body["upstream"], *upstream,
            "{method} {path} {headers:?}: {body}"
        );
        assert_eq!(body["path"], *upath, "{method} {path} {headers:?}: {body}");
        assert!(h.contains_key("x-request-id"));
    }
    let (_, _, body) = get(&format!("{w}/api/users/1?x=1&y=%20"), &[]).await;
    assert_eq!(body["query"], "x=1&y=%20", "query string is kept: {body}");
}

#[tokio::test]
async fn host_forwarding_and_hop_by_hop() {
    let s = setup().await;
    let (_, _, body) = get(
        &format!("{}/api/h", s.web),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "s"),
        ],
    )
    .await;
    // Host is kept by default.
    assert_eq!(
        seen(&body, "host"),
        vec![s.web.trim_start_matches("http://").to_string()]
    );
    // The test client is not a trusted proxy: spoofed X-Forwarded-* are replaced.
    assert_eq!(seen(&body, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen(&body, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        seen(&body, "x-forwarded-host"),
        vec![s.web.trim_start_matches("http://").to_string()]
    );
    assert!(
        seen(&body, "x-hop").is_empty(),
        "header named in Connection is dropped: {body}"
    );
    assert!(seen(&body, "keep-alive").is_empty(), "{body}");
    assert!(
        seen(&body, "x-secret").is_empty(),
        "route plugin removed it: {body}"
    );

    // preserve_host = false: the upstream sees its own address.
    let (_, _, body) = get(
        &format!("{}/t", s.web),
        &[("host", "acme.tenants.example.com")],
    )
    .await;
    let host = seen(&body, "host");
    assert!(host[0].starts_with("127.0.0.1:"), "{body}");
    assert_eq!(
        seen(&body, "x-forwarded-host"),
        ["acme.tenants.example.com"],
        "X-Forwarded-Host is the client's Host, not the peer's: {body}"
    );
}

#[tokio::test]
async fn plugin_chain_order_and_request_id() {
    let s = setup().await;
    let (status, h, body) = get(&format!("{}/api/x", s.web), &[("x-request-id", "abc-123")]).await;
    assert_eq!(status, 200);
    assert_eq!(
        seen(&body, "x-chain"),
        vec!["global", "gateway", "route"],
        "{body}"
    );
    let order: Vec<_> = h
        .get_all("x-order")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        order,
        vec!["route", "gateway", "global"],
        "response hooks run inside out"
    );
    assert_eq!(seen(&body, "x-request-id"), vec!["abc-123"]);
    assert_eq!(h["x-request-id"], "abc-123");

    // A fresh id when the client sends none (or a malformed one); same id up and down.
    let (_, h, body) = get(
        &format!("{}/api/x", s.web),
        &[("x-request-id", "bad id with spaces")],
    )
    .await;
    let id = h["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(seen(&body, "x-request-id"), vec![id]);
}

#[tokio::test]
async fn bff_gateways_have_their_own_routes() {
    let s = setup().await;
    let (status, _, body) = get(&format!("{}/m/profile", s.mobile), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["upstream"], "a");
    // Only the global plugin runs on the mobile gateway.
    assert_eq!(seen(&body, "x-chain"), vec!["global"]);
    // The web gateway's routes do not exist on the mobile one.
    let (status, h, body) = get(&format!("{}/api/x", s.mobile), &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], 404);
    assert_eq!(body["request_id"], h["x-request-id"].to_str().unwrap());
    assert_eq!(h["content-type"], "application/json");
}

#[tokio::test]
async fn forwarded_headers_left_out_are_neither_set_nor_passed() {
    let s = setup().await;
    // The mobile gateway sends X-Forwarded-For only; a client's own -Proto/-Host are dropped
    // (it is not a trusted proxy), its -For replaced.
    let (status, _, body) = get(
        &format!("{}/m/x", s.mobile),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert!(seen(&body, "x-forwarded-proto").is_empty(), "{body}");
    assert!(seen(&body, "x-forwarded-host").is_empty(), "{body}");
}

#[tokio::test]
async fn method_mismatch_is_404_without_catch_all() {
    let up = echo("a").await;
    let port = free_port();
    let g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/only-get\"\nmethods = [\"GET\"]\nupstream = \"a\"\n"
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/only-get");
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    let r = client().delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    drop(g);
}

#[tokio::test]
async fn weighted_round_robin() {
    let (a, b) = (echo("a").await, echo("b").await);
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.ab]\npeers = [\"{a}\", {{ addr = \"{b}\", weight = 3 }}]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"ab\"\n"
        ),
        &[port],
    );
    let c = client();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..400 {
        let r = c
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap();
        let up = r.headers()["x-upstream"].to_str().unwrap().to_string();
        *counts.entry(up).or_insert(0) += 1;
    }
    assert_eq!(counts["a"], 100, "{counts:?}");
    assert_eq!(counts["b"], 300, "{counts:?}");
}
