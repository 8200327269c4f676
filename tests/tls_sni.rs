//! Certificates chosen by SNI: exact names before wildcards, a default for unknown and absent
//! names (or a refused handshake), RSA and ECDSA for the same name, expired certificates
//! refused by `check`.
mod common;

use common::*;
use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};

/// A self-signed certificate for `names` (RSA or ECDSA P-256), as PEM files in `dir`.
fn cert(
    dir: &std::path::Path,
    file: &str,
    names: &[&str],
    ec: bool,
    days: (i64, u32),
) -> (Vec<u8>, String, String) {
    let key: PKey<Private> = if ec {
        PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap()
    } else {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    };
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", names[0]).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now + days.0 * 86_400 - 60).unwrap())
        .unwrap();
    b.set_not_after(
        &Asn1Time::from_unix(now + days.0 * 86_400 + i64::from(days.1) * 86_400).unwrap(),
    )
    .unwrap();
    let mut san = SubjectAlternativeName::new();
    for n in names {
        san.dns(n);
    }
    let san = san.build(&b.x509v3_context(None, None)).unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let pem = b.build().to_pem().unwrap();
    let (c, k) = (
        dir.join(format!("{file}.crt")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&c, &pem).unwrap();
    std::fs::write(&k, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (pem, c.display().to_string(), k.display().to_string())
}

/// The certificate a handshake gets for `sni` (none: no SNI sent), restricted to ECDSA or RSA
/// signatures when `sigalgs` says so; `None` when the handshake fails.
fn served(port: u16, sni: Option<&str>, sigalgs: Option<&str>) -> Option<X509> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    if let Some(s) = sigalgs {
        b.set_sigalgs_list(s).unwrap();
    }
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut cfg = b.build().configure().unwrap();
    cfg.set_use_server_name_indication(sni.is_some());
    cfg.set_verify_hostname(false);
    let s = cfg.connect(sni.unwrap_or("ignored"), tcp).ok()?;
    s.ssl().peer_certificate()
}

fn cn(c: &X509) -> String {
    c.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .map(|e| e.data().to_string().unwrap())
        .unwrap_or_default()
}

fn gateway(
    port: u16,
    up: std::net::SocketAddr,
    certs: &[(String, String, &str)],
    extra: &str,
) -> String {
    let mut t = format!("[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n");
    for (c, k, more) in certs {
        t.push_str(&format!(
            "[[gateways.web.certs]]\ncert = \"{c}\"\nkey = \"{k}\"\n{more}\n"
        ));
    }
    t.push_str("[[routes]]\nupstream = \"a\"\n");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_then_the_default() {
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, c1, k1) = cert(dir.path(), "api", &["api.example.com"], false, (0, 30));
    let (_, c2, k2) = cert(dir.path(), "wild", &["*.example.com"], false, (0, 30));
    let (_, c3, k3) = cert(dir.path(), "other", &["other.test"], false, (0, 30));
    let (_, c4, k4) = cert(dir.path(), "api-ec", &["api.example.com"], true, (0, 30));
    let port = free_port();
    let _g = Gatehouse::start(
        &gateway(
            port,
            up,
            &[
                (c1, k1, ""),
                (c2, k2, ""),
                (c3, k3, "default = true"),
                (c4, k4, ""),
            ],
            "",
        ),
        &[port],
    );
    let got = |sni: Option<&str>, alg: Option<&str>| served(port, sni, alg).map(|c| cn(&c));
    assert_eq!(
        got(Some("api.example.com"), Some("RSA+SHA256:RSA-PSS+SHA256")).as_deref(),
        Some("api.example.com")
    );
    assert_eq!(
        got(Some("API.Example.com."), Some("RSA+SHA256:RSA-PSS+SHA256")).as_deref(),
        Some("api.example.com")
    );
    // The same name with an ECDSA certificate: a client that only takes ECDSA gets it.
    let ec = served(port, Some("api.example.com"), Some("ECDSA+SHA256")).unwrap();
    assert_eq!(ec.public_key().unwrap().id(), openssl::pkey::Id::EC);
    let rsa = served(
        port,
        Some("api.example.com"),
        Some("RSA+SHA256:RSA-PSS+SHA256"),
    )
    .unwrap();
    assert_eq!(rsa.public_key().unwrap().id(), openssl::pkey::Id::RSA);
    assert_eq!(
        got(Some("www.example.com"), None).as_deref(),
        Some("*.example.com")
    );
    // One label only: a.b.example.com is not *.example.com's.
    assert_eq!(
        got(Some("a.b.example.com"), None).as_deref(),
        Some("other.test")
    );
    assert_eq!(
        got(Some("unknown.org"), None).as_deref(),
        Some("other.test")
    );
    assert_eq!(got(None, None).as_deref(), Some("other.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_can_be_refused() {
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (pem, c1, k1) = cert(dir.path(), "api", &["localhost"], false, (0, 30));
    let port = free_port();
    let _g = Gatehouse::start(
        &gateway(port, up, &[(c1, k1, "")], "unknown_sni = \"refuse\""),
        &[port],
    );
    assert!(served(port, Some("localhost"), None).is_some());
    assert!(served(port, Some("unknown.org"), None).is_none(), "refused");
    assert!(served(port, None, None).is_none(), "no SNI: refused");
    // And a real client on the known name.
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = c
        .get(format!("https://localhost:{port}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Gateway `web`'s counts of `gatehouse_tls_handshake_failures_total` in a scrape, by reason.
fn failures(metrics: &str) -> std::collections::BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| {
            l.strip_prefix("gatehouse_tls_handshake_failures_total{gateway=\"web\",reason=\"")
        })
        .filter_map(|l| l.split_once("\"} "))
        .map(|(r, n)| (r.to_string(), n.parse().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Failed handshakes are the clients' doing: counted by reason, never an error line each
/// (anyone could fill the journal with them); a connection closed before its first byte (a
/// TCP health check, the gateway's own readiness probe) is no handshake at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_not_logged() {
    use std::io::{Read, Write};
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, c1, k1) = cert(dir.path(), "api", &["localhost"], false, (0, 30));
    let (port, admin) = (free_port(), free_port());
    let g = Gatehouse::start(
        &format!(
            "[server]\nadmin = \"127.0.0.1:{admin}\"\n{}",
            gateway(port, up, &[(c1, k1, "")], "unknown_sni = \"refuse\"")
        ),
        &[port, admin],
    );
    // A refused name, plain HTTP on the TLS port, a client that leaves mid-handshake, one
    // that does not trust the certificate; a bare connect.
    assert!(served(port, Some("unknown.org"), None).is_none());
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let _ = plain.read(&mut [0; 64]);
    let mut half = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"\x16\x03\x01").unwrap();
    drop(half);
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let strict = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())
        .unwrap()
        .build();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(strict.connect("localhost", tcp).is_err());
    let want: std::collections::BTreeMap<String, u64> = [
        ("client_alert", 1),
        ("client_closed", 1),
        ("no_match", 1),
        ("not_tls", 1),
    ]
    .map(|(r, n)| (r.to_string(), n))
    .into();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while failures(&metrics_text(admin).await) != want && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A moment more: a late count (a bare connect's, say) would show.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(failures(&metrics_text(admin).await), want, "{}", g.log());
    // A good handshake still works, and none of the failures wrote a line.
    assert!(served(port, Some("localhost"), None).is_some());
    assert!(!g.log().contains("handshake"), "{}", g.log());
}

#[test]
fn check_refuses_expired_and_conflicting_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c1, k1) = cert(dir.path(), "old", &["old.test"], false, (-10, 5));
    let (_, c2, k2) = cert(dir.path(), "a", &["a.test"], false, (0, 30));
    let (_, c3, k3) = cert(dir.path(), "a2", &["a.test"], false, (0, 30));
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (code, out, _, _d) = check(&gateway(
        8443,
        up,
        &[(c1, k1, ""), (c2, k2, ""), (c3, k3, "")],
        "",
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expired on"), "{out}");
    assert!(
        out.contains("two certificates with the same key type for \"a.test\""),
        "{out}"
    );
}

/// A handshake limited to one protocol version: whether it succeeds.
fn handshake_with(port: u16, version: openssl::ssl::SslVersion) -> bool {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_min_proto_version(Some(version)).unwrap();
    b.set_max_proto_version(Some(version)).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    b.build().connect("localhost", tcp).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_ciphers_and_curves() {
    use openssl::ssl::SslVersion;
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, c, k) = cert(dir.path(), "l", &["localhost"], true, (0, 30));
    let port = free_port();
    let _g = Gatehouse::start(
        &gateway(
            port,
            up,
            &[(c.clone(), k.clone(), "")],
            "tls = { min_version = \"1.3\", curves = \"X25519:P-256\" }",
        ),
        &[port],
    );
    assert!(handshake_with(port, SslVersion::TLS1_3));
    assert!(!handshake_with(port, SslVersion::TLS1_2), "TLS 1.2 refused");
    let port2 = free_port();
    let _g2 = Gatehouse::start(
        &gateway(port2, up, &[(c.clone(), k.clone(), "")], ""),
        &[port2],
    );
    assert!(handshake_with(port2, SslVersion::TLS1_2), "1.2 by default");

    let (code, out, _, _d) = check(&gateway(
        8443,
        up,
        &[(c, k, "")],
        "tls = { min_version = \"1.0\", ciphers = \"NOPE-CIPHER\", curves = \"P-999\" }",
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":5:"), "{out}");
    assert!(out.contains("min_version \"1.0\""), "{out}");
    assert!(out.contains("ciphers \"NOPE-CIPHER\""), "{out}");
    assert!(out.contains("curves \"P-999\""), "{out}");
}

#[test]
fn check_warns_of_a_certificate_about_to_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c, k) = cert(dir.path(), "soon", &["soon.test"], true, (0, 5));
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (code, out, _, _d) = check(&gateway(8443, up, &[(c, k, "")], ""));
    assert_eq!(code, 0, "a warning, not an error: {out}");
    assert!(out.contains(":7:") && out.contains("warning:"), "{out}");
    assert!(
        out.contains("expires in 4 days") || out.contains("expires in 5 days"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gateways_can_send_clients_to_https() {
    let up = echo("a").await;
    let (p1, p2) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n\
             [gateways.http]\nlisten = [\"127.0.0.1:{p1}\"]\nredirect_https = true\n\
             [gateways.alt]\nlisten = [\"127.0.0.1:{p2}\"]\nredirect_https = 8443\n\
             [[routes]]\ngateway = \"http\"\nupstream = \"a\"\n[[routes]]\ngateway = \"alt\"\nupstream = \"a\"\n"
        ),
        &[p1, p2],
    );
    let r = client()
        .get(format!("http://127.0.0.1:{p1}/a/b?x=1&y=%20"))
        .header("host", "Shop.example.com:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        "https://shop.example.com/a/b?x=1&y=%20"
    );
    let r = client()
        .get(format!("http://127.0.0.1:{p2}/"))
        .header("host", "[::1]:80")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://[::1]:8443/");
    // A spelling trick is redirected in its canonical form.
    let r = client()
        .get(format!("http://127.0.0.1:{p1}/x/../admin"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "https://shop.example.com/admin");

    let dir = tempfile::tempdir().unwrap();
    let (_, c, k) = cert(dir.path(), "l", &["localhost"], true, (0, 30));
    let (code, out, _, _d) = check(&gateway(8443, up, &[(c, k, "")], "redirect_https = true"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("for a plain listener"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_on_every_answer_of_a_tls_gateway() {
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (pem, c, k) = cert(dir.path(), "l", &["localhost"], true, (0, 30));
    let port = free_port();
    let toml = format!(
        "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
         tls = {{ cert = \"{c}\", key = \"{k}\" }}\nhsts = \"max-age=63072000; includeSubDomains\"\n\
         [[routes]]\npath = \"/api\"\nupstream = \"a\"\n"
    );
    let _g = Gatehouse::start(&toml, &[port]);
    let cl = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    for (path, status) in [("/api/x", 200), ("/nowhere", 404)] {
        let r = cl
            .get(format!("https://localhost:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(
            r.headers()["strict-transport-security"],
            "max-age=63072000; includeSubDomains",
            "{path}"
        );
    }
    let (code, out, _, _d) = check(&format!(
        "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\nhsts = \"max-age=1\"\n[[routes]]\nupstream = \"a\"\n"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("`hsts` is for a TLS gateway"), "{out}");
}

/// The OCSP response a handshake that asks for one (status_request) gets stapled, if any.
fn stapled(port: u16) -> Option<Vec<u8>> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, StatusType};
    use std::sync::{Arc, Mutex};
    let got = Arc::new(Mutex::new(None));
    let seen = got.clone();
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_status_callback(move |ssl| {
        *seen.lock().unwrap() = ssl.ocsp_status().map(<[u8]>::to_vec);
        Ok(true)
    })
    .unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut cfg = b.build().configure().unwrap();
    cfg.set_status_type(StatusType::OCSP).unwrap();
    cfg.set_verify_hostname(false);
    let _s = cfg.connect("localhost", tcp).unwrap();
    let out = got.lock().unwrap().clone();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsp_response_is_stapled() {
    use common::pki::{Ca, Leaf};
    let up = echo("a").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("OCSP test CA");
    let ca_crt = ca.write(d, "ca");
    let ca_key = ca.write_key(d, "ca");
    let (leaf, key) = ca.sign(&Leaf {
        subject: &[("CN", "localhost")],
        dns: &["localhost"],
        ..Leaf::default()
    });
    // The chain file: the certificate, then its issuer (how the response is checked).
    let chain = d.join("chain.crt");
    let mut pem = leaf.to_pem().unwrap();
    pem.extend(ca.pem());
    std::fs::write(&chain, pem).unwrap();
    std::fs::write(d.join("leaf.crt"), leaf.to_pem().unwrap()).unwrap();
    let key_file = d.join("leaf.key");
    std::fs::write(&key_file, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let serial = leaf
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string();
    std::fs::write(
        d.join("index.txt"),
        format!("V\t301231235959Z\t\t{serial}\tunknown\t/CN=localhost\n"),
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("the openssl command (bootstrap.sh test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "ocsp",
        "-issuer",
        &ca_crt,
        "-cert",
        "leaf.crt",
        "-no_nonce",
        "-reqout",
        "req.der",
    ]);
    openssl(&[
        "ocsp",
        "-index",
        "index.txt",
        "-rsigner",
        &ca_crt,
        "-rkey",
        &ca_key,
        "-CA",
        &ca_crt,
        "-reqin",
        "req.der",
        "-respout",
        "resp.der",
        "-ndays",
        "7",
    ]);
    let resp = std::fs::read(d.join("resp.der")).unwrap();

    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\", ocsp = \"{}\" }}\n[[routes]]\nupstream = \"a\"\n",
            chain.display(),
            key_file.display(),
            d.join("resp.der").display()
        ),
        &[port],
    );
    assert_eq!(
        stapled(port),
        Some(resp),
        "the response, as the file has it"
    );

    // A response from another CA (for another certificate) is refused by check, with its line.
    let other = Ca::new("other CA");
    let (c2, k2) = other.issue(
        d,
        "other",
        &Leaf {
            subject: &[("CN", "localhost")],
            dns: &["localhost"],
            ..Leaf::default()
        },
    );
    let mut pem2 = std::fs::read(&c2).unwrap();
    pem2.extend(other.pem());
    std::fs::write(&c2, pem2).unwrap();
    let (code, out, _, _d) = check(&format!(
        "[upstreams.a]\npeers = [\"{up}\"]\n[gateways.web]\nlisten = [\"127.0.0.1:8443\"]\n\
         tls = {{ cert = \"{c2}\", key = \"{k2}\", ocsp = \"{}\" }}\n[[routes]]\nupstream = \"a\"\n",
        d.join("resp.der").display()
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad.toml:5:")
            && out.contains("its signature is not the certificate issuer's"),
        "{out}"
    );
}
