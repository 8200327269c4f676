//! `[[routes]]` → [`Route`]: matchers, target (upstream or split), mirror, rewrite, plugins.
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;
use toml::Spanned;

use super::build::{plugin_refs, Loader};
use super::file::RouteFile;
use super::upstreams::parse_hash_key;
use super::*;

pub(super) struct Refs<'r> {
    /// `[server] max_aggregate_parts`.
    pub(super) max_parts: usize,
    pub(super) upstreams: &'r HashMap<String, Option<usize>>,
    pub(super) plugins: &'r HashMap<String, Option<usize>>,
    pub(super) gateways: &'r HashMap<String, Option<usize>>,
    /// The config file: relative paths in it are taken from its folder.
    pub(super) config: &'r std::path::Path,
}

/// Validates one route; returns its gateway's name and index (`None` when that gateway is
/// itself broken, which was reported there) and the route.
pub(super) fn route(
    ld: &mut Loader,
    r: RouteFile,
    name: String,
    line: usize,
    span: Range<usize>,
    refs: &Refs,
    ctx: &str,
) -> Option<(String, Option<usize>, Route)> {
    let errors_before = ld.errors.len();

    let mut gateway_name = String::new();
    let gateway = match &r.gateway {
        Some(g) => match refs.gateways.get(g.get_ref()) {
            Some(i) => {
                gateway_name = g.get_ref().clone();
                *i
            }
            None => {
                ld.err(
                    g.span(),
                    ctx,
                    format!("unknown gateway \"{}\"", g.get_ref()),
                );
                None
            }
        },
        None if refs.gateways.len() == 1 => {
            let (name, i) = refs.gateways.iter().next()?;
            gateway_name = name.clone();
            *i
        }
        None => {
            if !refs.gateways.is_empty() {
                let mut names: Vec<_> = refs.gateways.keys().map(String::as_str).collect();
                names.sort_unstable();
                ld.err(
                    span.clone(),
                    ctx,
                    format!(
                        "`gateway` is required when there are several gateways ({})",
                        names.join(", ")
                    ),
                );
            }
            None
        }
    };

    let host = match &r.host {
        None => HostMatch::Any,
        Some(h) => match parse_host(h.get_ref()) {
            Ok(m) => m,
            Err(e) => {
                ld.err(h.span(), ctx, e);
                HostMatch::Any
            }
        },
    };

    let path = match &r.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => match parse_path(p.get_ref()) {
            Ok(m) => m,
            Err(e) => {
                ld.err(p.span(), ctx, e);
                PathMatch::Prefix("/".into())
            }
        },
    };

    let methods = r.methods.as_ref().map(|ms| {
        if ms.get_ref().is_empty() {
            ld.err(
                ms.span(),
                ctx,
                "`methods` is empty: leave it out to match any method",
            );
        }
        let mut out = Vec::new();
        for m in ms.get_ref() {
            let s = m.get_ref();
            match Method::from_bytes(s.as_bytes()) {
                Ok(method) if s.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') => {
                    if !out.contains(&method) {
                        out.push(method);
                    }
                }
                _ => ld.err(
                    m.span(),
                    ctx,
                    format!("invalid method \"{s}\" (write it in upper case, e.g. \"GET\")"),
                ),
            }
        }
        out
    });

    let mut headers = Vec::new();
    for (k, v) in &r.headers {
        let Ok(name) = HeaderName::from_bytes(k.get_ref().as_bytes()) else {
            ld.err(
                k.span(),
                ctx,
                format!("invalid header name \"{}\"", k.get_ref()),
            );
            continue;
        };
        let m = if let Some(re) = v.get_ref().strip_prefix("~ ") {
            match Regex::new(re.trim()) {
                Ok(re) => ValueMatch::Regex(re),
                Err(e) => {
                    ld.err(
                        v.span(),
                        ctx,
                        format!("invalid regex for header {name}: {e}"),
                    );
                    continue;
                }
            }
        } else {
            match HeaderValue::from_str(v.get_ref()) {
                Ok(hv) => ValueMatch::Exact(hv),
                Err(_) => {
                    ld.err(v.span(), ctx, format!("invalid value for header {name}"));
                    continue;
                }
            }
        };
        headers.push((name, m));
    }

    let target = target(ld, &r, &span, &path, refs, ctx);
    let mirror = r.mirror.as_ref().map(|m| {
        let mspan = m.span();
        let m = m.get_ref();
        let percent = m.percent.as_ref().map_or(100.0, |p| *p.get_ref());
        if !(0.0..=100.0).contains(&percent) {
            let s = m.percent.as_ref().map_or(mspan.clone(), |p| p.span());
            ld.err(s, ctx, "mirror `percent` must be from 0 to 100");
        }
        let max_in_flight = m.max_in_flight.as_ref().map_or(64, |n| *n.get_ref());
        if max_in_flight == 0 {
            let s = m.max_in_flight.as_ref().map_or(mspan.clone(), |n| n.span());
            ld.err(s, ctx, "mirror `max_in_flight` must be at least 1");
        }
        Mirror {
            upstream: upstream_ref(ld, &m.upstream, refs, ctx).unwrap_or(usize::MAX),
            percent,
            max_body: m.max_body.map_or(64 * 1024, |s| s.0 as usize),
            max_in_flight,
            keep_credentials: m.keep_credentials,
        }
    });

    let strip = r.strip_prefix.as_ref().is_some_and(|s| *s.get_ref());
    let rewrite = match (&path, strip, &r.rewrite) {
        (_, true, Some(rw)) => {
            ld.err(
                rw.span(),
                ctx,
                "`strip_prefix` and `rewrite` exclude each other: `rewrite` already replaces the prefix",
            );
            Rewrite::Keep
        }
        (PathMatch::Prefix(_), true, None) => Rewrite::StripPrefix,
        (_, true, None) => {
            let s = r.strip_prefix.as_ref().map_or(span.clone(), |s| s.span());
            ld.err(s, ctx, "`strip_prefix` only applies to prefix paths");
            Rewrite::Keep
        }
        (PathMatch::Regex(_), false, Some(rw)) => Rewrite::Template(rw.get_ref().clone()),
        (_, false, Some(rw)) => {
            if !rw.get_ref().starts_with('/') || rw.get_ref().contains(['?', '#', ' ']) {
                ld.err(
                    rw.span(),
                    ctx,
                    format!(
                        "`rewrite` must be a path starting with '/', got \"{}\"",
                        rw.get_ref()
                    ),
                );
            } else if let Some(c) = not_canonical(rw.get_ref()) {
                ld.err(
                    rw.span(),
                    ctx,
                    format!(
                        "`rewrite` \"{}\" is not a canonical path: write \"{c}\"",
                        rw.get_ref()
                    ),
                );
            }
            Rewrite::Replace(rw.get_ref().clone())
        }
        (_, false, None) => Rewrite::Keep,
    };

    let plugins = plugin_refs(ld, &r.plugins, refs.plugins, ctx);
    let compression = r
        .compression
        .as_ref()
        .and_then(|c| super::offload::compression(ld, c, ctx));
    let cache = r.cache.as_ref().and_then(|c| {
        if r.static_files.is_some() {
            ld.err(
                c.span(),
                ctx,
                "`cache` applies to proxied routes; a `static` route's files are served as they are",
            );
            return None;
        }
        super::offload::cache(ld, c, ctx)
    });

    let request_buffering = match &r.request_buffering {
        None => super::REQUEST_BUFFERING_MAX,
        Some(v) if v.get_ref().0 > super::REQUEST_BUFFERING_MAX as u64 => {
            ld.err(
                v.span(),
                ctx,
                "`request_buffering` is at most \"64KiB\" (what Pingora keeps of a body to send it again); larger bodies stream",
            );
            0
        }
        Some(v) => v.get_ref().0 as usize,
    };

    if ld.errors.len() > errors_before {
        return None;
    }
    // An aggregate answers reads unless told otherwise: a POST must not fan out by accident.
    let methods = match (&target, methods) {
        (Target::Aggregate(_), None) => Some(vec![Method::GET, Method::HEAD]),
        (_, m) => m,
    };
    Some((
        gateway_name,
        gateway,
        Route {
            name,
            line,
            host,
            path,
            methods,
            headers,
            priority: r.priority.unwrap_or(0),
            target,
            mirror,
            rewrite,
            preserve_host: r.preserve_host,
            access_log: r.access_log,
            plugins,
            compression,
            cache,
            request_buffering,
        },
    ))
}

fn parse_host(h: &str) -> Result<HostMatch, String> {
    let lower = h.to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let ok = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        return Err(format!(
            "invalid host \"{h}\" (write a name like \"api.example.com\" or \"*.example.com\", no port)"
        ));
    }
    Ok(if wild {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_string())
    })
}

fn parse_path(p: &str) -> Result<PathMatch, String> {
    if let Some(re) = p.strip_prefix('~') {
        let re = re.trim();
        return Regex::new(re)
            .map(PathMatch::Regex)
            .map_err(|e| format!("invalid path regex \"{re}\": {}", regex_reason(&e)));
    }
    let (exact, path) = match p.strip_prefix('=') {
        Some(rest) => (true, rest.trim()),
        None => (false, p),
    };
    if !path.starts_with('/') || path.contains(['?', '#', ' ', '\t']) {
        return Err(format!(
            "invalid path \"{p}\": write \"/prefix\", \"= /exact\" or \"~ ^/regex$\""
        ));
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("invalid path \"{p}\": no '.' or '..' segments"));
    }
    not_canonical(path).map_or(Ok(()), |c| {
        Err(format!(
            "path \"{path}\" is matched against canonical request paths and would never match: \
             write \"{c}\""
        ))
    })?;
    Ok(if exact {
        PathMatch::Exact(path.to_string())
    } else {
        let trimmed = path.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    })
}

/// The canonical form of a configured path, when it differs (`/api//v1`, `/caf%c3%a9`).
fn not_canonical(path: &str) -> Option<String> {
    let lenient = crate::path::Options {
        keep_encoded_slashes: true,
        keep_path_parameters: true,
    };
    match crate::path::canonical_path(path.as_bytes(), lenient) {
        Ok(c) if c == path => None,
        Ok(c) => Some(c.into_owned()),
        Err(r) => Some(format!("a path without {}", r.reason)),
    }
}

/// The one line of a regex error that says what is wrong (its Display spans several).
fn regex_reason(e: &regex::Error) -> String {
    let s = e.to_string();
    s.lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(s.lines().last().unwrap_or(""))
        .to_string()
}

/// Two routes with equal keys match exactly the same requests.
pub(super) fn route_key(r: &Route) -> String {
    let host = match &r.host {
        HostMatch::Any => String::new(),
        HostMatch::Exact(h) => h.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
    };
    let path = match &r.path {
        PathMatch::Prefix(p) => format!("prefix {p}"),
        PathMatch::Exact(p) => format!("exact {p}"),
        PathMatch::Regex(re) => format!("regex {}", re.as_str()),
    };
    let mut methods: Vec<_> = r
        .methods
        .iter()
        .flatten()
        .map(|m| m.as_str().to_string())
        .collect();
    methods.sort_unstable();
    let mut headers: Vec<String> = r
        .headers
        .iter()
        .map(|(n, m)| match m {
            ValueMatch::Exact(v) => format!("{n}={}", String::from_utf8_lossy(v.as_bytes())),
            ValueMatch::Regex(re) => format!("{n}~{}", re.as_str()),
        })
        .collect();
    headers.sort_unstable();
    let uniq: HashSet<_> = headers.iter().collect();
    debug_assert_eq!(uniq.len(), headers.len());
    format!(
        "{host}\u{0}{path}\u{0}{}\u{0}{}\u{0}{}",
        methods.join(","),
        headers.join("\u{1}"),
        r.priority
    )
}

/// A reference to an upstream by name; `None` when unknown (reported) or broken (reported at
/// its definition).
fn upstream_ref(ld: &mut Loader, name: &Spanned<String>, refs: &Refs, ctx: &str) -> Option<usize> {
    match refs.upstreams.get(name.get_ref()) {
        Some(i) => *i,
        None => {
            ld.err(
                name.span(),
                ctx,
                format!(
                    "unknown upstream \"{}\" (define it as [upstreams.{}])",
                    name.get_ref(),
                    name.get_ref()
                ),
            );
            None
        }
    }
}

/// Exactly one of `upstream` and `split`.
fn target(
    ld: &mut Loader,
    r: &RouteFile,
    span: &Range<usize>,
    path: &PathMatch,
    refs: &Refs,
    ctx: &str,
) -> Target {
    // A broken upstream was reported where it is defined; the config is refused anyway, so
    // its index is never used.
    let broken = usize::MAX;
    if let Some(s) = &r.sticky {
        if r.split.is_none() {
            ld.err(s.span(), ctx, "`sticky` only applies with `split`");
        }
    }
    if let Some(a) = &r.aggregate {
        super::aggregate::exclusions(ld, r, ctx);
        return match super::aggregate::aggregate(ld, a, path, refs, ctx) {
            Some(a) => Target::Aggregate(std::sync::Arc::new(a)),
            None => Target::Upstream(broken),
        };
    }
    if let Some(st) = &r.static_files {
        if let Some(u) = &r.upstream {
            ld.err(u.span(), ctx, "`upstream` and `static` exclude each other");
        }
        if let Some(s) = &r.split {
            ld.err(s.span(), ctx, "`split` and `static` exclude each other");
        }
        if let Some(m) = &r.mirror {
            ld.err(
                m.span(),
                ctx,
                "`mirror` needs an upstream route, not a `static` one",
            );
        }
        if let Some(rw) = &r.rewrite {
            ld.err(
                rw.span(),
                ctx,
                "`rewrite` does not apply to `static` routes (use `strip_prefix` for nginx's alias)",
            );
        }
        return match super::offload::static_site(ld, st, refs.config, ctx) {
            Some(s) => Target::Static(s),
            None => Target::Upstream(broken),
        };
    }
    match (&r.upstream, &r.split) {
        (Some(u), None) => Target::Upstream(upstream_ref(ld, u, refs, ctx).unwrap_or(broken)),
        (None, Some(split)) => {
            if split.get_ref().len() < 2 {
                ld.err(split.span(), ctx, "`split` needs at least two upstreams");
            }
            let mut arms = Vec::new();
            for arm in split.get_ref() {
                let w = *arm.weight.get_ref();
                if w == 0 || w > 10_000 {
                    ld.err(
                        arm.weight.span(),
                        ctx,
                        "split weight must be from 1 to 10000",
                    );
                }
                arms.push((
                    upstream_ref(ld, &arm.upstream, refs, ctx).unwrap_or(broken),
                    w,
                ));
            }
            let sticky = r
                .sticky
                .as_ref()
                .and_then(|s| match parse_hash_key(s.get_ref()) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        ld.err(s.span(), ctx, e);
                        None
                    }
                });
            Target::Split { arms, sticky }
        }
        (Some(u), Some(_)) => {
            ld.err(u.span(), ctx, "`upstream` and `split` exclude each other");
            Target::Upstream(broken)
        }
        (None, None) => {
            ld.err(
                span.clone(),
                ctx,
                "a route needs a target: set `upstream`, `split`, `static` or `aggregate`",
            );
            Target::Upstream(broken)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_hosts() {
        assert!(matches!(parse_path("/a/b/").unwrap(), PathMatch::Prefix(p) if p == "/a/b"));
        assert!(matches!(parse_path("= /a").unwrap(), PathMatch::Exact(p) if p == "/a"));
        assert!(matches!(
            parse_path("~ ^/a/(\\d+)$").unwrap(),
            PathMatch::Regex(_)
        ));
        assert!(parse_path("a").is_err());
        assert!(parse_path("/a/../b").is_err());
        assert_eq!(
            parse_host("*.Example.com").unwrap(),
            HostMatch::Suffix(".example.com".into())
        );
        assert!(parse_host("a.com:80").is_err());
        assert!(parse_host("*.").is_err());
    }
}
