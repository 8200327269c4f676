//! A gateway's TLS certificates, chosen by SNI and reloadable: handshakes take certificates
//! and keys from a store the reload replaces, instead of files Pingora reads once at start (a
//! SIGHUP used to log success while the old certificate stayed). A new handshake gets the new
//! pairs; an established connection keeps the one it was made with.
//!
//! The pair is read and checked when the config is loaded (`check`, start and reload alike):
//! a certificate chain and a private key that belongs to its first certificate.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

mod accept;
mod client;
pub mod failures;
mod ocsp;

pub use accept::Handshaker;
pub use client::{client_cert, ClientAuth};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::tls::ext::{ssl_add_chain_cert, ssl_use_certificate, ssl_use_private_key};
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{NameType, SslRef};
use pingora::tls::x509::X509;

/// `tls = { min_version, ciphers, ciphersuites, curves }`; absent: Mozilla's intermediate
/// profile (TLS 1.2 and 1.3, forward-secret AEAD ciphers), as Pingora sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Only TLS 1.3 (`min_version = "1.3"`).
    pub only_13: bool,
    pub ciphers: Option<String>,
    pub ciphersuites: Option<String>,
    pub curves: Option<String>,
}

/// A certificate chain (leaf first) and its private key.
pub struct CertPair {
    chain: Vec<X509>,
    key: PKey<Private>,
    /// The OCSP response stapled for this certificate, when `ocsp` names one.
    ocsp: Option<ocsp::Staple>,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subject = self
            .chain
            .first()
            .map(|c| format!("{:?}", c.subject_name()));
        f.debug_struct("CertPair")
            .field("subject", &subject)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// Reads and checks a PEM certificate chain and key; the reason, for the config error.
    pub fn load(cert: &Path, key: &Path) -> Result<CertPair, String> {
        let cert_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let chain = X509::stack_from_pem(&cert_pem)
            .map_err(|_| format!("{}: not a PEM certificate chain", cert.display()))?;
        let Some(leaf) = chain.first() else {
            return Err(format!("{}: no certificate in it", cert.display()));
        };
        let key_parsed = PKey::private_key_from_pem(&key_pem)
            .map_err(|_| format!("{}: not a PEM private key", key.display()))?;
        let matches = leaf
            .public_key()
            .is_ok_and(|public| public.public_eq(&key_parsed));
        if !matches {
            return Err(format!(
                "{} is not the key of the certificate in {}",
                key.display(),
                cert.display()
            ));
        }
        let now = openssl::asn1::Asn1Time::days_from_now(0)
            .map_err(|_| "cannot read the clock".to_string())?;
        if leaf.not_after() < now {
            return Err(format!(
                "{}: expired on {}",
                cert.display(),
                leaf.not_after()
            ));
        }
        Ok(CertPair {
            chain,
            key: key_parsed,
            ocsp: None,
        })
    }

    /// Reads the OCSP response to staple (see [`ocsp::read`]); `Ok(Some(warning))`: worth
    /// saying, and then not stapled.
    pub fn set_ocsp(&mut self, path: &Path) -> Result<Option<String>, String> {
        let (Some(leaf), Some(issuer)) = (self.chain.first(), self.chain.get(1)) else {
            return Err(format!(
                "{}: cannot be checked: the certificate file has no issuer after the certificate (give the chain)",
                path.display()
            ));
        };
        match ocsp::read(path, leaf, issuer)? {
            ocsp::Read::Staple(s) => {
                self.ocsp = Some(s);
                Ok(None)
            }
            ocsp::Read::Skip(why) => Ok(Some(why)),
        }
    }

    /// The pair as Pingora's connector presents it (an upstream's `client_cert`).
    pub fn cert_key(&self) -> pingora::utils::tls::CertKey {
        pingora::utils::tls::CertKey::new(self.chain.clone(), self.key.clone())
    }

    /// Whole days until the leaf certificate expires.
    pub fn days_left(&self) -> Option<i32> {
        let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
        let leaf = self.chain.first()?;
        now.diff(leaf.not_after()).ok().map(|d| d.days)
    }

    /// The DNS names the leaf certificate is for: its SANs, else its common name.
    pub fn dns_names(&self) -> Vec<String> {
        let Some(leaf) = self.chain.first() else {
            return Vec::new();
        };
        let sans: Vec<String> = leaf
            .subject_alt_names()
            .into_iter()
            .flatten()
            .filter_map(|n| n.dnsname().map(str::to_string))
            .collect();
        if !sans.is_empty() {
            return sans;
        }
        leaf.subject_name()
            .entries_by_nid(pingora::tls::nid::Nid::COMMONNAME)
            .filter_map(|e| e.data().to_string().ok())
            .collect()
    }
}

/// The pairs of one name: an RSA and an ECDSA certificate may serve it together (OpenSSL
/// keeps one per key type and the client's signature algorithms choose).
type Pairs = Vec<Arc<CertPair>>;

/// A gateway's certificates by name: exact names before wildcards (`*.example.com`: one label),
/// then the default, or none (the handshake is refused).
#[derive(Debug, Default)]
pub struct CertSet {
    /// Client certificates asked for (and verified) in every handshake; reloads with the set.
    pub client_auth: Option<ClientAuth>,
    exact: HashMap<String, Pairs>,
    wildcard: HashMap<String, Pairs>,
    default: Option<Pairs>,
    /// Each entry's pairs, by entry index, to find the default's.
    entries: Vec<(usize, Arc<CertPair>)>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl CertSet {
    /// The `tls = { cert, key }` form: one pair whatever the client asks for.
    pub fn single(pair: Arc<CertPair>) -> CertSet {
        CertSet {
            default: Some(vec![pair]),
            ..CertSet::default()
        }
    }

    /// Adds `pair` (of entry `entry`) for `name`: `api.example.com` or `*.example.com`.
    pub fn add(&mut self, name: &str, pair: Arc<CertPair>, entry: usize) -> Result<(), String> {
        let n = normalize(name);
        let (map, key) = match n.strip_prefix("*.") {
            Some(rest) => (&mut self.wildcard, rest.to_string()),
            None => (&mut self.exact, n.clone()),
        };
        if key.is_empty()
            || key.contains('*')
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(format!(
                "\"{name}\" is not a DNS name (a wildcard is `*.` before a name)"
            ));
        }
        let pairs = map.entry(key).or_default();
        let kind = pair.key.id();
        if pairs.iter().any(|p| p.key.id() == kind) {
            return Err(format!(
                "two certificates with the same key type for \"{name}\""
            ));
        }
        pairs.push(pair.clone());
        if !self.entries.iter().any(|(e, _)| *e == entry) {
            self.entries.push((entry, pair));
        }
        Ok(())
    }

    /// The default: entry `at`'s pairs (with the other key type's pair for the same first
    /// name, if any); `None`: unknown and absent names are refused.
    pub fn finish(&mut self, at: Option<usize>) {
        self.default = at.and_then(|at| {
            let (_, pair) = self.entries.iter().find(|(e, _)| *e == at)?;
            let name = pair.dns_names().into_iter().next();
            let same = name.and_then(|n| self.pick_named(&normalize(&n)).cloned());
            Some(
                same.filter(|p| p.iter().any(|x| Arc::ptr_eq(x, pair)))
                    .unwrap_or_else(|| vec![pair.clone()]),
            )
        });
    }

    fn pick_named(&self, name: &str) -> Option<&Pairs> {
        self.exact.get(name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent)
        })
    }

    /// The pairs for the name the client sent (SNI), if any is served.
    pub fn pick(&self, sni: Option<&str>) -> Option<&[Arc<CertPair>]> {
        sni.and_then(|n| self.pick_named(&normalize(n)))
            .or(self.default.as_ref())
            .map(Vec::as_slice)
    }
}

/// The certificates handshakes use now.
pub struct CertStore(ArcSwap<CertSet>);

impl CertStore {
    pub fn new(set: Arc<CertSet>) -> Arc<CertStore> {
        Arc::new(CertStore(ArcSwap::new(set)))
    }

    pub fn replace(&self, set: Arc<CertSet>) {
        self.0.store(set);
    }
}

/// Pingora's handshake hook, serving the store's current pair.
pub struct Certificates(pub Arc<CertStore>);

#[async_trait]
impl TlsAccept for Certificates {
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        let set = self.0 .0.load();
        let sni = ssl.servername(NameType::HOST_NAME).map(str::to_string);
        // No pair: no certificate is set and the handshake fails (`unknown_sni = "refuse"`).
        let Some(pairs) = set.pick(sni.as_deref()) else {
            log::debug!("TLS handshake refused: no certificate for {sni:?}");
            return;
        };
        if let Some(auth) = &set.client_auth {
            auth.apply(ssl);
        }
        for pair in pairs {
            let Some(leaf) = pair.chain.first() else {
                continue;
            };
            // Certificate, key, then its chain: the chain goes with the certificate set last.
            let ok = ssl_use_certificate(ssl, leaf).is_ok()
                && ssl_use_private_key(ssl, &pair.key).is_ok()
                && pair.chain[1..]
                    .iter()
                    .all(|c| ssl_add_chain_cert(ssl, c).is_ok());
            if !ok {
                log::warn!("TLS handshake: a certificate could not be set");
            }
        }
    }

    /// The verified client certificate, made once per connection and kept in its TLS digest
    /// for every request on it (`crate::tls::client_of`).
    async fn handshake_complete_callback(
        &self,
        ssl: &SslRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let set = self.0 .0.load();
        // No client_auth now (a reload removed it): no identity, whatever the session says.
        let auth = set.client_auth.as_ref()?;
        if ssl.verify_result() != openssl::x509::X509VerifyResult::OK {
            return None;
        }
        let cert = ssl.peer_certificate()?;
        // A resumed session skipped verification: its certificate is checked again against
        // the CAs of now, so a reload that drops a CA drops its clients' resumed sessions too.
        if ssl.session_reused() && !auth.verifies(&cert, ssl.peer_cert_chain()) {
            return None;
        }
        Some(Arc::new(Arc::new(client_cert(&cert))))
    }
}

/// The client certificate of the connection `digest` belongs to, if one was verified.
pub fn client_of(
    digest: Option<&pingora::protocols::Digest>,
) -> Option<Arc<gatehouse_plugins::ClientCert>> {
    digest?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<Arc<gatehouse_plugins::ClientCert>>()
        .cloned()
}

/// Staples the chosen certificate's OCSP response for clients that ask (status_request).
/// OpenSSL calls this after it has chosen among the pairs set for the name (RSA or ECDSA),
/// so the response is the one of the certificate actually sent.
pub fn staple_ocsp(
    settings: &mut pingora::tls::ssl::SslAcceptorBuilder,
    store: Arc<CertStore>,
) -> Result<(), String> {
    settings
        .set_status_callback(move |ssl| {
            let set = store.0.load();
            let sni = ssl.servername(NameType::HOST_NAME).map(str::to_string);
            let Some(pairs) = set.pick(sni.as_deref()) else {
                return Ok(false);
            };
            let sent = ssl.certificate().map(|c| c.to_owned());
            let ocsp = pairs.iter().find_map(|p| {
                let leaf = p.chain.first()?;
                let is_sent = sent.as_ref().is_some_and(|s| s == leaf);
                p.ocsp.as_ref().filter(|_| is_sent)
            });
            // A response past its nextUpdate is not stapled: a client may refuse it.
            match ocsp.filter(|o| o.current()) {
                Some(o) => ssl.set_ocsp_status(&o.der).map(|()| true),
                None => Ok(false),
            }
        })
        .map_err(|e| format!("OCSP stapling: {e}"))
}

/// The listener's versions, ciphers and curves (checked at load; an error here is OpenSSL's).
pub fn apply_options(
    settings: &mut pingora::tls::ssl::SslAcceptorBuilder,
    o: &TlsOptions,
) -> Result<(), String> {
    use openssl::ssl::SslVersion;
    fn e(what: &'static str) -> impl Fn(openssl::error::ErrorStack) -> String {
        move |err| format!("{what}: {err}")
    }
    if o.only_13 {
        settings
            .set_min_proto_version(Some(SslVersion::TLS1_3))
            .map_err(e("min_version"))?;
    }
    if let Some(c) = &o.ciphers {
        settings.set_cipher_list(c).map_err(e("ciphers"))?;
    }
    if let Some(c) = &o.ciphersuites {
        settings.set_ciphersuites(c).map_err(e("ciphersuites"))?;
    }
    if let Some(c) = &o.curves {
        settings.set_groups_list(c).map_err(e("curves"))?;
    }
    Ok(())
}
