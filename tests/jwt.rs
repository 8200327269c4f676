//! jwt_auth end to end through the real binary, with the RFC 7515 appendix A and RFC 7520
//! section 4 example tokens and keys (tests/fixtures/jose), fresh tokens for every accepted
//! algorithm, the usual attacks, and keys from a JWKS URL.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const JOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jose");

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(JOSE).join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
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
    let a1 = write_file(d, "a1.json", &jwk("rfc7515-a1-hs256.json"));
    let a3 = write_file(d, "a3.json", &jwk("rfc7515-a3-es256.json"));
    let set = json!({ "keys": [
        fixture("rfc7520-4.1-rs256.json")["jwk"],
        fixture("rfc7520-4.3-es512.json")["jwk"],
        fixture("rfc7520-4.4-hs256.json")["jwk"],
    ]});
    let r7520 = write_file(d, "7520.json", &set.to_string());
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
    let _g = plugin_gateway(
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
    let _g = plugin_gateway(
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
allow_insecure_jwks = true
jwks_min_refresh = "500ms"
"#
    );
    let _g = plugin_gateway(port, up, &plugins, &[("/", "\"jwt\"")]);
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
    // k1 left the set: the token it verified (remembered since) is refused, not served from
    // the cache of verified tokens.
    let (s, _, body) = get(&url, &[("authorization", &bearer(&t1))]).await;
    assert_eq!(s, 401, "{body}");
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
    let ec_file = write_file(dir.path(), "ec.pem", &public(&ec));
    let ed_file = write_file(dir.path(), "ed.pem", &public(&ed));
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
    let _g = plugin_gateway(
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
