//! Certificates made inside the tests: a CA, and leaf certificates it signs (servers and
//! clients, ECDSA P-256: fast to make), written as PEM files; and a TLS upstream (OpenSSL,
//! optional client certificates, h2 or HTTP/1.1 by ALPN) that echoes what it saw.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509NameBuilder, X509};

pub fn ec_key() -> PKey<Private> {
    PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap()
}

fn validity(b: &mut openssl::x509::X509Builder) {
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
}

fn serial(b: &mut openssl::x509::X509Builder) {
    let mut n = BigNum::new().unwrap();
    n.rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    b.set_serial_number(&n.to_asn1_integer().unwrap()).unwrap();
}

pub struct Ca {
    pub cert: X509,
    key: PKey<Private>,
}

/// What a leaf certificate says: subject entries (`("CN", "alice")`), DNS and URI names.
#[derive(Default)]
pub struct Leaf<'a> {
    pub subject: &'a [(&'a str, &'a str)],
    pub dns: &'a [&'a str],
    pub uri: &'a [&'a str],
    /// For a client (TLS client auth) rather than a server.
    pub client: bool,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = ec_key();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        serial(&mut b);
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        validity(&mut b);
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        Ca {
            cert: b.build(),
            key,
        }
    }

    pub fn pem(&self) -> Vec<u8> {
        self.cert.to_pem().unwrap()
    }

    /// Writes the CA's key to `dir/file.key`; its path (for `openssl ocsp` to sign with).
    pub fn write_key(&self, dir: &Path, file: &str) -> String {
        let p = dir.join(format!("{file}.key"));
        std::fs::write(&p, self.key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        p.display().to_string()
    }

    /// Writes the CA certificate to `dir/file.crt`; its path.
    pub fn write(&self, dir: &Path, file: &str) -> String {
        let p = dir.join(format!("{file}.crt"));
        std::fs::write(&p, self.pem()).unwrap();
        p.display().to_string()
    }

    /// A certificate signed by this CA, and its key.
    pub fn sign(&self, leaf: &Leaf) -> (X509, PKey<Private>) {
        let key = ec_key();
        let mut name = X509NameBuilder::new().unwrap();
        for (k, v) in leaf.subject {
            name.append_entry_by_text(k, v).unwrap();
        }
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        serial(&mut b);
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        validity(&mut b);
        if !leaf.dns.is_empty() || !leaf.uri.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for n in leaf.dns {
                san.dns(n);
            }
            for u in leaf.uri {
                san.uri(u);
            }
            let san = san
                .build(&b.x509v3_context(Some(&self.cert), None))
                .unwrap();
            b.append_extension(san).unwrap();
        }
        let mut eku = ExtendedKeyUsage::new();
        if leaf.client {
            eku.client_auth();
        } else {
            eku.server_auth();
        }
        b.append_extension(eku.build().unwrap()).unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        (b.build(), key)
    }

    /// [`Ca::sign`], written to `dir/file.crt` and `dir/file.key`; their paths.
    pub fn issue(&self, dir: &Path, file: &str, leaf: &Leaf) -> (String, String) {
        let (cert, key) = self.sign(leaf);
        let (c, k) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.to_pem().unwrap()).unwrap();
        std::fs::write(&k, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

/// A TLS upstream on a free loopback port with the certificate and key files given; with
/// `clients`, it demands a client certificate signed by that CA. It answers every request with
/// JSON: the HTTP version, the path, the client certificate's CN (or null).
pub async fn tls_upstream(cert: &str, key: &str, clients: Option<&Ca>) -> SocketAddr {
    use openssl::ssl::{AlpnError, SslAcceptor, SslMethod, SslVerifyMode};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate_chain_file(cert).unwrap();
    b.set_private_key_file(key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    b.set_alpn_select_callback(|_, offered| {
        openssl::ssl::select_next_proto(b"\x02h2\x08http/1.1", offered).ok_or(AlpnError::NOACK)
    });
    if let Some(ca) = clients {
        b.cert_store_mut().add_cert(ca.cert.clone()).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    let acceptor = Arc::new(b.build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let ssl = openssl::ssl::Ssl::new(acceptor.context()).unwrap();
                let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                let client_cn = tls.ssl().peer_certificate().and_then(|c| {
                    c.subject_name()
                        .entries_by_nid(Nid::COMMONNAME)
                        .next()
                        .map(|e| e.data().to_string().unwrap())
                });
                let h2 = tls.ssl().selected_alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "path": req.uri().path(),
                        "client": client_cn,
                    });
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(super::full(body.to_string()))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    addr
}

/// A TLS connection to the gateway on `port` as `localhost`, offering `alpn` (wire format,
/// `b"\x02h2"`); the certificate is not checked (the tests that need that check it).
pub async fn tls_connect(
    port: u16,
    alpn: &[u8],
) -> tokio_openssl::SslStream<tokio::net::TcpStream> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_alpn_protos(alpn).unwrap();
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut s = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut s).connect().await.unwrap();
    s
}
