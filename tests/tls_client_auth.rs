//! Downstream mTLS: `client_auth = { mode, ca }` on a TLS gateway. Required: no certificate,
//! or one of another CA, fails the handshake. Optional: clients without one reach the routes
//! that do not ask for one; `mtls_auth` routes want one (and may want a given subject, SAN or
//! fingerprint). The verified subject, SANs and fingerprint reach the upstream as headers.
mod common;

use common::pki::{Ca, Leaf};
use common::*;
use openssl::hash::MessageDigest;

struct Pki {
    dir: tempfile::TempDir,
    server_ca: Vec<u8>,
    cert: String,
    key: String,
    clients_ca: String,
    clients: Ca,
    stranger: Ca,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let (cert, key) = ca.issue(
        dir.path(),
        "server",
        &Leaf {
            subject: &[("CN", "localhost")],
            dns: &["localhost"],
            ..Leaf::default()
        },
    );
    let clients = Ca::new("clients CA");
    let clients_ca = clients.write(dir.path(), "clients-ca");
    Pki {
        server_ca: ca.pem(),
        dir,
        cert,
        key,
        clients_ca,
        clients,
        stranger: Ca::new("clients CA"),
    }
}

/// A client presenting a certificate `ca` signed for `subject` (and these SANs); its
/// SHA-256 fingerprint.
fn client_with(
    p: &Pki,
    ca: Option<&Ca>,
    subject: &[(&str, &str)],
    uri: &[&str],
) -> (reqwest::Client, String) {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&p.server_ca).unwrap())
        .timeout(std::time::Duration::from_secs(10));
    let mut fp = String::new();
    if let Some(ca) = ca {
        let (cert, key) = ca.sign(&Leaf {
            subject,
            dns: &["client.internal"],
            uri,
            client: true,
        });
        fp = hex::encode(cert.digest(MessageDigest::sha256()).unwrap());
        let id = reqwest::Identity::from_pkcs8_pem(
            &cert.to_pem().unwrap(),
            &key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        b = b.identity(id);
    }
    (b.build().unwrap(), fp)
}

fn gateway(p: &Pki, port: u16, up: std::net::SocketAddr, mode: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[upstreams.up]\npeers = [\"{up}\"]\n\
             [plugins.who]\nkind = \"headers\"\n\
             request = {{ set = {{ \"x-client-subject\" = \"${{tls.client_subject}}\", \"x-client-san\" = \"${{tls.client_san}}\", \"x-client-fingerprint\" = \"${{tls.client_fingerprint}}\", \"x-consumer\" = \"${{consumer}}\" }} }}\n\
             [plugins.any-cert]\nkind = \"mtls_auth\"\n\
             [plugins.billing-only]\nkind = \"mtls_auth\"\nsubjects = [\"CN=billing,O=Acme\"]\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n\
             client_auth = {{ mode = \"{mode}\", ca = \"{}\" }}\n\
             [[routes]]\npath = \"/open\"\nupstream = \"up\"\nplugins = [\"who\"]\n\
             [[routes]]\npath = \"/any\"\nupstream = \"up\"\nplugins = [\"any-cert\", \"who\"]\n\
             [[routes]]\npath = \"/billing\"\nupstream = \"up\"\nplugins = [\"billing-only\", \"who\"]\n",
            p.cert, p.key, p.clients_ca
        ),
        &[port],
    )
}

async fn call(
    c: &reqwest::Client,
    port: u16,
    path: &str,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let r = c
        .get(format!("https://localhost:{port}{path}"))
        .header("x-client-subject", "CN=admin")
        .send()
        .await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_are_verified_and_reach_the_upstream() {
    let p = pki();
    let up = echo("up").await;
    let port = free_port();
    let _g = gateway(&p, port, up, "required");
    let (alice, fp) = client_with(
        &p,
        Some(&p.clients),
        &[("O", "Acme"), ("CN", "alice")],
        &["spiffe://acme/alice"],
    );
    let (s, v) = call(&alice, port, "/open").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(seen(&v, "x-client-subject"), ["CN=alice,O=Acme"]);
    assert_eq!(
        seen(&v, "x-client-san"),
        ["client.internal,spiffe://acme/alice"]
    );
    assert_eq!(seen(&v, "x-client-fingerprint"), [fp]);
    // mtls_auth names the consumer after the certificate's CN.
    let (s, v) = call(&alice, port, "/any").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(seen(&v, "x-consumer"), ["alice"]);

    let (none, _) = client_with(&p, None, &[], &[]);
    assert!(
        call(&none, port, "/open").await.is_err(),
        "no certificate: refused"
    );
    let (stranger, _) = client_with(&p, Some(&p.stranger), &[("CN", "alice")], &[]);
    assert!(
        call(&stranger, port, "/open").await.is_err(),
        "a certificate of another CA (same CA name): refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_and_routes_that_require_them() {
    let p = pki();
    let up = echo("up").await;
    let port = free_port();
    let _g = gateway(&p, port, up, "optional");
    let (none, _) = client_with(&p, None, &[], &[]);
    let (s, v) = call(&none, port, "/open").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(
        seen(&v, "x-client-subject").is_empty(),
        "the client's own X-Client-Subject never passes: {v}"
    );
    assert_eq!(call(&none, port, "/any").await.unwrap().0, 403);
    assert_eq!(call(&none, port, "/billing").await.unwrap().0, 403);

    let (alice, _) = client_with(&p, Some(&p.clients), &[("O", "Acme"), ("CN", "alice")], &[]);
    assert_eq!(call(&alice, port, "/any").await.unwrap().0, 200);
    let (s, v) = call(&alice, port, "/billing").await.unwrap();
    assert_eq!(s, 403, "{v}");
    let (billing, _) = client_with(
        &p,
        Some(&p.clients),
        &[("O", "Acme"), ("CN", "billing")],
        &[],
    );
    let (s, v) = call(&billing, port, "/billing").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(seen(&v, "x-client-subject"), ["CN=billing,O=Acme"]);

    let (stranger, _) = client_with(&p, Some(&p.stranger), &[("CN", "billing")], &[]);
    assert!(
        call(&stranger, port, "/open").await.is_err(),
        "a bad certificate fails the handshake in optional mode too"
    );
}

#[test]
fn check_refuses_client_auth_without_tls_or_ca() {
    let p = pki();
    let (code, out, _, _d) = check(&format!(
        "[upstreams.up]\npeers = [\"127.0.0.1:9\"]\n\
         [gateways.plain]\nlisten = [\"127.0.0.1:8080\"]\n\
         client_auth = {{ mode = \"required\", ca = \"{}\" }}\n\
         [gateways.web]\nlisten = [\"127.0.0.1:8443\"]\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\
         client_auth = {{ mode = \"sometimes\", ca = \"{}\" }}\n\
         [gateways.web2]\nlisten = [\"127.0.0.1:8444\"]\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\
         client_auth = {{ mode = \"optional\", ca = \"{}\" }}\n\
         [[routes]]\nupstream = \"up\"\n",
        p.clients_ca,
        p.cert,
        p.key,
        p.clients_ca,
        p.cert,
        p.key,
        p.cert.replace("server.crt", "missing.pem")
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad.toml:5:") && out.contains("`client_auth` is for a TLS gateway"),
        "{out}"
    );
    assert!(
        out.contains("bad.toml:9:") && out.contains("mode \"sometimes\""),
        "{out}"
    );
    assert!(
        out.contains("bad.toml:13:") && out.contains("missing.pem"),
        "{out}"
    );
    let _ = &p.dir;
}

/// A plugin that reads the client certificate on a gateway that asks for none would refuse
/// every request (mtls_auth) or always be empty (`${tls.*}`): `check` says so where it is
/// used, and says nothing where the gateway has `client_auth` or only redirects to HTTPS.
#[test]
fn check_warns_of_certificate_readers_without_client_auth() {
    let p = pki();
    let (code, out, _, _d) = check(&format!(
        "[upstreams.up]\npeers = [\"127.0.0.1:9\"]\n\
         [plugins.who]\nkind = \"headers\"\n\
         request = {{ set = {{ \"x-subject\" = \"${{tls.client_subject}}\" }} }}\n\
         [plugins.cert]\nkind = \"mtls_auth\"\n\
         [gateways.plain]\nlisten = [\"127.0.0.1:8080\"]\nplugins = [\"who\"]\n\
         [gateways.web]\nlisten = [\"127.0.0.1:8443\"]\nplugins = [\"who\"]\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\
         client_auth = {{ mode = \"optional\", ca = \"{}\" }}\n\
         [[routes]]\ngateway = \"plain\"\nname = \"p\"\nplugins = [\"cert\"]\nupstream = \"up\"\n\
         [[routes]]\ngateway = \"web\"\nname = \"w\"\nplugins = [\"cert\"]\nupstream = \"up\"\n\
         [gateways.redir]\nlisten = [\"127.0.0.1:8081\"]\nredirect_https = true\nplugins = [\"who\"]\n",
        p.cert, p.key, p.clients_ca
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("bad.toml:10:") && out.contains("plugin \"who\" reads the client certificate, but this gateway has no `client_auth`: it gets empty ${tls.*} values"),
        "{out}"
    );
    assert!(
        out.contains("bad.toml:16:") && out.contains("route \"p\": plugin \"cert\" reads the client certificate, but gateway \"plain\" has no `client_auth`: it refuses every request (403)"),
        "{out}"
    );
    assert_eq!(
        out.matches("reads the client certificate").count(),
        2,
        "{out}"
    );
}

/// One request over a new TLS connection made with `session` (if any): whether the session
/// was resumed, the answer's status (None: the handshake or the request failed), and the
/// session to offer next time.
fn raw_request(
    port: u16,
    ca: &[u8],
    session: Option<&openssl::ssl::SslSession>,
) -> (bool, Option<u16>, Option<openssl::ssl::SslSession>) {
    use openssl::ssl::{SslConnector, SslMethod};
    use std::io::{Read, Write};
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.cert_store_mut()
        .add_cert(openssl::x509::X509::from_pem(ca).unwrap())
        .unwrap();
    let connector = b.build();
    let mut cfg = connector.configure().unwrap();
    if let Some(s) = session {
        // SAFETY: the session comes from a connector built the same way, to the same server
        // (what `set_session` asks of its caller).
        unsafe { cfg.set_session(s).unwrap() };
    }
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let Ok(mut tls) = cfg.connect("localhost", tcp) else {
        return (false, None, None);
    };
    let reused = tls.ssl().session_reused();
    if tls
        .write_all(b"GET /open HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return (reused, None, None);
    }
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let status = std::str::from_utf8(&answer)
        .ok()
        .and_then(|a| a.get(9..12))
        .and_then(|c| c.parse().ok());
    // A clean close: OpenSSL marks the session of a connection dropped without one as not
    // resumable.
    let _ = tls.shutdown();
    let next = tls.ssl().session().map(|s| s.to_owned());
    (reused, status, next)
}

/// A TLS session made under `mode = "optional"` without a certificate, resumed after a reload
/// to `required`: no identity, so 403 (never the page); a new handshake without one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_does_not_outlive_a_reload_to_required() {
    let p = pki();
    let up = echo("up").await;
    let port = free_port();
    let g = gateway(&p, port, up, "optional");
    let ca = p.server_ca.clone();
    let (reused, status, session) =
        tokio::task::spawn_blocking(move || raw_request(port, &ca, None))
            .await
            .unwrap();
    assert_eq!((reused, status), (false, Some(200)));
    let session = session.expect("a session to resume");
    // Resumption works while nothing changed.
    let ca = p.server_ca.clone();
    let s2 = session.clone();
    let (reused, status, _) =
        tokio::task::spawn_blocking(move || raw_request(port, &ca, Some(&s2)))
            .await
            .unwrap();
    assert_eq!(status, Some(200));
    assert!(reused, "the session is resumed");

    let text = std::fs::read_to_string(&g.config).unwrap();
    std::fs::write(
        &g.config,
        text.replace("mode = \"optional\"", "mode = \"required\""),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while g.log().matches("reloaded").count() < 1 {
        assert!(std::time::Instant::now() < deadline, "{}", g.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ca = p.server_ca.clone();
    let (reused, status, _) =
        tokio::task::spawn_blocking(move || raw_request(port, &ca, Some(&session)))
            .await
            .unwrap();
    match (reused, status) {
        (true, s) => assert_eq!(s, Some(403), "a resumed session has no certificate"),
        (false, s) => assert_eq!(s, None, "a full handshake without a certificate fails"),
    }
    let ca = p.server_ca.clone();
    let (_, status, _) = tokio::task::spawn_blocking(move || raw_request(port, &ca, None))
        .await
        .unwrap();
    assert_eq!(status, None, "no certificate: the handshake fails");
}

/// Alice's page, fetched with her client certificate through `mtls_auth`, is hers: Bob's
/// certificate gets his own, unless the origin says the page is public. The certificate is
/// the credential; no header names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_for_a_client_certificate_is_not_served_to_another() {
    let p = pki();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let up = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        async move {
            let cc = if req.uri().path().ends_with("/public") {
                "public, max-age=60"
            } else {
                "max-age=60"
            };
            hyper::Response::builder()
                .header("cache-control", cc)
                .body(full(format!("answer {n}")))
                .unwrap()
        }
    })
    .await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.up]\npeers = [\"{up}\"]\n\
             [plugins.any-cert]\nkind = \"mtls_auth\"\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n\
             client_auth = {{ mode = \"optional\", ca = \"{}\" }}\n\
             [[routes]]\npath = \"/me\"\nupstream = \"up\"\nplugins = [\"any-cert\"]\n\
             cache = {{ ttl = \"60s\" }}\n",
            p.cert, p.key, p.clients_ca
        ),
        &[port],
    );
    let (alice, _) = client_with(&p, Some(&p.clients), &[("CN", "alice")], &[]);
    let (bob, _) = client_with(&p, Some(&p.clients), &[("CN", "bob")], &[]);
    let get = |c: reqwest::Client, path: &'static str| async move {
        let r = c
            .get(format!("https://localhost:{port}{path}"))
            .send()
            .await
            .unwrap();
        let cache = r.headers()["x-cache-status"].to_str().unwrap().to_string();
        (r.text().await.unwrap(), cache)
    };
    let (a, a_cache) = get(alice.clone(), "/me").await;
    assert_eq!((a.as_str(), a_cache.as_str()), ("answer 1", "MISS"));
    let (b, b_cache) = get(bob.clone(), "/me").await;
    assert_eq!(
        (b.as_str(), b_cache.as_str()),
        ("answer 2", "MISS"),
        "Bob got Alice's page"
    );
    // RFC 9111 §3.5: the origin may say an authenticated answer is for everyone.
    let (a, _) = get(alice, "/me/public").await;
    let (b, b_cache) = get(bob, "/me/public").await;
    assert_eq!((b, b_cache.as_str()), (a, "HIT"));
}
