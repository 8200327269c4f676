//! The request's authority (`host[:port]`), decided once.
//!
//! One spelling per authority: the host lower-cased, one trailing dot dropped, the scheme's
//! default port dropped (80 on a plain gateway, 443 on a TLS one) and a port written without
//! leading zeros. `Shop.Example.com.:80` and `shop.example.com` are one authority to the
//! router, the cache key, purge, redirects, `explain` and the upstream (Host and
//! X-Forwarded-Host): a second spelling reaching any one of them lets a client store an
//! answer under another client's key (a redirect built from `Host: shop:1337` served to
//! every client of `shop`). Everything that needs the host or port takes it from here and
//! never splits a Host header itself.
//!
//! The grammar is RFC 3986 §3.2.2's, narrowed to what a gateway can route safely: a reg-name
//! of letters, digits, `-` and `_` in non-empty labels, or a bracketed IPv6 literal, and an
//! optional decimal port.

use std::net::IpAddr;

use http::HeaderValue;

/// A canonical authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// `host[:port]` as it goes upstream (Host, X-Forwarded-Host) and into cache keys.
    value: HeaderValue,
    /// Where the host ends in `value`.
    host_len: usize,
    /// A port other than the scheme's default; `None` for the default.
    port: Option<u16>,
}

/// The scheme's default port: what an authority without one means.
pub const fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

impl Authority {
    /// The canonical form of `raw` as a request on a `tls` (or plain) connection means it, or
    /// `None` when `raw` is not a valid authority.
    pub fn parse(raw: &[u8], tls: bool) -> Option<Authority> {
        Self::build(raw, tls, None)
    }

    /// As [`Authority::parse`], from a header value: when the value is canonical already (the
    /// usual case) it is kept, not copied.
    pub fn from_header(v: &HeaderValue, tls: bool) -> Option<Authority> {
        Self::build(v.as_bytes(), tls, Some(v))
    }

    fn build(raw: &[u8], tls: bool, value: Option<&HeaderValue>) -> Option<Authority> {
        // One scan validates and finds the parts (this runs for every request).
        let s = scan(raw)?;
        let host = &raw[..s.host_end];
        let host = if s.ipv6 {
            host
        } else {
            host.strip_suffix(b".").unwrap_or(host)
        };
        let port = match s.port {
            None | Some([]) => None,
            // scan() checked the digits and the range.
            Some(p) => Some(p.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'))),
        }
        .filter(|&p| p != default_port(tls));
        let same = !s.upper
            && match port {
                None => raw.len() == host.len(),
                Some(p) => {
                    let mut buf = itoa_u16(p);
                    let digits = buf.digits();
                    raw.len() == host.len() + 1 + digits.len() && &raw[host.len() + 1..] == digits
                }
            };
        let value = match value {
            Some(v) if same => v.clone(),
            _ => {
                let mut out = Vec::with_capacity(host.len() + 6);
                out.extend(host.iter().map(u8::to_ascii_lowercase));
                if let Some(p) = port {
                    out.push(b':');
                    out.extend_from_slice(itoa_u16(p).digits());
                }
                HeaderValue::from_bytes(&out).ok()?
            }
        };
        Some(Authority {
            value,
            host_len: host.len(),
            port,
        })
    }

    /// The host, lower-cased, without a trailing dot or port; an IPv6 literal keeps its
    /// brackets (`[::1]`).
    pub fn host(&self) -> &str {
        // Built from valid ASCII only.
        self.as_str().get(..self.host_len).unwrap_or("")
    }

    /// A port other than the scheme's default.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The port, the scheme's default when none was given.
    pub fn port_or_default(&self, tls: bool) -> u16 {
        self.port.unwrap_or(default_port(tls))
    }

    /// `host[:port]`, canonical.
    pub fn as_str(&self) -> &str {
        self.value.to_str().unwrap_or("")
    }

    /// `host[:port]` as a header value (Host, X-Forwarded-Host).
    pub fn header_value(&self) -> &HeaderValue {
        &self.value
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        let h = self.host();
        let h = h
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h);
        h.parse().ok()
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A u16 in decimal, on the stack.
struct Digits {
    buf: [u8; 5],
    start: usize,
}

impl Digits {
    fn digits(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_u16(mut n: u16) -> Digits {
    let mut buf = [0u8; 5];
    let mut start = 5;
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Digits { buf, start }
}

/// `host [ ":" port ]` as RFC 3986 §3.2.2 spells it: a reg-name or a bracketed IPv6 literal,
/// and an optional decimal port. No userinfo, no path, no whitespace: anything else in a Host
/// would let two parties read it two ways.
pub fn valid(h: &[u8]) -> bool {
    scan(h).is_some()
}

/// What one pass over a valid authority found.
struct Scan<'a> {
    /// Where the host ends (the port's colon, or the end).
    host_end: usize,
    /// The port's digits (maybe none: `host:`).
    port: Option<&'a [u8]>,
    /// The host has upper-case letters.
    upper: bool,
    ipv6: bool,
}

fn scan(h: &[u8]) -> Option<Scan<'_>> {
    if h.is_empty() || h.len() > 255 {
        return None;
    }
    if h[0] == b'[' {
        let close = h.iter().position(|&b| b == b']')?;
        let inner = &h[1..close];
        let literal_ok = !inner.is_empty()
            && inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        let port = match &h[close + 1..] {
            [] => None,
            [b':', port @ ..] if valid_port(port) => Some(port),
            _ => return None,
        };
        return literal_ok.then(|| Scan {
            host_end: close + 1,
            port,
            upper: inner.iter().any(u8::is_ascii_uppercase),
            ipv6: true,
        });
    }
    // Labels of letters, digits, `-` and `_`, none empty (one trailing dot is allowed), then
    // an optional port. Anything else (`a;b`, `.example.com`, `a..b`) would be read one way
    // by the router and another by an upstream. The byte checks have no early exit, so they
    // compile to vector instructions; the structure is checked after.
    let (name, port) = match h.iter().rposition(|&b| b == b':') {
        Some(i) => (&h[..i], Some(&h[i + 1..])),
        None => (h, None),
    };
    let (bytes_ok, upper) = name.iter().fold((true, false), |(ok, up), &b| {
        (
            ok & (b.is_ascii_alphanumeric() | (b == b'-') | (b == b'_') | (b == b'.')),
            up | b.is_ascii_uppercase(),
        )
    });
    let bare = name.strip_suffix(b".").unwrap_or(name);
    let ok = bytes_ok
        && !bare.is_empty()
        && bare[0] != b'.'
        && bare[bare.len() - 1] != b'.'
        && !bare.windows(2).any(|w| w == b"..")
        && port.is_none_or(valid_port);
    ok.then_some(Scan {
        host_end: name.len(),
        port,
        upper,
        ipv6: false,
    })
}

/// RFC 3986 allows an empty port (`host:`), which means the scheme's.
fn valid_port(p: &[u8]) -> bool {
    p.len() <= 5
        && p.iter().all(u8::is_ascii_digit)
        && p.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str, tls: bool) -> Option<String> {
        Authority::parse(raw.as_bytes(), tls).map(|a| a.as_str().to_string())
    }

    #[test]
    fn one_spelling_per_authority() {
        for (raw, tls, want) in [
            ("shop.example.com", false, "shop.example.com"),
            ("Shop.Example.COM", false, "shop.example.com"),
            ("shop.example.com.", false, "shop.example.com"),
            ("shop.example.com:80", false, "shop.example.com"),
            ("shop.example.com.:80", false, "shop.example.com"),
            ("shop.example.com:", false, "shop.example.com"),
            ("shop.example.com:080", false, "shop.example.com"),
            ("shop.example.com:443", false, "shop.example.com:443"),
            ("shop.example.com:443", true, "shop.example.com"),
            ("shop.example.com:80", true, "shop.example.com:80"),
            ("shop.example.com:1337", false, "shop.example.com:1337"),
            ("SHOP.example.com:01337", true, "shop.example.com:1337"),
            ("127.0.0.1:8080", false, "127.0.0.1:8080"),
            ("[::1]", false, "[::1]"),
            ("[::1]:80", false, "[::1]"),
            ("[FE80::1]:8443", true, "[fe80::1]:8443"),
            ("localhost", true, "localhost"),
        ] {
            assert_eq!(canon(raw, tls).as_deref(), Some(want), "{raw} tls={tls}");
        }
    }

    #[test]
    fn refuses_what_could_be_read_two_ways() {
        for raw in [
            "",
            "a b",
            "user@host",
            "host/path",
            ".example.com",
            "a..b",
            "a.b..",
            "host:port",
            "host:65536",
            "host:123456",
            "[::1",
            "[::1]x",
            "[]",
            "[::g]",
            "a;b",
            "a%2eb",
        ] {
            assert_eq!(canon(raw, false), None, "{raw:?}");
        }
    }

    #[test]
    fn parts() {
        let a = Authority::parse(b"API.example.com.:8443", false).unwrap();
        assert_eq!(a.host(), "api.example.com");
        assert_eq!(a.port(), Some(8443));
        assert_eq!(a.port_or_default(false), 8443);
        assert_eq!(a.ip(), None);
        let b = Authority::parse(b"[::1]:443", true).unwrap();
        assert_eq!(
            (b.host(), b.port(), b.port_or_default(true)),
            ("[::1]", None, 443)
        );
        assert_eq!(b.ip(), Some("::1".parse().unwrap()));
        let c = Authority::parse(b"10.0.0.1", false).unwrap();
        assert_eq!(c.ip(), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_canonical_header_value_is_kept() {
        let v = HeaderValue::from_static("shop.example.com:8080");
        let a = Authority::from_header(&v, false).unwrap();
        assert_eq!(a.header_value(), &v);
        let v = HeaderValue::from_static("Shop.example.com:8080");
        assert_eq!(
            Authority::from_header(&v, false).unwrap().as_str(),
            "shop.example.com:8080"
        );
    }
}
