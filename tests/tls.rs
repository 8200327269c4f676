//! TLS termination on a gateway listener, with HTTP/2 offered by ALPN and HTTP/1.1 still served.
mod common;

use common::*;
use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};

/// A self-signed certificate for localhost, written as PEM files into `dir`.
fn self_signed(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf, std::path::PathBuf) {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "localhost").unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build().to_pem().unwrap();
    let (c, k) = (dir.join("web.crt"), dir.join("web.key"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert, c, k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_h2_and_h1() {
    let up = echo("a").await;
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let (pem, cert, key) = self_signed(certs.path());
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n[[routes]]\nupstream = \"a\"\n",
            cert.display(),
            key.display()
        ),
        &[port],
    );
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    let url = format!("https://localhost:{port}/hello");

    let h2 = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .build()
        .unwrap();
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/hello");
    assert_eq!(seen(&body, "x-forwarded-proto"), vec!["https"]);

    let h1 = reqwest::Client::builder()
        .add_root_certificate(ca)
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
}

#[test]
fn missing_tls_files_are_config_errors() {
    let (code, out, _, _dir) = check(
        "[upstreams.a]\npeers = []\n[gateways.web]\nlisten = [\"127.0.0.1:1\"]\n\
         tls = { cert = \"nope.crt\", key = \"nope.key\" }\n[[routes]]\nupstream = \"a\"\n",
    );
    assert_eq!(code, 1);
    assert!(
        out.contains(":5:16: error: gateway \"web\": TLS file"),
        "{out}"
    );
    assert!(out.contains("nope.key"), "{out}");
}

/// Over HTTP/2 the host comes as `:authority`: a request whose path is made canonical keeps it,
/// for routing and for the upstream's Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_keep_their_authority_when_the_path_is_rewritten() {
    let up = echo("a").await;
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let (pem, cert, key) = self_signed(certs.path());
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n\
             [plugins.mark]\nkind = \"headers\"\nrequest = {{ set = {{ \"x-route\" = \"localhost\" }} }}\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n\
             [[routes]]\nupstream = \"a\"\n\
             [[routes]]\nhost = \"localhost\"\nupstream = \"a\"\nplugins = [\"mark\"]\n",
            cert.display(),
            key.display()
        ),
        &[port],
    );
    let h2 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    for path in ["/hello", "//hello", "/%68ello"] {
        let r = h2
            .get(format!("https://localhost:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["path"], "/hello", "{path}");
        assert_eq!(
            seen(&body, "x-route"),
            ["localhost"],
            "{path}: routed by its host"
        );
        assert_eq!(seen(&body, "host"), [format!("localhost:{port}")], "{path}");
    }
}

/// The certificate a new TLS handshake with the gateway gets, as DER.
fn served_cert(port: u16) -> Vec<u8> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let s = b.build().connect("localhost", tcp).unwrap();
    s.ssl().peer_certificate().unwrap().to_der().unwrap()
}

/// SIGHUP re-reads the certificate and key: new handshakes get the new pair while a connection
/// made before keeps working; a key that does not fit its certificate is refused, the running
/// pair kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup() {
    let up = echo("a").await;
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let (first, cert, key) = self_signed(certs.path());
    let g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n[[routes]]\nupstream = \"a\"\n",
            cert.display(),
            key.display()
        ),
        &[port],
    );
    let der = |pem: &[u8]| {
        openssl::x509::X509::from_pem(pem)
            .unwrap()
            .to_der()
            .unwrap()
    };
    assert_eq!(served_cert(port), der(&first));
    // A keep-alive connection made with the first certificate.
    let old = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&first).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/x");
    assert_eq!(old.get(&url).send().await.unwrap().status(), 200);

    let other = tempfile::tempdir().unwrap();
    let (second, cert2, key2) = self_signed(other.path());
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let reloads = |g: &Gatehouse| g.log().matches("reloaded").count();
    std::process::Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while reloads(&g) < 1 {
        assert!(std::time::Instant::now() < deadline, "{}", g.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_cert(port),
        der(&second),
        "new handshakes get the new pair"
    );
    assert_eq!(
        old.get(&url).send().await.unwrap().status(),
        200,
        "old connection serves on"
    );

    // A key that is not the certificate's: refused, the second pair stays.
    let third_dir = tempfile::tempdir().unwrap();
    let (_, _, key3) = self_signed(third_dir.path());
    std::fs::copy(&key3, &key).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !g.log().contains("is not the key of the certificate") {
        assert!(std::time::Instant::now() < deadline, "{}", g.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(served_cert(port), der(&second));
}

/// An HTTP/2 client that completes TLS and then says nothing holds no connection for long.
#[test]
fn a_silent_h2_connection_is_closed_at_header_timeout() {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use std::io::Read;
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let (_, cert, key) = self_signed(certs.path());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nheader_timeout = \"1s\"\n[upstreams.a]\npeers = []\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n[[routes]]\nupstream = \"a\"\n",
            cert.display(),
            key.display()
        ),
        &[port],
    );
    // Nothing at all, and then only the start of the preface.
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        b.set_alpn_protos(b"\x02h2").unwrap();
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut s = b.build().connect("localhost", tcp).unwrap();
        assert_eq!(s.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
        let start = std::time::Instant::now();
        std::io::Write::write_all(&mut s, first).unwrap();
        let mut buf = [0u8; 256];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break start.elapsed(),
                Ok(_) => continue, // the server's SETTINGS
            }
        };
        assert!(
            closed >= std::time::Duration::from_millis(800)
                && closed < std::time::Duration::from_secs(4),
            "{closed:?}"
        );
    }
}
