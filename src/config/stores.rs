//! `[stores.NAME]`: shared stores (Redis), and the `store = "NAME"` references plugins make.
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::build::Loader;
use super::values::Dur;
use crate::stores::{Settings, Target};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreFile {
    url: Option<Spanned<String>>,
    cluster: Option<Spanned<Vec<String>>>,
    sentinel: Option<Spanned<SentinelFile>>,
    pool_size: Option<Spanned<usize>>,
    timeout: Option<Spanned<Dur>>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SentinelFile {
    master: String,
    nodes: Vec<String>,
    /// What the master wants (the Sentinels' own credentials go in their URLs).
    username: Option<String>,
    password: Option<String>,
}

/// The validated settings of one `[stores.NAME]`, or `None` (its errors recorded).
pub(super) fn store(
    ld: &mut Loader,
    name: &str,
    f: StoreFile,
    span: Range<usize>,
) -> Option<Settings> {
    let ctx = format!("store \"{name}\"");
    // `at`: where a bad URL is reported.
    let (target, at) = match (f.url, f.cluster, f.sentinel) {
        (Some(u), None, None) => (Target::Single(u.get_ref().clone()), u.span()),
        (None, Some(c), None) => {
            if c.get_ref().is_empty() {
                ld.err(c.span(), &ctx, "`cluster` needs at least one node URL");
                return None;
            }
            (Target::Cluster(c.get_ref().clone()), c.span())
        }
        (None, None, Some(s)) => {
            let s_span = s.span();
            let s = s.into_inner();
            if s.nodes.is_empty() || s.master.is_empty() {
                ld.err(
                    s_span,
                    &ctx,
                    "`sentinel` needs `master` (the name the Sentinels monitor) and at least one node",
                );
                return None;
            }
            (
                Target::Sentinel {
                    master: s.master,
                    nodes: s.nodes,
                    auth: s.password.map(|p| (s.username, p)),
                },
                s_span,
            )
        }
        (None, None, None) => {
            ld.err(
                span,
                &ctx,
                "set one of `url`, `cluster = [...]` or `sentinel = { master, nodes }`",
            );
            return None;
        }
        _ => {
            ld.err(
                span,
                &ctx,
                "set only one of `url`, `cluster` and `sentinel`",
            );
            return None;
        }
    };
    let timeout = match f.timeout {
        None => Duration::from_millis(50),
        Some(t) if t.get_ref().0.is_zero() => {
            ld.err(t.span(), &ctx, "`timeout` must be more than 0");
            return None;
        }
        Some(t) => t.into_inner().0,
    };
    let pool_size = match f.pool_size {
        None => 4,
        Some(p) if *p.get_ref() == 0 || *p.get_ref() > 64 => {
            ld.err(p.span(), &ctx, "`pool_size` must be between 1 and 64");
            return None;
        }
        Some(p) => p.into_inner(),
    };
    if f.prefix.as_deref().is_some_and(|p| p.contains(['{', '}'])) {
        ld.err(
            span,
            &ctx,
            "`prefix` must not hold `{` or `}`: Redis Cluster would read them as a hash tag",
        );
        return None;
    }
    let s = Settings {
        name: name.to_string(),
        target,
        pool_size,
        timeout,
        prefix: f.prefix.unwrap_or_else(|| "gatehouse:".into()),
    };
    if let Err(e) = s.validate() {
        ld.err(at, &ctx, e);
        return None;
    }
    Some(s)
}

/// Every plugin's `store = "NAME"` names a store of the file.
pub(super) fn check_refs(
    ld: &mut Loader,
    refs: &[(String, Spanned<String>)],
    known: &HashMap<String, bool>,
) {
    for (plugin, r) in refs {
        if !known.contains_key(r.get_ref()) {
            let mut names: Vec<&str> = known.keys().map(String::as_str).collect();
            names.sort_unstable();
            let have = if names.is_empty() {
                "the file has no [stores.NAME] section".to_string()
            } else {
                format!("stores: {}", names.join(", "))
            };
            ld.err(
                r.span(),
                &format!("plugin \"{plugin}\""),
                format!("unknown store \"{}\" ({have})", r.get_ref()),
            );
        }
    }
}

/// `[server] node_name`: this replica's name in the fleet (purge acknowledgements, the fleet
/// view); by default the host name, which differs between VMs sharing one config file.
pub(super) fn node_name(ld: &mut Loader, f: &super::file::ServerFile) -> String {
    match &f.node_name {
        Some(n) => {
            let v = n.get_ref().trim();
            if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                ld.err(
                    n.span(),
                    "[server]",
                    "`node_name` must be 1 to 64 printable characters without spaces",
                );
            }
            v.to_string()
        }
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gatehouse".into()),
    }
}

/// `[server] fleet_store` (a store of the file) and `purge_deadline` (default 1 s).
pub(super) fn fleet(
    ld: &mut Loader,
    f: &super::file::ServerFile,
    known: &HashMap<String, bool>,
) -> (Option<String>, Duration) {
    let store = f.fleet_store.as_ref().and_then(|s| {
        if known.contains_key(s.get_ref()) {
            Some(s.get_ref().clone())
        } else {
            ld.err(
                s.span(),
                "[server]",
                format!("`fleet_store`: unknown store \"{}\"", s.get_ref()),
            );
            None
        }
    });
    let deadline = match &f.purge_deadline {
        None => Duration::from_secs(1),
        Some(d) if d.get_ref().0.is_zero() || d.get_ref().0 > Duration::from_secs(30) => {
            ld.err(
                d.span(),
                "[server]",
                "`purge_deadline` must be more than 0 and at most 30s",
            );
            Duration::from_secs(1)
        }
        Some(d) => d.get_ref().0,
    };
    if f.purge_deadline.is_some() && f.fleet_store.is_none() {
        if let Some(d) = &f.purge_deadline {
            ld.warn(
                d.span(),
                "[server]",
                "`purge_deadline` has no effect without `fleet_store`",
            );
        }
    }
    (store, deadline)
}
