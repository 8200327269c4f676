//! Client address and X-Forwarded-* headers.
//!
//! X-Forwarded-For is believed only from `trusted_proxies`: the client is the right-most
//! address in the chain that is not a trusted proxy (as nginx's `real_ip_recursive`). From an
//! untrusted peer, an incoming X-Forwarded-For/-Proto/-Host is replaced (or removed, when the
//! gateway's `forwarded_headers` leaves it out), so a client cannot spoof them; the other
//! headers upstream frameworks read as the proxy's word (`Forwarded`, `X-Real-IP`,
//! `X-Forwarded-Port`, `X-Forwarded-Prefix`: Spring's ForwardedHeaderFilter, Tomcat's
//! RemoteIpValve) are removed, and pass only from trusted proxies.
use std::net::IpAddr;

use http::header::HeaderName;
use http::HeaderValue;
use ipnet::IpNet;
use pingora_http::RequestHeader;

use gatehouse_plugins::authority::Authority;

use crate::config::ForwardedHeaders;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers upstream frameworks take as a proxy's word, which only trusted proxies may send.
const PROXY_ONLY: [&str; 4] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
];

// Inserting by a static, already-cased name spares Pingora title-casing a `HeaderName` into a
// fresh buffer on every insert (its case map keeps the wire spelling): about 400 instructions
// per request by callgrind. The rest of the insert cost is the header map itself.
const XFF_CASED: &str = "X-Forwarded-For";
const XFP_CASED: &str = "X-Forwarded-Proto";
const XFH_CASED: &str = "X-Forwarded-Host";

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`: it is that IPv4
/// address for every rule (trusted proxies, ip_filter, rate-limit keys, hashing) and header.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address of the connection's peer, unmapped.
pub fn peer_ip(session: &pingora_proxy::Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| unmap(a.ip()))
}

/// The client address of a request that arrived from `peer` (unmapped): the right-most
/// X-Forwarded-For address that is not a trusted proxy. An entry that is no address stops the
/// walk with no client address at all (`None`: what ip_filter's allow lists refuse), never
/// with a trusted proxy's, which would pass a filter meant for the client.
pub fn client_ip(trusted: &[IpNet], peer: IpAddr, req: &RequestHeader) -> Option<IpAddr> {
    if trusted.is_empty() || !is_trusted(trusted, peer) {
        return Some(peer);
    }
    let mut client = peer;
    for v in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let s = v.to_str().ok()?;
        for part in s.rsplit(',') {
            let part = part.trim();
            let ip = part
                .parse::<IpAddr>()
                .or_else(|_| part.parse::<std::net::SocketAddr>().map(|a| a.ip()))
                .ok()?;
            client = unmap(ip);
            if !is_trusted(trusted, client) {
                return Some(client);
            }
        }
    }
    // Every hop is a trusted proxy: the first of them is the client.
    Some(client)
}

/// Appends `ip` as text. IPv4, the common case, by hand: `Display` goes through the
/// formatting machinery (padding, a `fmt::Write` call per octet), which showed in profiles.
fn push_ip(buf: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push('.');
                }
                if o >= 100 {
                    buf.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    buf.push(char::from(b'0' + o / 10 % 10));
                }
                buf.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(_) => {
            use std::fmt::Write;
            let _ = write!(buf, "{ip}");
        }
    }
}

/// The headers a trusted proxy passes on about the original request, copied from the
/// client's request onto `to` (a request the gateway builds itself, as an aggregate's parts):
/// [`set_headers`] then treats them as on the proxied path (the client first in
/// X-Forwarded-For, then the proxy).
pub fn copy_from_trusted(
    from: &RequestHeader,
    to: &mut RequestHeader,
) -> pingora_error::Result<()> {
    use pingora_error::{ErrorType::InternalError, OrErr};
    let names = [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
        .into_iter()
        .cloned()
        .chain(PROXY_ONLY.iter().map(|n| HeaderName::from_static(n)));
    for name in names {
        to.remove_header(&name);
        for v in from.headers.get_all(&name) {
            to.append_header(name.clone(), v.clone())
                .or_err(InternalError, "forwarded header")?;
        }
    }
    Ok(())
}

/// Sets X-Forwarded-For/-Proto/-Host on the request to the upstream, those `which` allows;
/// X-Forwarded-Host is the request's canonical `authority`.
/// One not allowed is removed unless the peer is trusted: the upstream never gets a client's
/// own value for a header it may believe came from the gateway.
pub fn set_headers(
    req: &mut RequestHeader,
    which: ForwardedHeaders,
    peer: Option<IpAddr>,
    peer_trusted: bool,
    tls: bool,
    authority: Option<&Authority>,
) -> pingora_error::Result<()> {
    use pingora_error::{ErrorType::InternalError, OrErr};
    let off = [
        (!which.for_, &X_FORWARDED_FOR),
        (!which.proto, &X_FORWARDED_PROTO),
        (!which.host, &X_FORWARDED_HOST),
    ];
    if !peer_trusted {
        // One pass over the few names a request has costs less than a hash lookup per
        // header; removing is the rare case.
        let spoofed = req.headers.keys().any(|k| {
            PROXY_ONLY.contains(&k.as_str()) || off.iter().any(|(o, name)| *o && k == *name)
        });
        if spoofed {
            for name in PROXY_ONLY {
                req.remove_header(name);
            }
            for (_, name) in off.iter().filter(|(o, _)| *o) {
                req.remove_header(*name);
            }
        }
    }
    if let Some(peer) = peer.filter(|_| which.for_) {
        let mut buf = String::with_capacity(48);
        if peer_trusted {
            for v in req.headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(s) = v.to_str() {
                    buf.push_str(s);
                    buf.push_str(", ");
                }
            }
        }
        push_ip(&mut buf, peer);
        // Moves the buffer into the header value: one allocation in all.
        let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(buf))
            .or_err(InternalError, "x-forwarded-for")?;
        req.insert_header(XFF_CASED, v)
            .or_err(InternalError, "x-forwarded-for")?;
    }
    if which.proto && !(peer_trusted && req.headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = HeaderValue::from_static(if tls { "https" } else { "http" });
        req.insert_header(XFP_CASED, proto)
            .or_err(InternalError, "x-forwarded-proto")?;
    }
    if which.host && !(peer_trusted && req.headers.contains_key(&X_FORWARDED_HOST)) {
        match authority {
            Some(a) => req
                .insert_header(XFH_CASED, a.header_value().clone())
                .or_err(InternalError, "x-forwarded-host")?,
            None => {
                req.remove_header(&X_FORWARDED_HOST);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    fn a_example() -> gatehouse_plugins::authority::Authority {
        gatehouse_plugins::authority::Authority::parse(b"a.example", false).unwrap()
    }

    #[test]
    fn push_ip_matches_display() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.100.9.255",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            super::push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    use super::*;

    fn req(xff: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for v in xff {
            r.append_header("x-forwarded-for", *v).unwrap();
        }
        r
    }

    #[test]
    fn client_ip_walks_trusted_chain() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let r = req(&["1.2.3.4, 10.0.0.7", "10.0.0.9"]);
        assert_eq!(
            client_ip(&trusted, peer, &r).unwrap().to_string(),
            "1.2.3.4"
        );
        // untrusted peer: its XFF is ignored
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(&trusted, other, &r), Some(other));
        // garbage behind trusted hops: no client address, never the trusted 10.0.0.7
        let r = req(&["junk, 10.0.0.7"]);
        assert_eq!(client_ip(&trusted, peer, &r), None);
        // garbage left of an untrusted address is never reached
        let r = req(&["junk, 1.2.3.4, 10.0.0.7"]);
        assert_eq!(
            client_ip(&trusted, peer, &r).unwrap().to_string(),
            "1.2.3.4"
        );
        // mapped addresses are their IPv4 selves, in the chain and as the peer
        let r = req(&["::ffff:1.2.3.4, ::ffff:10.0.0.7"]);
        assert_eq!(
            client_ip(&trusted, peer, &r).unwrap().to_string(),
            "1.2.3.4"
        );
        let mapped_peer = unmap("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(
            client_ip(&trusted, mapped_peer, &r).unwrap().to_string(),
            "1.2.3.4"
        );
    }

    #[test]
    fn headers_are_replaced_from_untrusted_peers() {
        let mut r = req(&["6.6.6.6"]);
        for h in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
        ] {
            r.insert_header(h, "for=127.0.0.1").unwrap();
        }
        let mut trusted = r.clone();
        r.insert_header("x-forwarded-proto", "https").unwrap();
        r.insert_header("host", "a.example").unwrap();
        set_headers(
            &mut r,
            ForwardedHeaders::default(),
            Some("192.0.2.1".parse().unwrap()),
            false,
            false,
            Some(&a_example()),
        )
        .unwrap();
        assert_eq!(r.headers.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert_eq!(r.headers.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(r.headers.get("x-forwarded-host").unwrap(), "a.example");
        for h in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
        ] {
            assert!(r.headers.get(h).is_none(), "{h} from a client is dropped");
        }
        set_headers(
            &mut trusted,
            ForwardedHeaders::default(),
            Some("10.0.0.1".parse().unwrap()),
            true,
            false,
            Some(&a_example()),
        )
        .unwrap();
        assert!(trusted.headers.get("forwarded").is_some(), "a proxy's pass");

        let mut r = req(&["6.6.6.6"]);
        set_headers(
            &mut r,
            ForwardedHeaders::default(),
            Some("10.0.0.1".parse().unwrap()),
            true,
            true,
            Some(&a_example()),
        )
        .unwrap();
        assert_eq!(
            r.headers.get("x-forwarded-for").unwrap(),
            "6.6.6.6, 10.0.0.1"
        );
        assert_eq!(r.headers.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn headers_left_out_are_not_sent_nor_passed_from_untrusted_peers() {
        let none = ForwardedHeaders {
            for_: false,
            proto: false,
            host: false,
        };
        let spoofed = || {
            let mut r = req(&["6.6.6.6"]);
            r.insert_header("x-forwarded-proto", "https").unwrap();
            r.insert_header("x-forwarded-host", "evil.example").unwrap();
            r.insert_header("host", "a.example").unwrap();
            r
        };
        let mut r = spoofed();
        set_headers(
            &mut r,
            none,
            Some("192.0.2.1".parse().unwrap()),
            false,
            false,
            Some(&a_example()),
        )
        .unwrap();
        for h in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
            assert!(r.headers.get(h).is_none(), "{h} must not pass");
        }
        assert_eq!(r.headers.get("host").unwrap(), "a.example");

        // Only X-Forwarded-For: it is set, the other two are dropped.
        let only_for = ForwardedHeaders { for_: true, ..none };
        let mut r = spoofed();
        set_headers(
            &mut r,
            only_for,
            Some("192.0.2.1".parse().unwrap()),
            false,
            false,
            Some(&a_example()),
        )
        .unwrap();
        assert_eq!(r.headers.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert!(r.headers.get("x-forwarded-proto").is_none());
        assert!(r.headers.get("x-forwarded-host").is_none());

        // A trusted proxy's values pass untouched.
        let mut r = spoofed();
        set_headers(
            &mut r,
            none,
            Some("10.0.0.1".parse().unwrap()),
            true,
            false,
            Some(&a_example()),
        )
        .unwrap();
        assert_eq!(r.headers.get("x-forwarded-for").unwrap(), "6.6.6.6");
        assert_eq!(r.headers.get("x-forwarded-host").unwrap(), "evil.example");
    }
}
