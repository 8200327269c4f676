//! The cache tests' kit: an upstream that counts and varies what it answers by path, a
//! gateway with cached routes over it, and a client that reports the cache status.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Request, Response};

use super::*;

pub const TOKEN: &str = "purge-token-0123456789abcdef";
pub const JWT_SECRET: &str = "cache-test-secret-0123456789abcdef-xyz";

pub fn session_cookie(sub: &str) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": 4_000_000_000u64 });
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
    format!("session={t}")
}

/// Requests per path that reached the upstream, and the If-None-Match each carried.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<HashMap<String, Vec<Option<String>>>>>);

impl Seen {
    pub fn count(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).map_or(0, Vec::len)
    }
    pub fn conditionals(&self, path: &str) -> Vec<Option<String>> {
        self.0
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

pub async fn upstream(addr: Option<std::net::SocketAddr>, seen: Seen) -> Ctl {
    serve_ctl(addr, move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let path = req.uri().path().to_string();
            let inm = req
                .headers()
                .get("if-none-match")
                .or(req.headers().get("if-modified-since"))
                .map(|v| v.to_str().unwrap().to_string());
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let who = ["x-user-id", "x-consumer"]
                .iter()
                .find_map(|h| req.headers().get(*h))
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_else(|| "nobody".into());
            let n = {
                let mut m = seen.0.lock().unwrap();
                let v = m.entry(path.clone()).or_default();
                v.push(inm.clone());
                v.len()
            };
            let b = Response::builder().header("content-type", "text/plain");
            let body = format!("{path} #{n}");
            let r = match path
                .trim_start_matches("/c")
                .trim_start_matches("/u")
                .trim_start_matches("/k")
                .trim_start_matches("/j")
            {
                "/fresh" => b
                    .header("cache-control", "max-age=60")
                    .header("surrogate-key", "users user-1"),
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    b.header("cache-control", "max-age=60")
                }
                "/nostore" => b.header("cache-control", "no-store, max-age=60"),
                "/private" => b.header("cache-control", "private, max-age=60"),
                "/cookie" => b
                    .header("cache-control", "max-age=60")
                    .header("set-cookie", "session=abc"),
                "/shared" => b.header("cache-control", "public, max-age=60"),
                "/vary" => {
                    return Response::builder()
                        .header("cache-control", "max-age=60")
                        .header("vary", "Accept-Language")
                        .body(full(format!("{lang} #{n}")))
                        .unwrap()
                }
                "/age" => b.header("cache-control", "max-age=60").header("age", "50"),
                "/nomark" => b,
                "/etag" => {
                    if inm.as_deref() == Some("\"e1\"") {
                        // Longer than the first answer's: Date has one-second resolution,
                        // so a refreshed max-age=1 may already be a second old.
                        return Response::builder()
                            .status(304)
                            .header("etag", "\"e1\"")
                            .header("cache-control", "max-age=5")
                            .body(full(""))
                            .unwrap();
                    }
                    b.header("cache-control", "max-age=1")
                        .header("etag", "\"e1\"")
                }
                "/stale" => b.header("cache-control", "max-age=1, stale-if-error=60"),
                "/lm" => {
                    let lm = "Sat, 01 Jan 2022 00:00:00 GMT";
                    if inm.as_deref() == Some(lm) {
                        return Response::builder()
                            .status(304)
                            .header("cache-control", "max-age=5")
                            .body(full(""))
                            .unwrap();
                    }
                    b.header("cache-control", "max-age=1")
                        .header("last-modified", lm)
                }
                "/hang" => {
                    // The second time, slower than the upstream's read_timeout.
                    if n > 1 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    b.header("cache-control", "max-age=1, stale-if-error=60")
                }
                "/swr" => b.header("cache-control", "max-age=1, stale-while-revalidate=60"),
                "/tagged" => b
                    .header("cache-control", "max-age=60")
                    .header("surrogate-key", "t1 t2"),
                "/items" => b.header("cache-control", "max-age=60"),
                "/hugeage" => b
                    .header("cache-control", "max-age=60")
                    .header("age", "18446744073709551615"),
                // Answers that depend on who asks.
                "/me" => {
                    return Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(full(format!("me: {who} #{n}")))
                        .unwrap()
                }
                "/by-consumer" => {
                    return Response::builder()
                        .header("cache-control", "public, max-age=60")
                        .header("vary", "X-Consumer")
                        .body(full(format!("{who} #{n}")))
                        .unwrap()
                }
                "/swr-who" => {
                    return Response::builder()
                        .header(
                            "cache-control",
                            "public, max-age=1, stale-while-revalidate=60",
                        )
                        .body(full(format!("{who} #{n}")))
                        .unwrap()
                }
                p if p.starts_with("/big/") => {
                    return Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(full(vec![b'x'; 100_000]))
                        .unwrap()
                }
                "/huge" => {
                    return Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(full(vec![b'h'; 32 << 20]))
                        .unwrap()
                }
                "/slower" => {
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    b.header("cache-control", "max-age=60")
                }
                _ => b.status(404),
            };
            let r = if req.method() == hyper::Method::POST && path.ends_with("/items") {
                b_created()
            } else {
                r.body(full(body)).unwrap()
            };
            r
        }
    })
    .await
}

pub fn b_created() -> Response<Body> {
    Response::builder()
        .status(201)
        .header("location", "/c/fresh")
        .body(full("created"))
        .unwrap()
}

pub fn start(up: std::net::SocketAddr) -> (Gatehouse, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let key = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"app-key-1"));
    let toml = format!(
        r#"
[server]
admin = "127.0.0.1:{admin}"
admin_token = "{TOKEN}"
[plugins.keys]
kind = "key_auth"
header = "x-api-key"
keys = {{ "app" = "sha256:{key}" }}
[plugins.jwtc]
kind = "jwt_auth"
algorithms = ["HS256"]
secret = "{JWT_SECRET}"
cookie = "session"
claims_to_headers = {{ sub = "x-user-id" }}
[upstreams.u]
peers = ["{up}"]
[upstreams.quick]
peers = ["{up}"]
read_timeout = "500ms"
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/c"
upstream = "u"
cache = {{ ttl = "0s", stale_if_error = "0s", max_size = "64MiB" }}
[[routes]]
path = "/c/hang"
upstream = "quick"
cache = {{ ttl = "0s" }}
[[routes]]
path = "/u"
upstream = "u"
cache = {{ ttl = "60s", status_header = "x-cached", expose_tags = true }}
[[routes]]
path = "/k"
upstream = "u"
cache = {{ ttl = "60s" }}
plugins = ["keys"]
[[routes]]
path = "/j"
upstream = "u"
cache = {{ ttl = "60s" }}
plugins = ["jwtc"]
[[routes]]
path = "/c/variant"
headers = {{ "x-version" = "2" }}
rewrite = "/c/fresh"
upstream = "u"
cache = {{ ttl = "0s" }}
[[routes]]
path = "/c/variant"
rewrite = "/c/fresh"
upstream = "u"
cache = {{ ttl = "0s" }}
[[routes]]
path = "/plain"
upstream = "u"
"#
    );
    (Gatehouse::start(&toml, &[port, admin]), port, admin)
}

pub struct Got {
    pub status: u16,
    pub cache: String,
    pub age: Option<u64>,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

pub async fn req(method: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = client().request(
        method.parse().unwrap(),
        format!("http://127.0.0.1:{port}{path}"),
    );
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.expect("response");
    let headers = resp.headers().clone();
    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string());
    Got {
        status: resp.status().as_u16(),
        cache: h("x-cache-status").or(h("x-cached")).unwrap_or_default(),
        age: h("age").and_then(|a| a.parse().ok()),
        body: resp.text().await.unwrap(),
        headers,
    }
}

pub async fn get(port: u16, path: &str) -> Got {
    req("GET", port, path, &[]).await
}

/// Asks until the background refresh has landed (stale answers meanwhile), at most 5 s.
pub async fn until_refreshed(port: u16, path: &str, headers: &[(&str, &str)], want: &str) -> Got {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = req("GET", port, path, headers).await;
        if r.body == want || Instant::now() > deadline {
            return r;
        }
        assert_eq!(r.cache, "UPDATING", "stale while the refresh runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `s` as a query value.
pub fn form(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
