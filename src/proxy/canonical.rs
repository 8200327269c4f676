//! The canonical request: host, target and framing decided once, before routing, so that
//! routing, plugins, logs and the upstream all see one and the same request.
//!
//! A request that could be read two ways is refused rather than guessed at: a gateway in front
//! of services is only a barrier if no second spelling of a request (`//admin`, `/%61dmin`,
//! `/a/%2f..`, an absolute-form target) reaches a route other than the one its plugins guard.
//! What Pingora's HTTP/1 parser already refuses (two Host fields, a Host that differs from an
//! absolute-form authority, differing Content-Lengths, a non-chunked final Transfer-Encoding)
//! gets its 400 before any hook runs; this module refuses the rest:
//!
//! - **Framing** (RFC 9112 §6): two Content-Length field lines or a list value, even of equal
//!   numbers; a Transfer-Encoding other than one `chunked` (501 for codings we do not
//!   implement); a head whose lines end in a bare LF (a front proxy that only ends heads on
//!   CRLF CRLF would read the rest as this request's, we as the next one's).
//! - **Host** (RFC 9112 §3.2): an HTTP/1.1 request without Host, or with an invalid one. An
//!   absolute-form target (`GET http://h/p`) is routed on its authority and goes upstream in
//!   origin-form with that authority as Host.
//! - **Path** (RFC 3986 §6.2.2): percent-encoded unreserved characters are decoded
//!   (`/%61dmin` is `/admin`), other escapes are upper-cased, bytes outside RFC 3986's `pchar`
//!   are percent-encoded, repeated slashes merge, `.` and `..` segments are resolved. Encoded
//!   `/` or `\` (`%2F`, `%5C`) are refused unless `[server] keep_encoded_slashes` is on (then
//!   they stay encoded and are not separators), as are a raw `\`, encoded NUL or control
//!   characters (Pingora percent-encodes raw ones before we see them, so they arrive as
//!   escapes), broken escapes, and Tomcat's `..;` / `.;` segments. Matching stays
//!   case-sensitive, as RFC 3986 paths are. The query string is kept as sent.
//!
//! The canonical form replaces the request's own target, so nothing after this point can see
//! another one.

pub(crate) use crate::path::bad;
pub use crate::path::{canonical_path, Options, Refusal};
use gatehouse_plugins::authority::{self, Authority};
use percent_encoding::percent_encode_byte;

use http::header::{CONTENT_LENGTH, COOKIE, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Version};
use pingora_http::RequestHeader;

/// What the caller needs of a canonical request, found on the way.
#[derive(Debug, Default)]
pub struct Canonical {
    /// The request's authority, in its one spelling (see `gatehouse_plugins::authority`);
    /// the Host header says the same from here on. `None` only for an HTTP/1.0 request
    /// without one.
    pub authority: Option<Authority>,
    /// The request has an `Upgrade` header.
    pub upgrade: bool,
}

/// Makes `req` canonical in place, or says why it cannot be. `raw_head` is the HTTP/1 head as
/// received (None for HTTP/2, whose framing is the h2 codec's); `tls` says which port an
/// authority without one means.
pub fn canonicalize(
    req: &mut RequestHeader,
    raw_head: Option<&[u8]>,
    opts: Options,
    tls: bool,
) -> Result<Canonical, Refusal> {
    if let Some(head) = raw_head {
        check_line_endings(head)?;
    }
    check_method(&req.method)?;
    let fields = scan_fields(req)?;
    let host = fields.host.cloned();
    let (hosts, upgrade) = (fields.hosts, fields.upgrade);
    let cookie_crumbs = fields.cookies > 1 && req.version == Version::HTTP_2;
    if let Some(n) = fields.padded_length {
        // Upstreams disagree on `05` (octal to some parsers): the one framing decided here
        // is the one they get, in its one spelling.
        req.insert_header(CONTENT_LENGTH, n)
            .map_err(|_| bad("invalid Content-Length"))?;
    }

    let absolute = absolute_authority(req.raw_path())?;
    let authority = match req.version {
        Version::HTTP_11 | Version::HTTP_10 => {
            if hosts > 1 {
                return Err(bad("more than one Host header"));
            }
            match (host.as_ref(), absolute.as_deref()) {
                (None, _) if req.version == Version::HTTP_11 => {
                    return Err(bad("HTTP/1.1 request without a Host header"))
                }
                // One scan validates and canonicalises (this runs for every request).
                (Some(h), a) => {
                    let Some(canonical) = Authority::from_header(h, tls) else {
                        return Err(bad("invalid Host header"));
                    };
                    if a.is_some_and(|a| !h.as_bytes().eq_ignore_ascii_case(a.as_bytes())) {
                        return Err(bad(
                            "Host header differs from the request target's authority",
                        ));
                    }
                    Some(canonical)
                }
                (None, Some(a)) => Authority::parse(a.as_bytes(), tls),
                (None, None) => None,
            }
        }
        Version::HTTP_2 => {
            // Pingora refuses a Host that differs from :authority before this runs (byte for
            // byte: a difference in letter case too).
            let a = match (req.uri.authority(), host.as_ref()) {
                (Some(a), _) => Authority::parse(a.as_str().as_bytes(), tls),
                (None, Some(h)) => Authority::from_header(h, tls),
                (None, None) => None,
            };
            if a.is_none() {
                return Err(bad("request without a valid authority"));
            }
            if cookie_crumbs {
                join_cookie_crumbs(req)?;
            }
            a
        }
        _ => return Err(bad("unsupported HTTP version")),
    };
    // From here on the Host header is the canonical authority: the request goes on as HTTP/1
    // carries it (origin-form with its Host) and nothing after this reads another spelling.
    if let Some(a) = &authority {
        if host.as_ref() != Some(a.header_value()) {
            req.insert_header(HOST, a.header_value().clone())
                .map_err(|_| bad("invalid request target"))?;
        }
    }
    let found = Canonical { authority, upgrade };

    let target = req.raw_path();
    let (path, query) = match &absolute {
        Some(a) => {
            // Past `scheme://authority`: the path (possibly empty) and query.
            let rest = &target[target.len().min(scheme_len(target) + 3 + a.len())..];
            split_query(rest)
        }
        None => split_query(target),
    };
    let path: &[u8] = if absolute.is_some() && path.is_empty() {
        b"/"
    } else {
        path
    };
    if path.first() != Some(&b'/') {
        return Err(if req.method == Method::OPTIONS && target == b"*" {
            bad("asterisk-form requests are not proxied")
        } else {
            bad("request target is not an absolute path")
        });
    }
    let canonical = canonical_path(path, opts)?;
    // Bytes past ASCII in the query would reach plugins (through the URI) as U+FFFD and the
    // upstream as sent: encoded, both see the same.
    let query_ascii = query.is_none_or(|q| q.is_ascii());
    let origin_form = absolute.is_none() && req.version != Version::HTTP_2;
    // Unchanged when borrowed (the common case, decided by one scan) or rebuilt equal.
    if origin_form && query_ascii && canonical.as_bytes() == path {
        return Ok(found);
    }
    let mut new_target = Vec::with_capacity(canonical.len() + query.map_or(0, |q| q.len() + 1));
    new_target.extend_from_slice(canonical.as_bytes());
    if let Some(q) = query {
        new_target.push(b'?');
        for &b in q {
            if b.is_ascii() {
                new_target.push(b);
            } else {
                new_target.extend_from_slice(percent_encode_byte(b).as_bytes());
            }
        }
    }
    req.set_raw_path(&new_target)
        .map_err(|_| bad("invalid request target"))?;
    Ok(found)
}

/// HTTP/2 may split a Cookie into one field per crumb (RFC 9113 §8.2.3, for HPACK); an
/// HTTP/1.1 upstream, and every cookie reader here, expects one `Cookie` line, so the crumbs
/// are joined with `; ` as the RFC says a gateway to HTTP/1.1 must.
fn join_cookie_crumbs(req: &mut RequestHeader) -> Result<(), Refusal> {
    let mut joined = Vec::new();
    for crumb in req.headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    let v = HeaderValue::from_bytes(&joined).map_err(|_| bad("invalid Cookie header"))?;
    req.insert_header(COOKIE, v)
        .map_err(|_| bad("invalid Cookie header"))
}

/// Method names are case-sensitive (RFC 9110 §9.1): `get` is not GET to the router, but
/// some servers read it as GET, so a lower-case spelling of a standard method is refused.
fn check_method(m: &Method) -> Result<(), Refusal> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let s = m.as_str();
    if s.bytes().any(|b| b.is_ascii_lowercase())
        && STANDARD.iter().any(|x| x.eq_ignore_ascii_case(s))
    {
        return Err(bad("method names are case-sensitive"));
    }
    Ok(())
}

/// The authority of an absolute-form target (`http://host:port/...`), validated; `None` for
/// other forms. Only http and https are proxied.
fn absolute_authority(target: &[u8]) -> Result<Option<String>, Refusal> {
    let n = scheme_len(target);
    if n == 0 || !target[n..].starts_with(b"://") {
        return Ok(None);
    }
    let scheme = &target[..n];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return Err(bad("absolute-form target with a scheme other than http(s)"));
    }
    let rest = &target[n + 3..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    if !authority::valid(authority) {
        return Err(bad("invalid authority in the request target"));
    }
    // authority::valid admits ASCII only.
    Ok(Some(String::from_utf8_lossy(authority).into_owned()))
}

/// Length of a leading URI scheme (`ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`), 0 if none.
fn scheme_len(target: &[u8]) -> usize {
    if !target.first().is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    target
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
        .unwrap_or(target.len())
}

fn split_query(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

/// Refuses a head in which a line ends in a bare LF (RFC 9112 §2.2 lets a recipient accept
/// them; a gateway in front of other parsers must not).
fn check_line_endings(head: &[u8]) -> Result<(), Refusal> {
    // Each byte against the one before it, with no early exit: a loop the compiler turns
    // into vector instructions (cheaper than a search per line end).
    let bare = head.first() == Some(&b'\n')
        || head
            .iter()
            .skip(1)
            .zip(head.iter())
            .fold(false, |acc, (&b, &prev)| {
                acc | ((b == b'\n') & (prev != b'\r'))
            });
    if bare {
        return Err(bad("a line of the request head ends in a bare LF"));
    }
    Ok(())
}

/// What one pass over the header fields found.
struct Fields<'a> {
    host: Option<&'a HeaderValue>,
    hosts: usize,
    upgrade: bool,
    cookies: usize,
    /// A Content-Length with leading zeros (`05`): forwarded as the number it is (`5`).
    padded_length: Option<u64>,
}

/// One pass over the header fields (cheaper than a lookup per name): the Host, and RFC 9112
/// §6's one unambiguous way to find the end of the body.
fn scan_fields(req: &RequestHeader) -> Result<Fields<'_>, Refusal> {
    let mut f = Fields {
        host: None,
        hosts: 0,
        upgrade: false,
        cookies: 0,
        padded_length: None,
    };
    let (mut cls, mut tes) = (0, 0);
    for (name, value) in req.headers.iter() {
        let v = value.as_bytes();
        if *name == HOST {
            f.hosts += 1;
            f.host = Some(value);
        } else if *name == CONTENT_LENGTH {
            cls += 1;
            if cls > 1 {
                return Err(bad("more than one Content-Length header"));
            }
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return Err(bad("invalid Content-Length"));
            }
            if v.len() > 1 && v[0] == b'0' {
                // 19 digits at most: always a u64.
                f.padded_length = std::str::from_utf8(v).ok().and_then(|t| t.parse().ok());
            }
        } else if *name == TRANSFER_ENCODING {
            tes += 1;
            if tes > 1 {
                return Err(bad("more than one Transfer-Encoding header"));
            }
            if !v.eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal {
                    status: 501,
                    reason: "transfer codings other than chunked are not implemented",
                });
            }
        } else if *name == http::header::CONNECTION {
            if v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close") {
                continue;
            }
            // A proxy removes what Connection names: naming the host or the framing would
            // make the next hop read another request than this one.
            let names_end_to_end = v.split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                [&b"host"[..], b"content-length", b"transfer-encoding"]
                    .iter()
                    .any(|n| t.eq_ignore_ascii_case(n))
            });
            if names_end_to_end {
                return Err(bad("Connection names Host or a framing header"));
            }
        } else if *name == http::header::UPGRADE {
            f.upgrade = true;
        } else if *name == COOKIE {
            f.cookies += 1;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for h in [
            "a",
            "api.example.com",
            "api.example.com:8080",
            "[::1]",
            "[::1]:443",
            "127.0.0.1:80",
            "xn--nxasmq6b.example",
            "a_b.example.",
            "A-1.Example.COM",
            "a:",
        ] {
            assert!(authority::valid(h.as_bytes()), "{h}");
        }
        for h in [
            "",
            "a b",
            "a/b",
            "user@a",
            "a:port",
            "a:99999",
            "[::1",
            "[zz]",
            "[::1]x",
            "a\\b",
            "a\tb",
            ".example.com",
            "a..b",
            "a.b..",
            ".",
            "a;b",
            "a,b",
            "a~b",
            "a!b",
        ] {
            assert!(!authority::valid(h.as_bytes()), "{h}");
        }
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn decide(r: &mut RequestHeader) -> Result<(), &'static str> {
        canonicalize(r, None, Options::default(), false)
            .map(|_| ())
            .map_err(|e| e.reason)
    }

    /// Host leaves in its one spelling, and the authority says the same.
    #[test]
    fn host_is_canonical() {
        for (host, tls, want) in [
            ("Shop.Example.com.:80", false, "shop.example.com"),
            ("shop.example.com:1337", false, "shop.example.com:1337"),
            ("shop.example.com:443", true, "shop.example.com"),
            ("shop.example.com:443", false, "shop.example.com:443"),
        ] {
            let mut r = req("GET", "/", &[("host", host)]);
            let c = canonicalize(&mut r, None, Options::default(), tls).unwrap();
            assert_eq!(r.headers.get(HOST).unwrap(), want, "{host}");
            assert_eq!(c.authority.unwrap().as_str(), want, "{host}");
        }
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let mut r = req("GET", "http://Internal.Example.com/a//b?x=1", &[]);
        r.set_version(Version::HTTP_10);
        decide(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/a/b?x=1");
        assert_eq!(r.headers.get(HOST).unwrap(), "internal.example.com");

        let mut r = req(
            "GET",
            "http://internal.example.com",
            &[("host", "internal.example.com")],
        );
        decide(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/");

        let mut r = req("GET", "http://internal.example.com/", &[]);
        assert!(decide(&mut r).unwrap_err().contains("without a Host"));
        let mut r = req("GET", "http://a.example/", &[("host", "b.example")]);
        assert!(decide(&mut r).is_err());
        let mut r = req("GET", "ftp://a.example/", &[("host", "a.example")]);
        assert!(decide(&mut r).is_err());
    }

    #[test]
    fn framing_and_host_rules() {
        let ok = [("host", "a")];
        assert!(decide(&mut req("GET", "/", &ok)).is_ok());
        assert!(decide(&mut req("GET", "/", &[])).is_err());
        assert!(decide(&mut req("GET", "/", &[("host", "a"), ("host", "a")])).is_err());
        assert!(decide(&mut req("GET", "/", &[("host", "a b")])).is_err());
        let two_cl = [
            ("host", "a"),
            ("content-length", "2"),
            ("content-length", "2"),
        ];
        assert!(decide(&mut req("POST", "/", &two_cl)).is_err());
        let list_cl = [("host", "a"), ("content-length", "2, 2")];
        assert!(decide(&mut req("POST", "/", &list_cl)).is_err());
        let signed = [("host", "a"), ("content-length", "+2")];
        assert!(decide(&mut req("POST", "/", &signed)).is_err());
        let gzip = [("host", "a"), ("transfer-encoding", "gzip, chunked")];
        let e = canonicalize(
            &mut req("POST", "/", &gzip),
            None,
            Options::default(),
            false,
        );
        assert_eq!(e.unwrap_err().status, 501);
        let chunked = [("host", "a"), ("transfer-encoding", "Chunked")];
        assert!(decide(&mut req("POST", "/", &chunked)).is_ok());
        assert!(decide(&mut req("OPTIONS", "*", &ok)).is_err());
        let mut http10 = req("GET", "/", &[]);
        http10.set_version(Version::HTTP_10);
        assert!(decide(&mut http10).is_ok(), "HTTP/1.0 needs no Host");
    }

    #[test]
    fn methods_connection_and_queries() {
        assert!(decide(&mut req("get", "/", &[("host", "a")])).is_err());
        assert!(decide(&mut req("Post", "/", &[("host", "a")])).is_err());
        assert!(decide(&mut req("PROPFIND", "/", &[("host", "a")])).is_ok());
        assert!(decide(&mut req("purge", "/", &[("host", "a")])).is_ok());
        for c in [
            "close, Host",
            "keep-alive, content-length",
            "Transfer-Encoding",
        ] {
            let h = [("host", "a"), ("connection", c)];
            assert!(decide(&mut req("GET", "/", &h)).is_err(), "{c}");
        }
        let h = [("host", "a"), ("connection", "keep-alive, x-debug")];
        assert!(decide(&mut req("GET", "/", &h)).is_ok());
        let mut r = RequestHeader::build("GET", "/s?q=caf\u{e9}&x=1".as_bytes(), None).unwrap();
        r.insert_header("host", "a").unwrap();
        decide(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/s?q=caf%C3%A9&x=1");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut r = RequestHeader::build("GET", b"//x", None).unwrap();
        r.set_version(Version::HTTP_2);
        r.set_uri("https://admin.example.com//x?q".parse().unwrap());
        decide(&mut r).unwrap();
        assert_eq!(r.headers.get(HOST).unwrap(), "admin.example.com");
        assert_eq!(r.raw_path(), b"/x?q");
        assert!(r.uri.authority().is_none());
    }

    #[test]
    fn bare_lf_in_the_head_is_refused() {
        let mut r = req("GET", "/", &[("host", "a")]);
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\n";
        assert!(canonicalize(&mut r, Some(head), Options::default(), false).is_err());
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(canonicalize(&mut r, Some(head), Options::default(), false).is_ok());
    }

    #[test]
    fn the_path_is_rewritten_in_place() {
        let mut r = req("GET", "/public/%2e%2e//admin?q=%2f", &[("host", "a")]);
        decide(&mut r).unwrap();
        assert_eq!(r.uri.path(), "/admin");
        assert_eq!(r.raw_path(), b"/admin?q=%2f");
    }
}
