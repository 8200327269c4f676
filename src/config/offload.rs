//! Route offloads that answer or transform responses in the gateway: `compression` (and,
//! later in this file, `cache` and `static`). Each is read from its file form into a typed,
//! shared value at load, so the request path only follows an `Arc`.
use std::ops::Range;
use std::sync::Arc;

use toml::Spanned;

use super::build::{relative_to, Loader};
use super::file::{CacheFile, CompressionFile, StaticFile};
use crate::cache::policy::CacheRoute;
use crate::compress::{Coding, Compression, TypeMatch};

const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
];

pub(super) fn compression(
    ld: &mut Loader,
    c: &Spanned<CompressionFile>,
    ctx: &str,
) -> Option<Arc<Compression>> {
    let span: Range<usize> = c.span();
    let c = c.get_ref();
    let before = ld.errors.len();
    let mut algorithms = Vec::new();
    match &c.algorithms {
        Some(list) if list.is_empty() => ld.err(
            span.clone(),
            ctx,
            "`compression` lists no encoding: leave it out to send responses as they are",
        ),
        Some(list) => {
            for a in list {
                let coding = match a.get_ref().as_str() {
                    "zstd" => Coding::Zstd,
                    "br" => Coding::Br,
                    "gzip" => Coding::Gzip,
                    other => {
                        ld.err(
                            a.span(),
                            ctx,
                            format!(
                                "unknown encoding \"{other}\": expected \"zstd\", \"br\" or \"gzip\""
                            ),
                        );
                        continue;
                    }
                };
                if algorithms.iter().any(|(c, _)| *c == coding) {
                    ld.err(
                        a.span(),
                        ctx,
                        format!("encoding \"{}\" listed twice", coding.as_str()),
                    );
                    continue;
                }
                algorithms.push((coding, coding.default_level()));
            }
        }
        None => {
            algorithms = [Coding::Zstd, Coding::Br, Coding::Gzip]
                .into_iter()
                .map(|c| (c, c.default_level()))
                .collect()
        }
    }
    if let Some(level) = &c.level {
        let l = level.get_ref();
        for (coding, chosen) in algorithms.iter_mut() {
            let set = match coding {
                Coding::Zstd => l.zstd,
                Coding::Br => l.br,
                Coding::Gzip => l.gzip,
            }
            .or(l.all);
            let Some(n) = set else { continue };
            let range = coding.levels();
            if range.contains(&n) {
                *chosen = n as u32;
            } else {
                ld.err(
                    level.span(),
                    ctx,
                    format!(
                        "{} level {n} is out of range ({} to {})",
                        coding.as_str(),
                        range.start(),
                        range.end()
                    ),
                );
            }
        }
    }
    let types = match &c.types {
        None => DEFAULT_TYPES.iter().map(|t| type_match(t)).collect(),
        Some(list) => {
            let mut out = Vec::new();
            for t in list {
                let s = t.get_ref().trim().to_ascii_lowercase();
                let ok = s.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && !a.contains('*')
                        && (b == "*" || !b.contains('*'))
                        && !s.contains([';', ' ', ','])
                });
                if ok {
                    out.push(type_match(&s));
                } else {
                    ld.err(
                        t.span(),
                        ctx,
                        format!(
                            "invalid media type \"{}\" (write e.g. \"application/json\" or \"text/*\")",
                            t.get_ref()
                        ),
                    );
                }
            }
            out
        }
    };
    if ld.errors.len() > before {
        return None;
    }
    Some(Arc::new(Compression {
        algorithms,
        min_size: c.min_size.map_or(1024, |s| s.0),
        types,
    }))
}

fn type_match(t: &str) -> TypeMatch {
    match t.strip_suffix('*') {
        Some(prefix) => TypeMatch::Prefix(prefix.to_string()),
        None => TypeMatch::Exact(t.to_string()),
    }
}

pub(super) fn cache(ld: &mut Loader, c: &Spanned<CacheFile>, ctx: &str) -> Option<Arc<CacheRoute>> {
    let f = c.get_ref();
    let before = ld.errors.len();
    let header = |ld: &mut Loader, v: &Option<Spanned<String>>, default: &'static str| match v {
        None => Some(http::HeaderName::from_static(default)),
        Some(s) if s.get_ref().is_empty() => None,
        Some(s) => match http::HeaderName::from_bytes(s.get_ref().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                ld.err(
                    s.span(),
                    ctx,
                    format!("invalid header name \"{}\"", s.get_ref()),
                );
                None
            }
        },
    };
    let tag_header = header(ld, &f.tag_header, "surrogate-key");
    if f.tag_header
        .as_ref()
        .is_some_and(|t| t.get_ref().is_empty())
    {
        if let Some(t) = &f.tag_header {
            ld.err(t.span(), ctx, "`tag_header` cannot be empty");
        }
    }
    let status_header = header(ld, &f.status_header, "x-cache-status");
    let targeted_cache_control = header(ld, &f.targeted_cache_control, "cdn-cache-control");
    let max_size = f.max_size.as_ref().map_or(8 << 20, |s| s.get_ref().0);
    if max_size == 0 || max_size > 1 << 30 {
        if let Some(s) = &f.max_size {
            ld.err(
                s.span(),
                ctx,
                "cache `max_size` must be from 1 byte to 1GiB",
            );
        }
    }
    let lock_timeout = f
        .lock_timeout
        .as_ref()
        .map_or(std::time::Duration::from_secs(5), |d| d.get_ref().0);
    if lock_timeout.is_zero() {
        if let Some(d) = &f.lock_timeout {
            ld.err(d.span(), ctx, "cache `lock_timeout` must be more than 0");
        }
    }
    let secs = |d: &Option<super::values::Dur>| {
        d.map_or(0, |d| u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX))
    };
    if ld.errors.len() > before {
        return None;
    }
    Some(Arc::new(CacheRoute {
        ttl: f.ttl.map_or(std::time::Duration::ZERO, |d| d.0),
        max_size: max_size as usize,
        lock_timeout,
        stale_while_revalidate: secs(&f.stale_while_revalidate),
        stale_if_error: secs(&f.stale_if_error),
        tag_header: tag_header?,
        expose_tags: f.expose_tags,
        status_header,
        targeted_cache_control,
    }))
}

/// A static route's folder, resolved at load (symlinks included) so a request's file can be
/// checked to lie under it after its own symlinks are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSite {
    pub root: std::path::PathBuf,
    /// The file served for a directory; `None`: directories are 404.
    pub index: Option<String>,
    /// Served (200) when no file matches: single-page apps route in the browser.
    pub fallback: Option<std::path::PathBuf>,
    pub dotfiles: bool,
}

pub(super) fn static_site(
    ld: &mut Loader,
    s: &Spanned<StaticFile>,
    config: &std::path::Path,
    ctx: &str,
) -> Option<Arc<StaticSite>> {
    let f = s.get_ref();
    let root = relative_to(config, f.root.get_ref());
    let root = match std::fs::canonicalize(&root) {
        Ok(r) if r.is_dir() => r,
        Ok(_) => {
            ld.err(
                f.root.span(),
                ctx,
                format!("static root {} is not a directory", root.display()),
            );
            return None;
        }
        Err(e) => {
            ld.err(
                f.root.span(),
                ctx,
                format!("static root {}: {e}", root.display()),
            );
            return None;
        }
    };
    let plain_name =
        |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\', '\0']);
    let index = match &f.index {
        None => Some("index.html".to_string()),
        Some(i) if i.get_ref().is_empty() => None,
        Some(i) if plain_name(i.get_ref()) => Some(i.get_ref().clone()),
        Some(i) => {
            ld.err(
                i.span(),
                ctx,
                format!("`index` must be a file name, got \"{}\"", i.get_ref()),
            );
            return None;
        }
    };
    let fallback = match &f.fallback {
        None => None,
        Some(fb) => {
            let rel = fb.get_ref().trim_start_matches('/');
            let ok = !rel.is_empty() && rel.split('/').all(plain_name);
            let file = root.join(rel);
            match std::fs::canonicalize(&file) {
                Ok(real) if ok && real.starts_with(&root) && real.is_file() => Some(real),
                _ => {
                    ld.err(
                        fb.span(),
                        ctx,
                        format!(
                            "`fallback` must name a file under the root, and {} is not one",
                            file.display()
                        ),
                    );
                    return None;
                }
            }
        }
    };
    Some(Arc::new(StaticSite {
        root,
        index,
        fallback,
        dotfiles: f.dotfiles,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let c = Compression {
            algorithms: vec![(Coding::Gzip, 6)],
            min_size: 0,
            types: DEFAULT_TYPES.iter().map(|t| type_match(t)).collect(),
        };
        assert!(c.compresses(b"text/html; charset=utf-8"));
        assert!(c.compresses(b"Application/JSON"));
        assert!(!c.compresses(b"text/"));
        assert!(!c.compresses(b"text/event-stream"));
        assert!(!c.compresses(b"image/png"));
        assert!(!c.compresses(b"application/json-seq"));
    }
}
