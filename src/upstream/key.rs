//! What a consistent hash or a sticky split is keyed by, taken from the request without
//! allocating.
use std::net::IpAddr;

use pingora_http::RequestHeader;

use crate::config::HashKey;

/// The bytes of `key` in this request; empty when the request has none (such requests all
/// hash alike).
pub fn hash_input<'a>(
    key: &HashKey,
    req: &'a RequestHeader,
    client: Option<IpAddr>,
    buf: &'a mut [u8; 16],
) -> &'a [u8] {
    match key {
        HashKey::ClientIp => match client {
            Some(IpAddr::V4(v4)) => {
                buf[..4].copy_from_slice(&v4.octets());
                &buf[..4]
            }
            Some(IpAddr::V6(v6)) => {
                *buf = v6.octets();
                &buf[..]
            }
            None => &[],
        },
        HashKey::Header(name) => req.headers.get(name).map_or(&[], |v| v.as_bytes()),
        HashKey::Path => req.uri.path().as_bytes(),
        HashKey::Cookie(name) => cookie(req, name).unwrap_or(&[]),
    }
}

fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    for h in req.headers.get_all(http::header::COOKIE) {
        for pair in h.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes()) {
                if let Some(v) = rest.strip_prefix(b"=") {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// FNV-1a: stable across runs and builds, so sticky choices survive restarts.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs() {
        let mut req = RequestHeader::build("GET", b"/a/b?x=1", None).unwrap();
        req.insert_header("cookie", "a=1; sid=xyz; b=2").unwrap();
        req.insert_header("x-user", "u1").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            hash_input(&HashKey::Cookie("sid".into()), &req, None, &mut buf),
            b"xyz"
        );
        assert_eq!(
            hash_input(&HashKey::Cookie("si".into()), &req, None, &mut buf),
            b""
        );
        assert_eq!(
            hash_input(
                &HashKey::Header(http::HeaderName::from_static("x-user")),
                &req,
                None,
                &mut buf
            ),
            b"u1"
        );
        assert_eq!(hash_input(&HashKey::Path, &req, None, &mut buf), b"/a/b");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            hash_input(&HashKey::ClientIp, &req, Some(ip), &mut buf),
            &[10, 1, 2, 3]
        );
        assert_ne!(stable_hash(b"a"), stable_hash(b"b"));
    }
}
