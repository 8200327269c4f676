//! A gateway's certificates: `tls = { cert, key }` (one pair for every name) or
//! `[[gateways.NAME.certs]]` (pairs chosen by SNI), read and checked at load so `check`, start
//! and reload refuse the same files.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::build::Loader;
use super::file::{GatewayFile, TlsFile};
use super::{Tls, TlsOptions};
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
    /// A DER OCSP response for `cert`, stapled to handshakes that ask for one.
    pub ocsp: Option<Spanned<PathBuf>>,
}

/// `client_auth = { mode = "required" | "optional", ca = "clients-ca.pem" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthFile {
    pub mode: Spanned<String>,
    pub ca: Spanned<PathBuf>,
}

fn client_auth(
    ld: &mut Loader,
    g: &GatewayFile,
    config: &Path,
    ctx: &str,
) -> Option<crate::tls::ClientAuth> {
    let a = g.client_auth.as_ref()?;
    if g.tls.is_none() && g.certs.is_none() {
        ld.err(
            a.span(),
            ctx,
            "`client_auth` is for a TLS gateway (give it `tls` or `certs`)",
        );
        return None;
    }
    let f = a.get_ref();
    let required = match f.mode.get_ref().as_str() {
        "required" => true,
        "optional" => false,
        other => {
            ld.err(
                f.mode.span(),
                ctx,
                format!("client_auth mode \"{other}\": use \"required\" or \"optional\""),
            );
            return None;
        }
    };
    let ca = super::build::relative_to(config, f.ca.get_ref());
    match crate::tls::ClientAuth::load(&ca, required) {
        Ok(auth) => Some(auth),
        Err(why) => {
            ld.err(f.ca.span(), ctx, format!("client_auth ca: {why}"));
            None
        }
    }
}

fn load_pair(
    ld: &mut Loader,
    config: &Path,
    cert: &Spanned<PathBuf>,
    key: &Spanned<PathBuf>,
    ocsp: Option<&Spanned<PathBuf>>,
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
        Ok(mut pair) => {
            if let Some(d) = pair.days_left().filter(|d| *d < 14) {
                ld.warn(
                    cert.span(),
                    ctx,
                    format!("certificate {} expires in {d} days", c.display()),
                );
            }
            if let Some(o) = ocsp {
                let path = super::build::relative_to(config, o.get_ref());
                match pair.set_ocsp(&path) {
                    Ok(None) => {}
                    Ok(Some(warning)) => ld.warn(o.span(), ctx, warning),
                    Err(why) => ld.err(o.span(), ctx, format!("ocsp: {why}")),
                }
            }
            Some(pair)
        }
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
    let options = g
        .tls
        .as_ref()
        .map(|t| options(ld, t, ctx))
        .unwrap_or_default();
    let h2 = g.tls.as_ref().and_then(|t| t.get_ref().h2).unwrap_or(true);
    let auth = client_auth(ld, g, config, ctx);
    let pair_of = |t: &Spanned<TlsFile>| match (&t.get_ref().cert, &t.get_ref().key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ => None,
    };
    match (g.tls.as_ref(), &g.certs) {
        (Some(t), None) => {
            if let Some(s) = &g.unknown_sni {
                ld.err(
                    s.span(),
                    ctx,
                    "`unknown_sni` needs `[[gateways.NAME.certs]]` (one `tls` pair serves every name)",
                );
            }
            let Some((c, k)) = pair_of(t) else {
                ld.err(
                    t.span(),
                    ctx,
                    "`tls` needs `cert` and `key`, or `[[gateways.NAME.certs]]` beside it",
                );
                return None;
            };
            let pair = load_pair(ld, config, &c, &k, t.get_ref().ocsp.as_ref(), ctx)?;
            let mut set = CertSet::single(Arc::new(pair));
            set.client_auth = auth;
            Some(Tls {
                h2,
                certs: Arc::new(set),
                options,
            })
        }
        (Some(t), Some(c))
            if pair_of(t).is_some()
                || t.get_ref().cert.is_some()
                || t.get_ref().key.is_some()
                || t.get_ref().ocsp.is_some() =>
        {
            ld.err(
                c.span(),
                ctx,
                "`tls.cert`/`tls.key`/`tls.ocsp` and `certs` exclude each other: list every pair (and its `ocsp`) under `certs`",
            );
            None
        }
        (_, Some(list)) => {
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
                let Some(pair) = load_pair(ld, config, &f.cert, &f.key, f.ocsp.as_ref(), ctx)
                else {
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
            set.client_auth = auth;
            Some(Tls {
                h2,
                certs: Arc::new(set),
                options,
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

/// The listener options, each tried on a scratch OpenSSL context so a typo is a config error
/// (with its line), not a failed start.
fn options(ld: &mut Loader, t: &Spanned<TlsFile>, ctx: &str) -> TlsOptions {
    use openssl::ssl::{SslAcceptor, SslMethod};
    let f = t.get_ref();
    let Ok(mut scratch) = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()) else {
        return TlsOptions::default();
    };
    let only_13 = match f.min_version.as_ref().map(|v| v.get_ref().as_str()) {
        None | Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            let span = f
                .min_version
                .as_ref()
                .map(Spanned::span)
                .unwrap_or_default();
            ld.err(
                span,
                ctx,
                format!("min_version \"{other}\": use \"1.2\" or \"1.3\""),
            );
            false
        }
    };
    let mut check = |v: &Option<Spanned<String>>, what: &str, ok: &mut dyn FnMut(&str) -> bool| {
        let v = v.as_ref()?;
        if !ok(v.get_ref()) {
            ld.err(
                v.span(),
                ctx,
                format!("{what} \"{}\": OpenSSL knows none of them", v.get_ref()),
            );
        }
        Some(v.get_ref().clone())
    };
    TlsOptions {
        only_13,
        ciphers: check(&f.ciphers, "ciphers", &mut |v| {
            scratch.set_cipher_list(v).is_ok()
        }),
        ciphersuites: check(&f.ciphersuites, "ciphersuites", &mut |v| {
            scratch.set_ciphersuites(v).is_ok()
        }),
        curves: check(&f.curves, "curves", &mut |v| {
            scratch.set_groups_list(v).is_ok()
        }),
    }
}

/// `redirect_https = true | PORT` on a plain gateway.
pub(super) fn redirect_https(
    ld: &mut Loader,
    g: &GatewayFile,
    tls: bool,
    ctx: &str,
) -> Option<Option<u16>> {
    let v = g.redirect_https.as_ref()?;
    let out = match v.get_ref() {
        toml::Value::Boolean(true) => Some(None),
        toml::Value::Boolean(false) => None,
        toml::Value::Integer(p) if (1..=65535).contains(p) => u16::try_from(*p).ok().map(Some),
        _ => {
            ld.err(
                v.span(),
                ctx,
                "`redirect_https` is true or a port number (1 to 65535)",
            );
            None
        }
    };
    if out.is_some() && tls {
        ld.err(
            v.span(),
            ctx,
            "`redirect_https` is for a plain listener; this gateway is TLS",
        );
    }
    out
}

/// `hsts = "max-age=N[; includeSubDomains][; preload]"` on a TLS gateway.
pub(super) fn hsts(
    ld: &mut Loader,
    g: &GatewayFile,
    tls: bool,
    ctx: &str,
) -> Option<http::HeaderValue> {
    let v = g.hsts.as_ref()?;
    if !tls {
        ld.err(
            v.span(),
            ctx,
            "`hsts` is for a TLS gateway (browsers ignore it over plain HTTP)",
        );
        return None;
    }
    let max_age = v
        .get_ref()
        .split(';')
        .map(str::trim)
        .find_map(|d| d.strip_prefix("max-age="))
        .is_some_and(|n| n.parse::<u64>().is_ok());
    match http::HeaderValue::from_str(v.get_ref()) {
        Ok(h) if max_age => Some(h),
        _ => {
            ld.err(
                v.span(),
                ctx,
                "`hsts` is a Strict-Transport-Security value with max-age: \"max-age=63072000; includeSubDomains\"",
            );
            None
        }
    }
}

/// `h2c = true | "only"` on a plain gateway (a TLS one offers h2 by ALPN: `tls.h2`).
pub(super) fn h2c(ld: &mut Loader, g: &GatewayFile, tls: bool, ctx: &str) -> super::H2c {
    use super::file::H2cFile;
    use super::H2c;
    let Some(v) = g.h2c.as_ref() else {
        return H2c::Off;
    };
    let mode = match v.get_ref() {
        H2cFile::Flag(false) => return H2c::Off,
        H2cFile::Flag(true) => H2c::Also,
        H2cFile::Word(w) if w == "only" => H2c::Only,
        H2cFile::Word(w) => {
            ld.err(
                v.span(),
                ctx,
                format!("`h2c` is true, false or \"only\", not \"{w}\""),
            );
            return H2c::Off;
        }
    };
    if tls {
        ld.err(
            v.span(),
            ctx,
            "`h2c` is for a plain listener; over TLS, HTTP/2 is offered by ALPN (`tls.h2`)",
        );
        return H2c::Off;
    }
    mode
}

/// Plugins that read the client certificate (`mtls_auth`, `${tls.*}`) where the gateway asks
/// for none: each is a warning at its reference (`[server] plugins`, the gateway's, a route's
/// line), as nothing else would tell the user why every request gets a 403.
pub(super) fn client_cert_readers(
    ld: &mut Loader,
    server_refs: &[Spanned<String>],
    gateways: &[(&[Spanned<String>], bool)], // (its plugin references, exempt)
    names: &std::collections::HashMap<String, Option<usize>>,
    plugins: &[super::NamedPlugin],
    all: &[super::Gateway],
) {
    for (g, (refs, exempt)) in all.iter().zip(gateways) {
        if *exempt {
            continue;
        }
        let ctx = format!("gateway \"{}\"", g.name);
        for r in server_refs.iter().chain(refs.iter()) {
            let Some(Some(i)) = names.get(r.get_ref()) else {
                continue;
            };
            if let Some(what) = plugins[*i].config.without_client_cert() {
                let msg = format!(
                    "plugin \"{}\" reads the client certificate, but this gateway has no \
                     `client_auth`: it {what}",
                    r.get_ref()
                );
                ld.warn(r.span(), &ctx, msg);
            }
        }
        for route in &g.routes {
            for &i in &route.plugins {
                if let Some(what) = plugins[i].config.without_client_cert() {
                    ld.warnings.push(super::ConfigError {
                        line: route.line,
                        col: 1,
                        context: format!("route \"{}\"", route.name),
                        message: format!(
                            "plugin \"{}\" reads the client certificate, but gateway \"{}\" \
                             has no `client_auth`: it {what}",
                            plugins[i].name, g.name
                        ),
                    });
                }
            }
        }
    }
}
