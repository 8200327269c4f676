//! A gateway's TLS certificate, reloadable: handshakes take the certificate and key from a
//! store the reload replaces, instead of files Pingora reads once at start (a SIGHUP used to
//! log success while the old certificate stayed). A new handshake gets the new pair; an
//! established connection keeps the one it was made with.
//!
//! The pair is read and checked when the config is loaded (`check`, start and reload alike):
//! a certificate chain and a private key that belongs to its first certificate.
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::tls::ext::{ssl_add_chain_cert, ssl_use_certificate, ssl_use_private_key};
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::SslRef;
use pingora::tls::x509::X509;

/// A certificate chain (leaf first) and its private key.
pub struct CertPair {
    chain: Vec<X509>,
    key: PKey<Private>,
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
        Ok(CertPair {
            chain,
            key: key_parsed,
        })
    }
}

/// The pair handshakes use now.
pub struct CertStore(ArcSwap<CertPair>);

impl CertStore {
    pub fn new(pair: Arc<CertPair>) -> Arc<CertStore> {
        Arc::new(CertStore(ArcSwap::new(pair)))
    }

    pub fn replace(&self, pair: Arc<CertPair>) {
        self.0.store(pair);
    }
}

/// Pingora's handshake hook, serving the store's current pair.
pub struct Certificates(pub Arc<CertStore>);

#[async_trait]
impl TlsAccept for Certificates {
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        let pair = self.0 .0.load();
        let Some(leaf) = pair.chain.first() else {
            return;
        };
        // A failure here fails the handshake (no certificate): nothing else to do with it.
        let ok = ssl_use_certificate(ssl, leaf).is_ok()
            && ssl_use_private_key(ssl, &pair.key).is_ok()
            && pair.chain[1..]
                .iter()
                .all(|c| ssl_add_chain_cert(ssl, c).is_ok());
        if !ok {
            log::warn!("TLS handshake: the certificate could not be set");
        }
    }
}
