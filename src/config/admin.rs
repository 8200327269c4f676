//! `[server]` settings of the admin listener (its bearer token, from the file or inline, and
//! what it guards) and of the logs.
use std::path::Path;

use super::build::{relative_to, Loader};
use super::file::ServerFile;

/// `admin_token` or `admin_token_file` (read now, so a missing file fails `check`). Short
/// tokens are refused: the token guards purges of every cached response.
pub(super) fn admin_token(
    ld: &mut Loader,
    f: &ServerFile,
    config: &Path,
) -> Option<std::sync::Arc<str>> {
    let (token, span) = match (&f.admin_token, &f.admin_token_file) {
        (None, None) => return None,
        (Some(t), Some(_)) => {
            ld.err(
                t.span(),
                "[server]",
                "`admin_token` and `admin_token_file` exclude each other",
            );
            return None;
        }
        (Some(t), None) => (t.get_ref().trim().to_string(), t.span()),
        (None, Some(p)) => {
            let file = relative_to(config, p.get_ref());
            match std::fs::read_to_string(&file) {
                Ok(s) => (s.trim().to_string(), p.span()),
                Err(e) => {
                    ld.err(
                        p.span(),
                        "[server]",
                        format!("admin_token_file {}: {e}", file.display()),
                    );
                    return None;
                }
            }
        }
    };
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        ld.err(
            span,
            "[server]",
            "the admin token must be at least 16 visible ASCII characters",
        );
        return None;
    }
    if gatehouse_plugins::config::placeholder_secret(&token) {
        ld.warn(
            span,
            "[server]",
            "the admin token is a published or placeholder value: choose your own",
        );
    }
    Some(token.into())
}

/// `admin_auth`: `"mutations"` (the default: purge and reload need the token) or `"all"`
/// (every endpoint but the page shell and /healthz does), which needs a token.
pub(super) fn admin_auth_all(ld: &mut Loader, f: &ServerFile, has_token: bool) -> bool {
    let Some(a) = &f.admin_auth else {
        return false;
    };
    match a.get_ref().as_str() {
        "mutations" => false,
        "all" => {
            if !has_token && f.admin_token.is_none() && f.admin_token_file.is_none() {
                ld.err(
                    a.span(),
                    "[server]",
                    "`admin_auth = \"all\"` needs `admin_token` or `admin_token_file`",
                );
            }
            true
        }
        other => {
            ld.err(
                a.span(),
                "[server]",
                format!("`admin_auth` is \"mutations\" or \"all\", not \"{other}\""),
            );
            false
        }
    }
}

/// `access_log = { path, format, redact_query }`: `path = "-"` is stdout; the format is
/// `json` (default) or nginx's `combined` with Gatehouse's fields after it.
pub(super) fn access_log(
    ld: &mut Loader,
    f: &ServerFile,
    config: &Path,
) -> Option<crate::access_log::Settings> {
    use crate::access_log::{Format, Settings};
    let a = f.access_log.as_ref()?;
    let format = match a.get_ref().format.as_ref() {
        None => Format::Json,
        Some(s) => match s.get_ref().as_str() {
            "json" => Format::Json,
            "combined" => Format::Combined,
            other => {
                ld.err(
                    s.span(),
                    "[server]",
                    format!("access_log format is \"json\" or \"combined\", not \"{other}\""),
                );
                Format::Json
            }
        },
    };
    let p = &a.get_ref().path;
    let path = (p.as_os_str() != "-").then(|| relative_to(config, p));
    if let Some(file) = &path {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            ld.err(
                a.span(),
                "[server]",
                format!(
                    "access_log: the folder of {} does not exist",
                    file.display()
                ),
            );
        }
    }
    Some(Settings {
        path,
        format,
        redact_query: a.get_ref().redact_query.clone(),
    })
}

/// `log_format`: `"text"` (default) or `"json"`.
pub(super) fn log_json(ld: &mut Loader, f: &ServerFile) -> bool {
    let Some(v) = &f.log_format else {
        return false;
    };
    match v.get_ref().as_str() {
        "text" => false,
        "json" => true,
        other => {
            ld.err(
                v.span(),
                "[server]",
                format!("`log_format` is \"text\" or \"json\", not \"{other}\""),
            );
            false
        }
    }
}

/// `tracing = { otlp_endpoint, sample, service_name, export_interval }`. The endpoint is the
/// full OTLP/HTTP traces URL; plain `http://` (a collector on the machine or the network;
/// TLS to the collector is the collector's business).
pub(super) fn tracing(ld: &mut Loader, f: &ServerFile) -> Option<crate::trace::Settings> {
    let t = f.tracing.as_ref()?.get_ref();
    let e = &t.otlp_endpoint;
    let ok = e
        .get_ref()
        .parse::<http::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
    if !ok {
        ld.err(
            e.span(),
            "[server] tracing",
            "otlp_endpoint must be an http:// URL such as \"http://127.0.0.1:4318/v1/traces\" \
             (https is not supported: send to a local OpenTelemetry Collector)",
        );
    }
    let sample = match &t.sample {
        None => 0.1,
        Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => {
            ld.err(
                s.span(),
                "[server] tracing",
                "sample is a share, from 0 to 1",
            );
            0.1
        }
    };
    let export_interval = match &t.export_interval {
        None => std::time::Duration::from_secs(5),
        Some(d) if d.get_ref().0 >= std::time::Duration::from_millis(100) => d.get_ref().0,
        Some(d) => {
            ld.err(
                d.span(),
                "[server] tracing",
                "export_interval is at least 100ms",
            );
            std::time::Duration::from_secs(5)
        }
    };
    Some(crate::trace::Settings {
        endpoint: e.get_ref().clone(),
        sample,
        service_name: t.service_name.clone().unwrap_or_else(|| "gatehouse".into()),
        export_interval,
    })
}
