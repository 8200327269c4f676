//! Static routes (`static = { root, index, fallback, dotfiles }`): files under a folder,
//! answered in request_filter after the route's plugins, through the same response hooks
//! and compression as proxied responses.
//!
//! The request path is the canonical one (see `canonical.rs`); on a `strip_prefix` route the
//! file is the path after the prefix (nginx's `alias`), otherwise the whole path (`root`).
//! No escape from the root whatever the spelling: every decoded segment is checked (no `.`,
//! `..`, separators, NUL; no dotfiles unless allowed), and the file's real path, symlinks
//! resolved, must lie under the root's. File system calls go through tokio's blocking pool,
//! never on the proxy threads; bodies stream in 64 KiB reads.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use gatehouse_plugins::Reply;
use http::{header, HeaderValue, Method, StatusCode};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::errors::write_reply;
use super::RequestCtx;
use crate::config::offload::StaticSite;
use crate::config::Route;
use crate::runtime::GatewayRt;

const CHUNK: usize = 64 * 1024;

/// What a request path names under the root.
#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    File(PathBuf),
    /// Refused whatever is on disk: a dotfile, an unsafe segment.
    Refused,
}

/// The file path for `path` (canonical, `/`-rooted), or a refusal.
fn local_path(site: &StaticSite, path: &str) -> Lookup {
    let mut out = site.root.clone();
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_encoding::percent_decode_str(raw).collect::<Vec<u8>>();
        let Ok(seg) = String::from_utf8(decoded) else {
            return Lookup::Refused;
        };
        if seg == "." || seg == ".." || seg.contains(['/', '\\', '\0']) {
            return Lookup::Refused;
        }
        if seg.starts_with('.') && !site.dotfiles {
            return Lookup::Refused;
        }
        out.push(seg);
    }
    Lookup::File(out)
}

/// The real path of `p` if it lies under the root and names no dotfile on the way (a symlink
/// inside the root may point at `.git`); `Err(Found::..)` when missing or outside.
async fn resolve(site: &StaticSite, p: &Path) -> std::io::Result<Result<PathBuf, Found>> {
    let real = match tokio::fs::canonicalize(p).await {
        Ok(r) => r,
        Err(e) if is_missing(&e) => return Ok(Err(Found::Missing)),
        Err(e) => return Err(e),
    };
    let Ok(rel) = real.strip_prefix(&site.root) else {
        return Ok(Err(Found::Refused));
    };
    if !site.dotfiles
        && rel
            .components()
            .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
    {
        return Ok(Err(Found::Refused));
    }
    Ok(Ok(real))
}

/// Missing, for the client: no such file, a name too long for the file system, a symlink
/// loop. None of them is worth a log line per request.
fn is_missing(e: &std::io::Error) -> bool {
    const ELOOP: i32 = 40;
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::NotADirectory
            | std::io::ErrorKind::InvalidFilename
    ) || e.raw_os_error() == Some(ELOOP)
}

// One per static request, moved twice: boxing the file would cost more than it saves.
#[allow(clippy::large_enum_variant)]
enum Found {
    File(tokio::fs::File, std::fs::Metadata, PathBuf),
    /// A directory asked for without its trailing slash: relative links in its index would
    /// resolve against the parent, so redirect as nginx does.
    Slash,
    Missing,
    /// Outside the root or a dotfile: 404 as if missing, but never the fallback.
    Refused,
    Forbidden,
}

async fn find(site: &StaticSite, path: &str) -> Found {
    let Lookup::File(p) = local_path(site, path) else {
        return Found::Refused;
    };
    let found = async {
        let mut real = match resolve(site, &p).await? {
            Ok(r) => r,
            Err(f) => return Ok(f),
        };
        let mut meta = tokio::fs::metadata(&real).await?;
        if meta.is_dir() {
            if !path.ends_with('/') {
                return Ok(Found::Slash);
            }
            let Some(index) = &site.index else {
                return Ok(Found::Missing);
            };
            real = match resolve(site, &real.join(index)).await? {
                Ok(r) => r,
                Err(f) => return Ok(f),
            };
            meta = tokio::fs::metadata(&real).await?;
        }
        if !meta.is_file() {
            return Ok(Found::Missing);
        }
        let file = tokio::fs::File::open(&real).await?;
        // The open file's own metadata: the path may have been swapped since.
        let meta = file.metadata().await?;
        std::io::Result::Ok(Found::File(file, meta, real))
    }
    .await;
    match found {
        Ok(f) => f,
        Err(e) if is_missing(&e) => Found::Missing,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Found::Forbidden,
        Err(e) => {
            log::warn!("static file {}: {e}", p.display());
            Found::Forbidden
        }
    }
}

/// Answers the request from the route's folder.
pub(super) async fn serve(
    site: &StaticSite,
    route: &Route,
    gw: &GatewayRt,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let method = &session.req_header().method;
    if method != Method::GET && method != Method::HEAD {
        let mut reply = Reply::json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "static content answers GET and HEAD",
            ctx.plugins.request_id(),
        );
        reply
            .headers
            .push((header::ALLOW, HeaderValue::from_static("GET, HEAD")));
        write_reply(Some(gw), session, ctx, reply).await;
        return Ok(());
    }
    let full = session.req_header().uri.path().to_string();
    let path = super::rewrite::upstream_path(route, &full).unwrap_or_else(|| full.clone());
    let mut found = find(site, &path).await;
    if matches!(found, Found::Missing) {
        if let Some(fb) = &site.fallback {
            found = match tokio::fs::File::open(fb).await {
                Ok(f) => match f.metadata().await {
                    Ok(m) => Found::File(f, m, fb.clone()),
                    Err(_) => Found::Missing,
                },
                Err(_) => Found::Missing,
            };
        }
    }
    let (file, meta, real) = match found {
        Found::File(f, m, p) => (f, m, p),
        Found::Slash => {
            let mut location = format!("{full}/");
            if let Some(q) = session.req_header().uri.query() {
                location.push('?');
                location.push_str(q);
            }
            let mut reply = Reply::json_error(
                StatusCode::MOVED_PERMANENTLY,
                "a directory: its address ends with a slash",
                ctx.plugins.request_id(),
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                reply.headers.push((header::LOCATION, v));
            }
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(());
        }
        Found::Missing | Found::Refused | Found::Forbidden => {
            let forbidden = matches!(found, Found::Forbidden);
            let (status, why) = if forbidden {
                (StatusCode::FORBIDDEN, "this file cannot be read")
            } else {
                (StatusCode::NOT_FOUND, "no such file")
            };
            let reply = Reply::json_error(status, why, ctx.plugins.request_id());
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(());
        }
    };
    send_file(gw, session, ctx, file, &meta, &real).await
}

/// `"<mtime hex>-<size hex>"`, nginx's shape: changes when the file does, costs no read.
fn etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!("\"{mtime:x}-{:x}\"", meta.len())
}

fn content_type(p: &Path) -> HeaderValue {
    let mime = mime_guess::from_path(p).first_or_octet_stream();
    let text = mime.type_() == mime_guess::mime::TEXT
        || mime.subtype() == mime_guess::mime::JAVASCRIPT
        || mime.subtype() == mime_guess::mime::JSON;
    let v = if text {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_string()
    };
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

/// Weak comparison of an `If-None-Match` list with our ETag (RFC 9110 §13.1.2).
fn none_match(value: &[u8], etag: &str) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        t == b"*" || t.strip_prefix(b"W/").unwrap_or(t) == etag.as_bytes()
    })
}

/// The byte range to send, from a `Range` header (RFC 9110 §14.2).
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

fn range(value: &[u8], len: u64) -> RangeAsk {
    let Some(spec) = value.strip_prefix(b"bytes=") else {
        return RangeAsk::Whole;
    };
    // Several ranges may be answered with the whole representation (§14.2).
    if spec.contains(&b',') {
        return RangeAsk::Whole;
    }
    let Ok(spec) = std::str::from_utf8(spec.trim_ascii()) else {
        return RangeAsk::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Part(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                return RangeAsk::Whole;
            }
            if start >= len {
                return RangeAsk::Unsatisfiable;
            }
            RangeAsk::Part(start, end.map_or(len - 1, |e| e.min(len - 1)))
        }
        _ => RangeAsk::Whole,
    }
}

async fn send_file(
    gw: &GatewayRt,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut file: tokio::fs::File,
    meta: &std::fs::Metadata,
    real: &Path,
) -> Result<()> {
    let len = meta.len();
    let tag = etag(meta);
    // HTTP dates run from 1970 to 9999 (httpdate panics outside): other mtimes send none.
    let modified = meta
        .modified()
        .ok()
        .filter(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() < 253_402_300_800)
        })
        .map(httpdate::fmt_http_date);
    let req = session.req_header();
    let h = &req.headers;

    // If-None-Match wins over If-Modified-Since when both are sent (RFC 9110 §13.2.2).
    let not_modified = match h.get(header::IF_NONE_MATCH) {
        Some(v) => none_match(v.as_bytes(), &tag),
        None => match (h.get(header::IF_MODIFIED_SINCE), meta.modified().ok()) {
            (Some(since), Some(m)) => since
                .to_str()
                .ok()
                .and_then(|s| httpdate::parse_http_date(s).ok())
                .is_some_and(|since| {
                    m.duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                        <= since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0)
                }),
            _ => false,
        },
    };
    // If-Range: the range holds only for the same representation (strong ETag or the exact
    // date); else the whole file.
    let range_ok = h.get(header::IF_RANGE).is_none_or(|v| {
        v.as_bytes() == tag.as_bytes()
            || modified
                .as_deref()
                .is_some_and(|m| v.as_bytes() == m.as_bytes())
    });
    let head_only = req.method == Method::HEAD;
    // Range is defined for GET only (RFC 9110 §14.2): a HEAD gets the whole file's head.
    let ask = match (h.get(header::RANGE), range_ok, not_modified, head_only) {
        (Some(r), true, false, false) => range(r.as_bytes(), len),
        _ => RangeAsk::Whole,
    };

    let (status, start, count) = match ask {
        _ if not_modified => (StatusCode::NOT_MODIFIED, 0, 0),
        RangeAsk::Whole => (StatusCode::OK, 0, len),
        RangeAsk::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeAsk::Unsatisfiable => {
            let mut reply = Reply::json_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range is outside the file",
                ctx.plugins.request_id(),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                reply.headers.push((header::CONTENT_RANGE, v));
            }
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(());
        }
    };

    let mut resp = ResponseHeader::build(status, Some(8))?;
    let internal = |_| Error::explain(ErrorType::InternalError, "static response header");
    resp.insert_header(header::ETAG, &tag).map_err(internal)?;
    if let Some(m) = &modified {
        resp.insert_header(header::LAST_MODIFIED, m)
            .map_err(internal)?;
    }
    if status != StatusCode::NOT_MODIFIED {
        resp.insert_header(header::CONTENT_TYPE, content_type(real))
            .map_err(internal)?;
        resp.insert_header(header::ACCEPT_RANGES, "bytes")
            .map_err(internal)?;
        resp.insert_header(header::CONTENT_LENGTH, count)
            .map_err(internal)?;
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let cr = format!("bytes {start}-{}/{len}", start + count - 1);
        resp.insert_header(header::CONTENT_RANGE, cr)
            .map_err(internal)?;
    }
    gw.stamp(&mut resp);
    let chain = gw.chain(ctx.route);
    chain.response(session, &mut resp, &mut ctx.plugins).await?;
    ctx.replied = true;
    let no_body = head_only || count == 0;
    session
        .write_response_header(Box::new(resp), no_body)
        .await?;
    if no_body {
        return Ok(());
    }
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| Error::because(ErrorType::ReadError, "static file seek", e))?;
    }
    let mut left = count;
    while left > 0 {
        let want = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
        let mut buf = BytesMut::zeroed(want);
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Error::because(ErrorType::ReadError, "static file read", e))?;
        if n == 0 {
            // The file shrank under us: the length is promised, so the connection must end.
            return Error::e_explain(ErrorType::ReadError, "static file shrank while sent");
        }
        buf.truncate(n);
        left -= n as u64;
        let mut body: Option<Bytes> = Some(buf.freeze());
        if chain.has_response_body() {
            chain.response_body(session, &mut body, left == 0, &mut ctx.plugins)?;
        }
        session.write_response_body(body, left == 0).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> StaticSite {
        StaticSite {
            root: PathBuf::from("/srv/www"),
            index: Some("index.html".into()),
            fallback: None,
            dotfiles: false,
        }
    }

    #[test]
    fn segments_are_checked_after_decoding() {
        let s = site();
        assert_eq!(
            local_path(&s, "/a/b%20c.txt"),
            Lookup::File(PathBuf::from("/srv/www/a/b c.txt"))
        );
        for bad in [
            "/a/%2e%2e/x",
            "/..",
            "/a/%2F/b",
            "/.env",
            "/a/.git/config",
            "/a%00b",
            "/%5c",
        ] {
            assert_eq!(local_path(&s, bad), Lookup::Refused, "{bad}");
        }
        let dot = StaticSite {
            dotfiles: true,
            ..site()
        };
        assert!(matches!(
            local_path(&dot, "/.well-known/x"),
            Lookup::File(_)
        ));
        assert_eq!(local_path(&dot, "/a/%2e%2e/x"), Lookup::Refused);
    }

    #[test]
    fn ranges() {
        assert_eq!(range(b"bytes=0-9", 100), RangeAsk::Part(0, 9));
        assert_eq!(range(b"bytes=90-", 100), RangeAsk::Part(90, 99));
        assert_eq!(range(b"bytes=-10", 100), RangeAsk::Part(90, 99));
        assert_eq!(range(b"bytes=-500", 100), RangeAsk::Part(0, 99));
        assert_eq!(range(b"bytes=50-500", 100), RangeAsk::Part(50, 99));
        assert_eq!(range(b"bytes=100-", 100), RangeAsk::Unsatisfiable);
        assert_eq!(range(b"bytes=-0", 100), RangeAsk::Unsatisfiable);
        assert_eq!(range(b"bytes=0-1,5-6", 100), RangeAsk::Whole);
        assert_eq!(range(b"bytes=9-1", 100), RangeAsk::Whole);
        assert_eq!(range(b"items=0-1", 100), RangeAsk::Whole);
        assert_eq!(range(b"bytes=a-b", 100), RangeAsk::Whole);
    }

    #[test]
    fn etag_matching() {
        assert!(none_match(b"\"a\", W/\"b\"", "\"b\""));
        assert!(none_match(b"*", "\"b\""));
        assert!(!none_match(b"\"c\"", "\"b\""));
    }
}
