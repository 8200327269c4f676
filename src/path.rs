//! The canonical form of a request path (RFC 3986 §6.2.2 and §5.2.4), and what refuses one:
//! see `proxy/canonical.rs` for the rules and why. A leaf: the config reads paths in it (a
//! route's prefix), admin purges name entries by it, and the proxy makes requests canonical
//! with it.
use std::borrow::Cow;

use percent_encoding::percent_encode_byte;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

pub(crate) const fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

/// Server-wide choices about what a canonical request may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Keep `%2F` and `%5C` encoded in paths (as data, never separators) instead of refusing
    /// them: for APIs whose identifiers hold slashes (Envoy's `KEEP_UNCHANGED`).
    pub keep_encoded_slashes: bool,
    /// Keep `;` in paths instead of refusing them. Tomcat, Jetty and Spring cut `;params` off
    /// each segment before matching (`/admin;x/users` is their `/admin/users`), while the
    /// gateway would route it as a segment `admin;x`: on by choice only, for upstreams that
    /// treat `;` as data.
    pub keep_path_parameters: bool,
}

const UNRESERVED: u8 = 1;
const SUB_DELIM: u8 = 2;
/// `:` and `@`, allowed in path segments besides unreserved and sub-delims.
const PCHAR_EXTRA: u8 = 4;

const fn class(b: u8) -> u8 {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => UNRESERVED,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => SUB_DELIM,
        b':' | b'@' => PCHAR_EXTRA,
        _ => 0,
    }
}

/// Whether `b` may appear unescaped in a canonical path (with `/`).
fn plain(b: u8) -> bool {
    b == b'/' || class(b) != 0
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical form of an origin-form path (no query), borrowed when it already is one.
///
/// Hand-written rather than with `percent-encoding`: it decodes only unreserved escapes,
/// refuses some, and upper-cases the rest, in the same pass that finds segments.
pub fn canonical_path(path: &[u8], opts: Options) -> Result<Cow<'_, str>, Refusal> {
    if is_canonical(path) {
        // Only plain ASCII passed is_canonical.
        return Ok(Cow::Borrowed(
            std::str::from_utf8(path).map_err(|_| bad("invalid path"))?,
        ));
    }
    // Pass 1: escapes decoded or normalised, other bytes made plain or encoded; separators
    // are the raw slashes only.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    path.get(i + 1).copied().and_then(hex),
                    path.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(bad("broken percent-escape in the path"));
                };
                let c = h << 4 | l;
                if c < 0x20 || c == 0x7f {
                    return Err(bad("encoded control character in the path"));
                }
                if (c == b'/' || c == b'\\') && !opts.keep_encoded_slashes {
                    return Err(bad("encoded slash or backslash in the path"));
                }
                if class(c) == UNRESERVED {
                    decoded.push(c);
                } else {
                    // Kept, in upper case (RFC 3986 §6.2.2.1).
                    decoded.extend_from_slice(percent_encode_byte(c).as_bytes());
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(bad("backslash in the path")),
            b';' if !opts.keep_path_parameters => {
                return Err(bad("path parameter (;) in the path"))
            }
            b'#' => return Err(bad("fragment in the request target")),
            _ if b < 0x20 || b == 0x7f || b == b' ' => {
                return Err(bad("control character or space in the path"))
            }
            _ if plain(b) => decoded.push(b),
            _ => decoded.extend_from_slice(percent_encode_byte(b).as_bytes()),
        }
        i += 1;
    }
    // Pass 2: segments, with empty ones merged away and dot segments resolved (RFC 3986
    // §5.2.4). The path ends in a slash when the input did or its last segment was a dot one.
    let mut segs: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" => continue,
            b"." => trailing = true,
            b".." => {
                segs.pop();
                trailing = true;
            }
            _ if seg.starts_with(b".;") || seg.starts_with(b"..;") => {
                return Err(bad("dot segment with a parameter in the path"))
            }
            // Kept `%2F`/`%5C` are data here, but an upstream that decodes them sees
            // separators: `..%2Fadmin` or `%2F%2Fx` must not be able to climb or merge.
            _ if opts.keep_encoded_slashes && escaped_separators_unsafe(seg) => {
                return Err(bad("encoded slash beside a dot segment or another slash"))
            }
            _ => {
                segs.push(seg);
                trailing = false;
            }
        }
    }
    if decoded.last() == Some(&b'/') {
        trailing = true;
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segs {
        out.push('/');
        // Every byte left is plain ASCII or an escape we wrote.
        out.push_str(&String::from_utf8_lossy(s));
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Whether a segment, split at its (upper-cased) `%2F`/`%5C`, holds an empty or dot piece.
fn escaped_separators_unsafe(seg: &[u8]) -> bool {
    let has = |i: usize| seg[i..].starts_with(b"%2F") || seg[i..].starts_with(b"%5C");
    if !(0..seg.len()).any(has) {
        return false;
    }
    let mut pieces = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < seg.len() {
        if has(i) {
            pieces.push(&seg[start..i]);
            i += 3;
            start = i;
        } else {
            i += 1;
        }
    }
    pieces.push(&seg[start..]);
    pieces
        .iter()
        .any(|p| p.is_empty() || *p == b"." || *p == b"..")
}

/// The common case, in one scan: only plain bytes, no escape, no empty segment, no segment
/// that starts with a dot (a dot segment, or a `.;` one) — nothing to change.
fn is_canonical(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in path {
        if !plain(b) || b == b';' || (prev == b'/' && (b == b'/' || b == b'.')) {
            return false;
        }
        prev = b;
    }
    path.first() == Some(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> Result<String, &'static str> {
        canonical_path(p.as_bytes(), Options::default())
            .map(|c| c.into_owned())
            .map_err(|r| r.reason)
    }

    #[test]
    fn paths_already_canonical_are_borrowed() {
        for p in ["/", "/a/b", "/v1.2/x", "/a:b@c,d=e", "/a-b_c~d", "/a/"] {
            assert!(
                matches!(
                    canonical_path(p.as_bytes(), Options::default()),
                    Ok(Cow::Borrowed(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn spellings_of_one_path_meet() {
        for (input, want) in [
            ("//admin", "/admin"),
            ("/admin//x///y", "/admin/x/y"),
            ("/%61dmin", "/admin"),
            ("/%41%2d%2E%5F%7e", "/A-._~"),
            ("/a/%2a", "/a/%2A"),
            ("/a/%3a", "/a/%3A"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/../../x", "/x"),
            ("/..", "/"),
            ("/a/..", "/"),
            ("/a//", "/a/"),
            ("/a/.../b", "/a/.../b"),
            ("/a/..x/b", "/a/..x/b"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/{b}|^`", "/a/%7Bb%7D%7C%5E%60"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/%252e%252e/admin", "/%252e%252e/admin"),
        ] {
            assert_eq!(canon(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/admin%2fx",
            "/admin%2Fx",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "/a%0d%0a",
            "/a%7f",
            "/a%",
            "/a%2",
            "/a%zz",
            "/public/..;/admin",
            "/public/.;x/admin",
            "/admin;x/users",
            "/admin;",
            "/a b",
            "/a\tb",
        ] {
            assert!(canon(p).is_err(), "{p} must be refused");
        }
    }

    #[test]
    fn encoded_slashes_kept_when_asked() {
        let keep = Options {
            keep_encoded_slashes: true,
            ..Options::default()
        };
        let c = |p: &str| canonical_path(p.as_bytes(), keep).map(|c| c.into_owned());
        assert_eq!(c("/files/a%2fb/../c").unwrap(), "/files/c");
        assert_eq!(c("/files/a%2fb").unwrap(), "/files/a%2Fb");
        assert_eq!(c("/x/a%5cb").unwrap(), "/x/a%5Cb");
        // Still no climbing or merging through them.
        for p in [
            "/public/..%2Fadmin",
            "/%2Fadmin",
            "/x/%5c",
            "/a%2F.%2Fb",
            "/a%2f%2fb",
        ] {
            assert!(c(p).is_err(), "{p}");
        }
    }

    #[test]
    fn path_parameters_kept_when_asked() {
        let keep = Options {
            keep_path_parameters: true,
            ..Options::default()
        };
        let c = |p: &str| canonical_path(p.as_bytes(), keep).map(|c| c.into_owned());
        assert_eq!(c("/a;v=1/b").unwrap(), "/a;v=1/b");
        assert!(
            c("/x/..;/admin").is_err(),
            "dot segments with parameters still refused"
        );
    }
}
