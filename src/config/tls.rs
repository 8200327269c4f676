//! A gateway's certificates: `tls = { cert, key }` (one pair for every name) or
//! `[[gateways.NAME.certs]]` (pairs chosen by SNI), read and checked at load so `check`, start
//! and reload refuse the same files.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::build::Loader;
use super::file::GatewayFile;
use super::Tls;
use crate::tls::{CertPair, CertSet};

/// One `[[gateways.NAME.certs]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
    /// The names it serves; absent: the certificate's DNS names (SANs, else its CN).
    pub names: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub default: bool,
}

fn load_pair(
    ld: &mut Loader,
    config: &Path,
    cert: &Spanned<PathBuf>,
    key: &Spanned<PathBuf>,
    ctx: &str,
) -> Option<CertPair> {
    let (c, k) = (
        super::build::relative_to(config, cert.get_ref()),
        super::build::relative_to(config, key.get_ref()),
    );
    let mut found = true;
    for (f, p) in [(cert, &c), (key, &k)] {
        if !p.is_file() {
            ld.err(f.span(), ctx, format!("TLS file {} not found", p.display()));
            found = false;
        }
    }
    if !found {
        return None;
    }
    match CertPair::load(&c, &k) {
        Ok(pair) => Some(pair),
        Err(why) => {
            ld.err(cert.span(), ctx, format!("TLS: {why}"));
            None
        }
    }
}

/// The gateway's TLS, or `None` for a plain listener.
pub(super) fn gateway_tls(
    ld: &mut Loader,
    g: &GatewayFile,
    config: &Path,
    ctx: &str,
) -> Option<Tls> {
    let refuse = match g.unknown_sni.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("default") => false,
        Some("refuse") => true,
        Some(other) => {
            let span = g
                .unknown_sni
                .as_ref()
                .map(Spanned::span)
                .unwrap_or_default();
            ld.err(
                span,
                ctx,
                format!("unknown_sni \"{other}\": use \"default\" or \"refuse\""),
            );
            false
        }
    };
    match (&g.tls, &g.certs) {
        (Some(t), None) => {
            if let Some(s) = &g.unknown_sni {
                ld.err(
                    s.span(),
                    ctx,
                    "`unknown_sni` needs `[[gateways.NAME.certs]]` (one `tls` pair serves every name)",
                );
            }
            let pair = load_pair(ld, config, &t.cert, &t.key, ctx)?;
            Some(Tls {
                h2: t.h2.unwrap_or(true),
                certs: Arc::new(CertSet::single(Arc::new(pair))),
            })
        }
        (Some(_), Some(c)) => {
            ld.err(
                c.span(),
                ctx,
                "`tls` and `certs` exclude each other: list every pair under `certs`",
            );
            None
        }
        (None, Some(list)) => {
            if list.get_ref().is_empty() {
                ld.err(list.span(), ctx, "`certs` needs at least one entry");
                return None;
            }
            let defaults = list
                .get_ref()
                .iter()
                .filter(|c| c.get_ref().default)
                .count();
            if defaults > 1 {
                ld.err(
                    list.span(),
                    ctx,
                    "only one of `certs` may be `default = true`",
                );
            }
            let mut set = CertSet::default();
            let mut default_at = 0;
            for (i, c) in list.get_ref().iter().enumerate() {
                let f = c.get_ref();
                let Some(pair) = load_pair(ld, config, &f.cert, &f.key, ctx) else {
                    continue;
                };
                let names: Vec<String> = match &f.names {
                    Some(n) => n.iter().map(|s| s.get_ref().clone()).collect(),
                    None => pair.dns_names(),
                };
                if names.is_empty() {
                    ld.err(
                        c.span(),
                        ctx,
                        "the certificate names no DNS name: give it `names`",
                    );
                }
                if f.default {
                    default_at = i;
                }
                let pair = Arc::new(pair);
                for n in &names {
                    if let Err(why) = set.add(n, pair.clone(), i) {
                        ld.err(c.span(), ctx, why);
                    }
                }
            }
            set.finish(if refuse { None } else { Some(default_at) });
            Some(Tls {
                h2: true,
                certs: Arc::new(set),
            })
        }
        (None, None) => {
            if let Some(s) = &g.unknown_sni {
                ld.err(s.span(), ctx, "`unknown_sni` needs `certs`");
            }
            None
        }
    }
}
