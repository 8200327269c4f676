//! Client certificates (`client_auth`): asked for and verified in the handshake, then made
//! into what plugins and header variables see ([`gatehouse_plugins::ClientCert`]).
use std::fmt::Write;
use std::path::Path;

use pingora::tls::ext::ssl_set_verify_cert_store;
use pingora::tls::ssl::SslRef;
use pingora::tls::x509::X509;

/// `client_auth`: the CAs client certificates are verified against, and whether a client
/// without one is refused at the handshake.
pub struct ClientAuth {
    pub required: bool,
    store: openssl::x509::store::X509Store,
    /// The CAs' subjects, sent in the CertificateRequest so a client picks a fitting cert.
    names: Vec<openssl::x509::X509Name>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("required", &self.required)
            .field("cas", &self.names.len())
            .finish()
    }
}

impl ClientAuth {
    /// Reads the CA file (PEM, one or more certificates).
    pub fn load(ca: &Path, required: bool) -> Result<ClientAuth, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cas = X509::stack_from_pem(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("{}: no PEM certificate in it", ca.display()))?;
        let mut store = openssl::x509::store::X509StoreBuilder::new()
            .map_err(|e| format!("client CA store: {e}"))?;
        let mut names = Vec::with_capacity(cas.len());
        for c in cas {
            names.push(
                openssl::x509::X509NameRef::to_owned(c.subject_name())
                    .map_err(|e| format!("client CA: {e}"))?,
            );
            store
                .add_cert(c)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        Ok(ClientAuth {
            required,
            store: store.build(),
            names,
        })
    }

    /// Whether `cert` (with the chain the client sent) verifies against these CAs now.
    pub(super) fn verifies(
        &self,
        cert: &openssl::x509::X509Ref,
        chain: Option<&openssl::stack::StackRef<X509>>,
    ) -> bool {
        let Ok(mut ctx) = openssl::x509::X509StoreContext::new() else {
            return false;
        };
        let empty = openssl::stack::Stack::<X509>::new();
        let chain = match (chain, &empty) {
            (Some(c), _) => c,
            (None, Ok(e)) => e,
            (None, Err(_)) => return false,
        };
        ctx.init(&self.store, cert, chain, |c| c.verify_cert())
            .unwrap_or(false)
    }

    /// Asks this handshake for a client certificate, verified against these CAs.
    pub(super) fn apply(&self, ssl: &mut SslRef) {
        use openssl::ssl::SslVerifyMode;
        let mut mode = SslVerifyMode::PEER;
        if self.required {
            mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
        }
        ssl.set_verify(mode);
        let names = openssl::stack::Stack::<openssl::x509::X509Name>::new().map(|mut stack| {
            for n in &self.names {
                if let Ok(n) = openssl::x509::X509NameRef::to_owned(n) {
                    let _ = stack.push(n);
                }
            }
            stack
        });
        if let Ok(names) = names {
            ssl.set_client_ca_list(names);
        }
        if ssl_set_verify_cert_store(ssl, &self.store).is_err() {
            // Without the store nothing would verify: refuse every certificate instead.
            ssl.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            log::error!("TLS handshake: the client CA store could not be set");
        }
    }
}

/// What plugins and header variables see of a verified client certificate.
pub fn client_cert(cert: &openssl::x509::X509Ref) -> gatehouse_plugins::ClientCert {
    let subject = rfc2253(cert.subject_name());
    let common_name = cert
        .subject_name()
        .entries_by_nid(pingora::tls::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok());
    let sans = cert
        .subject_alt_names()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            n.dnsname()
                .or_else(|| n.uri())
                .or_else(|| n.email())
                .map(str::to_string)
                .or_else(|| match n.ipaddress()? {
                    b if b.len() == 4 => {
                        let a: [u8; 4] = b.try_into().ok()?;
                        Some(std::net::Ipv4Addr::from(a).to_string())
                    }
                    b => {
                        let a: [u8; 16] = b.try_into().ok()?;
                        Some(std::net::Ipv6Addr::from(a).to_string())
                    }
                })
        })
        .map(|s| printable(&s))
        .collect();
    let fingerprint = cert
        .digest(openssl::hash::MessageDigest::sha256())
        .map(hex::encode)
        .unwrap_or_default();
    gatehouse_plugins::ClientCert {
        subject,
        common_name: common_name.map(|c| printable(&c)),
        sans,
        fingerprint,
    }
}

/// `s` with bytes outside printable ASCII, and `\` and `,` themselves, as `\XX`: always a
/// header value; two different names never come out the same, and names joined with `,`
/// (`${tls.client_san}`) split back into exactly the certificate's.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'\\' && b != b',' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\{b:02X}");
        }
    }
    out
}

/// How many attributes each RDN of a DER `Name` holds (a SEQUENCE OF SET OF
/// AttributeTypeAndValue): `CN=a+O=b` is one RDN of two. OpenSSL's entry list flattens them.
fn rdn_sizes(der: &[u8]) -> Option<Vec<usize>> {
    /// One TLV: (tag, contents, rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, mut rdns, _) = tlv(der)? else {
        return None;
    };
    let mut sizes = Vec::new();
    while !rdns.is_empty() {
        let (0x31, mut set, rest) = tlv(rdns)? else {
            return None;
        };
        let mut n = 0;
        while !set.is_empty() {
            let (_, _, more) = tlv(set)?;
            set = more;
            n += 1;
        }
        sizes.push(n);
        rdns = rest;
    }
    Some(sizes)
}

/// A distinguished name as RFC 2253 writes it (`openssl x509 -nameopt RFC2253` alike): last
/// RDN first, `,` between RDNs and `+` within one, specials escaped, values as UTF-8 whatever
/// their ASN.1 string type, bytes outside printable ASCII as `\XX`.
fn rfc2253(name: &openssl::x509::X509NameRef) -> String {
    let entries: Vec<_> = name.entries().collect();
    // Without the grouping (an unreadable DER), each entry is its own RDN.
    let sizes = name
        .to_der()
        .ok()
        .and_then(|d| rdn_sizes(&d))
        .filter(|s| s.iter().sum::<usize>() == entries.len())
        .unwrap_or_else(|| vec![1; entries.len()]);
    let mut groups = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for n in sizes {
        groups.push(&entries[at..at + n]);
        at += n;
    }
    let mut out = String::new();
    for (i, group) in groups.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (k, e) in group.iter().enumerate() {
            if k > 0 {
                out.push('+');
            }
            let nid = e.object().nid();
            match nid.short_name() {
                Ok(sn) if nid != pingora::tls::nid::Nid::UNDEF => out.push_str(sn),
                _ => out.push_str(&e.object().to_string()),
            }
            out.push('=');
            let text = e.data().to_string().ok();
            let value = text.as_deref().map_or(e.data().as_slice(), str::as_bytes);
            let last = value.len().saturating_sub(1);
            for (j, &b) in value.iter().enumerate() {
                let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
                    || (j == 0 && (b == b'#' || b == b' '))
                    || (j == last && b == b' ');
                if special {
                    out.push('\\');
                    out.push(b as char);
                } else if (0x20..0x7f).contains(&b) {
                    out.push(b as char);
                } else {
                    let _ = write!(out, "\\{b:02X}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::x509::X509NameBuilder;

    fn name(entries: &[(&str, &str)]) -> openssl::x509::X509Name {
        let mut b = X509NameBuilder::new().unwrap();
        for (k, v) in entries {
            b.append_entry_by_text(k, v).unwrap();
        }
        b.build()
    }

    #[test]
    fn rfc2253_order_and_escapes() {
        assert_eq!(
            rfc2253(&name(&[("O", "Acme"), ("CN", "alice")])),
            "CN=alice,O=Acme"
        );
        assert_eq!(
            rfc2253(&name(&[("CN", "a,b+c"), ("O", " x ")])),
            r"O=\ x\ ,CN=a\,b\+c"
        );
        assert_eq!(rfc2253(&name(&[("CN", "é")])), r"CN=\C3\A9");
        assert_eq!(rfc2253(&name(&[("CN", "#1")])), r"CN=\#1");
    }

    #[test]
    fn multi_valued_rdns_are_joined_with_plus() {
        // CN=a+O=b in one RDN (set index 0 for both), then OU=c.
        let mut b = X509NameBuilder::new().unwrap();
        b.append_entry_by_text("CN", "a").unwrap();
        let one = b.build();
        let der = one.to_der().unwrap();
        assert_eq!(rdn_sizes(&der), Some(vec![1]));
        // A hand-made Name: SEQUENCE { SET { CN=a, O=b }, SET { OU=c } }.
        let atv = |oid: &[u8], v: &[u8]| {
            let mut x = vec![0x06, oid.len() as u8];
            x.extend_from_slice(oid);
            x.extend_from_slice(&[0x0c, v.len() as u8]);
            x.extend_from_slice(v);
            let mut s = vec![0x30, x.len() as u8];
            s.extend(x);
            s
        };
        let cn = atv(&[0x55, 0x04, 0x03], b"a");
        let o = atv(&[0x55, 0x04, 0x0a], b"b");
        let ou = atv(&[0x55, 0x04, 0x0b], b"c");
        let set = |items: &[&Vec<u8>]| {
            let body: Vec<u8> = items.iter().flat_map(|i| i.iter().copied()).collect();
            let mut s = vec![0x31, body.len() as u8];
            s.extend(body);
            s
        };
        let body: Vec<u8> = [set(&[&cn, &o]), set(&[&ou])].concat();
        let mut der = vec![0x30, body.len() as u8];
        der.extend(body);
        assert_eq!(rdn_sizes(&der), Some(vec![2, 1]));
        let parsed = openssl::x509::X509Name::from_der(&der).unwrap();
        assert_eq!(rfc2253(&parsed), "OU=c,CN=a+O=b");
        assert_ne!(
            rfc2253(&parsed),
            rfc2253(&name(&[("OU", "c"), ("O", "b"), ("CN", "a")]))
        );
    }

    #[test]
    fn printable_escapes_what_would_be_ambiguous() {
        assert_eq!(printable(r"a\0A"), r"a\5C0A");
        assert_eq!(printable("a\n"), r"a\0A");
        assert_eq!(printable("spiffe://a/x,y"), r"spiffe://a/x\2Cy");
    }
}
