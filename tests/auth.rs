//! Identity plugins end to end through the real binary: jwt_auth (with the RFC 7515 and
//! RFC 7520 example tokens and keys), key_auth, basic_auth, forward_auth, and the headers
//! plugin's variables that carry what they found upstream.
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const JOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jose");

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(JOSE).join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Writes `text` to `name` in `dir` and returns its path as TOML wants it.
fn file(dir: &Path, name: &str, text: &str) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A gateway with `plugins` defined and one route per (path, plugin list), all to `up`.
fn gateway(
    port: u16,
    up: std::net::SocketAddr,
    plugins: &str,
    routes: &[(&str, &str)],
) -> Gatehouse {
    let mut toml = format!(
        "[server]\nthreads = 2\n[upstreams.up]\npeers = [\"{up}\"]\n{plugins}\n\
         [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n"
    );
    for (path, list) in routes {
        toml.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"up\"\nplugins = [{list}]\n"
        ));
    }
    Gatehouse::start(&toml, &[port])
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = client().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.unwrap())
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Flips one bit in the middle of a token's signature.
fn flip_signature(t: &str) -> String {
    let (head, sig) = t.rsplit_once('.').unwrap();
    let mut s: Vec<u8> = sig.bytes().collect();
    let i = s.len() / 2;
    s[i] = if s[i] == b'A' { b'B' } else { b'A' };
    format!("{head}.{}", String::from_utf8(s).unwrap())
}

#[tokio::test]
async fn jwt_rfc_example_tokens() {
    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jwk = |name: &str| fixture(name)["jwk"].to_string();
    let a1 = file(d, "a1.json", &jwk("rfc7515-a1-hs256.json"));
    let a3 = file(d, "a3.json", &jwk("rfc7515-a3-es256.json"));
    let set = json!({ "keys": [
        fixture("rfc7520-4.1-rs256.json")["jwk"],
        fixture("rfc7520-4.3-es512.json")["jwk"],
        fixture("rfc7520-4.4-hs256.json")["jwk"],
    ]});
    let r7520 = file(d, "7520.json", &set.to_string());
    let a2pem = format!("{JOSE}/rfc7515-a2-rs256.pub.pem");
    let plugins = format!(
        r#"
[plugins.a1]
kind = "jwt_auth"
algorithms = ["HS256"]
jwks_file = "{a1}"
validate_exp = false
claims_to_headers = {{ iss = "x-iss" }}
[plugins.a1-exp]
kind = "jwt_auth"
algorithms = ["HS256"]
jwks_file = "{a1}"
[plugins.a2]
kind = "jwt_auth"
algorithms = ["RS256"]
public_key_file = "{a2pem}"
validate_exp = false
claims_to_headers = {{ iss = "x-iss" }}
[plugins.a3]
kind = "jwt_auth"
algorithms = ["ES256"]
jwks_file = "{a3}"
validate_exp = false
[plugins.r7520]
kind = "jwt_auth"
algorithms = ["RS256", "PS384", "HS256", "ES256"]
jwks_file = "{r7520}"
validate_exp = false
"#
    );
    let _g = gateway(
        port,
        up,
        &plugins,
        &[
            ("/a1", "\"a1\""),
            ("/a1-exp", "\"a1-exp\""),
            ("/a2", "\"a2\""),
            ("/a3", "\"a3\""),
            ("/7520", "\"r7520\""),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");

    // RFC 7515 A.1 (HS256), A.2 (RS256), A.3 (ES256): valid signatures, claims passed on.
    for (path, fx) in [
        ("/a1", "rfc7515-a1-hs256.json"),
        ("/a2", "rfc7515-a2-rs256.json"),
        ("/a3", "rfc7515-a3-es256.json"),
    ] {
        let t = fixture(fx)["token"].as_str().unwrap().to_string();
        let (s, _, body) = get(&format!("{base}{path}"), &[("authorization", &bearer(&t))]).await;
        assert_eq!(s, 200, "{fx}: {body}");
        if path != "/a3" {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(seen(&v, "x-iss"), vec!["joe"], "{fx}");
        }
        // The same token with one signature bit flipped, or without its signature.
        let (s, h, body) = get(
            &format!("{base}{path}"),
            &[("authorization", &bearer(&flip_signature(&t)))],
        )
        .await;
        assert_eq!(s, 401, "{fx} flipped: {body}");
        assert!(h["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        let stripped = format!("{}.", t.rsplit_once('.').unwrap().0);
        let (s, _, _) = get(
            &format!("{base}{path}"),
            &[("authorization", &bearer(&stripped))],
        )
        .await;
        assert_eq!(s, 401, "{fx} stripped");
    }

    // A.1 expired in 2011: refused where exp is checked (the default).
    let a1t = fixture("rfc7515-a1-hs256.json")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, h, body) = get(
        &format!("{base}/a1-exp"),
        &[("authorization", &bearer(&a1t))],
    )
    .await;
    assert_eq!(s, 401);
    assert!(body.contains("token expired"), "{body}");
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));

    // RFC 7520 4.1 (RS256), 4.2 (PS384), 4.4 (HS256): the signatures verify against the
    // RFC's keys (selected by kid), then the payload (plain text, not JSON claims) is refused
    // as malformed; with a bit flipped they fail as bad signatures instead.
    for fx in [
        "rfc7520-4.1-rs256.json",
        "rfc7520-4.2-ps384.json",
        "rfc7520-4.4-hs256.json",
    ] {
        let t = fixture(fx)["token"].as_str().unwrap().to_string();
        let (s, _, body) = get(&format!("{base}/7520"), &[("authorization", &bearer(&t))]).await;
        assert_eq!(s, 401, "{fx}");
        assert!(body.contains("malformed token"), "{fx}: {body}");
        let (s, _, body) = get(
            &format!("{base}/7520"),
            &[("authorization", &bearer(&flip_signature(&t)))],
        )
        .await;
        assert_eq!(s, 401);
        assert!(body.contains("bad signature"), "{fx} flipped: {body}");
    }
    // 4.3 is ES512, which this gateway does not accept.
    let t = fixture("rfc7520-4.3-es512.json")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _, body) = get(&format!("{base}/7520"), &[("authorization", &bearer(&t))]).await;
    assert_eq!(s, 401);
    assert!(body.contains("algorithm not allowed"), "{body}");
}

fn rsa_key() -> EncodingKey {
    let pem = std::fs::read(format!("{JOSE}/rfc7515-a2-rs256.key.pem")).unwrap();
    EncodingKey::from_rsa_pem(&pem).unwrap()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

/// A token by hand: any header, any signature bytes.
fn raw_token(header: &Value, claims: &Value, sig: &[u8]) -> String {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(header.to_string()),
        e.encode(claims.to_string()),
        e.encode(sig)
    )
}

#[tokio::test]
async fn jwt_policy_and_attacks() {
    let up = echo("up").await;
    let port = free_port();
    let secret = "a-shared-secret-that-is-long-enough-0123456789";
    let pubpem = format!("{JOSE}/rfc7515-a2-rs256.pub.pem");
    let plugins = format!(
        r#"
[plugins.jwt]
kind = "jwt_auth"
algorithms = ["RS256"]
public_key_file = "{pubpem}"
issuer = "https://auth.example.com"
audience = ["orders"]
leeway = "30s"
claims_to_headers = {{ sub = "x-user-id", scope = "x-scope" }}
[plugins.jwt-admin]
kind = "jwt_auth"
algorithms = ["RS256"]
public_key_file = "{pubpem}"
required_scopes = ["orders:write"]
required_claims = {{ role = "admin" }}
[plugins.both]
kind = "jwt_auth"
algorithms = ["RS256", "HS256"]
public_key_file = "{pubpem}"
secret = "{secret}"
"#
    );
    let _g = gateway(
        port,
        up,
        &plugins,
        &[
            ("/orders", "\"jwt\""),
            ("/admin", "\"jwt-admin\""),
            ("/both", "\"both\""),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let key = rsa_key();
    let good = json!({"sub": "alice", "iss": "https://auth.example.com", "aud": "orders",
                      "exp": now() + 600, "scope": "orders:read orders:write", "role": "admin"});

    let t = sign(Algorithm::RS256, &key, &good);
    let (s, _, body) = get(
        &format!("{base}/orders"),
        &[("authorization", &bearer(&t)), ("x-user-id", "mallory")],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen(&v, "x-user-id"),
        vec!["alice"],
        "client's own x-user-id dropped"
    );
    assert_eq!(seen(&v, "x-scope"), vec!["orders:read orders:write"]);

    // No token: 401 with a challenge.
    let (s, h, _) = get(&format!("{base}/orders"), &[]).await;
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer realm=\"gatehouse\"");

    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        sign(Algorithm::RS256, &key, &c)
    };
    let cases = [
        (with(json!({"exp": now() - 120})), "token expired"),
        (with(json!({"exp": now() - 10})), ""), // within the 30 s leeway
        (with(json!({"nbf": now() + 600})), "token not valid yet"),
        (
            with(json!({"iss": "https://evil.example.com"})),
            "wrong issuer",
        ),
        (with(json!({"aud": "billing"})), "wrong audience"),
    ];
    for (t, why) in cases {
        let (s, _, body) = get(&format!("{base}/orders"), &[("authorization", &bearer(&t))]).await;
        if why.is_empty() {
            assert_eq!(s, 200, "{body}");
        } else {
            assert_eq!(s, 401, "{why}: {body}");
            assert!(body.contains(why), "{why}: {body}");
        }
    }

    // alg "none", with and without a signature.
    let none = raw_token(&json!({"alg": "none", "typ": "JWT"}), &good, b"");
    let (s, _, _) = get(
        &format!("{base}/orders"),
        &[("authorization", &bearer(&none))],
    )
    .await;
    assert_eq!(s, 401);
    // Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    let pubkey = std::fs::read(&pubpem).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&pubkey), &good);
    let (s, _, body) = get(
        &format!("{base}/orders"),
        &[("authorization", &bearer(&confused))],
    )
    .await;
    assert_eq!(s, 401);
    assert!(body.contains("algorithm not allowed"), "{body}");
    // Even where HS256 is allowed, the RSA key is never used as an HMAC secret.
    let (s, _, body) = get(
        &format!("{base}/both"),
        &[("authorization", &bearer(&confused))],
    )
    .await;
    assert_eq!(s, 401);
    assert!(body.contains("bad signature"), "{body}");
    let hs = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        &good,
    );
    let (s, _, _) = get(&format!("{base}/both"), &[("authorization", &bearer(&hs))]).await;
    assert_eq!(s, 200);

    // Scopes and claims: 403 with insufficient_scope when missing.
    let t = sign(Algorithm::RS256, &key, &good);
    assert_eq!(
        get(&format!("{base}/admin"), &[("authorization", &bearer(&t))])
            .await
            .0,
        200
    );
    let reader = with(json!({"scope": "orders:read"}));
    let (s, h, _) = get(
        &format!("{base}/admin"),
        &[("authorization", &bearer(&reader))],
    )
    .await;
    assert_eq!(s, 403);
    let chal = h["www-authenticate"].to_str().unwrap();
    assert!(
        chal.contains("insufficient_scope") && chal.contains("orders:write"),
        "{chal}"
    );
    let user = with(json!({"role": "user"}));
    assert_eq!(
        get(
            &format!("{base}/admin"),
            &[("authorization", &bearer(&user))]
        )
        .await
        .0,
        403
    );
}

#[tokio::test]
async fn jwt_keys_from_a_jwks_url_rotate_by_kid() {
    let up = echo("up").await;
    let hits = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(std::sync::Mutex::new(String::new()));
    let a2 = fixture("rfc7515-a2-rs256.json")["jwk"].clone();
    let set = |kid: &str| {
        let mut k = a2.clone();
        k["kid"] = json!(kid);
        json!({ "keys": [k] }).to_string()
    };
    *current.lock().unwrap() = set("k1");
    let jwks = {
        let hits = hits.clone();
        let current = current.clone();
        serve(move |_req| {
            let hits = hits.clone();
            let body = current.lock().unwrap().clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(full(body))
                    .unwrap()
            }
        })
        .await
    };
    let port = free_port();
    let plugins = format!(
        r#"
[plugins.jwt]
kind = "jwt_auth"
algorithms = ["RS256"]
jwks_url = "http://{jwks}/.well-known/jwks.json"
jwks_min_refresh = "500ms"
"#
    );
    let _g = gateway(port, up, &plugins, &[("/", "\"jwt\"")]);
    let url = format!("http://127.0.0.1:{port}/x");
    let key = rsa_key();
    let token = |kid: &str| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &json!({"sub": "a", "exp": now() + 600}), &key).unwrap()
    };
    let t1 = token("k1");
    // Before the first fetch the server fails: 10 requests ask it once, not ten times.
    *current.lock().unwrap() = "not json".into();
    for _ in 0..10 {
        assert_eq!(get(&url, &[("authorization", &bearer(&t1))]).await.0, 401);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a failing key server is not stormed"
    );
    *current.lock().unwrap() = set("k1");
    hits.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&url, &[("authorization", &bearer(&t1))]).await.0, 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "first use fetches the set once"
    );

    // Unknown kid: a burst of 10 requests triggers one refresh, not ten (once the minimum
    // interval since the last fetch has passed).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t2 = token("k2");
    for _ in 0..10 {
        assert_eq!(get(&url, &[("authorization", &bearer(&t2))]).await.0, 401);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one rate-limited refresh for the unknown kid"
    );

    // The issuer rotates to k2: after the minimum interval, the unknown kid refreshes again.
    *current.lock().unwrap() = set("k2");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, _, body) = get(&url, &[("authorization", &bearer(&t2))]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn key_auth_by_header_and_query() {
    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let keys = file(
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
    let _g = gateway(
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
    let htpasswd = file(dir.path(), "users", &format!("# team\nali:{hash}\n"));
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
    let _g = gateway(
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
    let _g = gateway(port, up, &plugins, &[("/a", "\"sso\""), ("/s", "\"slow\"")]);
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

/// Every algorithm family the plugin accepts, with keys made here: HS384/512, RS384/512,
/// PS256/512, ES384 and EdDSA, keys inline (PEM in the TOML) and from files.
#[tokio::test]
async fn jwt_every_supported_algorithm() {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;

    let up = echo("up").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let rsa = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let ec = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap(),
    )
    .unwrap();
    let ed = PKey::generate_ed25519().unwrap();
    let public = |k: &PKey<openssl::pkey::Private>| {
        String::from_utf8(k.public_key_to_pem().unwrap()).unwrap()
    };
    let private = |k: &PKey<openssl::pkey::Private>| k.private_key_to_pem_pkcs8().unwrap();
    let ec_file = file(dir.path(), "ec.pem", &public(&ec));
    let ed_file = file(dir.path(), "ed.pem", &public(&ed));
    let secret = "another-long-enough-shared-secret-for-hmac-tests";
    let plugins = format!(
        r#"
[plugins.hs]
kind = "jwt_auth"
algorithms = ["HS384", "HS512"]
secret = "{secret}"
[plugins.rsa]
kind = "jwt_auth"
algorithms = ["RS384", "RS512", "PS256", "PS512"]
public_key = """
{}"""
[plugins.ec]
kind = "jwt_auth"
algorithms = ["ES384"]
public_key_file = "{ec_file}"
[plugins.ed]
kind = "jwt_auth"
algorithms = ["EdDSA"]
public_key_file = "{ed_file}"
"#,
        public(&rsa)
    );
    let _g = gateway(
        port,
        up,
        &plugins,
        &[
            ("/hs", "\"hs\""),
            ("/rsa", "\"rsa\""),
            ("/ec", "\"ec\""),
            ("/ed", "\"ed\""),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let claims = json!({"sub": "x", "exp": now() + 300});
    let cases = [
        (
            "/hs",
            Algorithm::HS384,
            EncodingKey::from_secret(secret.as_bytes()),
        ),
        (
            "/hs",
            Algorithm::HS512,
            EncodingKey::from_secret(secret.as_bytes()),
        ),
        (
            "/rsa",
            Algorithm::RS384,
            EncodingKey::from_rsa_pem(&private(&rsa)).unwrap(),
        ),
        (
            "/rsa",
            Algorithm::RS512,
            EncodingKey::from_rsa_pem(&private(&rsa)).unwrap(),
        ),
        (
            "/rsa",
            Algorithm::PS256,
            EncodingKey::from_rsa_pem(&private(&rsa)).unwrap(),
        ),
        (
            "/rsa",
            Algorithm::PS512,
            EncodingKey::from_rsa_pem(&private(&rsa)).unwrap(),
        ),
        (
            "/ec",
            Algorithm::ES384,
            EncodingKey::from_ec_pem(&private(&ec)).unwrap(),
        ),
        (
            "/ed",
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&private(&ed)).unwrap(),
        ),
    ];
    for (path, alg, key) in &cases {
        let t = sign(*alg, key, &claims);
        let (s, _, body) = get(&format!("{base}{path}"), &[("authorization", &bearer(&t))]).await;
        assert_eq!(s, 200, "{alg:?}: {body}");
        let (s, _, _) = get(
            &format!("{base}{path}"),
            &[("authorization", &bearer(&flip_signature(&t)))],
        )
        .await;
        assert_eq!(s, 401, "{alg:?} flipped");
    }
    // RS256 is not in the RSA route's list, though its key would verify it.
    let t = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private(&rsa)).unwrap(),
        &claims,
    );
    assert_eq!(
        get(&format!("{base}/rsa"), &[("authorization", &bearer(&t))])
            .await
            .0,
        401
    );
}
