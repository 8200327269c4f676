//! `mtls_auth`: a route that only serves clients with a verified TLS client certificate,
//! optionally only certain ones (by subject, SAN or SHA-256 fingerprint).
//!
//! The certificate was verified in the handshake against the gateway's
//! `client_auth = { mode, ca }`; this plugin decides what a route accepts. On a gateway with
//! `mode = "optional"`, routes without it serve clients without a certificate too. The
//! certificate's common name becomes the consumer (rate-limit keys, logs, `${consumer}`) unless
//! an earlier plugin set one. 403 when there is no certificate or it is not one of those listed.
//!
//! ```toml
//! [plugins.billing-only]
//! kind = "mtls_auth"
//! subjects = ["CN=billing,O=Acme"]        # RFC 2253, as ${tls.client_subject} shows it
//! sans = ["spiffe://acme/billing"]        # any DNS, URI, email or IP name
//! fingerprints = ["9f86d081884c7d65..."]  # SHA-256 of the certificate, hex
//! ```
use std::sync::Arc;

use async_trait::async_trait;
use http::StatusCode;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use crate::{refuse, Decision, Phases, Plugin, PluginCtx};

/// A client certificate the handshake verified, as plugins and header variables see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject, RFC 2253 (`CN=alice,OU=ops,O=Acme`); bytes outside printable ASCII as
    /// `\XX`, so it is always a valid header value.
    pub subject: String,
    /// The subject's first common name, if any.
    pub common_name: Option<String>,
    /// Subject alternative names: DNS names, URIs, emails and IP addresses, as text.
    pub sans: Vec<String>,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub sans: Vec<String>,
    #[serde(default)]
    pub fingerprints: Vec<String>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        for f in &mut self.fingerprints {
            let hex: String = f
                .chars()
                .filter(|c| *c != ':')
                .map(|c| c.to_ascii_lowercase())
                .collect();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "fingerprint {f:?} is not a SHA-256 (64 hex digits, colons allowed)"
                ));
            }
            *f = hex;
        }
        Ok(())
    }
}

pub struct MtlsAuth {
    config: Config,
}

impl MtlsAuth {
    pub fn new(config: Config) -> Self {
        MtlsAuth { config }
    }

    /// Whether `cert` is one this route takes: any, when nothing is listed; else one that
    /// matches a listed subject, SAN or fingerprint.
    pub fn accepts(&self, cert: &ClientCert) -> bool {
        let c = &self.config;
        if c.subjects.is_empty() && c.sans.is_empty() && c.fingerprints.is_empty() {
            return true;
        }
        c.subjects.contains(&cert.subject)
            || c.sans.iter().any(|s| cert.sans.contains(s))
            || c.fingerprints.contains(&cert.fingerprint)
    }
}

#[async_trait]
impl Plugin for MtlsAuth {
    fn kind(&self) -> &'static str {
        "mtls_auth"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    async fn request(&self, _s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let Some(cert) = cx.client_cert.clone() else {
            return Ok(refuse(
                StatusCode::FORBIDDEN,
                "a client certificate is required",
                cx,
                Vec::new(),
            ));
        };
        if !self.accepts(&cert) {
            return Ok(refuse(
                StatusCode::FORBIDDEN,
                "client certificate not allowed here",
                cx,
                Vec::new(),
            ));
        }
        cx.identify("mtls_auth", cert.common_name.as_deref().map(Arc::from));
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> ClientCert {
        ClientCert {
            subject: "CN=billing,O=Acme".into(),
            common_name: Some("billing".into()),
            sans: vec!["spiffe://acme/billing".into()],
            fingerprint: "ab".repeat(32),
        }
    }

    #[test]
    fn lists_are_alternatives_and_empty_takes_any() {
        let any = MtlsAuth::new(Config::default());
        assert!(any.accepts(&cert()));
        let by = |subjects: &[&str], sans: &[&str], fps: &[&str]| {
            let mut c = Config {
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
                fingerprints: fps.iter().map(|s| s.to_string()).collect(),
            };
            c.prepare().unwrap();
            MtlsAuth::new(c)
        };
        assert!(by(&["CN=billing,O=Acme"], &[], &[]).accepts(&cert()));
        assert!(!by(&["CN=billing"], &[], &[]).accepts(&cert()));
        assert!(by(&["CN=x"], &["spiffe://acme/billing"], &[]).accepts(&cert()));
        let colons = vec!["AB"; 32].join(":");
        assert!(by(&[], &[], &[&colons]).accepts(&cert()));
        assert!(!by(&[], &[], &[&"cd".repeat(32)]).accepts(&cert()));
        let mut bad = Config {
            fingerprints: vec!["abc".into()],
            ..Config::default()
        };
        assert!(bad.prepare().is_err());
    }
}
