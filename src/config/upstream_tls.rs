//! How the gateway speaks TLS to an upstream's peers: verified by default (the system roots,
//! or `ca`), each peer's host name sent as SNI and checked on its certificate, a client
//! certificate for upstreams that demand mTLS. Turning verification off takes an explicit
//! `insecure_skip_verify = true`, which `check` warns about.
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use pingora::tls::x509::X509;
use pingora::utils::tls::CertKey;

use super::build::{relative_to, Loader};
use super::file::UpstreamFile;
use super::Peer;
use crate::tls::CertPair;

/// A value read from files, compared by the files' bytes: a reload that changes a CA or a
/// client certificate gives a new pool (and new connections), one that does not keeps it.
#[derive(Clone)]
pub struct Loaded<T> {
    bytes: Vec<u8>,
    pub value: T,
}

impl<T> PartialEq for Loaded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> std::fmt::Debug for Loaded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loaded({} bytes)", self.bytes.len())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTls {
    /// Check the peer's chain (off only with `insecure_skip_verify`).
    pub verify: bool,
    /// Check that the certificate is for the SNI name.
    pub verify_hostname: bool,
    /// Trust these instead of the system roots.
    pub ca: Option<Loaded<Arc<Box<[X509]>>>>,
    pub client: Option<Loaded<Arc<CertKey>>>,
    /// Pingora's connection pool keys on address, SNI and flags but not on the CA: this
    /// (a hash of the settings) keeps connections made under other settings apart.
    pub group: u64,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            verify: true,
            verify_hostname: true,
            ca: None,
            client: None,
            group: 0,
        }
    }
}

/// The host of `HOST:PORT` when it is a name, not an address (the canonical authority's, as
/// requests spell it: lower case, no trailing dot).
fn host_name(peer: &str) -> Option<String> {
    let a = gatehouse_plugins::authority::Authority::parse(peer.as_bytes(), true)?;
    a.ip().is_none().then(|| a.host().to_string())
}

fn read(
    ld: &mut Loader,
    config: &Path,
    f: &toml::Spanned<std::path::PathBuf>,
    ctx: &str,
) -> Option<Vec<u8>> {
    let p = relative_to(config, f.get_ref());
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) => {
            ld.err(f.span(), ctx, format!("{}: {e}", p.display()));
            None
        }
    }
}

/// The upstream's TLS settings and whether it speaks HTTP/2; sets each peer's SNI.
pub(super) fn upstream_tls(
    ld: &mut Loader,
    config: &Path,
    u: &UpstreamFile,
    peers: &mut [Peer],
    span: Range<usize>,
    ctx: &str,
) -> (UpstreamTls, bool) {
    let http2 = u.http2.as_ref().is_some_and(|h| *h.get_ref());
    let mut out = UpstreamTls::default();
    if !u.tls {
        let tls_only = [
            ("sni", u.sni.as_ref().map(|s| s.span())),
            ("ca", u.ca.as_ref().map(|s| s.span())),
            (
                "verify_hostname",
                u.verify_hostname.as_ref().map(|s| s.span()),
            ),
            (
                "insecure_skip_verify",
                u.insecure_skip_verify.as_ref().map(|s| s.span()),
            ),
            ("client_cert", u.client_cert.as_ref().map(|s| s.span())),
            ("client_key", u.client_key.as_ref().map(|s| s.span())),
        ];
        for (key, at) in tls_only {
            if let Some(at) = at {
                ld.err(at, ctx, format!("`{key}` needs `tls = true`"));
            }
        }
        return (out, http2);
    }
    if let Some(i) = u.insecure_skip_verify.as_ref().filter(|i| *i.get_ref()) {
        out.verify = false;
        ld.warn(
            i.span(),
            ctx,
            "insecure_skip_verify: the peers' certificates are not checked; anyone between the gateway and them can read and change this traffic",
        );
        if let Some(ca) = &u.ca {
            ld.err(
                ca.span(),
                ctx,
                "`ca` means nothing with `insecure_skip_verify = true`",
            );
        }
    }
    out.verify_hostname = u.verify_hostname.as_ref().is_none_or(|v| *v.get_ref());
    if let Some(f) = &u.ca {
        if let Some(bytes) = read(ld, config, f, ctx) {
            match X509::stack_from_pem(&bytes) {
                Ok(certs) if !certs.is_empty() => {
                    out.ca = Some(Loaded {
                        bytes,
                        value: Arc::new(certs.into_boxed_slice()),
                    });
                }
                _ => ld.err(f.span(), ctx, "`ca`: no PEM certificate in the file"),
            }
        }
    }
    match (&u.client_cert, &u.client_key) {
        (Some(c), Some(k)) => {
            let (cp, kp) = (
                relative_to(config, c.get_ref()),
                relative_to(config, k.get_ref()),
            );
            match CertPair::load(&cp, &kp) {
                Ok(pair) => {
                    let mut bytes = read(ld, config, c, ctx).unwrap_or_default();
                    bytes.extend(read(ld, config, k, ctx).unwrap_or_default());
                    out.client = Some(Loaded {
                        bytes,
                        value: Arc::new(pair.cert_key()),
                    });
                }
                Err(why) => ld.err(c.span(), ctx, format!("client_cert: {why}")),
            }
        }
        (Some(c), None) => ld.err(c.span(), ctx, "`client_cert` needs `client_key`"),
        (None, Some(k)) => ld.err(k.span(), ctx, "`client_key` needs `client_cert`"),
        (None, None) => {}
    }
    let sni = u.sni.as_ref().map(|s| s.get_ref().trim().to_string());
    if let Some(s) = &u.sni {
        let name = s.get_ref().trim();
        let dns = !name.is_empty()
            && name.parse::<IpAddr>().is_err()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !dns {
            ld.err(
                s.span(),
                ctx,
                "`sni` is the DNS name the peers' certificates are for (not an address)",
            );
        }
    }
    for p in peers.iter_mut() {
        p.sni = match (&sni, host_name(&p.name)) {
            (Some(s), _) => s.clone(),
            (None, Some(h)) => h,
            (None, None) => {
                // Without a name there is nothing to verify (and Pingora sends no SNI).
                if out.verify {
                    ld.err(
                        span.clone(),
                        ctx,
                        format!(
                            "peer {} is an address: set `sni` to the name its certificate is for (or `insecure_skip_verify = true`)",
                            p.name
                        ),
                    );
                }
                String::new()
            }
        };
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    out.verify.hash(&mut h);
    out.verify_hostname.hash(&mut h);
    out.ca.as_ref().map(|c| &c.bytes).hash(&mut h);
    out.client.as_ref().map(|c| &c.bytes).hash(&mut h);
    out.group = h.finish();
    (out, http2)
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn host_names_not_addresses() {
        assert_eq!(
            host_name("API.internal.:443").as_deref(),
            Some("api.internal")
        );
        assert_eq!(host_name("10.0.0.1:443"), None);
        assert_eq!(host_name("[::1]:443"), None);
        assert_eq!(host_name("localhost:8443").as_deref(), Some("localhost"));
    }
}
