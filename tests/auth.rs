//! Identity plugins other than JWT end to end through the real binary: key_auth, basic_auth,
//! forward_auth, and the headers plugin's variables that carry what they found upstream.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn key_auth_by_header_and_query() {
    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let keys = write_file(
        dir.path(),
        "keys.txt",
        &format!(
            "# consumers\npartner sha256:{}\n",
            sha256_hex("partner-key")
        ),
    );
    let plugins = format!(
        r#"
[plugins.keys]
kind = "key_auth"
header = "x-api-key"
keys = {{ "mobile-app" = "sha256:{}" }}
[plugins.qkeys]
kind = "key_auth"
query = "api_key"
keys_file = "{keys}"
"#,
        sha256_hex("s3cret-mobile")
    );
    let _g = plugin_gateway(
        port,
        up,
        &plugins,
        &[("/h", "\"keys\""), ("/q", "\"qkeys\"")],
    );
    let base = format!("http://127.0.0.1:{port}");

    let (s, _, body) = get(&format!("{base}/h"), &[("x-api-key", "s3cret-mobile")]).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&v, "x-consumer"), vec!["mobile-app"]);
    assert!(
        seen(&v, "x-api-key").is_empty(),
        "the key does not reach the upstream"
    );

    let (s, h, body) = get(&format!("{base}/h"), &[("x-api-key", "s3cret-mobilf")]).await;
    assert_eq!(s, 401);
    assert!(body.contains("invalid API key"));
    assert!(h.contains_key("www-authenticate"));
    let (s, _, body) = get(&format!("{base}/h"), &[]).await;
    assert_eq!(s, 401);
    assert!(body.contains("API key missing"));

    let (s, _, body) = get(&format!("{base}/q?a=1&api_key=partner-key&b=2"), &[]).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&v, "x-consumer"), vec!["partner"]);
    assert_eq!(
        v["query"], "a=1&b=2",
        "api_key removed from the upstream query"
    );
    assert_eq!(get(&format!("{base}/q?api_key=nope"), &[]).await.0, 401);
}

#[tokio::test]
async fn basic_auth_with_bcrypt_htpasswd_and_consumer_variable() {
    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("open sesame", 6).unwrap();
    let htpasswd = write_file(dir.path(), "users", &format!("# team\nali:{hash}\n"));
    let plugins = format!(
        r#"
[plugins.basic]
kind = "basic_auth"
htpasswd_file = "{htpasswd}"
realm = "orders"
[plugins.who]
kind = "headers"
request = {{ set = {{ "x-user" = "${{consumer}}", "x-from" = "${{client_ip}}", "x-route" = "${{route}}" }} }}
"#
    );
    let _g = plugin_gateway(
        port,
        up,
        &plugins,
        &[("/", "\"basic\", \"who\""), ("/open", "\"who\"")],
    );
    let url = format!("http://127.0.0.1:{port}/p");
    // Without authentication there is no consumer: the client's own x-user is removed, not
    // passed on as if the gateway had set it.
    let (s, _, body) = get(
        &format!("http://127.0.0.1:{port}/open"),
        &[("x-user", "admin")],
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(seen(&v, "x-user").is_empty(), "{v}");

    for _ in 0..3 {
        // The second and third are served from the verified-password cache.
        let r = client()
            .get(&url)
            .basic_auth("ali", Some("open sesame"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(seen(&v, "x-user"), vec!["ali"]);
        assert_eq!(seen(&v, "x-from"), vec!["127.0.0.1"]);
        assert_eq!(seen(&v, "x-route").len(), 1);
        assert!(
            seen(&v, "authorization").is_empty(),
            "credentials stay at the gateway"
        );
    }
    let r = client()
        .get(&url)
        .basic_auth("ali", Some("open says me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"orders\", charset=\"UTF-8\""
    );
    let r = client()
        .get(&url)
        .basic_auth("bob", Some("open sesame"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(client().get(&url).send().await.unwrap().status(), 401);
}

/// A client guessing passwords is stopped before bcrypt once it failed `max_failures` times;
/// other clients are not.
#[tokio::test]
async fn basic_auth_caps_failures_per_client() {
    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("open sesame", 6).unwrap();
    let htpasswd = write_file(dir.path(), "users", &format!("ali:{hash}\n"));
    let plugins = format!(
        "[plugins.basic]\nkind = \"basic_auth\"\nhtpasswd_file = \"{htpasswd}\"\n\
         max_failures = 3\nfailure_window = \"30s\"\n"
    );
    let _g = plugin_gateway(port, up, &plugins, &[("/", "\"basic\"")]);
    let url = format!("http://127.0.0.1:{port}/p");
    let try_as = |client_ip: &'static str, pass: &'static str| {
        let url = url.clone();
        async move {
            let r = client()
                .get(&url)
                .header("x-forwarded-for", client_ip)
                .basic_auth("ali", Some(pass))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.headers().get("retry-after").cloned())
        }
    };
    for _ in 0..3 {
        assert_eq!(try_as("192.0.2.1", "guess").await.0, 401);
    }
    let (status, retry) = try_as("192.0.2.1", "guess").await;
    assert_eq!(status, 429, "refused before bcrypt");
    assert!(retry.is_some());
    assert_eq!(
        try_as("192.0.2.1", "open sesame").await.0,
        429,
        "until the window ends"
    );
    assert_eq!(
        try_as("192.0.2.2", "open sesame").await.0,
        200,
        "others sign in"
    );
}

#[tokio::test]
async fn forward_auth_allows_refuses_and_fails_closed() {
    let up = echo("up").await;
    let auth = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let ok = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer good");
        let uri = req.headers().get("x-forwarded-uri").cloned();
        if ok {
            hyper::Response::builder()
                .header("x-user-id", "u-42")
                .header("x-seen-uri", uri.unwrap())
                .body(full(""))
                .unwrap()
        } else {
            hyper::Response::builder()
                .status(403)
                .header("x-reason", "not today")
                .body(full("nope"))
                .unwrap()
        }
    })
    .await;
    let slow = serve(|_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        hyper::Response::new(full(""))
    })
    .await;
    let port = free_port();
    let plugins = format!(
        r#"
[plugins.sso]
kind = "forward_auth"
url = "http://{auth}/verify"
upstream_headers = ["x-user-id", "x-seen-uri"]
[plugins.slow]
kind = "forward_auth"
url = "http://{slow}/verify"
timeout = "300ms"
"#
    );
    let _g = plugin_gateway(port, up, &plugins, &[("/a", "\"sso\""), ("/s", "\"slow\"")]);
    let base = format!("http://127.0.0.1:{port}");

    let (s, _, body) = get(
        &format!("{base}/a/x?q=1"),
        &[("authorization", "Bearer good"), ("x-user-id", "forged")],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&v, "x-user-id"), vec!["u-42"]);
    assert_eq!(seen(&v, "x-seen-uri"), vec!["/a/x?q=1"]);

    let (s, h, body) = get(&format!("{base}/a/x"), &[("authorization", "Bearer bad")]).await;
    assert_eq!(s, 403);
    assert_eq!(h["x-reason"], "not today");
    assert_eq!(body, "nope");

    // The auth service checks the path as routed: dot segments resolved, whatever the
    // spelling (raw request: HTTP clients resolve them before sending).
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(
            b"GET /a/public/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n\
              Connection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(answer.contains("\"/a/admin\""), "{answer}");
    assert!(!answer.contains("%2e"), "{answer}");

    let start = Instant::now();
    let (s, _, body) = get(&format!("{base}/s/x"), &[]).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

/// Two instances of one plugin on a route keep their per-request state apart: each
/// forward_auth passes on what its own auth service granted.
#[tokio::test]
async fn two_forward_auths_on_one_route() {
    let up = echo("up").await;
    let grant = |name: &'static str, value: &'static str| {
        serve(move |_req| async move {
            hyper::Response::builder()
                .header(name, value)
                .body(full(""))
                .unwrap()
        })
    };
    let a = grant("x-a", "from-a").await;
    let b = grant("x-b", "from-b").await;
    let port = free_port();
    let plugins = format!(
        r#"
[plugins.fa]
kind = "forward_auth"
url = "http://{a}/"
upstream_headers = ["x-a"]
[plugins.fb]
kind = "forward_auth"
url = "http://{b}/"
upstream_headers = ["x-b"]
"#
    );
    let _g = plugin_gateway(port, up, &plugins, &[("/", "\"fa\", \"fb\"")]);
    let (s, _, body) = get(&format!("http://127.0.0.1:{port}/x"), &[]).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&v, "x-a"), vec!["from-a"]);
    assert_eq!(seen(&v, "x-b"), vec!["from-b"]);
}
