//! Typed config values: each parses its TOML string at load, so a bad one is reported at its
//! own line and column and nothing is parsed on the request path.
use std::net::{SocketAddr, ToSocketAddrs};

use serde::de::{self, Deserialize, Deserializer};

// Durations, sizes and CIDRs are plugin config values too; they live in the plugins crate.
pub use gatehouse_plugins::config::{Cidr, Dur, Size};

/// A listen address: an IP literal and a port (`"127.0.0.1:8080"`, `"[::]:443"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid listen address {s:?} (write IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\")"
            ))
        })
    }
}

/// An upstream peer: its address (`IP:PORT`, or `HOST:PORT` resolved at load) and the name
/// as written, which is the peer's Host when a route does not pass the client's on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr, pub String);

impl<'de> Deserialize<'de> for PeerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let addr = parse_peer(&s).map_err(de::Error::custom)?;
        Ok(PeerAddr(addr, s))
    }
}

/// The address `name` (`HOST:PORT`) stands for: the lowest of those it resolves to, so a name
/// with several addresses resolves to the same one every time.
pub fn resolve_first(name: &str) -> std::io::Result<Option<SocketAddr>> {
    Ok(name.to_socket_addrs()?.min())
}

pub fn parse_peer(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "invalid peer address {s:?}: missing port (write HOST:PORT, e.g. \"127.0.0.1:9001\")"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "invalid peer address {s:?} (write HOST:PORT, e.g. \"127.0.0.1:9001\")"
        ));
    }
    match resolve_first(s) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(format!("peer address {s:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve peer address {s:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, StrDeserializer};
    use serde::de::IntoDeserializer;
    use std::time::Duration;

    fn de<T: for<'a> Deserialize<'a>>(s: &str) -> Result<T, DeError> {
        let d: StrDeserializer<DeError> = s.into_deserializer();
        T::deserialize(d)
    }

    #[test]
    fn durations() {
        assert_eq!(de::<Dur>("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(de::<Dur>("1m").unwrap().0, Duration::from_secs(60));
        assert!(de::<Dur>("5 parsecs").is_err());
        assert!(de::<Dur>("10").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(de::<Size>("64KiB").unwrap().0, 65536);
        assert_eq!(de::<Size>("10MB").unwrap().0, 10_000_000);
        assert_eq!(de::<Size>("512").unwrap().0, 512);
        assert!(de::<Size>("5 parsecs").is_err());
        assert!(de::<Size>("KiB").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            de::<Cidr>("10.1.2.3/8").unwrap().0.to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(de::<Cidr>("::1").unwrap().0.to_string(), "::1/128");
        assert!(de::<Cidr>("10.0.0.0/33").is_err());
        assert!(de::<Cidr>("ten").is_err());
    }

    #[test]
    fn addresses() {
        assert!(de::<ListenAddr>("127.0.0.1:8080").is_ok());
        assert!(de::<ListenAddr>("[::1]:8080").is_ok());
        assert!(de::<ListenAddr>("localhost:80").is_err());
        assert!(de::<ListenAddr>("127.0.0.1").is_err());
        assert!(de::<PeerAddr>("localhost:9001").is_ok());
        assert!(de::<PeerAddr>("127.0.0.1").is_err());
        assert!(de::<PeerAddr>("127.0.0.1:99999").is_err());
    }
}
